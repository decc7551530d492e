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
    # Read straight from the canonical text form: a sweep dates millions of
    # ids, and uuid.UUID() costs several times more than this.
    if len(checkpoint_id) == 36 and checkpoint_id[14] == "6" and checkpoint_id[8] == "-":
        try:
            high = int(checkpoint_id[:8] + checkpoint_id[9:13], 16)
            low = int(checkpoint_id[15:18], 16)
        except ValueError:
            return None
        # time_high (32) | time_mid (16) | version (4) | time_low (12)
        return ((high << 12 | low) - _GREGORIAN_TO_UNIX) / 10_000_000
    try:
        u = uuid.UUID(checkpoint_id)
    except (ValueError, AttributeError, TypeError):
        return None
    if u.version == 1:
        return (u.time - _GREGORIAN_TO_UNIX) / 10_000_000
    return None
