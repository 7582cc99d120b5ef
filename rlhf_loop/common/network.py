"""Network helpers shared by the learner's process group, servers and scripts (a leaf module)."""

from __future__ import annotations

import ipaddress
import socket


def free_port(host: str = "") -> int:
    """A TCP port nobody listens on right now (on every interface unless `host` is given)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
