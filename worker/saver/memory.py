"""`InMemorySaver`'s backend: retention on its dicts, holds kept beside them."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver

from policies.model import CheckpointSummary
from policies.summary import summarize, ts_seconds
from worker.saver.backends import Backend, needs_blobs, scanned_of
from worker.saver.operations import Choose, Scanned, ThreadStamp
from worker.stores.engine import Counts

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
        if needs_blobs(s for s, _ in rows):
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
        return scanned_of(thread_id, rows)

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

    def _stamp(self, thread_id: str) -> ThreadStamp:
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

    def expire(self, thread_id: str, stamp: ThreadStamp) -> Counts | None:
        """Delete the thread if no checkpoint came or went since the scan."""
        if self._stamp(thread_id) != stamp:
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

    async def aexpire(self, thread_id: str, stamp: ThreadStamp) -> Counts | None:
        """`expire`."""
        return self.expire(thread_id, stamp)

    async def adelete_threads(self, thread_ids: Sequence[str]) -> Counts:
        """`delete_threads`."""
        return self.delete_threads(thread_ids)

    async def athreads_of_runs(self, run_ids: Sequence[str]) -> list[str]:
        """`threads_of_runs`."""
        return self.threads_of_runs(run_ids)

    async def athread_page(self, after: str | None, limit: int) -> list[str]:
        """`thread_page`."""
        return self.thread_page(after, limit)


def backend_of(inner: BaseCheckpointSaver[Any]) -> Backend | None:
    """The backend of an `InMemorySaver` (or subclass); None for another saver."""
    return MemoryBackend(inner) if isinstance(inner, InMemorySaver) else None
