"""The SQLite engine: stores written by `langgraph-checkpoint-sqlite`.

Tables `checkpoints` and `writes`; channel values inline in the msgpack
checkpoint blob, metadata a UTF-8 JSON blob, WAL mode. Reads run in
autocommit mode (short read transactions that never block the application
in WAL); every batch is one `BEGIN IMMEDIATE` transaction that first
re-checks the batch's threads against their scan, then deletes by id.

The statements are in `worker.stores.sqlite_sql`, beside the saver
wrapper's; the archive section here pairs its copies with image tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from policies.decide import FORK_SOURCES, is_delta_thread, root_head
from policies.ids import checkpoint_time
from policies.model import CheckpointSummary, ThreadView
from policies.plan import Detail, NamespaceAggregate, ThreadAggregate, ThreadPlan
from policies.summary import DELTA_MARKERS, json_object, summarize
from policies.waiting import writes_show_waiting
from worker.stores.archive import (
    NULLED_COLUMNS,
    NULLED_TABLE,
    Archive,
    ArchiveError,
    PendingSegment,
    Segment,
    SegmentReader,
    Selection,
)
from worker.stores.decoding import Decoder

# The engine types, named one by one as the other engine names them: an import
# list, not logic.
from worker.stores.engine import (
    HOLDS_TABLE,
    RESIDUE_TABLE,
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
    prefix_upper_bound,
)
from worker.stores.sqlite_sql import (
    AGGREGATE_SQL,
    ARCHIVE_DELETE_CHECKPOINTS_SQL,
    ARCHIVE_DELETE_ORPHAN_WRITES_SQL,
    ARCHIVE_DELETE_WRITES_SQL,
    ARCHIVE_EXPIRE_CHECKPOINTS_SQL,
    ARCHIVE_EXPIRE_MANY_CHECKPOINTS_SQL,
    ARCHIVE_EXPIRE_MANY_WRITES_SQL,
    ARCHIVE_EXPIRE_WRITES_SQL,
    ARCHIVE_NULL_PARENTS_SQL,
    ARCHIVE_TRIM_CHECKPOINTS_SQL,
    ARCHIVE_TRIM_NULL_PARENTS_SQL,
    ARCHIVE_TRIM_WRITES_SQL,
    ARCHIVED_NULLED_SQL,
    ATTACH_SEGMENT_SQL,
    BATCH_TRIM_CHECKPOINTS_SQL,
    BATCH_TRIM_COUNT_WRITES_SQL,
    BATCH_TRIM_IDS_SQL,
    BATCH_TRIM_NULL_PARENTS_SQL,
    BATCH_TRIM_SIZE_CHECKPOINTS_SQL,
    BATCH_TRIM_WRITES_SQL,
    CHECKPOINT_BLOB_SQL,
    CHECKPOINT_PRESENT_SQL,
    COPY_BATCH_TRIM_CHECKPOINTS_SQL,
    COPY_BATCH_TRIM_NULLED_SQL,
    COPY_BATCH_TRIM_WRITES_SQL,
    COPY_EXPIRE_CHECKPOINTS_SQL,
    COPY_EXPIRE_WRITES_SQL,
    COUNT_BELOW_SQL,
    COUNT_CHECKPOINTS_SQL,
    COUNT_THREAD_BYTES_SQL,
    COUNT_THREAD_CHECKPOINTS_SQL,
    COUNT_THREAD_WRITES_SQL,
    COUNT_THREADS_SQL,
    COUNT_TRIM_SQL,
    COUNT_TRIM_WRITES_SQL,
    COUNT_WRITES_SQL,
    CREATE_HOLDS_TABLE_SQL,
    CREATE_RESIDUE_TABLE_SQL,
    DATA_VERSION_SQL,
    DELETE_CHECKPOINTS_SQL,
    DELETE_HOLD_SQL,
    DELETE_ORPHAN_WRITES_SQL,
    DELETE_WRITES_SQL,
    DETACH_SEGMENT_SQL,
    EXPIRE_CHECKPOINTS_SQL,
    EXPIRE_COUNT_WRITES_SQL,
    EXPIRE_MANY_CHECKPOINTS_SQL,
    EXPIRE_MANY_WRITES_SQL,
    EXPIRE_SIZE_CHECKPOINTS_SQL,
    EXPIRE_WRITES_SQL,
    FILE_PAGES_SQL,
    FINGERPRINT_SQL,
    HEAD_BLOBS_SQL,
    HEAD_METADATA_SQL,
    HEAD_WRITE_CHANNELS_SQL,
    HELD_AMONG_SQL,
    HOLDS_FIRST_PAGE_SQL,
    HOLDS_NEXT_PAGE_SQL,
    HOLDS_TABLE_EXISTS_SQL,
    INSERT_HOLD_SQL,
    IRREGULAR_IDS_SQL,
    JOURNAL_MODE_SQL,
    LARGEST_THREADS_SQL,
    LOOSE_PAGE_SQL,
    MAP_SEGMENT_SQL,
    MARKED_THREADS_SQL,
    NO_AUTOCHECKPOINT_SQL,
    NULL_PARENTS_SQL,
    ORDERED_COLUMNS_SQL,
    ORPHAN_WRITES_SQL,
    RECORD_RESIDUE_CHECK_SQL,
    REQUIRED_COLUMNS,
    RESIDUE_CHECKS_SQL,
    RESTORE_FILTER,
    RESTORE_INSERT_SQL,
    RESTORE_KEYS,
    RESTORE_MISSING_SQL,
    RESTORE_RELINK_COUNT_SQL,
    RESTORE_RELINK_SQL,
    RESTORE_SELECTED_SQL,
    SCAN_SQL,
    STATS_IDS_SQL,
    STATS_TABLE_SQL,
    TABLE_COLUMNS_SQL,
    THREAD_BLOBS_SQL,
    THREAD_BYTES_SQL,
    THREADS_PAGE_SQL,
    TRIM_BOUND_SQL,
    TRIM_CHECKPOINTS_SQL,
    TRIM_LOW_SQL,
    TRIM_NULL_PARENTS_SQL,
    TRIM_WRITES_SQL,
    WAL_CHECKPOINT_SQL,
    WRITE_PRESENT_SQL,
)
from worker.stores.stats import AgeHistogram
from worker.stores.timestamps import iso_utc

log = structlog.get_logger("checkpoint_janitor.sqlite")

# ---------------------------------------------------------------- archive
# (image table, copy) of the batch-wide trims and of the expiries, in the order
# their statements run (the parents to be nulled first: the UPDATE goes first).
_TRIM_COPIES = (
    (NULLED_TABLE, COPY_BATCH_TRIM_NULLED_SQL),
    ("writes", COPY_BATCH_TRIM_WRITES_SQL),
    ("checkpoints", COPY_BATCH_TRIM_CHECKPOINTS_SQL),
)
_EXPIRE_COPIES = (
    ("writes", COPY_EXPIRE_WRITES_SQL),
    ("checkpoints", COPY_EXPIRE_CHECKPOINTS_SQL),
)
RECOVERY_SAMPLE = 8
"""Keys of each table a recovery looks up in the store."""

# ---------------------------------------------------------------- limits
# The statements are in `worker.stores.sqlite_sql` (all but the archive's,
# above); how much they read and how long they wait stays with the engine.

HOLDS_PAGE = 1000
"""Holds read per keyset page (`holds`)."""
DETAIL_READERS = 2
"""Connections the planning's detail reads share (`details`): the reads of the pages
in flight (`worker.sweep.planning.PLAN_AHEAD`) run in SQLite with the GIL released,
so on two the reads of two pages proceed at once instead of queueing on one
connection's thread (about 2x on the 1M bench store); the first page's aggregates
stay on `reader`."""
BUSY_SLICE_MS = 20
"""Each connection's `busy_timeout`: SQLite's own waits stay this short (they cannot
be cancelled), and the engine retries around them up to the store's `busy_timeout`."""

WAL_CHECKPOINT_BYTES = 16 * 2**20
"""With no writer about, batches delete this many bytes of rows before a checkpoint:
one checkpoint copies a page changed by many batches once, and syncs once for all
of them. Every deleted byte is in the WAL (SQLite's `secure_delete`, on in the
common builds, zeroes it; without it the WAL grows less), so it bounds the WAL
from below; the file is no measure, as SQLite reuses it without shrinking it."""


# How the store is opened: never `rwc`, so a worker creates no file. Dry runs
# (`plan`) and `stats` read through `mode=ro`, or `immutable` when no journal
# holds commits the main file lacks (see `_connect_read_only`).
READ_WRITE = "mode=rw"
READ_ONLY = "mode=ro"
READ_ONLY_IMMUTABLE = "mode=ro&immutable=1"
JOURNAL_SUFFIXES = ("-wal", "-journal")


def store_uri(path: str, params: str) -> str:
    """The `file:` URI of `path` (relative: to the working directory) with `params`.

    `as_uri` percent-encodes what SQLite's URI parser reads as syntax: an
    unescaped `#` or `?` in the path cuts it there and drops `mode`, and the
    file at the cut-off path is opened, and created.
    """
    return f"{Path(os.path.abspath(path)).as_uri()}?{params}"


async def _connect(uri: str) -> aiosqlite.Connection:
    # isolation_level=None: autocommit, so reads end at once and the write
    # transactions are the explicit BEGIN IMMEDIATE ones.
    return await aiosqlite.connect(uri, uri=True, isolation_level=None)


@dataclass(slots=True)
class _EarlyPlan:
    """What a batch decided before its write lock (`SqliteStore._copy_before_lock`):
    results of held or changed parts, the batch-wide trims with their bounds, the expiries."""

    results: list[WorkResult]
    trimming: dict[int, ThreadWork]
    expiring: dict[int, str]
    trim_counts: dict[str, Counts]
    trim_args: dict[str, str] | None
    expire_ids: list[str]


@dataclass(slots=True)
class _EarlyCopy:
    """A batch's segment, copied and prepared before the write lock."""

    seg: Segment
    version: int
    """The batch connection's `PRAGMA data_version` before anything was read."""
    plan: _EarlyPlan
    seconds: float
    preparing: asyncio.Future[None]
    """`seg.prepare` (image, write, fsync, re-read), running while the batch takes
    its lock and deletes; the COMMIT waits for it."""


class SqliteStore:
    """A `StoreEngine` over one SQLite file, on one shared aiosqlite connection.

    `read_only` (dry runs: `plan`, `stats`) opens it read-only (see
    `_connect_read_only`), so a user who may only read the file can plan; such
    an engine cannot `apply` for real.
    """

    def __init__(
        self,
        name: str,
        path: str,
        *,
        busy_timeout: float = 5.0,
        encryption_key: str | None = None,
        read_only: bool = False,
    ) -> None:
        self.name = name
        self.path = path
        self.busy_timeout = busy_timeout
        self.read_only = read_only
        self.decoder = Decoder(encryption_key)
        self._conn: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._spare_readers: list[aiosqlite.Connection] = []
        """The other `DETAIL_READERS` connections, opened like `_reader`."""
        self._idle_readers: asyncio.Queue[aiosqlite.Connection] | None = None
        """The detail readers no `details` call holds (made on first use)."""
        self._data_version: int | None = None
        self._checkpoint_on_close = False
        self._uncheckpointed = 0
        """Bytes of rows deleted since the last WAL checkpoint."""
        self._lock_wait = 0.0
        self._contention = Contention(writer_seen=False)
        self._ordered_columns: dict[str, tuple[str, ...]] = {}
        """The archive's copies: each table's columns in `SELECT *` order."""
        self._wal: bool | None = None
        self.copies_before_lock = {"kept": 0, "redone": 0}
        """Archived batches whose copy, taken before the write lock, was kept, or was
        dropped because another connection committed in between (then redone under it)."""
        self.before_lock: Callable[[Segment, Sequence[str]], Awaitable[None]] | None = None
        """Awaited with the segment and its threads between a batch's copy before the
        lock and its BEGIN IMMEDIATE: a seam for tests to commit there,
        deterministically (None in the tool)."""
        self._archive_seconds: dict[str, float] = {}
        """The batch's archive phases (debug log `archive_segment`): the wait for its
        copies once its deletes were done, and its seal."""
        """The store is in WAL mode (read once, by the archive's copies)."""

    # ------------------------------------------------------------ lifecycle

    @property
    def conn(self) -> aiosqlite.Connection:
        """The open connection."""
        if self._conn is None:
            raise StoreError(self.name, "not open")
        return self._conn

    @property
    def reader(self) -> aiosqlite.Connection:
        """The connection a sweep plans on: its own (WAL lets it read while a batch
        commits on `conn`), or `conn` itself for a read-only engine."""
        return self._reader if self._reader is not None else self.conn

    async def open(self) -> None:
        """Open the file (never create it) and check it holds the saver's tables."""
        if not os.path.exists(self.path):
            raise StoreError(self.name, f"SQLite file {self.path} does not exist")
        try:
            if self.read_only:
                self._conn = await self._connect_read_only()
            else:
                self._conn = await _connect(store_uri(self.path, READ_WRITE))
                self._reader = await self._connect_reader()
                for _ in range(DETAIL_READERS - 1):
                    self._spare_readers.append(await self._connect_reader())
                await self._conn.execute(NO_AUTOCHECKPOINT_SQL)
                await self._writer_since_last_batch()  # the baseline the first batch compares to
            # Short waits inside SQLite: a wait there cannot be cancelled, and
            # SIGTERM must end a batch that waits for the application's lock.
            # `_begin` retries up to the configured busy_timeout.
            await self._conn.execute(f"PRAGMA busy_timeout = {BUSY_SLICE_MS}")
            await self._check_schema()
            self._checkpoint_on_close = not self.read_only
        except BaseException as e:
            # Any failure closes the connection: a StoreError raised with it
            # open left aiosqlite's thread calling into a closed event loop.
            await self.close()
            if isinstance(e, sqlite3.Error):
                raise StoreError(self.name, f"cannot open {self.path}: {e}") from None
            raise

    async def _connect_reader(self) -> aiosqlite.Connection:
        reader = await _connect(store_uri(self.path, READ_WRITE))
        await reader.execute(f"PRAGMA busy_timeout = {BUSY_SLICE_MS}")
        return reader

    @contextlib.asynccontextmanager
    async def _detail_reader(self) -> AsyncIterator[aiosqlite.Connection]:
        """A reader for one `details` call, the spare ones first (`reader` also serves
        the aggregates); waits while all are lent."""
        if self._idle_readers is None:
            # Last in, first out: a lone call takes a spare, not the aggregates' reader.
            self._idle_readers = asyncio.LifoQueue()
            for r in [self.reader, *self._spare_readers]:
                self._idle_readers.put_nowait(r)
        idle = self._idle_readers
        reader = await idle.get()
        try:
            yield reader
        finally:
            idle.put_nowait(reader)

    async def _connect_read_only(self) -> aiosqlite.Connection:
        """A read-only connection that creates no file, even in a folder this user cannot write.

        SQLite reads a WAL store through its -wal and -shm files, creating
        them when missing (and leaving them behind a read-only connection), or
        fails where it cannot create them. With a -wal file (the application
        has the store open, or crashed), `mode=ro` reads the commits still in
        it. Without one every commit is in the main file, so `immutable` reads
        it whole without those files or locks; an application that opens the
        store meanwhile is not seen, which a dry run may miss.
        """
        if any(os.path.exists(self.path + s) for s in JOURNAL_SUFFIXES):
            return await _connect(store_uri(self.path, READ_ONLY))
        return await _connect(store_uri(self.path, READ_ONLY_IMMUTABLE))

    async def _check_schema(self) -> None:
        for table, required in REQUIRED_COLUMNS.items():
            async with self.conn.execute(TABLE_COLUMNS_SQL, (table,)) as cur:
                have = {r[0] for r in await cur.fetchall()}
            if not have:
                raise StoreError(
                    self.name,
                    f"{self.path} has no {table!r} table: not a langgraph-checkpoint-sqlite store",
                )
            if missing := required - have:
                raise StoreError(
                    self.name,
                    f"table {table!r} lacks columns {sorted(missing)}: unknown schema version",
                )

    async def ping(self) -> None:
        """Raise `StoreError` if the file is gone or does not answer."""
        if not os.path.exists(self.path):
            raise StoreError(self.name, f"SQLite file {self.path} does not exist")
        try:
            await self.conn.execute("SELECT 1")
        except sqlite3.Error as e:
            raise StoreError(self.name, f"{self.path} does not answer: {e}") from None

    async def begin_sweep(self, now: float) -> bool:
        """Every batch serializes on SQLite's write lock; no sweep lock is needed."""
        return True

    async def end_sweep(self) -> None:
        """Nothing to release."""

    async def close(self) -> None:
        """Close the connections, checkpointing what the batches left in the WAL.

        `after_batch` lets the WAL grow to `WAL_CHECKPOINT_BYTES` while no writer
        is about; this copies the rest (a purge's zeroed pages among them) into
        the file now rather than at the application's next checkpoint.
        """
        self._idle_readers = None
        spares, self._spare_readers = self._spare_readers, []
        for spare in spares:
            await spare.close()
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.close()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                if self._checkpoint_on_close:
                    self._checkpoint_on_close = False
                    await conn.execute(WAL_CHECKPOINT_SQL)
            except sqlite3.Error as e:
                # Not lost: the application's next commit (or last close) checkpoints.
                log.warning("wal_checkpoint_failed", store=self.name, error=str(e))
            finally:
                await conn.close()

    # ------------------------------------------------------------ scan

    async def count_threads(self) -> int:
        """Threads with at least one checkpoint."""
        async with self.conn.execute(COUNT_THREADS_SQL) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    def thread_pages(self, page_size: int) -> AsyncIterator[list[str]]:
        """Every thread id of both tables, by keyset pages of at most `page_size`."""
        return self.thread_prefix_pages("", page_size)

    async def thread_prefix_pages(self, prefix: str, page_size: int) -> AsyncIterator[list[str]]:
        """Thread ids starting with `prefix` (code-point exact), by keyset pages."""
        high = prefix_upper_bound(prefix)
        args: dict[str, Any] = {"n": page_size, "low": prefix, "high": high, "after": None}
        first = True
        while True:
            sql = THREADS_PAGE_SQL[(first, high is not None)]
            async with self.conn.execute(sql, args) as cur:
                page = [r[0] for r in await cur.fetchall()]
            if page:
                yield page
            if len(page) < page_size:
                return
            first, args["after"] = False, page[-1]

    async def scan(self, thread_ids: Sequence[str]) -> list[ScannedThread]:
        """Summaries of `thread_ids`; delta threads decoded, waiting left undetermined."""
        ids_json = json.dumps(list(thread_ids))
        # fetchall, not `async for`: aiosqlite hops threads once per fetched
        # chunk, and its default chunk is one row.
        async with self.reader.execute(SCAN_SQL, (ids_json,)) as cur:
            scanned = await cur.fetchall()
        rows: dict[str, list[CheckpointSummary]] = defaultdict(list)
        metadata: dict[tuple[str, str, str], str | None] = {}
        for tid, ns, cid, parent, size, text in scanned:
            rows[tid].append(_summary(ns, cid, parent, size, text))
            metadata[(tid, ns, cid)] = text
        del scanned
        orphans: dict[str, list[tuple[str, str]]] = defaultdict(list)
        async with self.reader.execute(ORPHAN_WRITES_SQL, (ids_json,)) as cur:
            for tid, ns, cid in await cur.fetchall():
                orphans[tid].append((ns, cid))
        out = []
        for tid in thread_ids:
            summaries = tuple(rows.get(tid, ()))
            if any(s.created_at is None for s in summaries):
                summaries = await self._date_from_ts(tid, summaries)
            if is_delta_thread(summaries):
                summaries = await self._decode_thread(tid, summaries)
            head = root_head(summaries)
            meta: dict[str, Any] = {}
            if head is not None:
                meta = json_object(metadata.get((tid, head.namespace, head.checkpoint_id)))
            view = ThreadView(
                thread_id=tid,
                checkpoints=summaries,
                head_metadata=meta,
                orphan_writes=tuple(orphans.get(tid, ())),
            )
            out.append(ScannedThread(view, _fingerprint(summaries)))
        return out

    async def _decode_thread(
        self, thread_id: str, summaries: tuple[CheckpointSummary, ...]
    ) -> tuple[CheckpointSummary, ...]:
        """Fill the channel keys of a DeltaChannel thread's checkpoints from their blobs.

        On SQLite a snapshot is visible only inside the blob; one row is
        decoded at a time so memory stays at one checkpoint.
        """
        keys: dict[tuple[str, str], tuple[frozenset[str], frozenset[str]] | None] = {}
        # One row at a time, so memory holds one blob, not the thread's.
        async with self.reader.execute(THREAD_BLOBS_SQL, (thread_id,)) as cur:
            async for ns, cid, type_, blob in cur:
                keys[(ns, cid)] = self.decoder.channel_keys(type_, blob)
        out = []
        for s in summaries:
            k = keys.get((s.namespace, s.checkpoint_id))
            out.append(
                replace(s, inline_channels=k[0], versioned_channels=k[1]) if k is not None else s
            )
        return tuple(out)

    async def _date_from_ts(
        self, thread_id: str, summaries: tuple[CheckpointSummary, ...]
    ) -> tuple[CheckpointSummary, ...]:
        """Date checkpoints whose id is not a UUIDv6 by the `ts` inside their blob."""
        out = []
        for s in summaries:
            if s.created_at is None:
                key = (thread_id, s.namespace, s.checkpoint_id)
                async with self.reader.execute(CHECKPOINT_BLOB_SQL, key) as cur:
                    row = await cur.fetchone()
                if row is not None:
                    s = replace(s, created_at=self.decoder.timestamp(row[0], row[1]))
            out.append(s)
        return tuple(out)

    async def aggregate_pages(
        self, page_size: int, head_metadata: bool
    ) -> AsyncIterator[list[ThreadAggregate]]:
        """Every thread of both tables, by keyset pages, with its namespaces' aggregates."""
        args: dict[str, Any] = {"n": page_size, "after": ""}
        first = True
        while True:
            async with self.reader.execute(LOOSE_PAGE_SQL[first], args) as cur:
                page = [r[0] for r in await cur.fetchall()]
            if not page:
                return
            yield await self._aggregates(page, head_metadata)
            if len(page) < page_size:
                return
            first, args["after"] = False, page[-1]

    async def _aggregates(self, page: list[str], head_metadata: bool) -> list[ThreadAggregate]:
        spaces: dict[str, list[NamespaceAggregate]] = defaultdict(list)
        bounds = {"first": page[0], "last": page[-1]}
        async with self.reader.execute(AGGREGATE_SQL, bounds) as cur:
            for tid, ns, n, oldest, newest in await cur.fetchall():
                spaces[tid].append(NamespaceAggregate(ns, int(n), oldest, newest))
        meta: dict[str, dict[str, Any]] = {}
        if head_metadata:
            heads = [
                [tid, "", a.newest_id]
                for tid in page
                for a in spaces.get(tid, ())
                if a.namespace == ""
            ]
            async with self.reader.execute(HEAD_METADATA_SQL, (json.dumps(heads),)) as cur:
                meta = {r[0]: json_object(r[1]) for r in await cur.fetchall()}
        return [
            ThreadAggregate(tid, tuple(spaces.get(tid, ())), head_metadata=meta.get(tid, {}))
            for tid in page
        ]

    async def details(
        self, asked: Sequence[tuple[ThreadAggregate, ThreadPlan]]
    ) -> list[ThreadAggregate]:
        """Fill in what each plan asked for: orphan writes, markers, waiting, range counts."""
        async with self._detail_reader() as reader:
            return await self._details_on(reader, asked)

    async def _details_on(
        self, reader: aiosqlite.Connection, asked: Sequence[tuple[ThreadAggregate, ThreadPlan]]
    ) -> list[ThreadAggregate]:
        out = {a.thread_id: a for a, _ in asked}

        def wanting(detail: Detail) -> list[str]:
            return [a.thread_id for a, p in asked if detail in p.needs]

        if tids := wanting(Detail.ORPHANS):
            found: dict[str, list[tuple[str, str]]] = {t: [] for t in tids}
            async with reader.execute(ORPHAN_WRITES_SQL, (json.dumps(tids),)) as cur:
                for tid, ns, cid in await cur.fetchall():
                    found[tid].append((ns, cid))
            for tid, orphans in found.items():
                out[tid] = replace(out[tid], orphan_writes=tuple(orphans))
        if tids := wanting(Detail.REGULAR):
            irregular: dict[tuple[str, str], int] = {}
            async with reader.execute(IRREGULAR_IDS_SQL, (json.dumps(tids),)) as cur:
                for tid, ns, n in await cur.fetchall():
                    irregular[(tid, ns)] = int(n)
            for tid in tids:
                spaces = tuple(
                    replace(a, irregular=irregular.get((tid, a.namespace), 0))
                    for a in out[tid].namespaces
                )
                out[tid] = replace(out[tid], namespaces=spaces)
        if tids := wanting(Detail.MARKERS):
            async with reader.execute(MARKED_THREADS_SQL, (json.dumps(tids),)) as cur:
                marked = {r[0] for r in await cur.fetchall()}
            for tid in tids:
                out[tid] = replace(out[tid], markers=tid in marked)
        if tids := wanting(Detail.WAITING):
            for t in await self._waiting_on(reader, [_head_only(out[tid]) for tid in tids]):
                v = t.view
                out[v.thread_id] = replace(
                    out[v.thread_id], waiting=v.waiting, head_undecodable=v.head_undecodable
                )
        for a, p in asked:
            if Detail.COUNT in p.needs:
                below = dict(out[a.thread_id].below)
                for ns, bound in p.count_below:
                    below[(ns, bound)] = await self._one_on(
                        reader, COUNT_BELOW_SQL, (a.thread_id, ns, bound)
                    )
                out[a.thread_id] = replace(out[a.thread_id], below=below)
        return [out[a.thread_id] for a, _ in asked]

    async def residue_checks(self) -> dict[str, float]:
        """When each policy's quiet threads were last all looked at for residue."""
        # sqlite_master, as for holds: a missing table means no look recorded yet.
        async with self.conn.execute(HOLDS_TABLE_EXISTS_SQL, (RESIDUE_TABLE,)) as cur:
            if await cur.fetchone() is None:
                return {}
        async with self.conn.execute(RESIDUE_CHECKS_SQL) as cur:
            rows = await cur.fetchall()
        return {str(p): datetime.fromisoformat(at).timestamp() for p, at in rows}

    async def record_residue_checks(self, policies: Sequence[str], at: float) -> None:
        """Date a complete look at these policies' quiet threads, in one short write."""
        stamp = iso_utc(at)
        try:
            await self._write(
                (CREATE_RESIDUE_TABLE_SQL, ()),
                *((RECORD_RESIDUE_CHECK_SQL, (name, stamp)) for name in policies),
            )
        except sqlite3.Error as e:
            raise StoreError(self.name, f"cannot record the residue check: {e}") from None

    async def resolve_waiting(self, threads: Sequence[ScannedThread]) -> list[ScannedThread]:
        """Does each thread wait at its newest root checkpoint? Its writes, else its blob, say.

        Interrupt and error writes are read first: their channel names are
        plain even in an encrypted store. Otherwise only the decoded blob tells
        a finished run from a static breakpoint; a head that cannot be decoded
        is marked `head_undecodable`, never counted as waiting.
        """
        return await self._waiting_on(self.reader, threads)

    async def _waiting_on(
        self, reader: aiosqlite.Connection, threads: Sequence[ScannedThread]
    ) -> list[ScannedThread]:
        heads = {
            t.view.thread_id: h for t in threads if (h := root_head(t.view.checkpoints)) is not None
        }
        keys = json.dumps([[tid, h.namespace, h.checkpoint_id] for tid, h in heads.items()])
        async with reader.execute(HEAD_BLOBS_SQL, (keys,)) as cur:
            blobs = {r[0]: (r[1], r[2]) for r in await cur.fetchall()}
        channels: dict[str, list[str]] = defaultdict(list)
        async with reader.execute(HEAD_WRITE_CHANNELS_SQL, (keys,)) as cur:
            for tid, channel in await cur.fetchall():
                channels[tid].append(channel)
        out = []
        for t in threads:
            tid = t.view.thread_id
            waiting: bool | None = False
            if tid in heads:
                blob = blobs.get(tid)
                if blob is None or writes_show_waiting(channels[tid]):
                    # A head gone since the scan counts as waiting: kept, decided next sweep.
                    waiting = True
                else:
                    waiting = self.decoder.waiting(*blob, channels[tid])
            view = replace(t.view, waiting=waiting, head_undecodable=waiting is None)
            out.append(replace(t, view=view))
        return out

    # ------------------------------------------------------------ delete

    async def apply(
        self, batch: Sequence[ThreadWork], dry_run: bool, archive: Archive | None = None
    ) -> list[WorkResult]:
        """Carry out `batch` in one BEGIN IMMEDIATE transaction, or count it when `dry_run`.

        With `archive`, every row the batch deletes (and each parent id it
        nulls) goes to one segment, sealed (written, fsynced, verified) before
        the COMMIT: a segment that cannot be sealed rolls the batch back and
        its `ArchiveError` propagates (nothing deleted).
        """
        if dry_run:
            return [await self._count(work) for work in batch]
        early = await self._copy_before_lock(batch, archive) if archive is not None else None
        if not await self._begin_batch(batch):
            if early is not None:
                await self._drop(early)
            return [WorkResult(w.thread_id, Counts(), locked=True) for w in batch]
        if early is not None:
            done = await self._apply_copied(early)
            if done is not None:
                return done
        seg = archive.segment() if archive is not None else None
        try:
            if seg is not None:
                opening = time.monotonic()
                await asyncio.to_thread(seg.open_source, store_uri(self.path, READ_ONLY))
                self._archive_seconds["open"] = time.monotonic() - opening
            results = await self._batch(batch, seg, seen=early is not None)
            if seg is not None and not seg.sealed:
                await self._seal(seg)
        except BaseException:
            # Also on cancellation (SIGTERM): the batch is all or nothing.
            await self._roll_back(seg)
            raise
        return await self._commit_batch(seg, results, early)

    async def _seal(self, seg: Segment) -> None:
        """Seal `seg`, timed; under the write lock: nothing commits before its archive is safe."""
        sealing = time.monotonic()
        await asyncio.to_thread(seg.seal)
        self._archive_seconds["seal"] = time.monotonic() - sealing

    async def _commit_batch(
        self, seg: Segment | None, results: list[WorkResult], early: _EarlyCopy | None
    ) -> list[WorkResult]:
        """COMMIT a batch (archived under the lock or copied before it) and count what it
        freed; then complete its segment. Its results, for `apply` to return."""
        await self._commit(seg)
        self._uncheckpointed += sum(r.counts.bytes for r in results)
        if seg is not None:
            await self._after_commit(seg, early)
        return results

    async def _after_commit(self, seg: Segment, early: _EarlyCopy | None) -> None:
        """Complete a committed batch's segment and log its phases; the time spent on
        the archive before the write lock counts as the lock wait does (`Contention`):
        part of the batch's time, not of its transaction, so the sizer aims the
        transaction alone at its target."""
        completing = time.monotonic()
        await self._complete(seg)
        self._archive_seconds["complete"] = time.monotonic() - completing
        if early is not None:
            self._archive_seconds["before_lock"] = early.seconds
            c = self._contention
            self._contention = Contention(c.writer_seen, c.lock_wait + early.seconds)
        log.debug(
            "archive_segment",
            store=self.name,
            segment=seg.number,
            bytes=seg.bytes,
            rows=sum(seg.counts.values()),
            copied_before_lock=early is not None and early.seg is seg,
            **{
                f"{k}_seconds": round(v, 4)
                for k, v in {**self._archive_seconds, **seg.timings}.items()
            },
        )
        self._archive_seconds.clear()

    async def _copy_before_lock(
        self, batch: Sequence[ThreadWork], archive: Archive
    ) -> _EarlyCopy | None:
        """Copy and prepare the batch's segment before its write lock (None: not for
        this batch, which then copies under the lock as before).

        Everything the batch would decide under the lock (holds, fingerprints, trim
        bounds) is read here first, after noting `PRAGMA data_version`; the copy then
        reads the same way, then the segment is written, fsynced and re-read as a
        `.partial`. `_apply_copied` keeps it only if no other connection committed
        since that note (module docstring of `worker.stores.archive`: why the copy
        then equals the deletes).
        """
        if not _copyable_before_lock(batch):
            return None
        started = time.monotonic()
        version = await self._data_version_now()
        results, trimming, expiring = await self._parts(batch, None)
        trim_counts, trim_args = await self._trim_bounds(list(trimming.values()))
        expire_ids = sorted(set(expiring.values()))
        copies: list[tuple[str, str, tuple[Any, ...] | dict[str, Any]]] = []
        if trim_args is not None:
            copies += [(t, sql, trim_args) for t, sql in _TRIM_COPIES]
        if expire_ids:
            copies += [(t, sql, (json.dumps(expire_ids),)) for t, sql in _EXPIRE_COPIES]
        specs = [(t, await self._columns_of(t), sql, p) for t, sql, p in copies]
        seg = archive.segment()
        uri = store_uri(self.path, READ_ONLY)

        def copy() -> None:
            if specs:
                seg.open_source(uri)
            for table, columns, sql, params in specs:
                seg.copy(table, columns, sql, params)

        try:
            await asyncio.to_thread(copy)
        except BaseException:
            await asyncio.to_thread(seg.abandon)
            raise
        # Written while the batch takes its lock and deletes, in a worker thread.
        preparing = asyncio.ensure_future(asyncio.to_thread(seg.prepare))
        plan = _EarlyPlan(results, trimming, expiring, trim_counts, trim_args, expire_ids)
        early = _EarlyCopy(seg, version, plan, 0.0, preparing)
        try:
            if self.before_lock is not None:
                await self.before_lock(seg, [*trim_counts, *expire_ids])
        except BaseException:
            await self._drop(early)
            raise
        early.seconds = time.monotonic() - started
        return early

    async def _prepared(self, early: _EarlyCopy) -> None:
        """Wait for `early`'s `prepare` (its error, if any, is left in the future)."""
        waiting = time.monotonic()
        await asyncio.wait([early.preparing])
        self._archive_seconds["prepare_wait"] = time.monotonic() - waiting
        if not early.preparing.cancelled():
            early.preparing.exception()  # retrieved: raised by `result()` where it counts

    async def _drop(self, early: _EarlyCopy) -> None:
        """Abandon `early`'s segment once its `prepare` is done (no file then left)."""
        await self._prepared(early)
        await asyncio.to_thread(early.seg.abandon)

    async def _apply_copied(self, early: _EarlyCopy) -> list[WorkResult] | None:
        """Under the write lock: if no other connection committed since `early` was
        copied, delete exactly what it copied, publish its segment and COMMIT; else
        drop it and return None (the batch is then archived under the lock)."""
        version = await self._data_version_now()
        if self._data_version is not None and version != self._data_version:
            self._contention = Contention(writer_seen=True, lock_wait=self._lock_wait)
        self._data_version = version
        if version != early.version:
            self.copies_before_lock["redone"] += 1
            await self._drop(early)
            return None
        self.copies_before_lock["kept"] += 1
        seg, plan = early.seg, early.plan
        try:
            try:
                deleted = await self._delete_copied(plan)
            finally:
                # Never leave the prepare running into the rollback or the seal.
                await self._prepared(early)
            early.preparing.result()
            if {t: n for t, n in deleted.items() if n} != seg.counts:
                raise seg.archive.error(
                    f"copied {seg.counts} rows into segment {seg.number:06d} but deleted "
                    f"{deleted}; nothing deleted"
                )
            await self._seal(seg)
        except BaseException:
            await self._roll_back(seg)
            raise
        return await self._commit_batch(seg, plan.results, early)

    async def _delete_copied(self, plan: _EarlyPlan) -> dict[str, int]:
        """`plan`'s deletes (the plain statements), its results filled in; the rows
        deleted per archived table."""
        totals: dict[str, int] = {}
        if plan.trim_args is not None:
            totals = await self._trim_rows(plan.trim_args, plan.trim_counts)
        for i, work in plan.trimming.items():
            plan.results[i] = WorkResult(work.thread_id, plan.trim_counts[work.thread_id])
        if plan.expire_ids:
            gone = {tid: Counts(threads=1) for tid in plan.expire_ids}
            expired = await self._expire_rows(json.dumps(plan.expire_ids), gone)
            for t, n in expired.items():
                totals[t] = totals.get(t, 0) + n
            for i, tid in plan.expiring.items():
                plan.results[i] = WorkResult(tid, gone[tid])
        return totals

    async def _begin_batch(self, batch: Sequence[ThreadWork]) -> bool:
        """Take the write lock for `batch`, noting the wait; False (logged) if it stayed busy."""
        begun = await self._begin()
        self._contention = Contention(writer_seen=self._lock_wait > 0, lock_wait=self._lock_wait)
        if not begun:
            log.warning(
                "batch_skipped",
                store=self.name,
                reason="write lock busy",
                busy_timeout=self.busy_timeout,
                threads=len(batch),
            )
        return begun

    async def _batch(
        self, batch: Sequence[ThreadWork], seg: Segment | None, *, seen: bool = False
    ) -> list[WorkResult]:
        """The batch's statements, under the write lock; deleted rows also go to `seg`.
        `seen`: `_apply_copied` already read `PRAGMA data_version` in this transaction."""
        if not seen and await self._writer_since_last_batch():
            self._contention = Contention(writer_seen=True, lock_wait=self._lock_wait)
        results, trimming, expiring = await self._parts(batch, seg)
        if trimming:
            trimmed = await self._trim_many(list(trimming.values()), seg, seal=not expiring)
            for i, work in trimming.items():
                results[i] = WorkResult(work.thread_id, trimmed[work.thread_id])
        if expiring:
            gone = await self._expire(sorted(set(expiring.values())), seg)
            for i, tid in expiring.items():
                results[i] = WorkResult(tid, gone.get(tid, Counts(threads=1)))
        return results

    async def _parts(
        self, batch: Sequence[ThreadWork], seg: Segment | None
    ) -> tuple[list[WorkResult], dict[int, ThreadWork], dict[int, str]]:
        """Refuse held or changed parts and delete the rest one by one, except the
        set-based trims and the expiries: those are left as placeholders (by index in
        the results) for `_batch` to carry out together."""
        tids = [w.thread_id for w in batch]
        on_hold = await self._held_among(tids)
        current = await self._fingerprints(tids)
        repeated = _repeated(tids)
        results: list[WorkResult] = []
        trimming: dict[int, ThreadWork] = {}
        expiring: dict[int, str] = {}
        for work in batch:
            tid = work.thread_id
            if tid in on_hold:
                results.append(WorkResult(tid, Counts(), on_hold=True))
                continue
            if current.get(tid, ()) != work.fingerprint:
                results.append(WorkResult(tid, Counts(), changed=True))
                continue
            if work.expire:
                expiring[len(results)] = tid
                results.append(WorkResult(tid, Counts()))
                continue
            if tid not in repeated and _ranges_only(work):
                trimming[len(results)] = work
                results.append(WorkResult(tid, Counts()))
                continue
            results.append(await self._delete(work, seg))
            if tid in repeated:
                # A later part of this thread expects it as this part left it.
                current.update(await self._fingerprints([tid]))
                current.setdefault(tid, ())
        return results, trimming, expiring

    async def _roll_back(self, seg: Segment | None) -> None:
        """Undo the batch: its transaction and its segment."""
        if self.conn.in_transaction:
            await self.conn.execute("ROLLBACK")
        if seg is not None:
            await asyncio.to_thread(seg.abandon)

    async def _commit(self, seg: Segment | None) -> None:
        """COMMIT the batch; on failure, abandon `seg` only if certainly not committed."""
        try:
            await self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                # Certainly not committed: the segment goes with the batch.
                await self._roll_back(seg)
            # Otherwise it may have committed: the segment stays `.pending` for
            # the next sweep's `recover_archive` to settle.
            raise

    async def _complete(self, seg: Segment) -> None:
        """Give a committed batch's segment its final name; a failure leaves it `.pending`
        (safe: the next sweep's recovery promotes it), so the sweep goes on."""
        try:
            await asyncio.to_thread(seg.complete)
        except ArchiveError as e:
            log.warning("archive_complete_failed", store=self.name, error=str(e))

    async def _begin(self) -> bool:
        """BEGIN IMMEDIATE, retried until `busy_timeout`; False if the lock stayed taken.

        Notes how long it waited (`_lock_wait`, 0 when the lock was free).
        """
        started = time.monotonic()
        deadline = started + self.busy_timeout
        pause = 0.005
        self._lock_wait = 0.0
        while True:
            try:
                await self.conn.execute("BEGIN IMMEDIATE")
                return True
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
            # Timed from the first refusal: a free lock costs no wait at all.
            self._lock_wait = time.monotonic() - started
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def _fingerprints(self, thread_ids: Sequence[str]) -> dict[str, Fingerprint]:
        found: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
        async with self.conn.execute(FINGERPRINT_SQL, (json.dumps(list(thread_ids)),)) as cur:
            for tid, ns, n, newest in await cur.fetchall():
                found[tid].append((ns, int(n), newest))
        return {tid: tuple(sorted(v)) for tid, v in found.items()}

    async def _expire(self, thread_ids: list[str], seg: Segment | None) -> dict[str, Counts]:
        """Delete these threads whole, in two statements, counting each one's rows."""
        counts = {tid: Counts(threads=1) for tid in thread_ids}
        ids = json.dumps(thread_ids)
        if seg is not None:
            return await self._expire_archived(thread_ids, counts, seg)
        await self._expire_rows(ids, counts)
        return counts

    async def _expire_archived(
        self, thread_ids: list[str], counts: dict[str, Counts], seg: Segment
    ) -> dict[str, Counts]:
        """`_expire` with `seg`: rows copied in SQL alongside the deletes (then the
        segment sealed), except for a thread this batch already deleted from one by
        one (`_delete`): the copy reads the last commit, which still holds the rows
        that delete archived, so those come from what their deletes return."""
        touched = seg.added_threads()
        if touched_ids := [t for t in thread_ids if t in touched]:
            rest = json.dumps(touched_ids)
            # thread_id is the first column of both tables.
            _, rows = await self._archived(seg, "writes", ARCHIVE_EXPIRE_MANY_WRITES_SQL, (rest,))
            for row in rows:
                counts[row[0]].writes += 1
            columns, rows = await self._archived(
                seg, "checkpoints", ARCHIVE_EXPIRE_MANY_CHECKPOINTS_SQL, (rest,)
            )
            size = _checkpoint_size(columns)
            for row in rows:
                counts[row[0]].checkpoints += 1
                counts[row[0]].bytes += size(row)
        if copied := [t for t in thread_ids if t not in touched]:
            ids = json.dumps(copied)
            delete = partial(self._expire_rows, ids, counts)
            # The batch's last statements: the segment is complete once copied.
            await self._copy_alongside(seg, _EXPIRE_COPIES, (ids,), delete, seal=True)
        return counts

    async def _expire_rows(self, ids: str, counts: dict[str, Counts]) -> dict[str, int]:
        """Delete the threads of the JSON list `ids` whole, counting into `counts` by one
        grouped read per table under the same write lock; the rows deleted per archived
        table, as the deletes report them (as in `_trim_rows`)."""
        async with self.conn.execute(EXPIRE_COUNT_WRITES_SQL, (ids,)) as cur:
            for tid, n in await cur.fetchall():
                counts[tid].writes += int(n)
        async with self.conn.execute(EXPIRE_SIZE_CHECKPOINTS_SQL, (ids,)) as cur:
            for tid, n, size in await cur.fetchall():
                counts[tid].checkpoints += int(n)
                counts[tid].bytes += int(size or 0)
        writes = (await self.conn.execute(EXPIRE_MANY_WRITES_SQL, (ids,))).rowcount
        checkpoints = (await self.conn.execute(EXPIRE_MANY_CHECKPOINTS_SQL, (ids,))).rowcount
        return {NULLED_TABLE: 0, "writes": writes, "checkpoints": checkpoints}

    async def _copy_alongside(
        self,
        seg: Segment,
        copies: Sequence[tuple[str, str]],
        params: tuple[Any, ...] | dict[str, Any],
        delete: Callable[[], Awaitable[dict[str, int]]],
        *,
        seal: bool = False,
    ) -> None:
        """Copy into `seg`, in SQL and in a worker thread, the rows of each (table,
        SELECT) in `copies` while `delete` removes them on the batch's connection;
        `delete` returns the rows it removed per table, which must be the rows copied.
        With `seal` (no row of the batch comes after these), the same thread then
        seals the segment, so its write and fsync overlap the deletes too.

        On a store without WAL the copy ends before the deletes start: its read
        lock would make a delete that spills its cache wait for the exclusive lock.
        """
        specs = [(t, await self._columns_of(t), sql) for t, sql in copies]

        def copy_all() -> dict[str, int]:
            copied = {t: seg.copy(t, cols, sql, params) for t, cols, sql in specs}
            if seal:
                seg.seal()
            return copied

        copying = asyncio.ensure_future(asyncio.to_thread(copy_all))
        try:
            if not await self._is_wal():
                await asyncio.wait([copying])
            deleted = await delete()
        finally:
            # Never leave the copy running into the rollback or the seal.
            waiting = time.monotonic()
            await asyncio.wait([copying])
            waited = self._archive_seconds.get("copy_wait", 0.0) + time.monotonic() - waiting
            self._archive_seconds["copy_wait"] = waited
            if not copying.cancelled():
                copying.exception()  # retrieved: a failed delete's error is the one raised
        copied = copying.result()
        if any(copied[t] != deleted.get(t, 0) for t in copied):
            raise seg.archive.error(
                f"copied {copied} rows into segment {seg.number:06d} but deleted {deleted}; "
                "nothing deleted"
            )

    async def _columns_of(self, table: str) -> tuple[str, ...]:
        """The store's columns of `table` in `SELECT *` order (the nulled parents' own)."""
        if table == NULLED_TABLE:
            return NULLED_COLUMNS
        cached = self._ordered_columns.get(table)
        if cached is None:
            rows = await self.conn.execute_fetchall(ORDERED_COLUMNS_SQL, (table,))
            cached = self._ordered_columns[table] = tuple(str(r[0]) for r in rows)
        return cached

    async def _is_wal(self) -> bool:
        if self._wal is None:
            rows = list(await self.conn.execute_fetchall(JOURNAL_MODE_SQL))
            self._wal = bool(rows) and str(rows[0][0]).lower() == "wal"
        return self._wal

    async def _bound(self, tid: str, ns: str, r: TrimRange, limit: int | None = None) -> str:
        args = {"t": tid, "ns": ns, "before": r.before, "keep": r.keep, "limit": limit or r.limit}
        async with self.conn.execute(TRIM_BOUND_SQL, args) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row and row[0] is not None else ""

    async def _count_range(self, tid: str, ns: str, r: TrimRange, counts: Counts) -> None:
        """What `_trim` would delete, past what the trim's earlier parts would."""
        bound = await self._bound(tid, ns, r, r.offset + r.limit)
        low = ""
        if r.offset:
            args = {"t": tid, "ns": ns, "offset": r.offset}
            async with self.conn.execute(TRIM_LOW_SQL, args) as cur:
                row = await cur.fetchone()
            low = str(row[0]) if row else bound
        bounds = {"t": tid, "ns": ns, "low": low, "bound": bound}
        async with self.conn.execute(COUNT_TRIM_SQL, bounds) as cur:
            n, size = await cur.fetchone() or (0, 0)
        counts.checkpoints += int(n)
        counts.bytes += int(size)
        counts.writes += await self._one_on(self.conn, COUNT_TRIM_WRITES_SQL, bounds)

    async def _trim(
        self, tid: str, ns: str, r: TrimRange, counts: Counts, seg: Segment | None
    ) -> None:
        """One set-based trim: parents nulled, writes, then checkpoints below the bound."""
        args = {"t": tid, "ns": ns, "bound": await self._bound(tid, ns, r)}
        if seg is not None:
            await self._archive_nulled(seg, ARCHIVE_TRIM_NULL_PARENTS_SQL, args)
            await self.conn.execute(TRIM_NULL_PARENTS_SQL, args)
            _, rows = await self._archived(seg, "writes", ARCHIVE_TRIM_WRITES_SQL, args)
            counts.writes += len(rows)
            columns, rows = await self._archived(
                seg, "checkpoints", ARCHIVE_TRIM_CHECKPOINTS_SQL, args
            )
            counts.checkpoints += len(rows)
            size = _checkpoint_size(columns)
            counts.bytes += sum(size(row) for row in rows)
            return
        await self.conn.execute(TRIM_NULL_PARENTS_SQL, args)
        cur = await self.conn.execute(TRIM_WRITES_SQL, args)
        counts.writes += cur.rowcount
        async with self.conn.execute(TRIM_CHECKPOINTS_SQL, args) as cur:
            sizes = list(await cur.fetchall())
        counts.checkpoints += len(sizes)
        counts.bytes += sum(int(r[0]) for r in sizes)

    async def _trim_many(
        self, works: Sequence[ThreadWork], seg: Segment | None = None, *, seal: bool = False
    ) -> dict[str, Counts]:
        """The set-based trims of many threads (one part each), in four statements;
        with `seg`, every row they remove and each parent they null is copied into it
        alongside (then, with `seal`, the segment sealed: no row of the batch follows)."""
        counts, args = await self._trim_bounds(works)
        if args is None:
            return counts
        delete = partial(self._trim_rows, args, counts)
        if seg is None:
            await delete()
        else:
            await self._copy_alongside(seg, _TRIM_COPIES, args, delete, seal=seal)
        return counts

    async def _trim_bounds(
        self, works: Sequence[ThreadWork]
    ) -> tuple[dict[str, Counts], dict[str, str] | None]:
        """Zeroed counts per thread and the batch trims' bounds (None: nothing to trim)."""
        ranges = [(w.thread_id, ns, r) for w in works for ns, r in w.ranges.items()]
        counts = {w.thread_id: Counts() for w in works}
        spaces = json.dumps([[t, ns] for t, ns, _ in ranges])
        ids: list[list[str]] = [[] for _ in ranges]
        for i, cid in await self.conn.execute_fetchall(BATCH_TRIM_IDS_SQL, {"spaces": spaces}):
            ids[i].append(cid)
        bounds = [
            [t, ns, b]
            for (t, ns, r), got in zip(ranges, ids, strict=True)
            if (b := _batch_bound(sorted(got), r.keep, r.before, r.limit))
        ]
        return counts, ({"bounds": json.dumps(bounds)} if bounds else None)

    async def _trim_rows(self, args: dict[str, str], counts: dict[str, Counts]) -> dict[str, int]:
        """The batch trims' statements, counting into `counts` by one grouped read per
        table (a row per thread, where RETURNING handed Python a row per deleted row); the
        rows deleted per archived table, as the deletes report them (checked against the
        archive's copy: the grouped reads are written differently and could drift apart)."""
        conn = self.conn
        nulled = (await conn.execute(BATCH_TRIM_NULL_PARENTS_SQL, args)).rowcount
        for tid, n in await conn.execute_fetchall(BATCH_TRIM_COUNT_WRITES_SQL, args):
            counts[tid].writes += int(n)
        for tid, n, size in await conn.execute_fetchall(BATCH_TRIM_SIZE_CHECKPOINTS_SQL, args):
            counts[tid].checkpoints += int(n)
            counts[tid].bytes += int(size or 0)
        writes = (await conn.execute(BATCH_TRIM_WRITES_SQL, args)).rowcount
        checkpoints = (await conn.execute(BATCH_TRIM_CHECKPOINTS_SQL, args)).rowcount
        return {NULLED_TABLE: nulled, "writes": writes, "checkpoints": checkpoints}

    async def _delete(self, work: ThreadWork, seg: Segment | None) -> WorkResult:
        conn = self.conn
        counts = Counts()
        tid = work.thread_id
        for ns, r in work.ranges.items():
            await self._trim(tid, ns, r, counts, seg)
        if seg is not None:
            return await self._delete_archived(work, counts, seg)
        if work.expire:
            cur = await conn.execute(EXPIRE_WRITES_SQL, (tid,))
            counts.writes += cur.rowcount
            cur = await conn.execute(EXPIRE_CHECKPOINTS_SQL, (tid,))
            counts.checkpoints += cur.rowcount
            counts.threads = 1
            return WorkResult(tid, counts)
        for ns, ids in work.checkpoints.items():
            args = (tid, ns, json.dumps(ids))
            cur = await conn.execute(DELETE_WRITES_SQL, args)
            counts.writes += cur.rowcount
            cur = await conn.execute(DELETE_CHECKPOINTS_SQL, args)
            counts.checkpoints += cur.rowcount
            await conn.execute(NULL_PARENTS_SQL, args)
        for ns, ids in work.writes.items():
            cur = await conn.execute(DELETE_ORPHAN_WRITES_SQL, (tid, ns, json.dumps(ids)))
            counts.writes += cur.rowcount
        return WorkResult(tid, counts)

    async def _delete_archived(self, work: ThreadWork, counts: Counts, seg: Segment) -> WorkResult:
        """`_delete`'s statements past the trims, each returning the rows it removes."""
        tid = work.thread_id
        if work.expire:
            _, rows = await self._archived(seg, "writes", ARCHIVE_EXPIRE_WRITES_SQL, (tid,))
            counts.writes += len(rows)
            _, rows = await self._archived(
                seg, "checkpoints", ARCHIVE_EXPIRE_CHECKPOINTS_SQL, (tid,)
            )
            counts.checkpoints += len(rows)
            counts.threads = 1
            return WorkResult(tid, counts)
        for ns, ids in work.checkpoints.items():
            args = (tid, ns, json.dumps(ids))
            _, rows = await self._archived(seg, "writes", ARCHIVE_DELETE_WRITES_SQL, args)
            counts.writes += len(rows)
            _, rows = await self._archived(seg, "checkpoints", ARCHIVE_DELETE_CHECKPOINTS_SQL, args)
            counts.checkpoints += len(rows)
            await self._archive_nulled(seg, ARCHIVE_NULL_PARENTS_SQL, args)
            await self.conn.execute(NULL_PARENTS_SQL, args)
        for ns, ids in work.writes.items():
            args = (tid, ns, json.dumps(ids))
            _, rows = await self._archived(seg, "writes", ARCHIVE_DELETE_ORPHAN_WRITES_SQL, args)
            counts.writes += len(rows)
        return WorkResult(tid, counts)

    async def _archived(
        self, seg: Segment, table: str, sql: str, args: tuple[Any, ...] | dict[str, Any]
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run a `... RETURNING *` delete of `table`, add the rows it removed to `seg`,
        and return their columns and rows."""
        async with self.conn.execute(sql, args) as cur:
            rows = [tuple(r) for r in await cur.fetchall()]
            columns = [d[0] for d in cur.description or ()]
        if rows:
            seg.add(table, columns, rows)
        return columns, rows

    async def _archive_nulled(
        self, seg: Segment, sql: str, args: tuple[Any, ...] | dict[str, Any]
    ) -> None:
        """Record the parent ids the UPDATE that follows will set to NULL."""
        async with self.conn.execute(sql, args) as cur:
            rows = await cur.fetchall()
        if rows:
            seg.add_nulled_parents([(str(a), str(b), str(c), str(d)) for a, b, c, d in rows])

    async def _count(self, work: ThreadWork) -> WorkResult:
        counts = Counts()
        tid = work.thread_id
        if work.expire:
            counts.checkpoints = await self._one(COUNT_THREAD_CHECKPOINTS_SQL, (tid,))
            counts.writes = await self._one(COUNT_THREAD_WRITES_SQL, (tid,))
            counts.bytes = await self._one(COUNT_THREAD_BYTES_SQL, (tid,))
            counts.threads = 1
            return WorkResult(tid, counts)
        for ns, r in work.ranges.items():
            await self._count_range(tid, ns, r, counts)
        for ns, ids in work.checkpoints.items():
            args = (tid, ns, json.dumps(ids))
            counts.checkpoints += await self._one(COUNT_CHECKPOINTS_SQL, args)
            counts.writes += await self._one(COUNT_WRITES_SQL, args)
        for ns, ids in work.writes.items():
            counts.writes += await self._one(COUNT_WRITES_SQL, (tid, ns, json.dumps(ids)))
        return WorkResult(tid, counts)

    async def _one(self, sql: str, args: tuple[Any, ...]) -> int:
        return await self._one_on(self.conn, sql, args)

    @staticmethod
    async def _one_on(
        conn: aiosqlite.Connection, sql: str, args: tuple[Any, ...] | dict[str, Any]
    ) -> int:
        async with conn.execute(sql, args) as cur:
            row = await cur.fetchone()
        return int(row[0] or 0) if row else 0

    async def stats(self, now: float, largest: int = 10) -> dict[str, Any]:
        """What the store holds: rows and bytes per table, ages per namespace, largest threads."""
        tables = {}
        for table, sql in STATS_TABLE_SQL.items():
            async with self.conn.execute(sql) as cur:
                rows, size = await cur.fetchone() or (0, 0)
            tables[table] = {"rows": int(rows), "bytes": int(size)}
        ages = AgeHistogram(now)
        async with self.conn.execute(STATS_IDS_SQL) as cur:
            async for ns, cid in cur:
                ages.add(ns, cid)
        async with self.conn.execute(LARGEST_THREADS_SQL, (largest,)) as cur:
            top = [
                {"thread_id": t, "checkpoints": int(n), "bytes": int(b)}
                for t, n, b in await cur.fetchall()
            ]
        async with self.conn.execute(FILE_PAGES_SQL) as cur:
            page_size, page_count, free = await cur.fetchone() or (0, 0, 0)
        wal = self.path + "-wal"
        return {
            "store": self.name,
            "kind": "sqlite",
            "threads": await self.count_threads(),
            "tables": tables,
            "ages": ages.counts,
            "largest_threads": top,
            "file_bytes": page_size * page_count,
            "wal_bytes": os.path.getsize(wal) if os.path.exists(wal) else 0,
            "reclaimable_bytes": page_size * free,
        }

    async def thread_bytes(self, thread_ids: Sequence[str]) -> dict[str, int]:
        """Bytes of each thread: checkpoints and metadata, and writes' values."""
        async with self.conn.execute(THREAD_BYTES_SQL, (json.dumps(list(thread_ids)),)) as cur:
            return {str(t): int(n) for t, n in await cur.fetchall()}

    async def after_batch(self) -> None:
        """Checkpoint the WAL without waiting on anyone: after every batch while the
        application writes (its own commits then find a short WAL to checkpoint),
        otherwise once the batches have deleted `WAL_CHECKPOINT_BYTES`."""
        if not self._contention.writer_seen and self._uncheckpointed < WAL_CHECKPOINT_BYTES:
            return
        self._uncheckpointed = 0
        await self.conn.execute(WAL_CHECKPOINT_SQL)

    def contention(self) -> Contention:
        """What the last batch saw of the application's writers (`WriterAware`)."""
        return self._contention

    async def _data_version_now(self) -> int:
        """`PRAGMA data_version` of the batch's connection: it changes when any other
        connection commits (the application's, another worker's), never by our own."""
        async with self.conn.execute(DATA_VERSION_SQL) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _writer_since_last_batch(self) -> bool:
        """Whether another connection committed since the last call (inside a batch)."""
        version = await self._data_version_now()
        seen = self._data_version is not None and version != self._data_version
        self._data_version = version
        return seen

    # ------------------------------------------------------------ archive

    async def recover_archive(self, archive: Archive) -> Recovered:
        """Settle the `.pending` segments a crashed sweep left (see `ArchivingStore`)."""
        done = Recovered()
        for pending in await asyncio.to_thread(archive.pending):
            if await asyncio.to_thread(pending.valid) and not await self._still_here(pending):
                await asyncio.to_thread(pending.promote)
                done.promoted += 1
                log.info("archive_segment_promoted", store=self.name, segment=pending.path)
            else:
                await asyncio.to_thread(pending.discard)
                done.discarded += 1
                log.info("archive_segment_discarded", store=self.name, segment=pending.path)
        return done

    async def _still_here(self, pending: PendingSegment) -> bool:
        """Whether some of the segment's rows are in the store: its delete never committed.

        A batch deletes all its rows or none, so a few keys of each table tell.
        """

        def sample() -> list[tuple[str, list[tuple[Any, ...]]]]:
            out = []
            for table, sql in (
                ("checkpoints", CHECKPOINT_PRESENT_SQL),
                ("writes", WRITE_PRESENT_SQL),
            ):
                columns = pending.reader.columns(table)
                if not columns:
                    continue
                at = [columns.index(k) for k in RESTORE_KEYS[table]]
                keys = []
                for row in pending.reader.rows(table):
                    keys.append(tuple(row[i] for i in at))
                    if len(keys) >= RECOVERY_SAMPLE:
                        break
                out.append((sql, keys))
            return out

        for sql, keys in await asyncio.to_thread(sample):
            for key in keys:
                if await self._one(sql, key):
                    return True
        return False

    async def restore(
        self, segments: Sequence[SegmentReader], select: Selection, dry_run: bool
    ) -> RestoreCounts:
        """Put the selected threads' archived rows back (see `ArchivingStore.restore`).

        One write transaction per segment, so the application's writes go on
        between them; the parents are re-linked after every segment's rows are
        in, as a link may point at a row a later segment archived.
        """
        counts = RestoreCounts()
        params: dict[str, Any] = {"thread": select.thread_id, "prefix": select.prefix}
        params["threads"] = select.ids_json()
        params["n"] = len(select.prefix or "")
        where = RESTORE_FILTER[select.kind]
        for seg in segments:
            if seg.backend != "sqlite":
                raise ArchiveError(
                    self.name, seg.location, f"holds {seg.backend} rows; this store is sqlite"
                )
            counts.segments += 1
            restore_rows = partial(self._restore_rows, seg, where, params, counts, dry_run)
            await self._in_segment(seg, dry_run, restore_rows)
        for seg in segments:
            await self._in_segment(
                seg, dry_run, lambda: self._relink(where, params, counts, dry_run)
            )
        return counts

    async def _in_segment(
        self, seg: SegmentReader, dry_run: bool, body: Callable[[], Awaitable[None]]
    ) -> None:
        """Run `body` with `seg` attached as `archived`, in a write transaction unless `dry_run`."""
        conn = self.conn
        await conn.execute(
            ATTACH_SEGMENT_SQL, (f"{Path(os.path.abspath(seg.local_path)).as_uri()}?mode=ro",)
        )
        try:
            await conn.execute(MAP_SEGMENT_SQL)
            if dry_run:
                await body()
                return
            if not await self._begin():
                raise StoreError(self.name, f"write lock busy for {self.busy_timeout}s")
            try:
                await body()
                await conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    await conn.execute("ROLLBACK")
                raise
        finally:
            await conn.execute(DETACH_SEGMENT_SQL)

    async def _restore_rows(
        self,
        seg: SegmentReader,
        where: str,
        params: dict[str, Any],
        counts: RestoreCounts,
        dry_run: bool,
    ) -> None:
        present = set(await asyncio.to_thread(seg.tables))
        for table, key in RESTORE_KEYS.items():
            if table not in present:
                continue
            columns = ", ".join(f'"{c}"' for c in await asyncio.to_thread(seg.columns, table))
            keys = " AND ".join(f"m.{k} = s.{k}" for k in key)
            selected = await self._one_on(
                self.conn, RESTORE_SELECTED_SQL.format(table=table, filter=where), params
            )
            missing = 0
            sql = RESTORE_MISSING_SQL.format(table=table, filter=where, keys=keys)
            async with self.conn.execute(sql, params) as cur:
                for tid, n in await cur.fetchall():
                    counts.add(tid, table, int(n))
                    missing += int(n)
            counts.present += selected - missing
            if not dry_run and missing:
                await self.conn.execute(
                    RESTORE_INSERT_SQL.format(table=table, columns=columns, filter=where), params
                )

    async def _relink(
        self, where: str, params: dict[str, Any], counts: RestoreCounts, dry_run: bool
    ) -> None:
        if not await self._one(ARCHIVED_NULLED_SQL, (NULLED_TABLE,)):
            return
        if dry_run:
            async with self.conn.execute(
                RESTORE_RELINK_COUNT_SQL.format(filter=where), params
            ) as cur:
                for tid, n in await cur.fetchall():
                    counts.relink(tid, int(n))
            return
        async with self.conn.execute(RESTORE_RELINK_SQL.format(filter=where), params) as cur:
            for (tid,) in await cur.fetchall():
                counts.relink(tid, 1)

    # ------------------------------------------------------------ legal holds

    async def _has_holds_table(self) -> bool:
        async with self.conn.execute(HOLDS_TABLE_EXISTS_SQL, (HOLDS_TABLE,)) as cur:
            return await cur.fetchone() is not None

    async def _held_among(self, thread_ids: Sequence[str]) -> set[str]:
        if not await self._has_holds_table():
            return set()
        async with self.conn.execute(HELD_AMONG_SQL, (json.dumps(list(thread_ids)),)) as cur:
            return {r[0] for r in await cur.fetchall()}

    async def holds(self) -> list[Hold]:
        """Every hold, in thread-id order; none while the holds table does not exist."""
        if not await self._has_holds_table():
            return []
        out: list[Hold] = []
        after: str | None = None
        args: tuple[Any, ...]
        while True:
            if after is None:
                sql, args = HOLDS_FIRST_PAGE_SQL, (HOLDS_PAGE,)
            else:
                sql, args = HOLDS_NEXT_PAGE_SQL, (after, HOLDS_PAGE)
            async with self.conn.execute(sql, args) as cur:
                page = [_hold(*r) for r in await cur.fetchall()]
            out.extend(page)
            if len(page) < HOLDS_PAGE:
                return out
            after = page[-1].thread_id

    async def hold(self, thread_id: str, reason: str | None, held_by: str | None) -> Hold | None:
        """Hold `thread_id` (whether or not it has rows yet); None if it was held already."""
        now = time.time()
        if not await self._write(
            (CREATE_HOLDS_TABLE_SQL, ()),
            (INSERT_HOLD_SQL, (thread_id, reason, iso_utc(now), held_by)),
        ):
            return None
        return Hold(thread_id, reason, float(int(now)), held_by)

    async def release(self, thread_id: str) -> bool:
        """Lift the hold on `thread_id`; False if it had none."""
        if not await self._has_holds_table():
            return False
        return await self._write((DELETE_HOLD_SQL, (thread_id,)))

    async def _write(self, *statements: tuple[str, tuple[Any, ...]]) -> bool:
        """Run `statements` in one BEGIN IMMEDIATE transaction; whether the last changed a row."""
        if not await self._begin():
            raise StoreError(self.name, f"write lock busy for {self.busy_timeout}s")
        try:
            changed = 0
            for sql, args in statements:
                cur = await self.conn.execute(sql, args)
                changed = cur.rowcount
            await self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                await self.conn.execute("ROLLBACK")
            raise
        return changed > 0


_PARSE_ROOT_MARKERS = (*DELTA_MARKERS, *(f'"{src}"' for src in sorted(FORK_SOURCES)))


def _summary(
    ns: str, cid: str, parent: str | None, size: int, text: str | None
) -> CheckpointSummary:
    """A scanned row as the decision sees it.

    A root-namespace checkpoint has no parents, so its metadata is parsed only
    when a DeltaChannel marker or an `update_state` source (which moves its
    subgraphs' replay bound) appears in the text: a substring test is cheap,
    and a false positive costs one parse. SQLite keeps pending sends inline in
    every format version, so no checkpoint reads them from its parent here
    (invariant 2 is free).
    """
    meta: dict[str, Any] = {}
    if text and (ns != "" or any(m in text for m in _PARSE_ROOT_MARKERS)):
        meta = json_object(text)
    return summarize(ns, cid, parent, meta, size=int(size))


def _checkpoint_size(columns: Sequence[str]) -> Callable[[Sequence[Any]], int]:
    """A returned checkpoint row's size as the sweep counts it: checkpoint and metadata
    (`length()` in SQL: bytes of a blob, characters of a text, as Python's `len`)."""
    at = [columns.index("checkpoint"), columns.index("metadata")] if columns else []

    def size(row: Sequence[Any]) -> int:
        return sum(len(row[i]) for i in at if row[i] is not None)

    return size


def _batch_bound(ids: Sequence[str], keep: int, before: str, limit: int) -> str:
    """TRIM_BOUND_SQL's bound over a namespace's `ids`, oldest first: the smallest of
    `before`, the keep-th newest and the (limit+1)-th oldest; '' (nothing goes) when
    fewer than `keep`. Python's `str` order is SQLite's BINARY (code points)."""
    if len(ids) < keep:
        return ""
    bound = min(before, ids[len(ids) - keep])
    return min(bound, ids[limit]) if len(ids) > limit else bound


def _copyable_before_lock(batch: Sequence[ThreadWork]) -> bool:
    """Every part is a batch-wide trim or an expiry: the parts `_copy_before_lock`
    can plan in full without deleting (a one-thread delete by id reads what an
    earlier part of the same batch left, so it is archived under the lock)."""
    repeated = _repeated([w.thread_id for w in batch])
    return all(w.expire or (_ranges_only(w) and w.thread_id not in repeated) for w in batch)


def _repeated(thread_ids: Sequence[str]) -> set[str]:
    """The threads with more than one part in a batch (a thread split over parts)."""
    return {t for t, n in Counter(thread_ids).items() if n > 1}


def _ranges_only(work: ThreadWork) -> bool:
    """A part that is set-based trims alone, which `_trim_many` carries out with others."""
    return bool(work.ranges) and not work.checkpoints and not work.writes and not work.expire


def _hold(thread_id: str, reason: str | None, held_at: str, held_by: str | None) -> Hold:
    return Hold(thread_id, reason, datetime.fromisoformat(held_at).timestamp(), held_by)


def _head_only(agg: ThreadAggregate) -> ScannedThread:
    """A view holding only the thread's newest root checkpoint: all `resolve_waiting` reads."""
    heads = [a for a in agg.namespaces if a.namespace == ""]
    cps = tuple(
        CheckpointSummary("", a.newest_id, None, checkpoint_time(a.newest_id)) for a in heads
    )
    return ScannedThread(ThreadView(agg.thread_id, cps), ())


def _fingerprint(summaries: Sequence[CheckpointSummary]) -> Fingerprint:
    by_ns: dict[str, list[str]] = defaultdict(list)
    for s in summaries:
        by_ns[s.namespace].append(s.checkpoint_id)
    return fingerprint_of(by_ns)
