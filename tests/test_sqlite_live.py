"""A sweep beside a live application, and a sweep killed mid-way.

The store holds thousands of threads whose rows the real saver wrote (one
real thread, replicated), so a sweep runs long enough to race with.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.scenarios import replicate, turns
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from worker.service.demo import chat_graph, thread

HERE = Path(__file__).parent
LIVE_WRITER = HERE / "helpers" / "live_writer.py"
THREADS = 3000
TURNS = 8
KEEP = 2


@pytest.fixture(scope="module")
def big_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import asyncio

    path = tmp_path_factory.mktemp("big") / "template.db"

    async def build() -> None:
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            await turns(chat_graph(saver), "t", TURNS)

    asyncio.run(build())
    replicate(str(path), "t", [f"bulk-{i:05d}-" for i in range(THREADS)])
    with sqlite3.connect(path) as con:
        con.execute("DELETE FROM checkpoints WHERE thread_id = 't'")
        con.execute("DELETE FROM writes WHERE thread_id = 't'")
        con.commit()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


@pytest.fixture
def big(tmp_path: Path, big_template: Path) -> Path:
    path = tmp_path / "store.db"
    shutil.copy(big_template, path)
    return path


def write_config(tmp_path: Path, store: Path, batch: str = "") -> Path:
    cfg = tmp_path / "janitor.yaml"
    cfg.write_text(
        f"""
stores:
  - name: app
    kind: sqlite
    path: {store}
defaults:
  batch: {{target_batch_seconds: 0.05{batch}}}
policies:
  - name: bulk
    match: {{thread_id: "bulk-*"}}
    keep_last: {KEEP}
logging: {{format: json, level: debug}}
"""
    )
    return cfg


def once(cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "--config", str(cfg), "once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def per_thread(store: Path) -> dict[str, int]:
    with sqlite3.connect(store) as con:
        return dict(con.execute("SELECT thread_id, COUNT(*) FROM checkpoints GROUP BY 1"))


async def test_live_writer_loses_nothing_and_never_sees_locked(tmp_path: Path, big: Path) -> None:
    live = ["live-1", "live-2", "live-3"]
    swept = ["bulk-00001-t", "bulk-01500-t", "bulk-02999-t"]
    async with AsyncSqliteSaver.from_conn_string(str(big)) as saver:
        expected_before = {
            t: (await chat_graph(saver).aget_state(thread(t))).values["messages"] for t in swept
        }
    out = tmp_path / "writer.json"
    writer = subprocess.Popen(
        [sys.executable, str(LIVE_WRITER), str(big), "8", str(out), *live, *swept],
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    time.sleep(1.0)
    sweeper = once(write_config(tmp_path, big))
    _, err = sweeper.communicate(timeout=300)
    assert writer.wait(timeout=60) == 0
    assert sweeper.returncode == 0, err
    events = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert sum(e["event"] == "batch" for e in events) > 10

    result = json.loads(out.read_text())
    assert result["errors"] == []
    done: dict[str, int] = result["done"]
    assert all(n > 0 for n in done.values()), done
    counts = per_thread(big)
    for t in live:
        # Not governed by any policy: every checkpoint written is there.
        assert counts[t] == 3 * done[t]
    async with AsyncSqliteSaver.from_conn_string(str(big)) as saver:
        app = chat_graph(saver)
        for t in swept:
            messages = (await app.aget_state(thread(t))).values["messages"]
            live_part = [m for i in range(done[t]) for m in (f"live {i}", f"reply to live {i}")]
            assert messages == expected_before[t] + live_part
    # Every swept thread ends trimmed (the ones written to may keep newer ones).
    assert all(n >= KEEP for t, n in counts.items() if t.startswith("bulk-"))


async def test_sigkill_mid_sweep_leaves_a_readable_store(tmp_path: Path, big: Path) -> None:
    before_counts = per_thread(big)
    sample = [f"bulk-{i:05d}-t" for i in range(0, THREADS, 150)]
    async with AsyncSqliteSaver.from_conn_string(str(big)) as saver:
        before = {}
        for t in sample:
            async for tup in saver.alist(thread(t)):
                before[tup.config["configurable"]["checkpoint_id"]] = (
                    tup.checkpoint,
                    tup.metadata,
                    tup.pending_writes,
                )
    with sqlite3.connect(big) as con:
        heads = dict(
            con.execute("SELECT thread_id, MAX(checkpoint_id) FROM checkpoints GROUP BY 1")
        )
        total = con.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]
    cfg = write_config(tmp_path, big)
    proc = once(cfg)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.2)
        with sqlite3.connect(big, timeout=10) as con:
            now_total = con.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]
        if total - now_total > total // 10:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with sqlite3.connect(big) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        mid = dict(con.execute("SELECT thread_id, MAX(checkpoint_id) FROM checkpoints GROUP BY 1"))
    assert mid == heads  # every thread head survived
    counts = per_thread(big)
    assert any(counts[t] == KEEP for t in counts) and any(counts[t] > KEEP for t in counts)
    async with AsyncSqliteSaver.from_conn_string(str(big)) as saver:
        for t in sample:
            async for tup in saver.alist(thread(t)):
                cid = tup.config["configurable"]["checkpoint_id"]
                assert (tup.checkpoint, tup.metadata, tup.pending_writes) == before[cid]
            # The graph still reads each thread.
            assert (await chat_graph(saver).aget_state(thread(t))).values["messages"]

    proc = once(cfg)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert set(per_thread(big).values()) == {KEEP}
    assert set(before_counts) == set(per_thread(big))
