"""Batch sizing and pacing: the rule for resting between batches, and what the engines tell it.

The rule (`Pacer`) runs on the sweep's own time (batch and rest seconds
added up), so it is checked here with no clock at all; each engine's half
(`contention`) is checked against a real saver writing between batches.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from helpers.pg_scenarios import pg_saver
from helpers.scenarios import turns
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from worker.service.demo import chat_graph
from worker.stores.engine import ThreadWork, TrimRange
from worker.stores.postgres import PostgresStore
from worker.stores.sqlite import SqliteStore
from worker.stores.throttle import (
    AIM,
    PROBE_EVERY,
    PROBE_SECONDS,
    WRITER_WINDOW,
    BatchSizer,
    Pacer,
)


def test_without_writer_information_every_batch_rests_pause_factor() -> None:
    # An engine that cannot tell (writer_seen None): max(pause, factor x batch).
    pacer = Pacer(pause=0.01, pause_factor=0.5)
    assert [pacer.rest(0.2, None) for _ in range(50)] == [0.1] * 50
    assert pacer.rest(0.001, None) == 0.01


def test_no_writer_seen_rests_only_a_probe_every_probe_every_seconds() -> None:
    pacer = Pacer(pause=0.0, pause_factor=0.5)
    batch = 0.25  # exact in binary, so the sums below are too
    rests = [pacer.rest(batch, False) for _ in range(50)]
    probes = [i for i, r in enumerate(rests) if r]
    assert set(rests) == {0.0, PROBE_SECONDS}
    # One probe per PROBE_EVERY seconds of sweeping.
    every = round(PROBE_EVERY / batch)
    assert probes == list(range(every - 1, 50, every))
    # The fixed pause still applies after every batch.
    fixed = Pacer(pause=0.03, pause_factor=0.5)
    assert min(fixed.rest(batch, False) for _ in range(20)) == 0.03


def test_a_writer_seen_brings_back_pause_factor_for_the_writer_window() -> None:
    pacer = Pacer(pause=0.0, pause_factor=0.5)
    for _ in range(20):
        pacer.rest(0.2, False)
    assert pacer.rest(0.2, True) == 0.1
    # Every batch within WRITER_WINDOW seconds (batches and rests) of it rests too.
    after: list[float] = []
    elapsed = 0.0
    while elapsed < WRITER_WINDOW:
        after.append(pacer.rest(0.2, False))
        elapsed += 0.2 + after[-1]
    assert after[:-1] == [0.1] * (len(after) - 1)
    assert all(r in (0.0, PROBE_SECONDS) for r in (pacer.rest(0.2, False) for _ in range(30)))


def test_pause_factor_zero_turns_the_probes_off() -> None:
    pacer = Pacer(pause=0.0, pause_factor=0.0)
    assert {pacer.rest(0.2, w) for w in [False] * 40 + [True] + [False] * 40} == {0.0}


def test_sizer_aims_at_the_slowest_recent_batch() -> None:
    sizer = BatchSizer(target_seconds=0.2, rows=500)
    for _ in range(12):
        sizer.observe(sizer.rows, sizer.rows / 50_000)  # 50,000 rows/s
    steady = sizer.rows
    assert abs(steady - 50_000 * 0.2 * AIM) <= 1
    sizer.observe(steady, steady / 25_000)  # one batch at half the rate
    halved = sizer.rows
    assert abs(halved - 25_000 * 0.2 * AIM) <= 1
    # Fast batches after it do not grow the size back while it is remembered.
    for _ in range(6):
        sizer.observe(sizer.rows, sizer.rows / 50_000)
        assert sizer.rows == halved


@pytest.fixture
async def store(tmp_path: Path) -> Path:
    path = tmp_path / "store.db"
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        for t in ("a", "b"):
            await turns(chat_graph(saver), t, 4)
    return path


def trim(path: Path, thread_id: str) -> ThreadWork:
    """A part that trims `thread_id` to its 2 newest checkpoints, as it stands now."""
    with sqlite3.connect(path) as con:
        n, newest = con.execute(
            "SELECT count(*), max(checkpoint_id) FROM checkpoints WHERE thread_id = ?",
            (thread_id,),
        ).fetchone()
    return ThreadWork(thread_id, (("", n, newest),), ranges={"": TrimRange(2, "g", n - 2)})


async def test_sqlite_batches_see_the_applications_commits(store: Path) -> None:
    engine = SqliteStore("app", str(store))
    await engine.open()
    try:
        [done] = await engine.apply([trim(store, "a")], dry_run=False)
        assert done.counts.checkpoints > 0
        assert not engine.contention().writer_seen  # nobody wrote since the engine opened
        # The application runs a turn through the real saver (its own connection).
        async with AsyncSqliteSaver.from_conn_string(str(store)) as saver:
            await turns(chat_graph(saver), "b", 1)
        [done] = await engine.apply([trim(store, "b")], dry_run=False)
        assert done.counts.checkpoints > 0
        assert engine.contention().writer_seen
        [done] = await engine.apply([trim(store, "b")], dry_run=False)
        assert not engine.contention().writer_seen  # nothing since the last batch
    finally:
        await engine.close()


async def test_sqlite_batch_that_waits_for_the_lock_sees_a_writer(store: Path) -> None:
    engine = SqliteStore("app", str(store), busy_timeout=0.05)
    await engine.open()
    app = sqlite3.connect(store, isolation_level=None)
    try:
        app.execute("BEGIN IMMEDIATE")  # the application holds the write lock throughout
        [result] = await engine.apply([trim(store, "a")], dry_run=False)
        assert result.locked
        seen = engine.contention()
        assert seen.writer_seen
        assert seen.lock_wait > 0
        app.execute("ROLLBACK")
    finally:
        app.close()
        await engine.close()


async def test_sqlite_close_leaves_the_deletes_in_the_file_not_only_the_wal(store: Path) -> None:
    # Without a writer about, batches leave up to WAL_CHECKPOINT_BYTES in the WAL;
    # closing the engine checkpoints them, so a purge's erasure reaches the file.
    app = sqlite3.connect(store)  # the application keeps the store open throughout
    app.execute("SELECT count(*) FROM checkpoints").fetchone()
    engine = SqliteStore("app", str(store))
    await engine.open()
    try:
        [done] = await engine.apply([trim(store, "a")], dry_run=False)
        await engine.after_batch()
        assert done.counts.checkpoints > 0
    finally:
        await engine.close()
    try:
        # `immutable` reads the main file alone, without the WAL.
        with sqlite3.connect(f"{store.as_uri()}?immutable=1", uri=True) as con:
            sql = "SELECT count(*) FROM checkpoints WHERE thread_id = 'a'"
            (n,) = con.execute(sql).fetchone()
        assert n == 2
    finally:
        app.close()


async def pg_trim(engine: PostgresStore, thread_id: str) -> ThreadWork:
    """A part that trims `thread_id` to its 2 newest checkpoints, as the engine scans it now."""
    (scanned,) = await engine.scan([thread_id])
    [(ns, n, newest)] = scanned.fingerprint
    return ThreadWork(thread_id, scanned.fingerprint, ranges={ns: TrimRange(2, newest, n - 2)})


async def test_postgres_batches_see_the_applications_commits(pg_dsn: str) -> None:
    # Transaction ids are cluster-wide: this relies on nothing else writing to the test
    # server between the batches (the suite runs one test at a time).
    async with pg_saver(pg_dsn) as saver:
        for t in ("a", "b"):
            await turns(chat_graph(saver), t, 6)
    engine = PostgresStore("pg", pg_dsn)
    await engine.open()
    try:
        assert await engine.begin_sweep(time.time())
        [done] = await engine.apply([await pg_trim(engine, "a")], dry_run=False)
        assert done.counts.checkpoints > 0
        assert not engine.contention().writer_seen  # the sweep's first batch
        [done] = await engine.apply([await pg_trim(engine, "a")], dry_run=False)
        assert not engine.contention().writer_seen  # nothing since the last batch
        # The application runs a turn through the real saver (its own connection).
        async with pg_saver(pg_dsn) as saver:
            await turns(chat_graph(saver), "b", 1)
        [done] = await engine.apply([await pg_trim(engine, "b")], dry_run=False)
        assert done.counts.checkpoints > 0
        assert engine.contention().writer_seen
        [done] = await engine.apply([await pg_trim(engine, "b")], dry_run=False)
        assert not engine.contention().writer_seen
    finally:
        await engine.end_sweep()
        await engine.close()
