"""The saver wrapper's `checkpoint_janitor_saver_*` counters."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter

from worker.stores.engine import Counts

__all__ = ["SaverMetrics"]


class SaverMetrics:
    """The wrapper's `checkpoint_janitor_saver_*` counters in one registry.

    Created once per registry (`for_registry`), so several wrappers, and the
    clones `with_allowlist` makes, share them; the `saver` label tells
    wrappers apart.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deleted = _counter(
            registry,
            "checkpoint_janitor_saver_deleted",
            "Rows the saver wrapper deleted, by kind (checkpoints, writes, blobs, threads) "
            "and reason (trimmed, expired, prune, delete_for_runs, delete_checkpoints).",
            ("saver", "kind", "reason"),
        )
        self.trims = _counter(
            registry,
            "checkpoint_janitor_saver_trims",
            "Trims the saver wrapper ran after puts.",
            ("saver",),
        )
        self.failures = _counter(
            registry,
            "checkpoint_janitor_saver_failures",
            "Retention work on the application's write or read path that failed "
            "(logged, never raised), by operation (trim, expire, read).",
            ("saver", "operation"),
        )
        self.expired_reads = _counter(
            registry,
            "checkpoint_janitor_saver_expired_reads",
            "Reads answered empty because the thread had expired.",
            ("saver",),
        )
        self.skipped = _counter(
            registry,
            "checkpoint_janitor_saver_skipped",
            "Rules that applied but were held back, by reason "
            "(interrupted, undecodable, changed, held).",
            ("saver", "reason"),
        )
        self.ttl_fallbacks = _counter(
            registry,
            "checkpoint_janitor_saver_ttl_fallbacks",
            "Expiry checks whose per-thread TTL (expire_after: {metadata_key}) was missing, "
            "invalid or not positive, so the default applied, by reason.",
            ("saver", "reason"),
        )

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, SaverMetrics]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> SaverMetrics:
        """The metrics of `registry`, registering them on first use."""
        with cls._lock:
            metrics = cls._by_registry.get(registry)
            if metrics is None:
                metrics = cls._by_registry[registry] = cls(registry)
            return metrics

    def count(self, saver: str, reason: str, counts: Counts) -> None:
        """Add deleted rows."""
        for kind in ("threads", "checkpoints", "writes", "blobs"):
            n = getattr(counts, kind)
            if n:
                self.deleted.labels(saver, kind, reason).inc(n)


def _counter(registry: CollectorRegistry, name: str, doc: str, labels: Sequence[str]) -> Counter:
    try:
        return Counter(name, doc, labels, registry=registry)
    except ValueError:
        # Registered already by code we do not track (a module reloaded in
        # tests, another copy of this package): reuse that collector.
        existing = getattr(registry, "_names_to_collectors", {}).get(name + "_total")
        if isinstance(existing, Counter):
            return existing
        raise
