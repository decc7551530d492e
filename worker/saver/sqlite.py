"""`SqliteSaver` and `AsyncSqliteSaver`'s backend: the wrapper's SQLite programs and drivers.

Every statement comes from `worker.stores.sqlite_sql`, which holds the
engine's and the wrapper's side by side: deletions are the worker's own, so a
checkpoint goes with its writes and orphaned parents the same way whoever
deletes it; the reads and whole-thread statements are the wrapper's, each
beside its engine counterpart with why it differs. The engine module
(`worker.stores.sqlite`) is not imported.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

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
    needs_blobs,
    scanned_of,
)
from worker.saver.operations import Scanned, ThreadChanged, ThreadStamp
from worker.stores.engine import HOLDS_TABLE, Counts
from worker.stores.sqlite_sql import (
    CREATE_HOLDS_TABLE_SQL,
    DELETE_CHECKPOINTS_SQL,
    DELETE_HOLD_SQL,
    DELETE_WRITES_SQL,
    EXPIRE_CHECKPOINTS_SQL,
    EXPIRE_WRITES_SQL,
    HOLDS_TABLE_EXISTS_SQL,
    INSERT_HOLD_SQL,
    NULL_PARENTS_SQL,
    SQLITE_DELETE_THREADS_SQL,
    SQLITE_FIRST_THREAD_PAGE_SQL,
    SQLITE_HELD_SQL,
    SQLITE_RUN_THREADS_SQL,
    SQLITE_SCAN_SQL,
    SQLITE_STAMP_SQL,
    SQLITE_THREAD_PAGE_SQL,
    THREAD_BLOBS_SQL,
)
from worker.stores.timestamps import iso_utc

T = TypeVar("T")

# These programs mirror `worker.saver.postgres`'s one for one on purpose: the same
# operations over another driver's SQL, parameters and results (json_each against
# arrays, rowcounts against RETURNING rows). One shared program would hide those
# differences behind flags.


def sqlite_scan(thread_id: str, loads: Callable[[tuple[str, bytes]], Any]) -> Statements[Scanned]:
    """Rows without blobs; blobs decoded (with the saver's serde) only when needed.

    SQLite keeps pending sends inline in every format version, so no
    checkpoint reads its parent's writes (invariant 2 costs nothing here).
    """
    rows, _ = yield SQLITE_SCAN_SQL, (thread_id,)
    out = []
    for ns, cid, parent, meta_text in rows:
        meta = json_object(meta_text)
        out.append((summarize(ns, cid, parent, meta), meta))
    if needs_blobs(s for s, _ in out):
        blobs, _ = yield THREAD_BLOBS_SQL, (thread_id,)
        decoded: dict[tuple[str, str], dict[str, Any] | None] = {}
        for ns, cid, type_, blob in blobs:
            try:
                ck = loads((type_, blob)) if type_ is not None and blob is not None else None
            except Exception:
                # Unreadable: left undecoded, which only ever keeps rows.
                ck = None
            decoded[(ns, cid)] = ck if isinstance(ck, dict) else None
        filled = []
        for s, meta in out:
            ck = decoded.get((s.namespace, s.checkpoint_id))
            if ck is not None:
                s = replace(
                    s,
                    created_at=s.created_at or ts_seconds(ck.get("ts")),
                    inline_channels=frozenset(ck.get("channel_values") or ()),
                    versioned_channels=frozenset(ck.get("channel_versions") or ()),
                )
            filled.append((s, meta))
        out = filled
    return scanned_of(thread_id, out)


def sqlite_delete(thread_id: str, ids_by_ns: Mapping[str, Sequence[str]]) -> Statements[Counts]:
    """The worker's statements: writes by the decided ids, checkpoints, orphaned parents."""
    counts = Counts()
    for ns, ids in ids_by_ns.items():
        args = (thread_id, ns, json.dumps(list(ids)))
        _, n = yield DELETE_WRITES_SQL, args
        counts.writes += max(n, 0)
        _, n = yield DELETE_CHECKPOINTS_SQL, args
        counts.checkpoints += max(n, 0)
        yield NULL_PARENTS_SQL, args
    return counts


def sqlite_expire(thread_id: str, stamp: ThreadStamp) -> Statements[Counts]:
    """Under BEGIN IMMEDIATE nothing commits meanwhile: check once, then delete."""
    rows, _ = yield SQLITE_STAMP_SQL, (thread_id,)
    if (int(rows[0][0]), rows[0][1]) != stamp:
        raise ThreadChanged(thread_id)
    counts = Counts(threads=1)
    _, n = yield EXPIRE_WRITES_SQL, (thread_id,)
    counts.writes = max(n, 0)
    _, n = yield EXPIRE_CHECKPOINTS_SQL, (thread_id,)
    counts.checkpoints = max(n, 0)
    return counts


def sqlite_delete_threads(thread_ids: Sequence[str]) -> Statements[Counts]:
    """Every row of the threads."""
    ids = json.dumps(list(thread_ids))
    _, writes = yield SQLITE_DELETE_THREADS_SQL[0], (ids,)
    _, checkpoints = yield SQLITE_DELETE_THREADS_SQL[1], (ids,)
    return Counts(checkpoints=max(checkpoints, 0), writes=max(writes, 0))


def sqlite_threads_of_runs(run_ids: Sequence[str]) -> Statements[list[str]]:
    """Threads holding one of the runs' checkpoints."""
    rows, _ = yield SQLITE_RUN_THREADS_SQL, (json.dumps([str(r) for r in run_ids]),)
    return [r[0] for r in rows]


def sqlite_thread_page(after: str | None, limit: int) -> Statements[list[str]]:
    """One keyset page of thread ids (after None: the first)."""
    if after is None:
        rows, _ = yield SQLITE_FIRST_THREAD_PAGE_SQL, (limit,)
    else:
        rows, _ = yield SQLITE_THREAD_PAGE_SQL, (after, limit)
    return [r[0] for r in rows]


def sqlite_holds() -> Statements[frozenset[str]]:
    """Every held thread; none while the table does not exist (it is created by a hold)."""
    rows, _ = yield HOLDS_TABLE_EXISTS_SQL, (HOLDS_TABLE,)
    if not rows:
        return frozenset()
    rows, _ = yield SQLITE_HELD_SQL, ()
    return frozenset(r[0] for r in rows)


def sqlite_hold(thread_id: str, reason: str | None, held_by: str | None) -> Statements[bool]:
    """Create the table on first use and hold the thread, under the write lock."""
    yield CREATE_HOLDS_TABLE_SQL, ()
    _, n = yield INSERT_HOLD_SQL, (thread_id, reason, iso_utc(time.time()), held_by)
    return n > 0


def sqlite_release(thread_id: str) -> Statements[bool]:
    """Delete the thread's hold, if the table exists."""
    rows, _ = yield HOLDS_TABLE_EXISTS_SQL, (HOLDS_TABLE,)
    if not rows:
        return False
    _, n = yield DELETE_HOLD_SQL, (thread_id,)
    return n > 0


def _sqlite_programs(loads: Callable[[tuple[str, bytes]], Any]) -> SqlPrograms:
    return SqlPrograms(
        scan=lambda tid: sqlite_scan(tid, loads),
        delete=sqlite_delete,
        expire=sqlite_expire,
        delete_threads=sqlite_delete_threads,
        threads_of_runs=sqlite_threads_of_runs,
        thread_page=sqlite_thread_page,
        holds=sqlite_holds,
        hold=sqlite_hold,
        release=sqlite_release,
    )


def _sqlite_run(
    conn: sqlite3.Connection, program: Statements[T], write: bool, atomic: bool = False
) -> T:
    """Run a program on a sqlite3 connection; a writing one in one BEGIN IMMEDIATE transaction."""
    cur = conn.cursor()
    began = False
    try:
        if write and not conn.in_transaction:
            # IMMEDIATE: take the write lock before reading what to delete, so
            # the re-checks see the last committed state.
            cur.execute("BEGIN IMMEDIATE")
            began = True

        def execute(sql: str, params: Any) -> Result:
            cur.execute(sql, params)
            return cur.fetchall(), cur.rowcount

        result = drive(program, execute)
        if write:
            conn.commit()
        return result
    except BaseException:
        if began and conn.in_transaction:
            conn.rollback()
        raise
    finally:
        cur.close()


class SqliteBackend(SqlBackend):
    """`SqliteSaver`: its sqlite3 connection, under its `threading.Lock`."""

    kind = "sqlite"
    inner: SqliteSaver

    def _programs(self) -> SqlPrograms:
        return _sqlite_programs(self.inner.serde.loads_typed)

    def _exec(self, program: Statements[T], write: bool, atomic: bool = False) -> T:
        inner = self.inner
        with inner.lock:
            inner.setup()  # what the saver's own cursor() does first
            return _sqlite_run(inner.conn, program, write)


class AsyncSqliteBackend(AsyncSqlBackend):
    """`AsyncSqliteSaver`: its aiosqlite connection, under its `asyncio.Lock`."""

    kind = "sqlite"
    inner: AsyncSqliteSaver

    def _programs(self) -> SqlPrograms:
        return _sqlite_programs(self.inner.serde.loads_typed)

    async def _aexec(self, program: Statements[T], write: bool, atomic: bool = False) -> T:
        inner = self.inner
        # setup() takes the saver's lock itself: call it before taking it.
        await inner.setup()
        async with inner.lock:
            # Any: aiosqlite's private `_execute` / `_conn` are probed below.
            conn: Any = inner.conn
            run_in_thread = getattr(conn, "_execute", None)
            if callable(run_in_thread) and isinstance(getattr(type(conn), "_conn", None), property):
                # One hop to aiosqlite's connection thread for the whole
                # operation instead of one per statement: a trim's round trips
                # are most of its cost on the application's write path.
                result: T = await run_in_thread(lambda: _sqlite_run(conn._conn, program, write))
                return result
            return await self._statement_by_statement(conn, program, write)

    @staticmethod
    async def _statement_by_statement(
        conn: Any, program: Statements[T], write: bool, atomic: bool = False
    ) -> T:
        # Through aiosqlite's public API, for versions without `_execute`.
        began = False
        try:
            if write and not conn.in_transaction:
                await conn.execute("BEGIN IMMEDIATE")
                began = True

            async def execute(sql: str, params: Any) -> Result:
                async with conn.execute(sql, params) as cur:
                    rows = await cur.fetchall()
                    return [tuple(r) for r in rows], cur.rowcount

            result = await adrive(program, execute)
            if write:
                await conn.commit()
            return result
        except BaseException:
            if began and conn.in_transaction:
                await conn.rollback()
            raise


def backend_of(inner: BaseCheckpointSaver[Any]) -> Backend | None:
    """The backend of a SQLite saver (or subclass); None for another saver."""
    if isinstance(inner, AsyncSqliteSaver):
        return AsyncSqliteBackend(inner)
    if isinstance(inner, SqliteSaver):
        return SqliteBackend(inner)
    return None
