"""Reclaiming disk after sweeps, whatever the engine (issue "Space comes back").

`reclaim` runs the engine's step-wise reclamation: SQLite incremental
auto-vacuum, Postgres `VACUUM (ANALYZE)`. `after_sweep` is what `once` and the
daemon call after each sweep of a store: it always measures the store (the
`store_bytes` / `reclaimable_bytes` gauges, for dry runs too) and reclaims only
when `reclaim.after_sweep` is on and the sweep really ran.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys

import structlog

from policies.config import BatchSettings, ReclaimSettings
from worker.stores import as_postgres, sqlite_reclaim
from worker.stores.engine import Counts, StoreEngine, StoreError
from worker.stores.space import Reclaimed, ReclaimRefused, Space
from worker.stores.sqlite import SqliteStore
from worker.sweep.run import Outcome, SweepReport

log = structlog.get_logger("checkpoint_janitor.reclaim")


async def measure(engine: StoreEngine) -> Space:
    """The store's size on disk and what a reclamation could give back."""
    if isinstance(engine, SqliteStore):
        return await sqlite_reclaim.measure(engine)
    if (pg := as_postgres(engine)) is not None:
        from worker.stores import postgres_reclaim

        return await postgres_reclaim.measure(pg)
    raise StoreError(engine.name, f"cannot measure a {type(engine).__name__}")


async def reclaim(
    engine: StoreEngine,
    settings: ReclaimSettings,
    batch: BatchSettings,
    *,
    deleted: Counts | None = None,
    stop: asyncio.Event | None = None,
) -> Reclaimed:
    """Reclaim now: SQLite in short steps; Postgres VACUUM (ANALYZE).

    `deleted` (after a sweep) limits Postgres to the tables the sweep thinned
    by `min_deleted_fraction`; without it every checkpoint table is vacuumed.
    """
    if isinstance(engine, SqliteStore):
        return await sqlite_reclaim.reclaim_incremental(engine, batch, settings, stop=stop)
    if (pg := as_postgres(engine)) is not None:
        from worker.stores import postgres_reclaim

        tables = None
        if deleted is not None:
            # The sweep's last deletions may not be reported yet: n_live_tup
            # would still count them and understate the share deleted.
            await postgres_reclaim.flush_statistics(pg)
            space = await postgres_reclaim.table_space(pg)
            live = {name: t["live_rows"] for name, t in space.items()}
            tables = postgres_reclaim.tables_thinned(deleted, live, settings.min_deleted_fraction)
            if not tables:
                now = await postgres_reclaim.measure(pg)
                return Reclaimed(engine.name, "none", now, now)
        return await postgres_reclaim.vacuum(pg, tables)
    raise StoreError(engine.name, f"cannot reclaim a {type(engine).__name__}")


async def after_sweep(
    engine: StoreEngine,
    settings: ReclaimSettings,
    batch: BatchSettings,
    report: SweepReport,
    *,
    stop: asyncio.Event | None = None,
) -> Reclaimed | None:
    """Measure the store after a sweep, and reclaim if configured; never raises.

    Nothing after a failed, locked or stopped sweep: the store may be gone,
    another replica owns it, or the worker is shutting down.
    """
    if report.outcome in (Outcome.FAILED, Outcome.LOCKED, Outcome.STOPPED):
        return None
    try:
        if settings.after_sweep and not report.dry_run:
            result = await reclaim(engine, settings, batch, deleted=report.deleted, stop=stop)
            if result.action != "none" or result.note:
                log.info("reclaim", **result.as_dict())
            return result
        now = await measure(engine)
        return Reclaimed(engine.name, "none", now, now)
    except (ReclaimRefused, StoreError) as e:
        log.error("reclaim_failed", store=engine.name, error=str(e))
    except Exception as e:
        if not isinstance(e, (sqlite3.Error, OSError)) and not _postgres_error(e):
            raise
        log.error("reclaim_failed", store=engine.name, error=f"{type(e).__name__}: {e}")
    return None


def _postgres_error(e: BaseException) -> bool:
    """An error of the Postgres driver, without importing it where no Postgres store ran."""
    if "asyncpg" not in sys.modules:
        return False
    import asyncpg

    return isinstance(e, asyncpg.PostgresError)
