"""Storage access for `worker.saver.wrapper.RetentionSaver`: read a thread's shape, delete by id.

`RetentionSaver` decides with `policies.decide` (the worker's rules); what it
needs from the wrapped saver is the same few operations the worker's engines
have, done on the saver's own connection under the saver's own lock:

- `scan(thread_id)`: the thread's checkpoints as `CheckpointSummary`s (no
  blob decoded unless the thread uses a `DeltaChannel` or an id carries no
  time), with each checkpoint's `run_id`;
- `delete(thread_id, {namespace: ids})`: those checkpoints with their writes,
  parents of kept checkpoints nulled, and (Postgres, memory) the blob versions
  only they referenced, at once (unlike the worker's sweep, which dates the
  deletion and collects them `grace_period` later: a fork that read a deleted
  checkpoint and saves after this loses those channels; see `PG_DELETE_SQL`);
- `trim(thread_id, choose)`: `scan`, the caller's decision, `delete`, as one
  transaction under one hold of the lock (the write path's only operation);
- `expire(thread_id, fingerprint)`: the whole thread, in one transaction that
  first checks the thread is still as scanned, so a run that saved since the
  decision wins and nothing is half deleted;
- `delete_threads`, `threads_of_runs`, `thread_page`, `waiting`;
- `holds()`, `hold(...)`, `release(...)`: the legal holds kept in the store
  itself, in the worker's own table (for `InMemorySaver`, beside its dicts).

One backend per saver family: `InMemorySaver` (its dicts), `SqliteSaver`
(sqlite3) and `AsyncSqliteSaver` (aiosqlite), `PostgresSaver` and
`AsyncPostgresSaver` (psycopg). The SQL of an operation is written once, as a
generator of statements (as the official Postgres `prune` does), and run by a
sync or an async driver: for aiosqlite the whole operation runs in one hop on
the connection's own thread; on Postgres a trim is two statements (a
metadata-only scan, one data-modifying delete). A backend of a sync saver has no async operations
(`NotImplementedError`, like the saver's own `aget_tuple`); one of an async
saver runs its sync operations on the saver's event loop from another thread,
as the saver's own sync methods do.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.types import TASKS

from policies.decide import is_delta_thread, root_head
from policies.model import CheckpointSummary, ThreadView
from policies.summary import json_object, summarize, ts_seconds
from policies.waiting import is_waiting
from worker import postgres_store as pg_store
from worker.engine import HOLDS_TABLE, Counts
from worker.logs import iso_utc
from worker.postgres_store import CHANNEL_KEYS_TEMPLATE
from worker.sqlite_store import (
    CREATE_HOLDS_TABLE_SQL,
    DELETE_CHECKPOINTS_SQL,
    DELETE_HOLD_SQL,
    DELETE_WRITES_SQL,
    EXPIRE_CHECKPOINTS_SQL,
    EXPIRE_WRITES_SQL,
    HOLDS_TABLE_EXISTS_SQL,
    INSERT_HOLD_SQL,
    NULL_PARENTS_SQL,
    THREAD_BLOBS_SQL,
)

T = TypeVar("T")

Fingerprint = tuple[int, str | None]
"""(checkpoints in the thread, newest checkpoint id): any save since a scan changes it."""


@dataclass(frozen=True, slots=True)
class Scanned:
    """One thread as the decision sees it, with what explicit deletions select by."""

    view: ThreadView
    run_ids: Mapping[tuple[str, str], str] = field(default_factory=dict)
    """(namespace, checkpoint id) -> `metadata.run_id`, where the caller recorded one."""

    @property
    def fingerprint(self) -> Fingerprint:
        """What `expire` re-checks before deleting the thread."""
        cps = self.view.checkpoints
        return len(cps), max((c.checkpoint_id for c in cps), default=None)


Choose = Callable[[Scanned], Mapping[str, Sequence[str]]]
"""What a trim deletes from a scanned thread, {namespace: ids} (the decision, run in between)."""


class Changed(Exception):
    """The thread changed between the decision and the delete: roll back, keep it."""


# ------------------------------------------------------------------ shared pieces


def _scanned(
    thread_id: str,
    rows: Sequence[tuple[CheckpointSummary, Mapping[str, Any]]],
) -> Scanned:
    summaries = tuple(s for s, _ in rows)
    head = root_head(summaries)
    meta: Mapping[str, Any] = {}
    if head is not None:
        meta = next(
            m
            for s, m in rows
            if s.checkpoint_id == head.checkpoint_id and s.namespace == head.namespace
        )
    run_ids = {
        (s.namespace, s.checkpoint_id): str(m["run_id"])
        for s, m in rows
        if m.get("run_id") is not None
    }
    return Scanned(ThreadView(thread_id, summaries, head_metadata=dict(meta)), run_ids)


def _needs_blobs(summaries: Iterable[CheckpointSummary]) -> bool:
    cps = list(summaries)
    return is_delta_thread(cps) or any(c.created_at is None for c in cps)


def _head_config(thread_id: str, head: CheckpointSummary) -> dict[str, Any]:
    return {
        "configurable": {
            "thread_id": thread_id,
            "checkpoint_ns": head.namespace,
            "checkpoint_id": head.checkpoint_id,
        }
    }


def _waiting_of(tup: Any) -> bool | None:
    if tup is None:
        return None
    return is_waiting(tup.checkpoint, [w[1] for w in tup.pending_writes or ()])


# ------------------------------------------------------------------ the interface


class Backend:
    """Operations on one wrapped saver's storage. Every method may raise; callers decide.

    The base class answers `waiting` through the saver's own `get_tuple`, and
    raises `NotImplementedError` for the rest (a saver it does not know).
    """

    kind = "unsupported"

    def __init__(self, inner: BaseCheckpointSaver[Any]) -> None:
        self.inner = inner

    def _unsupported(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"RetentionSaver cannot {what} on {type(self.inner).__name__}: it knows "
            "InMemorySaver, SqliteSaver, AsyncSqliteSaver, PostgresSaver and AsyncPostgresSaver"
        )

    # -------------------------------------------------------------- sync

    def scan(self, thread_id: str) -> Scanned:
        """The thread's checkpoints (delta threads with their channel keys)."""
        raise self._unsupported("read a thread's checkpoints")

    def delete(self, thread_id: str, ids_by_ns: Mapping[str, Sequence[str]]) -> Counts:
        """Delete these checkpoints with their writes; null orphaned parents; collect blobs."""
        raise self._unsupported("delete checkpoints")

    def trim(self, thread_id: str, choose: Choose) -> Counts:
        """Scan the thread, `choose` what goes, delete it: one transaction, one lock hold."""
        raise self._unsupported("trim threads")

    def expire(self, thread_id: str, fingerprint: Fingerprint) -> Counts | None:
        """Delete the whole thread if it is still as scanned; None if it changed."""
        raise self._unsupported("expire threads")

    def delete_threads(self, thread_ids: Sequence[str]) -> Counts:
        """Delete every row of these threads in one transaction."""
        raise self._unsupported("delete threads")

    def threads_of_runs(self, run_ids: Sequence[str]) -> list[str]:
        """Threads holding a checkpoint whose `metadata.run_id` is one of `run_ids`."""
        raise self._unsupported("find runs")

    def thread_page(self, after: str | None, limit: int) -> list[str]:
        """Up to `limit` thread ids after `after` (None: from the first), in the store's order.

        Keyset pagination: the store orders and compares ids alike, and the
        first page has no lower bound, so the empty id is listed too.
        """
        raise self._unsupported("list threads")

    def holds(self) -> frozenset[str]:
        """The threads under a legal hold (none while the holds table does not exist)."""
        raise self._unsupported("read legal holds")

    def hold(self, thread_id: str, reason: str | None, held_by: str | None) -> bool:
        """Hold the thread; False if it was held already."""
        raise self._unsupported("hold threads")

    def release(self, thread_id: str) -> bool:
        """Lift the thread's hold; False if it had none."""
        raise self._unsupported("release threads")

    def waiting(self, view: ThreadView) -> bool | None:
        """Whether the thread waits for input at its newest root checkpoint; None: unknown."""
        head = root_head(view.checkpoints)
        if head is None:
            return False
        return _waiting_of(self.inner.get_tuple(_head_config(view.thread_id, head)))  # type: ignore[arg-type]

    # -------------------------------------------------------------- async

    async def ascan(self, thread_id: str) -> Scanned:
        """Async `scan`."""
        raise self._unsupported("read a thread's checkpoints")

    async def adelete(self, thread_id: str, ids_by_ns: Mapping[str, Sequence[str]]) -> Counts:
        """Async `delete`."""
        raise self._unsupported("delete checkpoints")

    async def atrim(self, thread_id: str, choose: Choose) -> Counts:
        """Async `trim`."""
        raise self._unsupported("trim threads")

    async def aexpire(self, thread_id: str, fingerprint: Fingerprint) -> Counts | None:
        """Async `expire`."""
        raise self._unsupported("expire threads")

    async def adelete_threads(self, thread_ids: Sequence[str]) -> Counts:
        """Async `delete_threads`."""
        raise self._unsupported("delete threads")

    async def athreads_of_runs(self, run_ids: Sequence[str]) -> list[str]:
        """Async `threads_of_runs`."""
        raise self._unsupported("find runs")

    async def athread_page(self, after: str | None, limit: int) -> list[str]:
        """Async `thread_page`."""
        raise self._unsupported("list threads")

    async def aholds(self) -> frozenset[str]:
        """Async `holds`."""
        raise self._unsupported("read legal holds")

    async def ahold(self, thread_id: str, reason: str | None, held_by: str | None) -> bool:
        """Async `hold`."""
        raise self._unsupported("hold threads")

    async def arelease(self, thread_id: str) -> bool:
        """Async `release`."""
        raise self._unsupported("release threads")

    async def awaiting(self, view: ThreadView) -> bool | None:
        """Async `waiting`."""
        head = root_head(view.checkpoints)
        if head is None:
            return False
        return _waiting_of(await self.inner.aget_tuple(_head_config(view.thread_id, head)))  # type: ignore[arg-type]


# ------------------------------------------------------------------ InMemorySaver


MEMORY_HOLDS_ATTRIBUTE = "_checkpoint_janitor_holds"
"""Where an `InMemorySaver` keeps its legal holds: thread -> (reason, held at, held by)."""


class MemoryBackend(Backend):
    """`InMemorySaver`'s dicts: `storage[thread][ns][id]`, `writes[(t, ns, id)]`, `blobs`.

    Blobs are keyed (thread, ns, channel, version) and shared by every
    checkpoint whose `channel_versions` names that version, as on Postgres.
    Everything is synchronous dict work; the async operations run it inline.
    """

    kind = "memory"
    inner: InMemorySaver

    def _versions(self, entry: tuple[Any, Any, Any]) -> set[tuple[str, Any]]:
        ck = self.inner.serde.loads_typed(entry[0])
        return {(ch, v) for ch, v in (ck.get("channel_versions") or {}).items()}

    def scan(self, thread_id: str) -> Scanned:
        """The thread's checkpoints, metadata decoded; checkpoints only where needed."""
        inner = self.inner
        rows: list[tuple[CheckpointSummary, Mapping[str, Any]]] = []
        raw: dict[tuple[str, str], Any] = {}
        for ns, cps in list(inner.storage.get(thread_id, {}).items()):
            for cid, entry in list(cps.items()):
                meta = inner.serde.loads_typed(entry[1])
                rows.append((summarize(ns, cid, entry[2], meta), meta))
                raw[(ns, cid)] = entry[0]
        if _needs_blobs(s for s, _ in rows):
            filled = []
            for s, meta in rows:
                ck = inner.serde.loads_typed(raw[(s.namespace, s.checkpoint_id)])
                versions = ck.get("channel_versions") or {}
                present = frozenset(
                    ch
                    for ch, v in versions.items()
                    if inner.blobs.get((thread_id, s.namespace, ch, v), ("empty", b""))[0]
                    != "empty"
                )
                s = replace(
                    s,
                    created_at=s.created_at or ts_seconds(ck.get("ts")),
                    inline_channels=present,
                    versioned_channels=frozenset(versions),
                )
                filled.append((s, meta))
            rows = filled
        return _scanned(thread_id, rows)

    def delete(self, thread_id: str, ids_by_ns: Mapping[str, Sequence[str]]) -> Counts:
        """Pop the checkpoints and their writes; drop blob versions nothing left references."""
        inner = self.inner
        counts = Counts()
        threads = inner.storage.get(thread_id)
        if threads is None:
            return counts
        for ns, ids in ids_by_ns.items():
            cps = threads.get(ns)
            if not cps:
                continue
            gone: set[str] = set()
            freed: set[tuple[str, Any]] = set()
            for cid in ids:
                entry = cps.pop(cid, None)
                if entry is None:
                    continue
                gone.add(cid)
                counts.checkpoints += 1
                freed |= self._versions(entry)
                counts.writes += len(inner.writes.pop((thread_id, ns, cid), {}))
            for cid, (ck, md, parent) in list(cps.items()):
                if parent in gone:
                    cps[cid] = (ck, md, None)
            if freed:
                referenced: set[tuple[str, Any]] = set()
                for entry in cps.values():
                    referenced |= self._versions(entry)
                for ch, v in freed - referenced:
                    if inner.blobs.pop((thread_id, ns, ch, v), None) is not None:
                        counts.blobs += 1
            if not cps:
                del threads[ns]
        if not threads:
            del inner.storage[thread_id]
        return counts

    def trim(self, thread_id: str, choose: Choose) -> Counts:
        """Scan, choose, delete (no other thread can interleave with dict work)."""
        ids = choose(self.scan(thread_id))
        return self.delete(thread_id, ids) if ids else Counts()

    def _fingerprint(self, thread_id: str) -> Fingerprint:
        ids = [cid for cps in self.inner.storage.get(thread_id, {}).values() for cid in cps]
        return len(ids), max(ids, default=None)

    def _drop(self, thread_id: str) -> Counts:
        inner = self.inner
        counts = Counts(threads=1)
        counts.checkpoints = sum(len(c) for c in inner.storage.get(thread_id, {}).values())
        counts.writes = sum(len(w) for k, w in inner.writes.items() if k[0] == thread_id)
        counts.blobs = sum(1 for k in inner.blobs if k[0] == thread_id)
        inner.delete_thread(thread_id)
        return counts

    def expire(self, thread_id: str, fingerprint: Fingerprint) -> Counts | None:
        """Delete the thread if no checkpoint came or went since the scan."""
        if self._fingerprint(thread_id) != fingerprint:
            return None
        return self._drop(thread_id)

    def delete_threads(self, thread_ids: Sequence[str]) -> Counts:
        """Delete every row of the threads."""
        counts = Counts()
        for tid in thread_ids:
            if tid in self.inner.storage or any(k[0] == tid for k in self.inner.writes):
                counts.add(self._drop(tid))
        return counts

    def threads_of_runs(self, run_ids: Sequence[str]) -> list[str]:
        """Every checkpoint's metadata is decoded: memory has no index to ask."""
        wanted = set(run_ids)
        found = []
        for tid, namespaces in list(self.inner.storage.items()):
            if any(
                self.inner.serde.loads_typed(entry[1]).get("run_id") in wanted
                for cps in namespaces.values()
                for entry in cps.values()
            ):
                found.append(tid)
        return found

    def thread_page(self, after: str | None, limit: int) -> list[str]:
        """Thread ids after `after` (None: all), in Python's order, which it compares in."""
        return sorted(t for t in self.inner.storage if after is None or t > after)[:limit]

    @property
    def _holds(self) -> dict[str, tuple[str | None, float, str | None]]:
        # Kept on the saver itself, as the SQL stores keep them in their file or
        # database: every wrapper (and clone) of this InMemorySaver sees them.
        found: dict[str, tuple[str | None, float, str | None]] = self.inner.__dict__.setdefault(
            MEMORY_HOLDS_ATTRIBUTE, {}
        )
        return found

    def holds(self) -> frozenset[str]:
        """The held threads."""
        return frozenset(self._holds)

    def hold(self, thread_id: str, reason: str | None, held_by: str | None) -> bool:
        """Hold the thread; a second hold keeps the first."""
        if thread_id in self._holds:
            return False
        self._holds[thread_id] = (reason, time.time(), held_by)
        return True

    def release(self, thread_id: str) -> bool:
        """Lift the thread's hold."""
        return self._holds.pop(thread_id, None) is not None

    async def aholds(self) -> frozenset[str]:
        """`holds`."""
        return self.holds()

    async def ahold(self, thread_id: str, reason: str | None, held_by: str | None) -> bool:
        """`hold`."""
        return self.hold(thread_id, reason, held_by)

    async def arelease(self, thread_id: str) -> bool:
        """`release`."""
        return self.release(thread_id)

    async def ascan(self, thread_id: str) -> Scanned:
        """`scan` (dict work needs no awaiting)."""
        return self.scan(thread_id)

    async def adelete(self, thread_id: str, ids_by_ns: Mapping[str, Sequence[str]]) -> Counts:
        """`delete`."""
        return self.delete(thread_id, ids_by_ns)

    async def atrim(self, thread_id: str, choose: Choose) -> Counts:
        """`trim`."""
        return self.trim(thread_id, choose)

    async def aexpire(self, thread_id: str, fingerprint: Fingerprint) -> Counts | None:
        """`expire`."""
        return self.expire(thread_id, fingerprint)

    async def adelete_threads(self, thread_ids: Sequence[str]) -> Counts:
        """`delete_threads`."""
        return self.delete_threads(thread_ids)

    async def athreads_of_runs(self, run_ids: Sequence[str]) -> list[str]:
        """`threads_of_runs`."""
        return self.threads_of_runs(run_ids)

    async def athread_page(self, after: str | None, limit: int) -> list[str]:
        """`thread_page`."""
        return self.thread_page(after, limit)


# ------------------------------------------------------------------ SQL programs

Result = tuple[list[tuple[Any, ...]], int]
"""What a driver sends back for a statement: its rows (as tuples) and its rowcount
(SQLite; -1 on Postgres, whose statements here all return their counts as rows)."""
Program = Generator[tuple[str, Sequence[Any] | Mapping[str, Any]], Result, T]
"""An operation as statements: yields (sql, params), receives the `Result`, returns a value."""


# SQLite keeps metadata as a JSON text blob; it is parsed in Python (one
# json.loads a row) rather than with json_extract per key, since the head's
# whole metadata is wanted anyway.
SQLITE_SCAN_SQL = """
SELECT checkpoint_ns, checkpoint_id, parent_checkpoint_id, CAST(metadata AS TEXT)
FROM checkpoints WHERE thread_id = ?
"""
# The re-check under the write lock: a checkpoint saved since the scan
# changes the count or the newest id.
SQLITE_FINGERPRINT_SQL = "SELECT COUNT(*), MAX(checkpoint_id) FROM checkpoints WHERE thread_id = ?"
# No index covers metadata: `delete_for_runs` reads every row once, then
# works thread by thread.
SQLITE_RUN_THREADS_SQL = """
SELECT DISTINCT thread_id FROM checkpoints
WHERE json_extract(CAST(metadata AS TEXT), '$.run_id') IN (SELECT value FROM json_each(?))
"""
# Keyset page over the primary key's leading column: never "load every id".
# The first page has no lower bound (a cursor of "" would skip the empty id).
SQLITE_FIRST_THREAD_PAGE_SQL = """
SELECT DISTINCT thread_id FROM checkpoints ORDER BY thread_id LIMIT ?
"""
SQLITE_THREAD_PAGE_SQL = """
SELECT DISTINCT thread_id FROM checkpoints WHERE thread_id > ? ORDER BY thread_id LIMIT ?
"""
SQLITE_DELETE_THREADS_SQL = (
    "DELETE FROM writes WHERE thread_id IN (SELECT value FROM json_each(?))",
    "DELETE FROM checkpoints WHERE thread_id IN (SELECT value FROM json_each(?))",
)


def sqlite_scan(thread_id: str, loads: Callable[[tuple[str, bytes]], Any]) -> Program[Scanned]:
    """Rows without blobs; blobs decoded (with the saver's serde) only when needed.

    SQLite keeps pending sends inline in every format version, so no
    checkpoint reads its parent's writes (invariant 2 costs nothing here).
    """
    rows, _ = yield SQLITE_SCAN_SQL, (thread_id,)
    out = []
    for ns, cid, parent, meta_text in rows:
        meta = json_object(meta_text)
        out.append((summarize(ns, cid, parent, meta), meta))
    if _needs_blobs(s for s, _ in out):
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
    return _scanned(thread_id, out)


def sqlite_delete(thread_id: str, ids_by_ns: Mapping[str, Sequence[str]]) -> Program[Counts]:
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


def sqlite_expire(thread_id: str, fingerprint: Fingerprint) -> Program[Counts]:
    """Under BEGIN IMMEDIATE nothing commits meanwhile: check once, then delete."""
    rows, _ = yield SQLITE_FINGERPRINT_SQL, (thread_id,)
    if (int(rows[0][0]), rows[0][1]) != fingerprint:
        raise Changed(thread_id)
    counts = Counts(threads=1)
    _, n = yield EXPIRE_WRITES_SQL, (thread_id,)
    counts.writes = max(n, 0)
    _, n = yield EXPIRE_CHECKPOINTS_SQL, (thread_id,)
    counts.checkpoints = max(n, 0)
    return counts


def sqlite_delete_threads(thread_ids: Sequence[str]) -> Program[Counts]:
    """Every row of the threads."""
    ids = json.dumps(list(thread_ids))
    _, writes = yield SQLITE_DELETE_THREADS_SQL[0], (ids,)
    _, checkpoints = yield SQLITE_DELETE_THREADS_SQL[1], (ids,)
    return Counts(checkpoints=max(checkpoints, 0), writes=max(writes, 0))


def sqlite_threads_of_runs(run_ids: Sequence[str]) -> Program[list[str]]:
    """Threads holding one of the runs' checkpoints."""
    rows, _ = yield SQLITE_RUN_THREADS_SQL, (json.dumps([str(r) for r in run_ids]),)
    return [r[0] for r in rows]


def sqlite_thread_page(after: str | None, limit: int) -> Program[list[str]]:
    """One keyset page of thread ids (after None: the first)."""
    if after is None:
        rows, _ = yield SQLITE_FIRST_THREAD_PAGE_SQL, (limit,)
    else:
        rows, _ = yield SQLITE_THREAD_PAGE_SQL, (after, limit)
    return [r[0] for r in rows]


# Legal holds: the worker's own table and statements (`worker.sqlite_store`).
SQLITE_HELD_SQL = f"SELECT thread_id FROM {HOLDS_TABLE}"


def sqlite_holds() -> Program[frozenset[str]]:
    """Every held thread; none while the table does not exist (it is created by a hold)."""
    rows, _ = yield HOLDS_TABLE_EXISTS_SQL, (HOLDS_TABLE,)
    if not rows:
        return frozenset()
    rows, _ = yield SQLITE_HELD_SQL, ()
    return frozenset(r[0] for r in rows)


def sqlite_hold(thread_id: str, reason: str | None, held_by: str | None) -> Program[bool]:
    """Create the table on first use and hold the thread, under the write lock."""
    yield CREATE_HOLDS_TABLE_SQL, ()
    _, n = yield INSERT_HOLD_SQL, (thread_id, reason, iso_utc(time.time()), held_by)
    return n > 0


def sqlite_release(thread_id: str) -> Program[bool]:
    """Delete the thread's hold, if the table exists."""
    rows, _ = yield HOLDS_TABLE_EXISTS_SQL, (HOLDS_TABLE,)
    if not rows:
        return False
    _, n = yield DELETE_HOLD_SQL, (thread_id,)
    return n > 0


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
PG_FINGERPRINT_SQL = (
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


def pg_holds() -> Program[frozenset[str]]:
    """Every held thread; none while the table does not exist."""
    rows, _ = yield PG_HOLDS_TABLE_EXISTS_SQL, ()
    if not rows[0][0]:
        return frozenset()
    rows, _ = yield PG_HELD_SQL, ()
    return frozenset(r[0] for r in rows)


def pg_hold(thread_id: str, reason: str | None, held_by: str | None) -> Program[bool]:
    """Under the holds lock (one transaction): create the table on first use, hold."""
    yield PG_HOLDS_LOCK_SQL, ()
    yield PG_CREATE_HOLDS_TABLE_SQL, ()
    rows, _ = yield PG_INSERT_HOLD_SQL, (thread_id, reason, held_by)
    return bool(rows)


def pg_release(thread_id: str) -> Program[bool]:
    """Delete the thread's hold, if the table exists."""
    rows, _ = yield PG_HOLDS_TABLE_EXISTS_SQL, ()
    if not rows[0][0]:
        return False
    rows, _ = yield PG_DELETE_HOLD_SQL, (thread_id,)
    return bool(rows)


def pg_scan(thread_id: str) -> Program[Scanned]:
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
    return _scanned(thread_id, out)


def pg_delete(thread_id: str, ids_by_ns: Mapping[str, Sequence[str]]) -> Program[Counts]:
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


def pg_expire(thread_id: str, fingerprint: Fingerprint) -> Program[Counts]:
    """READ COMMITTED: check before, delete, check after; a resume in between rolls it back.

    REPEATABLE READ could not do this: its snapshot would never see the
    resume. The window left is the moment between the last check and COMMIT.
    """
    rows, _ = yield PG_FINGERPRINT_SQL, (thread_id,)
    if (int(rows[0][0]), rows[0][1]) != fingerprint:
        raise Changed(thread_id)
    counts = yield from pg_delete_threads([thread_id])
    counts.threads = 1
    rows, _ = yield PG_FINGERPRINT_SQL, (thread_id,)
    if int(rows[0][0]) != 0:
        raise Changed(thread_id)
    return counts


def pg_delete_threads(thread_ids: Sequence[str]) -> Program[Counts]:
    """Every row of the threads."""
    ids = list(thread_ids)
    counts = []
    for sql in PG_DELETE_THREADS_SQL:
        rows, _ = yield sql, (ids,)
        counts.append(int(rows[0][0]))
    return Counts(checkpoints=counts[0], blobs=counts[1], writes=counts[2])


def pg_threads_of_runs(run_ids: Sequence[str]) -> Program[list[str]]:
    """Threads holding one of the runs' checkpoints."""
    rows, _ = yield PG_RUN_THREADS_SQL, ([str(r) for r in run_ids],)
    return [r[0] for r in rows]


def pg_thread_page(after: str | None, limit: int) -> Program[list[str]]:
    """One keyset page of thread ids (after None: the first)."""
    if after is None:
        rows, _ = yield PG_FIRST_THREAD_PAGE_SQL, (limit,)
    else:
        rows, _ = yield PG_THREAD_PAGE_SQL, (after, limit)
    return [r[0] for r in rows]


# ------------------------------------------------------------------ SQL backends


class _SqlBackend(Backend):
    """Operations as programs, run by `_exec` (sync) or `_aexec` (async)."""

    def _exec(self, program: Program[T], write: bool, atomic: bool = False) -> T:
        """Run a program; `write`: it deletes; `atomic`: its statements need one transaction.

        SQLite runs every deleting program in one BEGIN IMMEDIATE transaction.
        On Postgres each statement is atomic alone and a trim or delete is one
        statement, so only `atomic` programs (expiry's re-checks, whole-thread
        deletes) take a transaction block (and any program on a connection
        that is not in autocommit mode).
        """
        raise self._sync_unsupported()

    async def _aexec(self, program: Program[T], write: bool, atomic: bool = False) -> T:
        """Async `_exec`."""
        raise self._async_unsupported()

    def _sync_unsupported(self) -> NotImplementedError:
        return NotImplementedError(f"{type(self.inner).__name__} has no sync API")

    def _async_unsupported(self) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self.inner).__name__} is synchronous: use the sync methods "
            "(put, prune, delete_checkpoints...) of a RetentionSaver wrapping it"
        )

    def _programs(self) -> _Programs:
        raise NotImplementedError

    def scan(self, thread_id: str) -> Scanned:
        """See `Backend.scan`."""
        return self._exec(self._programs().scan(thread_id), write=False)

    def delete(self, thread_id: str, ids_by_ns: Mapping[str, Sequence[str]]) -> Counts:
        """See `Backend.delete`."""
        return self._exec(self._programs().delete(thread_id, ids_by_ns), write=True)

    def _trim(self, thread_id: str, choose: Choose) -> Program[Counts]:
        programs = self._programs()
        scanned = yield from programs.scan(thread_id)
        ids = choose(scanned)
        if not ids:
            return Counts()
        return (yield from programs.delete(thread_id, ids))

    def trim(self, thread_id: str, choose: Choose) -> Counts:
        """See `Backend.trim`."""
        return self._exec(self._trim(thread_id, choose), write=True)

    async def atrim(self, thread_id: str, choose: Choose) -> Counts:
        """See `Backend.trim`."""
        return await self._aexec(self._trim(thread_id, choose), write=True)

    def expire(self, thread_id: str, fingerprint: Fingerprint) -> Counts | None:
        """See `Backend.expire`."""
        try:
            return self._exec(
                self._programs().expire(thread_id, fingerprint), write=True, atomic=True
            )
        except Changed:
            return None

    def delete_threads(self, thread_ids: Sequence[str]) -> Counts:
        """See `Backend.delete_threads`."""
        return self._exec(self._programs().delete_threads(thread_ids), write=True, atomic=True)

    def threads_of_runs(self, run_ids: Sequence[str]) -> list[str]:
        """See `Backend.threads_of_runs`."""
        return self._exec(self._programs().threads_of_runs(run_ids), write=False)

    def thread_page(self, after: str | None, limit: int) -> list[str]:
        """See `Backend.thread_page`."""
        return self._exec(self._programs().thread_page(after, limit), write=False)

    async def ascan(self, thread_id: str) -> Scanned:
        """See `Backend.scan`."""
        return await self._aexec(self._programs().scan(thread_id), write=False)

    async def adelete(self, thread_id: str, ids_by_ns: Mapping[str, Sequence[str]]) -> Counts:
        """See `Backend.delete`."""
        return await self._aexec(self._programs().delete(thread_id, ids_by_ns), write=True)

    async def aexpire(self, thread_id: str, fingerprint: Fingerprint) -> Counts | None:
        """See `Backend.expire`."""
        try:
            return await self._aexec(
                self._programs().expire(thread_id, fingerprint), write=True, atomic=True
            )
        except Changed:
            return None

    async def adelete_threads(self, thread_ids: Sequence[str]) -> Counts:
        """See `Backend.delete_threads`."""
        return await self._aexec(
            self._programs().delete_threads(thread_ids), write=True, atomic=True
        )

    async def athreads_of_runs(self, run_ids: Sequence[str]) -> list[str]:
        """See `Backend.threads_of_runs`."""
        return await self._aexec(self._programs().threads_of_runs(run_ids), write=False)

    async def athread_page(self, after: str | None, limit: int) -> list[str]:
        """See `Backend.thread_page`."""
        return await self._aexec(self._programs().thread_page(after, limit), write=False)

    def holds(self) -> frozenset[str]:
        """See `Backend.holds`."""
        return self._exec(self._programs().holds(), write=False)

    def hold(self, thread_id: str, reason: str | None, held_by: str | None) -> bool:
        """See `Backend.hold`."""
        program = self._programs().hold(thread_id, reason, held_by)
        return self._exec(program, write=True, atomic=True)

    def release(self, thread_id: str) -> bool:
        """See `Backend.release`."""
        return self._exec(self._programs().release(thread_id), write=True, atomic=True)

    async def aholds(self) -> frozenset[str]:
        """See `Backend.holds`."""
        return await self._aexec(self._programs().holds(), write=False)

    async def ahold(self, thread_id: str, reason: str | None, held_by: str | None) -> bool:
        """See `Backend.hold`."""
        program = self._programs().hold(thread_id, reason, held_by)
        return await self._aexec(program, write=True, atomic=True)

    async def arelease(self, thread_id: str) -> bool:
        """See `Backend.release`."""
        return await self._aexec(self._programs().release(thread_id), write=True, atomic=True)


@dataclass(frozen=True, slots=True)
class _Programs:
    scan: Callable[[str], Program[Scanned]]
    delete: Callable[[str, Mapping[str, Sequence[str]]], Program[Counts]]
    expire: Callable[[str, Fingerprint], Program[Counts]]
    delete_threads: Callable[[Sequence[str]], Program[Counts]]
    threads_of_runs: Callable[[Sequence[str]], Program[list[str]]]
    thread_page: Callable[[str | None, int], Program[list[str]]]
    holds: Callable[[], Program[frozenset[str]]]
    hold: Callable[[str, str | None, str | None], Program[bool]]
    release: Callable[[str], Program[bool]]


def _sqlite_programs(loads: Callable[[tuple[str, bytes]], Any]) -> _Programs:
    return _Programs(
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


PG_PROGRAMS = _Programs(
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


def _drive(program: Program[T], execute: Callable[[str, Any], Result]) -> T:
    result: Result | None = None
    try:
        while True:
            sql, params = program.send(result)  # type: ignore[arg-type]
            result = execute(sql, params)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def _adrive(program: Program[T], execute: Callable[[str, Any], Awaitable[Result]]) -> T:
    result: Result | None = None
    try:
        while True:
            sql, params = program.send(result)  # type: ignore[arg-type]
            result = await execute(sql, params)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def _on_loop(loop: asyncio.AbstractEventLoop, name: str, make: Callable[[], Awaitable[T]]) -> T:
    """Run an async operation from a sync call, as the async savers' own sync methods do."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        # Blocking the loop on itself would deadlock: refuse, as the saver does.
        raise asyncio.InvalidStateError(
            f"Synchronous calls to RetentionSaver({name}) are only allowed from a different "
            "thread. From the main thread, use the async interface."
        )

    async def run() -> T:
        return await make()

    return asyncio.run_coroutine_threadsafe(run(), loop).result()


def _sqlite_run(
    conn: sqlite3.Connection, program: Program[T], write: bool, atomic: bool = False
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

        result = _drive(program, execute)
        if write:
            conn.commit()
        return result
    except BaseException:
        if began and conn.in_transaction:
            conn.rollback()
        raise
    finally:
        cur.close()


class SqliteBackend(_SqlBackend):
    """`SqliteSaver`: its sqlite3 connection, under its `threading.Lock`."""

    kind = "sqlite"

    def _programs(self) -> _Programs:
        return _sqlite_programs(self.inner.serde.loads_typed)

    def _exec(self, program: Program[T], write: bool, atomic: bool = False) -> T:
        inner: Any = self.inner
        with inner.lock:
            inner.setup()  # what the saver's own cursor() does first
            return _sqlite_run(inner.conn, program, write)


class AsyncSqliteBackend(_SqlBackend):
    """`AsyncSqliteSaver`: its aiosqlite connection, under its `asyncio.Lock`."""

    kind = "sqlite"

    def _programs(self) -> _Programs:
        return _sqlite_programs(self.inner.serde.loads_typed)

    async def _aexec(self, program: Program[T], write: bool, atomic: bool = False) -> T:
        inner: Any = self.inner
        # setup() takes the saver's lock itself: call it before taking it.
        await inner.setup()
        async with inner.lock:
            conn = inner.conn
            run_in_thread = getattr(conn, "_execute", None)
            if callable(run_in_thread) and isinstance(getattr(type(conn), "_conn", None), property):
                # One hop to aiosqlite's connection thread for the whole
                # operation instead of one per statement: a trim's round trips
                # are most of its cost on the application's write path.
                return await run_in_thread(lambda: _sqlite_run(conn._conn, program, write))  # type: ignore[no-any-return]
            return await self._statement_by_statement(conn, program, write)

    @staticmethod
    async def _statement_by_statement(
        conn: Any, program: Program[T], write: bool, atomic: bool = False
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

            result = await _adrive(program, execute)
            if write:
                await conn.commit()
            return result
        except BaseException:
            if began and conn.in_transaction:
                await conn.rollback()
            raise

    def _exec(self, program: Program[T], write: bool, atomic: bool = False) -> T:
        return _on_loop(
            self.inner.loop,  # type: ignore[attr-defined]
            type(self.inner).__name__,
            lambda: self._aexec(program, write, atomic),
        )

    def waiting(self, view: ThreadView) -> bool | None:
        """Through the saver's `aget_tuple`, on its loop."""
        return _on_loop(
            self.inner.loop,  # type: ignore[attr-defined]
            type(self.inner).__name__,
            lambda: self.awaiting(view),
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


class PostgresBackend(_SqlBackend):
    """`PostgresSaver`: its connection or pool through its own `_cursor()` (and lock)."""

    kind = "postgres"

    def _programs(self) -> _Programs:
        return PG_PROGRAMS

    def _exec(self, program: Program[T], write: bool, atomic: bool = False) -> T:
        inner: Any = self.inner
        with inner._cursor() as cur:

            def execute(sql: str, params: Any) -> Result:
                cur.execute(sql, params, prepare=_prepare(sql))
                return ([] if sql in PG_NO_RESULT else _tuples(cur.fetchall())), -1

            conn = cur.connection
            # In pipeline mode statements would wait for the next sync to commit:
            # they take the transaction path, which syncs first, as the official prune.
            if conn.autocommit and not atomic and not inner.pipe:
                return _drive(program, execute)
            if inner.pipe:
                # As the official prune: a transaction in pipeline mode would
                # take in what ran since the last sync.
                inner.pipe.sync()
            with conn.transaction():
                return _drive(program, execute)


class AsyncPostgresBackend(_SqlBackend):
    """`AsyncPostgresSaver`: its connection or pool through its own `_cursor()` (and lock)."""

    kind = "postgres"

    def _programs(self) -> _Programs:
        return PG_PROGRAMS

    async def _aexec(self, program: Program[T], write: bool, atomic: bool = False) -> T:
        inner: Any = self.inner
        async with inner._cursor() as cur:

            async def execute(sql: str, params: Any) -> Result:
                await cur.execute(sql, params, prepare=_prepare(sql))
                return ([] if sql in PG_NO_RESULT else _tuples(await cur.fetchall())), -1

            conn = cur.connection
            if conn.autocommit and not atomic and not inner.pipe:
                return await _adrive(program, execute)
            if inner.pipe:
                await inner.pipe.sync()
            async with conn.transaction():
                return await _adrive(program, execute)

    def _exec(self, program: Program[T], write: bool, atomic: bool = False) -> T:
        return _on_loop(
            self.inner.loop,  # type: ignore[attr-defined]
            type(self.inner).__name__,
            lambda: self._aexec(program, write, atomic),
        )

    def waiting(self, view: ThreadView) -> bool | None:
        """Through the saver's `aget_tuple`, on its loop."""
        return _on_loop(
            self.inner.loop,  # type: ignore[attr-defined]
            type(self.inner).__name__,
            lambda: self.awaiting(view),
        )


def backend_for(inner: BaseCheckpointSaver[Any]) -> Backend:
    """The backend of a saver; the base `Backend` (everything unsupported) for unknown ones.

    Subclasses of the known savers count as them: they keep the tables.
    Shallow Postgres savers keep one checkpoint a thread and are not known.
    """
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    if isinstance(inner, InMemorySaver):
        return MemoryBackend(inner)
    if isinstance(inner, AsyncSqliteSaver):
        return AsyncSqliteBackend(inner)
    if isinstance(inner, SqliteSaver):
        return SqliteBackend(inner)
    try:
        from langgraph.checkpoint.postgres import PostgresSaver
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    except ImportError:  # langgraph-checkpoint-postgres (psycopg) not installed
        return Backend(inner)
    if isinstance(inner, AsyncPostgresSaver):
        return AsyncPostgresBackend(inner)
    if isinstance(inner, PostgresSaver):
        return PostgresBackend(inner)
    return Backend(inner)


def group_ids(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(namespace, id) pairs as {namespace: [ids]}, the shape `delete` takes."""
    out: dict[str, list[str]] = defaultdict(list)
    for ns, cid in pairs:
        out[ns].append(cid)
    return dict(out)
