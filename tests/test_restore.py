"""Archive before delete and `restore` on SQLite stores written by real graphs.

Every check compares through the real saver with an untouched copy of the
store taken before the sweep: `aget_tuple` of every checkpoint, `aget_state`
of every head, and resuming waiting threads on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import xxhash
from helpers.backends import BACKENDS, Backend, Pair, SqliteBackend
from helpers.daemon_helpers import Scrape
from helpers.scenarios import PAUSED_ONCE, cli, read_all, resume, states, turns
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from worker.service.demo import chat_graph, thread
from worker.stores.archive import (
    LIST_TABLES,
    TABLE_COLUMNS,
    Archive,
    ArchiveSettings,
    Segment,
    Selection,
    read_segments,
)
from worker.stores.engine import ThreadWork
from worker.stores.sqlite import SqliteStore
from worker.sweep import Outcome, SweepOptions, sweep

# The tests on the mixed store (`copies`) run on SQLite, but for those marked for every backend.
pytestmark = pytest.mark.backends("sqlite")

SQLITE = SqliteBackend()
Key = tuple[str, str, str]

EXPIRE_AND_TRIM = """
  - {name: trim, keep_last: 1, expire_after: 30d, interrupted: expire}
"""
GRACE = 1
"""The grace_period (seconds) where blobs are collected: small, so a second `once` a moment
later collects the expired threads' blobs and the trims' garbage."""
WAITING = ("int-old", "int-new", "brk-old", "err-old")
"""Threads stopped at an interrupt, a breakpoint or an error: resumed on both stores."""


def all_keys(path: Path) -> list[Key]:
    with sqlite3.connect(path) as con:
        sql = "SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints"
        return sorted(con.execute(sql))


def raw_rows(path: Path) -> tuple[list[Any], list[Any]]:
    """Both saver tables as stored, ordered."""
    with sqlite3.connect(path) as con:
        return (
            sorted(con.execute("SELECT * FROM checkpoints")),
            sorted(con.execute("SELECT * FROM writes")),
        )


def write_config(tmp_path: Path, store: Path, archive: str, policies: str, extra: str = "") -> Path:
    cfg = tmp_path / "janitor.yaml"
    cfg.write_text(
        f"""
stores:
  - name: app
    kind: sqlite
    path: {store}
    archive: {{path: "{archive}"{extra}}}
defaults:
  max_delete_fraction: 1.0
  batch: {{max_batch_rows: 15}}
policies:
{policies}
"""
    )
    return cfg


@pytest.fixture
def copies(mixed_pair: Pair) -> tuple[Path, Path, dict[str, str]]:
    """The (SQLite) store the sweep works on, and an untouched control copy."""
    store, control, shapes = mixed_pair
    return Path(store), Path(control), shapes


async def assert_same_through_the_saver(
    store: Path | str,
    control: Path | str,
    shapes: dict[str, str],
    keys: list[Key],
    backend: Backend = SQLITE,
) -> None:
    """Every checkpoint of the control reads back equal from the store, and every head's state."""
    async with backend.saver(str(store)) as a, backend.saver(str(control)) as b:
        got, want = await read_all(a, keys), await read_all(b, keys)
        assert len(want) == len(keys)
        for key in keys:
            assert got.get(key) == want[key], key
        assert await states(a, shapes) == await states(b, shapes)


def archive_config(
    backend: Backend,
    tmp_path: Path,
    store: str,
    archive: str,
    policies: str,
    archive_extra: str = "",
    batch: str = "",
) -> Path:
    """A config of store `app` archiving to `archive`, small batches (and `batch` settings),
    metrics to a textfile."""
    cfg = tmp_path / "janitor.yaml"
    archived = f'    archive: {{path: "{archive}"{archive_extra}}}\n'
    cfg.write_text(
        f"""{backend.store_yaml(store, archived)}defaults:
  max_delete_fraction: 1.0
  allow_mass_expiry: true
  batch: {{max_batch_rows: 15{batch}}}
metrics: {{textfile: {tmp_path / "janitor.prom"}}}
policies:
{policies}
"""
    )
    return cfg


def archived_rows(archive: Path) -> dict[str, list[Any]]:
    """Rows per table over the complete segments (a pending one does not count)."""
    out: dict[str, list[Any]] = {}
    for seg in read_segments(str(archive), store="app"):
        if seg.pending:
            continue
        for table in seg.tables():
            out.setdefault(table, []).extend(seg.rows(table))
        out.setdefault("nulled_parents", []).extend(seg.nulled_parents())
    return out


def values(rows: list[tuple[tuple[str, Any], ...]]) -> list[tuple[Any, ...]]:
    """Dumped rows (`Backend.dump`) as plain value tuples, as a segment holds them."""
    return [tuple(v for _, v in r) for r in rows]


def assert_archive_holds_what_went(
    backend: Backend,
    archive: Path,
    before: dict[str, list[Any]],
    after: dict[str, list[Any]],
    runs: list[dict[str, Any]],
) -> None:
    """Complete, verified segments (several: small batches) hold exactly the deleted rows,
    each once, as stored, and every run's summary and metrics count what it archived."""
    segments = list(read_segments(str(archive)))
    assert len(segments) > 2 and not any(s.pending for s in segments)
    for seg in segments:
        seg.verify()
    assert [p for p in archive.rglob("*") if p.name.endswith(".partial")] == []
    rows = archived_rows(archive)
    summed: dict[str, int] = {}
    for run in runs:
        for table, n in run["archived"]["rows"].items():
            summed[table] = summed.get(table, 0) + n
    assert summed == {t: len(v) for t, v in rows.items()}
    for role in before:
        went = len(before[role]) - len(after[role])
        assert 0 < went == len(rows[backend.table(role)]), role
        assert went == sum(run["total"][role] for run in runs), role
    # A trim split over batches nulls, in one batch, the parent of a checkpoint a later
    # batch deletes: that row is archived as stored then, its parent in nulled_parents.
    assert rows["nulled_parents"], "a trim nulled no parent: the scenario tests too little"
    nulled = {tuple(r[:3]): r[3] for r in rows["nulled_parents"]}
    relinked = sorted(
        (*r[:3], nulled.get(tuple(r[:3]), r[3]) if r[3] is None else r[3], *r[4:])
        for r in rows[backend.table("checkpoints")]
    )
    kept = {tuple(r[:3]) for r in values(after["checkpoints"])}
    assert relinked == sorted(r for r in values(before["checkpoints"]) if tuple(r[:3]) not in kept)


def assert_metrics_match(tmp_path: Path, summary: dict[str, Any]) -> None:
    """The textfile counts exactly what the run's summary says it archived."""
    m = Scrape.parse((tmp_path / "janitor.prom").read_text())
    for table, n in summary["archived"]["rows"].items():
        assert m.value("archived_rows_total", store="app", table=table) == n, table
    assert m.value("archive_bytes_total", store="app") == summary["archived"]["bytes"] > 0
    assert m.total("archive_failures_total", store="app") == 0


def once_summary(cfg: Path, tmp_path: Path) -> dict[str, Any]:
    """`checkpoint-janitor once`, which must succeed; the store's summary (metrics checked)."""
    r = cli("once", config=cfg)
    assert r.returncode == 0, r.stderr
    summary: dict[str, Any] = json.loads(r.stdout)["stores"][0]
    assert_metrics_match(tmp_path, summary)
    return summary


Dump = dict[str, list[tuple[tuple[str, Any], ...]]]


def threads_rows(tables: Dump, keep: set[str]) -> Dump:
    """A `dump` cut to the threads in `keep`."""
    return {t: [r for r in rows if dict(r)["thread_id"] in keep] for t, rows in tables.items()}


def restore_named(
    backend: Backend, cfg: Path, store: str, archive: Path, original: Dump, swept: Dump
) -> Dump:
    """Named threads by repeated `--thread`, then by `--threads-from -`: each run puts back
    exactly those threads' rows (blobs included where the backend has them) and changes no
    other thread. The store's dump after them."""
    done: set[str] = set()
    everyone = {dict(r)["thread_id"] for r in original["checkpoints"]}
    now = swept
    for named, how, stdin in (
        ({"int-old", "delta-old"}, ["--thread", "int-old", "--thread", "delta-old"], None),
        (
            {"sub-old", "brk-old", "user-new-1"},
            ["--threads-from", "-"],
            "sub-old\nbrk-old\nuser-new-1\n",
        ),
    ):
        r = cli(
            "restore", "--store", "app", "--from", str(archive), *how, "--yes",
            config=cfg, input=stdin,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f"restored {len(named)} threads" in r.stdout, r.stdout
        done |= named
        now = asyncio.run(backend.dump(store))
        assert threads_rows(now, done) == threads_rows(original, done)
        assert threads_rows(now, everyone - done) == threads_rows(swept, everyone - done)
    if backend.has_blobs:
        lost = threads_rows(original, {"sub-old"})["blobs"]
        assert threads_rows(swept, {"sub-old"})["blobs"] != lost, "no blob of sub-old to restore"
    return now


@pytest.mark.backends(*BACKENDS)
def test_expire_and_trim_archive_then_restore_all_reads_back_equal(
    backend: Backend, tmp_path: Path, mixed_pair: Pair
) -> None:
    """Trims, expiries, parent nulling and (where the backend has blobs, past the grace
    period) blob collection all go to the archive and count in the summary and metrics;
    `restore --all` then gives back a store equal to the untouched copy, row for row and
    through the saver, and waiting threads resume the same."""
    store, control, shapes = mixed_pair
    archive = tmp_path / "archive"
    batch = f", grace_period: {GRACE}s" if backend.has_blobs else ""
    cfg = archive_config(backend, tmp_path, store, str(archive), EXPIRE_AND_TRIM, batch=batch)
    keys = asyncio.run(backend.all_keys(control))
    before = asyncio.run(backend.dump(control))

    runs = [once_summary(cfg, tmp_path)]
    assert runs[0]["batches"] > 2
    left = {t for t, *_ in asyncio.run(backend.all_keys(store))}
    assert {"user-old-1", "int-old", "brk-old", "err-old"}.isdisjoint(left)
    if backend.has_blobs:
        # The expiries are dated by the first run's clock: a run that starts after that
        # clock plus the grace period collects their blobs.
        time.sleep(GRACE + 0.1)
        runs.append(once_summary(cfg, tmp_path))
        assert runs[1]["total"]["blobs"] > 0
        assert runs[1]["archived"]["rows"][backend.table("blobs")] == runs[1]["total"]["blobs"]
    after = asyncio.run(backend.dump(store))
    assert_archive_holds_what_went(backend, archive, before, after, runs)

    after = restore_named(backend, cfg, store, archive, before, after)
    r = cli("restore", "--store", "app", "--from", str(archive), "--all", "--dry-run", config=cfg)
    assert r.returncode == 0, r.stderr
    assert "user-old-1:" in r.stdout and "parent links" in r.stdout
    assert asyncio.run(backend.dump(store)) == after, "a dry run wrote"

    r = cli("restore", "--store", "app", "--from", str(archive), "--all", "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    assert "restored" in r.stdout and "parent links" in r.stdout
    # The store is the control again, rows and parent links included.
    assert asyncio.run(backend.dump(store)) == before
    asyncio.run(assert_same_through_the_saver(store, control, shapes, keys, backend))

    # Waiting threads resume on the restored store as on the control.
    async def resume_both() -> None:
        for tid in WAITING:
            async with backend.saver(store) as a, backend.saver(control) as b:
                assert await resume(a, tid, shapes[tid]) == await resume(b, tid, shapes[tid])

    asyncio.run(resume_both())
    asyncio.run(assert_same_through_the_saver(store, control, shapes, keys, backend))

    # A second restore finds nothing missing.
    r = cli("restore", "--store", "app", "--from", str(archive), "--all", "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    assert "0 threads to restore" in r.stdout


def test_restore_one_thread_or_a_prefix_only(
    tmp_path: Path, copies: tuple[Path, Path, dict[str, str]]
) -> None:
    store, control, _ = copies
    archive = tmp_path / "archive"
    cfg = write_config(tmp_path, store, str(archive), EXPIRE_AND_TRIM)
    assert cli("once", config=cfg).returncode == 0
    gone_threads = {t for t, *_ in all_keys(control)} - {t for t, *_ in all_keys(store)}
    assert "user-old-1" in gone_threads

    r = cli("restore", "--store", "app", "--from", str(archive), "--thread", "user-old-1",
            "--yes", config=cfg)  # fmt: skip
    assert r.returncode == 0, r.stderr
    keys = [k for k in all_keys(control) if k[0] == "user-old-1"]
    assert [k for k in all_keys(store) if k[0] == "user-old-1"] == keys
    asyncio.run(assert_same_through_the_saver(store, control, {"user-old-1": "chat"}, keys))
    assert "user-old-2" not in {t for t, *_ in all_keys(store)}

    r = cli("restore", "--store", "app", "--from", str(archive / "app"), "--thread-prefix",
            "org-1:user-2:", "--yes", config=cfg)  # fmt: skip
    assert r.returncode == 0, r.stderr
    org = [k for k in all_keys(control) if k[0].startswith("org-1:user-2:")]
    assert [k for k in all_keys(store) if k[0].startswith("org-1:user-2:")] == org
    # `org-1:user-20:` does not start with `org-1:user-2:` (no LIKE wildcard, no folding).
    assert [k for k in all_keys(store) if k[0].startswith("org-1:user-20:")] != [
        k for k in all_keys(control) if k[0].startswith("org-1:user-20:")
    ]


def of_threads(rows: tuple[list[Any], list[Any]], keep: Any) -> tuple[list[Any], list[Any]]:
    """`raw_rows` cut to the threads `keep(thread_id)` accepts."""
    return [r for r in rows[0] if keep(r[0])], [r for r in rows[1] if keep(r[0])]


def test_restore_many_named_threads_by_thread_and_threads_from(
    tmp_path: Path, copies: tuple[Path, Path, dict[str, str]]
) -> None:
    """Repeated `--thread`, and `--threads-from FILE` or `-`, restore exactly the named
    threads in one run, equal to the control through the saver; no other thread changes."""
    store, control, shapes = copies
    archive = tmp_path / "archive"
    cfg = write_config(tmp_path, store, str(archive), EXPIRE_AND_TRIM)
    assert cli("once", config=cfg).returncode == 0
    swept, untouched = raw_rows(store), raw_rows(control)
    ids_file = tmp_path / "threads.txt"
    ids_file.write_text("vip-old\nsub-old\n\nnobody-archived\n")
    unknown = "  1 of the 3 named threads get nothing back: nobody-archived"
    batches: list[tuple[set[str], list[str], str | None, str]] = [
        ({"user-old-1", "int-old"}, ["--thread", "user-old-1", "--thread", "int-old"], None, ""),
        ({"vip-old", "sub-old"}, ["--threads-from", str(ids_file)], None, unknown),
        ({"user-new-1", "brk-old", "delta-old"}, ["--threads-from", "-"],
         "user-new-1\r\nbrk-old\ndelta-old", ""),
    ]  # fmt: skip
    done: set[str] = set()
    for named, how, stdin, note in batches:
        before = raw_rows(store)
        dry = cli("restore", "--store", "app", "--from", str(archive), *how, "--dry-run",
                  config=cfg, input=stdin)  # fmt: skip
        assert dry.returncode == 0, dry.stderr
        assert f"; {len(named)} threads to restore" in dry.stdout, dry.stdout
        assert all(f"  {t}:" in dry.stdout for t in named) and note in dry.stdout, dry.stdout
        assert raw_rows(store) == before, "a dry run wrote"
        r = cli("restore", "--store", "app", "--from", str(archive), *how, "--yes",
                config=cfg, input=stdin)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f"restored {len(named)} threads" in r.stdout
        done |= named
        assert of_threads(raw_rows(store), done.__contains__) == of_threads(
            untouched, done.__contains__
        )
        others = {t for t, *_ in all_keys(control)} - done
        assert of_threads(raw_rows(store), others.__contains__) == of_threads(
            swept, others.__contains__
        )
    keys = [k for k in all_keys(control) if k[0] in done]
    asyncio.run(assert_same_through_the_saver(store, control, {t: shapes[t] for t in done}, keys))


def test_a_damaged_segment_blocks_only_a_restore_that_needs_it(
    tmp_path: Path, copies: tuple[Path, Path, dict[str, str]]
) -> None:
    """A segment whose row was changed fails its checksum: a restore of threads it does
    not hold goes on without reading it; one of a thread it holds, or `--all`, is refused
    (exit 1, naming the segment) before any row goes in. A file that is not a segment at
    all may hold anything, so it blocks every restore."""
    store, control, shapes = copies
    archive = tmp_path / "archive"
    cfg = write_config(tmp_path, store, str(archive), EXPIRE_AND_TRIM)
    assert cli("once", config=cfg).returncode == 0
    segments = list(read_segments(str(archive), "app"))
    holders = {tid: {s.location for s in segments if tid in s.counts()} for tid in shapes}
    damaged = next(
        s
        for s in segments
        if s.location not in holders["user-old-1"]
        and any("checkpoints" in per for per in s.counts().values())
    )
    victim = next(iter(damaged.counts()))
    with sqlite3.connect(damaged.local_path) as con:
        con.execute("UPDATE checkpoints SET checkpoint = x'00' WHERE rowid = 1")
    con.close()
    swept = raw_rows(store)

    def restore(*how: str) -> Any:
        return cli("restore", "--store", "app", "--from", str(archive), *how, "--yes",
                   config=cfg)  # fmt: skip

    for how in (["--thread", victim], ["--thread", victim, "--thread", "user-old-1"], ["--all"]):
        r = restore(*how)
        assert r.returncode == 1 and "checksum mismatch" in r.stderr, (how, r.stderr)
        assert damaged.location in r.stderr and "'app'" in r.stderr
        assert raw_rows(store) == swept, "a refused restore wrote"

    r = restore("--thread", "user-old-1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "more hold none of the selected threads: not read" in r.stdout
    r = restore("--thread", "user-old-1")
    assert r.returncode == 0, r.stderr
    keys = [k for k in all_keys(control) if k[0] == "user-old-1"]
    asyncio.run(assert_same_through_the_saver(store, control, {"user-old-1": "chat"}, keys))

    junk = Path(damaged.local_path).parent / "999999.sqlite"
    junk.write_bytes(b"not a database, not a segment" * 200)
    r = restore("--thread", "user-old-2")
    assert r.returncode == 1 and "999999.sqlite" in r.stderr, r.stderr


def as_version_1(path: str) -> None:
    """Rewrite a segment's `archive_meta` as the version 1 writer wrote it: format_version 1
    and its SHA-256 checksum (`row-sha256-sorted-v1`, computed here with hashlib from the
    rows, as the version 1 writer did), so the reader meets exactly what it met then."""
    as_row_version(path, "1", "row-sha256-sorted-v1", "sha256", hashlib.sha256,
                   lambda data: hashlib.sha256(data).digest())  # fmt: skip


def as_version_2(path: str) -> None:
    """The same as the version 2 writer wrote it: xxh3-128 in place of SHA-256
    (`row-xxh3-128-sorted-v2`, 16-byte row digests, key `xxh3_128`)."""
    as_row_version(path, "2", "row-xxh3-128-sorted-v2", "xxh3_128", xxhash.xxh3_128,
                   xxhash.xxh3_128_digest)  # fmt: skip


def as_row_version(path: str, version: str, method: str, key: str, new: Any, row_hash: Any) -> None:
    """Rewrite a segment's `archive_meta` with a row checksum (README "Getting data back",
    versions 1 and 2), computed here from the rows."""
    with contextlib.closing(sqlite3.connect(path)) as con:
        tables = [n for (n,) in con.execute(LIST_TABLES) if n != "archive_meta"]
        segment = new()
        for name in tables:
            cols = [c for (c,) in con.execute(TABLE_COLUMNS, (name,))]
            rows = con.execute(f'SELECT * FROM "{name}"').fetchall()
            segment.update(f"table:{name}\n{','.join(cols)}\n".encode())
            for d in sorted(row_hash(v1_encoding(r)) for r in rows):
                segment.update(d)
        con.execute("DELETE FROM archive_meta WHERE key IN ('xxh3_128', 'checksum_method')")
        con.executemany(
            "INSERT OR REPLACE INTO archive_meta VALUES (?, ?)",
            [("format_version", version), ("checksum_method", method),
             (key, segment.hexdigest())],
        )  # fmt: skip
        con.commit()


def v1_encoding(row: Sequence[Any]) -> bytes:
    """One row's canonical encoding (README "Getting data back"; no reals in these stores)."""
    out = b""
    for v in row:
        if v is None:
            out += b"N"
        elif isinstance(v, int):
            out += b"I%d;" % v
        else:
            data = v.encode() if isinstance(v, str) else v
            out += (b"T%d:" if isinstance(v, str) else b"B%d:") % len(data) + data
    return out


def test_version_1_and_2_archives_still_restore_equal(
    tmp_path: Path, copies: tuple[Path, Path, dict[str, str]]
) -> None:
    """Segments of format versions 1 and 2 (row checksums) sit beside version 3 ones in
    archives written before the change: `restore --all` verifies them by their own method
    and gives back the store, equal through the saver; a damaged one is still refused."""
    store, control, shapes = copies
    archive = tmp_path / "archive"
    cfg = write_config(tmp_path, store, str(archive), EXPIRE_AND_TRIM)
    assert cli("once", config=cfg).returncode == 0
    segments = sorted(s.local_path for s in read_segments(str(archive), "app"))
    assert len(segments) > 2
    for path in segments[::3]:
        as_version_1(path)
    for path in segments[1::3]:
        as_version_2(path)
    versions = {s.meta["format_version"] for s in read_segments(str(archive), "app")}
    assert versions == {"1", "2", "3"}
    swept = raw_rows(store)

    damaged = tmp_path / "damaged"
    shutil.copytree(archive, damaged)
    with sqlite3.connect(damaged / Path(segments[0]).relative_to(archive)) as con:
        con.execute("UPDATE checkpoints SET checkpoint = x'00' WHERE rowid = 1")
    con.close()
    r = cli("restore", "--store", "app", "--from", str(damaged), "--all", "--yes", config=cfg)
    assert r.returncode == 1 and "checksum mismatch" in r.stderr, r.stderr
    assert raw_rows(store) == swept, "a refused restore wrote"

    r = cli("restore", "--store", "app", "--from", str(archive), "--all", "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    assert raw_rows(store) == raw_rows(control)
    keys = all_keys(control)
    asyncio.run(assert_same_through_the_saver(store, control, shapes, keys))


def test_restore_asks_first_and_needs_yes_without_a_terminal(
    tmp_path: Path, copies: tuple[Path, Path, dict[str, str]]
) -> None:
    store, _, _ = copies
    archive = tmp_path / "archive"
    cfg = write_config(tmp_path, store, str(archive), EXPIRE_AND_TRIM)
    assert cli("once", config=cfg).returncode == 0
    after = raw_rows(store)
    r = cli("restore", "--store", "app", "--from", str(archive), "--all", config=cfg)
    assert r.returncode == 2 and "--yes" in r.stderr
    r = cli("restore", "--store", "app", "--from", str(archive), config=cfg)
    assert r.returncode == 2
    (tmp_path / "none.txt").write_text("\n\n")
    for how, why in (
        (["--thread", "a", "--all"], "restore needs one of"),
        (["--threads-from", "-", "--thread-prefix", "a"], "restore needs one of"),
        (["--threads-from", str(tmp_path / "none.txt")], "no thread id in it"),
    ):
        r = cli("restore", "--store", "app", "--from", str(archive), *how, "--yes", config=cfg,
                input="a\n")  # fmt: skip
        assert r.returncode == 2 and why in r.stderr, (how, r.stderr)
    r = cli("restore", "--store", "app", "--from", str(archive), "--all", config=cfg,
            input="n\n", terminal=True)  # fmt: skip
    assert r.returncode == 0 and "nothing restored" in r.stdout
    assert raw_rows(store) == after


async def test_restore_a_thread_while_the_application_writes_to_it(
    tmp_path: Path, copies: tuple[Path, Path, dict[str, str]]
) -> None:
    """Turns saved between the restore's segments stay; the old checkpoints come back
    under them, and the thread reads as the control plus the new turns."""
    store, control, _ = copies
    tid = "user-new-1"
    settings = ArchiveSettings(str(tmp_path / "archive"))
    cfg_policies = "  - {name: trim, keep_last: 1}"
    from worker.service.config_files import load_config_text

    cfg = load_config_text(
        f"stores: [{{name: app, kind: sqlite, path: {store}}}]\n"
        "defaults: {batch: {max_batch_rows: 4}}\n"
        f"policies:\n{cfg_policies}\n"
    )
    engine = SqliteStore("app", str(store))
    await engine.open()
    try:
        report = await sweep(
            engine,
            cfg.policies_for("app"),
            SweepOptions(
                settings=cfg.store_settings("app"),
                archive=lambda started: Archive("app", "sqlite", settings, started),
            ),
        )
        assert report.outcome is Outcome.SUCCESS, report.error
        segments = [
            s for s in read_segments(settings.path, "app") if s.counts(Selection(tid)).get(tid)
        ]
        assert len(segments) >= 2, "the thread's trim should span segments"

        # The application saves a turn between the restore's segment transactions:
        # the engine's `_in_segment` runs one segment at a time; wrap it so the
        # turn runs exactly after the first segment committed.
        turned = asyncio.Event()
        original = engine._in_segment
        calls = 0

        async def in_segment(seg: Any, dry_run: bool, body: Any) -> None:
            nonlocal calls
            await original(seg, dry_run, body)
            calls += 1
            if calls == 1 and not dry_run:
                async with AsyncSqliteSaver.from_conn_string(str(store)) as saver:
                    await chat_graph(saver).ainvoke({"messages": ["new turn"]}, thread(tid))
                turned.set()

        engine._in_segment = in_segment  # type: ignore[method-assign]
        counts = await engine.restore(segments, Selection(thread_id=tid), dry_run=False)
        assert turned.is_set()
        assert counts.inserted[tid]["checkpoints"] > 0
    finally:
        await engine.close()

    control_keys = [k for k in all_keys(control) if k[0] == tid]
    store_keys = [k for k in all_keys(store) if k[0] == tid]
    assert set(control_keys) < set(store_keys)
    new = sorted(set(store_keys) - set(control_keys))
    async with (
        AsyncSqliteSaver.from_conn_string(str(store)) as a,
        AsyncSqliteSaver.from_conn_string(str(control)) as b,
    ):
        got, want = await read_all(a, control_keys), await read_all(b, control_keys)
        assert got == want
        # The new turn's checkpoints chain onto the old head, which is back.
        head = await chat_graph(a).aget_state(thread(tid))
        old_head = await chat_graph(b).aget_state(thread(tid))
        assert head.values["messages"][:-2] == old_head.values["messages"]
        assert head.values["messages"][-2] == "new turn"
        assert head.config["configurable"]["checkpoint_id"] == max(k[2] for k in new if k[1] == "")


async def test_archived_trims_run_batch_wide_and_restore_equal(tmp_path: Path) -> None:
    """keep_last with an archive trims each batch's threads in one set of statements
    (not a delete per thread), archives every row it removes, and restores equal."""
    store, control = tmp_path / "store.db", tmp_path / "control.db"
    threads = [f"chat-{i}" for i in range(6)]
    async with AsyncSqliteSaver.from_conn_string(str(store)) as saver:
        for tid in threads:
            await turns(chat_graph(saver), tid, 4)
    shutil.copy(store, control)
    settings = ArchiveSettings(str(tmp_path / "archive"))
    statements: list[str] = []
    await sweep_with_archive(
        store, settings, "  - {name: trim, keep_last: 1}\n", statements=statements, batch=""
    )
    keys = all_keys(control)
    assert {t for t, *_ in set(keys) - set(all_keys(store))} == set(threads)
    deletes = [s for s in statements if s.lstrip().startswith("DELETE FROM checkpoints")]
    segments = list(read_segments(settings.path, "app"))
    assert 1 <= len(segments) < len(threads)
    assert len(deletes) == len(segments), "a checkpoint delete per thread, not per batch"

    cfg_path = write_config(tmp_path, store, settings.path, "  - {name: trim, keep_last: 1}")
    r = cli("restore", "--store", "app", "--from", settings.path, "--all", "--yes", config=cfg_path)
    assert r.returncode == 0, r.stderr
    assert raw_rows(store) == raw_rows(control)
    async with (
        AsyncSqliteSaver.from_conn_string(str(store)) as a,
        AsyncSqliteSaver.from_conn_string(str(control)) as b,
    ):
        assert await read_all(a, keys) == await read_all(b, keys)
        for tid in threads:
            got = await chat_graph(a).aget_state(thread(tid))
            want = await chat_graph(b).aget_state(thread(tid))
            assert got.values == want.values and got.config == want.config


def deleted_rows(store: Path, control: Path) -> dict[str, list[Any]]:
    """Rows of each saver table, as the control holds them, whose key the store lost
    (a kept checkpoint whose parent was nulled is not one of them)."""
    (cps, ws), (left_cps, left_ws) = raw_rows(control), raw_rows(store)
    kept_cps, kept_ws = {r[:3] for r in left_cps}, {r[:5] for r in left_ws}
    return {
        "checkpoints": [r for r in cps if r[:3] not in kept_cps],
        "writes": [r for r in ws if r[:5] not in kept_ws],
    }


def archived_relinked(archive: Path) -> dict[str, list[Any]]:
    """The complete segments' checkpoints and writes, sorted, each checkpoint with the
    parent a batch nulled before a later one deleted it put back (as the control has it)."""
    archived = archived_rows(archive)
    links = {tuple(r[:3]): r[3] for r in archived.get("nulled_parents", [])}
    return {
        "checkpoints": sorted(
            (*r[:3], links.get(tuple(r[:3]), r[3]), *r[4:]) for r in archived["checkpoints"]
        ),
        "writes": sorted(archived.get("writes", [])),
    }


def archive_settings(tmp_path: Path) -> ArchiveSettings:
    return ArchiveSettings(str(tmp_path / "archive"))


async def trim_all_with_archive(
    store: Path,
    settings: ArchiveSettings,
    statements: list[str] | None = None,
    before_lock: Callable[[SqliteStore, Segment, Sequence[str]], Awaitable[None]] | None = None,
) -> dict[str, int]:
    """keep_last 1 and expiry of idle threads over `store`, archived, one sweep of small
    batches (`sweep_with_archive`)."""
    return await sweep_with_archive(store, settings, EXPIRE_AND_TRIM, statements, before_lock)


async def sweep_with_archive(
    store: Path,
    settings: ArchiveSettings,
    policies: str,
    statements: list[str] | None = None,
    before_lock: Callable[[SqliteStore, Segment, Sequence[str]], Awaitable[None]] | None = None,
    batch: str = ", batch: {max_batch_rows: 15}",
) -> dict[str, int]:
    """One sweep of `policies` over `store` (store `app`), archived to `settings`;
    `statements` collects the SQL it ran; with `before_lock`, awaited where a batch copied
    its archive before its write lock. Returns the engine's `copies_before_lock`."""
    from worker.service.config_files import load_config_text

    cfg = load_config_text(
        f"stores: [{{name: app, kind: sqlite, path: {store}}}]\n"
        f"defaults: {{max_delete_fraction: 1.0{batch}}}\n"
        "policies:\n" + policies
    )
    engine = SqliteStore("app", str(store))
    await engine.open()
    try:
        if statements is not None:
            # aiosqlite runs the callback on its own thread; list.append is atomic.
            await engine.conn.set_trace_callback(statements.append)
        if before_lock is not None:
            engine.before_lock = functools.partial(before_lock, engine)
        report = await sweep(
            engine,
            cfg.policies_for("app"),
            SweepOptions(
                settings=cfg.store_settings("app"),
                archive=lambda started: Archive("app", "sqlite", settings, started),
            ),
        )
        assert report.outcome is Outcome.SUCCESS, report.error
    finally:
        await engine.close()
    return dict(engine.copies_before_lock)


async def test_archived_rows_are_copied_in_sql_each_exactly_once(
    tmp_path: Path, copies: tuple[Path, Path, dict[str, str]]
) -> None:
    """With an archive, batch-wide trims and expiries copy their rows into the segment
    in SQL (their deletes return no rows), and the complete segments hold every
    deleted row exactly once, as stored, and nothing else."""
    store, control, _ = copies
    settings = archive_settings(tmp_path)
    statements: list[str] = []
    await trim_all_with_archive(store, settings, statements)
    # Only one-thread deletes by id (the delta threads' plans) still return their rows.
    returning = [s for s in statements if "RETURNING *" in s]
    assert all("WHERE thread_id = '" in s for s in returning), "batch-wide rows into Python"
    batch_wide = [s for s in statements if s.lstrip().startswith("DELETE") and "json_each" in s]
    assert [s for s in batch_wide if "checkpoint_id IN" not in s], "no batch-wide delete ran"
    gone = deleted_rows(store, control)
    assert gone["checkpoints"] and gone["writes"]
    assert archived_relinked(Path(settings.path)) == gone


async def test_a_thread_deleted_by_id_and_expired_in_one_batch_is_archived_once(
    tmp_path: Path, copies: tuple[Path, Path, dict[str, str]]
) -> None:
    """One batch deletes a checkpoint of a thread by id, then expires the thread: the
    expiry's SQL copy reads the last commit, which still holds that checkpoint, so the
    thread's expiry is archived from the rows its delete returns instead."""
    store, control, _ = copies
    settings = archive_settings(tmp_path)
    engine = SqliteStore("app", str(store))
    await engine.open()
    archive = Archive("app", "sqlite", settings, 0.0)
    try:
        (scanned,) = await engine.scan(["user-old-1"])
        oldest = min(c.checkpoint_id for c in scanned.view.checkpoints if c.namespace == "")
        after = tuple((ns, n - 1 if ns == "" else n, top) for ns, n, top in scanned.fingerprint)
        by_id = ThreadWork("user-old-1", scanned.fingerprint, checkpoints={"": [oldest]})
        whole = ThreadWork("user-old-1", after, expire=True)
        first, second = await engine.apply([by_id, whole], False, archive)
    finally:
        archive.close()
        await engine.close()
    assert first.counts.checkpoints == 1 and not second.changed
    assert not [k for k in all_keys(store) if k[0] == "user-old-1"]
    assert archived_relinked(Path(settings.path)) == deleted_rows(store, control)


async def test_a_rollback_journal_store_is_archived_exactly_too(
    tmp_path: Path, copies: tuple[Path, Path, dict[str, str]]
) -> None:
    """Without WAL the copy's read lock would stall a delete that spills its cache, so the
    copy runs first: every deleted row is still archived exactly once."""
    store, control, _ = copies
    with sqlite3.connect(store) as con:
        assert con.execute("PRAGMA journal_mode = DELETE").fetchone() == ("delete",)
    settings = archive_settings(tmp_path)
    await trim_all_with_archive(store, settings)
    assert archived_relinked(Path(settings.path)) == deleted_rows(store, control)


async def test_a_copy_that_differs_from_the_delete_rolls_the_batch_back(
    tmp_path: Path, copies: tuple[Path, Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows a batch deletes are counted against the rows its SQL copy archived: a
    copy that missed rows (here a predicate broken on purpose) deletes nothing."""
    from worker.stores import sqlite as sqlite_engine

    store, control, _ = copies
    broken = sqlite_engine.COPY_BATCH_TRIM_WRITES_SQL + " AND 0"
    monkeypatch.setattr(
        sqlite_engine,
        "_TRIM_COPIES",
        tuple((t, broken if t == "writes" else sql) for t, sql in sqlite_engine._TRIM_COPIES),
    )
    settings = archive_settings(tmp_path)
    with pytest.raises(AssertionError, match="copied"):
        await trim_all_with_archive(store, settings)
    assert raw_rows(store) == raw_rows(control)
    assert not list(read_segments(settings.path, "app"))


CHAT_THREADS = {
    "user-old-1",
    "user-old-2",
    "vip-old",
    "org-1:user-2:session-3",
    "user-new-1",
    "org-1:user-2:session-4",
    "org-1:user-20:session-1",
}
"""The mixed store's threads written by `chat_graph`: an application can add a turn."""


async def test_a_batch_copies_its_rows_before_its_write_lock(
    tmp_path: Path, copies: tuple[Path, Path, dict[str, str]]
) -> None:
    """With no other connection committing, a batch of trims and expiries copies its
    rows into its segment before BEGIN IMMEDIATE (the batch's connection holds no
    transaction yet), then keeps that copy: every deleted row is archived exactly once."""
    store, control, _ = copies
    settings = archive_settings(tmp_path)
    seen: list[tuple[bool, int]] = []

    async def before_lock(engine: SqliteStore, seg: Segment, threads: Sequence[str]) -> None:
        seen.append((engine.conn.in_transaction, seg.rows("checkpoints") + seg.rows("writes")))

    used = await trim_all_with_archive(store, settings, before_lock=before_lock)
    assert seen, "no batch copied its archive before the write lock"
    assert not any(in_txn for in_txn, _ in seen), "copied under the write lock"
    assert all(rows for _, rows in seen), "no row copied before the lock"
    assert used == {"kept": len(seen), "redone": 0}
    assert not list(Path(settings.path).rglob("*.partial"))
    assert archived_relinked(Path(settings.path)) == deleted_rows(store, control)


@pytest.mark.parametrize("app", ["adds_a_turn", "deletes_the_thread"])
async def test_a_commit_between_the_copy_and_the_lock_redoes_the_copy_under_it(
    tmp_path: Path, copies: tuple[Path, Path, dict[str, str]], app: str
) -> None:
    """The application commits to a thread of the batch after the batch copied it and
    before the batch's BEGIN IMMEDIATE (driven by the engine's `before_lock` seam):
    the copy is dropped and the batch archived under the lock. That thread, changed,
    is neither deleted nor archived; every other deleted row is archived exactly once."""
    store, control, shapes = copies
    settings = archive_settings(tmp_path)
    touched: list[str] = []

    async def before_lock(engine: SqliteStore, seg: Segment, threads: Sequence[str]) -> None:
        chats = sorted(set(threads) & CHAT_THREADS)
        if touched or not chats:
            return
        touched.append(chats[0])
        async with AsyncSqliteSaver.from_conn_string(str(store)) as saver:
            if app == "adds_a_turn":
                await chat_graph(saver).ainvoke({"messages": ["late turn"]}, thread(chats[0]))
            else:
                await saver.adelete_thread(chats[0])

    used = await trim_all_with_archive(store, settings, before_lock=before_lock)
    assert touched, "no batch of chat threads copied before the lock"
    assert used["redone"] == 1 and used["kept"] >= 1
    (tid,) = touched
    assert not [
        r for rows in archived_rows(Path(settings.path)).values() for r in rows if r[0] == tid
    ]
    mine = [k for k in all_keys(control) if k[0] == tid]
    if app == "adds_a_turn":
        assert set(mine) < {k for k in all_keys(store) if k[0] == tid}, (
            "the changed thread lost rows"
        )
    gone = deleted_rows(store, control)
    gone = {t: [r for r in rows if r[0] != tid] for t, rows in gone.items()}
    assert archived_relinked(Path(settings.path)) == gone
    left = set(all_keys(store))
    kept = {t for t, *_ in left} - {tid}
    others = [k for k in all_keys(control) if k[0] in kept and k in left]
    await assert_same_through_the_saver(
        store, control, {t: v for t, v in shapes.items() if t in kept}, others
    )


# ------------------------------------------------------------------ failures


@pytest.mark.backends(*BACKENDS)
@pytest.mark.parametrize("broken", ["max_bytes", "under_a_file"])
def test_an_archive_that_cannot_be_written_deletes_nothing(
    backend: Backend, tmp_path: Path, mixed_pair: Pair, broken: str
) -> None:
    """A segment past `max_bytes` (a full disk), or a folder that cannot be made: `once`
    exits 1 before any delete commits, says which store and archive, leaves no segment,
    and counts the failure."""
    store, _, _ = mixed_pair
    before = asyncio.run(backend.dump(store))
    if broken == "max_bytes":
        # A "full disk": the size limit refuses the first segment.
        archive, extra = str(tmp_path / "archive"), ", max_bytes: 1KB"
    else:
        # mkdir fails under a regular file, even for root (chmod would not stop root).
        (tmp_path / "blocker").write_text("a file, not a folder")
        archive, extra = str(tmp_path / "blocker" / "archive"), ""
    cfg = archive_config(backend, tmp_path, store, archive, EXPIRE_AND_TRIM, extra)

    r = cli("once", config=cfg)
    assert r.returncode == 1, r.stderr
    assert asyncio.run(backend.dump(store)) == before, "a batch deleted without its archive"
    error = json.loads(r.stdout)["stores"][0]["error"]
    assert "ArchiveError" in error and "'app'" in error and archive in error
    assert ("max_bytes 1000" if broken == "max_bytes" else "cannot create") in error
    textfile = (tmp_path / "janitor.prom").read_text()
    assert 'checkpoint_janitor_archive_failures_total{store="app"} 1.0' in textfile
    assert Scrape.parse(textfile).total("archived_rows_total", store="app") == 0
    assert [s for s in Path(tmp_path).rglob("*") if s.name.endswith((".sqlite", ".partial"))] == []


@pytest.mark.slow
@pytest.mark.parametrize("step", ["seal", "complete"])
def test_sigkill_between_archive_and_delete_then_the_next_run_finishes(
    tmp_path: Path, copies: tuple[Path, Path, dict[str, str]], step: str
) -> None:
    """Killed after the first segment is `.pending`: before its COMMIT (`seal`), or after
    its COMMIT and before the rename (`complete`). The next run settles it; every deleted
    row is then in exactly one complete segment, and restore gives the control back."""
    import signal
    import subprocess
    import sys
    import time

    store, control, shapes = copies
    archive = tmp_path / "archive"
    cfg = write_config(tmp_path, store, str(archive), EXPIRE_AND_TRIM)
    gate = tmp_path / "gate"
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_ONCE, step, str(gate), str(cfg)],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(archive.rglob("*.pending.sqlite")):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no segment became pending"
            time.sleep(0.01)
        if step == "complete":
            # The COMMIT ran just before `complete` waits: give it the moment it needs
            # by waiting for the rows to go (read through a fresh connection).
            first = next(iter(read_segments(str(archive))))
            key = next(iter(first.rows("checkpoints")))[:3]
            while key in set(all_keys(store)):
                assert time.monotonic() < deadline
                time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [pending] = list(archive.rglob("*.pending.sqlite"))
    if step == "seal":
        assert raw_rows(store) == raw_rows(control), "the killed batch committed"

    r = cli("once", config=cfg)
    assert r.returncode == 0, r.stderr
    assert not list(archive.rglob("*.pending.sqlite"))
    assert pending.with_name(pending.name.replace(".pending", "")).exists() == (step == "complete")
    rows = archived_rows(archive)
    keys = [tuple(r[:3]) for r in rows["checkpoints"]]
    assert len(keys) == len(set(keys)), "a checkpoint is archived twice as complete"
    assert set(keys) == set(all_keys(control)) - set(all_keys(store))
    # The writes' key: thread_id, checkpoint_ns, checkpoint_id, task_id, idx.
    writes = [(r[0], r[1], r[2], r[3], r[5]) for r in rows["writes"]]
    assert len(writes) == len(set(writes)), "a write is archived twice as complete"

    r = cli("restore", "--store", "app", "--from", str(archive), "--all", "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    assert raw_rows(store) == raw_rows(control)
    asyncio.run(assert_same_through_the_saver(store, control, shapes, all_keys(control)))


@pytest.mark.backends(*BACKENDS)
def test_purge_archives_only_when_asked_and_restores_equal(
    backend: Backend, tmp_path: Path, mixed_pair: Pair
) -> None:
    """`purge` erases (no archive); `purge --archive` archives what it deletes (blobs
    included), `restore` gives that thread back as the untouched copy has it, row for row
    and through the saver; without an `archive`, `purge --archive` refuses."""
    store, control, shapes = mixed_pair
    archive = tmp_path / "archive"
    cfg = archive_config(backend, tmp_path, store, str(archive), EXPIRE_AND_TRIM)

    r = cli("purge", "--store", "app", "--thread", "user-old-1", "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    assert "user-old-1" not in {t for t, *_ in asyncio.run(backend.all_keys(store))}
    assert not archive.exists() or list(read_segments(str(archive))) == []

    r = cli("purge", "--store", "app", "--thread", "user-old-2", "--archive", "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    assert "archived" in r.stdout
    [seg] = list(read_segments(str(archive), "app"))
    assert not seg.pending and set(seg.counts()) == {"user-old-2"}
    if backend.has_blobs:
        assert seg.counts()["user-old-2"][backend.table("blobs")] > 0
    seg.close()

    r = cli("restore", "--store", "app", "--from", str(archive), "--all", "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    assert "restored 1 threads" in r.stdout

    def rows_of(tables: dict[str, list[Any]], tid: str) -> dict[str, list[Any]]:
        return {t: [r for r in rows if dict(r)["thread_id"] == tid] for t, rows in tables.items()}

    swept, original = asyncio.run(backend.dump(store)), asyncio.run(backend.dump(control))
    assert rows_of(swept, "user-old-2") == rows_of(original, "user-old-2")
    assert all(rows for rows in rows_of(swept, "user-old-2").values())
    assert not any(rows_of(swept, "user-old-1").values()), "erased without --archive"
    keys = [k for k in asyncio.run(backend.all_keys(control)) if k[0] == "user-old-2"]
    one = {"user-old-2": shapes["user-old-2"]}
    asyncio.run(assert_same_through_the_saver(store, control, one, keys, backend))

    bare = tmp_path / "bare.yaml"
    bare.write_text(f"{backend.store_yaml(store)}policies: [{{name: p, keep_last: 1}}]\n")
    r = cli("purge", "--store", "app", "--thread", "vip-old", "--archive", "--yes", config=bare)
    assert r.returncode == 2 and "no `archive` configured" in r.stderr
    assert "vip-old" in {t for t, *_ in asyncio.run(backend.all_keys(store))}
