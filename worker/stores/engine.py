"""What a store engine offers the sweep, whatever the database behind it.

The sweep (`worker.sweep`) decides with `policies.decide` and hands engines
`ThreadWork` in batches; an engine carries a batch out in one transaction,
re-checking under its write lock that each thread is still as scanned.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from policies.model import ThreadView
from policies.plan import ThreadAggregate, ThreadPlan

if TYPE_CHECKING:
    from worker.stores.archive import Archive, SegmentReader, Selection

Fingerprint = tuple[tuple[str, int, str], ...]
"""Per namespace of a thread: (namespace, checkpoint count, newest checkpoint id).

Any checkpoint saved since the scan (a new turn, a resume, a fork from an old
checkpoint) changes the count of its namespace, whatever its id.
"""


def fingerprint_of(ids_by_ns: Mapping[str, Collection[str]]) -> Fingerprint:
    """The fingerprint of a thread holding these checkpoint ids per namespace."""
    return tuple(sorted((ns, len(ids), max(ids)) for ns, ids in ids_by_ns.items() if ids))


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string above every string starting with `prefix` (None: no bound).

    In code-point order (== UTF-8 byte order == SQLite's BINARY collation ==
    Python's `str` order) `prefix <= id < bound` holds exactly when
    `id.startswith(prefix)`, which LIKE would not give: `_` is a wildcard there,
    and case folding would reach `ORG-42:` when asked for `org-42:`. The bound
    skips the surrogates U+D800..U+DFFF: no stored id holds one, and a lone one
    cannot be encoded to be compared at all.
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last == 0xD7FF:
            return "".join(chars) + "\ue000"
        if last < 0x10FFFF:
            return "".join(chars) + chr(last + 1)
    return None


@dataclass(frozen=True, slots=True)
class ScannedThread:
    """A thread as scanned, with the fingerprint the delete re-checks."""

    view: ThreadView
    fingerprint: Fingerprint
    garbage_blobs: int = 0
    """(Postgres) How many blobs no checkpoint references the quiet thread holds (or,
    expired, the blobs due to go with it): its blob-collecting part is sized by them."""


@dataclass(frozen=True, slots=True)
class TrimRange:
    """A set-based trim of one namespace: the oldest `limit` of the ids below the bound.

    The bound is the smaller of `before` and the `keep`-th newest id, both read
    under the write lock (the fingerprint re-check guarantees the namespace is
    as planned), so no id list crosses to the database.
    """

    keep: int
    before: str
    limit: int
    offset: int = 0
    """How many the trim's earlier parts delete: a dry run, which deletes
    nothing, counts this part past them."""


@dataclass(slots=True)
class ThreadWork:
    """One thread's share of a batch: a whole-thread expiry, or some of its trims.

    A huge thread's trims are split over several batches; `fingerprint` is what
    the thread must look like when this part runs (counts already lowered by
    the parts before it).
    """

    thread_id: str
    fingerprint: Fingerprint
    expire: bool = False
    checkpoints: dict[str, list[str]] = field(default_factory=dict)
    """namespace -> ids to delete (with their writes)."""
    writes: dict[str, list[str]] = field(default_factory=dict)
    """namespace -> checkpoint ids whose orphaned writes to delete."""
    ranges: dict[str, TrimRange] = field(default_factory=dict)
    """namespace -> a set-based trim (with the writes of the checkpoints it deletes)."""
    estimate: int = 0
    """Checkpoints an expiry deletes (it names none by id); blobs a `gc_blobs` part does."""
    bytes: int = 0
    """Size of the checkpoints this part deletes, as scanned (checkpoint and metadata)."""
    gc_blobs: bool = False
    """(Postgres) only collect the thread's unreferenced blobs."""
    defer_blobs: bool = False
    """(Postgres) an expiry that leaves the thread's blobs for the grace period.

    A policy's expiry: a run that read the thread before it and saves after
    recreates the thread on blob versions that must still exist. A purge
    (erasure) deletes them at once.
    """

    @property
    def rows(self) -> int:
        """Checkpoints this part deletes (blobs, for a `gc_blobs` part): the unit batches
        are sized in."""
        return (
            self.estimate
            + sum(len(ids) for ids in self.checkpoints.values())
            + sum(len(ids) for ids in self.writes.values())
            + sum(r.limit for r in self.ranges.values())
        )


@dataclass(slots=True)
class Counts:
    """Rows (and bytes) deleted, or that a dry run would delete."""

    threads: int = 0
    checkpoints: int = 0
    writes: int = 0
    blobs: int = 0
    bytes: int = 0

    def add(self, other: Counts) -> None:
        """Accumulate `other` into this."""
        self.threads += other.threads
        self.checkpoints += other.checkpoints
        self.writes += other.writes
        self.blobs += other.blobs
        self.bytes += other.bytes


@dataclass(slots=True)
class WorkResult:
    """What one `ThreadWork` did."""

    thread_id: str
    counts: Counts
    changed: bool = False
    """The thread changed since the scan; nothing of it was deleted."""
    locked: bool = False
    """(SQLite) the batch never got the write lock; nothing of it was deleted."""
    on_hold: bool = False
    """A legal hold on the thread, seen inside the batch transaction; nothing of it was deleted."""


HOLDS_TABLE = "checkpoint_janitor_holds"
"""The tool's own table of legal holds, in the store itself (README "Legal holds")."""


RESIDUE_TABLE = "checkpoint_janitor_residue_checks"
"""The tool's own table of when each policy's quiet threads were last all looked at for
residue (README "Residue"), in the store itself."""


@dataclass(frozen=True, slots=True)
class Hold:
    """A legal hold: the thread is never expired, trimmed or purged while it stands."""

    thread_id: str
    reason: str | None
    held_at: float
    """Unix time the hold was placed."""
    held_by: str | None


class StoreEngine(Protocol):
    """A checkpoint store the sweep can scan and delete from."""

    name: str

    async def open(self) -> None:
        """Connect and check the schema; raise `StoreError` for a store it does not understand."""

    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> None:
        """Raise if the store does not answer now."""

    async def begin_sweep(self, now: float) -> bool:
        """Start a sweep at `now`; False if another worker is sweeping this store."""

    async def end_sweep(self) -> None:
        """End the sweep `begin_sweep` started."""

    async def count_threads(self) -> int:
        """Threads in the store now (the safety limit's base)."""

    def thread_pages(self, page_size: int) -> AsyncIterator[list[str]]:
        """Every thread id, in keyset pages (never all ids in memory).

        The database alone orders the ids and compares them with the cursor,
        in the column's own collation, so a page resumes exactly after the last
        id of the one before; the walk starts with no lower bound, so the empty
        id is visited too.
        """

    def thread_prefix_pages(self, prefix: str, page_size: int) -> AsyncIterator[list[str]]:
        """The thread ids that start with `prefix`, by keyset pages like `thread_pages`.

        Membership is code-point exact (`id.startswith(prefix)`) whatever the
        column's collation: a case-insensitive or linguistic order must not
        widen or empty a purge.
        """

    async def scan(self, thread_ids: Sequence[str]) -> list[ScannedThread]:
        """Summaries of these threads, with delta threads decoded."""

    async def resolve_waiting(self, threads: Sequence[ScannedThread]) -> list[ScannedThread]:
        """The threads with `view.waiting` read from their newest root checkpoints."""

    async def thread_bytes(self, thread_ids: Sequence[str]) -> dict[str, int]:
        """Bytes each thread holds, as `stats` counts them (checkpoints, metadata, writes,
        blobs): what size caps (`max_bytes`, `quota`) weigh."""

    async def apply(self, batch: Sequence[ThreadWork], dry_run: bool) -> list[WorkResult]:
        """Carry out a batch in one transaction (or count what it would delete)."""

    async def after_batch(self) -> None:
        """Housekeeping between batches (SQLite: a passive WAL checkpoint)."""

    async def holds(self) -> list[Hold]:
        """Every legal hold, in thread-id order; none when the holds table does not exist."""

    async def hold(self, thread_id: str, reason: str | None, held_by: str | None) -> Hold | None:
        """Place a hold (creating the holds table on first use); None if one stood already."""

    async def release(self, thread_id: str) -> bool:
        """Lift the hold on `thread_id`; False if there was none."""


@runtime_checkable
class AggregateStore(Protocol):
    """An engine that plans from per-(thread, namespace) aggregates (`policies.plan`).

    Its reads run on a connection of their own, so the sweep plans the next
    page while a batch of the last one commits.
    """

    def aggregate_pages(
        self, page_size: int, head_metadata: bool
    ) -> AsyncIterator[list[ThreadAggregate]]:
        """Every thread (both tables), in keyset pages, with its namespaces' aggregates.

        `head_metadata`: also read the metadata of each thread's newest root
        checkpoint (only when a policy matches on metadata).
        """

    async def details(
        self, asked: Sequence[tuple[ThreadAggregate, ThreadPlan]]
    ) -> list[ThreadAggregate]:
        """The aggregates with what each plan asked for (`plan.needs`) filled in."""

    async def residue_checks(self) -> dict[str, float]:
        """Per policy, when the last pass that looked at all its quiet threads for residue
        started (Unix time); empty while the table does not exist (nothing is created)."""

    async def record_residue_checks(self, policies: Sequence[str], at: float) -> None:
        """Note that a pass started at `at` looked at every quiet thread of `policies` for
        residue and carried out what it found (creating the table on first use)."""


@dataclass(frozen=True, slots=True)
class Contention:
    """What the last batch saw of the application's writers."""

    writer_seen: bool
    """Another connection had committed since the batch before, or the batch met a
    writer (SQLite: its BEGIN waited for the write lock; Postgres: it was retried):
    the application is writing now."""
    lock_wait: float = 0.0
    """Seconds of the batch's time spent outside its write transaction (SQLite): its BEGIN
    waiting for the write lock, and work done before taking it (the archive's copy
    of a batch whose rows are copied before the lock). The sizer aims only the
    transaction at the target, so it leaves these out."""


@runtime_checkable
class WriterAware(Protocol):
    """An engine that tells whether the application writes while it sweeps (SQLite, Postgres).

    The sweep paces by it (`worker.stores.throttle.Pacer`): it rests after a batch
    while a writer is about, and not while none is.
    """

    def contention(self) -> Contention:
        """What the last `apply` saw (no writer, before the first batch)."""


@dataclass(slots=True)
class Recovered:
    """What a sweep's start did with the `.pending` segments earlier runs left."""

    promoted: int = 0
    """Their rows were gone from the store (the delete committed): now complete."""
    discarded: int = 0
    """Their rows were still there (the delete never committed), or they never verified."""


@dataclass(slots=True)
class RestoreCounts:
    """What a restore inserted (or, dry run, would insert), per thread and table."""

    inserted: dict[str, dict[str, int]] = field(default_factory=dict)
    """thread_id -> store table -> rows that were missing and are put back."""
    relinked: dict[str, int] = field(default_factory=dict)
    """thread_id -> parent ids set back on checkpoints whose parent the sweep nulled."""
    present: int = 0
    """Archived rows already in the store, left as they are."""
    segments: int = 0
    """Segments read."""

    def add(self, thread_id: str, table: str, rows: int) -> None:
        """Count `rows` of `table` for `thread_id` (zero counts are not recorded)."""
        if rows:
            per = self.inserted.setdefault(thread_id, {})
            per[table] = per.get(table, 0) + rows

    def relink(self, thread_id: str, links: int) -> None:
        """Count `links` parent ids set back for `thread_id`."""
        if links:
            self.relinked[thread_id] = self.relinked.get(thread_id, 0) + links

    def threads(self) -> list[str]:
        """The threads that get anything back, in id order."""
        return sorted(set(self.inserted) | set(self.relinked))

    def totals(self) -> dict[str, int]:
        """Rows per table over all threads, with `parents` for the re-links."""
        out: dict[str, int] = {}
        for per in self.inserted.values():
            for table, n in per.items():
                out[table] = out.get(table, 0) + n
        out["parents"] = sum(self.relinked.values())
        return out


@runtime_checkable
class ArchivingStore(Protocol):
    """An engine that archives what it deletes and restores from an archive (issue 13).

    The sweep archives only through an engine that is one; a store with an
    `archive` on an engine that is not fails the sweep rather than delete
    without it.
    """

    async def apply(
        self, batch: Sequence[ThreadWork], dry_run: bool, archive: Archive | None = None
    ) -> list[WorkResult]:
        """`StoreEngine.apply`, writing every row the batch deletes (and each parent
        id it nulls) to one `archive.segment()`, sealed before the commit:
        `seal()` -> COMMIT -> `complete()`; a failure before COMMIT rolls back and
        `abandon()`s (the `ArchiveError` propagates: nothing deleted). A COMMIT
        that raises leaves the segment `.pending` for `recover_archive`."""

    async def recover_archive(self, archive: Archive) -> Recovered:
        """Resolve `archive.pending()`: promote a segment whose rows are gone from
        the store, discard one whose rows are still there (or that does not verify)."""

    async def restore(
        self, segments: Sequence[SegmentReader], select: Selection, dry_run: bool
    ) -> RestoreCounts:
        """Insert the selected threads' archived rows that are missing (existing
        rows untouched) and set back nulled parents where still NULL and the
        parent exists; a dry run counts what it would do."""


class StoreError(Exception):
    """A store that cannot be used: unreachable, unknown schema, bad credentials.

    The message names the store and never carries a password.
    """

    def __init__(self, store: str, message: str) -> None:
        super().__init__(f"store {store!r}: {message}")
        self.store = store
