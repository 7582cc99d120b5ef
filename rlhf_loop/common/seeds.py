"""Seeds derived from names: one per purpose, iteration and prompt, independent of how work is split.

A leaf module: the driver, the rollout engines and pair selection all derive their seeds here.
"""

from __future__ import annotations

import hashlib
from typing import Any


def derived_seed(*parts: Any, bits: int = 31) -> int:
    """A `bits`-bit seed hashed from `parts` ("rollout", run seed, iteration, prompt index, ...): the same parts give
    the same seed in every process, shard and engine. 31 bits fits every RNG's seed argument."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << bits) - 1)
