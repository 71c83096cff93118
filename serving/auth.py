"""The optional bearer API key of this replica.

A module of its own because Ray Serve ships the ingress class to the replica by value (with copies
of the objects its methods name) but imports modules by reference: the key set here by the replica's
constructor is the one the app's middleware checks. The key is compared in constant time and is
never logged or echoed. A server reachable beyond this machine must have a key (`is_loopback`).
"""

from __future__ import annotations

import hmac
import ipaddress

_key: bytes | None = None


def require(key: str | None) -> None:
    global _key
    _key = key.encode() if key else None


def allowed(authorization: str) -> bool:
    """True without a configured key, else only for `Bearer <key>`."""
    if _key is None:
        return True
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), _key)


def is_loopback(host: str) -> bool:
    """True for a bind address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False
