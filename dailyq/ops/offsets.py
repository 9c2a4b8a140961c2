"""How far a process's clock is from Redis's, in words: the threshold and the text.

Pure (no Redis client): beats.py reads the offsets that heartbeats carry; status,
health, the scheduler's log and render.py's table show them with these.
"""

from __future__ import annotations

# A process whose clock is further than this from Redis's is reported (status, health)
# and its scheduler logs it. Slots fire by Redis's clock whatever the offset; a node this
# far off still stamps its own logs and a task's own idea of "now" wrong.
OFFSET_WARN_S = 2.0


def clock_is_off(offset_s: float | None) -> bool:
    return offset_s is not None and abs(offset_s) > OFFSET_WARN_S


def format_offset(offset_s: float | None) -> str:
    """``+90.0s``, ``-0.3s``, ``+0.0s`` (never ``-0.0s``), or ``unknown``."""
    if offset_s is None:
        return "unknown"
    shown = f"{offset_s:+.1f}s"
    return "+0.0s" if shown == "-0.0s" else shown


def describe_offset(offset_s: float) -> str:
    """``90.0s ahead of`` / ``90.0s behind``, to be followed by whose clock."""
    return f"{abs(offset_s):.1f}s {'ahead of' if offset_s > 0 else 'behind'}"


def offset_warning(node: str, role: str, offset_s: float) -> str:
    return (f"{role} clock of {node} is {describe_offset(offset_s)} Redis's (more than {OFFSET_WARN_S:g}s); "
            "fix the node's time sync (NTP)")
