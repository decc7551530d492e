"""One sweep: one pass over one store applying every due policy.

Pages through the store's threads (keyset), decides each with
`policies.decide`, and hands the engine batches sized by a target
transaction time. First match is decided over the whole policy list; only the
due policies' decisions are carried out. The safety limit caps the threads
one sweep may expire, counted against the threads present at its start.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

from policies.config import BatchSettings, Policy
from policies.decide import decide
from policies.matching import Ruleset
from policies.model import Reason, SkipReason, ThreadDecision
from worker.engine import (
    Counts,
    ScannedThread,
    StoreEngine,
    ThreadWork,
    fingerprint_of,
)
from worker.stores.space import Reclaimed
from worker.throttle import BatchSizer, pause_after

log = structlog.get_logger("checkpoint_janitor.sweep")


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
    expiries_wanted: int = 0
    """Threads the policies would expire in this sweep (a dry run counts past the limit)."""
    limit_reached_by: str | None = None
    """The policy whose expiry met the safety limit."""
    batches: int = 0
    longest_batch_seconds: float = 0.0
    duration_seconds: float = 0.0
    changed_threads: int = 0
    error: str | None = None
    reachable: bool = True
    """False when the store could not be opened at all (`store_up` 0)."""
    reclaim: Reclaimed | None = None
    """The store's space after the sweep, and what `reclaim.after_sweep` gave back."""

    @property
    def deleted(self) -> Counts:
        """Totals over every policy."""
        total = Counts()
        for p in self.policies.values():
            total.add(p.deleted)
        return total

    @property
    def would_hit_limit(self) -> bool:
        """The safety limit stops (or, in a dry run, would stop) this sweep."""
        return self.expiries_wanted > self.expiry_limit


@dataclass(slots=True)
class _Part:
    work: ThreadWork
    policy: str
    reason: Reason


@dataclass(slots=True)
class SweepOptions:
    """How a sweep runs, from the config and the command line."""

    settings: BatchSettings
    max_delete_fraction: float = 0.5
    dry_run: bool = False
    allow_mass_expiry: bool = False
    due: frozenset[str] | None = None
    """Policies to carry out; None: all. First match still sees every policy."""


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
) -> SweepReport:
    """Sweep `engine` once under `policies`; never raises for a store fault (see `outcome`).

    `stop` ends the sweep at the next batch boundary; `on_batch` hears each
    delete transaction's duration.
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
        await _run(engine, rules, options, report, stop, progress, on_batch)
    except Exception as e:
        report.outcome = Outcome.FAILED
        report.error = f"{type(e).__name__}: {e}"
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
) -> None:
    if not await engine.begin_sweep(report.now):
        report.outcome = Outcome.LOCKED
        log.info("sweep_skipped", store=engine.name, reason="another worker holds the sweep lock")
        return
    try:
        await _sweep_pages(engine, rules, options, report, stop, progress, on_batch)
    finally:
        await engine.end_sweep()


async def _sweep_pages(
    engine: StoreEngine,
    rules: Ruleset,
    options: SweepOptions,
    report: SweepReport,
    stop: asyncio.Event | None,
    progress: ProgressFn | None,
    on_batch: BatchFn | None,
) -> None:
    s = options.settings
    report.threads_total = await engine.count_threads()
    report.expiry_limit = (
        report.threads_total
        if options.allow_mass_expiry
        else math.floor(options.max_delete_fraction * report.threads_total)
    )
    sizer = BatchSizer(target_seconds=s.target_batch_seconds, max_rows=s.max_batch_rows)
    grace = s.grace_period.total_seconds()
    pending: list[_Part] = []
    pending_rows = 0
    expired = 0

    async def flush(parts: list[_Part]) -> None:
        t0 = time.monotonic()
        results = await engine.apply([p.work for p in parts], options.dry_run)
        elapsed = time.monotonic() - t0
        rows = 0
        for part, result in zip(parts, results, strict=True):
            pr = report.policies[part.policy]
            if result.changed:
                report.changed_threads += 1
                pr.skipped[SkipReason.CHANGED] += 1
                continue
            result.counts.bytes = part.work.bytes
            pr.deleted.add(result.counts)
            pr.by_reason.setdefault(part.reason, Counts()).add(result.counts)
            rows += result.counts.checkpoints + result.counts.writes
            if part.work.expire:
                log.info(
                    "thread_expired" if not options.dry_run else "thread_would_expire",
                    store=engine.name,
                    thread_id=part.work.thread_id,
                    policy=part.policy,
                    reason=part.reason.value,
                    checkpoints=result.counts.checkpoints,
                    writes=result.counts.writes,
                )
        report.batches += 1
        report.longest_batch_seconds = max(report.longest_batch_seconds, elapsed)
        log.debug(
            "batch",
            store=engine.name,
            threads=len(parts),
            rows=rows,
            seconds=round(elapsed, 4),
            dry_run=options.dry_run,
        )
        if not options.dry_run:
            if on_batch is not None:
                on_batch(elapsed)
            sizer.observe(sum(p.work.rows for p in parts), elapsed)
            await engine.after_batch()
            rest = pause_after(elapsed, s.pause, s.pause_factor)
            if rest > 0:
                await asyncio.sleep(rest)

    async for page in engine.thread_pages(s.page_threads):
        if stop is not None and stop.is_set():
            report.outcome = Outcome.STOPPED
            break
        candidates = [t for t in page if rules.could_match_thread(t)]
        scanned = await engine.scan(candidates) if candidates else []
        report.threads_scanned += len(page)
        decided = [(t, decide(t.view, rules, report.now, grace)) for t in scanned]
        # Waiting is read from the heads of expiry candidates only, in one go.
        if asking := [t for t, d in decided if d.needs_waiting]:
            resolved = {t.view.thread_id: t for t in await engine.resolve_waiting(asking)}
            decided = [
                (r, decide(r.view, rules, report.now, grace))
                if (r := resolved.get(t.view.thread_id)) is not None
                else (t, d)
                for t, d in decided
            ]
        for thread, decision in decided:
            decision = _only_due(decision, options.due)
            for skip in decision.skips:
                report.policies[skip.policy].skipped[skip.reason] += 1
            if decision.expiry is not None:
                report.expiries_wanted += 1
                if expired >= report.expiry_limit:
                    report.policies[decision.expiry.policy].see_eligible(
                        len(thread.view.checkpoints), 1, decision.expiry.age_seconds
                    )
                    if report.limit_reached_by is None:
                        report.limit_reached_by = decision.expiry.policy
                    if not options.dry_run:
                        break
                    continue
                expired += 1
            for part in _parts(thread, decision, report, sizer.rows, rules):
                pending.append(part)
                pending_rows += part.work.rows
                if pending_rows >= sizer.rows or len(pending) >= s.max_batch_threads:
                    await flush(pending)
                    pending = []
                    pending_rows = 0
                    if stop is not None and stop.is_set():
                        report.outcome = Outcome.STOPPED
                        return
        if report.limit_reached_by is not None and not options.dry_run:
            break
        if progress is not None:
            progress(report.threads_scanned, report.threads_total)
    if pending:
        await flush(pending)
    if report.limit_reached_by is not None and report.outcome is Outcome.SUCCESS:
        report.outcome = Outcome.SAFETY_STOP


def _only_due(decision: ThreadDecision, due: frozenset[str] | None) -> ThreadDecision:
    if due is None:
        return decision
    return ThreadDecision(
        decision.thread_id,
        expiry=decision.expiry if decision.expiry and decision.expiry.policy in due else None,
        deletions=tuple(d for d in decision.deletions if d.policy in due),
        writes=tuple(w for w in decision.writes if w.policy in due),
        skips=tuple(s for s in decision.skips if s.policy in due),
    )


def _parts(
    thread: ScannedThread,
    decision: ThreadDecision,
    report: SweepReport,
    chunk_rows: int,
    rules: Ruleset,
) -> Iterator[_Part]:
    """The decision cut into parts of one policy and reason, each at most `chunk_rows` ids.

    Each part carries the fingerprint the thread must have when it runs: the
    scanned one, with the counts of the parts before it taken off.
    """
    view = thread.view
    tid = view.thread_id
    if decision.expiry is not None:
        e = decision.expiry
        report.policies[e.policy].see_eligible(len(view.checkpoints), 1, e.age_seconds)
        work = ThreadWork(
            tid,
            thread.fingerprint,
            expire=True,
            estimate=max(len(view.checkpoints), 1),
            bytes=sum(c.size for c in view.checkpoints),
        )
        yield _Part(work, e.policy, Reason.EXPIRED)
        return
    remaining: dict[str, set[str]] = {}
    for c in view.checkpoints:
        remaining.setdefault(c.namespace, set()).add(c.checkpoint_id)
    by_key = {(c.namespace, c.checkpoint_id): c for c in view.checkpoints}
    groups: dict[tuple[str, Reason, str], list[str]] = {}
    for d in decision.deletions:
        groups.setdefault((d.policy, d.reason, d.namespace), []).append(d.checkpoint_id)
    step = max(chunk_rows, 1)
    for (policy, reason, ns), ids in groups.items():
        ids.sort(reverse=True)
        ages = [report.now - t for i in ids if (t := by_key[(ns, i)].created_at) is not None]
        report.policies[policy].see_eligible(len(ids), 0, max(ages, default=None))
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
            yield _Part(work, policy, reason)
            remaining[ns].difference_update(chunk)
    writes: dict[tuple[str, str], list[str]] = {}
    for w in decision.writes:
        writes.setdefault((w.policy, w.namespace), []).append(w.checkpoint_id)
    for (policy, ns), ids in writes.items():
        report.policies[policy].see_eligible(0, 0, None)
        work = ThreadWork(tid, fingerprint_of(remaining), writes={ns: ids})
        yield _Part(work, policy, Reason.ORPHAN_WRITES)
    if thread.garbage_blobs and not decision.deletions and not decision.writes:
        # Blobs left by trims made while the thread was busy; every batch
        # collects a quiet thread's, so this part only brings it into one.
        owner = rules.first_match(tid, "", view.head_metadata)
        if owner is not None and not owner.protect and owner.name in report.policies:
            work = ThreadWork(tid, thread.fingerprint, gc_blobs=True, estimate=1)
            yield _Part(work, owner.name, Reason.UNREFERENCED_BLOBS)


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
        safety_limit=report.expiry_limit,
        expiries_wanted=report.expiries_wanted,
        policies={
            name: {
                "checkpoints": p.deleted.checkpoints,
                "writes": p.deleted.writes,
                "threads": p.deleted.threads,
                "skipped": {reason.value: n for reason, n in p.skipped.items()},
            }
            for name, p in report.policies.items()
        },
    )
