"""A `once` process beside a live application, and one killed mid-sweep, on every backend.

The big store holds hundreds to thousands of threads whose rows the real saver
wrote (one real thread, replicated), so a sweep runs long enough to race with.
What only Postgres has (row locks, two `once` at a time, forks and blob
collection, the CLI against a server) stays in test_postgres_live.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.backends import Backend, Stores, build_bulk
from helpers.pg_scenarios import NO_ORPHANS, json_events, once

from worker.service.demo import chat_graph, thread
from worker.sweep import Outcome

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
LIVE_WRITER = HERE / "helpers" / "live_writer.py"
TURNS = 8
KEEP = 2
PER_THREAD = 3 * TURNS
"""Checkpoints of one chat thread: input, loop step and reply per turn."""
BULK_POLICY = f'  - {{name: bulk, match: {{thread_id: "bulk-*"}}, keep_last: {KEEP}}}'


@dataclass(frozen=True)
class Load:
    """How big a store and how slow a sweep make a race on one backend.

    A SQLite batch is cheap, so its store is larger; Postgres threads are a day old,
    so every thread is quiet past the grace period and blob collection runs too.
    """

    threads: int
    age_days: float
    batch: str
    writer_seconds: str
    head_start: float


LOADS = {
    "sqlite": Load(3000, 0.0, "{target_batch_seconds: 0.05}", "8", 1.0),
    "postgres": Load(600, 1.0, "{target_batch_seconds: 0.02, max_batch_threads: 25}", "6", 1.5),
}


def bulk(i: int) -> str:
    return f"bulk-{i:05d}-t"


@pytest.fixture(scope="module")
def big_template(backend: Backend) -> Iterator[str]:
    """`Load.threads` chat threads of TURNS turns, `Load.age_days` old."""
    load = LOADS[backend.kind]
    made = backend.stores("big_template")
    store = made.create()
    asyncio.run(build_bulk(backend, store, chat_graph, "bulk-", load.threads, TURNS, load.age_days))
    yield store
    made.close()


@pytest.fixture
def big(big_template: str, stores: Stores) -> str:
    return stores.clone(big_template)


def write_config(backend: Backend, path: Path, store: str, batch: str | None) -> Path:
    """A config for store `app` with BULK_POLICY (and `batch` settings), JSON debug logs."""
    defaults = f"defaults:\n  batch: {batch}\n" if batch else ""
    path.write_text(
        f"{backend.store_yaml(store)}{defaults}\npolicies:\n{BULK_POLICY}\n"
        "logging: {format: json, level: debug}\n"
    )
    return path


async def read_threads(backend: Backend, store: str, threads: list[str]) -> dict[str, Any]:
    """Every checkpoint of `threads` as the saver reads it, by thread and checkpoint id."""
    out: dict[str, Any] = {}
    async with backend.saver(store) as saver:
        for t in threads:
            async for tup in saver.alist(thread(t)):
                cid = tup.config["configurable"]["checkpoint_id"]
                out[f"{t}/{cid}"] = (tup.checkpoint, tup.metadata, tup.pending_writes)
    return out


async def assert_no_orphans_past_grace(
    backend: Backend, store: str, policies: str = BULK_POLICY
) -> None:
    """No write without its checkpoint and no dangling parent now; the blobs the trims left
    unreferenced wait out the grace period after them, and a sweep past it (which deletes
    no more) collects them all."""
    found = await backend.orphans(store)
    assert found["orphan_writes"] == [] and found["missing_parents"] == [], found
    report = await backend.run_sweep(store, policies, now=time.time() + 2 * 3600)
    assert report.outcome is Outcome.SUCCESS, report.error
    assert report.deleted.checkpoints == 0 and report.deleted.writes == 0
    assert await backend.orphans(store) == NO_ORPHANS


async def test_live_writer_loses_nothing_and_never_sees_locked(
    backend: Backend, tmp_path: Path, big: str
) -> None:
    """An application writing through the real saver during a `once` loses no turn and
    meets no error (no "database is locked"): ungoverned threads keep every checkpoint,
    swept threads end with every message."""
    load = LOADS[backend.kind]
    live = ["live-1", "live-2", "live-3"]
    swept = [bulk(1), bulk(load.threads // 2), bulk(load.threads - 1)]
    async with backend.saver(big) as saver:
        expected_before = {
            t: (await chat_graph(saver).aget_state(thread(t))).values["messages"] for t in swept
        }
    out = tmp_path / "writer.json"
    writer = subprocess.Popen(
        [sys.executable, str(LIVE_WRITER), big, load.writer_seconds, str(out), *live, *swept],
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    # The application is under way when the sweep starts (a head start, not a synchronisation:
    # the assertions hold whichever runs first).
    time.sleep(load.head_start)
    sweeper = once(write_config(backend, tmp_path / "janitor.yaml", big, load.batch))
    _, err = sweeper.communicate(timeout=300)
    assert writer.wait(timeout=120) == 0
    assert sweeper.returncode == 0, err
    assert sum(e["event"] == "batch" for e in json_events(err)) > 10

    result = json.loads(out.read_text())
    assert result["errors"] == []
    done: dict[str, int] = result["done"]
    assert all(n > 0 for n in done.values()), done
    counts = await backend.per_thread(big)
    for t in live:
        # Not governed by any policy: every checkpoint written is there.
        assert counts[t] == 3 * done[t]
    async with backend.saver(big) as saver:
        app = chat_graph(saver)
        for t in swept:
            messages = (await app.aget_state(thread(t))).values["messages"]
            live_part = [m for i in range(done[t]) for m in (f"live {i}", f"reply to live {i}")]
            assert messages == expected_before[t] + live_part
    # Every swept thread ends trimmed (the ones written to may keep newer ones).
    assert all(n >= KEEP for t, n in counts.items() if t.startswith("bulk-"))
    found = await backend.orphans(big)
    assert found["orphan_writes"] == [] and found["missing_parents"] == []


async def kill_after_a_tenth(backend: Backend, store: str, proc: subprocess.Popen[str]) -> None:
    """SIGKILL `proc` once a tenth of the store's checkpoints went (or after two minutes)."""
    total = (await backend.table_counts(store))["checkpoints"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        await asyncio.sleep(0.1)
        if total - (await backend.table_counts(store))["checkpoints"] > total // 10:
            break
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"


async def test_sigkill_mid_sweep_leaves_a_readable_store(
    backend: Backend, tmp_path: Path, big: str
) -> None:
    """`once` killed mid-sweep: the store passes its own check, every head survives, every
    kept checkpoint reads back equal, nothing half-deleted; a second `once` finishes the
    work and leaves no orphans."""
    load = LOADS[backend.kind]
    sample = [bulk(i) for i in range(0, load.threads, 50)]
    before = await read_threads(backend, big, sample)
    before_counts = await backend.per_thread(big)
    blobs = await backend.blob_keys(big)
    heads = await backend.heads(big)
    cfg = write_config(backend, tmp_path / "janitor.yaml", big, load.batch)
    await kill_after_a_tenth(backend, big, once(cfg))

    await backend.check_integrity(big)
    assert await backend.heads(big) == heads  # every thread head survived
    counts = await backend.per_thread(big)
    assert any(n == KEEP for n in counts.values()) and any(n > KEEP for n in counts.values())
    assert all(KEEP <= n <= PER_THREAD for n in counts.values())
    found = await backend.orphans(big)
    assert found["orphan_writes"] == [] and found["missing_parents"] == []
    assert not await backend.lost_blobs(big, blobs)
    after = await read_threads(backend, big, sample)
    assert set(after) <= set(before)
    assert all(after[k] == before[k] for k in after)
    async with backend.saver(big) as saver:
        for t in sample:
            # The graph still reads each thread.
            assert (await chat_graph(saver).aget_state(thread(t))).values["messages"]

    proc = once(write_config(backend, tmp_path / "fast.yaml", big, None))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    counts = await backend.per_thread(big)
    assert set(counts.values()) == {KEEP}
    assert set(counts) == set(before_counts) and len(counts) == load.threads
    await assert_no_orphans_past_grace(backend, big)
    after = await read_threads(backend, big, sample)
    assert all(after[k] == before[k] for k in after)
