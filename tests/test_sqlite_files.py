"""How the worker opens a SQLite store: any path, no file it was not asked for, read-only plans.

Every test runs the real command line (`plan`, `once`, `stats`) on a store
written by a real graph, and checks the folder's files before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from helpers.scenarios import OLD_DAYS, cli, read_all, turns
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from worker.service.demo import aged, chat_graph, thread

REPO = Path(__file__).parent.parent
THREADS = ("user-1", "user-2", "user-3")
TURNS = 4
CHECKPOINTS = 3 * TURNS
"""A chat turn saves three checkpoints."""
KEEP = 2
TRIMMED = len(THREADS) * (CHECKPOINTS - KEEP)

ODD_NAMES = [
    "with space.db",
    "hash#tag.db",
    "what?.db",
    "100%.db",
    "%41%2F.db",  # unescaped, SQLite would decode it to "A/.db"
    "ünïcödé-中文.db",
    "dir #?%/store.db",
]

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
"""Runs the CLI as `nobody`: root ignores file modes, so a read-only file needs another user."""
UNPRIVILEGED = NOBODY if os.geteuid() == 0 else []

Key = tuple[str, str, str]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three chat threads, every checkpoint in the main file (no -wal left)."""
    path = tmp_path_factory.mktemp("files") / "template.db"

    async def fill() -> None:
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            app = chat_graph(saver)
            for tid in THREADS:
                await turns(app, tid, TURNS)

    asyncio.run(fill())
    assert not Path(f"{path}-wal").exists()
    return path


def write_config(folder: Path, store: str) -> Path:
    cfg = folder / "janitor.yaml"
    cfg.write_text(
        "stores:\n  - name: app\n    kind: sqlite\n"
        f"    path: {json.dumps(store)}\n"
        f"policies:\n  - {{name: trim, keep_last: {KEEP}}}\nlogging: {{format: json}}\n"
    )
    return cfg


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def keys(path: Path) -> list[Key]:
    # A read-only, immutable look: the test itself must create nothing either.
    uri = f"{path.as_uri()}?mode=ro&immutable=1"
    with closing(sqlite3.connect(uri, uri=True)) as con:
        return list(con.execute("SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints"))


async def read_back(path: Path, wanted: list[Key]) -> dict[Key, Any]:
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        return await read_all(saver, wanted)


def planned(stdout: str) -> int:
    return int(json.loads(stdout)["stores"][0]["total"]["checkpoints"])


# ------------------------------------------------------------------ any path


@pytest.mark.parametrize("name", ODD_NAMES)
async def test_plan_and_once_work_at_any_path(tmp_path: Path, template: Path, name: str) -> None:
    folder = tmp_path / "stores"
    store = folder / name
    store.parent.mkdir(parents=True)
    shutil.copy(template, store)
    cfg = write_config(tmp_path, str(store))
    before = files(folder)
    control = await read_back(template, keys(template))

    p = cli("plan", "--format", "json", config=cfg)
    assert p.returncode == 0, p.stderr
    assert planned(p.stdout) == TRIMMED
    assert files(folder) == before

    o = cli("once", config=cfg)
    assert o.returncode == 0, o.stderr
    left = keys(store)
    assert len(left) == len(THREADS) * KEEP
    assert await read_back(store, left) == {k: control[k] for k in left}
    assert files(folder) == before


async def test_a_relative_path_is_taken_from_the_working_directory(
    tmp_path: Path, template: Path
) -> None:
    folder = tmp_path / "rel #?%"
    folder.mkdir()
    store = folder / "a#b?c%d.db"
    shutil.copy(template, store)
    # `cli` runs from the repository root.
    cfg = write_config(tmp_path, os.path.relpath(store, REPO))
    p = cli("plan", "--format", "json", config=cfg)
    assert p.returncode == 0, p.stderr
    assert planned(p.stdout) == TRIMMED
    assert cli("once", config=cfg).returncode == 0
    assert len(keys(store)) == len(THREADS) * KEEP
    assert files(folder) == {store.name}


@pytest.mark.parametrize("name", ["missing.db", "miss#ing.db", "gone?.db", "no dir/x.db"])
def test_a_missing_store_is_an_error_and_no_file_is_created(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "stores"
    folder.mkdir()
    store = folder / name
    cfg = write_config(tmp_path, str(store))
    for command in ("plan", "once", "stats"):
        r = cli(command, config=cfg)
        assert r.returncode == 1, (command, r.stdout, r.stderr)
        assert "store 'app'" in r.stderr and f"{store} does not exist" in r.stderr
        assert "Traceback" not in r.stderr
    assert files(folder) == set()


def test_a_file_that_is_no_store_fails_cleanly(tmp_path: Path) -> None:
    """A schema error closes the connection: no aiosqlite thread left calling a closed loop."""
    store = tmp_path / "other.db"
    with closing(sqlite3.connect(store)) as con:
        con.execute("CREATE TABLE notes (x)")
    cfg = write_config(tmp_path, str(store))
    for command in ("plan", "once", "stats"):
        r = cli(command, config=cfg)
        assert r.returncode == 1, (command, r.stderr)
        assert "has no 'checkpoints' table" in r.stderr
        assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr


# ------------------------------------------------------------------ read-only


@pytest.fixture
def readable_folder() -> Iterator[Path]:
    """A folder outside pytest's private (0700) temp root, so `nobody` can read into it."""
    folder = Path(tempfile.mkdtemp(prefix="janitor-ro-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


def read_only(folder: Path, store: Path) -> None:
    """The store 0444 in a folder the CLI's user cannot write (so no -wal/-shm can be made)."""
    store.chmod(0o444)
    folder.chmod(0o555)


def run_unprivileged(*args: str, config: Path) -> Any:
    return cli(*args, config=config, runner=UNPRIVILEGED)


async def test_plan_and_stats_read_a_store_they_cannot_write(
    readable_folder: Path, template: Path
) -> None:
    store = readable_folder / "store.db"
    shutil.copy(template, store)
    cfg = write_config(readable_folder, str(store))
    cfg.chmod(0o644)
    read_only(readable_folder, store)
    raw, before = store.read_bytes(), files(readable_folder)
    assert stat.S_IMODE(store.stat().st_mode) == 0o444

    p = run_unprivileged("plan", "--format", "json", config=cfg)
    assert p.returncode == 0, p.stderr
    assert planned(p.stdout) == TRIMMED
    s = run_unprivileged("stats", "--format", "json", config=cfg)
    assert s.returncode == 0, s.stderr
    assert json.loads(s.stdout)["stores"][0]["threads"] == len(THREADS)
    # The premise: this user really cannot write the store, so `once` fails.
    o = run_unprivileged("once", config=cfg)
    assert o.returncode == 1, o.stderr
    assert store.read_bytes() == raw
    assert files(readable_folder) == before


async def test_plan_and_stats_see_commits_still_in_the_wal(
    readable_folder: Path, template: Path
) -> None:
    store = readable_folder / "store.db"
    shutil.copy(template, store)
    cfg = write_config(readable_folder, str(store))
    cfg.chmod(0o644)
    # The application has the store open; its newest commits are only in the -wal.
    with SqliteSaver.from_conn_string(str(store)) as saver:
        with aged(OLD_DAYS):
            app = chat_graph(saver)
            for i in range(TURNS):
                app.invoke({"messages": [f"turn {i}"]}, thread("user-late"))
        assert {f"{store.name}-wal", f"{store.name}-shm"} <= files(readable_folder)
        read_only(readable_folder, store)
        before = files(readable_folder)
        # Reading the main file alone (`immutable`) would miss the thread.
        assert "user-late" not in {t for t, _, _ in keys(store)}

        s = run_unprivileged("stats", "--format", "json", config=cfg)
        assert s.returncode == 0, s.stderr
        assert json.loads(s.stdout)["stores"][0]["threads"] == len(THREADS) + 1
        p = run_unprivileged("plan", "--format", "json", config=cfg)
        assert p.returncode == 0, p.stderr
        assert planned(p.stdout) == TRIMMED + CHECKPOINTS - KEEP
        assert files(readable_folder) == before
