"""User-triggered deletion of named threads (`purge`).

It deletes what it names, `protect` and the safety limit notwithstanding, in
the same batched, all-or-nothing-per-thread transactions as a sweep. A legal
hold is the exception: a purge that names a held thread, by id or by
prefix, deletes nothing at all (`HeldThreadsError`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

import structlog

from policies.decide import last_activity
from worker.stores.archive import Archive
from worker.stores.engine import ArchivingStore, Counts, Hold, StoreEngine, ThreadWork
from worker.stores.timestamps import iso_utc

log = structlog.get_logger("checkpoint_janitor.purge")

PURGE_BATCH_THREADS = 200
PURGE_PAGE_THREADS = 1000


class HeldThreadsError(Exception):
    """A purge names threads under a legal hold.

    Found before the purge began, it deleted nothing (`deleted` is None). A
    hold placed while it ran keeps that thread whole, and `deleted` counts
    what went before and besides it.
    """

    def __init__(self, threads: Sequence[str], deleted: Counts | None = None) -> None:
        super().__init__(
            f"{len(threads)} named threads are on legal hold: {', '.join(map(repr, threads))}"
        )
        self.threads = list(threads)
        self.deleted = deleted


def held_among(holds: Sequence[Hold], threads: Sequence[str], prefix: str | None) -> list[str]:
    """The held threads a purge names: `threads` by id, or every hold on an id with `prefix`.

    The prefix is code-point exact, as the purge's own walk, and covers holds
    on threads that have no rows yet: the hold speaks for what may come.
    """
    held = {h.thread_id for h in holds}
    if threads:
        return [t for t in threads if t in held]
    assert prefix is not None
    return sorted(t for t in held if t.startswith(prefix))


async def matching_threads(
    engine: StoreEngine, threads: Sequence[str], prefix: str | None
) -> AsyncIterator[list[str]]:
    """Pages of the thread ids a purge names: `threads` by id, or every id with `prefix`."""
    if threads:
        yield list(threads)
        return
    assert prefix is not None
    async for page in engine.thread_prefix_pages(prefix, PURGE_PAGE_THREADS):
        yield page


async def purge(
    engine: StoreEngine,
    threads: Sequence[str],
    prefix: str | None,
    dry_run: bool,
    archive: Archive | None = None,
) -> Counts:
    """Delete (or count, when `dry_run`) every named thread whole.

    `archive` (`purge --archive`): archive what goes first, as a sweep does.
    Without it nothing is kept: erasure is a purge's purpose.

    Raises:
        HeldThreadsError: A named thread is on hold (nothing was deleted), or
            was put on hold while the purge ran (that thread was kept whole).
    """
    if held := held_among(await engine.holds(), threads, prefix):
        raise HeldThreadsError(held)
    total = Counts()
    late: list[str] = []
    async for page in matching_threads(engine, threads, prefix):
        for start in range(0, len(page), PURGE_BATCH_THREADS):
            todo = page[start : start + PURGE_BATCH_THREADS]
            # A thread written to meanwhile fails its fingerprint check and is
            # scanned again: a purge deletes what it names, including new rows.
            while todo:
                scanned = await engine.scan(todo)
                active = {t.view.thread_id: last_activity(t.view) for t in scanned}
                works = [ThreadWork(t.view.thread_id, t.fingerprint, expire=True) for t in scanned]
                if archive is not None and not dry_run:
                    assert isinstance(engine, ArchivingStore)  # `open_archive` checked it
                    results = await engine.apply(works, dry_run, archive)
                else:
                    results = await engine.apply(works, dry_run)
                todo = [r.thread_id for r in results if r.changed or r.locked]
                late.extend(r.thread_id for r in results if r.on_hold)
                now = time.time()
                for r in results:
                    if r.changed or r.locked or r.on_hold:
                        continue
                    if r.counts.checkpoints or r.counts.writes or r.counts.blobs:
                        total.add(r.counts)
                        if not dry_run:
                            seen = active.get(r.thread_id)
                            log.info(
                                "thread_purged",
                                store=engine.name,
                                thread_id=r.thread_id,
                                reason="purge",
                                last_activity=iso_utc(seen) if seen is not None else None,
                                idle_seconds=round(now - seen) if seen is not None else None,
                                checkpoints=r.counts.checkpoints,
                                writes=r.counts.writes,
                            )
                if not dry_run:
                    await engine.after_batch()
    if late:
        raise HeldThreadsError(late, total)
    return total
