"""Giving a SQLite store's space back: `reclaim --convert`, incremental steps, kills, a live writer.

Stores hold every shape `build_mixed_store` writes through the real saver, plus
thousands of copies of one real chat thread, so sweeps leave many free pages.
Every check reads the kept checkpoints through the real saver and compares them
with an untouched copy of the swept file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.scenarios import build_mixed_store, cli, read_all, replicate, states, turns
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from worker.service.demo import chat_graph

HERE = Path(__file__).parent
BULK = 3000
SAMPLE = [f"bulk-{i:05d}-t" for i in range(0, BULK, 250)]


async def fill(path: Path, bulk: int) -> dict[str, str]:
    """Every shape, plus `bulk` copies of real chat thread `t`; returns the shapes."""
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        shapes = await build_mixed_store(saver)
        await turns(chat_graph(saver), "t", 8)
    # Thread `t` stays (protected) as the source of later copies.
    replicate(str(path), "t", [f"bulk-{i:05d}-" for i in range(bulk)])
    return shapes


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("reclaim") / "template.db"
    return path, asyncio.run(fill(path, BULK))


@pytest.fixture
def store(tmp_path: Path, template: tuple[Path, dict[str, str]]) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "store.db"
    shutil.copy(template[0], path)
    return path, template[1]


def config(
    tmp_path: Path, db: Path, reclaim: str = "", batch: str = "", name: str = "janitor"
) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        f"""
stores:
  - name: app
    kind: sqlite
    path: {db}
    reclaim: {{{reclaim}}}
defaults:
  batch: {{target_batch_seconds: 0.05{batch}}}
policies:
  - name: template
    match: {{thread_id: t}}
    protect: true
  - name: bulk
    match: {{thread_id: "bulk-*"}}
    keep_last: 2
  - name: rest
    keep_last: 2
metrics: {{textfile: {tmp_path / f"{name}.prom"}}}
logging: {{format: json, level: debug}}
"""
    )
    return cfg


def pragmas(db: Path) -> dict[str, Any]:
    with sqlite3.connect(db) as con:
        return {
            name: con.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("integrity_check", "auto_vacuum", "freelist_count", "page_count")
        }


def digest(db: Path) -> str:
    return hashlib.sha256(db.read_bytes()).hexdigest()


def keys_of(db: Path, threads: list[str] | None = None) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints")
        return [r for r in rows if threads is None or r[0] in threads or "bulk-" not in r[0]]


async def snapshot(
    db: Path, shapes: dict[str, str], keys: list[tuple[str, str, str]] | None = None
) -> tuple[Any, Any]:
    """The checkpoints at `keys` (default: the shaped threads' and a bulk sample's), and states."""
    keys = keys_of(db, SAMPLE) if keys is None else keys
    async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:
        return await read_all(saver, keys), await states(saver, shapes)


def untouched(db: Path, tmp_path: Path) -> Path:
    """A copy of `db` as it is now (its WAL folded in), for comparing after a reclamation."""
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    copy = tmp_path / "untouched.db"
    shutil.copy(db, copy)
    return copy


def events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in stderr.splitlines() if x.startswith("{")]


def reclaim_proc(cfg: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "--config", str(cfg), "reclaim", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
    )


def swept(tmp_path: Path, db: Path, reclaim: str = "", batch: str = "") -> Path:
    cfg = config(tmp_path, db, reclaim, batch)
    done = cli("once", config=cfg)
    assert done.returncode == 0, done.stderr
    return cfg


# ------------------------------------------------------------------ convert, then steps


async def test_convert_then_incremental_steps_keep_every_checkpoint(
    tmp_path: Path, store: tuple[Path, dict[str, str]]
) -> None:
    db, shapes = store
    cfg = swept(tmp_path, db)
    before = pragmas(db)
    assert before["auto_vacuum"] == 0 and before["freelist_count"] > before["page_count"] // 2
    # A SqliteSaver file is not in incremental mode: reclaim says so and changes nothing.
    plain = cli("reclaim", config=cfg)
    assert plain.returncode == 0 and "--convert" in plain.stdout, plain.stdout
    copy = untouched(db, tmp_path)
    assert pragmas(db)["freelist_count"] == before["freelist_count"]

    done = cli("reclaim", "--store", "app", "--convert", "--yes", config=cfg)
    assert done.returncode == 0, done.stderr
    assert "blocks" in done.stdout and "expected to take about" in done.stdout
    after = pragmas(db)
    assert after["integrity_check"] == "ok"
    assert after["auto_vacuum"] == 2 and after["freelist_count"] == 0
    assert os.path.getsize(db) < os.path.getsize(copy) / 2
    assert await snapshot(db, shapes) == await snapshot(copy, shapes)
    again = cli("reclaim", "--store", "app", "--convert", "--yes", config=cfg)
    assert again.returncode == 0 and "already" in again.stdout

    # New history (copies of a real thread, still untrimmed), then a sweep with
    # after_sweep on, compared with the same sweep alone on an untouched twin.
    copy.unlink()
    replicate(str(db), "t", [f"bulk-y{i:04d}-" for i in range(1500)])
    twin = untouched(db, tmp_path)
    assert cli("once", config=config(tmp_path, twin, name="twin")).returncode == 0
    cfg = config(tmp_path, db, reclaim="after_sweep: true, wal_truncate_mb: 0")
    done = cli("once", config=cfg)
    assert done.returncode == 0, done.stderr
    (step,) = [e for e in events(done.stderr) if e["event"] == "reclaim"]
    assert step["action"] == "incremental" and step["steps"] >= 1
    assert step["reclaimed_bytes"] > 0
    after = pragmas(db)
    assert after["integrity_check"] == "ok" and after["freelist_count"] == 0
    assert os.path.getsize(db) < os.path.getsize(twin)
    assert await snapshot(db, shapes) == await snapshot(twin, shapes)
    prom = (tmp_path / "janitor.prom").read_text()
    assert 'checkpoint_janitor_reclaimed_bytes_total{store="app"}' in prom
    assert 'checkpoint_janitor_reclaimable_bytes{store="app"} 0.0' in prom


def test_convert_refuses_when_not_worth_it_or_no_room(
    tmp_path: Path, store: tuple[Path, dict[str, str]]
) -> None:
    db, _ = store
    swept(tmp_path, db)
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    original = digest(db)
    for reclaim, why in (
        ("min_free_fraction: 0.99", "not worth it"),
        ("min_disk_margin: 1000000000", "not enough disk"),
    ):
        cfg = config(tmp_path, db, reclaim)
        done = cli("reclaim", "--store", "app", "--convert", "--yes", config=cfg)
        assert done.returncode == 1, done.stdout
        assert why in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert digest(db) == original
    # Asked, and declined.
    done = cli("reclaim", "--store", "app", "--convert", config=config(tmp_path, db), input="n\n")
    assert done.returncode == 0 and "nothing changed" in done.stdout
    assert digest(db) == original and pragmas(db)["auto_vacuum"] == 0
    # --convert names its store; --full is for Postgres.
    assert cli("reclaim", "--convert", config=config(tmp_path, db)).returncode == 2
    assert cli("reclaim", "--store", "app", "--full", config=config(tmp_path, db)).returncode == 2


# ------------------------------------------------------------------ beside the application


def converted_with_free_pages(tmp_path: Path, db: Path) -> Path:
    """`db` swept once, converted, then swept again: incremental mode with many free pages."""
    cfg = swept(tmp_path, db)
    assert cli("reclaim", "--store", "app", "--convert", "--yes", config=cfg).returncode == 0
    replicate(str(db), "t", [f"bulk-z{i:04d}-" for i in range(3000)])
    swept(tmp_path, db)
    assert pragmas(db)["freelist_count"] > 5000
    return cfg


async def test_incremental_reclaim_beside_a_live_writer(
    tmp_path: Path, store: tuple[Path, dict[str, str]]
) -> None:
    db, shapes = store
    converted_with_free_pages(tmp_path, db)
    copy = untouched(db, tmp_path)
    live = ["live-1", "live-2", "live-3"]
    out = tmp_path / "writer.json"
    writer = subprocess.Popen(
        [sys.executable, str(HERE / "helpers" / "live_writer.py"), str(db), "12", str(out), *live],
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    # Start once the writer's first turn has committed.
    deadline = time.monotonic() + 60
    while not _has_thread(db, "live-1"):
        assert time.monotonic() < deadline and writer.poll() is None
        await asyncio.sleep(0.05)
    cfg = config(tmp_path, db, batch=", pause_factor: 2")
    proc = reclaim_proc(cfg)
    _, err = proc.communicate(timeout=300)
    writer_running = writer.poll() is None
    assert writer.wait(timeout=60) == 0
    assert proc.returncode == 0, err
    assert writer_running, "the writer stopped before the reclamation ended"
    (done,) = [e for e in events(err) if e["event"] == "reclaim"]
    assert done["steps"] > 5 and done["reclaimed_bytes"] > 0

    result = json.loads(out.read_text())
    assert result["errors"] == []
    counts = _per_thread(db)
    for t in live:
        assert result["done"][t] > 0 and counts[t] == 3 * result["done"][t]
    assert pragmas(db)["integrity_check"] == "ok"
    keys = keys_of(copy, SAMPLE)  # the live threads are new
    assert await snapshot(db, shapes, keys) == await snapshot(copy, shapes, keys)


def _has_thread(db: Path, thread_id: str) -> bool:
    with sqlite3.connect(db, timeout=10) as con:
        q = "SELECT 1 FROM checkpoints WHERE thread_id = ? LIMIT 1"
        return con.execute(q, (thread_id,)).fetchone() is not None


def _per_thread(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as con:
        return dict(con.execute("SELECT thread_id, COUNT(*) FROM checkpoints GROUP BY 1"))


# ------------------------------------------------------------------ SIGKILL


def _kill_at(proc: subprocess.Popen[str], event: str, count: int = 1) -> list[dict[str, Any]]:
    """SIGKILL `proc` once its log has shown `event` `count` times; the events read."""
    seen: list[dict[str, Any]] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("{"):
            seen.append(json.loads(line))
            if sum(e["event"] == event for e in seen) >= count:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, seen[-3:]
    return seen


async def test_sigkill_mid_incremental_reclaim_then_the_next_run_finishes(
    tmp_path: Path, store: tuple[Path, dict[str, str]]
) -> None:
    db, shapes = store
    converted_with_free_pages(tmp_path, db)
    copy = untouched(db, tmp_path)
    free = pragmas(db)["freelist_count"]
    # Small steps, no pause: the process is almost always inside a step.
    cfg = config(tmp_path, db, batch=", pause_factor: 0")
    _kill_at(reclaim_proc(cfg), "reclaim_step", count=3)
    mid = pragmas(db)
    assert mid["integrity_check"] == "ok"
    assert 0 < mid["freelist_count"] < free
    assert await snapshot(db, shapes) == await snapshot(copy, shapes)

    done = cli("reclaim", config=cfg)
    assert done.returncode == 0, done.stderr
    end = pragmas(db)
    assert end["integrity_check"] == "ok" and end["freelist_count"] == 0
    assert await snapshot(db, shapes) == await snapshot(copy, shapes)


async def test_sigkill_mid_convert_then_the_next_run_finishes(tmp_path: Path) -> None:
    # A larger file than the others (a VACUUM of the default store is over in
    # milliseconds), killed once the VACUUM reports progress from inside.
    db = tmp_path / "big.db"
    shapes = await fill(db, 6000)
    cfg = config(tmp_path, db, reclaim="min_free_fraction: 0.05")
    assert cli("purge", "--thread-prefix", "bulk-00", "--yes", config=cfg).returncode == 0
    copy = untouched(db, tmp_path)
    _kill_at(reclaim_proc(cfg, "--store", "app", "--convert", "--yes"), "convert_progress")
    mid = pragmas(db)
    assert mid["integrity_check"] == "ok"
    assert mid["auto_vacuum"] == 0, "the conversion finished before the kill"
    assert await snapshot(db, shapes) == await snapshot(copy, shapes)

    done = cli("reclaim", "--store", "app", "--convert", "--yes", config=cfg)
    assert done.returncode == 0, done.stderr
    end = pragmas(db)
    assert end["integrity_check"] == "ok" and end["auto_vacuum"] == 2
    assert await snapshot(db, shapes) == await snapshot(copy, shapes)
