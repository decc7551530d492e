"""Vacuuming a Postgres store's checkpoint tables after sweeps.

Deleted rows stay as dead tuples until vacuum. After a sweep that deleted a
meaningful share of a table (`reclaim.min_deleted_fraction`) the worker runs
`VACUUM (ANALYZE)` on it: the space becomes reusable and the planner's
statistics match the smaller table, without locking the application out
(`SHARE UPDATE EXCLUSIVE` conflicts only with DDL and other vacuums).
Returning the space to the operating system takes `VACUUM FULL`, which holds
an `ACCESS EXCLUSIVE` lock (no reads, no writes) while it rewrites the table:
that runs only when an operator asks (`reclaim --full`), never on its own.

Least privilege: VACUUM needs the table's owner, a superuser, or (PostgreSQL
16+) the MAINTAIN privilege. A role without it gets no error from Postgres,
only a WARNING ("skipping ... only table or database owner can vacuum it" /
"permission denied to vacuum ..., skipping it") and a vacuum that did nothing;
the warning is caught here and turned into a one-line `ReclaimRefused`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import structlog

from worker.stores.engine import Counts
from worker.stores.postgres import PostgresStore
from worker.stores.postgres_sql import (
    CURRENT_USER_SQL,
    DATA_TABLES,
    FORCE_STATS_FLUSH_SQL,
    REPORT_STATS_SQL,
    RESET_LOCK_TIMEOUT_SQL,
    SET_LOCK_TIMEOUT_SQL,
    TABLE_SPACE_SQL,
    VACUUM_FULL_SQL,
    VACUUM_SQL,
)
from worker.stores.space import Reclaimed, ReclaimRefused, Space

log = structlog.get_logger("checkpoint_janitor.postgres_reclaim")

TABLES = DATA_TABLES
"""The tables sweeps delete from (checkpoint_migrations never changes)."""
KIND_TABLES = {
    "checkpoints": "checkpoints",
    "writes": "checkpoint_writes",
    "blobs": "checkpoint_blobs",
}
"""Which table a sweep's deleted kind comes from."""

FORCE_FLUSH_VERSION = 15
"""The first PostgreSQL with pg_stat_force_next_flush()."""
REPORT_INTERVAL_SECONDS = 1.0
"""Older servers: wait this long (their interval is 0.5 s) so the next statement reports."""

_PRIVILEGE_WARNINGS = ("only table or database owner can vacuum", "permission denied to vacuum")


def estimate_bloat(table_bytes: int, live: int, dead: int) -> int:
    """Bytes dead tuples hold: the table's size times their share of its tuples.

    A simple estimate from the statistics collector (no pgstattuple): it
    assumes dead and live rows are alike in size, and counts what VACUUM makes
    reusable, not the free space inside pages that only VACUUM FULL returns to
    the operating system.
    """
    total = live + dead
    return table_bytes * dead // total if total > 0 else 0


async def table_space(store: PostgresStore) -> dict[str, dict[str, Any]]:
    """Per checkpoint table: live and dead tuples, table and index bytes, bloat, vacuums."""
    async with store.pool.acquire() as conn:
        rows = await conn.fetch(TABLE_SPACE_SQL, store.schema, list(TABLES))
    out = {}
    for r in rows:
        out[r[0]] = {
            "live_rows": int(r[1]),
            "dead_rows": int(r[2]),
            "table_bytes": int(r[3]),
            "index_bytes": int(r[4]),
            "reclaimable_bytes": estimate_bloat(int(r[3]), int(r[1]), int(r[2])),
            "vacuum_count": int(r[5]) + int(r[6]),
            "last_vacuum": max((t for t in (r[7], r[8]) if t is not None), default=None),
        }
    return out


async def flush_statistics(store: PostgresStore) -> int:
    """Make every idle session of the store's pool report its pending table counts now.

    What this process deleted is then in `pg_stat_user_tables`, instead of
    arriving after a VACUUM has counted the table (and being added on top).
    A session another task is using is waited for at most `lock_timeout`,
    then left out. Returns how many sessions reported.
    """
    pool = store.pool
    held: list[Any] = []
    try:
        # asyncpg hands out live connections before empty slots; an empty slot
        # it fills anyway opens a session with nothing pending, hence the bound.
        while pool.get_idle_size() > 0 and len(held) < pool.get_max_size():
            try:
                held.append(await pool.acquire(timeout=store.lock_timeout))
            except TimeoutError:
                break
        if not held:
            return 0
        if held[0].get_server_version().major >= FORCE_FLUSH_VERSION:
            try:
                await _on_each(held, FORCE_STATS_FLUSH_SQL)
                return len(held)
            except asyncpg.exceptions.InsufficientPrivilegeError:
                pass  # EXECUTE revoked from PUBLIC: the older servers' way still works
        await asyncio.sleep(REPORT_INTERVAL_SECONDS)
        await _on_each(held, REPORT_STATS_SQL)
        return len(held)
    finally:
        for conn in held:
            await pool.release(conn)


async def _on_each(conns: Sequence[Any], sql: str) -> None:
    # Every statement finishes before any error is raised: a connection goes
    # back to the pool idle, never with a statement still running on it.
    results = await asyncio.gather(*(c.fetchval(sql) for c in conns), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


async def measure(store: PostgresStore, *, flush: bool = True) -> Space:
    """Tables and indexes on disk, and the bloat estimate of `estimate_bloat`.

    With `flush`, the pool's sessions report their pending counts first
    (`flush_statistics`), so a sweep just run is counted in full.
    """
    if flush:
        await flush_statistics(store)
    tables = await table_space(store)
    for t in tables.values():
        if t["last_vacuum"] is not None:
            t["last_vacuum"] = t["last_vacuum"].isoformat()
    return Space(
        store_bytes=sum(t["table_bytes"] + t["index_bytes"] for t in tables.values()),
        reclaimable_bytes=sum(t["reclaimable_bytes"] for t in tables.values()),
        detail={"tables": tables, "bloat_estimate": "dead tuples' share of pg_table_size"},
    )


def tables_thinned(deleted: Counts, live: dict[str, int], min_fraction: float) -> list[str]:
    """The tables a sweep deleted at least `min_fraction` of (of rows left plus deleted)."""
    out = []
    for kind, table in KIND_TABLES.items():
        gone = int(getattr(deleted, kind))
        if gone > 0 and gone / (gone + live.get(table, 0)) >= min_fraction:
            out.append(table)
    return sorted(out)


async def vacuum(
    store: PostgresStore, tables: Sequence[str] | None = None, *, full: bool = False
) -> Reclaimed:
    """`VACUUM (ANALYZE)` (or `VACUUM FULL` when `full`) each of `tables` (default all three).

    Raises `ReclaimRefused` when the role may not vacuum a table, or (full) when
    the application's locks outlast the store's lock_timeout.
    """
    started = time.monotonic()
    # Also what makes the VACUUM's counts final: every pending report of the
    # pool's sessions lands before it, none after (`flush_statistics`).
    before = await measure(store)
    chosen = list(TABLES if tables is None else tables)
    result = Reclaimed(store.name, "vacuum_full" if full else "vacuum", before, before)
    warnings: list[str] = []

    def listen(_conn: Any, message: Any) -> None:
        warnings.append(str(getattr(message, "message", message)))

    async with store.pool.acquire() as conn:
        conn.add_log_listener(listen)
        try:
            user = await conn.fetchval(CURRENT_USER_SQL)
            await conn.fetchval(SET_LOCK_TIMEOUT_SQL, f"{int(store.lock_timeout * 1000)}ms")
            for table in chosen:
                warnings.clear()
                t0 = time.monotonic()
                sql = (VACUUM_FULL_SQL if full else VACUUM_SQL).format(
                    schema=store.schema, table=table
                )
                try:
                    await conn.execute(sql)
                except asyncpg.exceptions.LockNotAvailableError:
                    raise ReclaimRefused(
                        f"store {store.name}: VACUUM FULL of {store.schema}.{table} waited "
                        f"{store.lock_timeout:g} s (lock_timeout) for the application's locks "
                        "and gave up; nothing was changed. Run it in a quieter window."
                    ) from None
                except asyncpg.exceptions.InsufficientPrivilegeError:
                    _refuse_privilege(store, user, table)
                # Notices are handed to listeners with call_soon: let them run.
                await asyncio.sleep(0)
                _check_warnings(store, user, table, warnings)
                held = time.monotonic() - t0
                result.steps += 1
                result.longest_step_seconds = max(result.longest_step_seconds, held)
                result.tables.append(table)
                log.info(
                    "table_vacuumed", store=store.name, table=table, full=full,
                    seconds=round(held, 3),
                )  # fmt: skip
        finally:
            conn.remove_log_listener(listen)
            await conn.execute(RESET_LOCK_TIMEOUT_SQL)
    # Nothing of the pool's is pending any more: the VACUUM reported its own counts.
    result.after = await measure(store, flush=False)
    result.seconds = time.monotonic() - started
    return result


def _check_warnings(store: PostgresStore, user: str, table: str, warnings: Iterable[str]) -> None:
    if any(w in text for text in warnings for w in _PRIVILEGE_WARNINGS):
        _refuse_privilege(store, user, table)


def _refuse_privilege(store: PostgresStore, user: str, table: str) -> None:
    raise ReclaimRefused(
        f"store {store.name}: role {user!r} may not VACUUM {store.schema}.{table} "
        "(Postgres skipped it): VACUUM needs the table's owner, a superuser, or on "
        f"PostgreSQL 16+ `GRANT MAINTAIN ON {store.schema}.{table} TO {user}`"
    )
