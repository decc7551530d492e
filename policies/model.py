"""What the decision reads (summaries of a thread's rows) and what it returns.

A store engine builds a `ThreadView` from its own tables; `decide` turns it
into a `ThreadDecision`. Both are plain frozen data so the decision can be
tested exhaustively without a database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Reason(StrEnum):
    """Why a row goes (the `reason` column of `plan`)."""

    @property
    def whole_thread(self) -> bool:
        """The thread goes whole (an expiry), not some of its rows (a trim)."""
        return self in (Reason.EXPIRED, Reason.ORPHANED, Reason.QUOTA)

    EXPIRED = "expired"
    """The whole thread: its newest root checkpoint is older than `expire_after`."""
    ORPHANED = "orphaned"
    """The whole thread: the application's registry no longer lists it, and it is idle
    past the `orphaned` policy's `expire_after`."""
    QUOTA = "quota"
    """The whole thread: its store or group is over its size cap, and it is among the
    least recently active the policies let go."""
    TRIMMED = "trimmed"
    """Beyond `keep_last` and older than `keep_within` in its namespace."""
    SUBGRAPH_CALL = "subgraph-call"
    """A subgraph call's namespace whose root checkpoint goes (invariant 4)."""
    ORPHAN_CALL = "orphan-subgraph-call"
    """A subgraph call's namespace whose root checkpoint is not in the store."""
    ORPHAN_WRITES = "orphan-writes"
    """Writes whose checkpoint never committed, on a thread quiet past the grace period."""
    UNREFERENCED_BLOBS = "unreferenced-blobs"
    """(Postgres) blobs no checkpoint references, on a thread quiet past the grace period."""


class SkipReason(StrEnum):
    """Why rules that applied were not carried out (`skipped_threads_total{reason}`)."""

    INTERRUPTED = "interrupted"
    """Expiry held back: the thread waits for input and the policy says `interrupted: keep`."""
    PROTECTED_NAMESPACE = "protected-namespace"
    """Expiry held back: a `protect` policy governs one of the thread's namespaces."""
    UNDECODABLE = "undecodable"
    """A checkpoint could not be read (encrypted, no key): trimming a `DeltaChannel`
    history, or expiry under `interrupted: keep` of a thread whose head may wait."""
    CHANGED = "changed"
    """The thread changed between scan and delete; it is decided again next sweep."""
    LOCKED = "locked"
    """(SQLite) the batch could not get the write lock in time; decided again next sweep."""
    SWEEP_LIMIT = "sweep-limit"
    """The policy's `max_threads_per_sweep` was reached; the thread waits for the next sweep."""
    REGISTRY_UNAVAILABLE = "registry-unavailable"
    """An `orphaned` policy's registry query failed or returned no rows: the policy matched
    nothing this sweep (the thread fell through to the next policy)."""

    HELD = "held"
    """A legal hold (`checkpoint-janitor hold`): the thread is skipped whole, before deciding."""


class TtlFallbackReason(StrEnum):
    """Why a per-thread TTL (`expire_after: {metadata_key: ...}`) fell back to its default
    (`ttl_fallbacks_total{reason}`)."""

    MISSING = "missing"
    """The head's metadata has no such key (or null)."""
    INVALID = "invalid"
    """Not a number or a duration: text, a boolean, a list, NaN, out of range."""
    NOT_POSITIVE = "not-positive"
    """Zero or negative: never "expire now"."""


@dataclass(slots=True)
class CheckpointSummary:
    """The facts about one checkpoint row the decision needs.

    Treat as immutable (use `dataclasses.replace`); not `frozen` only because a
    scan builds millions and a frozen dataclass's `__init__` costs twice as much.

    `inline_channels` and `versioned_channels` are the keys of the decoded
    checkpoint's `channel_values` and `channel_versions`. Engines fill them
    only for `DeltaChannel` threads (decoding is expensive); None means "not
    decoded", which stops the trimming of a delta thread.
    """

    namespace: str
    checkpoint_id: str
    parent_id: str | None
    created_at: float | None
    """Unix seconds (from the UUIDv6 id, else the checkpoint's `ts`); None: unknown, never old."""
    parents: Mapping[str, str] = field(default_factory=dict)
    """`metadata.parents`: {} for a root graph, {"": root checkpoint id, ...} for a subgraph."""
    source: str | None = None
    """`metadata.source` ("input", "loop", "update", "fork"): where a replay's subgraphs start."""
    delta_channels: frozenset[str] = frozenset()
    """Channels named in `metadata.counters_since_delta_snapshot`."""
    delta_marked: bool = False
    """Metadata says this thread uses a DeltaChannel (counters or `delta_writes_versioned`)."""
    reads_parent_sends: bool = False
    """Format v < 4 on a store that migrates sends: pending sends come from the parent's writes."""
    has_sends_writes: bool = False
    """This checkpoint has `__pregel_tasks` writes (what a v < 4 child reads)."""
    inline_channels: frozenset[str] | None = None
    versioned_channels: frozenset[str] | None = None
    size: int = 0
    """Bytes of the row (checkpoint and metadata), for reporting."""


@dataclass(frozen=True, slots=True)
class ThreadView:
    """One thread as the decision sees it."""

    thread_id: str
    checkpoints: tuple[CheckpointSummary, ...]
    head_metadata: Mapping[str, Any] = field(default_factory=dict)
    """Metadata of the newest root checkpoint (`root_head`); policies match on it."""
    waiting: bool | None = None
    """The thread waits for input at its newest root checkpoint; None: not determined."""
    head_undecodable: bool = False
    """Whether it waits cannot be told: its newest root checkpoint cannot be decoded
    (encrypted, no key) and its writes show no interrupt or error."""
    orphan_writes: tuple[tuple[str, str], ...] = ()
    """(namespace, checkpoint_id) of writes whose checkpoint is not in the store."""


@dataclass(frozen=True, slots=True)
class Deletion:
    """One checkpoint to delete, with its writes (and, on Postgres, unreferenced blobs)."""

    namespace: str
    checkpoint_id: str
    policy: str
    reason: Reason


@dataclass(frozen=True, slots=True)
class WritesDeletion:
    """Writes without a checkpoint, deleted by (namespace, checkpoint_id)."""

    namespace: str
    checkpoint_id: str
    policy: str


@dataclass(frozen=True, slots=True)
class Expiry:
    """The whole thread goes: every namespace, checkpoint, write (and blob)."""

    policy: str
    age_seconds: float
    reason: Reason = Reason.EXPIRED


@dataclass(frozen=True, slots=True)
class Skip:
    """A rule that applied but was held back."""

    policy: str
    reason: SkipReason


@dataclass(frozen=True, slots=True)
class TtlFallback:
    """The thread's own TTL could not be used: its expiry policy's default applied."""

    policy: str
    reason: TtlFallbackReason


@dataclass(frozen=True, slots=True)
class ThreadDecision:
    """What one thread loses. Empty when it keeps everything."""

    thread_id: str
    expiry: Expiry | None = None
    deletions: tuple[Deletion, ...] = ()
    writes: tuple[WritesDeletion, ...] = ()
    skips: tuple[Skip, ...] = ()
    needs_waiting: bool = False
    """Expiry depends on whether the thread waits: decode its head and decide again."""
    ttl_fallback: TtlFallback | None = None
    """Its root policy's per-thread TTL fell back to the default (counted per sweep)."""

    @property
    def is_empty(self) -> bool:
        """Nothing to delete."""
        return self.expiry is None and not self.deletions and not self.writes
