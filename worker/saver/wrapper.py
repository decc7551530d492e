"""`RetentionSaver`: the worker's retention rules, enforced inside the application.

Wrap the checkpointer a graph is compiled with::

    saver = RetentionSaver(AsyncSqliteSaver(conn), keep_last=20, expire_after="30d")
    graph = builder.compile(checkpointer=saver)

- After a `put`, the thread is trimmed to `keep_last` / `keep_within` by the
  worker's own decision (`policies.decide`, one implementation of the rules)
  with the same invariants: a kept checkpoint keeps its writes and the blobs
  it references, a `DeltaChannel` thread keeps the ancestors its replay reads,
  a v < 4 Postgres checkpoint keeps the parent holding its sends, a subgraph
  call's namespace goes with its root checkpoint, a kept root checkpoint keeps
  the `checkpointer=True` subgraph checkpoints replaying it reads, kept
  checkpoints whose parent went get none. Trimming is amortized: a (thread, namespace) is
  trimmed on the first put this process makes to an existing history and then
  every `slack + 1` puts, so between trims it holds at most `keep_last + slack`
  checkpoints (plus what `keep_within` and the invariants keep).
- `expire_after`: a read of a thread idle that long (its newest checkpoint,
  any namespace) returns nothing, so an expired conversation starts afresh
  before any sweep runs; the put that starts it afresh (root namespace, no
  parent checkpoint: the run found nothing) deletes the expired rows first, in
  one transaction that first re-checks the thread, so a run that saved in
  between wins. A put that names its parent checkpoint continues a thread its
  run read live, and never expires it (it only trims), however long the node
  before it took: a run in flight read the thread before its idle time
  crossed `expire_after` and saves after, so no lock orders the two; this
  rule does, and expiry never leaves it a checkpoint without the channels
  its step did not change. A thread waiting for input is kept unless
  `interrupted="expire"`.
- `prune`, `delete_for_runs` and `delete_checkpoints(before=...)` (and async
  twins) on every wrapped saver: explicit deletions by their API contracts,
  still keeping what the remaining checkpoints need (the savers' own `prune`,
  Postgres's, is used where it exists: it is the reference).
- Legal holds (`checkpoint-janitor hold`, or `hold()` here): a held thread
  is never trimmed, expired or hidden by the wrapper, nor touched by
  `delete_checkpoints`. The wrapper reads the store's holds at most every
  `holds_refresh` (60 s by default), so a hold placed by another process
  binds it within that interval; one placed through this wrapper at once.
  Explicit deletions by name (`delete_thread`, `prune`, `delete_for_runs`)
  are the application's own and do as they are asked.
- Everything else passes through to the wrapped saver: sync methods for a
  sync saver, async for an async one; what the saver lacks (`copy_thread` on
  all five) raises `NotImplementedError` as the base class does.
- Retention never breaks the application's write or read: a failure is
  logged and counted in `checkpoint_janitor_saver_failures_total`. The work
  runs on the saver's own connection under the saver's own lock.

Windows that remain (within one process the saver's lock serializes the
wrapper's work with the application's saves, and the rule above keeps expiry
off runs in flight, so these concern other processes writing the same store):

- Expiry on Postgres re-checks the thread after its deletes, in READ
  COMMITTED, and rolls back if anything was saved; a save committing between
  that check and COMMIT is lost with the thread. On SQLite the write lock
  (BEGIN IMMEDIATE) leaves no window.
- A run of another process that read the thread before this wrapper expired
  it and saves after recreates it from its own state on SQLite; on Postgres
  its checkpoint names blob versions the expiry deleted, and reads without
  the channels its step did not change. (The worker's expiry keeps a thread's
  blobs for the grace period for this reason; the wrapper's does not: one
  wrapper per store, or one process writing a thread at a time, avoids it.)
- A trim on Postgres collects the blob versions only the deleted checkpoints
  referenced, checked against the checkpoints committed when its statement
  starts: a fork (`update_state` from a checkpoint being trimmed) committed by
  another process during that statement can lose a blob, as with the
  official `prune`.
- Each process counts its own puts: N processes writing one thread may let
  it reach `keep_last + N * slack` between trims.
- Only one-thread reads are filtered for expiry; a listing of every thread
  (`list(None)`) is not.
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
    get_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol
from prometheus_client import REGISTRY, CollectorRegistry

from policies.config import Policy, ThreadTTL
from policies.decide import (
    UndecodableHistory,
    close_keep,
    decide,
    delta_channels_of,
    expiry_seconds,
)
from policies.ids import checkpoint_time
from policies.matching import Ruleset
from policies.model import CheckpointSummary, SkipReason, ThreadDecision, ThreadView
from worker.saver.backends import Backend, backend_for
from worker.saver.metrics import SaverMetrics
from worker.saver.operations import (
    Delete,
    DeleteThreads,
    Expire,
    Holds,
    Program,
    Scan,
    Scanned,
    ThreadPage,
    ThreadsOfRuns,
    Trim,
    Waiting,
    arun,
    ask,
    group_ids,
    run,
)
from worker.stores.engine import Counts

__all__ = ["RetentionSaver", "SaverMetrics"]

log = logging.getLogger("checkpoint_janitor.saver")

T = TypeVar("T")

PRUNE_STRATEGIES = ("keep_latest", "delete")

_CACHE_SIZE = 65_536
"""Threads whose state (freshness, puts since their trims) the wrapper remembers (LRU)."""
_RECHECK_SECONDS = 60.0
"""How long an idle thread found not expired (it waits for input) is taken as such."""
_PAGE = 500


# ------------------------------------------------------------------ state shared by clones


K = TypeVar("K")
V = TypeVar("V")


class _Lru(OrderedDict[K, V]):
    """A bounded map; the least recently set key goes first."""

    def put(self, key: K, value: V) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > _CACHE_SIZE:
            self.popitem(last=False)


class _State:
    """What the wrapper remembers between calls; shared with `with_allowlist` clones."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: frozenset[str] | None = None
        """The store's held threads as last read (None: not read yet)."""
        self.held_until = 0.0
        """When `held` is to be read again."""
        self.fresh_until: _Lru[str, float] = _Lru()
        """thread -> time until which it cannot have expired (no check needed)."""
        self.since_trim: _Lru[str, dict[str, int]] = _Lru()
        """thread -> namespace -> puts since its last trim."""

    def forget(self, thread_ids: Collection[str]) -> None:
        with self.lock:
            for tid in thread_ids:
                self.fresh_until.pop(tid, None)
                self.since_trim.pop(tid, None)


def _overrides(cls: type, method: str) -> bool:
    """Whether a saver class implements `method` (the conformance suite's test)."""
    return getattr(cls, method, None) is not getattr(BaseCheckpointSaver, method, None)


def _thread_ns(config: RunnableConfig) -> tuple[str, str]:
    conf = config["configurable"]
    return str(conf["thread_id"]), str(conf.get("checkpoint_ns", "") or "")


def _starts_afresh(ns: str, config: RunnableConfig) -> bool:
    """Whether a put starts its thread afresh, so it may expire what the thread held.

    A put names the checkpoint it continues (`checkpoint_id`, the one the run
    read) unless the run found nothing: a new thread, or one a read hid as
    expired. Only such a root put may expire the thread. A put that continues
    a checkpoint belongs to a run that read the thread live, however long its
    node took: expiring under it would leave its checkpoint without the
    channels the step did not change (InMemorySaver and Postgres store only
    the changed channels' blobs). A subgraph's first put names no parent in its
    new namespace either, while its root run goes on: never that one.
    """
    return ns == "" and not config["configurable"].get("checkpoint_id")


def _clip_times(view: ThreadView, now: float) -> ThreadView:
    """Dates for an explicit `prune`: unknown or future ages are "now", so only the newest stays.

    (`decide` never takes an undated or future checkpoint as old; that is right
    for a policy, not for "keep only the latest".)
    """
    cps = tuple(
        replace(c, created_at=now if c.created_at is None else min(c.created_at, now))
        for c in view.checkpoints
    )
    return replace(view, checkpoints=cps)


# ------------------------------------------------------------------ the wrapper


class RetentionSaver(BaseCheckpointSaver[Any]):
    """A checkpointer that enforces retention at write time around any of the seed savers.

    On Postgres a trim frees the blob versions only the trimmed checkpoints
    referenced at once, as the official `prune` does; the worker's sweep
    instead waits `grace_period` after a deletion. So an `update_state` fork
    from a checkpoint this wrapper trims between the fork's read and its write
    loses the channels the fork did not change. Keep `keep_last` above the
    depth your application forks from, or leave trimming to the worker.

    Args:
        inner: The saver to wrap: `InMemorySaver`, `SqliteSaver`,
            `AsyncSqliteSaver`, `PostgresSaver` or `AsyncPostgresSaver` (or a
            subclass). Its connection, pool and lock are used as they are.
        keep_last: Trim each (thread, namespace) to its newest N checkpoints.
        keep_within: ...and keep every checkpoint younger than this
            (`timedelta` or a duration such as `"7d"`).
        expire_after: A thread idle this long (`timedelta` or `"30d"`) reads as
            empty, and its rows go at its next put. Or a per-thread TTL read from
            the head's metadata, as in a policy:
            `{"metadata_key": "ttl_minutes", "default": "30d"}` (`ThreadTTL`).
        interrupted: `"keep"` (default): a thread waiting for input never
            expires; `"expire"`: it does.
        expire_on_read: Whether reads of an expired thread return nothing
            (default True when `expire_after` is set).
        slack: Checkpoints a namespace may hold beyond `keep_last` between
            trims; a trim runs every `slack + 1` puts. Default `keep_last // 2`,
            at most 50 (10 with `keep_within` alone).
        grace_period: How long a thread must be quiet before writes whose
            checkpoint never committed, and orphaned subgraph calls, count as
            garbage (as the worker's grace period).
        registry: Prometheus registry for the `checkpoint_janitor_saver_*`
            counters (default: the global registry).
        name: The `saver` label of those counters (default: the inner class name).
        clock: Seconds since the epoch; injectable for tests.
        holds_refresh: How long the store's legal holds, once read, are taken
            as they were (default 60 s): a hold placed by another process (the
            `checkpoint-janitor hold` command) binds this wrapper within it.

    Raises:
        TypeError: Rules were given for a saver whose storage the wrapper does not know.
        pydantic.ValidationError: A rule is invalid (zero or negative, unparsable).
    """

    def __new__(
        cls, inner: BaseCheckpointSaver[Any] | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        # The conformance suite (and anyone probing capabilities) checks which
        # methods the class overrides: copy_thread is offered only when the
        # wrapped saver has it.
        target: type = cls
        if (
            inner is not None
            and cls is RetentionSaver
            and (_overrides(type(inner), "copy_thread") or _overrides(type(inner), "acopy_thread"))
        ):
            target = _CopyingRetentionSaver
        return super().__new__(target)

    def __init__(
        self,
        inner: BaseCheckpointSaver[Any],
        keep_last: int | None = None,
        keep_within: timedelta | str | None = None,
        expire_after: timedelta | str | dict[str, Any] | ThreadTTL | None = None,
        *,
        interrupted: Literal["keep", "expire"] = "keep",
        expire_on_read: bool = True,
        slack: int | None = None,
        grace_period: timedelta = timedelta(hours=1),
        registry: CollectorRegistry | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.time,
        holds_refresh: timedelta = timedelta(seconds=60),
    ) -> None:
        # BaseCheckpointSaver.__init__ only sets `serde`, which is the inner's here.
        if not isinstance(inner, BaseCheckpointSaver):
            raise TypeError(f"RetentionSaver wraps a BaseCheckpointSaver, not {type(inner)!r}")
        if slack is not None and (isinstance(slack, bool) or slack < 0):
            raise ValueError("slack must be a non-negative int")
        self._inner = inner
        self._backend: Backend = backend_for(inner)
        self.name = name or type(inner).__name__
        self._clock = clock
        self._grace = grace_period.total_seconds()
        self._holds_refresh = holds_refresh.total_seconds()
        self._trim_rules: Ruleset | None = None
        self._expiry_rules: Ruleset | None = None
        self._expire_seconds: float | None = None
        """A fixed `expire_after`, in seconds (None: none, or a per-thread TTL)."""
        self._expiry_policy: Policy | None = None
        if keep_last is not None or keep_within is not None:
            # Validated from values: `keep_within` may be duration text ("7d").
            trim = {"name": self.name, "keep_last": keep_last, "keep_within": keep_within}
            self._trim_rules = Ruleset([Policy.model_validate(trim)])
        if expire_after is not None:
            policy = Policy.model_validate(
                {"name": self.name, "expire_after": expire_after, "interrupted": interrupted}
            )
            self._expiry_rules = Ruleset([policy])
            self._expiry_policy = policy
            if not isinstance(policy.expire_after, ThreadTTL):
                self._expire_seconds, _ = expiry_seconds(policy, {})
        if (self._trim_rules or self._expiry_rules) and type(self._backend) is Backend:
            raise TypeError(
                f"RetentionSaver cannot enforce retention on {type(inner).__name__}: it knows "
                "InMemorySaver, SqliteSaver, AsyncSqliteSaver, PostgresSaver and "
                "AsyncPostgresSaver (and their subclasses)"
            )
        self._expire_on_read = expire_on_read and self._expiry_rules is not None
        if slack is None:
            slack = min(keep_last // 2, 50) if keep_last is not None else 10
        self.slack = slack
        self._state = _State()
        self.metrics = SaverMetrics.for_registry(registry if registry is not None else REGISTRY)

    # -------------------------------------------------------------- passthrough

    @property
    def inner(self) -> BaseCheckpointSaver[Any]:
        """The wrapped saver."""
        return self._inner

    def __getattr__(self, name: str) -> Any:
        # Only called for what the wrapper lacks (conn, lock, setup, storage...).
        # Dunders and our own attributes are never forwarded: copy and pickle
        # probe them before __init__ has run.
        if name.startswith("__") or name in ("_inner", "_backend", "_state"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    @property
    def serde(self) -> SerializerProtocol:
        """The wrapped saver's serializer (reads and writes go through it)."""
        return self._inner.serde

    @serde.setter
    def serde(self, value: SerializerProtocol) -> None:
        self._inner.serde = value

    @property
    def config_specs(self) -> builtins.list[Any]:
        """The wrapped saver's configuration fields."""
        return self._inner.config_specs

    def get_next_version(self, current: Any, channel: None) -> Any:
        """The wrapped saver's version scheme."""
        return self._inner.get_next_version(current, channel)

    def with_allowlist(
        self, extra_allowlist: Collection[tuple[str, ...]]
    ) -> BaseCheckpointSaver[Any]:
        """The wrapped saver's clone with a derived msgpack allowlist, wrapped alike.

        The clone shares this wrapper's counters and caches (same store).
        """
        inner = self._inner.with_allowlist(extra_allowlist)
        if inner is self._inner:
            return self
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._inner = inner
        clone._backend = backend_for(inner)
        return clone

    def __enter__(self) -> RetentionSaver:
        self._sync_context().__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._sync_context().__exit__(*exc)

    async def __aenter__(self) -> RetentionSaver:
        await self._async_context().__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._async_context().__aexit__(*exc)

    def _sync_context(self) -> AbstractContextManager[Any]:
        # The structural check of `with`: the base saver class declares no
        # __enter__, but most savers are context managers.
        if not isinstance(self._inner, AbstractContextManager):
            raise AttributeError(f"{type(self._inner).__name__} is not a context manager")
        return self._inner

    def _async_context(self) -> AbstractAsyncContextManager[Any]:
        if not isinstance(self._inner, AbstractAsyncContextManager):
            raise AttributeError(f"{type(self._inner).__name__} is not an async context manager")
        return self._inner

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Passed through."""
        self._inner.put_writes(config, writes, task_id, task_path)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Passed through."""
        await self._inner.aput_writes(config, writes, task_id, task_path)

    def delete_thread(self, thread_id: str) -> None:
        """Passed through."""
        self._inner.delete_thread(thread_id)
        self._state.forget([str(thread_id)])

    async def adelete_thread(self, thread_id: str) -> None:
        """Passed through."""
        await self._inner.adelete_thread(thread_id)
        self._state.forget([str(thread_id)])

    def get_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """Passed through (the saver's fast path, where it has one)."""
        return self._inner.get_delta_channel_history(config=config, channels=channels)

    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """Passed through."""
        return await self._inner.aget_delta_channel_history(config=config, channels=channels)

    # -------------------------------------------------------------- legal holds

    def hold(self, thread_id: str, reason: str | None = None, held_by: str | None = None) -> bool:
        """Put a thread on legal hold in the store (as `checkpoint-janitor hold`).

        It need not exist yet. Returns False if it was held already (the first
        hold stands). The worker's sweeps and purges honour it too.
        """
        placed = self._backend.hold(str(thread_id), reason, held_by)
        self._forget_holds()
        return placed

    async def ahold(
        self, thread_id: str, reason: str | None = None, held_by: str | None = None
    ) -> bool:
        """Async `hold`."""
        placed = await self._backend.ahold(str(thread_id), reason, held_by)
        self._forget_holds()
        return placed

    def release(self, thread_id: str) -> bool:
        """Lift a thread's legal hold; False if it had none."""
        lifted = self._backend.release(str(thread_id))
        self._forget_holds()
        return lifted

    async def arelease(self, thread_id: str) -> bool:
        """Async `release`."""
        lifted = await self._backend.arelease(str(thread_id))
        self._forget_holds()
        return lifted

    def _forget_holds(self) -> None:
        with self._state.lock:
            self._state.held = None

    # -------------------------------------------------------------- writes

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """The wrapped saver's `put`; a trim may follow.

        A root put that names no parent checkpoint starts its thread afresh:
        an expired thread's rows go first. A put that names one never expires.
        """
        tid, ns = _thread_ns(config)
        if _starts_afresh(ns, config) and self._expiry_due(tid):
            self._guarded("expire", lambda: self._run(self._expiry(tid, apply=True)))
        out = self._inner.put(config, checkpoint, metadata, new_versions)
        if self._after_put(tid, ns, config, checkpoint, metadata):
            self._guarded("trim", lambda: self._run(self._trim(tid)))
        return out

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Async `put`."""
        tid, ns = _thread_ns(config)
        if _starts_afresh(ns, config) and self._expiry_due(tid):
            await self._aguarded("expire", lambda: self._arun(self._expiry(tid, apply=True)))
        out = await self._inner.aput(config, checkpoint, metadata, new_versions)
        if self._after_put(tid, ns, config, checkpoint, metadata):
            await self._aguarded("trim", lambda: self._arun(self._trim(tid)))
        return out

    def _expiry_due(self, thread_id: str) -> bool:
        """Whether the thread may have expired: not seen fresh recently by this process."""
        if self._expiry_rules is None:
            return False
        with self._state.lock:
            until = self._state.fresh_until.get(thread_id)
        return until is None or self._clock() >= until

    def _after_put(
        self,
        thread_id: str,
        ns: str,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
    ) -> bool:
        """Note a put; True when its namespace is due for a trim."""
        state = self._state
        # A root put is the thread's new head: the metadata the saver stores for it
        # (the run's `configurable` scalars merged in) carries a per-thread TTL.
        ttl = self._ttl_of(get_checkpoint_metadata(config, metadata) if ns == "" else None)
        with state.lock:
            if ttl is not None:
                t = checkpoint_time(str(checkpoint.get("id", ""))) or self._clock()
                until = max(t + ttl, state.fresh_until.get(thread_id, 0.0))
                state.fresh_until.put(thread_id, until)
            if self._trim_rules is None:
                return False
            counts = state.since_trim.get(thread_id)
            if counts is None:
                counts = {}
            count = counts.get(ns)
            if count is None:
                # First put this process sees: trim at once if it continues a
                # history (which may be long), not when it starts one.
                has_parent = bool(config["configurable"].get("checkpoint_id"))
                count = self.slack + 1 if has_parent else 0
            else:
                count += 1
            due = count > self.slack
            counts[ns] = 0 if due else count
            state.since_trim.put(thread_id, counts)
            return due

    # -------------------------------------------------------------- reads

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The wrapped saver's `get_tuple`; None for an expired thread."""
        tup = self._inner.get_tuple(config)
        if tup is None or not self._read_check_needed(config, tup):
            return tup
        tid, _ = _thread_ns(config)
        if self._guarded("read", lambda: self._run(self._expiry(tid, apply=False))):
            self.metrics.expired_reads.labels(self.name).inc()
            return None
        return tup

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Async `get_tuple`."""
        tup = await self._inner.aget_tuple(config)
        if tup is None or not self._read_check_needed(config, tup):
            return tup
        tid, _ = _thread_ns(config)
        if await self._aguarded("read", lambda: self._arun(self._expiry(tid, apply=False))):
            self.metrics.expired_reads.labels(self.name).inc()
            return None
        return tup

    # `list` and `alist` are twins on purpose, as the wrapped saver's sync and async
    # calls are: one body cannot both await and not.
    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """The wrapped saver's `list`; nothing for an expired thread.

        Only a listing of one thread is checked (before it starts: the savers
        hold their lock while listing); a listing of every thread is not.
        """
        if config is not None and self._read_check_needed(config, None):
            tid, _ = _thread_ns(config)
            if self._guarded("read", lambda: self._run(self._expiry(tid, apply=False))):
                self.metrics.expired_reads.labels(self.name).inc()
                return
        yield from self._inner.list(config, filter=filter, before=before, limit=limit)

    # The async twin of `list` (see there).
    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """Async `list`."""
        if config is not None and self._read_check_needed(config, None):
            tid, _ = _thread_ns(config)
            if await self._aguarded("read", lambda: self._arun(self._expiry(tid, apply=False))):
                self.metrics.expired_reads.labels(self.name).inc()
                return
        async for tup in self._inner.alist(config, filter=filter, before=before, limit=limit):
            yield tup

    def _read_check_needed(self, config: RunnableConfig, tup: CheckpointTuple | None) -> bool:
        """Whether a read must ask the store if its thread expired.

        Not when the thread is known fresh, nor when the checkpoint just read
        is younger than `expire_after` (the thread's newest is younger still).
        """
        if not self._expire_on_read or "thread_id" not in config.get("configurable", {}):
            return False
        tid, ns = _thread_ns(config)
        head = tup is not None and ns == "" and not config["configurable"].get("checkpoint_id")
        # Only the thread's newest root checkpoint carries its per-thread TTL.
        ttl = self._ttl_of(tup.metadata if tup is not None and head else None)
        now = self._clock()
        with self._state.lock:
            if now < self._state.fresh_until.get(tid, 0.0):
                return False
            if tup is not None and ttl is not None:
                t = checkpoint_time(str(tup.checkpoint.get("id", "")))
                if t is not None and now - t <= ttl:
                    self._state.fresh_until.put(tid, t + ttl)
                    return False
        return True

    def _ttl_of(self, head_metadata: Mapping[str, Any] | None) -> float | None:
        """The expiry TTL of a thread whose head has this metadata (None: not known here)."""
        if self._expire_seconds is not None or self._expiry_policy is None:
            return self._expire_seconds
        if head_metadata is None:
            return None
        return expiry_seconds(self._expiry_policy, head_metadata)[0]

    # -------------------------------------------------------------- explicit deletions

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Prune threads: `"keep_latest"` keeps each namespace's newest checkpoint, `"delete"` all.

        The wrapped saver's own `prune` where it has one (Postgres: the
        reference). Otherwise the official semantics through `policies.decide`
        with `keep_last: 1`: each namespace keeps its latest checkpoint (and
        what it needs: a `DeltaChannel` thread keeps the ancestors back to its
        snapshots), a subgraph call's namespace goes with its root checkpoint,
        a kept checkpoint whose parent went has none.

        Raises:
            TypeError: `thread_ids` is a single string.
            ValueError: Unknown strategy.
            NotImplementedError: `"keep_latest"` on a DeltaChannel thread whose
                history cannot be read; nothing is pruned then.
        """
        thread_ids = self._check_prune(thread_ids, strategy)
        if _overrides(type(self._inner), "prune"):
            self._inner.prune(thread_ids, strategy=strategy)
            self._state.forget(thread_ids)
            return
        self._run(self._prune(thread_ids, strategy))

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Async `prune`."""
        thread_ids = self._check_prune(thread_ids, strategy)
        if _overrides(type(self._inner), "aprune"):
            await self._inner.aprune(thread_ids, strategy=strategy)
            self._state.forget(thread_ids)
            return
        await self._arun(self._prune(thread_ids, strategy))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints whose `metadata.run_id` is one of `run_ids`, with their writes.

        `run_id` is in the metadata where the caller records it
        (`config["metadata"]["run_id"]`, as LangGraph Server does). A kept
        checkpoint whose parent went has none; blobs still referenced stay;
        ancestors a remaining `DeltaChannel` checkpoint replays stay. The
        wrapped saver's own `delete_for_runs` is used where it has one.
        """
        if isinstance(run_ids, str):
            raise TypeError("run_ids must be a sequence of run IDs, not a str")
        if _overrides(type(self._inner), "delete_for_runs"):
            self._inner.delete_for_runs(run_ids)
            return
        self._run(self._delete_for_runs([str(r) for r in run_ids]))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Async `delete_for_runs`."""
        if isinstance(run_ids, str):
            raise TypeError("run_ids must be a sequence of run IDs, not a str")
        if _overrides(type(self._inner), "adelete_for_runs"):
            await self._inner.adelete_for_runs(run_ids)
            return
        await self._arun(self._delete_for_runs([str(r) for r in run_ids]))

    def delete_checkpoints(
        self, before: datetime, thread_id: str | None = None, keep_newest: bool = True
    ) -> int:
        """Delete checkpoints written before `before`; returns how many went.

        A checkpoint's time is its UUIDv6 id's (else its `ts`); a naive
        `before` is local time, as `datetime.timestamp()` reads it. Every
        thread, or only `thread_id`. With `keep_newest` (default) a
        namespace's newest checkpoint always stays. Writes go with their
        checkpoints; what remaining checkpoints need (their `DeltaChannel`
        ancestors, a v < 4 sends parent) stays. Without `thread_id` every
        thread of the store is read, page by page.
        """
        return self._run(self._delete_checkpoints(before.timestamp(), thread_id, keep_newest))

    async def adelete_checkpoints(
        self, before: datetime, thread_id: str | None = None, keep_newest: bool = True
    ) -> int:
        """Async `delete_checkpoints`."""
        return await self._arun(
            self._delete_checkpoints(before.timestamp(), thread_id, keep_newest)
        )

    @staticmethod
    def _check_prune(thread_ids: Sequence[str], strategy: str) -> builtins.list[str]:
        if isinstance(thread_ids, str):
            raise TypeError("thread_ids must be a sequence of thread IDs, not a str")
        if strategy not in PRUNE_STRATEGIES:
            raise ValueError(f"Unknown prune strategy: {strategy!r}")
        return [str(t) for t in thread_ids]

    # -------------------------------------------------------------- programs

    def _decide(self, view: ThreadView, rules: Ruleset, now: float) -> ThreadDecision:
        decision = decide(view, rules, now, self._grace)
        for skip in decision.skips:
            self.metrics.skipped.labels(self.name, skip.reason.value).inc()
        return decision

    def _on_hold(self, thread_id: str, *, fresh: bool = False) -> Program[bool]:
        """Whether the thread is on legal hold: the store's holds, read every `holds_refresh`."""
        now = self._clock()
        with self._state.lock:
            held = None if fresh or now >= self._state.held_until else self._state.held
        if held is None:
            held = yield from ask(Holds())
            with self._state.lock:
                self._state.held, self._state.held_until = held, now + self._holds_refresh
        return thread_id in held

    def _expiry(self, thread_id: str, *, apply: bool) -> Program[bool]:
        """Whether the thread has expired (the worker's decision); with `apply`, delete it."""
        assert self._expiry_rules is not None and self._expiry_policy is not None
        if (yield from self._on_hold(thread_id)):
            # Never hidden, never expired; asked again on the next read or put.
            if apply:
                self.metrics.skipped.labels(self.name, SkipReason.HELD.value).inc()
            return False
        now = self._clock()
        scanned = yield from ask(Scan(thread_id))
        view = scanned.view
        if not view.checkpoints:
            return False
        decision = decide(view, self._expiry_rules, now, self._grace)
        if decision.needs_waiting:
            waiting = yield from ask(Waiting(view))
            # Unreadable counts as waiting: it only ever keeps a thread.
            view = replace(view, waiting=True if waiting is None else waiting)
            decision = decide(view, self._expiry_rules, now, self._grace)
        if decision.ttl_fallback is not None:
            self.metrics.ttl_fallbacks.labels(self.name, decision.ttl_fallback.reason.value).inc()
        if decision.expiry is None:
            ttl, _ = expiry_seconds(self._expiry_policy, view.head_metadata)
            assert ttl is not None
            newest = max((c.created_at or now for c in view.checkpoints), default=now)
            until = newest + ttl
            if until <= now:
                # Held back (waiting for input): ask again in a while, not on every read.
                until = now + min(_RECHECK_SECONDS, ttl)
                for skip in decision.skips:
                    self.metrics.skipped.labels(self.name, skip.reason.value).inc()
            with self._state.lock:
                self._state.fresh_until.put(thread_id, until)
            return False
        if not apply:
            return True
        counts = yield from ask(Expire(thread_id, scanned.stamp))
        if counts is None:
            # A run saved to the thread since the scan: it wins, the thread stays.
            self.metrics.skipped.labels(self.name, SkipReason.CHANGED.value).inc()
            return False
        self._state.forget([thread_id])
        self.metrics.count(self.name, "expired", counts)
        # The audit event of a whole-thread deletion, as the worker logs one.
        log.info(
            "thread deleted: thread_id=%s saver=%s reason=expired idle_seconds=%.0f checkpoints=%d",
            thread_id,
            self.name,
            decision.expiry.age_seconds,
            counts.checkpoints,
        )
        return True

    def _trim(self, thread_id: str) -> Program[Counts]:
        """Trim the thread to `keep_last` / `keep_within` (every namespace, calls with roots).

        Scan, decision and delete run in one transaction under the saver's lock.
        """
        rules = self._trim_rules
        assert rules is not None
        if (yield from self._on_hold(thread_id)):
            self.metrics.skipped.labels(self.name, SkipReason.HELD.value).inc()
            return Counts()
        now = self._clock()

        def choose(scanned: Scanned) -> dict[str, builtins.list[str]]:
            decision = self._decide(scanned.view, rules, now)
            return group_ids((d.namespace, d.checkpoint_id) for d in decision.deletions)

        counts = yield from ask(Trim(thread_id, choose))
        self.metrics.trims.labels(self.name).inc()
        self.metrics.count(self.name, "trimmed", counts)
        return counts

    def _prune(self, thread_ids: builtins.list[str], strategy: str) -> Program[None]:
        if not thread_ids:
            return
        if strategy == "delete":
            counts = yield from ask(DeleteThreads(thread_ids))
            self._state.forget(thread_ids)
            self.metrics.count(self.name, "prune", counts)
            for tid in thread_ids:
                log.info("thread deleted: thread_id=%s saver=%s reason=prune", tid, self.name)
            return
        now = self._clock()
        rules = Ruleset([Policy(name="prune", keep_last=1)])
        plans: builtins.list[tuple[str, dict[str, builtins.list[str]]]] = []
        refused: builtins.list[str] = []
        # Decide every thread first: a refusal prunes nothing, as the official prune.
        for tid in thread_ids:
            scanned = yield from ask(Scan(tid))
            decision = decide(_clip_times(scanned.view, now), rules, now, self._grace)
            if any(s.reason == SkipReason.UNDECODABLE for s in decision.skips):
                refused.append(tid)
            elif decision.deletions:
                plans.append(
                    (tid, group_ids((d.namespace, d.checkpoint_id) for d in decision.deletions))
                )
        if refused:
            raise NotImplementedError(
                "keep_latest can't prune threads that use a DeltaChannel whose history "
                f"cannot be read: {', '.join(sorted(refused))}"
            )
        for tid, ids in plans:
            counts = yield from ask(Delete(tid, ids))
            self.metrics.count(self.name, "prune", counts)
        self._state.forget(thread_ids)

    def _delete_for_runs(self, run_ids: builtins.list[str]) -> Program[None]:
        if not run_ids:
            return
        wanted = set(run_ids)
        thread_ids = yield from ask(ThreadsOfRuns(run_ids))
        for tid in thread_ids:
            scanned = yield from ask(Scan(tid))
            doomed = {key for key, run in scanned.run_ids.items() if run in wanted}
            doomed = self._spare_needed(scanned.view, doomed)
            if doomed:
                counts = yield from ask(Delete(tid, group_ids(sorted(doomed))))
                self.metrics.count(self.name, "delete_for_runs", counts)
        self._state.forget(thread_ids)

    def _delete_checkpoints(
        self, cutoff: float, thread_id: str | None, keep_newest: bool
    ) -> Program[int]:
        total = 0
        # A deletion by age is retention: held threads keep everything. Read
        # now, not from the cache: it is an explicit, one-off call.
        yield from self._on_hold("", fresh=True)
        if thread_id is not None:
            return (yield from self._delete_older(str(thread_id), cutoff, keep_newest))
        # Page by page (flat memory): a keyset cursor on the thread id is not
        # shifted by what the pages before it deleted. None: from the first id
        # (a cursor of "" would skip the empty id).
        after: str | None = None
        while True:
            page = yield from ask(ThreadPage(after, _PAGE))
            for tid in page:
                total += yield from self._delete_older(tid, cutoff, keep_newest)
            if len(page) < _PAGE:
                return total
            after = page[-1]

    def _delete_older(self, thread_id: str, cutoff: float, keep_newest: bool) -> Program[int]:
        """One thread's share of `delete_checkpoints`."""
        if (yield from self._on_hold(thread_id)):
            self.metrics.skipped.labels(self.name, SkipReason.HELD.value).inc()
            return 0
        scanned = yield from ask(Scan(thread_id))
        cps = scanned.view.checkpoints
        doomed = {
            (c.namespace, c.checkpoint_id)
            for c in cps
            if c.created_at is not None and c.created_at < cutoff
        }
        if keep_newest:
            newest: dict[str, str] = {}
            for c in cps:
                newest[c.namespace] = max(newest.get(c.namespace, ""), c.checkpoint_id)
            doomed -= set(newest.items())
        doomed = self._spare_needed(scanned.view, doomed)
        if not doomed:
            return 0
        counts = yield from ask(Delete(thread_id, group_ids(sorted(doomed))))
        self.metrics.count(self.name, "delete_checkpoints", counts)
        self._state.forget([thread_id])
        return counts.checkpoints

    def _spare_needed(self, view: ThreadView, doomed: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """`doomed` less what the checkpoints that stay need (the decision's own closure).

        A v < 4 checkpoint's sends parent and a `DeltaChannel` checkpoint's
        ancestors back to its snapshots stay; a namespace whose delta history
        cannot be read keeps everything.
        """
        if not doomed:
            return doomed
        by_ns: dict[str, dict[str, CheckpointSummary]] = {}
        for c in view.checkpoints:
            by_ns.setdefault(c.namespace, {})[c.checkpoint_id] = c
        delta_channels = delta_channels_of(view.checkpoints)
        out: set[tuple[str, str]] = set()
        for ns, by_id in by_ns.items():
            mine = {cid for n, cid in doomed if n == ns}
            if not mine:
                continue
            remaining = set(by_id) - mine
            try:
                keep = close_keep(by_id, remaining, delta_channels)
            except UndecodableHistory:
                self.metrics.skipped.labels(self.name, SkipReason.UNDECODABLE.value).inc()
                log.warning(
                    "kept namespace %r of thread %s: its DeltaChannel history cannot be read",
                    ns,
                    view.thread_id,
                )
                continue
            out |= {(ns, cid) for cid in mine - keep}
        return out

    # -------------------------------------------------------------- drivers

    def _run(self, program: Program[T]) -> T:
        """Drive a program with the backend's sync operations."""
        return run(program, self._backend)

    async def _arun(self, program: Program[T]) -> T:
        """Drive a program with the backend's async operations."""
        return await arun(program, self._backend)

    def _guarded(self, operation: str, fn: Callable[[], T]) -> T | None:
        """Retention on the application's path: a failure is logged and counted, never raised."""
        try:
            return fn()
        except Exception:
            self._failed(operation)
            return None

    async def _aguarded(self, operation: str, fn: Callable[[], Any]) -> Any:
        try:
            return await fn()
        except Exception:
            self._failed(operation)
            return None

    def _failed(self, operation: str) -> None:
        self.metrics.failures.labels(self.name, operation).inc()
        log.warning("retention %s failed on saver %s", operation, self.name, exc_info=True)


class _CopyingRetentionSaver(RetentionSaver):
    """A `RetentionSaver` around a saver that implements `copy_thread`: passed through."""

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Passed through."""
        self._inner.copy_thread(source_thread_id, target_thread_id)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Passed through."""
        await self._inner.acopy_thread(source_thread_id, target_thread_id)
