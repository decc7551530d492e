"""Legal holds on Postgres stores written by the real `AsyncPostgresSaver` (C and ICU).

What a hold keeps is compared through the real saver with the same store
before the sweep; what the rules do, with an untouched copy swept without it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.pg_scenarios import (
    Databases,
    all_keys,
    blob_keys,
    cli,
    connect,
    pg_saver,
    run_pg_sweep,
    write_config,
)
from helpers.pgserver import PgServer
from helpers.scenarios import build_mixed_store, read_all, states
from prometheus_client import CollectorRegistry
from test_holds import HELD, RULES, check_wrapper_honours_holds

from worker import RetentionSaver
from worker.stores.engine import ThreadWork
from worker.stores.postgres import (
    CREATE_HOLDS_TABLE_SQL,
    HOLDS_LOCK_SQL,
    INSERT_HOLD_SQL,
    PostgresStore,
)
from worker.sweep import Outcome

MANY = "defaults: {max_delete_fraction: 1.0}"


@pytest.fixture(scope="module")
def mixed_template(pg_server: PgServer, pg_collation: str) -> Iterator[tuple[str, dict[str, str]]]:
    dbs = Databases(pg_server, "holds_template", pg_collation)
    dsn = dbs.create()

    async def build() -> dict[str, str]:
        async with pg_saver(dsn) as saver:
            return await build_mixed_store(saver)

    shapes = asyncio.run(build())
    yield dsn, shapes
    dbs.drop_all()


@pytest.fixture
def dbs(
    pg_server: PgServer, pg_collation: str, request: pytest.FixtureRequest
) -> Iterator[Databases]:
    d = Databases(pg_server, request.node.name, pg_collation)
    yield d
    d.drop_all()


@pytest.fixture
def mixed(mixed_template: tuple[str, dict[str, str]], dbs: Databases) -> tuple[str, str, Any]:
    """Two copies of the mixed store: one to hold threads in, one untouched control."""
    template, shapes = mixed_template
    return dbs.clone(template), dbs.clone(template), shapes


async def engine_on(dsn: str, **kwargs: Any) -> PostgresStore:
    engine = PostgresStore("pg", dsn, **kwargs)
    await engine.open()
    return engine


async def hold(dsn: str, *thread_ids: str) -> None:
    engine = await engine_on(dsn)
    try:
        for tid in thread_ids:
            assert await engine.hold(tid, "case 42", "legal") is not None
    finally:
        await engine.close()


async def release(dsn: str, *thread_ids: str) -> None:
    engine = await engine_on(dsn)
    try:
        for tid in thread_ids:
            assert await engine.release(tid)
    finally:
        await engine.close()


async def read_threads(dsn: str, shapes: dict[str, str], threads: set[str]) -> Any:
    """Every checkpoint of `threads` through the real saver, their states, their blobs."""
    keys = [k for k in await all_keys(dsn) if k[0] in threads]
    async with pg_saver(dsn) as saver:
        checkpoints = await read_all(saver, keys)
        heads = await states(saver, {t: s for t, s in shapes.items() if t in threads})
    blobs = {b for b in await blob_keys(dsn) if b[0] in threads}
    return checkpoints, heads, blobs


@pytest.mark.parametrize("rule", sorted(RULES))
async def test_held_threads_survive_every_rule_and_release_makes_them_eligible(
    mixed: tuple[str, str, dict[str, str]], rule: str
) -> None:
    dsn, control, shapes = mixed
    now = time.time()
    await hold(dsn, *HELD)
    before = await read_threads(dsn, shapes, set(HELD))

    report = await run_pg_sweep(dsn, RULES[rule], now=now, extra=MANY)
    control_report = await run_pg_sweep(control, RULES[rule], now=now, extra=MANY)
    assert report.outcome is Outcome.SUCCESS and control_report.outcome is Outcome.SUCCESS

    # Checkpoints, states and blobs of the held threads are exactly as before.
    assert await read_threads(dsn, shapes, set(HELD)) == before
    held_keys = {k for k in await all_keys(dsn) if k[0] in HELD}
    assert {k for k in await all_keys(control) if k[0] in HELD} < held_keys
    assert {k for k in await all_keys(dsn) if k[0] not in HELD} == {
        k for k in await all_keys(control) if k[0] not in HELD
    }
    assert report.policies["r"].skipped["held"] == len(HELD)
    assert report.held_threads == len(HELD)

    await release(dsn, *HELD)
    again = await run_pg_sweep(dsn, RULES[rule], now=now, extra=MANY)
    assert "held" not in again.policies["r"].skipped and again.held_threads == 0
    assert await all_keys(dsn) == await all_keys(control)


WAITING_ADVISORY_SQL = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"


async def test_a_hold_in_flight_wins_against_a_batch_already_running(
    mixed: tuple[str, str, dict[str, str]],
) -> None:
    """A first `hold` (which creates the table) is uncommitted when a batch that expires
    the thread starts: the batch waits for it, then sees it, and deletes nothing.

    Timing is forced, not hoped for: the hold's transaction stays open until
    pg_locks shows the batch waiting on the holds lock.
    """
    dsn, _, shapes = mixed
    engine = await engine_on(dsn, lock_timeout=60.0)
    try:
        assert await engine.holds() == []  # no table yet: the batch has to find it later
        (scanned,) = await engine.scan(["user-old-1"])
        work = ThreadWork("user-old-1", scanned.fingerprint, expire=True, defer_blobs=True)
        before = await read_threads(dsn, shapes, {"user-old-1"})
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
        assert await read_threads(dsn, shapes, {"user-old-1"}) == before
        # Released, the same work goes: it was valid all along.
        await release(dsn, "user-old-1")
        (result,) = await engine.apply([work], dry_run=False)
        assert result.counts.threads == 1 and not result.on_hold
    finally:
        await engine.close()


async def test_purge_refuses_held_threads_and_cli_lists_holds(
    tmp_path: Path, mixed: tuple[str, str, dict[str, str]]
) -> None:
    dsn, _, _ = mixed
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


async def test_wrapper_honours_holds_on_postgres(dbs: Databases) -> None:
    dsn, control_dsn = dbs.create(), dbs.create()
    async with pg_saver(dsn) as inner, pg_saver(control_dsn) as control:
        await hold(dsn, "held")  # placed by the worker, read by the wrapper
        saver = RetentionSaver(
            inner, keep_last=1, slack=0, expire_after="30d", registry=CollectorRegistry()
        )
        assert await saver.ahold("old-held")
        assert not await saver.ahold("held")
        await check_wrapper_honours_holds(saver, control)


async def test_holds_listing_pages_in_the_database_order(dbs: Databases) -> None:
    """More holds than a page, on a store without any other table of ours."""
    dsn = dbs.create()
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
