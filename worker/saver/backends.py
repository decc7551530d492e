"""Storage access for `RetentionSaver`: the operations, and the backend each saver family has.

`RetentionSaver` decides with `policies.decide` (the worker's rules); what it
needs from the wrapped saver is the same few operations the worker's engines
have, done on the saver's own connection under the saver's own lock (each is
an `Operation` of `worker.saver.operations`, answered by a `Backend` method):

- `scan(thread_id)`: the thread's checkpoints as `CheckpointSummary`s (no
  blob decoded unless the thread uses a `DeltaChannel` or an id carries no
  time), with each checkpoint's `run_id`;
- `delete(thread_id, {namespace: ids})`: those checkpoints with their writes,
  parents of kept checkpoints nulled, and (Postgres, memory) the blob versions
  only they referenced, at once (unlike the worker's sweep, which dates the
  deletion and collects them `grace_period` later: a fork that read a deleted
  checkpoint and saves after this loses those channels; see
  `worker.saver.postgres.PG_DELETE_SQL`);
- `trim(thread_id, choose)`: `scan`, the caller's decision, `delete`, as one
  transaction under one hold of the lock (the write path's only operation);
- `expire(thread_id, stamp)`: the whole thread, in one transaction that
  first checks the thread is still as scanned, so a run that saved since the
  decision wins and nothing is half deleted;
- `delete_threads`, `threads_of_runs`, `thread_page`, `waiting`;
- `holds()`, `hold(...)`, `release(...)`: the legal holds kept in the store
  itself, in the worker's own table (for `InMemorySaver`, beside its dicts).

One backend per saver family, each in its own module, imported only when a
saver of that family is wrapped (`backend_for`), so an `InMemorySaver` or
SQLite application never loads a Postgres driver: `memory` (`InMemorySaver`'s
dicts), `sqlite` (`SqliteSaver` on sqlite3, `AsyncSqliteSaver` on aiosqlite),
`postgres` (`PostgresSaver`, `AsyncPostgresSaver`, psycopg). The SQL of an
operation is written once, as `Statements` (a generator of statements, as the
official Postgres `prune` does), and run by a sync or an async driver: for
aiosqlite the whole operation runs in one hop on the connection's own thread;
on Postgres a trim is two statements (a metadata-only scan, one data-modifying
delete). A backend of a sync saver has no async operations
(`NotImplementedError`, like the saver's own `aget_tuple`); one of an async
saver runs its sync operations on the saver's event loop from another thread,
as the saver's own sync methods do.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver, CheckpointTuple

from policies.decide import is_delta_thread, root_head
from policies.model import CheckpointSummary, ThreadView
from policies.waiting import is_waiting
from worker.saver.operations import Choose, Scanned, ThreadChanged, ThreadStamp
from worker.stores.engine import Counts

T = TypeVar("T")


# ------------------------------------------------------------------ shared pieces


def scanned_of(
    thread_id: str,
    rows: Sequence[tuple[CheckpointSummary, Mapping[str, Any]]],
) -> Scanned:
    """A scanned thread from its (summary, metadata) rows: its view, head metadata, run ids."""
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


def needs_blobs(summaries: Iterable[CheckpointSummary]) -> bool:
    """Whether a scan must decode checkpoints: a delta thread, or an id that carries no time."""
    cps = list(summaries)
    return is_delta_thread(cps) or any(c.created_at is None for c in cps)


def _head_config(thread_id: str, head: CheckpointSummary) -> RunnableConfig:
    return {
        "configurable": {
            "thread_id": thread_id,
            "checkpoint_ns": head.namespace,
            "checkpoint_id": head.checkpoint_id,
        }
    }


def _waiting_of(tup: CheckpointTuple | None) -> bool | None:
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

    def expire(self, thread_id: str, stamp: ThreadStamp) -> Counts | None:
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
        return _waiting_of(self.inner.get_tuple(_head_config(view.thread_id, head)))

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

    async def aexpire(self, thread_id: str, stamp: ThreadStamp) -> Counts | None:
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
        return _waiting_of(await self.inner.aget_tuple(_head_config(view.thread_id, head)))


# ------------------------------------------------------------------ SQL backends

Result = tuple[list[tuple[Any, ...]], int]
"""What a driver sends back for a statement: its rows (as tuples) and its rowcount
(SQLite; -1 on Postgres, whose statements here all return their counts as rows)."""
Statement = tuple[str, Sequence[Any] | Mapping[str, Any]]
"""(sql, params), in the driver's paramstyle."""
Statements = Generator[Statement, Result, T]
"""An operation as SQL: yields statements, receives each one's `Result`, returns a value."""


@dataclass(frozen=True, slots=True)
class SqlPrograms:
    """One SQL backend's operations, each written once as `Statements`."""

    scan: Callable[[str], Statements[Scanned]]
    delete: Callable[[str, Mapping[str, Sequence[str]]], Statements[Counts]]
    expire: Callable[[str, ThreadStamp], Statements[Counts]]
    delete_threads: Callable[[Sequence[str]], Statements[Counts]]
    threads_of_runs: Callable[[Sequence[str]], Statements[list[str]]]
    thread_page: Callable[[str | None, int], Statements[list[str]]]
    holds: Callable[[], Statements[frozenset[str]]]
    hold: Callable[[str, str | None, str | None], Statements[bool]]
    release: Callable[[str], Statements[bool]]


# ------------------------------------------------------------------ SQL backends


class SqlBackend(Backend):
    """Operations as programs, run by `_exec` (sync) or `_aexec` (async)."""

    def _exec(self, program: Statements[T], write: bool, atomic: bool = False) -> T:
        """Run a program; `write`: it deletes; `atomic`: its statements need one transaction.

        SQLite runs every deleting program in one BEGIN IMMEDIATE transaction.
        On Postgres each statement is atomic alone and a trim or delete is one
        statement, so only `atomic` programs (expiry's re-checks, whole-thread
        deletes) take a transaction block (and any program on a connection
        that is not in autocommit mode).
        """
        raise self._sync_unsupported()

    async def _aexec(self, program: Statements[T], write: bool, atomic: bool = False) -> T:
        """Async `_exec`."""
        raise self._async_unsupported()

    def _sync_unsupported(self) -> NotImplementedError:
        return NotImplementedError(f"{type(self.inner).__name__} has no sync API")

    def _async_unsupported(self) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self.inner).__name__} is synchronous: use the sync methods "
            "(put, prune, delete_checkpoints...) of a RetentionSaver wrapping it"
        )

    def _programs(self) -> SqlPrograms:
        """This backend's statements, one program per operation."""
        raise NotImplementedError

    def scan(self, thread_id: str) -> Scanned:
        """See `Backend.scan`."""
        return self._exec(self._programs().scan(thread_id), write=False)

    def delete(self, thread_id: str, ids_by_ns: Mapping[str, Sequence[str]]) -> Counts:
        """See `Backend.delete`."""
        return self._exec(self._programs().delete(thread_id, ids_by_ns), write=True)

    def _trim(self, thread_id: str, choose: Choose) -> Statements[Counts]:
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

    def expire(self, thread_id: str, stamp: ThreadStamp) -> Counts | None:
        """See `Backend.expire`."""
        try:
            return self._exec(self._programs().expire(thread_id, stamp), write=True, atomic=True)
        except ThreadChanged:
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

    async def aexpire(self, thread_id: str, stamp: ThreadStamp) -> Counts | None:
        """See `Backend.expire`."""
        try:
            return await self._aexec(
                self._programs().expire(thread_id, stamp), write=True, atomic=True
            )
        except ThreadChanged:
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


# `drive` and `adrive` are twins on purpose: one body cannot both await the
# driver's calls and not.
def drive(program: Statements[T], execute: Callable[[str, Any], Result]) -> T:
    """Run a program's statements one by one with `execute`; its return value."""
    result: Result | None = None
    while True:
        try:
            sql, params = next(program) if result is None else program.send(result)
        except StopIteration as stop:
            # The generator protocol types a return value only through
            # `yield from`; the program's own annotation says it is a `T`.
            value: T = stop.value
            return value
        result = execute(sql, params)


# The async twin of `drive` (see there).
async def adrive(program: Statements[T], execute: Callable[[str, Any], Awaitable[Result]]) -> T:
    """Async `drive`."""
    result: Result | None = None
    while True:
        try:
            sql, params = next(program) if result is None else program.send(result)
        except StopIteration as stop:
            value: T = stop.value
            return value
        result = await execute(sql, params)


class _OnItsLoop(Protocol):
    """An async saver (`AsyncSqliteSaver`, `AsyncPostgresSaver`): the loop it was made on."""

    loop: asyncio.AbstractEventLoop


class AsyncSqlBackend(SqlBackend):
    """A SQL backend of an async saver: its sync methods run the async ones on the saver's
    own loop (`on_loop`), as the saver's own sync methods do."""

    def _exec(self, program: Statements[T], write: bool, atomic: bool = False) -> T:
        return on_loop(
            cast(_OnItsLoop, self.inner).loop,
            type(self.inner).__name__,
            lambda: self._aexec(program, write, atomic),
        )

    def waiting(self, view: ThreadView) -> bool | None:
        """Through the saver's `aget_tuple`, on its loop."""
        return on_loop(
            cast(_OnItsLoop, self.inner).loop,
            type(self.inner).__name__,
            lambda: self.awaiting(view),
        )


def on_loop(loop: asyncio.AbstractEventLoop, name: str, make: Callable[[], Awaitable[T]]) -> T:
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


# ------------------------------------------------------------------ which backend


def backend_for(inner: BaseCheckpointSaver[Any]) -> Backend:
    """The backend of a saver; the base `Backend` (everything unsupported) for unknown ones.

    Subclasses of the known savers count as them: they keep the tables.
    Shallow Postgres savers keep one checkpoint a thread and are not known.
    A saver is an instance of a known class only if that class's module is
    loaded already, so a family's backend (and its driver) is imported only
    then: wrapping an `InMemorySaver` never imports psycopg or asyncpg.
    """
    loaded = sys.modules
    if "langgraph.checkpoint.memory" in loaded:
        from worker.saver import memory

        if (found := memory.backend_of(inner)) is not None:
            return found
    if "langgraph.checkpoint.sqlite" in loaded:
        from worker.saver import sqlite

        if (found := sqlite.backend_of(inner)) is not None:
            return found
    if "langgraph.checkpoint.postgres" in loaded:
        from worker.saver import postgres

        if (found := postgres.backend_of(inner)) is not None:
            return found
    return Backend(inner)
