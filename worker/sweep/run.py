"""One sweep: one pass over one store applying every due policy.

Pages through the store's threads (keyset), decides each with
`policies.decide`, and hands the engine batches sized by a target
transaction time. First match is decided over the whole policy list; only the
due policies' decisions are carried out.

The safety limit is all-or-nothing: trims are carried out as the pass goes,
but expiries are only noted (thread id and fingerprint) until the pass ends.
Then, knowing how many threads the sweep would expire, it expires all of them
or, past `max_delete_fraction` of the threads counted at its start, none.
"""

from __future__ import annotations

import asyncio
import json
import math
import tempfile
import time
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Container,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO, Protocol, TypeVar

import structlog

from policies.config import BatchSettings, Policy
from policies.decide import last_activity
from policies.matching import Ruleset
from policies.model import Reason, Skip, SkipReason, ThreadDecision, TtlFallbackReason
from policies.plan import ThreadAggregate, plannable
from policies.plan import ThreadPlan as AggregatePlan
from worker.stores.archive import Archive, ArchiveError, ArchiveFactory
from worker.stores.engine import (
    AggregateStore,
    ArchivingStore,
    Counts,
    Fingerprint,
    ScannedThread,
    StoreEngine,
    StoreError,
    ThreadWork,
    TrimRange,
    WorkResult,
    WriterAware,
    fingerprint_of,
)
from worker.stores.space import Reclaimed
from worker.stores.throttle import BatchSizer, Pacer
from worker.stores.timestamps import iso_utc
from worker.sweep.orphans import OrphanLookup, RegistryFailure
from worker.sweep.planning import PagePlanner, PlannedPage, decide_scanned
from worker.sweep.quota import Decided, Eviction, QuotaPass
from worker.sweep.tasks import cancel_and_wait

log = structlog.get_logger("checkpoint_janitor.sweep")

_P = TypeVar("_P")


class Outcome(StrEnum):
    """How a sweep ended (`sweeps_total{outcome}`)."""

    SUCCESS = "success"
    FAILED = "failed"
    SAFETY_STOP = "safety_stop"
    LOCKED = "locked"
    """Another worker holds the store's sweep lock; this one did nothing."""
    STOPPED = "stopped"
    """Asked to stop (SIGTERM) at a batch boundary."""


@dataclass(slots=True)
class PolicyReport:
    """What one policy did (or, in a dry run, would do) in a sweep."""

    policy: str
    deleted: Counts = field(default_factory=Counts)
    by_reason: dict[Reason, Counts] = field(default_factory=dict)
    eligible: Counts = field(default_factory=Counts)
    """What the scan found due, before the safety limit and concurrent changes."""
    oldest_eligible_age: float | None = None
    skipped: Counter[SkipReason] = field(default_factory=Counter)
    ttl_fallbacks: Counter[TtlFallbackReason] = field(default_factory=Counter)
    """Threads whose own TTL (`expire_after: {metadata_key}`) fell back to the default."""
    acted_threads: int = 0
    """Threads this sweep queued work for under the policy (`max_threads_per_sweep` caps it)."""
    registry_error: RegistryFailure | None = None
    """(`orphaned`) its registry gave no answer: the policy matched nothing this sweep."""

    def see_eligible(self, checkpoints: int, threads: int, age: float | None) -> None:
        """Count rows found due; remember the oldest."""
        self.eligible.checkpoints += checkpoints
        self.eligible.threads += threads
        if age is not None and (self.oldest_eligible_age is None or age > self.oldest_eligible_age):
            self.oldest_eligible_age = age


@dataclass(slots=True)
class SweepReport:
    """The outcome of one sweep of one store."""

    store: str
    dry_run: bool
    now: float
    policies: dict[str, PolicyReport]
    outcome: Outcome = Outcome.SUCCESS
    threads_total: int = 0
    threads_scanned: int = 0
    expiry_limit: int = 0
    """The most threads this sweep may expire (`max_delete_fraction` of `threads_total`)."""
    limit_lifted: bool = False
    """`--allow-mass-expiry` or `defaults.allow_mass_expiry`: the limit does not apply."""
    expiries_wanted: int = 0
    """Threads the policies would expire in this sweep, all counted before any is expired."""
    expiries_by_policy: Counter[str] = field(default_factory=Counter)
    """`expiries_wanted` per policy."""
    limit_reached_by: str | None = None
    """The policy whose expiry went past the safety limit."""
    batches: int = 0
    longest_batch_seconds: float = 0.0
    duration_seconds: float = 0.0
    changed_threads: int = 0
    locked_threads: int = 0
    """(SQLite) threads of batches that never got the write lock: decided again next sweep."""
    held_threads: int | None = None
    """Legal holds in the store when the sweep started (`checkpoint_janitor_held_threads`);
    None: not read (the sweep failed or was locked out first)."""
    error: str | None = None
    reachable: bool = True
    """False when the store could not be opened at all (`store_up` 0)."""
    reclaim: Reclaimed | None = None
    """The store's space after the sweep, and what `reclaim.after_sweep` gave back."""
    over_quota: dict[tuple[str, str], int] = field(default_factory=dict)
    """(policy, group) -> bytes still over its cap once the sweep's plan is done; ("", "")
    is the store's `max_bytes` (always there when set, 0 when under)."""
    archived_rows: dict[str, int] = field(default_factory=dict)
    """Rows per store table written to the archive by batches that committed."""
    archive_bytes: int = 0
    """Bytes of the archive segments those batches wrote."""
    archive_failed: bool = False
    """A batch could not archive, so it deleted nothing and the sweep failed."""

    @property
    def deleted(self) -> Counts:
        """Totals over every policy."""
        total = Counts()
        for p in self.policies.values():
            total.add(p.deleted)
        return total

    @property
    def would_hit_limit(self) -> bool:
        """The safety limit stops (or, in a dry run, would stop) this sweep: it expires none."""
        return not self.limit_lifted and self.expiries_wanted > self.expiry_limit


@dataclass(slots=True)
class ThreadPlan:
    """What one thread loses under one policy for one reason (`plan --threads`, one entry)."""

    store: str
    thread_id: str
    policy: str
    reason: Reason
    last_activity: float | None
    """Unix time of the thread's newest checkpoint or write; None when nothing dates it."""
    idle_seconds: float | None
    counts: Counts = field(default_factory=Counts)
    held: bool = False
    """An expiry the safety limit holds back: the sweep would expire none."""

    @property
    def action(self) -> str:
        """`expire` (the whole thread goes) or `trim` (some of its rows go)."""
        return "expire" if self.reason.whole_thread else "trim"


ThreadFn = Callable[[ThreadPlan], None]


@dataclass(slots=True)
class _Part:
    work: ThreadWork
    policy: str
    reason: Reason
    last_activity: float | None = None


@dataclass(frozen=True, slots=True)
class _Eligible:
    """Rows a thread's parts found due under one policy; the pass counts them in its report."""

    policy: str
    checkpoints: int
    oldest_age: float | None


@dataclass(frozen=True, slots=True)
class _Expiring:
    """An expiry the pass found, held until it knows the sweep's whole expiry count."""

    thread_id: str
    fingerprint: Fingerprint
    policy: str
    age_seconds: float
    checkpoints: int
    bytes: int
    reason: Reason = Reason.EXPIRED

    def part(self, now: float) -> _Part:
        work = ThreadWork(
            self.thread_id,
            self.fingerprint,
            expire=True,
            defer_blobs=True,
            estimate=max(self.checkpoints, 1),
            bytes=self.bytes,
        )
        return _Part(work, self.policy, self.reason, now - self.age_seconds)


class _DeferredExpiries:
    """The pass's expiries, in scan order: in memory up to `in_memory`, the rest in a temp file.

    A store may hold millions of idle threads; the file keeps the sweep's
    memory flat however many the pass finds.
    """

    def __init__(self, in_memory: int = 10_000) -> None:
        self.in_memory = in_memory
        self._held: list[_Expiring] = []
        self._spill: IO[str] | None = None
        self._keeping = True

    def add(self, e: _Expiring) -> None:
        """Hold `e` (unless `drop` was called)."""
        if not self._keeping:
            return
        self._held.append(e)
        if len(self._held) >= self.in_memory:
            if self._spill is None:
                # Closed by `close()`, which the sweep calls in a `finally`.
                self._spill = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115
            for x in self._held:
                row = [
                    x.thread_id,
                    x.fingerprint,
                    x.policy,
                    x.age_seconds,
                    x.checkpoints,
                    x.bytes,
                    x.reason.value,
                ]
                self._spill.write(json.dumps(row) + "\n")
            self._held.clear()

    def drop(self) -> None:
        """Forget every expiry and hold no more: the sweep expires none of them."""
        self._keeping = False
        self.close()

    def __iter__(self) -> Iterator[_Expiring]:
        if self._spill is not None:
            self._spill.seek(0)
            for line in self._spill:
                tid, fp, policy, age, checkpoints, size, reason = json.loads(line)
                fingerprint = tuple((ns, n, newest) for ns, n, newest in fp)
                yield _Expiring(tid, fingerprint, policy, age, checkpoints, size, Reason(reason))
        yield from self._held

    def close(self) -> None:
        """Release the memory and the temp file."""
        self._held.clear()
        if self._spill is not None:
            self._spill.close()
            self._spill = None


@dataclass(slots=True)
class SweepOptions:
    """How a sweep runs, from the config and the command line."""

    settings: BatchSettings
    max_delete_fraction: float = 0.5
    dry_run: bool = False
    allow_mass_expiry: bool = False
    due: frozenset[str] | None = None
    """Policies to carry out; None: all. First match still sees every policy."""
    expiries_in_memory: int = 10_000
    """Expiries the pass holds in memory; the rest wait in a temporary file."""
    max_bytes: int | None = None
    """The store's size cap (`stores[].max_bytes`)."""
    plan_from_aggregates: bool = True
    """Plan from aggregates where the engine offers them; False: decide every thread
    from its rows (the reference the aggregate plan is tested against)."""
    archive: ArchiveFactory | None = None
    """The store's archive (`stores[].archive`): every batch archives what it deletes."""
    residue_check_every: float = 0.0
    """Seconds between passes that look at every quiet thread for residue
    (`defaults.residue_check_every`); 0: every pass looks."""


ProgressFn = Callable[[int, int], None]
BatchFn = Callable[[float], None]


async def sweep(
    engine: StoreEngine,
    policies: Sequence[Policy],
    options: SweepOptions,
    *,
    now: float | None = None,
    stop: asyncio.Event | None = None,
    progress: ProgressFn | None = None,
    on_batch: BatchFn | None = None,
    on_thread: ThreadFn | None = None,
) -> SweepReport:
    """Sweep `engine` once under `policies`; never raises for a store fault (see `outcome`).

    `stop` ends the sweep at the next batch boundary; `on_batch` hears each
    delete transaction's duration; `on_thread` hears, per thread, policy and
    reason, what went (or, in a dry run, would go), as soon as it is known.
    """
    started = time.monotonic()
    # One clock read per sweep: every decision in it sees the same "now".
    now = time.time() if now is None else now
    rules = Ruleset(policies)
    report = SweepReport(
        store=engine.name,
        dry_run=options.dry_run,
        now=now,
        policies={p.name: PolicyReport(p.name) for p in policies},
    )
    try:
        await _run(engine, rules, options, report, stop, progress, on_batch, on_thread)
    except Exception as e:
        report.outcome = Outcome.FAILED
        report.error = f"{type(e).__name__}: {e}"
        report.archive_failed = isinstance(e, ArchiveError)
        log.error("sweep_failed", store=engine.name, error=report.error)
    report.duration_seconds = time.monotonic() - started
    _log_summary(report)
    return report


async def _run(
    engine: StoreEngine,
    rules: Ruleset,
    options: SweepOptions,
    report: SweepReport,
    stop: asyncio.Event | None,
    progress: ProgressFn | None,
    on_batch: BatchFn | None,
    on_thread: ThreadFn | None,
) -> None:
    if not await engine.begin_sweep(report.now):
        report.outcome = Outcome.LOCKED
        log.info("sweep_skipped", store=engine.name, reason="another worker holds the sweep lock")
        return
    deferred = _DeferredExpiries(options.expiries_in_memory)
    orphans: OrphanLookup | None = None
    archive: Archive | None = None
    try:
        if options.archive is not None and not options.dry_run:
            archive = await open_archive(engine, options.archive, report.now)
        if rules.has_orphan_policies:
            orphans = await OrphanLookup.open(engine, rules.policies, options.settings)
        pass_ = _Pass(engine, rules, options, report, stop, on_batch, on_thread, deferred)
        pass_.orphans = orphans
        pass_.archive = archive
        await pass_.run(progress)
    finally:
        if archive is not None:
            report.archived_rows = dict(archive.completed_rows)
            report.archive_bytes = archive.completed_bytes
            archive.close()
        deferred.close()
        if orphans is not None:
            await orphans.close()
            for name, failure in orphans.failed.items():
                if name in report.policies:
                    report.policies[name].registry_error = failure
        await engine.end_sweep()


async def open_archive(engine: StoreEngine, factory: ArchiveFactory, now: float) -> Archive:
    """The archive of a sweep (or purge) started at `now`, with the `.pending` segments
    earlier runs left settled first (so nothing is counted twice as complete)."""
    if not isinstance(engine, ArchivingStore):
        # Deleting without the archive the config asks for would lose data for good.
        raise StoreError(engine.name, "this store engine cannot archive; remove `archive`")
    archive = factory(now)
    try:
        recovered = await engine.recover_archive(archive)
    except BaseException:
        archive.close()
        raise
    if recovered.promoted or recovered.discarded:
        log.info(
            "archive_recovered",
            store=engine.name,
            promoted=recovered.promoted,
            discarded=recovered.discarded,
        )
    return archive


class _Pass:
    """One sweep's pass: trims carried out as pages are decided, expiries after, all or none."""

    # Field by field, like the other planners' and engines' constructors: each class's
    # own settings, so their alike shape is not logic to share.
    def __init__(
        self,
        engine: StoreEngine,
        rules: Ruleset,
        options: SweepOptions,
        report: SweepReport,
        stop: asyncio.Event | None,
        on_batch: BatchFn | None,
        on_thread: ThreadFn | None,
        deferred: _DeferredExpiries,
    ) -> None:
        self.engine = engine
        self.rules = rules
        self.options = options
        self.report = report
        self.stop = stop
        self.on_batch = on_batch
        self.on_thread = on_thread
        self.deferred = deferred
        s = options.settings
        # `max_batch_rows` is a hard cap: on the first batch and on the floor too.
        self.sizer = BatchSizer(
            target_seconds=s.target_batch_seconds,
            max_rows=s.max_batch_rows,
            min_rows=min(20, s.max_batch_rows),
            rows=min(500, s.max_batch_rows),
        )
        self.pacer = Pacer(pause=s.pause, pause_factor=s.pause_factor)
        self.pending: list[_Part] = []
        self.pending_rows = 0
        self.entries: dict[tuple[str, str, Reason], ThreadPlan] = {}
        """The trims of the thread being carried out, until its last part is done."""
        self.caps = {
            p.name: p.max_threads_per_sweep
            for p in rules.policies
            if p.max_threads_per_sweep is not None
        }
        self.on_hold: frozenset[str] = frozenset()
        """Threads under a legal hold, read once at the start (the set is small)."""
        self.counting: asyncio.Future[int] | None = None
        """`count_threads`, started with the pass; `_know_limit` takes its answer."""
        self.held_late: set[str] = set()
        """Threads a batch found on hold that the start did not: counted once each."""
        self.orphans: OrphanLookup | None = None
        """The registries of `orphaned` policies, asked once per page."""
        self.archive: Archive | None = None
        """Where every batch archives what it deletes (None: the store has no archive)."""
        self.quota = QuotaPass(
            engine.name,
            options.max_bytes,
            rules.policies,
            options.due,
            options.settings.page_threads,
        )

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    async def run(self, progress: ProgressFn | None) -> None:
        """The pass; the thread count behind the safety limit is read beside its first pages."""
        self.counting = asyncio.ensure_future(self.engine.count_threads())
        try:
            await self._run(progress)
        finally:
            if self.counting is not None:
                await cancel_and_wait([self.counting])

    async def _know_limit(self) -> None:
        """`threads_total` and the safety limit, once `count_threads` has answered.

        Awaited before the pass's first expiry is noted and after its walk: the
        count (a scan of the primary-key index, on SQLite on the connection the
        planner does not use) overlaps the first pages' planning.
        """
        if self.counting is None:
            return
        counting, self.counting = self.counting, None
        report, options = self.report, self.options
        report.threads_total = await counting
        report.expiry_limit = (
            report.threads_total
            if options.allow_mass_expiry
            else math.floor(options.max_delete_fraction * report.threads_total)
        )

    async def _run(self, progress: ProgressFn | None) -> None:
        engine, options, report = self.engine, self.options, self.report
        # Read once; a hold placed later is caught by the batch's own re-check.
        self.on_hold = frozenset(h.thread_id for h in await engine.holds())
        report.held_threads = len(self.on_hold)
        report.limit_lifted = options.allow_mass_expiry
        page_threads = options.settings.page_threads
        # The row-level path reads every thread's residue: all due policies' look.
        residue: frozenset[str] | None = None
        if self._from_aggregates():
            grace = options.settings.grace_period.total_seconds()
            residue = await self._residue_due()
            answers = self.orphans.answers if self.orphans is not None else None
            planner = PagePlanner(
                engine, self.rules, report.now, grace, residue=residue, answers=answers
            )
            done = await self._walk(planner.pages(page_threads), self._planned_page, progress)
        else:
            done = await self._walk(engine.thread_pages(page_threads), self._page, progress)
        await self._know_limit()
        if not done or not await self._drain():
            return
        # Trims and residue are carried out by now; expiries never carry residue.
        await self._record_residue(residue)
        self._emit_entries()
        if self.quota.active:
            # After the trims, before any expiry: evictions count in the safety limit.
            await self.quota.evict(engine, self)
            report.over_quota = dict(self.quota.over)
            if self.stopped():
                report.outcome = Outcome.STOPPED
                return
        if report.would_hit_limit:
            report.outcome = Outcome.SAFETY_STOP
            await self._hold_expiries()
            return
        for e in self.deferred:
            if self.orphans is not None and e.policy in self.orphans.failed:
                continue  # its registry failed after this page: no answer is trusted
            if not await self._add(e.part(report.now)):
                return
        if await self._drain():
            self._emit_entries()

    def _residue_policies(self) -> list[str]:
        """The due policies that collect residue (a protected thread keeps its own)."""
        due = self.options.due
        return [
            p.name for p in self.rules.policies if not p.protect and (due is None or p.name in due)
        ]

    async def _residue_due(self) -> frozenset[str] | None:
        """The policies whose quiet threads this pass looks at for residue (None: all).

        Due when the last look at them started `residue_check_every` ago or
        longer, or is unknown, or lies ahead of this sweep's clock.
        """
        every = self.options.residue_check_every
        engine = self.engine
        if every <= 0 or not isinstance(engine, AggregateStore):
            return None
        checked = await engine.residue_checks()
        now = self.report.now
        return frozenset(
            name
            for name in self._residue_policies()
            if (at := checked.get(name)) is None or not 0 <= now - at < every
        )

    async def _record_residue(self, looked: frozenset[str] | None) -> None:
        """Date the look this pass took at quiet threads' residue, when it was complete.

        Not when a batch never got the write lock (what it would have
        collected is still there), nor for a policy whose `max_threads_per_sweep`
        or failed registry kept some of its threads out of the pass.
        """
        engine, options, report = self.engine, self.options, self.report
        if options.dry_run or options.residue_check_every <= 0 or report.locked_threads:
            return
        if not isinstance(engine, AggregateStore):
            return
        failed = self.orphans.failed if self.orphans is not None else {}
        names = [
            n
            for n in (self._residue_policies() if looked is None else sorted(looked))
            if not report.policies[n].skipped[SkipReason.SWEEP_LIMIT] and n not in failed
        ]
        if not names:
            return
        try:
            await engine.record_residue_checks(names, report.now)
        except StoreError as e:
            # Only the cadence is lost: the next pass looks everywhere again.
            log.warning("residue_check_not_recorded", store=engine.name, error=str(e))

    def _from_aggregates(self) -> bool:
        """Whether this pass plans from aggregates (`policies.plan`), not from every row.

        The aggregate planner knows ages, counts, waiting, delta markers and
        (per page, from the registries) orphan status; holds, size caps,
        per-thread TTLs and idle-gated trims are decided from rows
        (`policies.decide`), so a pass that meets any of them reads rows, as
        every pass did before.
        """
        return (
            self.options.plan_from_aggregates
            and not self.on_hold
            and not self.quota.active
            and all(plannable(p) for p in self.rules.policies)
        )

    async def _walk(
        self,
        pages: AsyncIterator[_P],
        handle: Callable[[_P], Awaitable[None]],
        progress: ProgressFn | None,
    ) -> bool:
        """Hand every page to `handle`; False when the pass stopped."""
        report = self.report
        try:
            async for page in pages:
                if self.stopped():
                    report.outcome = Outcome.STOPPED
                    return False
                await handle(page)
                if report.outcome is Outcome.STOPPED:
                    return False
                if progress is not None:
                    await self._know_limit()
                    progress(report.threads_scanned, report.threads_total)
        finally:
            close = getattr(pages, "aclose", None)
            if close is not None:
                await close()
        return True

    async def decide_page(
        self, page: list[str], count_held: bool = True
    ) -> tuple[Ruleset, Decided]:
        """Scan and decide `page` (only the due policies' decisions).

        Held threads are dropped before deciding, so no cap or rule ever sees
        them; they are counted as skipped once, in the sweep's own pass
        (`count_held`), not again in a size cap's extra walks.
        """
        engine, rules, report = self.engine, self.rules, self.report
        grace = self.options.settings.grace_period.total_seconds()
        candidates = [t for t in page if rules.could_match_thread(t)]
        if self.orphans is not None and candidates:
            rules = rules.for_page(await self.orphans.answers(candidates))
        scanned = await engine.scan(candidates) if candidates else []
        scanned = self._skip_held(scanned, count_held)
        decided = await decide_scanned(engine, scanned, rules, report.now, grace)
        return rules, [(t, _only_due(d, self.options.due)) for t, d in decided]

    def evict(self, eviction: Eviction) -> None:
        """A size cap's eviction: an expiry like any other, reason `quota`."""
        e = eviction
        self._defer_expiry(
            e.thread_id,
            e.fingerprint,
            e.policy,
            self.report.now - e.last_activity,
            e.checkpoints,
            e.size,
            Reason.QUOTA,
        )

    async def _page(self, page: list[str]) -> None:
        """A page of thread ids decided from their rows (`decide_page`)."""
        report = self.report
        rules, decided = await self.decide_page(page)
        report.threads_scanned += len(page)
        if self.quota.active:
            await self.quota.observe(self.engine, page, rules, decided)
        for thread, decision in decided:
            if not await self._decided(thread, decision, rules):
                return

    async def _planned_page(self, page: PlannedPage) -> None:
        """A page planned from aggregates: its plans, then the threads handed to rows."""
        self.report.threads_scanned += page.threads
        for agg, plan in page.plans:
            if not await self._planned(agg, _plan_due(plan, self.options.due)):
                return
        for thread, decision in page.decided:
            if not await self._decided(thread, _only_due(decision, self.options.due), page.rules):
                return

    def _skips(self, skips: tuple[Skip, ...]) -> None:
        for skip in skips:
            self.report.policies[skip.policy].skipped[skip.reason] += 1

    async def _planned(self, agg: ThreadAggregate, plan: AggregatePlan) -> bool:
        """A thread planned from aggregates; False when asked to stop."""
        self._skips(plan.skips)
        fingerprint = tuple(sorted((a.namespace, a.count, a.newest_id) for a in agg.namespaces))
        if plan.expiry is not None:
            await self._know_limit()
            # Its size is unknown until deleted: the engine sizes what it deletes.
            checkpoints = sum(a.count for a in agg.namespaces)
            e = plan.expiry
            self._defer_expiry(
                agg.thread_id, fingerprint, e.policy, e.age_seconds, checkpoints, 0, e.reason
            )
            return True
        parts, eligible = _plan_parts(agg, plan, self.report.policies, self.sizer.rows)
        self._see(eligible)
        for part in self._within_caps(parts):
            if not await self._add(part):
                return False
        return True

    async def _decided(
        self, thread: ScannedThread, decision: ThreadDecision, rules: Ruleset
    ) -> bool:
        """A thread decided from its rows; False when asked to stop."""
        report = self.report
        self._skips(decision.skips)
        if decision.ttl_fallback is not None:
            fallback = decision.ttl_fallback
            report.policies[fallback.policy].ttl_fallbacks[fallback.reason] += 1
        if decision.expiry is not None:
            await self._know_limit()
            e = decision.expiry
            self._defer(thread, e.policy, e.age_seconds, e.reason)
            return True
        parts, eligible = _parts(
            thread, decision, report.now, report.policies, self.sizer.rows, rules
        )
        self._see(eligible)
        for part in self._within_caps(parts):
            if not await self._add(part):
                return False
        return True

    def _see(self, eligible: list[_Eligible]) -> None:
        for e in eligible:
            self.report.policies[e.policy].see_eligible(e.checkpoints, 0, e.oldest_age)

    def _capped(self, policy: str) -> bool:
        """Whether `policy` has acted on its `max_threads_per_sweep` threads; else count one."""
        cap = self.caps.get(policy)
        pr = self.report.policies[policy]
        if cap is not None and pr.acted_threads >= cap:
            pr.skipped[SkipReason.SWEEP_LIMIT] += 1
            return True
        pr.acted_threads += 1
        return False

    def _within_caps(self, parts: list[_Part]) -> list[_Part]:
        """A thread's parts, without those of policies that reached their per-sweep cap."""
        capped = {p for p in dict.fromkeys(part.policy for part in parts) if self._capped(p)}
        return [part for part in parts if part.policy not in capped]

    def _skip_held(self, scanned: list[ScannedThread], count: bool) -> list[ScannedThread]:
        """`scanned` without the held threads, which no policy decides on at all.

        Each policy that would govern one of a held thread's namespaces counts
        it as skipped (`held`), whatever it would have done: the hold is what
        an operator wants to see working.
        """
        if not self.on_hold:
            return scanned
        out = []
        for t in scanned:
            view = t.view
            if view.thread_id not in self.on_hold:
                out.append(t)
                continue
            namespaces = {c.namespace for c in view.checkpoints} or {""}
            governing = {
                p.name
                for ns in namespaces
                if (p := self.rules.first_match(view.thread_id, ns, view.head_metadata))
                and not p.protect
                and (self.options.due is None or p.name in self.options.due)
            }
            for name in governing if count else ():
                self.report.policies[name].skipped[SkipReason.HELD] += 1
        return out

    def _defer(
        self, thread: ScannedThread, policy: str, age: float, reason: Reason = Reason.EXPIRED
    ) -> None:
        view = thread.view
        size = sum(c.size for c in view.checkpoints)
        self._defer_expiry(
            view.thread_id, thread.fingerprint, policy, age, len(view.checkpoints), size, reason
        )

    def _defer_expiry(
        self,
        thread_id: str,
        fingerprint: Fingerprint,
        policy: str,
        age: float,
        checkpoints: int,
        size: int,
        reason: Reason,
    ) -> None:
        """Note an expiry; once past the limit, a real sweep forgets them all (it expires none)."""
        report = self.report
        report.expiries_wanted += 1
        report.expiries_by_policy[policy] += 1
        report.policies[policy].see_eligible(checkpoints, 1, age)
        if report.would_hit_limit and report.limit_reached_by is None:
            report.limit_reached_by = policy
            if not self.options.dry_run:
                self.deferred.drop()
        # Counted above even past the cap: the safety limit weighs everything the
        # policies want, so a wrong clock cannot eat the store `max_threads_per_sweep` a time.
        if self._capped(policy):
            return
        self.deferred.add(_Expiring(thread_id, fingerprint, policy, age, checkpoints, size, reason))

    async def _add(self, part: _Part) -> bool:
        """Queue `part`, flushing a full batch; False when asked to stop."""
        self.pending.append(part)
        self.pending_rows += part.work.rows
        s = self.options.settings
        if self.pending_rows >= self.sizer.rows or len(self.pending) >= s.max_batch_threads:
            return await self._drain()
        return True

    async def _drain(self) -> bool:
        """Carry out the queued parts; False when asked to stop."""
        if self.pending:
            parts, self.pending, self.pending_rows = self.pending, [], 0
            await self._flush(parts)
        if self.stopped():
            self.report.outcome = Outcome.STOPPED
            return False
        return True

    async def _flush(self, parts: list[_Part]) -> None:
        t0 = time.monotonic()
        results = await self._apply([p.work for p in parts])
        elapsed = time.monotonic() - t0
        rows = sum(self._tally(part, result) for part, result in zip(parts, results, strict=True))
        self.report.batches += 1
        self.report.longest_batch_seconds = max(self.report.longest_batch_seconds, elapsed)
        await self._pace(parts, rows, elapsed)

    async def _apply(self, works: list[ThreadWork]) -> list[WorkResult]:
        """One batch through the engine, into the archive when the sweep archives."""
        if self.archive is not None:
            assert isinstance(self.engine, ArchivingStore)  # `open_archive` checked it
            return await self.engine.apply(works, self.options.dry_run, self.archive)
        return await self.engine.apply(works, self.options.dry_run)

    def _tally(self, part: _Part, result: WorkResult) -> int:
        """Count one part's result into the report; the rows it deleted (0 when kept whole)."""
        report = self.report
        pr = report.policies[part.policy]
        if result.on_hold:
            # Held after the scan: the batch's re-check kept it whole.
            if part.work.thread_id not in self.held_late:
                self.held_late.add(part.work.thread_id)
                pr.skipped[SkipReason.HELD] += 1
            return 0
        if result.locked:
            report.locked_threads += 1
            pr.skipped[SkipReason.LOCKED] += 1
            return 0
        if result.changed:
            report.changed_threads += 1
            pr.skipped[SkipReason.CHANGED] += 1
            return 0
        if part.work.bytes:
            # Sized at the scan; set-based deletes size what they delete.
            result.counts.bytes = part.work.bytes
        pr.deleted.add(result.counts)
        pr.by_reason.setdefault(part.reason, Counts()).add(result.counts)
        self._note(part, result)
        if part.work.expire:
            self._log_expired(part, result)
        return result.counts.checkpoints + result.counts.writes

    def _log_expired(self, part: _Part, result: WorkResult) -> None:
        idle = self.report.now - part.last_activity if part.last_activity is not None else None
        log.info(
            "thread_expired" if not self.options.dry_run else "thread_would_expire",
            store=self.engine.name,
            thread_id=part.work.thread_id,
            policy=part.policy,
            reason=part.reason.value,
            last_activity=_iso(part.last_activity),
            idle_seconds=round(idle) if idle is not None else None,
            checkpoints=result.counts.checkpoints,
            writes=result.counts.writes,
        )

    async def _pace(self, parts: list[_Part], rows: int, elapsed: float) -> None:
        """Log the batch, feed the sizer, and rest as the pacer says before the next one."""
        engine, options = self.engine, self.options
        contention = engine.contention() if isinstance(engine, WriterAware) else None
        rest = 0.0
        if not options.dry_run:
            rest = self.pacer.rest(elapsed, contention.writer_seen if contention else None)
        log.debug(
            "batch",
            store=engine.name,
            threads=len(parts),
            rows=rows,
            seconds=round(elapsed, 4),
            lock_wait=round(contention.lock_wait, 4) if contention else None,
            writer_seen=contention.writer_seen if contention else None,
            rest=round(rest, 4),
            dry_run=options.dry_run,
        )
        if not options.dry_run:
            if self.on_batch is not None:
                self.on_batch(elapsed)
            # Sized on the transaction alone: a wait for the application's lock is not
            # the batch's rows being slow.
            wait = contention.lock_wait if contention else 0.0
            self.sizer.observe(sum(p.work.rows for p in parts), max(elapsed - wait, 0.0))
            await engine.after_batch()
            if rest > 0:
                await asyncio.sleep(rest)

    def _note(self, part: _Part, result: WorkResult) -> None:
        """Add a part's result to its thread's entries; a new thread completes the last one's.

        A thread's parts are queued one after another, so they are carried
        out in that order, possibly over several batches.
        """
        if self.on_thread is None:
            return
        tid = part.work.thread_id
        if self.entries and next(iter(self.entries))[0] != tid:
            self._emit_entries()
        key = (tid, part.policy, part.reason)
        entry = self.entries.get(key)
        if entry is None:
            idle = self.report.now - part.last_activity if part.last_activity is not None else None
            entry = ThreadPlan(
                self.engine.name, tid, part.policy, part.reason, part.last_activity, idle
            )
            self.entries[key] = entry
        entry.counts.add(result.counts)

    def _emit_entries(self) -> None:
        if self.on_thread is not None:
            for entry in self.entries.values():
                self.on_thread(entry)
        self.entries.clear()

    async def _hold_expiries(self) -> None:
        """The limit stops the sweep: expire none, say so (a dry run lists what it holds back)."""
        report = self.report
        # A plan says it in its own output; a real sweep's stop needs someone to act.
        emit = log.info if report.dry_run else log.warning
        emit(
            "safety_stop",
            store=report.store,
            dry_run=report.dry_run,
            threads_total=report.threads_total,
            threads_to_expire=report.expiries_wanted,
            max_threads_expired=report.expiry_limit,
            by_policy=dict(report.expiries_by_policy),
            expired=0,
            message=(
                f"the policies would expire {report.expiries_wanted} of {report.threads_total} "
                f"threads, more than max_delete_fraction allows ({report.expiry_limit}); none "
                "was expired (trimming ran). Check the clock and the policies "
                "(`checkpoint-janitor plan --threads` lists them); then raise "
                "defaults.max_delete_fraction, run `checkpoint-janitor once "
                "--allow-mass-expiry` once, or set defaults.allow_mass_expiry: true"
            ),
        )
        if not (report.dry_run and self.on_thread is not None):
            return
        # Counted, not carried out: the plan shows what the limit holds back.
        parts: list[_Part] = []
        for e in self.deferred:
            parts.append(e.part(report.now))
            if len(parts) >= self.options.settings.max_batch_threads:
                await self._count_held(parts)
                parts = []
        if parts:
            await self._count_held(parts)

    async def _count_held(self, parts: list[_Part]) -> None:
        assert self.on_thread is not None
        results = await self.engine.apply([p.work for p in parts], True)
        for part, result in zip(parts, results, strict=True):
            if part.work.bytes:
                result.counts.bytes = part.work.bytes
            idle = self.report.now - part.last_activity if part.last_activity is not None else None
            entry = ThreadPlan(
                self.engine.name,
                part.work.thread_id,
                part.policy,
                part.reason,
                part.last_activity,
                idle,
                result.counts,
                held=True,
            )
            self.on_thread(entry)


def _iso(timestamp: float | None) -> str | None:
    return iso_utc(timestamp) if timestamp is not None else None


class _OfPolicy(Protocol):
    """A part of a decision or plan: an expiry, a deletion, a trim, a skip, a fallback."""

    @property
    def policy(self) -> str:
        """The policy it is for."""
        ...


_PartOf = TypeVar("_PartOf", bound=_OfPolicy)


def _if_due(part: _PartOf | None, due: frozenset[str]) -> _PartOf | None:
    return part if part and part.policy in due else None


def _those_due(parts: Iterable[_PartOf], due: frozenset[str]) -> tuple[_PartOf, ...]:
    return tuple(p for p in parts if p.policy in due)


# `_only_due` and `_plan_due` keep the same shape on purpose: each lists its own
# type's fields (a row-level decision, an aggregate plan) through `_if_due` and
# `_those_due`, so a field added to either type shows here.
def _only_due(decision: ThreadDecision, due: frozenset[str] | None) -> ThreadDecision:
    if due is None:
        return decision
    return ThreadDecision(
        decision.thread_id,
        expiry=_if_due(decision.expiry, due),
        deletions=_those_due(decision.deletions, due),
        writes=_those_due(decision.writes, due),
        skips=_those_due(decision.skips, due),
        ttl_fallback=_if_due(decision.ttl_fallback, due),
    )


def _plan_due(plan: AggregatePlan, due: frozenset[str] | None) -> AggregatePlan:
    if due is None:
        return plan
    return AggregatePlan(
        plan.thread_id,
        expiry=_if_due(plan.expiry, due),
        trims=_those_due(plan.trims, due),
        writes=_those_due(plan.writes, due),
        skips=_those_due(plan.skips, due),
        last_activity=plan.last_activity,
        gc_blobs=plan.gc_blobs,  # as `_parts`: whatever policies are due
    )


def _plan_parts(
    agg: ThreadAggregate, plan: AggregatePlan, policies: Container[str], chunk_rows: int
) -> tuple[list[_Part], list[_Eligible]]:
    """A plan's trims as set-based parts of at most `chunk_rows` checkpoints, oldest first.

    Each part carries the fingerprint the thread must have when it runs: the
    aggregates' counts, less what the parts before it deleted (the newest id
    of a namespace never goes in a trim).
    """
    tid = agg.thread_id
    counts = {a.namespace: a.count for a in agg.namespaces}
    newest = {a.namespace: a.newest_id for a in agg.namespaces}

    def fingerprint() -> Fingerprint:
        return tuple(sorted((ns, n, newest[ns]) for ns, n in counts.items() if n))

    parts: list[_Part] = []
    eligible: list[_Eligible] = []
    step = max(chunk_rows, 1)
    for trim in plan.trims:
        eligible.append(_Eligible(trim.policy, trim.deletes, trim.oldest_age))
        left = trim.deletes
        while left > 0:
            limit = min(step, left)
            work = ThreadWork(
                tid,
                fingerprint(),
                ranges={
                    trim.namespace: TrimRange(
                        trim.keep, trim.before, limit, offset=trim.deletes - left
                    )
                },
            )
            parts.append(_Part(work, trim.policy, Reason.TRIMMED, plan.last_activity))
            counts[trim.namespace] -= limit
            left -= limit
    writes: dict[tuple[str, str], list[str]] = {}
    for w in plan.writes:
        writes.setdefault((w.policy, w.namespace), []).append(w.checkpoint_id)
    for (policy, ns), ids in writes.items():
        eligible.append(_Eligible(policy, 0, None))
        work = ThreadWork(tid, fingerprint(), writes={ns: ids})
        parts.append(_Part(work, policy, Reason.ORPHAN_WRITES, plan.last_activity))
    if plan.gc_blobs is not None and plan.gc_blobs in policies:
        # Sized by its blob rows, like a trim by its checkpoints: the sizer's unit.
        blobs = max(agg.garbage_blobs or 0, 1)
        work = ThreadWork(tid, fingerprint(), gc_blobs=True, estimate=blobs)
        parts.append(_Part(work, plan.gc_blobs, Reason.UNREFERENCED_BLOBS, plan.last_activity))
    return parts, eligible


def _parts(
    thread: ScannedThread,
    decision: ThreadDecision,
    now: float,
    policies: Container[str],
    chunk_rows: int,
    rules: Ruleset,
) -> tuple[list[_Part], list[_Eligible]]:
    """A decision's trims in parts of one policy and reason, each at most `chunk_rows` ids.

    Each part carries the fingerprint the thread must have when it runs: the
    scanned one, with the counts of the parts before it taken off. (Expiries
    wait for the end of the pass: `_Pass._defer`.)
    """
    view = thread.view
    tid = view.thread_id
    active = last_activity(view)
    remaining: dict[str, set[str]] = {}
    for c in view.checkpoints:
        remaining.setdefault(c.namespace, set()).add(c.checkpoint_id)
    by_key = {(c.namespace, c.checkpoint_id): c for c in view.checkpoints}
    groups: dict[tuple[str, Reason, str], list[str]] = {}
    for d in decision.deletions:
        groups.setdefault((d.policy, d.reason, d.namespace), []).append(d.checkpoint_id)
    parts: list[_Part] = []
    eligible: list[_Eligible] = []
    step = max(chunk_rows, 1)
    for (policy, reason, ns), ids in groups.items():
        ids.sort(reverse=True)
        ages = [now - t for i in ids if (t := by_key[(ns, i)].created_at) is not None]
        eligible.append(_Eligible(policy, len(ids), max(ages, default=None)))
        # Newest first: a kept checkpoint's parent goes in the first chunk, and
        # later chunks' children are already gone, so few parents need nulling.
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]
            work = ThreadWork(
                tid,
                fingerprint_of(remaining),
                checkpoints={ns: chunk},
                bytes=sum(by_key[(ns, i)].size for i in chunk),
            )
            parts.append(_Part(work, policy, reason, active))
            remaining[ns].difference_update(chunk)
    writes: dict[tuple[str, str], list[str]] = {}
    for w in decision.writes:
        writes.setdefault((w.policy, w.namespace), []).append(w.checkpoint_id)
    for (policy, ns), ids in writes.items():
        eligible.append(_Eligible(policy, 0, None))
        work = ThreadWork(tid, fingerprint_of(remaining), writes={ns: ids})
        parts.append(_Part(work, policy, Reason.ORPHAN_WRITES, active))
    if thread.garbage_blobs and not decision.deletions and not decision.writes:
        # Blobs left by trims made while the thread was busy; every batch
        # collects a quiet thread's, so this part only brings it into one.
        owner = rules.first_match(tid, "", view.head_metadata)
        if owner is not None and not owner.protect and owner.name in policies:
            work = ThreadWork(
                tid, thread.fingerprint, gc_blobs=True, estimate=max(thread.garbage_blobs, 1)
            )
            parts.append(_Part(work, owner.name, Reason.UNREFERENCED_BLOBS, active))
    return parts, eligible


def _log_summary(report: SweepReport) -> None:
    total = report.deleted
    log.info(
        "sweep",
        store=report.store,
        outcome=report.outcome.value,
        dry_run=report.dry_run,
        threads_total=report.threads_total,
        threads_scanned=report.threads_scanned,
        threads_expired=total.threads,
        checkpoints=total.checkpoints,
        writes=total.writes,
        blobs=total.blobs,
        bytes=total.bytes,
        batches=report.batches,
        longest_batch_seconds=round(report.longest_batch_seconds, 4),
        duration_seconds=round(report.duration_seconds, 3),
        changed_threads=report.changed_threads,
        locked_threads=report.locked_threads,
        safety_limit=report.expiry_limit,
        expiries_wanted=report.expiries_wanted,
        safety_stop=report.would_hit_limit,
        policies={
            name: {
                "checkpoints": p.deleted.checkpoints,
                "writes": p.deleted.writes,
                "threads": p.deleted.threads,
                "skipped": {reason.value: n for reason, n in p.skipped.items()},
                "ttl_fallbacks": {reason.value: n for reason, n in p.ttl_fallbacks.items()},
            }
            for name, p in report.policies.items()
        },
    )
