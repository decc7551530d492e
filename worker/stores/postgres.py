"""The Postgres engine: stores written by `langgraph-checkpoint-postgres`.

Tables `checkpoints` (checkpoint and metadata as JSONB), `checkpoint_blobs`
(channel values, shared between the checkpoints of a thread and namespace
through `checkpoint -> 'channel_versions'`), `checkpoint_writes` and
`checkpoint_migrations`. One asyncpg pool per store, shared by its policies.

Why deletes are safe beside a live application (docs/architecture.md, invariant 5):

- Checkpoints and writes go by the ids decided from the scan, never by "no
  checkpoint has this id": a run may commit a superstep's writes before their
  checkpoint, and what it saves during the sweep is not in the decided ids.
- Each batch is one READ COMMITTED transaction. It reads each thread's shape
  (count and newest id per namespace) before deleting and again after: a
  checkpoint committed in between — a new turn, a resume, a fork from an old
  checkpoint — changes the count, and the whole batch rolls back (and runs
  again without that thread). REPEATABLE READ could not do this: its snapshot
  would never see the resume. The window left is the few milliseconds
  between the last re-check and COMMIT.
- Blobs are the hard part: a fork (`update_state` from an old checkpoint B)
  reads B, then writes a new checkpoint that references B's blob versions
  without rewriting them (`aput` writes blobs only for the channels it
  changed, `ON CONFLICT DO NOTHING`), and no row lock of ours blocks its
  insert. The window is not one statement: it runs from the fork's read to
  its write, across our commit. A batch that trimmed B and, in the same
  transaction, collected the blob versions only B referenced (the thread
  being quiet) would leave the fork naming versions that are gone: it reads
  back with those channels empty. So a thread's unreferenced blobs are
  collected only when (a) the thread is quiet for the grace period (newest
  checkpoint), and (b) it has had no deletion — trim or policy expiry — for
  the grace period. Deletions are dated in the tool's own table
  `checkpoint_janitor_deletions(thread_id, deleted_at)` (created on first
  use, in the store's schema, upserted by one statement per batch in the
  deletes' transaction, at the sweep's clock); the collecting statement
  re-checks both the references (an anti-join against the committed
  checkpoints) and the date. Both plans (rows and aggregates) ask the same
  statement which threads hold collectable blobs, and the dry run counts
  none for a thread the batch trims. A row older than the grace period is
  dropped when a batch next collects on its thread; a purge drops it. Between
  a store's residue looks (`defaults.residue_check_every`) a row is also what
  makes a sweep look at its thread's blobs at all (`ThreadAggregate.dated`,
  `Detail.BLOBS`: the blobs alone, counted to size the batch in blobs): the
  worker's own trims keep their timing, others' leftovers (orphan writes
  too) wait for a look. A batch does not run the collecting statement on the
  threads it dates itself: their new date is past any cutoff.
  The window left: a run that read a checkpoint and saves a fork of it more
  than `grace_period` after a sweep deleted it. Deletions by other tools are
  not dated: the saver wrapper (`RetentionSaver`) frees blobs in its trim
  statement at once, as the official `prune` does, so a fork racing a
  wrapper trim of its base keeps the old window (see `worker/saver/postgres.py`).
- Expiry racing a run in flight. A resume, an `invoke(None)` retry or a new
  turn with `durability="exit"` reads the thread, then saves nothing until
  its node ends (a Command resume leaves a `__resume__` write first; the
  others nothing), so the fingerprint re-check cannot see it. If the expiry
  deleted the blobs, the run's next checkpoint would name blob versions that
  are gone (`aput` writes blobs only for the channels the step changed) and
  read back without them. So a policy's expiry deletes the thread's
  checkpoints and writes, and dates the thread in the tool's own table
  `checkpoint_janitor_expired(thread_id, expired_at, head_metadata)` (created
  on first use, in the store's schema, written in the expiry's transaction),
  but leaves its blobs. A run that read the thread before and saves after
  recreates it whole from its own state, without the expired history — what
  SQLite, whose values are inline, does anyway. Sweeps later than
  `grace_period` after the expiry delete the blobs of listed threads that
  still hold no checkpoint and no write (re-checked in the deleting
  statement), then the row; a thread that came back loses its row, and its
  old blobs go by the quiet-thread GC above. The window left: a run that read
  the thread before its expiry and saves more than `grace_period` after it
  (or during that one statement). A purge deletes the blobs at once (and the
  row): it names the thread for erasure.
  Skipping threads whose head holds a `__resume__` write was weighed and not
  taken: a write has no date, so a resume that crashed would keep its
  thread from ever expiring, and only Command resumes leave one.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import structlog
from psycopg.conninfo import conninfo_to_dict

from policies.config import redact_dsn
from policies.decide import is_delta_thread, root_head
from policies.ids import checkpoint_time
from policies.model import CheckpointSummary, ThreadView
from policies.plan import Detail, NamespaceAggregate, ThreadAggregate, ThreadPlan
from policies.summary import json_object, summarize
from policies.waiting import is_waiting
from worker.stores import postgres_archive as pg_archive
from worker.stores.archive import Archive, Segment, SegmentReader, Selection

# The engine types, named one by one as the other engine names them: an import
# list, not logic.
from worker.stores.engine import (
    Contention,
    Counts,
    Fingerprint,
    Hold,
    Recovered,
    RestoreCounts,
    ScannedThread,
    StoreError,
    ThreadWork,
    TrimRange,
    WorkResult,
    fingerprint_of,
)
from worker.stores.postgres_sql import (
    AGGREGATE_SQL,
    CHANNEL_KEYS_SQL,
    COUNT_BELOW_SQL,
    COUNT_CHECKPOINTS_SQL,
    COUNT_EXPIRED_BLOBS_SQL,
    COUNT_GARBAGE_BLOBS_SQL,
    COUNT_THREAD_SQL,
    COUNT_THREADS_SQL,
    COUNT_WRITES_SQL,
    CREATE_DELETIONS_TABLE_SQL,
    CREATE_EXPIRED_TABLE_SQL,
    CREATE_HOLDS_TABLE_SQL,
    CREATE_RESIDUE_TABLE_SQL,
    DATED_THREADS_SQL,
    DELETE_CHECKPOINTS,
    DELETE_EXPIRED_BLOBS,
    DELETE_GARBAGE_BLOBS,
    DELETE_HOLD_SQL,
    DELETE_ORPHAN_WRITES,
    DELETE_WRITES,
    DELETIONS_TABLE_EXISTS_SQL,
    DROP_RETURNED_SQL,
    EXPIRE,
    EXPIRED_ROWS_SQL,
    EXPIRED_STATS_SQL,
    EXPIRED_TABLE_EXISTS_SQL,
    FINGERPRINT_SQL,
    FORGET_DELETIONS_SQL,
    FORGET_EXPIRED_SQL,
    GARBAGE_BLOB_THREADS_SQL,
    HEAD_STATE_SQL,
    HEADS_METADATA_SQL,
    HELD_AMONG_SQL,
    HOLDS_FIRST_PAGE_SQL,
    HOLDS_LOCK_SQL,
    HOLDS_NEXT_PAGE_SQL,
    HOLDS_SHARED_LOCK_SQL,
    HOLDS_TABLE_EXISTS_SQL,
    INSERT_HOLD_SQL,
    IRREGULAR_IDS_SQL,
    LARGEST_THREADS_SQL,
    MARKED_THREADS_SQL,
    MIGRATION_SQL,
    NULL_DANGLING_PARENTS_SQL,
    NULL_PARENTS_SQL,
    OLD_HEADS_SQL,
    ORPHAN_WRITES_SQL,
    OWN_XID_SQL,
    PRUNE_DELETIONS_SQL,
    RANGE_BYTES_SQL,
    RANGE_IDS_SQL,
    RECORD_DELETIONS_SQL,
    RECORD_EXPIRED_SQL,
    RECORD_RESIDUE_CHECKS_SQL,
    REQUIRED_TABLES,
    RESIDUE_CHECKS_SQL,
    RESIDUE_TABLE_EXISTS_SQL,
    SCAN_SQL,
    SENDS_WRITES_SQL,
    SIZE_COLUMN,
    SNAPSHOT_XMAX_SQL,
    STATS_IDS_SQL,
    STATS_TABLE_SQL,
    TABLES_SQL,
    THREAD_BYTES_SQL,
    TRIM_BOUNDS_SQL,
    TRIM_CHECKPOINTS,
    TRIM_NULL_PARENTS_SQL,
    TRIM_WRITES,
    TRY_LOCK_SQL,
    UNLOCK_SQL,
    WALK_SQL,
    Deleting,
)
from worker.stores.stats import AgeHistogram

log = structlog.get_logger("checkpoint_janitor.postgres")


# checkpoint_migrations.v of langgraph-checkpoint-postgres 2.x/3.x: 3 is the
# first with all three tables; 9 (task_path) the newest this worker knows.
MIN_MIGRATION, MAX_MIGRATION = 3, 9
HOLDS_PAGE = 1000

# Errors worth retrying the batch for: the application held a row past
# lock_timeout, a statement ran past statement_timeout, or Postgres picked
# this transaction as a deadlock or serialization victim.
RETRYABLE = (
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)
MAX_ATTEMPTS = 4


@dataclass(frozen=True, slots=True)
class _Triples:
    """(thread, namespace, id) triples as the three arrays a statement takes."""

    threads: list[str]
    namespaces: list[str]
    ids: list[str]

    @classmethod
    def of(cls, rows: Sequence[tuple[str, str, str]]) -> _Triples:
        return cls([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])

    def args(self) -> tuple[list[str], list[str], list[str]]:
        return self.threads, self.namespaces, self.ids


def _gave_up(batch: Sequence[ThreadWork], changed: set[str], on_hold: set[str]) -> list[WorkResult]:
    """Results of a batch whose retries ran out."""
    # Contention, not a change: the threads wait for the next sweep as
    # `locked` (those found changed or held before stay so).
    return [
        WorkResult(
            w.thread_id,
            Counts(),
            changed=w.thread_id in changed,
            on_hold=w.thread_id in on_hold,
            locked=w.thread_id not in changed | on_hold,
        )
        for w in batch
    ]


def _merged(
    batch: Sequence[ThreadWork],
    todo: Sequence[ThreadWork],
    done: Sequence[WorkResult],
    on_hold: set[str],
) -> list[WorkResult]:
    """The batch's results: what the attempt that committed (`todo`) did, the rest dropped."""
    results = {id(w): r for w, r in zip(todo, done, strict=True)}
    return [
        results.get(id(w))
        or (
            WorkResult(w.thread_id, Counts(), on_hold=True)
            if w.thread_id in on_hold
            else WorkResult(w.thread_id, Counts(), changed=True)
        )
        for w in batch
    ]


class _OnHold(Exception):
    """Threads of the batch are on hold: roll back, drop them, run the rest."""

    def __init__(self, threads: set[str]) -> None:
        super().__init__(f"{len(threads)} threads are on hold")
        self.threads = threads


class _Changed(Exception):
    """Threads changed between the checks of a batch: roll back, drop them, retry."""

    def __init__(self, threads: set[str]) -> None:
        super().__init__(f"{len(threads)} threads changed during the batch")
        self.threads = threads


@dataclass(slots=True)
class _BatchCounts:
    """What one batch's statements deleted, before it is attributed to the parts."""

    threads: defaultdict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    """Per thread: expiries' rows and collected blobs."""
    by_ns_ck: dict[tuple[str, str], int] = field(default_factory=dict)
    by_ns_wr: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    by_ns_bytes: dict[tuple[str, str], int] = field(default_factory=dict)


async def _delete(
    conn: asyncpg.Connection, segment: Segment | None, stmt: Deleting, *args: Any
) -> list[tuple[Any, ...]]:
    """Run `stmt`; rows as its counting shape returns them. With a segment, the deleted
    rows themselves come back and are added to it, and the counts are tallied here."""
    if segment is None:
        return [tuple(r) for r in await conn.fetch(stmt.count, *args)]
    rows = await conn.fetch(stmt.capture, *args)
    if not rows:
        return []
    # A Record iterates its values, not its column names.
    columns = [c for c in rows[0].keys() if c != SIZE_COLUMN]  # noqa: SIM118
    segment.add(stmt.table, columns, [tuple(r[c] for c in columns) for r in rows])
    tally: dict[tuple[Any, ...], list[int]] = {}
    for r in rows:
        t = tally.setdefault(tuple(r[c] for c in stmt.by), [0, 0])
        t[0] += 1
        if stmt.sized:
            t[1] += int(r[SIZE_COLUMN] or 0)
    return [(*k, n, size) if stmt.sized else (*k, n) for k, (n, size) in tally.items()]


async def _null_parents(
    conn: asyncpg.Connection, segment: Segment | None, sql: str, *args: Any
) -> None:
    """Run a parent-nulling statement; with a segment, record the old parents in it."""
    rows = await conn.fetch(sql, *args)
    if segment is not None and rows:
        segment.add_nulled_parents([(r[0], r[1], r[2], r[3]) for r in rows])


def connect_kwargs(dsn: str) -> dict[str, Any]:
    """asyncpg connection arguments from a URL or libpq keyword DSN."""
    try:
        info = conninfo_to_dict(dsn)
    except Exception:
        # psycopg's message can quote the DSN; never pass it on.
        raise ValueError(
            "the DSN is neither a postgresql:// URL nor libpq key=value pairs"
        ) from None
    out: dict[str, Any] = {}
    for key, target in (
        ("host", "host"),
        ("port", "port"),
        ("user", "user"),
        ("password", "password"),
        ("dbname", "database"),
        ("sslmode", "ssl"),
        ("connect_timeout", "timeout"),
    ):
        if key in info and info[key] != "":
            out[target] = info[key]
    if "port" in out:
        out["port"] = int(out["port"])
    if "timeout" in out:
        out["timeout"] = float(out["timeout"])
    return out


class PostgresStore:
    """A `StoreEngine` over one Postgres database, on one shared asyncpg pool."""

    # Field by field, like the other planners' and engines' constructors: each class's
    # own settings, so their alike shape is not logic to share.
    def __init__(
        self,
        name: str,
        dsn: str,
        *,
        schema: str = "public",
        min_size: int = 1,
        max_size: int = 4,
        lock_timeout: float = 2.0,
        statement_timeout: float = 30.0,
        grace_period: float = 3600.0,
    ) -> None:
        self.name = name
        self._dsn = dsn
        self.schema = schema
        self.min_size = min_size
        self.max_size = max_size
        self.lock_timeout = lock_timeout
        self.statement_timeout = statement_timeout
        self.grace_period = grace_period
        self._pool: asyncpg.Pool | None = None
        self._lock_conn: asyncpg.Connection | None = None
        self.now: float | None = None
        """The sweep's clock; blob GC's quiet check uses it. Set by `begin_sweep`."""
        self._expired_table = False
        """`checkpoint_janitor_expired` is known to exist (it is never dropped)."""
        self._holds_table = False
        """`checkpoint_janitor_holds` is known to exist (it is never dropped)."""
        self._deletions_table = False
        """`checkpoint_janitor_deletions` is known to exist (it is never dropped)."""
        self._next_xid: int | None = None
        """One past the last committed batch's own transaction id (None: no batch yet)."""
        self._contention = Contention(writer_seen=False)

    # ------------------------------------------------------------ lifecycle

    def _error(self, what: str, e: BaseException) -> StoreError:
        message = f"{what}: {type(e).__name__}: {e}"
        password = connect_kwargs_safe(self._dsn).get("password")
        if password:
            message = message.replace(str(password), "***")
        return StoreError(self.name, message.replace(self._dsn, redact_dsn(self._dsn)))

    @property
    def pool(self) -> asyncpg.Pool:
        """The open pool."""
        if self._pool is None:
            raise StoreError(self.name, "not open")
        return self._pool

    async def open(self) -> None:
        """Connect and check the tables and migration version."""
        try:
            kwargs = connect_kwargs(self._dsn)
        except ValueError as e:
            raise StoreError(self.name, str(e)) from None
        where = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 5432)}"
        try:
            self._pool = await asyncpg.create_pool(
                min_size=self.min_size,
                max_size=self.max_size,
                server_settings={
                    "search_path": self.schema,
                    "application_name": "checkpoint-janitor",
                    # The planner guesses 100 rows per jsonb_each_text (there
                    # are a handful), which switches JIT on: measured 1.1 s of
                    # compiling in a 1.4 s statement. The reference anti-joins
                    # sort ~150k rows per page, past the default 4 MB.
                    "jit": "off",
                    "work_mem": "32MB",
                },
                **kwargs,
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as e:
            raise self._error(f"cannot connect to {where}", e) from None
        try:
            await self._check_schema()
        except BaseException:
            await self.close()
            raise

    async def _check_schema(self) -> None:
        async with self.pool.acquire() as conn:
            found = {r[0] for r in await conn.fetch(TABLES_SQL, self.schema, list(REQUIRED_TABLES))}
            if missing := [t for t in REQUIRED_TABLES if t not in found]:
                raise StoreError(
                    self.name,
                    f"schema {self.schema!r} lacks tables {missing}: not a "
                    "langgraph-checkpoint-postgres store (run the saver's setup(), "
                    "or set `schema:`)",
                )
            version = await conn.fetchval(MIGRATION_SQL)
        if version is None or not MIN_MIGRATION <= version <= MAX_MIGRATION:
            raise StoreError(
                self.name,
                f"checkpoint_migrations version {version} is not one this worker knows "
                f"({MIN_MIGRATION}..{MAX_MIGRATION}); refusing to touch the store",
            )

    async def close(self) -> None:
        """Release the sweep lock and close the pool."""
        if self._lock_conn is not None:
            conn, self._lock_conn = self._lock_conn, None
            await self.pool.release(conn)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def ping(self) -> None:
        """Raise `StoreError` if the database does not answer within the statement timeout."""
        try:
            await self.pool.fetchval("SELECT 1", timeout=self.statement_timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
            raise self._error("does not answer", e) from None

    async def begin_sweep(self, now: float) -> bool:
        """Take the store's advisory lock; False if another worker is sweeping it."""
        self.now = now
        # Writers are looked for from this sweep's first batch on.
        self._next_xid = None
        self._contention = Contention(writer_seen=False)
        if self._lock_conn is not None:
            return True
        conn = await self.pool.acquire()
        try:
            got = bool(await conn.fetchval(TRY_LOCK_SQL, self.name))
        except BaseException:
            await self.pool.release(conn)
            raise
        if got:
            self._lock_conn = conn
        else:
            await self.pool.release(conn)
        return got

    # ------------------------------------------------------------ archive

    def _archived(self, segment: Segment) -> None:
        """A batch's segment is complete: its rows are safe in the archive."""
        if segment.counts:
            log.debug(
                "batch_archived",
                store=self.name,
                segment=segment.path,
                rows=segment.counts,
                bytes=segment.bytes,
            )

    async def recover_archive(self, archive: Archive) -> Recovered:
        """Settle the `.pending` segments earlier runs left in `archive`.

        A pending segment was sealed, and its batch's COMMIT then may or may
        not have happened (a crash, a lost connection). Its rows still in the
        store: the delete rolled back, the segment goes (a later batch archives
        them again). Gone: the delete committed, the segment is complete.
        Some of each (rows restored or re-written since): complete, so nothing
        deleted is left without its archive; restore skips rows that exist.
        """
        out = Recovered()
        for pending in await asyncio.to_thread(archive.pending):
            if not await asyncio.to_thread(pending.valid):
                # Renamed to .pending only once verified: a torn copy never ran a delete.
                await asyncio.to_thread(pending.discard)
                out.discarded += 1
                continue
            async with self.pool.acquire() as conn:
                verdict = await pg_archive.committed(conn, pending)
            if verdict is False:
                await asyncio.to_thread(pending.discard)
                out.discarded += 1
            else:
                await asyncio.to_thread(pending.promote)
                out.promoted += 1
            log.info(
                "archive_pending_settled",
                store=self.name,
                segment=pending.path,
                outcome="discarded" if verdict is False else "promoted",
                partly_present=verdict is None,
            )
        return out

    async def restore(
        self, segments: Sequence[SegmentReader], select: Selection, dry_run: bool
    ) -> RestoreCounts:
        """Put the selected archived rows back (or count what is missing, `dry_run`).

        Rows that exist are left as they are; nulled parents are re-linked
        where still NULL and the parent exists (`worker.stores.postgres_archive`).
        """
        async with self.pool.acquire() as conn:
            await conn.execute(f"SET lock_timeout = {int(self.lock_timeout * 1000)}")
            restorer = pg_archive.Restorer(conn, self.name)
            try:
                if dry_run:
                    return await restorer.count(segments, select)
                return await restorer.restore(segments, select)
            except pg_archive.RestoreError as e:
                raise StoreError(self.name, str(e)) from None
            except (OSError, asyncpg.PostgresError) as e:
                raise self._error("restore failed", e) from None

    async def end_sweep(self) -> None:
        """Release the store's advisory lock."""
        if self._lock_conn is not None:
            conn, self._lock_conn = self._lock_conn, None
            try:
                await conn.fetchval(UNLOCK_SQL, self.name)
            finally:
                await self.pool.release(conn)

    # ------------------------------------------------------------ scan

    async def count_threads(self) -> int:
        """Threads with at least one checkpoint."""
        return int(await self.pool.fetchval(COUNT_THREADS_SQL))

    def thread_pages(self, page_size: int) -> AsyncIterator[list[str]]:
        """Every thread id of checkpoints, writes and expired threads' waiting blobs, by pages."""
        return self._walk(None, page_size)

    def thread_prefix_pages(self, prefix: str, page_size: int) -> AsyncIterator[list[str]]:
        """Thread ids starting with `prefix` (byte-exact, any collation), by keyset pages."""
        return self._walk(prefix, page_size)

    async def _walk(self, prefix: str | None, page_size: int) -> AsyncIterator[list[str]]:
        # An expired thread whose blobs wait out the grace period holds nothing
        # else: a sweep must still meet it (to collect them), and so must a purge.
        async with self.pool.acquire() as conn:
            expired = await self._has_expired_table(conn)
        after: str | None = None
        while True:
            if prefix is None and after is None:
                rows = await self.pool.fetch(WALK_SQL["first", expired], page_size)
            elif prefix is None:
                rows = await self.pool.fetch(WALK_SQL["next", expired], page_size, after)
            elif after is None:
                rows = await self.pool.fetch(WALK_SQL["prefix_first", expired], page_size, prefix)
            else:
                rows = await self.pool.fetch(
                    WALK_SQL["prefix_next", expired], page_size, prefix, after
                )
            page = [r[0] for r in rows]
            if page:
                yield page
            if len(page) < page_size:
                return
            after = page[-1]

    async def _has_expired_table(self, conn: asyncpg.Connection) -> bool:
        if not self._expired_table:
            self._expired_table = bool(await conn.fetchval(EXPIRED_TABLE_EXISTS_SQL))
        return self._expired_table

    async def _has_deletions_table(self, conn: asyncpg.Connection) -> bool:
        if not self._deletions_table:
            self._deletions_table = bool(await conn.fetchval(DELETIONS_TABLE_EXISTS_SQL))
        return self._deletions_table

    async def _fetch_dated(
        self, conn: asyncpg.Connection, sql: dict[bool, str], *args: Any
    ) -> list[asyncpg.Record]:
        """A blob-collecting statement, with the recent-deletion check once there are dates."""
        if await self._has_deletions_table(conn):
            return list(await conn.fetch(sql[True], *args, self._cutoff()))
        return list(await conn.fetch(sql[False], *args))

    async def scan(self, thread_ids: Sequence[str]) -> list[ScannedThread]:
        """Summaries of `thread_ids`; delta threads' channel keys filled in."""
        ids = list(thread_ids)
        rows: dict[str, list[asyncpg.Record]] = defaultdict(list)
        async with self.pool.acquire() as conn:
            for r in await conn.fetch(SCAN_SQL, ids):
                rows[r["thread_id"]].append(r)
            sends: set[tuple[str, str, str]] = set()
            if any(r["v"] < 4 for rs in rows.values() for r in rs):
                sends = {(r[0], r[1], r[2]) for r in await conn.fetch(SENDS_WRITES_SQL, ids)}
            orphans: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for r in await conn.fetch(ORPHAN_WRITES_SQL, ids):
                orphans[r[0]].append((r[1], r[2]))
            summaries_of = {
                tid: tuple(_summary(tid, r, sends) for r in rows.get(tid, ())) for tid in ids
            }
            quiet = [t for t in ids if self._quiet(_fingerprint(summaries_of[t]))]
            garbage = await self._garbage(conn, quiet)
            empty = [t for t in ids if not summaries_of[t]]
            expired_meta = await self._expired(conn, empty, garbage)
            for tid in ids:
                if is_delta_thread(summaries_of[tid]):
                    summaries_of[tid] = await self._channel_keys(conn, tid, summaries_of[tid])
            heads = {tid: h for tid in ids if (h := root_head(summaries_of[tid])) is not None}
            head_meta = {
                r[0]: json_object(r[1])
                for r in await conn.fetch(
                    HEADS_METADATA_SQL,
                    list(heads),
                    [h.namespace for h in heads.values()],
                    [h.checkpoint_id for h in heads.values()],
                )
            }
            out = []
            for tid in ids:
                summaries = summaries_of[tid]
                view = ThreadView(
                    thread_id=tid,
                    checkpoints=summaries,
                    head_metadata=head_meta.get(tid) or expired_meta.get(tid, {}),
                    orphan_writes=tuple(orphans.get(tid, ())),
                )
                out.append(
                    ScannedThread(view, _fingerprint(summaries), garbage_blobs=garbage.get(tid, 0))
                )
        return out

    async def _expired(
        self, conn: asyncpg.Connection, empty: list[str], garbage: dict[str, int]
    ) -> dict[str, dict[str, Any]]:
        """Expired threads' head metadata; those whose blobs are due go in `garbage`.

        Due once the grace period since the expiry has passed; they are matched
        on the metadata they had. Counted, as unreferenced blobs are, to size
        their batch.
        """
        expired_meta: dict[str, dict[str, Any]] = {}
        if not empty or not await self._has_expired_table(conn):
            return expired_meta
        due = []
        for r in await conn.fetch(EXPIRED_ROWS_SQL, empty):
            expired_meta[r["thread_id"]] = json_object(r["head_metadata"])
            if self.now is not None and self.now - r["expired_at"] > self.grace_period:
                due.append(r["thread_id"])
                garbage[r["thread_id"]] = 1
        if due:
            for r in await conn.fetch(COUNT_EXPIRED_BLOBS_SQL, due, self._cutoff()):
                garbage[r[0]] = max(int(r[1]), 1)
        return expired_meta

    async def aggregate_pages(
        self, page_size: int, head_metadata: bool
    ) -> AsyncIterator[list[ThreadAggregate]]:
        """Every thread (checkpoints, writes, expired threads' blobs), with its aggregates."""
        async for page in self._walk(None, page_size):
            spaces: dict[str, list[NamespaceAggregate]] = defaultdict(list)
            for r in await self.pool.fetch(AGGREGATE_SQL, page):
                spaces[r[0]].append(NamespaceAggregate(r[1], int(r[2]), r[3], r[4]))
            dated: set[str] = set()
            async with self.pool.acquire() as conn:
                if await self._has_deletions_table(conn):
                    rows = await conn.fetch(DATED_THREADS_SQL, page, self._cutoff())
                    dated = {r[0] for r in rows}
            meta: dict[str, dict[str, Any]] = {}
            if head_metadata:
                heads = [(t, a.newest_id) for t in page for a in spaces[t] if a.namespace == ""]
                rows = await self.pool.fetch(
                    HEADS_METADATA_SQL,
                    [t for t, _ in heads],
                    ["" for _ in heads],
                    [h for _, h in heads],
                )
                meta = {r[0]: json_object(r[1]) for r in rows}
            yield [
                ThreadAggregate(
                    t, tuple(spaces[t]), head_metadata=meta.get(t, {}), dated=t in dated
                )
                for t in page
            ]

    async def details(
        self, asked: Sequence[tuple[ThreadAggregate, ThreadPlan]]
    ) -> list[ThreadAggregate]:
        """Fill in what each plan asked for; orphans come with the thread's garbage blobs."""
        out = {a.thread_id: a for a, _ in asked}

        def wanting(detail: Detail) -> list[str]:
            return [a.thread_id for a, p in asked if detail in p.needs]

        async with self.pool.acquire() as conn:
            if tids := wanting(Detail.ORPHANS):
                await self._orphans(conn, tids, out)
            if tids := wanting(Detail.BLOBS):
                await self._blobs(conn, tids, out)
            if tids := wanting(Detail.MARKERS):
                marked = {r[0] for r in await conn.fetch(MARKED_THREADS_SQL, tids)}
                for t in tids:
                    out[t] = replace(out[t], markers=t in marked)
            if tids := wanting(Detail.REGULAR):
                irregular = {
                    (r[0], r[1]): int(r[2]) for r in await conn.fetch(IRREGULAR_IDS_SQL, tids)
                }
                for t in tids:
                    spaces = tuple(
                        replace(a, irregular=irregular.get((t, a.namespace), 0))
                        for a in out[t].namespaces
                    )
                    out[t] = replace(out[t], namespaces=spaces)
            for a, p in asked:
                if Detail.COUNT in p.needs:
                    below = dict(out[a.thread_id].below)
                    for ns, bound in p.count_below:
                        below[(ns, bound)] = int(
                            await conn.fetchval(COUNT_BELOW_SQL, a.thread_id, ns, bound)
                        )
                    out[a.thread_id] = replace(out[a.thread_id], below=below)
        if tids := wanting(Detail.WAITING):
            await self._waiting(tids, out)
        return [out[a.thread_id] for a, _ in asked]

    async def _orphans(
        self, conn: asyncpg.Connection, tids: list[str], out: dict[str, ThreadAggregate]
    ) -> None:
        found: dict[str, list[tuple[str, str]]] = {t: [] for t in tids}
        for r in await conn.fetch(ORPHAN_WRITES_SQL, tids):
            found[r[0]].append((r[1], r[2]))
        for t in tids:
            out[t] = replace(out[t], orphan_writes=tuple(found[t]))
        await self._blobs(conn, tids, out)

    async def _blobs(
        self, conn: asyncpg.Connection, tids: list[str], out: dict[str, ThreadAggregate]
    ) -> None:
        """How many unreferenced blobs each quiet thread of `tids` holds (0 on busy ones)."""
        quiet = [t for t in tids if self._quiet(_aggregate_fingerprint(out[t]))]
        garbage = await self._garbage(conn, quiet)
        for t in tids:
            out[t] = replace(out[t], garbage_blobs=garbage.get(t, 0))

    async def _garbage(self, conn: asyncpg.Connection, quiet: list[str]) -> dict[str, int]:
        """Thread -> blobs the collecting statement would delete, for the quiet threads given."""
        if not quiet:
            return {}
        rows = await self._fetch_dated(conn, GARBAGE_BLOB_THREADS_SQL, quiet)
        return {r[0]: int(r[1]) for r in rows}

    async def residue_checks(self) -> dict[str, float]:
        """When each policy's quiet threads were last all looked at for residue."""
        async with self.pool.acquire() as conn:
            if not await conn.fetchval(RESIDUE_TABLE_EXISTS_SQL):
                return {}
            return {str(r[0]): float(r[1]) for r in await conn.fetch(RESIDUE_CHECKS_SQL)}

    async def record_residue_checks(self, policies: Sequence[str], at: float) -> None:
        """Date a complete look at these policies' quiet threads (one upsert)."""
        try:
            async with self.pool.acquire() as conn:
                await conn.execute(CREATE_RESIDUE_TABLE_SQL)
                await conn.execute(RECORD_RESIDUE_CHECKS_SQL, list(policies), at)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise self._error("cannot record the residue check", e) from None

    async def _waiting(self, tids: list[str], out: dict[str, ThreadAggregate]) -> None:
        """Whether each head waits; a v < 4 head (sends in its parent's writes) goes to rows."""
        heads = [(t, a.newest_id) for t in tids for a in out[t].namespaces if a.namespace == ""]
        old = {
            r[0]
            for r in await self.pool.fetch(
                OLD_HEADS_SQL, [t for t, _ in heads], ["" for _ in heads], [h for _, h in heads]
            )
        }
        for t in old:
            out[t] = replace(out[t], rows=True)
        views = [
            ScannedThread(ThreadView(t, (CheckpointSummary("", h, None, checkpoint_time(h)),)), ())
            for t, h in heads
            if t not in old
        ]
        for v in await self.resolve_waiting(views):
            out[v.view.thread_id] = replace(
                out[v.view.thread_id],
                waiting=v.view.waiting,
                head_undecodable=v.view.head_undecodable,
            )

    async def _channel_keys(
        self, conn: asyncpg.Connection, thread_id: str, summaries: tuple[CheckpointSummary, ...]
    ) -> tuple[CheckpointSummary, ...]:
        keys = {
            (r["checkpoint_ns"], r["checkpoint_id"]): (
                frozenset(r["present"]),
                frozenset(r["versioned"]),
            )
            for r in await conn.fetch(CHANNEL_KEYS_SQL, thread_id)
        }
        out = []
        for s in summaries:
            k = keys.get((s.namespace, s.checkpoint_id))
            if k is not None:
                s = _with_keys(s, k)
            out.append(s)
        return tuple(out)

    async def resolve_waiting(self, threads: Sequence[ScannedThread]) -> list[ScannedThread]:
        """Read each thread's newest root checkpoint's pending tasks: does it wait?"""
        return [await self._resolve_one(t) for t in threads]

    async def _resolve_one(self, thread: ScannedThread) -> ScannedThread:
        view = thread.view
        head = root_head(view.checkpoints)
        waiting = False
        if head is not None:
            r = await self.pool.fetchrow(
                HEAD_STATE_SQL, view.thread_id, head.namespace, head.checkpoint_id
            )
            if r is None:
                waiting = True
            else:
                state = {
                    "channel_values": {k: True for k in r["present"]},
                    "channel_versions": json_object(r["versions"]),
                    "versions_seen": json_object(r["seen"]),
                }
                waiting = is_waiting(state, r["write_channels"])
                parent = next(
                    (
                        c
                        for c in view.checkpoints
                        if c.namespace == head.namespace and c.checkpoint_id == head.parent_id
                    ),
                    None,
                )
                # A v < 4 head's pending sends are its parent's __pregel_tasks writes.
                if head.reads_parent_sends and parent is not None and parent.has_sends_writes:
                    waiting = True
        from dataclasses import replace

        return replace(thread, view=replace(view, waiting=waiting))

    # ------------------------------------------------------------ delete

    async def apply(
        self, batch: Sequence[ThreadWork], dry_run: bool, archive: Archive | None = None
    ) -> list[WorkResult]:
        """One READ COMMITTED transaction for the batch, retried on lock and deadlock errors.

        With `archive`, every row it deletes and every parent id it nulls go to
        one segment, sealed before the COMMIT (`ArchivingStore.apply`).
        """
        if dry_run:
            return await self._count(batch)
        changed: set[str] = set()
        on_hold: set[str] = set()
        # A thread changed under an attempt, or it met the application's locks: a writer.
        disturbed = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            todo = [w for w in batch if w.thread_id not in changed | on_hold]
            try:
                done = await self._apply_once(todo, archive)
            except _OnHold as e:
                on_hold |= e.threads
                continue
            except _Changed as e:
                # A thread changed under the batch: the application writes now.
                changed |= e.threads
                disturbed = True
                continue
            except RETRYABLE as e:
                disturbed = True
                if attempt == MAX_ATTEMPTS:
                    log.warning(
                        "batch_gave_up",
                        store=self.name,
                        error=type(e).__name__,
                        threads=len(todo),
                    )
                    self._contention = Contention(writer_seen=True)
                    return _gave_up(batch, changed, on_hold)
                delay = min(5.0, 0.1 * 2**attempt) * (0.5 + random.random())
                log.info(
                    "batch_retry",
                    store=self.name,
                    error=type(e).__name__,
                    attempt=attempt,
                    delay=round(delay, 3),
                )
                await asyncio.sleep(delay)
                continue
            if disturbed:
                self._contention = Contention(writer_seen=True)
            return _merged(batch, todo, done, on_hold)
        return [WorkResult(w.thread_id, Counts(), changed=True) for w in batch]

    async def _apply_once(
        self, batch: Sequence[ThreadWork], archive: Archive | None
    ) -> list[WorkResult]:
        if not batch:
            return []
        tids = sorted({w.thread_id for w in batch})
        deferred = [w.thread_id for w in batch if w.expire and w.defer_blobs]
        if deferred and not self._expired_table:
            # Outside the batch's transaction: a rollback must not undo it.
            await self.pool.execute(CREATE_EXPIRED_TABLE_SQL)
            self._expired_table = True
        # Every trim and policy expiry dates its thread: its blobs wait (a purge erases).
        dated = sorted({w.thread_id for w in batch if w.checkpoints or w.ranges} | set(deferred))
        if dated and not self._deletions_table:
            await self.pool.execute(CREATE_DELETIONS_TABLE_SQL)
            self._deletions_table = True
        # The batch's archive segment: filled by the statements below, sealed
        # (written, fsynced, verified) before COMMIT, completed after it.
        segment = None if archive is None else archive.segment()
        sealed = False
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                ended = await conn.fetchval(SNAPSHOT_XMAX_SQL)
                counts = await self._batch(conn, batch, tids, deferred, dated, segment)
                own = await conn.fetchval(OWN_XID_SQL)
                if segment is not None:
                    # A seal that fails raises here: the transaction rolls back.
                    await asyncio.to_thread(segment.seal)
                    sealed = True
        except BaseException as e:
            if segment is None:
                raise
            if not sealed:
                await asyncio.to_thread(segment.abandon)
                raise
            # Sealed, then COMMIT failed: whether the delete committed is unknown.
            # The segment stays pending for the next run's recovery to settle,
            # and this batch is not retried (a retry would archive its rows again).
            raise StoreError(
                self.name,
                f"commit failed after the archive segment was sealed "
                f"({segment.path}); the next sweep settles it: {type(e).__name__}: {e}",
            ) from e
        self._committed(ended, own)
        if segment is not None:
            await asyncio.to_thread(segment.complete)
            self._archived(segment)
        return self._results(batch, counts)

    def _committed(self, ended: int, own: int) -> None:
        """Note what the batch that just committed saw of other sessions' writes.

        `ended` (read before the batch wrote) past the previous batch's id + 1: a
        transaction that began after that batch's wrote and ended since. One that
        began earlier and ended since goes unseen, as it would on SQLite; one in
        another database of the cluster counts (the ids are the cluster's), which
        only paces the sweep as if the application wrote.
        """
        seen = self._next_xid is not None and ended > self._next_xid
        self._contention = Contention(writer_seen=seen)
        self._next_xid = own + 1

    def contention(self) -> Contention:
        """What the last `apply` saw of the application's writes (`WriterAware`)."""
        return self._contention

    async def _batch(
        self,
        conn: asyncpg.Connection,
        batch: Sequence[ThreadWork],
        tids: list[str],
        deferred: list[str],
        dated: list[str],
        segment: Segment | None,
    ) -> _BatchCounts:
        """The batch's statements, in its transaction; deleted rows also go to `segment`."""
        before = await self._as_scanned(conn, batch, tids)
        bc = await self._delete_parts(conn, batch, segment)
        expire = [w.thread_id for w in batch if w.expire]
        if expire:
            await self._expire(conn, expire, deferred, bc.threads, segment)
        if dated:
            await conn.execute(RECORD_DELETIONS_SQL, dated, self._clock())

        # Re-read every thread: a checkpoint committed since the first
        # check (a resume, a fork) shows as a count we did not expect.
        after = await _fingerprints(conn, tids)
        expected = _expected_counts(batch, before, bc.by_ns_ck)
        if bad := {t for t in tids if _counts_of(after.get(t, ())) != expected.get(t, {})}:
            raise _Changed(bad)

        quiet = [t for t in tids if t not in expire and self._quiet(after.get(t, ()))]
        await self._collect_blobs(conn, batch, tids, quiet, set(dated), bc.threads, segment)
        return bc

    async def _as_scanned(
        self, conn: asyncpg.Connection, batch: Sequence[ThreadWork], tids: list[str]
    ) -> dict[str, Fingerprint]:
        """Set the batch's timeouts, refuse held or changed threads; the fingerprints read."""
        await conn.execute(
            f"SET LOCAL lock_timeout = {int(self.lock_timeout * 1000)}; "
            f"SET LOCAL statement_timeout = {int(self.statement_timeout * 1000)}"
        )
        if on_hold := await self._held_among(conn, tids):
            raise _OnHold(on_hold)
        before = await _fingerprints(conn, tids)
        # A thread's first part must find the thread as scanned.
        first: dict[str, ThreadWork] = {}
        for w in batch:
            first.setdefault(w.thread_id, w)
        if bad := {t for t, w in first.items() if before.get(t, ()) != w.fingerprint}:
            raise _Changed(bad)
        return before

    async def _delete_parts(
        self, conn: asyncpg.Connection, batch: Sequence[ThreadWork], segment: Segment | None
    ) -> _BatchCounts:
        """The trims (named and ranged) and orphaned writes; what they deleted."""
        trims = [
            (w.thread_id, ns, i) for w in batch for ns, ids in w.checkpoints.items() for i in ids
        ]
        orphans = [(w.thread_id, ns, i) for w in batch for ns, ids in w.writes.items() for i in ids]
        bc = _BatchCounts()
        if trims:
            t = _Triples.of(trims)
            for r in await _delete(conn, segment, DELETE_WRITES, *t.args()):
                bc.by_ns_wr[(r[0], r[1])] += r[2]
            for r in await _delete(conn, segment, DELETE_CHECKPOINTS, *t.args()):
                bc.by_ns_ck[(r[0], r[1])] = r[2]
            await _null_parents(conn, segment, NULL_PARENTS_SQL, *t.args())
        if ranges := _merged_ranges(batch):
            await self._trim_ranges(conn, ranges, bc, segment)
        if orphans:
            t = _Triples.of(orphans)
            for r in await _delete(conn, segment, DELETE_ORPHAN_WRITES, *t.args()):
                bc.by_ns_wr[(r[0], r[1])] += r[2]
        return bc

    # `_expire` and `_collect_blobs` take the batch's same connection, counts and
    # segment: alike signatures, each its own step of `_apply_once`.
    async def _expire(
        self,
        conn: asyncpg.Connection,
        expire: list[str],
        deferred: list[str],
        counts: defaultdict[str, Counts],
        segment: Segment | None,
    ) -> None:
        """Expire whole threads; a policy's expiry dates its blobs, a purge erases them."""
        if deferred:
            await conn.execute(RECORD_EXPIRED_SQL, deferred, self._clock())
        purged = sorted(set(expire) - set(deferred))
        for kind, stmt in EXPIRE.items():
            # A policy's expiry leaves the blobs for the grace period.
            targets = purged if kind == "blobs" else expire
            if not targets:
                continue
            for r in await _delete(conn, segment, stmt, targets):
                setattr(counts[r[0]], kind, getattr(counts[r[0]], kind) + r[1])
                if kind == "checkpoints":
                    counts[r[0]].bytes += int(r[2] or 0)
        if purged and await self._has_expired_table(conn):
            await conn.execute(FORGET_EXPIRED_SQL, purged)
        if purged and await self._has_deletions_table(conn):
            await conn.execute(FORGET_DELETIONS_SQL, purged)
        for t_id in expire:
            counts[t_id].threads = 1

    async def _collect_blobs(
        self,
        conn: asyncpg.Connection,
        batch: Sequence[ThreadWork],
        tids: list[str],
        quiet: list[str],
        dated: set[str],
        counts: defaultdict[str, Counts],
        segment: Segment | None,
    ) -> None:
        """Quiet threads' unreferenced blobs, and expired threads' blobs past the grace period.

        Not on the threads this batch `dated`: their date is now the sweep's
        clock (`RECORD_DELETIONS_SQL` keeps the later one), past any cutoff,
        so the collecting statement would keep every blob of theirs anyway and
        its anti-join over their rows is saved.
        """
        if quiet:
            await _null_parents(conn, segment, NULL_DANGLING_PARENTS_SQL, quiet)
        if collect := [t for t in quiet if t not in dated]:
            recent = await self._has_deletions_table(conn)
            args: tuple[Any, ...] = (collect, self._cutoff()) if recent else (collect,)
            for r in await _delete(conn, segment, DELETE_GARBAGE_BLOBS[recent], *args):
                counts[r[0]].blobs += r[1]
        gone = [w.thread_id for w in batch if w.gc_blobs and not w.fingerprint]
        if await self._has_expired_table(conn):
            await conn.execute(DROP_RETURNED_SQL, tids)
            if gone:
                for r in await _delete(conn, segment, DELETE_EXPIRED_BLOBS, gone, self._cutoff()):
                    counts[r[0]].blobs += r[1]
        if (collect or gone) and await self._has_deletions_table(conn):
            await conn.execute(PRUNE_DELETIONS_SQL, [*collect, *gone], self._cutoff())

    @staticmethod
    def _results(batch: Sequence[ThreadWork], bc: _BatchCounts) -> list[WorkResult]:
        """Attribute the batch's rows to its parts: each trim part has one namespace."""
        results = []
        seen_blobs: set[str] = set()
        for w in batch:
            c = Counts()
            if w.expire:
                c = bc.threads[w.thread_id]
            else:
                for ns in [*w.checkpoints, *w.ranges]:
                    c.checkpoints += bc.by_ns_ck.pop((w.thread_id, ns), 0)
                    c.writes += bc.by_ns_wr.pop((w.thread_id, ns), 0)
                    c.bytes += bc.by_ns_bytes.pop((w.thread_id, ns), 0)
                for ns in w.writes:
                    c.writes += bc.by_ns_wr.pop((w.thread_id, ns), 0)
                if w.thread_id not in seen_blobs:
                    c.blobs = bc.threads[w.thread_id].blobs
                    seen_blobs.add(w.thread_id)
            results.append(WorkResult(w.thread_id, c))
        return results

    async def _trim_ranges(
        self,
        conn: asyncpg.Connection,
        ranges: list[tuple[str, str, TrimRange]],
        bc: _BatchCounts,
        segment: Segment | None,
    ) -> None:
        """The batch's set-based trims: bounds, parents nulled, writes, checkpoints."""
        bounds = await _bounds(conn, ranges)
        args = ([t for t, _, _ in ranges], [ns for _, ns, _ in ranges], bounds)
        await _null_parents(conn, segment, TRIM_NULL_PARENTS_SQL, *args)
        for r in await _delete(conn, segment, TRIM_WRITES, *args):
            bc.by_ns_wr[(r[0], r[1])] += r[2]
        for r in await _delete(conn, segment, TRIM_CHECKPOINTS, *args):
            bc.by_ns_ck[(r[0], r[1])] = bc.by_ns_ck.get((r[0], r[1]), 0) + r[2]
            bc.by_ns_bytes[(r[0], r[1])] = int(r[3] or 0)

    def _clock(self) -> float:
        """The sweep's time (the wall clock outside a sweep: a purge)."""
        return time.time() if self.now is None else self.now

    def _cutoff(self) -> float:
        """Expiries before this have waited out the grace period."""
        return self._clock() - self.grace_period

    def _quiet(self, fp: Fingerprint) -> bool:
        if not fp or self.now is None:
            return False
        newest = max(checkpoint_time(cid) or float("inf") for _, _, cid in fp)
        return self.now - newest > self.grace_period

    async def _count(self, batch: Sequence[ThreadWork]) -> list[WorkResult]:
        async with self.pool.acquire() as conn:
            # A dry run names a range's ids, which the plan counted: few.
            named = [await _named(conn, w) if w.ranges else w for w in batch]
            results = await self._count_named(conn, named)
        for w, result in zip(named, results, strict=True):
            result.counts.bytes = result.counts.bytes or w.bytes
        return results

    async def _count_named(
        self, conn: asyncpg.Connection, batch: Sequence[ThreadWork]
    ) -> list[WorkResult]:
        expire = [w.thread_id for w in batch if w.expire]
        trims = [
            (w.thread_id, ns, i) for w in batch for ns, ids in w.checkpoints.items() for i in ids
        ]
        orphans = [(w.thread_id, ns, i) for w in batch for ns, ids in w.writes.items() for i in ids]
        ck: dict[tuple[str, str], int] = {}
        wr: dict[tuple[str, str], int] = defaultdict(int)
        if trims:
            t = _Triples.of(trims)
            ck = {(r[0], r[1]): r[2] for r in await conn.fetch(COUNT_CHECKPOINTS_SQL, *t.args())}
            for r in await conn.fetch(COUNT_WRITES_SQL, *t.args()):
                wr[(r[0], r[1])] += r[2]
        if orphans:
            for r in await conn.fetch(COUNT_WRITES_SQL, *_Triples.of(orphans).args()):
                wr[(r[0], r[1])] += r[2]
        whole: dict[str, Counts] = defaultdict(Counts)
        if expire:
            for kind, sql in COUNT_THREAD_SQL.items():
                for r in await conn.fetch(sql, expire):
                    setattr(whole[r[0]], kind, r[1])
                    if kind == "checkpoints":
                        whole[r[0]].bytes = int(r[2] or 0)
            # A policy's expiry leaves the blobs: a later sweep counts them.
            for w in batch:
                if w.expire and w.defer_blobs:
                    whole[w.thread_id].blobs = 0
        blobs = await self._count_blobs(conn, batch, trims)
        results = []
        for w in batch:
            if w.expire:
                c = whole[w.thread_id]
                c.threads = 1
            else:
                c = Counts()
                for ns in w.checkpoints:
                    c.checkpoints += ck.pop((w.thread_id, ns), 0)
                    c.writes += wr.pop((w.thread_id, ns), 0)
                for ns in w.writes:
                    c.writes += wr.pop((w.thread_id, ns), 0)
                c.blobs = blobs.pop(w.thread_id, 0)
            results.append(WorkResult(w.thread_id, c))
        return results

    async def _count_blobs(
        self,
        conn: asyncpg.Connection,
        batch: Sequence[ThreadWork],
        trims: list[tuple[str, str, str]],
    ) -> dict[str, int]:
        """Per thread: the blobs the batch would collect (`_collect_blobs`, counted)."""
        blobs: dict[str, int] = {}
        # A trim dates its thread, so the batch collects no blob of it.
        trimmed = {w.thread_id for w in batch if w.checkpoints or w.ranges}
        tids = sorted(
            {
                w.thread_id
                for w in batch
                if not w.expire and w.thread_id not in trimmed and self._quiet(w.fingerprint)
            }
        )
        if tids:
            t = _Triples.of(trims) if trims else _Triples([], [], [])
            rows = await self._fetch_dated(conn, COUNT_GARBAGE_BLOBS_SQL, tids, *t.args())
            blobs = {r[0]: r[1] for r in rows}
        gone = [w.thread_id for w in batch if w.gc_blobs and not w.fingerprint]
        if gone and await self._has_expired_table(conn):
            for r in await conn.fetch(COUNT_EXPIRED_BLOBS_SQL, gone, self._cutoff()):
                blobs[r[0]] = blobs.get(r[0], 0) + r[1]
        return blobs

    async def thread_bytes(self, thread_ids: Sequence[str]) -> dict[str, int]:
        """Bytes of each thread: checkpoints and metadata, writes and blobs."""
        rows = await self.pool.fetch(THREAD_BYTES_SQL, list(thread_ids))
        return {str(r[0]): int(r[1]) for r in rows}

    async def after_batch(self) -> None:
        """Nothing to do between batches: autovacuum reclaims dead tuples."""

    # ------------------------------------------------------------ legal holds

    async def _has_holds_table(self, conn: asyncpg.Connection) -> bool:
        # Once there, never dropped: only its absence is asked again.
        if not self._holds_table:
            self._holds_table = bool(await conn.fetchval(HOLDS_TABLE_EXISTS_SQL))
        return self._holds_table

    async def _held_among(self, conn: asyncpg.Connection, thread_ids: Sequence[str]) -> set[str]:
        """The held threads among `thread_ids`, read in the caller's transaction under the lock."""
        # Its own statement: READ COMMITTED takes a statement's snapshot when
        # it starts, so a read in the same statement would predate the wait.
        await conn.execute(HOLDS_SHARED_LOCK_SQL)
        if not await self._has_holds_table(conn):
            return set()
        return {r[0] for r in await conn.fetch(HELD_AMONG_SQL, list(thread_ids))}

    async def holds(self) -> list[Hold]:
        """Every hold, in thread-id order; none while the holds table does not exist."""
        out: list[Hold] = []
        async with self.pool.acquire() as conn:
            if not await self._has_holds_table(conn):
                return out
            after: str | None = None
            while True:
                if after is None:
                    rows = await conn.fetch(HOLDS_FIRST_PAGE_SQL, HOLDS_PAGE)
                else:
                    rows = await conn.fetch(HOLDS_NEXT_PAGE_SQL, after, HOLDS_PAGE)
                out.extend(Hold(r[0], r[1], float(r[2]), r[3]) for r in rows)
                if len(rows) < HOLDS_PAGE:
                    return out
                after = rows[-1][0]

    async def hold(self, thread_id: str, reason: str | None, held_by: str | None) -> Hold | None:
        """Hold `thread_id` (whether or not it has rows yet); None if it was held already."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {int(self.lock_timeout * 1000)}")
            await conn.execute(HOLDS_LOCK_SQL)
            if not await self._has_holds_table(conn):
                await conn.execute(CREATE_HOLDS_TABLE_SQL)
            held_at = await conn.fetchval(INSERT_HOLD_SQL, thread_id, reason, held_by)
        # Only now, committed: a rollback would leave no table behind.
        self._holds_table = True
        return None if held_at is None else Hold(thread_id, reason, float(held_at), held_by)

    async def release(self, thread_id: str) -> bool:
        """Lift the hold on `thread_id`; False if it had none."""
        async with self.pool.acquire() as conn:
            if not await self._has_holds_table(conn):
                return False
            return await conn.fetchval(DELETE_HOLD_SQL, thread_id) is not None

    # ------------------------------------------------------------ stats

    async def stats(self, now: float, largest: int = 10) -> dict[str, Any]:
        """Rows, dead tuples and bytes per table, ages per namespace, largest threads."""
        async with self.pool.acquire() as conn:
            tables = {
                r[0]: {"rows": int(r[1]), "dead_rows": int(r[2]), "bytes": int(r[3])}
                for r in await conn.fetch(STATS_TABLE_SQL, self.schema, list(REQUIRED_TABLES))
            }
            ages = AgeHistogram(now)
            async with conn.transaction():
                async for ns, cid in conn.cursor(STATS_IDS_SQL):
                    ages.add(ns, cid)
            top = [
                {"thread_id": r[0], "checkpoints": int(r[1]), "bytes": int(r[2])}
                for r in await conn.fetch(LARGEST_THREADS_SQL, largest)
            ]
            threads = int(await conn.fetchval(COUNT_THREADS_SQL))
            pending = (0, 0)
            if await self._has_expired_table(conn):
                r = await conn.fetchrow(EXPIRED_STATS_SQL)
                pending = (int(r[0]), int(r[1]))
        return {
            "store": self.name,
            "kind": "postgres",
            "threads": threads,
            "tables": tables,
            "ages": ages.counts,
            "largest_threads": top,
            # Expired threads whose blobs wait out the grace period (not in `threads`).
            "expired_awaiting_blob_gc": {"threads": pending[0], "blobs": pending[1]},
        }


def connect_kwargs_safe(dsn: str) -> dict[str, Any]:
    """`connect_kwargs`, or {} for a DSN that does not parse."""
    try:
        return connect_kwargs(dsn)
    except ValueError:
        return {}


async def _fingerprints(conn: asyncpg.Connection, tids: Sequence[str]) -> dict[str, Fingerprint]:
    found: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
    for tid, ns, n, newest in await conn.fetch(FINGERPRINT_SQL, list(tids)):
        found[tid].append((ns, int(n), newest))
    return {tid: tuple(sorted(v)) for tid, v in found.items()}


def _merged_ranges(batch: Sequence[ThreadWork]) -> list[tuple[str, str, TrimRange]]:
    """The batch's trim ranges, one per (thread, namespace).

    A huge trim's chunks are contiguous, oldest first, so the chunks of one
    namespace in one batch are one range with their limits added: bounds are
    read once, before any delete.
    """
    merged: dict[tuple[str, str], TrimRange] = {}
    for w in batch:
        for ns, r in w.ranges.items():
            have = merged.get((w.thread_id, ns))
            merged[(w.thread_id, ns)] = (
                r if have is None else replace(have, limit=have.limit + r.limit)
            )
    return [(t, ns, r) for (t, ns), r in merged.items()]


async def _bounds(
    conn: asyncpg.Connection, ranges: Sequence[tuple[str, str, TrimRange]]
) -> list[str]:
    rows = await conn.fetch(
        TRIM_BOUNDS_SQL,
        [t for t, _, _ in ranges],
        [ns for _, ns, _ in ranges],
        [r.before for _, _, r in ranges],
        [r.keep for _, _, r in ranges],
        [r.limit for _, _, r in ranges],
    )
    return [str(r[0]) for r in rows]


async def _named(conn: asyncpg.Connection, work: ThreadWork) -> ThreadWork:
    """A dry run's copy of `work` naming the ids its ranges would delete, and their size."""
    checkpoints = {ns: list(ids) for ns, ids in work.checkpoints.items()}
    for ns, r in work.ranges.items():
        whole = replace(r, limit=r.offset + r.limit)
        (bound,) = await _bounds(conn, [(work.thread_id, ns, whole)])
        rows = await conn.fetch(RANGE_IDS_SQL, work.thread_id, ns, bound, r.offset)
        checkpoints.setdefault(ns, []).extend(row[0] for row in rows)
    size = 0
    if checkpoints:
        t = _Triples.of([(work.thread_id, ns, i) for ns, ids in checkpoints.items() for i in ids])
        size = int(await conn.fetchval(RANGE_BYTES_SQL, *t.args()) or 0)
    return replace(work, checkpoints=checkpoints, ranges={}, bytes=work.bytes or size)


def _counts_of(fp: Fingerprint) -> dict[str, int]:
    return {ns: n for ns, n, _ in fp}


def _expected_counts(
    batch: Sequence[ThreadWork],
    before: dict[str, Fingerprint],
    deleted: dict[tuple[str, str], int],
) -> dict[str, dict[str, int]]:
    """Checkpoints per namespace of each thread once the batch's deletes are done.

    Counts alone detect an insert; the newest id of a namespace a chunk
    emptied from the top is not known here, and not needed.
    """
    expired = {w.thread_id for w in batch if w.expire}
    out: dict[str, dict[str, int]] = {}
    for tid, fp in before.items():
        if tid in expired:
            continue
        left = {ns: n - deleted.get((tid, ns), 0) for ns, n, _ in fp}
        out[tid] = {ns: n for ns, n in left.items() if n > 0}
    return out


def _summary(tid: str, r: asyncpg.Record, sends: set[tuple[str, str, str]]) -> CheckpointSummary:
    # The scan pulls only the metadata keys the decision reads out of the JSONB.
    meta: dict[str, Any] = {"parents": json_object(r["parents"])}
    if r["source"] is not None:
        meta["source"] = r["source"]
    if r["counters"] is not None:
        meta["counters_since_delta_snapshot"] = json_object(r["counters"])
    if r["delta_marked"]:
        meta["delta_writes_versioned"] = True
    return summarize(
        r["checkpoint_ns"],
        r["checkpoint_id"],
        r["parent_checkpoint_id"],
        meta,
        reads_parent_sends=r["v"] < 4,
        has_sends_writes=(tid, r["checkpoint_ns"], r["checkpoint_id"]) in sends,
        size=int(r["size"] or 0),
    )


def _with_keys(
    s: CheckpointSummary, keys: tuple[frozenset[str], frozenset[str]]
) -> CheckpointSummary:
    from dataclasses import replace

    return replace(s, inline_channels=keys[0], versioned_channels=keys[1])


def _aggregate_fingerprint(agg: ThreadAggregate) -> Fingerprint:
    return tuple(sorted((a.namespace, a.count, a.newest_id) for a in agg.namespaces))


def _fingerprint(summaries: Sequence[CheckpointSummary]) -> Fingerprint:
    by_ns: dict[str, list[str]] = defaultdict(list)
    for s in summaries:
        by_ns[s.namespace].append(s.checkpoint_id)
    return fingerprint_of(by_ns)
