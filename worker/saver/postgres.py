"""`PostgresSaver` and `AsyncPostgresSaver`'s backend: the wrapper's Postgres programs.

Imported only when a Postgres saver is wrapped (it needs the
`checkpoint-janitor[postgres]` extra). The statements run through psycopg on
the saver's own connection. They live with the engine's in
`worker.stores.postgres_sql` (section "the saver wrapper"), which says beside
each where it differs from the sweep's and why; the holds statements are the
worker's own, so a hold placed here orders against the worker's batches as
the CLI's does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

from policies.decide import is_delta_thread
from policies.summary import json_object, summarize, ts_seconds
from worker.saver.backends import (
    AsyncSqlBackend,
    Backend,
    Result,
    SqlBackend,
    SqlPrograms,
    Statements,
    adrive,
    drive,
    scanned_of,
)
from worker.saver.operations import Scanned, ThreadChanged, ThreadStamp
from worker.stores.engine import Counts
from worker.stores.postgres_sql import (
    PG_CHANNEL_KEYS_SQL,
    PG_CREATE_HOLDS_TABLE_SQL,
    PG_DELETE_HOLD_SQL,
    PG_DELETE_SQL,
    PG_DELETE_THREADS_SQL,
    PG_FIRST_THREAD_PAGE_SQL,
    PG_HELD_SQL,
    PG_HOLDS_LOCK_SQL,
    PG_HOLDS_TABLE_EXISTS_SQL,
    PG_INSERT_HOLD_SQL,
    PG_RUN_THREADS_SQL,
    PG_SCAN_SQL,
    PG_STAMP_SQL,
    PG_THREAD_PAGE_SQL,
    PG_TS_SQL,
)

T = TypeVar("T")

# These programs mirror `worker.saver.sqlite`'s one for one on purpose: the same
# operations over another driver's SQL, parameters and results (arrays against
# json_each, RETURNING rows against rowcounts). One shared program would hide
# those differences behind flags.
PG_NO_RESULT = frozenset({PG_CREATE_HOLDS_TABLE_SQL})
"""Statements that return no rows (DDL): not fetched."""


def pg_holds() -> Statements[frozenset[str]]:
    """Every held thread; none while the table does not exist."""
    rows, _ = yield PG_HOLDS_TABLE_EXISTS_SQL, ()
    if not rows[0][0]:
        return frozenset()
    rows, _ = yield PG_HELD_SQL, ()
    return frozenset(r[0] for r in rows)


def pg_hold(thread_id: str, reason: str | None, held_by: str | None) -> Statements[bool]:
    """Under the holds lock (one transaction): create the table on first use, hold."""
    yield PG_HOLDS_LOCK_SQL, ()
    yield PG_CREATE_HOLDS_TABLE_SQL, ()
    rows, _ = yield PG_INSERT_HOLD_SQL, (thread_id, reason, held_by)
    return bool(rows)


def pg_release(thread_id: str) -> Statements[bool]:
    """Delete the thread's hold, if the table exists."""
    rows, _ = yield PG_HOLDS_TABLE_EXISTS_SQL, ()
    if not rows[0][0]:
        return False
    rows, _ = yield PG_DELETE_HOLD_SQL, (thread_id,)
    return bool(rows)


def pg_scan(thread_id: str) -> Statements[Scanned]:
    """Rows from the metadata; `ts` and channel keys only where they matter."""
    rows, _ = yield PG_SCAN_SQL, {"thread": thread_id}
    out = []
    for ns, cid, parent, meta, v, has_sends in rows:
        meta = json_object(meta)
        summary = summarize(
            ns,
            cid,
            parent,
            meta,
            # v is read only where the parent has sends writes: elsewhere
            # there is nothing to read from the parent whatever the format.
            reads_parent_sends=v is not None and v < 4,
            has_sends_writes=bool(has_sends),
        )
        out.append((summary, meta))
    undated = [s.checkpoint_id for s, _ in out if s.created_at is None]
    if undated:
        found, _ = yield PG_TS_SQL, (thread_id, undated)
        ts = {(r[0], r[1]): ts_seconds(r[2]) for r in found}
        out = [(replace(s, created_at=ts.get((s.namespace, s.checkpoint_id))), m) for s, m in out]
    if is_delta_thread(s for s, _ in out):
        found, _ = yield PG_CHANNEL_KEYS_SQL, (thread_id,)
        keys = {(r[0], r[1]): (frozenset(r[2]), frozenset(r[3])) for r in found}
        filled = []
        for s, meta in out:
            k = keys.get((s.namespace, s.checkpoint_id))
            if k is not None:
                s = replace(s, inline_channels=k[0], versioned_channels=k[1])
            filled.append((s, meta))
        out = filled
    return scanned_of(thread_id, out)


def pg_delete(thread_id: str, ids_by_ns: Mapping[str, Sequence[str]]) -> Statements[Counts]:
    """`PG_DELETE_SQL`: checkpoints, their writes, orphaned parents, freed blobs."""
    pairs = [(ns, cid) for ns, ids in ids_by_ns.items() for cid in ids]
    if not pairs:
        return Counts()
    params = {
        "thread": thread_id,
        "ns": [p[0] for p in pairs],
        "ids": [p[1] for p in pairs],
    }
    rows, _ = yield PG_DELETE_SQL, params
    checkpoints, writes, blobs = rows[0]
    return Counts(checkpoints=int(checkpoints), writes=int(writes), blobs=int(blobs))


def pg_expire(thread_id: str, stamp: ThreadStamp) -> Statements[Counts]:
    """READ COMMITTED: check before, delete, check after; a resume in between rolls it back.

    REPEATABLE READ could not do this: its snapshot would never see the
    resume. The window left is the moment between the last check and COMMIT.
    """
    rows, _ = yield PG_STAMP_SQL, (thread_id,)
    if (int(rows[0][0]), rows[0][1]) != stamp:
        raise ThreadChanged(thread_id)
    counts = yield from pg_delete_threads([thread_id])
    counts.threads = 1
    rows, _ = yield PG_STAMP_SQL, (thread_id,)
    if int(rows[0][0]) != 0:
        raise ThreadChanged(thread_id)
    return counts


def pg_delete_threads(thread_ids: Sequence[str]) -> Statements[Counts]:
    """Every row of the threads."""
    ids = list(thread_ids)
    counts = []
    for sql in PG_DELETE_THREADS_SQL:
        rows, _ = yield sql, (ids,)
        counts.append(int(rows[0][0]))
    return Counts(checkpoints=counts[0], blobs=counts[1], writes=counts[2])


def pg_threads_of_runs(run_ids: Sequence[str]) -> Statements[list[str]]:
    """Threads holding one of the runs' checkpoints."""
    rows, _ = yield PG_RUN_THREADS_SQL, ([str(r) for r in run_ids],)
    return [r[0] for r in rows]


def pg_thread_page(after: str | None, limit: int) -> Statements[list[str]]:
    """One keyset page of thread ids (after None: the first)."""
    if after is None:
        rows, _ = yield PG_FIRST_THREAD_PAGE_SQL, (limit,)
    else:
        rows, _ = yield PG_THREAD_PAGE_SQL, (after, limit)
    return [r[0] for r in rows]


PG_PROGRAMS = SqlPrograms(
    scan=pg_scan,
    delete=pg_delete,
    expire=pg_expire,
    delete_threads=pg_delete_threads,
    threads_of_runs=pg_threads_of_runs,
    thread_page=pg_thread_page,
    holds=pg_holds,
    hold=pg_hold,
    release=pg_release,
)


def _prepare(sql: str) -> bool | None:
    """Whether to prepare a statement: as the connection is set up, except `= ANY(array)`.

    A prepared (generic) plan checks a row against an `= ANY(...)` array one
    element at a time, so those run unprepared, as in the official prune. The
    rest (the scan, the one-statement delete, whose planning is most of its
    cost) follow the connection's `prepare_threshold`, as the saver's own
    statements do (None there, for PgBouncer, prepares nothing).
    """
    return False if "= ANY(" in sql else None


def _tuples(rows: Iterable[Any]) -> list[tuple[Any, ...]]:
    # The saver's cursors return dict rows; the programs index by position
    # (every computed column is aliased, so no two keys of a row collide).
    return [tuple(r.values()) if isinstance(r, dict) else tuple(r) for r in rows]


class PostgresBackend(SqlBackend):
    """`PostgresSaver`: its connection or pool through its own `_cursor()` (and lock)."""

    kind = "postgres"
    inner: PostgresSaver

    def _programs(self) -> SqlPrograms:
        return PG_PROGRAMS

    def _exec(self, program: Statements[T], write: bool, atomic: bool = False) -> T:
        inner: Any = self.inner
        with inner._cursor() as cur:

            def execute(sql: str, params: Any) -> Result:
                cur.execute(sql, params, prepare=_prepare(sql))
                return ([] if sql in PG_NO_RESULT else _tuples(cur.fetchall())), -1

            conn = cur.connection
            # In pipeline mode statements would wait for the next sync to commit:
            # they take the transaction path, which syncs first, as the official prune.
            if conn.autocommit and not atomic and not inner.pipe:
                return drive(program, execute)
            if inner.pipe:
                # As the official prune: a transaction in pipeline mode would
                # take in what ran since the last sync.
                inner.pipe.sync()
            with conn.transaction():
                return drive(program, execute)


class AsyncPostgresBackend(AsyncSqlBackend):
    """`AsyncPostgresSaver`: its connection or pool through its own `_cursor()` (and lock)."""

    kind = "postgres"
    inner: AsyncPostgresSaver

    def _programs(self) -> SqlPrograms:
        return PG_PROGRAMS

    async def _aexec(self, program: Statements[T], write: bool, atomic: bool = False) -> T:
        inner: Any = self.inner
        async with inner._cursor() as cur:

            async def execute(sql: str, params: Any) -> Result:
                await cur.execute(sql, params, prepare=_prepare(sql))
                return ([] if sql in PG_NO_RESULT else _tuples(await cur.fetchall())), -1

            conn = cur.connection
            if conn.autocommit and not atomic and not inner.pipe:
                return await adrive(program, execute)
            if inner.pipe:
                await inner.pipe.sync()
            async with conn.transaction():
                return await adrive(program, execute)


def backend_of(inner: BaseCheckpointSaver[Any]) -> Backend | None:
    """The backend of a Postgres saver (or subclass, not a shallow one); None for another."""
    if isinstance(inner, AsyncPostgresSaver):
        return AsyncPostgresBackend(inner)
    if isinstance(inner, PostgresSaver):
        return PostgresBackend(inner)
    return None
