"""Values as redis-py hands them back, made plain.

redis-py types every reply as ``bytes | str`` (a client may decode responses); dailyq's
clients do not, so replies are bytes, but code that reads them says so in one place.
"""

from __future__ import annotations


def as_text(value: object, errors: str = "strict") -> str:
    """A reply that is one string (a member, a field, a value) as str. ``errors`` as
    ``bytes.decode``'s: "replace" for a value shown to a person whatever it holds."""
    if isinstance(value, bytes):
        return value.decode(errors=errors)
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a string reply, got {type(value).__name__}")


def as_optional_text(value: object) -> str | None:
    """A reply that may be absent (GET of a missing key: None) as str, or None."""
    return None if value is None else as_text(value)


def reply_text(value: object) -> str:
    """A script's reply item as str: a Lua integer comes back as an int, not a string,
    and reads as its digits (str())."""
    return value.decode() if isinstance(value, bytes) else str(value)


def as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
