"""Archive before delete, and restore, on Postgres stores written by real graphs (issue 13).

Everything runs the way an operator runs it: a config whose Postgres store has
an `archive`, then `checkpoint-janitor once`, `purge --archive` and `restore`
as subprocesses. The comparison is always with an untouched copy of the store
(`CREATE DATABASE ... TEMPLATE`), read through the real `AsyncPostgresSaver`:
every checkpoint (`aget_tuple`), each thread head's state (`aget_state`,
subgraphs included), the waiting threads resumed, and the saver's three tables
row by row. (Expire, trim and restore all; a failing archive; `purge --archive`:
those scenarios run on every backend in test_restore.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.backends import Backend, Stores, Template
from helpers.pg_scenarios import all_keys, dump, pg_saver
from helpers.scenarios import PAUSED_ONCE, Gate, cli, race_graph, read_all, states
from test_restore import EXPIRE_AND_TRIM, archive_config

from worker.service.demo import thread
from worker.stores.archive import read_segments
from worker.stores.postgres_archive import KEYS

# Every test here runs on Postgres (C and ICU); the scenarios every backend shares are in
# test_restore.py.
pytestmark = pytest.mark.backends("postgres-c", "postgres-icu")

KEEP_ALL = "  - {name: keep, keep_last: 100000}"
"""Deletes nothing: a `once` that only settles the pending segments earlier runs left."""


def once(cfg: Path) -> dict[str, Any]:
    """`checkpoint-janitor once`, which must succeed; the store's JSON summary."""
    r = cli("once", config=cfg)
    assert r.returncode == 0, r.stderr
    summary: dict[str, Any] = json.loads(r.stdout)["stores"][0]
    return summary


def segment_files(root: Path) -> dict[str, list[str]]:
    """Segment file paths under `root` (relative to it) by kind (complete, pending, partial)."""
    out: dict[str, list[str]] = {"complete": [], "pending": [], "partial": []}
    for folder, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(folder, f), root)
            if f.endswith(".pending.sqlite"):
                out["pending"].append(rel)
            elif f.endswith(".partial"):
                out["partial"].append(rel)
            elif f.endswith(".sqlite"):
                out["complete"].append(rel)
    return {kind: sorted(names) for kind, names in out.items()}


async def test_restore_one_thread_while_the_app_writes_to_it(
    backend: Backend, stores: Stores, tmp_path: Path
) -> None:
    """A thread trimmed to its head gets its history back while a run on it is in flight
    (read before the restore, saved after): both the history and the new turn stay."""
    dsn = stores.create()
    gate = Gate(open_=True)
    async with pg_saver(dsn) as saver:
        app = race_graph(saver, gate)
        for i in range(4):
            await app.ainvoke({"messages": [f"turn {i}"], "topic": {"t": "x"}}, thread("t1"))
            await app.ainvoke({"messages": [f"other {i}"], "topic": {"t": "y"}}, thread("t2"))
    copy = stores.clone(dsn)
    archive = tmp_path / "archive"
    cfg = archive_config(backend, tmp_path, dsn, str(archive), "  - {name: trim, keep_last: 1}")
    await asyncio.to_thread(once, cfg)
    before_restore = {k for k in await all_keys(dsn) if k[0] == "t1"}

    gate = Gate()
    async with pg_saver(dsn) as saver:
        app = race_graph(saver, gate)
        # durability="sync": the input checkpoint is saved before the node runs (the
        # default "async" saves it in the background, so it may not be there yet).
        run = asyncio.create_task(
            app.ainvoke({"messages": ["live"]}, thread("t1"), durability="sync")
        )
        await gate.entered.wait()  # the run has read the thread and saved its input
        mid = {k for k in await all_keys(dsn) if k[0] == "t1"}
        assert mid > before_restore
        r = await asyncio.to_thread(
            cli, "restore", "--store", "app", "--from", str(archive), "--thread", "t1", "--yes",
            config=cfg,
        )  # fmt: skip
        gate.go.set()
        await run
        final = await app.aget_state(thread("t1"))

    assert r.returncode == 0, r.stderr
    assert "restored 1 threads" in r.stdout
    original = {k for k in await all_keys(copy) if k[0] == "t1"}
    now_keys = {k for k in await all_keys(dsn) if k[0] == "t1"}
    assert original | mid <= now_keys
    # The archived history reads back as in the copy; t2 stays trimmed.
    async with pg_saver(dsn) as s1, pg_saver(copy) as s2:
        assert await read_all(s1, sorted(original)) == await read_all(s2, sorted(original))
    assert now_keys - original - mid, "the run's own checkpoints"
    assert final.values["messages"][-1] == "slow reply (None) to live"
    assert final.values["messages"][:8] == [
        m for i in range(4) for m in (f"turn {i}", f"slow reply (None) to turn {i}")
    ]
    assert len([k for k in await all_keys(dsn) if k[0] == "t2"]) == 1, "t2 was not selected"


async def test_pending_segments_are_settled_by_what_the_store_holds(
    backend: Backend, mixed_template: Template, stores: Stores, tmp_path: Path
) -> None:
    """A crash between seal and rename leaves `.pending.sqlite` segments. The next `once`
    promotes those whose rows are gone (the delete committed) and removes those whose rows
    are still there (it never committed), so no batch counts twice as complete."""
    template, _ = mixed_template
    dsn, untouched = stores.clone(template), stores.clone(template)
    root = tmp_path / "archive"
    await asyncio.to_thread(
        once, archive_config(backend, tmp_path, dsn, str(root), EXPIRE_AND_TRIM)
    )
    complete = segment_files(root)["complete"]
    assert complete
    # The same segments, as a crash before the rename would leave them, twice:
    # beside the swept store (rows gone) and beside the untouched copy (rows there).
    for base in ("swept", "untouched"):
        for rel in complete:
            target = tmp_path / base / rel.replace(".sqlite", ".pending.sqlite")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((root / rel).read_bytes())
    for db, base in ((dsn, "swept"), (untouched, "untouched")):
        # A `once` that deletes nothing: only its recovery touches the archive.
        summary = await asyncio.to_thread(
            once, archive_config(backend, tmp_path, db, str(tmp_path / base), KEEP_ALL)
        )
        assert summary["total"]["checkpoints"] == 0
        files = segment_files(tmp_path / base)
        assert files["pending"] == [] and files["partial"] == []
        assert files["complete"] == (complete if base == "swept" else [])
    assert await dump(untouched) == await dump(template)


def archived_keys(archive: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The primary keys of every row in the complete segments of store `app`, per table."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for seg in read_segments(str(archive), store="app"):
        if not seg.pending:
            for table in seg.tables():
                at = [seg.columns(table).index(k) for k in KEYS[table]]
                out.setdefault(table, []).extend(tuple(r[i] for i in at) for r in seg.rows(table))
        seg.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("step", ["seal", "complete"])
async def test_sigkill_between_archive_and_delete_then_the_next_run_finishes(
    backend: Backend, mixed_template: Template, stores: Stores, tmp_path: Path, step: str
) -> None:
    """`once` killed once its first segment is `.pending`: before the batch's COMMIT
    (`seal`) or after it, before the rename (`complete`). The next run settles it and
    finishes; every deleted row is then in exactly one complete segment, and restore
    gives back the untouched copy. (test_restore.py has the SQLite twin: its wait for the
    COMMIT reads the file, this one the database.)"""
    template, shapes = mixed_template
    dsn, copy = stores.clone(template), stores.clone(template)
    archive, gate = tmp_path / "archive", tmp_path / "gate"
    cfg = archive_config(backend, tmp_path, dsn, str(archive), EXPIRE_AND_TRIM)
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_ONCE, step, str(gate), str(cfg)],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not segment_files(archive)["pending"]:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no segment became pending"
            await asyncio.sleep(0.01)
        if step == "complete":
            # `complete` waits right after the COMMIT: the rows go once it has run.
            [first] = list(read_segments(str(archive), store="app"))
            key = next(iter(first.rows("checkpoints")))[:3]
            while key in set(await all_keys(dsn)):
                assert time.monotonic() < deadline, "the batch never committed"
                await asyncio.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [pending] = segment_files(archive)["pending"]
    if step == "seal":
        assert await dump(dsn) == await dump(copy), "the killed batch committed"

    await asyncio.to_thread(once, cfg)
    files = segment_files(archive)
    assert files["pending"] == [] and files["partial"] == []
    assert (pending.replace(".pending", "") in files["complete"]) == (step == "complete")
    original_keys, left = set(await all_keys(copy)), set(await all_keys(dsn))
    keys = archived_keys(archive)
    for table, found in keys.items():
        assert len(found) == len(set(found)), f"a {table} row is archived twice as complete"
    assert {k[:3] for k in keys["checkpoints"]} == {k[:3] for k in original_keys - left}

    r = cli("restore", "--store", "app", "--from", str(archive), "--all", "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    assert await dump(dsn) == await dump(copy)
    every = sorted(original_keys)
    async with pg_saver(dsn) as a, pg_saver(copy) as b:
        assert await read_all(a, every) == await read_all(b, every)
        assert await states(a, shapes) == await states(b, shapes)
