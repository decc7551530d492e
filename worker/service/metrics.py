"""Prometheus metrics as README "Running it as a daemon" lists them (`checkpoint_janitor_*`).

One `Metrics` per process (`run`) or per store (`once`, whose push is
grouped by store). Every sweep value comes from a `SweepReport`, so what is
exported is what the sweep really did; a dry run exports what it found due
but never deletions or a last success.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    pushadd_to_gateway,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from policies.config import Schedule
from worker.stores.space import Reclaimed
from worker.sweep import Outcome, SweepReport

# `*_created` series double every counter's output and no alert here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "checkpoint_janitor_"
VERSION = "0.1.0"
KINDS = ("checkpoints", "writes", "blobs", "threads")

DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600)
BATCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2.5, 5)


class Metrics:
    """The worker's metrics in their own registry.

    `daemon` (for `run`) adds what only a long-running process has: the
    config reload gauges and prometheus-client's standard `process_*` and
    `python_info` series. A `once` push of them would describe a process that
    has exited, and an unset reload gauge would read as a refused reload.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, daemon: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if daemon:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self._deletion_metrics(r)
        # Only a daemon's registry shows them; `once` keeps them unregistered.
        self._reload_metrics(r if daemon else None)
        self._sweep_metrics(r)
        self._scan_metrics(r)
        self._schedule_metrics(r)
        self._archive_metrics(r)
        self._store_metrics(r)

    # The `_*_metrics` builders repeat one shape on purpose: each metric is declared
    # whole (name, help, labels, buckets) where it can be read and grepped, as
    # prometheus-client's own examples do; a table of tuples would read worse.
    def _deletion_metrics(self, r: CollectorRegistry) -> None:
        """What the sweeps delete, and whether they only report it."""
        self.deleted = Counter(
            PREFIX + "deleted", "Rows deleted, by kind.", ["store", "policy", "kind"], registry=r
        )
        self.deleted_bytes = Counter(
            PREFIX + "deleted_bytes",
            "Bytes of the rows deleted (serialized checkpoints, writes and blobs).",
            ["store", "policy"],
            registry=r,
        )
        self.dry_run = Gauge(
            PREFIX + "dry_run",
            "1 while sweeps of the store only report what they would delete.",
            ["store"],
            registry=r,
        )

    def _reload_metrics(self, reload_registry: CollectorRegistry | None) -> None:
        """The config reload gauges, in `reload_registry` (None: in none)."""
        self.reload_ok = Gauge(
            PREFIX + "config_last_reload_successful",
            "1 if the last config (re)load was applied, 0 if it was refused.",
            registry=reload_registry,
        )
        self.reload_time = Gauge(
            PREFIX + "config_last_reload_success_timestamp_seconds",
            "Unix time of the last config (re)load that was applied.",
            registry=reload_registry,
        )

    def _sweep_metrics(self, r: CollectorRegistry) -> None:
        """Sweeps and their delete transactions: outcome, duration, last success."""
        self.sweeps = Counter(
            PREFIX + "sweeps", "Sweeps, by outcome.", ["store", "policy", "outcome"], registry=r
        )
        self.sweep_duration = Histogram(
            PREFIX + "sweep_duration_seconds",
            "Duration of sweeps that applied the policy.",
            ["store", "policy"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            PREFIX + "batch_duration_seconds",
            "Duration of one delete transaction.",
            ["store"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.last_success = Gauge(
            PREFIX + "last_success_timestamp_seconds",
            "Unix time the policy's last successful sweep ended.",
            ["store", "policy"],
            registry=r,
        )

    def _scan_metrics(self, r: CollectorRegistry) -> None:
        """What the last scan found: due rows, skips, TTL fallbacks, registry errors, caps."""
        self.eligible = Gauge(
            PREFIX + "eligible",
            "What the last scan found due, by kind.",
            ["store", "policy", "kind"],
            registry=r,
        )
        self.skipped = Counter(
            PREFIX + "skipped_threads",
            "Threads whose due rules were held back, by reason.",
            ["store", "policy", "reason"],
            registry=r,
        )
        self.ttl_fallbacks = Counter(
            PREFIX + "ttl_fallbacks",
            "Threads whose own TTL (expire_after: {metadata_key}) was missing, invalid or "
            "not positive, so the policy's default applied, by reason.",
            ["store", "policy", "reason"],
            registry=r,
        )
        self.orphan_registry_errors = Counter(
            PREFIX + "orphan_registry_errors",
            "Sweeps in which an orphaned policy's registry query failed or returned no rows "
            "(the policy matched nothing), by reason.",
            ["store", "policy", "reason"],
            registry=r,
        )
        self.over_quota = Gauge(
            PREFIX + "over_quota_bytes",
            "Bytes a store (policy and group empty) or a quota group stays over its size cap "
            "after the last sweep's plan (0: under it).",
            ["store", "policy", "group"],
            registry=r,
        )
        self.oldest_eligible_age = Gauge(
            PREFIX + "oldest_eligible_age_seconds",
            "Age of the oldest checkpoint the last scan found due (0: none).",
            ["store", "policy"],
            registry=r,
        )

    def _schedule_metrics(self, r: CollectorRegistry) -> None:
        """The schedule, the safety limit's stops and the legal holds."""
        self.schedule_interval = Gauge(
            PREFIX + "schedule_interval_seconds",
            "Seconds between the policy's scheduled sweeps.",
            ["store", "policy"],
            registry=r,
        )
        self.safety_stops = Counter(
            PREFIX + "safety_stops",
            "Sweeps stopped by the safety limit (max_delete_fraction).",
            ["store", "policy"],
            registry=r,
        )
        self.held_threads = Gauge(
            PREFIX + "held_threads",
            "Threads under a legal hold (`checkpoint-janitor hold`), as the last sweep read them.",
            ["store"],
            registry=r,
        )

    def _archive_metrics(self, r: CollectorRegistry) -> None:
        """The archive of deleted rows: rows and bytes written, and the failures that stop a run."""
        self.archived_rows = Counter(
            PREFIX + "archived_rows",
            "Rows written to the archive before their delete committed, by store table.",
            ["store", "table"],
            registry=r,
        )
        self.archive_bytes = Counter(
            PREFIX + "archive_bytes",
            "Bytes of archive segments written for deletes that committed.",
            ["store"],
            registry=r,
        )
        self.archive_failures = Counter(
            PREFIX + "archive_failures",
            "Sweeps or purges stopped because a batch could not be archived (nothing deleted).",
            ["store"],
            registry=r,
        )

    def _store_metrics(self, r: CollectorRegistry) -> None:
        """The store itself: up, the worker's build, and its space."""
        self.store_up = Gauge(
            PREFIX + "store_up", "1 if the store answers, else 0.", ["store"], registry=r
        )
        self.build_info = Gauge(
            PREFIX + "build_info", "The worker's version.", ["version"], registry=r
        )
        self.build_info.labels(VERSION).set(1)
        # Space (issue "Space comes back"): set after every sweep, reclaiming or not.
        self.store_bytes = Gauge(
            PREFIX + "store_bytes",
            "Bytes the store takes on disk (SQLite file and WAL; Postgres tables and indexes).",
            ["store"],
            registry=r,
        )
        self.reclaimable_bytes = Gauge(
            PREFIX + "reclaimable_bytes",
            "Bytes a reclamation could give back (SQLite free pages; Postgres dead tuples, est.).",
            ["store"],
            registry=r,
        )
        self.reclaimed_bytes = Counter(
            PREFIX + "reclaimed_bytes", "Bytes the store shrank by in reclamations.", ["store"],
            registry=r,
        )  # fmt: skip
        self.reclaim_duration = Histogram(
            PREFIX + "reclaim_duration_seconds",
            "Duration of one reclamation (all its steps).",
            ["store"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )

    def record(self, report: SweepReport, policies: Iterable[str]) -> None:
        """Count one sweep of `report.store` for each policy it applied."""
        store = report.store
        for name in policies:
            p = report.policies.get(name)
            self.sweeps.labels(store, name, report.outcome.value).inc()
            if report.outcome is Outcome.LOCKED or p is None:
                continue
            self.sweep_duration.labels(store, name).observe(report.duration_seconds)
            if not report.dry_run:
                for kind in KINDS:
                    self.deleted.labels(store, name, kind).inc(getattr(p.deleted, kind))
                self.deleted_bytes.labels(store, name).inc(p.deleted.bytes)
            for kind in ("threads", "checkpoints"):
                self.eligible.labels(store, name, kind).set(getattr(p.eligible, kind))
            self.oldest_eligible_age.labels(store, name).set(p.oldest_eligible_age or 0)
            for reason, n in p.skipped.items():
                self.skipped.labels(store, name, reason.value).inc(n)
            for fallback, n in p.ttl_fallbacks.items():
                self.ttl_fallbacks.labels(store, name, fallback.value).inc(n)
            if p.registry_error is not None:
                failure = p.registry_error.reason.value
                self.orphan_registry_errors.labels(store, name, failure).inc()
            if report.outcome is Outcome.SUCCESS and not report.dry_run:
                # A dry run deletes nothing: "last success" must not tell an
                # alert that retention is being applied.
                self.last_success.labels(store, name).set(report.now + report.duration_seconds)
        self.dry_run.labels(store).set(1 if report.dry_run else 0)
        if report.held_threads is not None:
            self.held_threads.labels(store).set(report.held_threads)
        self.record_archive(store, report.archived_rows, report.archive_bytes)
        if report.archive_failed:
            self.archive_failures.labels(store).inc()
        if report.outcome is not Outcome.LOCKED and report.error is None:
            # Groups come and go: only the last sweep's are shown.
            for labels in _label_sets(self.over_quota):
                if labels[0] == store:
                    self.over_quota.remove(*labels)
            for (policy, group), n in report.over_quota.items():
                self.over_quota.labels(store, policy, group).set(n)
        if report.outcome is Outcome.SAFETY_STOP and report.limit_reached_by is not None:
            self.safety_stops.labels(store, report.limit_reached_by).inc()

    def record_archive(self, store: str, rows: dict[str, int], size: int) -> None:
        """Count what a sweep or purge archived (segments whose delete committed)."""
        for table, n in rows.items():
            self.archived_rows.labels(store, table).inc(n)
        if size:
            self.archive_bytes.labels(store).inc(size)

    def record_reclaim(self, result: Reclaimed) -> None:
        """The store's size after a sweep or reclamation, and what the reclamation gave back."""
        self.store_bytes.labels(result.store).set(result.after.store_bytes)
        self.reclaimable_bytes.labels(result.store).set(result.after.reclaimable_bytes)
        if result.action != "none":
            self.reclaimed_bytes.labels(result.store).inc(result.reclaimed_bytes)
            self.reclaim_duration.labels(result.store).observe(result.seconds)

    def keep_only(self, pairs: set[tuple[str, str]]) -> None:
        """Drop the gauges of (store, policy) pairs no longer configured (after a reload)."""
        for gauge in (self.schedule_interval, self.last_success, self.oldest_eligible_age):
            for labels in _label_sets(gauge):
                if (labels[0], labels[1]) not in pairs:
                    gauge.remove(*labels)
        for labels in _label_sets(self.eligible):
            if (labels[0], labels[1]) not in pairs:
                self.eligible.remove(*labels)

    def forget_store(self, store: str) -> None:
        """Drop `store_up`, `dry_run` and `held_threads` of a store no longer configured."""
        for gauge in (self.store_up, self.dry_run, self.held_threads):
            if (store,) in _label_sets(gauge):
                gauge.remove(store)

    def config_loaded(self, ok: bool, when: float) -> None:
        """Record a config (re)load: applied (`ok`) at unix time `when`, or refused."""
        self.reload_ok.set(1 if ok else 0)
        if ok:
            self.reload_time.set(when)

    def set_interval(self, store: str, policy: str, schedule: Schedule) -> None:
        """Export how often the policy runs, so alerts can say "no success for 2x that"."""
        self.schedule_interval.labels(store, policy).set(interval_seconds(schedule))

    def exposition(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)

    def push(self, gateway: str, job: str, store: str) -> None:
        """`pushadd` this store's metrics, grouped by job and store (never the pod).

        Only families with samples are sent: POST replaces each family it
        names, so an empty `last_success` family from a failed run would
        erase the last success.
        """
        pushadd_to_gateway(
            gateway, job=job, grouping_key={"store": store}, registry=_NonEmpty(self.registry)
        )

    def write_textfile(self, path: str) -> None:
        """Write the metrics for node-exporter's textfile collector, atomically.

        The last success of each policy in the old file is carried over unless
        this run set a newer one, so a failed run does not erase it.
        """
        try:
            with open(path) as f:
                old = f.read()
        except OSError:
            old = ""
        for family in text_string_to_metric_families(old):
            if family.name != PREFIX + "last_success_timestamp_seconds":
                continue
            for sample in family.samples:
                gauge = self.last_success.labels(sample.labels["store"], sample.labels["policy"])
                if gauge._value.get() < sample.value:
                    gauge.set(sample.value)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".checkpoint_janitor.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(self.exposition())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)


class _NonEmpty(Collector):
    """A view of a registry without the families that have no samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if family.samples:
                yield family


def _label_sets(metric: Gauge) -> list[tuple[str, ...]]:
    # prometheus_client keeps no public list of a metric's children.
    return [tuple(k) for k in metric._metrics]


def interval_seconds(schedule: Schedule) -> float:
    """Seconds between two runs of `schedule` (for cron: between its next two fire times)."""
    if schedule.every is not None:
        return schedule.every.total_seconds()
    # Imported here: the one-shot CLI loads this module and no scheduler.
    from worker.service.schedule import trigger_for

    trigger = trigger_for(schedule)
    now = datetime.now(UTC)
    first = trigger.get_next_fire_time(None, now)
    second = trigger.get_next_fire_time(first, first + timedelta(seconds=1)) if first else None
    if first is None or second is None:
        return 0.0
    return float((second - first).total_seconds())
