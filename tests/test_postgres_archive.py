"""Archive before delete, and restore, on Postgres stores written by real graphs (issue 13).

Everything runs the way an operator runs it: a config whose Postgres store has
an `archive`, then `checkpoint-janitor once`, `purge --archive` and `restore`
as subprocesses. The comparison is always with an untouched copy of the store
(`CREATE DATABASE ... TEMPLATE`), read through the real `AsyncPostgresSaver`:
every checkpoint (`aget_tuple`), each thread head's state (`aget_state`,
subgraphs included), the waiting threads resumed, and the saver's three tables
row by row.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers.daemon_helpers import Scrape
from helpers.pg_scenarios import Databases, all_keys, dump, pg_saver, store_yaml
from helpers.pgserver import PgServer
from helpers.scenarios import (
    PAUSED_ONCE,
    Gate,
    build_mixed_store,
    cli,
    race_graph,
    read_all,
    resume,
    states,
)

from worker.service.demo import thread
from worker.stores.archive import read_segments
from worker.stores.postgres_archive import KEYS

EXPIRE_AND_TRIM = "  - {name: trim, keep_last: 1, expire_after: 30d, interrupted: expire}"
"""Trims every thread to its newest checkpoint and expires the idle ones whole (the
interrupted ones included), so every deleting statement runs."""
KEEP_ALL = "  - {name: keep, keep_last: 100000}"
"""Deletes nothing: a `once` that only settles the pending segments earlier runs left."""
GRACE = 1
"""The grace_period (seconds) of the tests that collect blobs: small, so a second `once`
a moment later collects the expired threads' blobs and the trims' garbage."""
WAITING = ("int-old", "int-new", "brk-old", "err-old")
"""Threads stopped at an interrupt, a breakpoint or an error: resumed on both stores."""


def write_config(
    tmp_path: Path,
    dsn: str,
    archive: Path,
    policies: str,
    *,
    archive_extra: str = "",
    batch: str = "max_batch_rows: 15",
) -> Path:
    """A config of store `pg` on `dsn` archiving to `archive`; metrics to a textfile.

    Small batches (`max_batch_rows`) split trims over several segments, so a
    checkpoint's parent is nulled in one batch and the checkpoint deleted in a later one.
    """
    cfg = tmp_path / "janitor.yaml"
    cfg.write_text(
        store_yaml(dsn, f'    archive: {{path: "{archive}"{archive_extra}}}\n')
        + f"""defaults:
  max_delete_fraction: 1.0
  allow_mass_expiry: true
  batch: {{{batch}}}
metrics: {{textfile: {tmp_path / "janitor.prom"}}}
policies:
{policies}
"""
    )
    return cfg


def scrape(tmp_path: Path) -> Scrape:
    """The metrics the last `once` wrote."""
    return Scrape.parse((tmp_path / "janitor.prom").read_text())


def once(cfg: Path) -> dict[str, Any]:
    """`checkpoint-janitor once`, which must succeed; the store's JSON summary."""
    r = cli("once", config=cfg)
    assert r.returncode == 0, r.stderr
    summary: dict[str, Any] = json.loads(r.stdout)["stores"][0]
    return summary


def restore_all(cfg: Path, archive: Path, *more: str) -> str:
    """`restore --store pg --from ARCHIVE --all --yes`, which must succeed; its output."""
    r = cli("restore", "--store", "pg", "--from", str(archive), "--all", "--yes", *more, config=cfg)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def mixed_template(pg_server: PgServer, pg_collation: str) -> Iterator[tuple[str, dict[str, str]]]:
    """One mixed store built by real graphs; each test works on copies."""
    dbs = Databases(pg_server, "archive_template", pg_collation)
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


async def saver_view(dsn: str, shapes: dict[str, str], keys: Sequence[Any]) -> Any:
    """Every checkpoint of `keys` as the saver reads it, and every thread head's state."""
    async with pg_saver(dsn) as saver:
        return await read_all(saver, keys), await states(saver, shapes)


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


def archived_rows(archive: Path) -> dict[str, int]:
    """Rows per table over the complete segments of store `pg`."""
    out: dict[str, int] = {}
    for seg in read_segments(str(archive), store="pg"):
        assert not seg.pending
        for per_table in seg.counts().values():
            for table, n in per_table.items():
                out[table] = out.get(table, 0) + n
        seg.close()
    return out


def assert_metrics_match(tmp_path: Path, summary: dict[str, Any]) -> None:
    """The textfile counts exactly what the run's summary says it archived."""
    m = scrape(tmp_path)
    for table, n in summary["archived"]["rows"].items():
        assert m.value("archived_rows_total", store="pg", table=table) == n, table
    assert m.value("archive_bytes_total", store="pg") == summary["archived"]["bytes"] > 0
    assert m.total("archive_failures_total", store="pg") == 0


def threads_rows(tables: dict[str, list[Any]], keep: set[str]) -> dict[str, list[Any]]:
    """A `dump` cut to the threads in `keep`."""
    return {t: [r for r in rows if dict(r)["thread_id"] in keep] for t, rows in tables.items()}


async def restore_named(
    cfg: Path, dsn: str, archive: Path, original: dict[str, list[Any]], swept: dict[str, list[Any]]
) -> dict[str, list[Any]]:
    """Named threads by repeated `--thread`, then by `--threads-from -`: each run puts back
    exactly those threads' rows (blobs included) and changes no other thread. The store's
    dump after them."""
    done: set[str] = set()
    everyone = {dict(r)["thread_id"] for r in original["checkpoints"]}
    dsn_rows = swept
    for named, how, stdin in (
        ({"int-old", "delta-old"}, ["--thread", "int-old", "--thread", "delta-old"], None),
        (
            {"sub-old", "brk-old", "user-new-1"},
            ["--threads-from", "-"],
            "sub-old\nbrk-old\nuser-new-1\n",
        ),
    ):
        r = await asyncio.to_thread(
            cli, "restore", "--store", "pg", "--from", str(archive), *how, "--yes",
            config=cfg, input=stdin,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f"restored {len(named)} threads" in r.stdout, r.stdout
        done |= named
        dsn_rows = await dump(dsn)
        assert threads_rows(dsn_rows, done) == threads_rows(original, done)
        assert threads_rows(dsn_rows, everyone - done) == threads_rows(swept, everyone - done)
    assert (
        threads_rows(swept, {"sub-old"})["checkpoint_blobs"]
        != threads_rows(original, {"sub-old"})["checkpoint_blobs"]
    ), "sub-old lost no blob: the restore of blobs is not tested"
    return dsn_rows


async def test_expire_trim_collect_then_restore_all_reads_back_equal(
    mixed_template: tuple[str, dict[str, str]], dbs: Databases, tmp_path: Path
) -> None:
    """Trims, expiries, parent nulling and (past the grace period) blob collection all go to
    the archive and count in the metrics; `restore --all` then gives back a store equal to
    the untouched copy, row for row and through the saver, and waiting threads resume the
    same."""
    template, shapes = mixed_template
    dsn, copy = dbs.clone(template), dbs.clone(template)
    keys = await all_keys(copy)
    archive = tmp_path / "archive"
    cfg = write_config(
        tmp_path, dsn, archive, EXPIRE_AND_TRIM, batch=f"max_batch_rows: 15, grace_period: {GRACE}s"
    )

    first = await asyncio.to_thread(once, cfg)
    assert first["total"]["checkpoints"] > 0 and first["batches"] > 2
    assert_metrics_match(tmp_path, first)
    # The expiries are dated by the first run's clock: a run that starts after that
    # clock plus the grace period collects their blobs.
    due = time.time() + GRACE
    while time.time() <= due:
        await asyncio.sleep(due - time.time() + 0.01)
    later = await asyncio.to_thread(once, cfg)
    assert later["total"]["blobs"] > 0
    assert later["archived"]["rows"]["checkpoint_blobs"] == later["total"]["blobs"]
    assert_metrics_match(tmp_path, later)

    original, swept = await dump(copy), await dump(dsn)
    for table in ("checkpoints", "checkpoint_writes", "checkpoint_blobs"):
        assert len(swept[table]) < len(original[table]), table
    files = segment_files(archive)
    assert len(files["complete"]) > 2 and not files["pending"] and not files["partial"]
    # Every archived row counted once, by the run whose delete committed it.
    runs: dict[str, int] = {}
    for run in (first, later):
        for table, n in run["archived"]["rows"].items():
            runs[table] = runs.get(table, 0) + n
    assert archived_rows(archive) == runs
    assert runs["nulled_parents"] > 0, "no parent was nulled: the scenario tests too little"
    for table in ("checkpoints", "checkpoint_writes", "checkpoint_blobs"):
        assert runs[table] == len(original[table]) - len(swept[table]), table

    swept = await restore_named(cfg, dsn, archive, original, swept)
    out = await asyncio.to_thread(restore_all, cfg, archive, "--dry-run")
    assert "user-old-1:" in out and "parent links" in out
    assert await dump(dsn) == swept, "a dry run changed the store"
    out = await asyncio.to_thread(restore_all, cfg, archive)
    assert "restored" in out and "parent links" in out
    assert await dump(dsn) == original
    # Restoring again finds everything there: nothing inserted, nothing changed.
    out = await asyncio.to_thread(restore_all, cfg, archive)
    assert "0 threads to restore" in out
    assert await dump(dsn) == original

    assert await saver_view(dsn, shapes, keys) == await saver_view(copy, shapes, keys)
    for tid in WAITING:
        resumed = []
        for db in (dsn, copy):
            async with pg_saver(db) as saver:
                resumed.append(await resume(saver, tid, shapes[tid]))
        assert resumed[0] == resumed[1], tid
    assert await saver_view(dsn, shapes, keys) == await saver_view(copy, shapes, keys)


async def test_restore_one_thread_while_the_app_writes_to_it(
    dbs: Databases, tmp_path: Path
) -> None:
    """A thread trimmed to its head gets its history back while a run on it is in flight
    (read before the restore, saved after): both the history and the new turn stay."""
    dsn = dbs.create()
    gate = Gate(open_=True)
    async with pg_saver(dsn) as saver:
        app = race_graph(saver, gate)
        for i in range(4):
            await app.ainvoke({"messages": [f"turn {i}"], "topic": {"t": "x"}}, thread("t1"))
            await app.ainvoke({"messages": [f"other {i}"], "topic": {"t": "y"}}, thread("t2"))
    copy = dbs.clone(dsn)
    archive = tmp_path / "archive"
    cfg = write_config(tmp_path, dsn, archive, "  - {name: trim, keep_last: 1}")
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
            cli, "restore", "--store", "pg", "--from", str(archive), "--thread", "t1", "--yes",
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


async def test_an_archive_that_cannot_be_written_deletes_nothing(
    mixed_template: tuple[str, dict[str, str]], dbs: Databases, tmp_path: Path
) -> None:
    """A segment past `max_bytes` (a full disk): `once` exits 1 before any delete commits,
    says which store and archive, leaves no segment, and counts the failure."""
    template, _ = mixed_template
    dsn = dbs.clone(template)
    before = await dump(dsn)
    archive = tmp_path / "archive"
    cfg = write_config(tmp_path, dsn, archive, EXPIRE_AND_TRIM, archive_extra=", max_bytes: 1KB")

    r = await asyncio.to_thread(cli, "once", config=cfg)
    assert r.returncode == 1, r.stderr
    assert await dump(dsn) == before, "a batch deleted without its archive"
    error = json.loads(r.stdout)["stores"][0]["error"]
    assert "ArchiveError" in error and "'pg'" in error and str(archive) in error
    assert "max_bytes 1000" in error
    m = scrape(tmp_path)
    assert m.value("archive_failures_total", store="pg") == 1
    assert m.total("archived_rows_total", store="pg") == 0
    assert segment_files(archive) == {"complete": [], "pending": [], "partial": []}


async def test_purge_archives_only_when_asked_and_restores_equal(
    mixed_template: tuple[str, dict[str, str]], dbs: Databases, tmp_path: Path
) -> None:
    """`purge` erases (no archive); `purge --archive` archives what it deletes, blobs
    included, and `restore` gives that thread back as the untouched copy has it."""
    template, shapes = mixed_template
    dsn, copy = dbs.clone(template), dbs.clone(template)
    archive = tmp_path / "archive"
    cfg = write_config(tmp_path, dsn, archive, EXPIRE_AND_TRIM)

    r = await asyncio.to_thread(
        cli, "purge", "--store", "pg", "--thread", "user-old-1", "--yes", config=cfg
    )
    assert r.returncode == 0, r.stderr
    assert "user-old-1" not in {k[0] for k in await all_keys(dsn)}
    assert segment_files(archive)["complete"] == []

    r = await asyncio.to_thread(
        cli, "purge", "--store", "pg", "--thread", "user-old-2", "--archive", "--yes", config=cfg
    )
    assert r.returncode == 0, r.stderr
    assert "archived" in r.stdout
    [seg] = list(read_segments(str(archive), "pg"))
    assert not seg.pending and set(seg.counts()) == {"user-old-2"}
    assert seg.counts()["user-old-2"]["checkpoint_blobs"] > 0
    seg.close()

    out = await asyncio.to_thread(restore_all, cfg, archive)
    assert "restored 1 threads" in out

    def rows_of(tables: dict[str, list[tuple[Any, ...]]], tid: str) -> dict[str, list[Any]]:
        return {t: [r for r in rows if dict(r)["thread_id"] == tid] for t, rows in tables.items()}

    swept, original = await dump(dsn), await dump(copy)
    assert rows_of(swept, "user-old-2") == rows_of(original, "user-old-2")
    assert all(rows for rows in rows_of(swept, "user-old-2").values())
    assert not any(rows_of(swept, "user-old-1").values()), "erased without --archive"
    keys = [k for k in await all_keys(copy) if k[0] == "user-old-2"]
    one = {"user-old-2": shapes["user-old-2"]}
    assert await saver_view(dsn, one, keys) == await saver_view(copy, one, keys)


async def test_pending_segments_are_settled_by_what_the_store_holds(
    mixed_template: tuple[str, dict[str, str]], dbs: Databases, tmp_path: Path
) -> None:
    """A crash between seal and rename leaves `.pending.sqlite` segments. The next `once`
    promotes those whose rows are gone (the delete committed) and removes those whose rows
    are still there (it never committed), so no batch counts twice as complete."""
    template, _ = mixed_template
    dsn, untouched = dbs.clone(template), dbs.clone(template)
    root = tmp_path / "archive"
    await asyncio.to_thread(once, write_config(tmp_path, dsn, root, EXPIRE_AND_TRIM))
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
            once, write_config(tmp_path, db, tmp_path / base, KEEP_ALL)
        )
        assert summary["total"]["checkpoints"] == 0
        files = segment_files(tmp_path / base)
        assert files["pending"] == [] and files["partial"] == []
        assert files["complete"] == (complete if base == "swept" else [])
    assert await dump(untouched) == await dump(template)


def archived_keys(archive: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The primary keys of every row in the complete segments of store `pg`, per table."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for seg in read_segments(str(archive), store="pg"):
        if not seg.pending:
            for table in seg.tables():
                at = [seg.columns(table).index(k) for k in KEYS[table]]
                out.setdefault(table, []).extend(tuple(r[i] for i in at) for r in seg.rows(table))
        seg.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("step", ["seal", "complete"])
async def test_sigkill_between_archive_and_delete_then_the_next_run_finishes(
    mixed_template: tuple[str, dict[str, str]], dbs: Databases, tmp_path: Path, step: str
) -> None:
    """`once` killed once its first segment is `.pending`: before the batch's COMMIT
    (`seal`) or after it, before the rename (`complete`). The next run settles it and
    finishes; every deleted row is then in exactly one complete segment, and restore
    gives back the untouched copy."""
    template, shapes = mixed_template
    dsn, copy = dbs.clone(template), dbs.clone(template)
    archive, gate = tmp_path / "archive", tmp_path / "gate"
    cfg = write_config(tmp_path, dsn, archive, EXPIRE_AND_TRIM)
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
            [first] = list(read_segments(str(archive), store="pg"))
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

    await asyncio.to_thread(restore_all, cfg, archive)
    assert await dump(dsn) == await dump(copy)
    every = sorted(original_keys)
    assert await saver_view(dsn, shapes, every) == await saver_view(copy, shapes, every)
