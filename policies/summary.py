"""From a checkpoint row's metadata to the `CheckpointSummary` the decision reads.

One function for every store: the worker's engines and the saver wrapper's
backends all describe checkpoints through `summarize`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from policies.ids import checkpoint_time
from policies.model import CheckpointSummary

DELTA_MARKERS = ("counters_since_delta_snapshot", "delta_writes_versioned")
"""Metadata keys a `DeltaChannel` leaves: counters on every step but its
snapshots (LangGraph.js marks `delta_writes_versioned` instead)."""


def json_object(raw: object) -> dict[str, Any]:
    """A JSON object from text, bytes or an already decoded value; {} for anything else."""
    if isinstance(raw, bytes | bytearray):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        if raw in ("", "{}"):
            return {}
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    return raw if isinstance(raw, dict) else {}


def ts_seconds(ts: object) -> float | None:
    """A checkpoint's ISO `ts` as Unix seconds (naive means UTC, as LangGraph writes it)."""
    if not isinstance(ts, str):
        return None
    try:
        parsed = datetime.fromisoformat(ts)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def summarize(
    namespace: str,
    checkpoint_id: str,
    parent_id: str | None,
    metadata: Mapping[str, Any],
    *,
    ts: object = None,
    reads_parent_sends: bool = False,
    has_sends_writes: bool = False,
    size: int = 0,
) -> CheckpointSummary:
    """The decision's facts about one checkpoint row, from its metadata.

    Age comes from the UUIDv6 id, else from `ts` where the caller has it.
    """
    counters = metadata.get("counters_since_delta_snapshot")
    parents = metadata.get("parents")
    source = metadata.get("source")
    return CheckpointSummary(
        namespace=namespace,
        checkpoint_id=checkpoint_id,
        parent_id=parent_id,
        created_at=checkpoint_time(checkpoint_id) or ts_seconds(ts),
        parents=(
            {k: v for k, v in parents.items() if isinstance(v, str)}
            if isinstance(parents, dict)
            else {}
        ),
        source=source if isinstance(source, str) else None,
        delta_channels=frozenset(counters) if isinstance(counters, dict) else frozenset(),
        delta_marked=any(m in metadata for m in DELTA_MARKERS),
        reads_parent_sends=reads_parent_sends,
        has_sends_writes=has_sends_writes,
        size=size,
    )
