"""The saver's typed operations: what its retention logic asks of a backend.

The wrapper's retention logic is written once, as a *program*: a generator
that yields operations and receives their results. `run` drives a program
with a backend's sync methods, `arun` with its async ones. Each operation is
a frozen dataclass whose type parameter is its result, and which names the
backend method answering it, so mypy checks the asking and the answering::

    scanned = yield from ask(Scan(thread_id))  # scanned: Scanned
"""

from __future__ import annotations

from abc import abstractmethod
from collections import defaultdict
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from policies.model import ThreadView
from worker.stores.engine import Counts

if TYPE_CHECKING:
    from worker.saver.backends import Backend

R = TypeVar("R")
T = TypeVar("T")

ThreadStamp = tuple[int, str | None]
"""(checkpoints in the thread, newest checkpoint id): any save since a scan changes it.

Not the engines' `worker.stores.engine.Fingerprint`, which counts every table: the
wrapper's expiry runs in one transaction on the saver's connection and only
needs to see a run that saved a checkpoint since its scan.
"""


@dataclass(frozen=True, slots=True)
class Scanned:
    """One thread as the decision sees it, with what explicit deletions select by."""

    view: ThreadView
    run_ids: Mapping[tuple[str, str], str] = field(default_factory=dict)
    """(namespace, checkpoint id) -> `metadata.run_id`, where the caller recorded one."""

    @property
    def stamp(self) -> ThreadStamp:
        """What `Expire` re-checks before deleting the thread."""
        cps = self.view.checkpoints
        return len(cps), max((c.checkpoint_id for c in cps), default=None)


Choose = Callable[[Scanned], Mapping[str, Sequence[str]]]
"""What a trim deletes from a scanned thread, {namespace: ids} (the decision, run in between)."""


class ThreadChanged(Exception):
    """The thread changed between the decision and the delete: roll back, keep it."""


def group_ids(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(namespace, id) pairs as {namespace: [ids]}, the shape `Delete` takes."""
    out: dict[str, list[str]] = defaultdict(list)
    for ns, cid in pairs:
        out[ns].append(cid)
    return dict(out)


# ------------------------------------------------------------------ operations


class Operation(Generic[R]):
    """A request to a backend, answered with an `R` by `run` (sync) or `arun` (async)."""

    __slots__ = ()

    @abstractmethod
    def run(self, backend: Backend) -> R:
        """Answer with the backend's sync method."""

    @abstractmethod
    async def arun(self, backend: Backend) -> R:
        """Answer with the backend's async method."""


@dataclass(frozen=True, slots=True)
class Scan(Operation[Scanned]):
    """The thread's checkpoints (`Backend.scan`)."""

    thread_id: str

    def run(self, backend: Backend) -> Scanned:
        """`Backend.scan`."""
        return backend.scan(self.thread_id)

    async def arun(self, backend: Backend) -> Scanned:
        """`Backend.ascan`."""
        return await backend.ascan(self.thread_id)


@dataclass(frozen=True, slots=True)
class Delete(Operation[Counts]):
    """These checkpoints with their writes (`Backend.delete`)."""

    thread_id: str
    ids_by_ns: Mapping[str, Sequence[str]]

    def run(self, backend: Backend) -> Counts:
        """`Backend.delete`."""
        return backend.delete(self.thread_id, self.ids_by_ns)

    async def arun(self, backend: Backend) -> Counts:
        """`Backend.adelete`."""
        return await backend.adelete(self.thread_id, self.ids_by_ns)


@dataclass(frozen=True, slots=True)
class Trim(Operation[Counts]):
    """Scan, `choose`, delete in one transaction (`Backend.trim`)."""

    thread_id: str
    choose: Choose

    def run(self, backend: Backend) -> Counts:
        """`Backend.trim`."""
        return backend.trim(self.thread_id, self.choose)

    async def arun(self, backend: Backend) -> Counts:
        """`Backend.atrim`."""
        return await backend.atrim(self.thread_id, self.choose)


@dataclass(frozen=True, slots=True)
class Expire(Operation[Counts | None]):
    """The whole thread if it is still as scanned; None if it changed (`Backend.expire`)."""

    thread_id: str
    stamp: ThreadStamp

    def run(self, backend: Backend) -> Counts | None:
        """`Backend.expire`."""
        return backend.expire(self.thread_id, self.stamp)

    async def arun(self, backend: Backend) -> Counts | None:
        """`Backend.aexpire`."""
        return await backend.aexpire(self.thread_id, self.stamp)


@dataclass(frozen=True, slots=True)
class DeleteThreads(Operation[Counts]):
    """Every row of these threads (`Backend.delete_threads`)."""

    thread_ids: Sequence[str]

    def run(self, backend: Backend) -> Counts:
        """`Backend.delete_threads`."""
        return backend.delete_threads(self.thread_ids)

    async def arun(self, backend: Backend) -> Counts:
        """`Backend.adelete_threads`."""
        return await backend.adelete_threads(self.thread_ids)


@dataclass(frozen=True, slots=True)
class ThreadsOfRuns(Operation[list[str]]):
    """Threads holding a checkpoint of one of these runs (`Backend.threads_of_runs`)."""

    run_ids: Sequence[str]

    def run(self, backend: Backend) -> list[str]:
        """`Backend.threads_of_runs`."""
        return backend.threads_of_runs(self.run_ids)

    async def arun(self, backend: Backend) -> list[str]:
        """`Backend.athreads_of_runs`."""
        return await backend.athreads_of_runs(self.run_ids)


@dataclass(frozen=True, slots=True)
class ThreadPage(Operation[list[str]]):
    """Up to `limit` thread ids after `after` (`Backend.thread_page`)."""

    after: str | None
    limit: int

    def run(self, backend: Backend) -> list[str]:
        """`Backend.thread_page`."""
        return backend.thread_page(self.after, self.limit)

    async def arun(self, backend: Backend) -> list[str]:
        """`Backend.athread_page`."""
        return await backend.athread_page(self.after, self.limit)


@dataclass(frozen=True, slots=True)
class Holds(Operation[frozenset[str]]):
    """The threads under a legal hold (`Backend.holds`)."""

    def run(self, backend: Backend) -> frozenset[str]:
        """`Backend.holds`."""
        return backend.holds()

    async def arun(self, backend: Backend) -> frozenset[str]:
        """`Backend.aholds`."""
        return await backend.aholds()


@dataclass(frozen=True, slots=True)
class Waiting(Operation[bool | None]):
    """Whether the thread waits for input at its head; None: unknown (`Backend.waiting`)."""

    view: ThreadView

    def run(self, backend: Backend) -> bool | None:
        """`Backend.waiting`."""
        return backend.waiting(self.view)

    async def arun(self, backend: Backend) -> bool | None:
        """`Backend.awaiting`."""
        return await backend.awaiting(self.view)


# ------------------------------------------------------------------ programs

Program = Generator[Operation[Any], Any, T]
"""Retention logic written once: yields operations, receives their results, returns a `T`."""


def ask(op: Operation[R]) -> Generator[Operation[R], R, R]:
    """One operation's result, typed: `result = yield from ask(op)` inside a program."""
    return (yield op)


# `run` and `arun` are twins on purpose: one body cannot both await the
# backend's operations and not.
def run(program: Program[T], backend: Backend) -> T:
    """Drive a program with the backend's sync operations."""
    result: Any = None
    while True:
        try:
            op = program.send(result)
        except StopIteration as stop:
            # The generator protocol types a return value only through
            # `yield from`; the program's own annotation says it is a `T`.
            value: T = stop.value
            return value
        result = op.run(backend)


# The async twin of `run` (see there).
async def arun(program: Program[T], backend: Backend) -> T:
    """Drive a program with the backend's async operations."""
    result: Any = None
    while True:
        try:
            op = program.send(result)
        except StopIteration as stop:
            value: T = stop.value
            return value
        result = await op.arun(backend)
