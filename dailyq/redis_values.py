"""Values as redis-py hands them back, made plain.

redis-py types every reply as ``bytes | str`` (a client may decode responses); dailyq's
clients do not, so replies are bytes, but code that reads them says so in one place.
"""

from __future__ import annotations


def as_text(value: object) -> str:
    """A reply that is one string (a member, a field, a value) as str."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a string reply, got {type(value).__name__}")


def as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
