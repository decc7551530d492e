"""Archive before delete, and restore, on Postgres stores written by real graphs (issue 13).

Every sweep here archives through the real engine; the comparison is always
with an untouched copy of the store (`CREATE DATABASE ... TEMPLATE`), read
through the real `AsyncPostgresSaver`: every checkpoint (`aget_tuple`), each
thread head's state (`aget_state`, subgraphs included), an interrupted thread
resumed with `Command(resume=...)`, and the saver's three tables row by row.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pg_scenarios import Databases, all_keys, dump, pg_config, pg_saver
from pgserver import PgServer
from scenarios import (
    DAY,
    Gate,
    build_mixed_store,
    race_graph,
    read_all,
    resume,
    states,
)

from worker.demo import thread
from worker.engine import RestoreCounts, ThreadWork, WorkResult
from worker.postgres_store import PostgresStore
from worker.stores.archive import Archive, ArchiveSettings, Selection, read_segments
from worker.sweep import Outcome, SweepOptions, SweepReport, sweep

MANY = "defaults: {max_delete_fraction: 1.0}"
# Trims every thread to its newest checkpoint and expires the idle ones whole
# (the interrupted ones included), so every deleting statement runs.
POLICIES = "  - {name: trim, keep_last: 1, expire_after: 30d, interrupted: expire}"
GRACE = 3600.0
"""The default grace_period: blobs wait this long after a deletion."""


class ArchivingEngine(PostgresStore):
    """The real engine, handed `archive` for every batch, as a sweep with an archive does."""

    archive: Archive | None = None

    async def apply(
        self, batch: Sequence[ThreadWork], dry_run: bool, archive: Archive | None = None
    ) -> list[WorkResult]:
        """`PostgresStore.apply` with this engine's archive (none for a dry run)."""
        return await super().apply(batch, dry_run, None if dry_run else self.archive)


def engine_for(dsn: str) -> ArchivingEngine:
    cfg = pg_config(POLICIES, dsn, MANY)
    settings = cfg.store_settings("pg")
    return ArchivingEngine("pg", dsn, grace_period=settings.grace_period.total_seconds())


async def archived_sweep(
    dsn: str, settings: ArchiveSettings, now: float, policies: str = POLICIES
) -> SweepReport:
    """One sweep of `dsn` at `now`, archiving into `settings`, pending segments settled first."""
    cfg = pg_config(policies, dsn, MANY)
    engine = engine_for(dsn)
    await engine.open()
    archive = Archive("pg", "postgres", settings, time.time())
    engine.archive = archive
    try:
        await engine.recover_archive(archive)
        return await sweep(
            engine,
            cfg.policies_for("pg"),
            SweepOptions(
                settings=cfg.store_settings("pg"),
                max_delete_fraction=1.0,
                allow_mass_expiry=True,
            ),
            now=now,
        )
    finally:
        archive.close()
        await engine.close()


async def restore(
    dsn: str, path: str, select: Selection | None = None, dry_run: bool = False
) -> RestoreCounts:
    engine = engine_for(dsn)
    await engine.open()
    segments = list(read_segments(path, "pg"))
    try:
        return await engine.restore(segments, select or Selection(), dry_run)
    finally:
        for s in segments:
            s.close()
        await engine.close()


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
    """Segment file names under `root` by kind (complete, pending, partial)."""
    out: dict[str, list[str]] = {"complete": [], "pending": [], "partial": []}
    for _dir, _, files in os.walk(root):
        for f in files:
            if f.endswith(".pending.sqlite"):
                out["pending"].append(f)
            elif f.endswith(".partial"):
                out["partial"].append(f)
            elif f.endswith(".sqlite"):
                out["complete"].append(f)
    return out


async def test_expire_trim_collect_then_restore_all_reads_back_equal(
    mixed_template: tuple[str, dict[str, str]], dbs: Databases, tmp_path: Path
) -> None:
    """Trims, expiries, parent nulling and (past the grace period) blob collection all go to
    the archive; `restore --all` then gives back a store equal to the untouched copy,
    row for row and through the saver, and an interrupted thread resumes the same."""
    template, shapes = mixed_template
    dsn, copy = dbs.clone(template), dbs.clone(template)
    keys = await all_keys(copy)
    settings = ArchiveSettings(str(tmp_path / "archive"))
    now = time.time() + DAY
    first = await archived_sweep(dsn, settings, now)
    assert first.outcome is Outcome.SUCCESS, first.error
    # Past the grace period: the expired threads' blobs and the trims' garbage go.
    later = await archived_sweep(dsn, settings, now + 2 * GRACE)
    assert later.outcome is Outcome.SUCCESS, later.error
    assert sum(p.deleted.blobs for p in later.policies.values()) > 0
    original, swept = await dump(copy), await dump(dsn)
    for table in ("checkpoints", "checkpoint_writes", "checkpoint_blobs"):
        assert len(swept[table]) < len(original[table]), table
    files = segment_files(tmp_path / "archive")
    assert files["complete"] and not files["pending"] and not files["partial"]

    preview = await restore(dsn, settings.path, dry_run=True)
    assert await dump(dsn) == swept, "a dry run changed the store"
    done = await restore(dsn, settings.path)
    assert done.totals() == preview.totals()
    assert done.totals()["parents"] > 0
    assert await dump(dsn) == original
    # Restoring again finds everything there: nothing inserted, nothing changed.
    again = await restore(dsn, settings.path)
    assert again.threads() == [] and again.present > 0
    assert await dump(dsn) == original

    assert await saver_view(dsn, shapes, keys) == await saver_view(copy, shapes, keys)
    resumed = []
    for db in (dsn, copy):
        async with pg_saver(db) as saver:
            resumed.append(await resume(saver, "int-old", "interrupt"))
    assert resumed[0] == resumed[1]
    assert "human said yes" in str(resumed[0])


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
    settings = ArchiveSettings(str(tmp_path / "archive"))
    report = await archived_sweep(
        dsn, settings, time.time() + DAY, "  - {name: trim, keep_last: 1}"
    )
    assert report.outcome is Outcome.SUCCESS, report.error
    before_restore = {k for k in await all_keys(dsn) if k[0] == "t1"}

    gate = Gate()
    async with pg_saver(dsn) as saver:
        app = race_graph(saver, gate)
        run = asyncio.create_task(app.ainvoke({"messages": ["live"]}, thread("t1")))
        await gate.entered.wait()  # the run has read the thread and saved its input
        mid = {k for k in await all_keys(dsn) if k[0] == "t1"}
        assert mid > before_restore
        done = await restore(dsn, settings.path, Selection(thread_id="t1"))
        gate.go.set()
        await run
        final = await app.aget_state(thread("t1"))

    assert done.threads() == ["t1"]
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


async def test_archive_that_cannot_be_written_deletes_nothing(
    mixed_template: tuple[str, dict[str, str]], dbs: Databases, tmp_path: Path
) -> None:
    """A segment past `max_bytes` (a full disk) fails the sweep before any delete commits."""
    template, _ = mixed_template
    dsn = dbs.clone(template)
    before = await dump(dsn)
    settings = ArchiveSettings(str(tmp_path / "archive"), max_bytes=1024)
    report = await archived_sweep(dsn, settings, time.time() + DAY)
    assert report.outcome is Outcome.FAILED
    assert report.error is not None and "max_bytes" in report.error
    assert await dump(dsn) == before
    files = segment_files(tmp_path / "archive")
    assert files == {"complete": [], "pending": [], "partial": []}


async def test_pending_segments_are_settled_by_what_the_store_holds(
    mixed_template: tuple[str, dict[str, str]], dbs: Databases, tmp_path: Path
) -> None:
    """A crash between seal and rename leaves `.pending.sqlite` segments. The next sweep
    promotes those whose rows are gone (the delete committed) and removes those whose rows
    are still there (it never committed), so no batch counts twice as complete."""
    template, _ = mixed_template
    dsn, untouched = dbs.clone(template), dbs.clone(template)
    root = tmp_path / "archive"
    report = await archived_sweep(dsn, ArchiveSettings(str(root)), time.time() + DAY)
    assert report.outcome is Outcome.SUCCESS, report.error
    complete = sorted(root.rglob("*.sqlite"))
    assert complete
    # The same segments, as a crash before the rename would leave them, twice:
    # beside the swept store (rows gone) and beside the untouched copy (rows there).
    for base in (tmp_path / "swept", tmp_path / "untouched"):
        for f in complete:
            target = base / f.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.with_name(f.name.replace(".sqlite", ".pending.sqlite")).write_bytes(
                f.read_bytes()
            )
    for db, base, want in ((dsn, "swept", "complete"), (untouched, "untouched", "none")):
        engine = engine_for(db)
        await engine.open()
        archive = Archive("pg", "postgres", ArchiveSettings(str(tmp_path / base)), time.time())
        try:
            got = await engine.recover_archive(archive)
        finally:
            archive.close()
            await engine.close()
        files = segment_files(tmp_path / base)
        assert files["pending"] == []
        if want == "complete":
            assert (got.promoted, got.discarded) == (len(complete), 0)
            assert sorted(files["complete"]) == sorted(f.name for f in complete)
        else:
            assert (got.promoted, got.discarded) == (0, len(complete))
            assert files["complete"] == []
