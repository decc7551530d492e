"""What the benchmarks share: their log line, past-dated UUIDv6 ids, message text.

Imported by `bench/sqlite_bench.py` and `bench/postgres_bench.py` (run as
scripts, so this folder is on `sys.path`).
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime

from policies.ids import checkpoint_time

# 100 ns intervals between 1582-10-15 (UUID epoch) and 1970-01-01 (Unix epoch).
_GREGORIAN_TO_UNIX = 0x01B21DD213814000


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def uuid6_at(ns: int, clock_seq: int, node: int) -> str:
    """`langgraph.checkpoint.base.id.uuid6`, at a given time instead of now."""
    timestamp = ns // 100 + _GREGORIAN_TO_UNIX
    time_high_and_time_mid = (timestamp >> 12) & 0xFFFFFFFFFFFF
    time_low_and_version = timestamp & 0x0FFF
    uuid_int = time_high_and_time_mid << 80
    uuid_int |= time_low_and_version << 64
    uuid_int |= (clock_seq & 0x3FFF) << 48
    uuid_int |= node & 0xFFFFFFFFFFFF
    # version 6, RFC 4122 variant (as the bundled UUID class sets them)
    uuid_int &= ~(0xC000 << 48)
    uuid_int |= 0x8000 << 48
    uuid_int &= ~(0xF000 << 64)
    uuid_int |= 6 << 76
    return str(uuid.UUID(int=uuid_int))


def uuid6_time(checkpoint_id: str) -> float:
    """The time inside a UUIDv6 checkpoint id, as the worker reads it."""
    t = checkpoint_time(checkpoint_id)
    assert t is not None, checkpoint_id
    return t


_WORDS = [
    "the",
    "user",
    "asked",
    "about",
    "the",
    "order",
    "status",
    "and",
    "the",
    "assistant",
    "looked",
    "it",
    "up",
    "in",
    "the",
    "database",
    "before",
    "answering",
    "with",
    "a",
    "summary",
    "of",
    "shipping",
    "dates",
    "refunds",
    "invoices",
    "and",
    "a",
    "polite",
    "note",
    "about",
    "the",
    "next",
    "steps",
    "in",
    "the",
    "support",
    "conversation",
]


def _message_pool(n: int = 24) -> list[str]:
    rng = random.Random("messages")
    out = []
    for i in range(n):
        role = "human" if i % 2 == 0 else "ai"
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(25, 55)))
        out.append(f"{role}: {words}")
    return out


MESSAGES = _message_pool()
