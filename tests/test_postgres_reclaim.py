"""Postgres reclamation: VACUUM (ANALYZE) after a large sweep, VACUUM FULL on request,
and a clear refusal for a role that may not vacuum.

The store is a real `AsyncPostgresSaver` thread copied thousands of times; the
kept checkpoints are compared through the real saver with an untouched clone
swept the same way without reclamation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.pg_scenarios import (
    Databases,
    all_keys,
    cli,
    connect,
    json_events,
    pg_saver,
    replicate,
    sessions_gone,
    write_config,
)
from helpers.pgserver import PgServer
from helpers.scenarios import read_all, turns

from worker.service.demo import chat_graph

THREADS = 2000
POLICY = '  - name: trim\n    match: {thread_id: "bulk-*"}\n    keep_last: 2\n'
STATS_SQL = """
SELECT relname, n_dead_tup, vacuum_count, last_vacuum IS NOT NULL
FROM pg_stat_user_tables WHERE relname = ANY($1::text[])
"""
# A fresh snapshot: the statistics read below are those reported by now.
CLEAR_SNAPSHOT_SQL = "SELECT pg_stat_clear_snapshot()"
DEAD_SQL = """
SELECT relname, n_dead_tup, n_live_tup FROM pg_stat_user_tables
WHERE relname = ANY($1::text[])
"""


@pytest.fixture
def dbs(pg_server: PgServer) -> Iterator[Databases]:
    d = Databases(pg_server, "reclaim")
    yield d
    d.drop_all()


async def bulk_store(dsn: str) -> None:
    async with pg_saver(dsn) as saver:
        await turns(chat_graph(saver), "t", 8)
    await replicate(dsn, "t", [f"bulk-{i:05d}-" for i in range(THREADS)])


async def table_stats(dsn: str) -> dict[str, tuple[int, int, bool]]:
    async with connect(dsn) as conn:
        rows = await conn.fetch(STATS_SQL, ["checkpoints", "checkpoint_writes", "checkpoint_blobs"])
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


async def kept(dsn: str, keys: list[tuple[str, str, str]]) -> dict[Any, Any]:
    async with pg_saver(dsn) as saver:
        return await read_all(saver, keys)


async def test_vacuum_after_a_large_sweep(pg_dsn: str, dbs: Databases, tmp_path: Path) -> None:
    await bulk_store(pg_dsn)
    twin = dbs.clone(pg_dsn)
    # The same sweep on both; only one reclaims after it.
    assert cli("once", config=write_config(tmp_path / "twin.yaml", twin, POLICY)).returncode == 0
    before = await table_stats(pg_dsn)
    cfg = write_config(
        tmp_path / "janitor.yaml",
        pg_dsn,
        POLICY,
        # 0.3, not 0.5: the sweep's own deletions are reported before the
        # decision, but the builder's session reports its inserts as it exits,
        # possibly after replicate's ANALYZE counted them: n_live_tup may be
        # up to twice the rows, and 22 of 24 gone read as 22 / (22 + 26) = 0.46.
        extra="defaults: {reclaim: {after_sweep: true, min_deleted_fraction: 0.3}}",
    )
    done = cli("once", config=cfg)
    assert done.returncode == 0, done.stderr
    (event,) = [e for e in json_events(done.stderr) if e["event"] == "reclaim"]
    # keep_last 2 of 24 deletes most checkpoints and writes; blobs stay referenced.
    assert event["action"] == "vacuum"
    assert {"checkpoints", "checkpoint_writes"} <= set(event["tables"])
    after = await table_stats(pg_dsn)
    for table in event["tables"]:
        # vacuum_count counts manual VACUUMs only (autovacuum has its own).
        assert after[table][1] > before[table][1], table
        assert after[table][2], table  # last_vacuum is set
    # n_dead_tup after the VACUUM: test_dead_tuples_the_vacuum_step_removed_...

    keys = await all_keys(twin)
    assert keys == await all_keys(pg_dsn)
    sample = [k for k in keys if k[0] < "bulk-00100" or not k[0].startswith("bulk-")]
    assert await kept(pg_dsn, sample) == await kept(twin, sample)

    stats = cli("stats", "--format", "json", config=cfg)
    assert stats.returncode == 0, stats.stderr
    assert '"dead_rows"' in stats.stdout and '"index_bytes"' in stats.stdout


async def test_dead_tuples_the_vacuum_step_removed_are_not_reported_again(
    pg_dsn: str, tmp_path: Path
) -> None:
    """Issue 12's bench: the sweep's sessions reported their deletions after the
    VACUUM step had counted none, and `stats` showed them as reclaimable."""
    await bulk_store(pg_dsn)
    await sessions_gone(pg_dsn)
    cfg = write_config(
        tmp_path / "janitor.yaml",
        pg_dsn,
        POLICY,
        # Small batches: many deleting transactions a second, so a session has
        # counts it has not reported yet when the sweep ends (a backend
        # reports at most once a second).
        extra="defaults: {batch: {max_batch_threads: 25}, "
        "reclaim: {after_sweep: true, min_deleted_fraction: 0.3}}",
    )
    done = cli("once", config=cfg)
    assert done.returncode == 0, done.stderr
    (event,) = [e for e in json_events(done.stderr) if e["event"] == "reclaim"]
    assert event["action"] == "vacuum"
    vacuumed = set(event["tables"])
    assert {"checkpoints", "checkpoint_writes"} <= vacuumed
    # Every worker session has exited, so has reported all it counted: what
    # the statistics say now is final, not a moment before a late report.
    await sessions_gone(pg_dsn)
    async with connect(pg_dsn) as conn:
        await conn.execute(CLEAR_SNAPSHOT_SQL)
        rows = await conn.fetch(DEAD_SQL, sorted(vacuumed))
    dead = {r[0]: int(r[1]) for r in rows}
    live = {r[0]: int(r[2]) for r in rows}
    # keep_last 2 of 24: tens of thousands deleted; the VACUUM removed them all.
    assert dead == dict.fromkeys(vacuumed, 0), (dead, live)

    shown = cli("stats", "--format", "json", config=cfg)
    assert shown.returncode == 0, shown.stderr
    (store,) = json.loads(shown.stdout)["stores"]
    tables = store["space"]["tables"]
    assert {t: tables[t]["dead_rows"] for t in vacuumed} == dict.fromkeys(vacuumed, 0)
    assert {t: tables[t]["reclaimable_bytes"] for t in vacuumed} == dict.fromkeys(vacuumed, 0)
    assert store["reclaimable_bytes"] == sum(t["reclaimable_bytes"] for t in tables.values())
    async with connect(pg_dsn) as conn:
        counted = {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in vacuumed}
    # The live counts are the rows kept (ANALYZE's estimate; a late report
    # would have taken the deletions off them again).
    assert {t: tables[t]["live_rows"] for t in vacuumed} == counted


async def test_below_the_threshold_nothing_is_vacuumed(pg_dsn: str, tmp_path: Path) -> None:
    await bulk_store(pg_dsn)
    cfg = write_config(
        tmp_path / "janitor.yaml",
        pg_dsn,
        '  - name: one\n    match: {thread_id: "bulk-00000-t"}\n    keep_last: 1\n',
        extra="defaults: {reclaim: {after_sweep: true}}",
    )
    before = await table_stats(pg_dsn)
    done = cli("once", config=cfg)
    assert done.returncode == 0, done.stderr
    assert not [e for e in json_events(done.stderr) if e["event"] == "reclaim"]
    after = await table_stats(pg_dsn)
    assert {t: v[1] for t, v in after.items()} == {t: v[1] for t, v in before.items()}


async def test_full_asks_first_then_rewrites(pg_dsn: str, tmp_path: Path) -> None:
    await bulk_store(pg_dsn)
    cfg = write_config(tmp_path / "janitor.yaml", pg_dsn, POLICY)
    assert cli("once", config=cfg).returncode == 0
    keys = await all_keys(pg_dsn)
    sample = [k for k in keys if k[0] < "bulk-00100"]
    expected = await kept(pg_dsn, sample)
    declined = cli("reclaim", "--store", "pg", "--full", config=cfg, input="n\n")
    assert declined.returncode == 0 and "ACCESS EXCLUSIVE" in declined.stdout
    assert "nothing changed" in declined.stdout
    done = cli("reclaim", "--store", "pg", "--full", "--yes", "--format", "json", config=cfg)
    assert done.returncode == 0, done.stderr
    result = done.stdout[done.stdout.index('{\n  "reclaimed"') :]
    (r,) = json.loads(result)["reclaimed"]
    assert r["action"] == "vacuum_full" and r["reclaimed_bytes"] > 0
    assert await all_keys(pg_dsn) == keys
    assert await kept(pg_dsn, sample) == expected


async def test_a_role_that_may_not_vacuum_gets_one_clear_line(
    pg_dsn: str, pg_server: PgServer, tmp_path: Path
) -> None:
    await bulk_store(pg_dsn)
    async with connect(pg_dsn) as conn:
        await conn.execute("DROP ROLE IF EXISTS janitor_rw")
        await conn.execute("CREATE ROLE janitor_rw LOGIN PASSWORD 'pw'")
        await conn.execute(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO janitor_rw"
        )
    db = pg_dsn.rsplit("/", 1)[1]
    dsn = f"postgresql://janitor_rw:pw@{pg_server.host}:{pg_server.port}/{db}"
    try:
        cfg = write_config(tmp_path / "janitor.yaml", dsn, POLICY)
        done = cli("reclaim", config=cfg)
        assert done.returncode == 1
        assert "Traceback" not in done.stderr
        (line,) = [x for x in done.stderr.splitlines() if "may not VACUUM" in x]
        assert "owner" in line and "MAINTAIN" in line
    finally:
        async with connect(pg_dsn) as conn:
            await conn.execute("DROP OWNED BY janitor_rw")
            await conn.execute("DROP ROLE janitor_rw")
