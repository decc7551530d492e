"""Legal holds on Postgres stores written by the real `AsyncPostgresSaver` (C and ICU): what
only Postgres has (the advisory holds lock, collations, paging). Holds against every rule
run on each backend in test_holds.py.

What a hold keeps is compared through the real saver with the same store
before the sweep; what the rules do, with an untouched copy swept without it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from helpers.backends import Backend, Pair, Stores
from helpers.pg_scenarios import (
    all_keys,
    cli,
    connect,
    pg_saver,
    write_config,
)
from prometheus_client import CollectorRegistry
from test_holds import check_wrapper_honours_holds, hold_threads, read_threads, release_threads

from worker import RetentionSaver
from worker.stores.engine import ThreadWork
from worker.stores.postgres import (
    CREATE_HOLDS_TABLE_SQL,
    HOLDS_LOCK_SQL,
    INSERT_HOLD_SQL,
    PostgresStore,
)

# The tests on the mixed store (`mixed_pair`) run on Postgres here; the hold-versus-rules
# scenario every backend shares is in test_holds.py.
pytestmark = pytest.mark.backends("postgres-c", "postgres-icu")


async def engine_on(dsn: str, **kwargs: Any) -> PostgresStore:
    engine = PostgresStore("pg", dsn, **kwargs)
    await engine.open()
    return engine


WAITING_ADVISORY_SQL = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"


async def test_a_hold_in_flight_wins_against_a_batch_already_running(
    backend: Backend,
    mixed_pair: Pair,
) -> None:
    """A first `hold` (which creates the table) is uncommitted when a batch that expires
    the thread starts: the batch waits for it, then sees it, and deletes nothing.

    Timing is forced, not hoped for: the hold's transaction stays open until
    pg_locks shows the batch waiting on the holds lock.
    """
    dsn, _, shapes = mixed_pair
    engine = await engine_on(dsn, lock_timeout=60.0)
    try:
        assert await engine.holds() == []  # no table yet: the batch has to find it later
        (scanned,) = await engine.scan(["user-old-1"])
        work = ThreadWork("user-old-1", scanned.fingerprint, expire=True, defer_blobs=True)
        before = await read_threads(backend, dsn, shapes, {"user-old-1"})
        async with connect(dsn) as holder, connect(dsn) as watcher:
            tx = holder.transaction()
            await tx.start()
            await holder.execute(HOLDS_LOCK_SQL)
            await holder.execute(CREATE_HOLDS_TABLE_SQL)
            await holder.fetchval(INSERT_HOLD_SQL, "user-old-1", "late", "legal")
            batch = asyncio.create_task(engine.apply([work], dry_run=False))
            for _ in range(3000):
                if await watcher.fetchval(WAITING_ADVISORY_SQL) or batch.done():
                    break
                await asyncio.sleep(0.01)
            assert not batch.done(), "the batch did not wait for the hold"
            await tx.commit()
            (result,) = await batch
        assert result.on_hold and not result.changed and result.counts.threads == 0
        assert await read_threads(backend, dsn, shapes, {"user-old-1"}) == before
        # Released, the same work goes: it was valid all along.
        await release_threads(backend, dsn, "user-old-1")
        (result,) = await engine.apply([work], dry_run=False)
        assert result.counts.threads == 1 and not result.on_hold
    finally:
        await engine.close()


async def test_purge_refuses_held_threads_and_cli_lists_holds(
    tmp_path: Path, mixed_pair: Pair
) -> None:
    dsn, _, _ = mixed_pair
    cfg = write_config(tmp_path / "janitor.yaml", dsn, "  - {name: idle, expire_after: 30d}")
    r = cli("hold", "--store", "pg", "--thread", "org-1:user-2:session-3", config=cfg)
    assert r.returncode == 0, r.stderr
    r = cli("hold", "--store", "pg", "--thread", "ORG-1:user-2:x", "--reason", "r", config=cfg)
    assert r.returncode == 0, r.stderr
    r = cli("holds", "--store", "pg", "--format", "json", config=cfg)
    assert r.returncode == 0, r.stderr
    holds = json.loads(r.stdout)["holds"]
    assert {h["thread_id"] for h in holds} == {"org-1:user-2:session-3", "ORG-1:user-2:x"}
    before = await all_keys(dsn)
    for args in (("--thread", "org-1:user-2:session-3"), ("--thread-prefix", "org-1:user-2:")):
        r = cli("purge", *args, "--yes", config=cfg)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "'org-1:user-2:session-3'" in r.stderr
        # The prefix is exact: the upper-case hold is not under it, whatever the collation.
        assert "ORG-1" not in r.stderr
        assert await all_keys(dsn) == before
    r = cli("stats", "--format", "json", config=cfg)
    assert json.loads(r.stdout)["stores"][0]["held_threads"] == 2
    r = cli("release", "--store", "pg", "--thread", "org-1:user-2:session-3", config=cfg)
    assert r.returncode == 0, r.stderr
    r = cli("purge", "--thread-prefix", "org-1:user-2:", "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    assert not any(k[0].startswith("org-1:user-2:") for k in await all_keys(dsn))


async def test_wrapper_honours_holds_on_postgres(backend: Backend, stores: Stores) -> None:
    dsn, control_dsn = stores.create(), stores.create()
    async with pg_saver(dsn) as inner, pg_saver(control_dsn) as control:
        await hold_threads(backend, dsn, "held")  # placed by the worker, read by the wrapper
        saver = RetentionSaver(
            inner, keep_last=1, slack=0, expire_after="30d", registry=CollectorRegistry()
        )
        assert await saver.ahold("old-held")
        assert not await saver.ahold("held")
        await check_wrapper_honours_holds(saver, control)


async def test_holds_listing_pages_in_the_database_order(stores: Stores) -> None:
    """More holds than a page, on a store without any other table of ours."""
    dsn = stores.create()
    async with pg_saver(dsn):
        pass
    engine = await engine_on(dsn)
    try:
        assert await engine.holds() == []
        ids = [f"t-{i:04d}" for i in range(1001)] + ["", "T-0001"]
        for tid in ids:
            await engine.hold(tid, None, None)
        listed = [h.thread_id for h in await engine.holds()]
        assert sorted(listed) == sorted(ids) and len(listed) == len(set(listed))
    finally:
        await engine.close()
