"""Integer arithmetic the roles share."""

from __future__ import annotations


def ceil_div(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded up, in integers (exact for any size, unlike math.ceil of a float)."""
    return -(-numerator // denominator)
