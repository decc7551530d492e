"""Sweeps of SQLite stores written by real graphs through the real savers: what only
SQLite has (the sync saver, the residue table, expiries noted in a file).

The policy scenarios every backend shares run on SQLite in test_sweep.py. Here, as
there: read every checkpoint through the real saver, sweep, and check that each
checkpoint still there reads back equal and that what went is what the policy says.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from helpers.backends import SqliteBackend, Template
from helpers.scenarios import (
    DAY,
    OLD_DAYS,
    read_all,
)
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from worker.service.demo import aged, chat_graph, thread
from worker.sweep import Outcome, SweepReport

# The tests that share the mixed store (`mixed`, a `backend` fixture) run on SQLite only here.
pytestmark = pytest.mark.backends("sqlite")

Key = tuple[str, str, str]


def all_keys(path: Path) -> list[Key]:
    with sqlite3.connect(path) as con:
        return [
            (t, ns, c)
            for t, ns, c in con.execute(
                "SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints"
            )
        ]


SQLITE = SqliteBackend()


async def run_sweep(path: Path, policies_yaml: str, **options: Any) -> SweepReport:
    """One sweep of the store file at `path` (`helpers.backends`)."""
    return await SQLITE.run_sweep(str(path), policies_yaml, **options)


async def test_expiries_held_in_a_temp_file_all_go(mixed: Template) -> None:
    """Past `expiries_in_memory` the pass notes expiries in a file; each still goes, once."""
    store, shapes = mixed
    path = Path(store)
    policy = "  - {name: idle, expire_after: 30d, interrupted: expire}"
    report = await run_sweep(
        path,
        policy,
        now=time.time() + 365 * DAY,
        extra="defaults: {max_delete_fraction: 1.0}",
        expiries_in_memory=2,
    )
    assert report.outcome is Outcome.SUCCESS
    assert report.expiries_wanted == report.deleted.threads == len(shapes)
    assert report.changed_threads == 0
    assert all_keys(path) == []


def test_sync_sqlite_saver_store(tmp_path: Path) -> None:
    """A store written by the sync `SqliteSaver` sweeps the same way."""
    import asyncio

    path = tmp_path / "sync.db"
    with SqliteSaver.from_conn_string(str(path)) as saver:
        app = chat_graph(saver)
        for i in range(5):
            app.invoke({"messages": [f"turn {i}"]}, thread("sync-1"))
        before = {
            t.config["configurable"]["checkpoint_id"]: (t.checkpoint, t.metadata, t.pending_writes)
            for t in saver.list(thread("sync-1"))
        }
        state = app.get_state(thread("sync-1")).values
    asyncio.run(run_sweep(path, "  - {name: trim, keep_last: 3}"))
    with SqliteSaver.from_conn_string(str(path)) as saver:
        after = {
            t.config["configurable"]["checkpoint_id"]: (t.checkpoint, t.metadata, t.pending_writes)
            for t in saver.list(thread("sync-1"))
        }
        assert len(after) == 3
        assert all(after[k] == before[k] for k in after)
        assert sorted(after) == sorted(before)[-3:]
        assert chat_graph(saver).get_state(thread("sync-1")).values == state


async def test_orphan_writes_of_crashed_run_go_after_grace(tmp_path: Path) -> None:
    path = tmp_path / "orphan.db"
    with aged(OLD_DAYS):
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            await chat_graph(saver).ainvoke({"messages": ["hi"]}, thread("user-1"))
            head = await saver.aget_tuple(thread("user-1"))
            assert head is not None
            from langgraph.checkpoint.base.id import uuid6

            # A crashed run: writes against a checkpoint that never committed.
            ghost = {**head.config["configurable"], "checkpoint_id": str(uuid6())}
            await saver.aput_writes({"configurable": ghost}, [("messages", ["lost"])], "task-1")
    with sqlite3.connect(path) as con:
        n_writes = con.execute("SELECT COUNT(*) FROM writes").fetchone()[0]
    # Cadence 0: every sweep looks at every quiet thread's residue.
    report = await run_sweep(path, "  - {name: trim, keep_last: 10}", residue_check_every=0)
    assert report.policies["trim"].deleted.writes == 1
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT COUNT(*) FROM writes").fetchone()[0] == n_writes - 1


async def crash_a_run(path: Path, thread_id: str) -> None:
    """Writes against a checkpoint that never committed, dated `OLD_DAYS` ago."""
    from langgraph.checkpoint.base.id import uuid6

    with aged(OLD_DAYS):
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            head = await saver.aget_tuple(thread(thread_id))
            assert head is not None
            ghost = {**head.config["configurable"], "checkpoint_id": str(uuid6())}
            await saver.aput_writes({"configurable": ghost}, [("messages", ["lost"])], "task-1")


def count_writes(path: Path) -> int:
    with sqlite3.connect(path) as con:
        return int(con.execute("SELECT COUNT(*) FROM writes").fetchone()[0])


async def test_residue_waits_for_its_cadence_then_goes(tmp_path: Path) -> None:
    """With `residue_check_every`, a sweep looks at quiet threads' orphan writes only once
    the last complete look is that old; the look is dated in the store, and what the
    skipped sweep left goes with the next look, the kept checkpoints reading back equal."""
    path = tmp_path / "cadence.db"
    with aged(OLD_DAYS):
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            for tid in ("user-1", "user-2"):
                await chat_graph(saver).ainvoke({"messages": ["hi"]}, thread(tid))
    policy = "  - {name: trim, keep_last: 10}"
    day = 86400.0
    t0 = time.time()
    first = await run_sweep(path, policy, now=t0, residue_check_every=day)
    assert first.outcome is Outcome.SUCCESS, first.error
    with sqlite3.connect(path) as con:
        dated = con.execute("SELECT policy, checked_at FROM checkpoint_janitor_residue_checks")
        assert [(p, datetime.fromisoformat(at).timestamp()) for p, at in dated] == [
            ("trim", float(int(t0)))
        ]
    await crash_a_run(path, "user-1")
    untouched = tmp_path / "untouched.db"
    shutil.copy(path, untouched)
    n_writes = count_writes(path)
    async with AsyncSqliteSaver.from_conn_string(str(untouched)) as saver:
        before = await read_all(saver, all_keys(untouched))

    # Within the cadence: the crashed run's writes are not looked for.
    skipped = await run_sweep(path, policy, now=t0 + 3600, residue_check_every=day)
    assert skipped.policies["trim"].deleted.writes == 0
    assert count_writes(path) == n_writes

    # A day after the last look: the next sweep looks, and they go.
    caught_up = await run_sweep(path, policy, now=t0 + day + 1, residue_check_every=day)
    assert caught_up.policies["trim"].deleted.writes == 1
    assert count_writes(path) == n_writes - 1
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        assert await read_all(saver, all_keys(path)) == before
    with sqlite3.connect(path) as con:
        (at,) = con.execute("SELECT checked_at FROM checkpoint_janitor_residue_checks").fetchone()
    assert datetime.fromisoformat(at).timestamp() == float(int(t0 + day + 1))


async def test_expiry_candidates_read_their_orphan_writes_between_looks(tmp_path: Path) -> None:
    """Between residue looks, an idle thread's orphan writes still date it: a run that
    crashed an hour ago keeps a thread whose checkpoints are old from expiring."""
    from langgraph.checkpoint.base.id import uuid6

    path = tmp_path / "idle.db"
    with aged(OLD_DAYS):
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            await chat_graph(saver).ainvoke({"messages": ["hi"]}, thread("user-1"))
    policy = "  - {name: idle, expire_after: 30d}"
    day = 86400.0
    t0 = time.time()
    with aged(-1 / 24):
        # Minted an hour ahead: seen from the sweep an hour later, the crash is fresh.
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            head = await saver.aget_tuple(thread("user-1"))
            assert head is not None
            ghost = {**head.config["configurable"], "checkpoint_id": str(uuid6())}
            await saver.aput_writes({"configurable": ghost}, [("messages", ["x"])], "task-1")
    with sqlite3.connect(path) as con:
        con.execute(
            "CREATE TABLE checkpoint_janitor_residue_checks "
            "(policy TEXT PRIMARY KEY, checked_at TEXT NOT NULL)"
        )
        con.execute(
            "INSERT INTO checkpoint_janitor_residue_checks VALUES ('idle', ?)",
            (datetime.fromtimestamp(t0, UTC).isoformat(),),
        )
    report = await run_sweep(path, policy, now=t0 + 3600, residue_check_every=day)
    assert report.outcome is Outcome.SUCCESS, report.error
    assert report.expiries_wanted == 0
    assert {t for t, _, _ in all_keys(path)} == {"user-1"}
