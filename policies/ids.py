"""When a checkpoint was written, read from its id.

No checkpoint table has a created-at column. LangGraph's checkpoint ids are
UUIDv6 (`langgraph.checkpoint.base.id.uuid6`), whose leading 60 bits are a
Gregorian timestamp in 100 ns units, so the id itself dates the checkpoint and
ids sort by time.

Python 3.11's `uuid.UUID(id).time` does not know v6: it reads the fields in
v1 order and dates a fresh checkpoint in the year 3605. We decode the v6
layout ourselves, as `langgraph.checkpoint.base.id` does.
"""

from __future__ import annotations

import uuid

# 100 ns intervals between 1582-10-15 (UUID epoch) and 1970-01-01 (Unix epoch).
_GREGORIAN_TO_UNIX = 0x01B21DD213814000


def checkpoint_time(checkpoint_id: str) -> float | None:
    """Unix time (seconds) a checkpoint id was minted, or None if the id carries none.

    v6 ids are decoded from their time-ordered layout; v1 ids through the
    standard library; anything else (custom ids) has no readable time and the
    caller must fall back to the checkpoint's `ts`.
    """
    try:
        u = uuid.UUID(checkpoint_id)
    except (ValueError, AttributeError, TypeError):
        return None
    if u.version == 6:
        # time_high (32) | time_mid (16) | version (4) | time_low (12)
        ticks = ((u.int >> 80) << 12) | ((u.int >> 64) & 0x0FFF)
    elif u.version == 1:
        ticks = u.time
    else:
        return None
    return (ticks - _GREGORIAN_TO_UNIX) / 10_000_000
