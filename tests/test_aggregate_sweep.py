"""Sweeps planned from aggregates delete exactly what the row-level decision deletes.

Each store, written by real graphs through the real saver (every shape of
`build_mixed_store`, awkward thread ids, a crashed run's writes, ids that are
not UUIDv6, huge threads trimmed in chunks), is copied twice: one copy is swept
as the worker does (`plan_from_aggregates`, the default), the other with every
thread decided from its rows (`policies.decide`, the oracle). Both copies must
then hold the same rows, column for column, and the sweeps report the same
counts; the swept store still reads back unchanged through the saver.

`orphaned` rule sets ask a registry in the store's own database (`app_threads`,
every other thread id of the template): both copies ask the same one, the
planned copy once per page for the page's ids, the oracle per row page.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers.backends import sweep_config
from helpers.pg_scenarios import Databases, connect, pg_config, pg_saver
from helpers.pg_scenarios import dump as pg_dump
from helpers.pgserver import PgServer
from helpers.scenarios import OLD_DAYS, build_mixed_store, turns
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from test_decide import THREAD_IDS

from policies.model import Reason, SkipReason
from policies.plan import Detail, ThreadPlan
from worker.service.config_files import load_config_text
from worker.service.demo import aged, chat_graph, thread
from worker.stores.engine import ScannedThread
from worker.stores.sqlite import SqliteStore
from worker.sweep import Outcome, SweepOptions, SweepReport, sweep

AWKWARD = THREAD_IDS
"""The decision tests' awkward ids: case variants, glob characters, the empty id, ..."""

POLICIES = {
    "keep-last": "  - {name: k, keep_last: 2}",
    "keep-within": "  - {name: k, keep_last: 1, keep_within: 30d}",
    "idle": "  - {name: idle, expire_after: 30d}\n  - {name: k, keep_last: 3}",
    "idle-expire-waiting": "  - {name: idle, expire_after: 30d, interrupted: expire, keep_last: 2}",
    "protect-and-metadata": (
        "  - {name: vip, match: {thread_id: 'vip-*'}, protect: true}\n"
        "  - {name: bot, match: {metadata: {assistant_id: support-bot}}, keep_last: 1}\n"
        "  - {name: calls, match: {checkpoint_ns: 'inner:*'}, keep_last: 1}\n"
        "  - {name: rest, keep_last: 2, expire_after: 45d}"
    ),
    # Unlisted and idle 20 days: expired as orphaned; listed: trimmed by `rest`.
    "orphaned": (
        "  - {name: vip, match: {thread_id: 'vip-*'}, protect: true}\n"
        "  - name: orphans\n"
        "    orphaned: {query: 'SELECT thread_id FROM app_threads'}\n"
        "    expire_after: 20d\n"
        "    keep_last: 2\n"
        "  - {name: rest, keep_last: 3, expire_after: 50d}"
    ),
    # The registry fails: nothing is orphaned, every thread falls through (and is counted).
    "orphaned-failing": (
        "  - name: orphans\n"
        "    orphaned: {query: 'SELECT no_such_column FROM app_threads'}\n"
        "    expire_after: 1d\n"
        "  - {name: rest, keep_last: 2, expire_after: 45d}"
    ),
}
ORPHAN_RULES = {"orphaned", "orphaned-failing"}

# The application's registry in the store's own database, keyed by its id as apps keep them.
REGISTRY_DDL = "CREATE TABLE app_threads (thread_id TEXT PRIMARY KEY)"
REGISTRY_FILL_SQL = "INSERT INTO app_threads VALUES (?)"
# Unordered: `listed_half` sorts in Python, so both backends list the same half whatever
# their collation.
THREAD_IDS_SQL = "SELECT DISTINCT thread_id FROM checkpoints"


def listed_half(thread_ids: Sequence[str]) -> list[str]:
    """Every other thread id in code-point order: what the registry still lists."""
    return sorted(thread_ids)[::2]


class ScanCountingStore(SqliteStore):
    """The real SQLite engine, noting which threads the sweep read row by row."""

    scanned: list[str]

    async def scan(self, thread_ids: Sequence[str]) -> list[ScannedThread]:
        """As the engine's, remembering `thread_ids`."""
        self.scanned.extend(thread_ids)
        return await super().scan(thread_ids)


async def build_store(saver: BaseCheckpointSaver[Any]) -> None:
    """Every shape, awkward ids old and new, crashed runs' writes, a huge thread."""
    chat = chat_graph(saver)
    with aged(OLD_DAYS):
        for i, tid in enumerate(AWKWARD):
            await turns(chat, f"old:{tid}", 1 + i % 4, assistant_id="support-bot")
        await turns(chat, "crashed-old", 3)
        head = await saver.aget_tuple(thread("crashed-old"))
        assert head is not None
        # A crashed run: writes against a checkpoint that never committed.
        ghost = {**head.config["configurable"], "checkpoint_id": str(uuid6())}
        await saver.aput_writes({"configurable": ghost}, [("messages", ["x"])], "t-1")
    await build_mixed_store(saver)
    for i, tid in enumerate(AWKWARD):
        await turns(chat, tid, 2 + i % 5)
    await turns(chat, "huge", 40)
    await turns(chat, "crashed-new", 4)
    # A live thread's write whose checkpoint is missing, older than the kept
    # ones: a trim's range covers it, yet it is not that trim's to delete.
    oldest = [c async for c in saver.alist(thread("crashed-new"))][-1]
    cid = oldest.config["configurable"]["checkpoint_id"]
    ghost = {**oldest.config["configurable"], "checkpoint_id": cid[:-1] + "z"}
    await saver.aput_writes({"configurable": ghost}, [("messages", ["y"])], "t-2")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`build_store` on SQLite, plus a thread whose ids are not UUIDv6."""
    path = tmp_path_factory.mktemp("aggregate") / "template.db"

    async def build() -> None:
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            await build_store(saver)

    asyncio.run(build())
    with sqlite3.connect(path) as con:
        # A thread whose ids are not UUIDv6 (custom ids): the rows decide it.
        con.execute(
            "INSERT INTO checkpoints SELECT 'custom-ids', checkpoint_ns, upper(checkpoint_id), "
            "upper(parent_checkpoint_id), type, checkpoint, metadata FROM checkpoints "
            "WHERE thread_id = 'huge'"
        )
        con.commit()
        tids = [r[0] for r in con.execute(THREAD_IDS_SQL)]
        con.execute(REGISTRY_DDL)
        con.executemany(REGISTRY_FILL_SQL, [(t,) for t in listed_half(tids)])
        con.commit()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


async def _sweep(
    path: Path,
    policies: str,
    now: float,
    *,
    aggregates: bool,
    scanned: list[str] | None = None,
    **opts: Any,
) -> Any:
    cfg = load_config_text(
        f"stores:\n  - name: app\n    kind: sqlite\n    path: '{path}'\n"
        f"defaults:\n  batch: {{max_batch_rows: 7, pause_factor: 0}}\npolicies:\n{policies}\n"
    )
    engine = ScanCountingStore("app", str(path), read_only=opts.get("dry_run", False))
    engine.scanned = scanned if scanned is not None else []
    await engine.open()
    try:
        return await sweep(
            engine,
            cfg.policies_for("app"),
            SweepOptions(
                settings=cfg.store_settings("app"),
                allow_mass_expiry=True,
                plan_from_aggregates=aggregates,
                **opts,
            ),
            now=now,
        )
    finally:
        await engine.close()


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as con:
        return {
            "checkpoints": con.execute(
                "SELECT * FROM checkpoints ORDER BY thread_id, checkpoint_ns, checkpoint_id"
            ).fetchall(),
            "writes": con.execute(
                "SELECT * FROM writes "
                "ORDER BY thread_id, checkpoint_ns, checkpoint_id, task_id, idx"
            ).fetchall(),
        }


def totals(report: SweepReport, blobs: bool = True) -> dict[str, tuple[int, ...]]:
    """Rows deleted per policy. A dry run's blob count is an estimate per batch part
    (what goes with that part's checkpoints alone), so it depends on the chunking."""
    return {
        name: (d.threads, d.checkpoints, d.writes, d.blobs if blobs else -1, d.bytes)
        for name, p in report.policies.items()
        for d in [p.deleted]
    }


@pytest.mark.parametrize("days_later", [0, 40])
@pytest.mark.parametrize("rules", sorted(POLICIES))
async def test_aggregate_plan_deletes_what_rows_decide(
    tmp_path: Path, template: Path, rules: str, days_later: int
) -> None:
    now = time.time() + days_later * 86400
    planned, oracle = tmp_path / "planned.db", tmp_path / "oracle.db"
    shutil.copy(template, planned)
    shutil.copy(template, oracle)
    before = dump(template)

    dry = await _sweep(planned, POLICIES[rules], now, aggregates=True, dry_run=True)
    dry_oracle = await _sweep(oracle, POLICIES[rules], now, aggregates=False, dry_run=True)
    assert dump(planned) == before
    assert totals(dry) == totals(dry_oracle)

    from_rows: list[str] = []
    report = await _sweep(planned, POLICIES[rules], now, aggregates=True, scanned=from_rows)
    expected = await _sweep(oracle, POLICIES[rules], now, aggregates=False)
    assert report.outcome is expected.outcome is Outcome.SUCCESS
    assert dump(planned) == dump(oracle)
    assert totals(report) == totals(expected)
    assert totals(report) == totals(dry)
    assert report.deleted.checkpoints > 0
    assert {n: dict(p.skipped) for n, p in report.policies.items()} == {
        n: dict(p.skipped) for n, p in expected.policies.items()
    }
    if rules in ORPHAN_RULES:
        orphans, oracle_orphans = report.policies["orphans"], expected.policies["orphans"]
        assert orphans.by_reason == oracle_orphans.by_reason
        if rules == "orphaned":
            assert orphans.registry_error is None
            assert orphans.by_reason[Reason.ORPHANED].threads > 0
        else:
            assert orphans.registry_error is not None
            assert orphans.skipped[SkipReason.REGISTRY_UNAVAILABLE] > 0
        # Planned from aggregates: the plain root-only chat threads are never read as rows.
        assert "huge" not in from_rows and "crashed-new" not in from_rows


async def test_detail_reads_do_not_queue_behind_the_planning_reader(
    tmp_path: Path, template: Path
) -> None:
    """The pages in flight read their details on connections of their own: while the
    planning connection (`reader`) is busy with another read, `details` still answers,
    and answers what it answers with every connection free."""
    path = tmp_path / "store.db"
    shutil.copy(template, path)
    engine = SqliteStore("app", str(path))
    await engine.open()
    gate = threading.Event()
    busy: asyncio.Future[Any] | None = None
    try:
        aggs = [a for page in [p async for p in engine.aggregate_pages(1000, False)] for a in page]
        needs = frozenset({Detail.ORPHANS, Detail.REGULAR, Detail.WAITING, Detail.MARKERS})
        asked = [
            (a, ThreadPlan(a.thread_id, needs=needs))
            for a in aggs
            if any(ns.namespace == "" for ns in a.namespaces)
        ]
        free = await engine.details(asked)
        # A read that holds the planning connection's thread until the gate opens.
        await engine.reader.create_function("held_until_gate", 0, gate.wait)
        busy = asyncio.ensure_future(engine.reader.execute("SELECT held_until_gate()"))
        beside = await asyncio.wait_for(engine.details(asked), timeout=30)
        assert not busy.done()
        assert beside == free
        assert any(a.orphan_writes for a in beside)  # the crashed runs' writes
    finally:
        gate.set()
        if busy is not None:
            await busy
        await engine.close()


# ------------------------------------------------------------------ Postgres

# A thread whose ids are not UUIDv6 (custom ids): the rows decide it.
PG_CUSTOM_IDS_SQL = """
INSERT INTO checkpoints
SELECT 'custom-ids', checkpoint_ns, upper(checkpoint_id), upper(parent_checkpoint_id),
       type, checkpoint, metadata
FROM checkpoints WHERE thread_id = 'huge'
"""
PG_REGISTRY_FILL_SQL = "INSERT INTO app_threads VALUES ($1)"
PG_CUSTOM_BLOBS_SQL = """
INSERT INTO checkpoint_blobs
SELECT 'custom-ids', checkpoint_ns, channel, version, type, blob
FROM checkpoint_blobs WHERE thread_id = 'huge'
"""


@pytest.fixture(scope="module")
def pg_template(pg_server: PgServer, pg_collation: str) -> Iterator[str]:
    """`build_store` on Postgres (C and ICU collations), plus non-UUIDv6 ids."""
    dbs = Databases(pg_server, "aggregate_template", pg_collation)
    dsn = dbs.create()

    async def build() -> None:
        async with pg_saver(dsn) as saver:
            await build_store(saver)
        async with connect(dsn) as conn:
            await conn.execute(PG_CUSTOM_IDS_SQL)
            await conn.execute(PG_CUSTOM_BLOBS_SQL)
            tids = [r[0] for r in await conn.fetch(THREAD_IDS_SQL)]
            await conn.execute(REGISTRY_DDL)
            await conn.executemany(PG_REGISTRY_FILL_SQL, [(t,) for t in listed_half(tids)])

    asyncio.run(build())
    yield dsn
    dbs.drop_all()


async def _pg_sweep(dsn: str, policies: str, now: float, *, aggregates: bool, **opts: Any) -> Any:
    cfg = pg_config(policies, dsn, "defaults:\n  batch: {max_batch_rows: 7, pause_factor: 0}")
    return await sweep_config(
        cfg, "pg", now, allow_mass_expiry=True, plan_from_aggregates=aggregates, **opts
    )


@pytest.mark.parametrize("days_later", [0, 40])
@pytest.mark.parametrize("rules", sorted(POLICIES))
async def test_postgres_aggregate_plan_deletes_what_rows_decide(
    pg_server: PgServer, pg_collation: str, pg_template: str, rules: str, days_later: int
) -> None:
    now = time.time() + days_later * 86400
    dbs = Databases(pg_server, "aggregate", pg_collation)
    try:
        planned, oracle = dbs.clone(pg_template), dbs.clone(pg_template)
        before = await pg_dump(pg_template)

        dry = await _pg_sweep(planned, POLICIES[rules], now, aggregates=True, dry_run=True)
        dry_oracle = await _pg_sweep(oracle, POLICIES[rules], now, aggregates=False, dry_run=True)
        assert await pg_dump(planned) == before
        assert totals(dry, blobs=False) == totals(dry_oracle, blobs=False)

        report = await _pg_sweep(planned, POLICIES[rules], now, aggregates=True)
        expected = await _pg_sweep(oracle, POLICIES[rules], now, aggregates=False)
        assert report.outcome is expected.outcome is Outcome.SUCCESS
        after, after_oracle = await pg_dump(planned), await pg_dump(oracle)
        assert after == after_oracle
        assert totals(report) == totals(expected)
        assert totals(report, blobs=False) == totals(dry, blobs=False)
        assert report.deleted.checkpoints > 0
        assert {n: dict(p.skipped) for n, p in report.policies.items()} == {
            n: dict(p.skipped) for n, p in expected.policies.items()
        }
        if rules in ORPHAN_RULES:
            orphans, oracle_orphans = report.policies["orphans"], expected.policies["orphans"]
            assert orphans.by_reason == oracle_orphans.by_reason
            assert (orphans.registry_error is None) == (rules == "orphaned")
    finally:
        dbs.drop_all()
