"""`PostgresSaver` and `AsyncPostgresSaver`'s backend: the wrapper's Postgres statements.

Imported only when a Postgres saver is wrapped (it needs the
`checkpoint-janitor[postgres]` extra). The statements run through psycopg on
the saver's own connection; the holds statements are the worker's own
(`worker.stores.postgres`), so a hold placed here orders against the worker's
batches as the CLI's does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.serde.types import TASKS

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
from worker.stores import postgres as pg_store
from worker.stores.engine import HOLDS_TABLE, Counts
from worker.stores.postgres import CHANNEL_KEYS_TEMPLATE

T = TypeVar("T")

# psycopg (`%s`), not asyncpg: these run on the saver's own connection.
# Metadata only, not the checkpoint JSONB (reading `v` or `ts` would detoast
# every row): the format version matters only for a checkpoint whose parent
# holds `__pregel_tasks` writes (v < 4 reads its pending sends there), so it is
# read just for those, as the official prune's heads query does. The per-row
# probes (primary-key prefix lookups) run only when the thread has such a
# write at all (`s.sends`, evaluated once; CASE guarantees the order), which
# threads without `Send` never do.
PG_SCAN_SQL = f"""
SELECT c.checkpoint_ns, c.checkpoint_id, c.parent_checkpoint_id, c.metadata,
       CASE WHEN s.sends AND EXISTS (
           SELECT 1 FROM checkpoint_writes w
           WHERE w.thread_id = c.thread_id AND w.checkpoint_ns = c.checkpoint_ns
             AND w.checkpoint_id = c.parent_checkpoint_id AND w.channel = '{TASKS}'
       ) THEN COALESCE((c.checkpoint ->> 'v')::int, 4) END AS v,
       CASE WHEN s.sends THEN EXISTS (
           SELECT 1 FROM checkpoint_writes w
           WHERE w.thread_id = c.thread_id AND w.checkpoint_ns = c.checkpoint_ns
             AND w.checkpoint_id = c.checkpoint_id AND w.channel = '{TASKS}'
       ) ELSE false END AS has_sends
FROM checkpoints c,
     (SELECT EXISTS (
         SELECT 1 FROM checkpoint_writes WHERE thread_id = %(thread)s AND channel = '{TASKS}'
     ) AS sends) s
WHERE c.thread_id = %(thread)s
"""
# The `ts` of checkpoints whose id carries no time (not UUIDv6): rare, so apart.
PG_TS_SQL = """
SELECT checkpoint_ns, checkpoint_id, checkpoint ->> 'ts' AS ts FROM checkpoints
WHERE thread_id = %s AND checkpoint_id = ANY(%s)
"""
# The worker's statement with psycopg's placeholder: one rule for what
# counts as a channel with a value. Delta threads only.
PG_CHANNEL_KEYS_SQL = CHANNEL_KEYS_TEMPLATE.replace("{thread}", "%s")
# One statement deletes the decided checkpoints of a thread (any namespaces)
# with everything that goes with them, so it is atomic without a transaction
# block and costs one round trip on the application's write path:
# - writes by the ids of the checkpoints deleted, never by "no checkpoint has
#   this id" (a run may save a superstep's writes before their checkpoint);
# - kept checkpoints whose parent went get none (as the official prune);
# - blob versions the deleted checkpoints referenced and no other checkpoint
#   of their namespace does (`kept` reads the statement's snapshot less the
#   deleted ids), at once, as the official prune does. The window left is
#   wider than this statement: a fork (`update_state`) that read a deleted
#   checkpoint before it and saves after it names blob versions this freed
#   (`aput` rewrites only changed channels) and reads back without them. The
#   worker closes it by dating deletions (`postgres_store`, "Blobs are the
#   hard part"); here the trim runs inside the application, typically on the
#   thread's own write path, and keeping freed blobs would need that table and
#   a later sweep, so the window is documented (README, RetentionSaver).
# Different from the engine on purpose: its counterpart, the sweep's trim
# (`postgres_store.TRIM_WRITES_SQL` / `TRIM_CHECKPOINTS_SQL`), deletes no blob;
# `postgres_store.DELETE_GARBAGE_BLOBS_SQL` collects them later, on threads
# quiet for the grace period and not deleted from within it.
# The UPDATE and the DELETE touch disjoint rows of `checkpoints`.
PG_DELETE_SQL = """
WITH d AS (
    SELECT * FROM unnest(%(ns)s::text[], %(ids)s::text[]) AS d(checkpoint_ns, checkpoint_id)
), gone AS (
    DELETE FROM checkpoints c USING d
    WHERE c.thread_id = %(thread)s
      AND c.checkpoint_ns = d.checkpoint_ns AND c.checkpoint_id = d.checkpoint_id
    RETURNING c.checkpoint_ns, c.checkpoint -> 'channel_versions' AS versions
), writes AS (
    DELETE FROM checkpoint_writes w USING d
    WHERE w.thread_id = %(thread)s
      AND w.checkpoint_ns = d.checkpoint_ns AND w.checkpoint_id = d.checkpoint_id
    RETURNING 1
), parents AS (
    UPDATE checkpoints c SET parent_checkpoint_id = NULL
    WHERE c.thread_id = %(thread)s
      AND (c.checkpoint_ns, c.parent_checkpoint_id) IN (SELECT * FROM d)
      AND (c.checkpoint_ns, c.checkpoint_id) NOT IN (SELECT * FROM d)
    RETURNING 1
), freed AS (
    SELECT gone.checkpoint_ns, v.key AS channel, v.value AS version
    FROM gone CROSS JOIN LATERAL jsonb_each_text(gone.versions) AS v
), kept AS (
    SELECT c.checkpoint_ns, v.key AS channel, v.value AS version
    FROM checkpoints c
    CROSS JOIN LATERAL jsonb_each_text(c.checkpoint -> 'channel_versions') AS v
    WHERE c.thread_id = %(thread)s
      AND c.checkpoint_ns IN (SELECT checkpoint_ns FROM d)
      AND (c.checkpoint_ns, c.checkpoint_id) NOT IN (SELECT * FROM d)
), blobs AS (
    DELETE FROM checkpoint_blobs b
    USING (SELECT * FROM freed EXCEPT SELECT * FROM kept) g
    WHERE b.thread_id = %(thread)s AND b.checkpoint_ns = g.checkpoint_ns
      AND b.channel = g.channel AND b.version = g.version
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS checkpoints, (SELECT count(*) FROM writes) AS writes,
       (SELECT count(*) FROM blobs) AS blobs
"""
PG_STAMP_SQL = (
    "SELECT count(*) AS n, max(checkpoint_id) AS newest FROM checkpoints WHERE thread_id = %s"
)
# Whole-thread deletes, in the official prune's order (checkpoints, blobs,
# writes). Every Postgres statement here returns rows, counts included: in
# pipeline mode a statement's results (and rowcount) exist only once fetched.
PG_DELETE_THREADS_SQL = tuple(
    f"WITH gone AS (DELETE FROM {table} WHERE thread_id = ANY(%s) RETURNING 1) "
    "SELECT count(*) AS n FROM gone"
    for table in ("checkpoints", "checkpoint_blobs", "checkpoint_writes")
)
# `metadata ->> 'run_id'` has no index: one pass over the table, then per thread.
PG_RUN_THREADS_SQL = (
    "SELECT DISTINCT thread_id FROM checkpoints WHERE metadata ->> 'run_id' = ANY(%s)"
)
# Ordered and compared by the database alike (in the column's collation, so
# the primary key serves it); the first page has no lower bound, for the empty id.
# Only `checkpoints`, unlike the engine's walk (`postgres_store.WALK_SQL`, which
# unions `checkpoint_writes` and the expired-threads table): its one caller,
# `delete_checkpoints(before=...)`, deletes checkpoints, so a thread holding
# only orphaned writes or expired blobs has nothing for it; those are the sweep's.
PG_FIRST_THREAD_PAGE_SQL = """
SELECT DISTINCT thread_id FROM checkpoints ORDER BY thread_id LIMIT %s
"""
PG_THREAD_PAGE_SQL = """
SELECT DISTINCT thread_id FROM checkpoints WHERE thread_id > %s ORDER BY thread_id LIMIT %s
"""


def _psycopg(sql: str) -> str:
    """An asyncpg statement (`$1`, `$2` in order, each once) with psycopg's `%s`."""
    return re.sub(r"\$\d+", "%s", sql)


# The worker's holds statements, lock included, so a hold placed through the
# wrapper orders against the worker's batches exactly as the CLI's does.
PG_HOLDS_TABLE_EXISTS_SQL = pg_store.HOLDS_TABLE_EXISTS_SQL
PG_HELD_SQL = f"SELECT thread_id FROM {HOLDS_TABLE}"
PG_HOLDS_LOCK_SQL = pg_store.HOLDS_LOCK_SQL
PG_CREATE_HOLDS_TABLE_SQL = pg_store.CREATE_HOLDS_TABLE_SQL
PG_INSERT_HOLD_SQL = _psycopg(pg_store.INSERT_HOLD_SQL)
PG_DELETE_HOLD_SQL = _psycopg(pg_store.DELETE_HOLD_SQL)
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
