"""Stores written through `EncryptedSerializer`, swept with and without the key.

Without the key a SQLite head cannot be decoded, and only its writes' channel
names are readable: an `interrupt()` pause or an error shows there, a static
breakpoint or a deferred node's pause does not, and a finished run's head
looks the same from outside. So with `interrupted: keep` such a thread is
kept and counted `undecodable` (never `interrupted`); `interrupted: expire`
expires it without decoding. Postgres keeps the checkpoint's structure in
plain JSONB, so there waiting is read without the key, as with it.

Every check reads the store back through the real saver, with the key,
against what it read before the sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from helpers.pg_scenarios import Databases, all_keys, pg_saver, run_pg_sweep
from helpers.pgserver import PgServer
from helpers.scenarios import OLD_DAYS, build_mixed_store, deferred_graph, read_all, states
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.serde.encrypted import EncryptedSerializer
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from worker.service.config_files import load_config_text
from worker.service.demo import aged, thread
from worker.stores import make_engine
from worker.sweep import Outcome, SweepOptions, SweepReport, sweep

KEY = "0123456789abcdef"
"""The application's AES key (16 bytes, as LANGGRAPH_AES_KEY)."""

SHOWN = {"int-old", "err-old"}
"""Idle threads whose head has an `__interrupt__` / `__error__` write."""
HIDDEN = {"brk-old", "defer-old"}
"""Idle threads paused where only the checkpoint blob shows it."""

EXPIRE = "  - {name: idle, expire_after: 30d}"

Key = tuple[str, str, str]


def encrypted() -> EncryptedSerializer:
    """The serializer the application writes with."""
    return EncryptedSerializer.from_pycryptodome_aes(key=KEY.encode())


async def build(saver: BaseCheckpointSaver[Any]) -> dict[str, str]:
    """The mixed store, plus an idle thread paused before a deferred node."""
    shapes = await build_mixed_store(saver)
    with aged(OLD_DAYS):
        await deferred_graph(saver).ainvoke({"messages": ["go"]}, thread("defer-old"))
    shapes["defer-old"] = "deferred"
    return shapes


def old_threads(shapes: dict[str, str]) -> set[str]:
    return {t for t in shapes if "old" in t or t == "org-1:user-2:session-3"}


# ------------------------------------------------------------------ SQLite


@contextlib.asynccontextmanager
async def sqlite_saver(path: Path) -> AsyncIterator[AsyncSqliteSaver]:
    """The application's saver: `AsyncSqliteSaver` with the key."""
    async with aiosqlite.connect(str(path)) as conn:
        saver = AsyncSqliteSaver(conn, serde=encrypted())
        await saver.setup()
        yield saver


def sqlite_keys(path: Path) -> list[Key]:
    with sqlite3.connect(path) as con:
        return list(con.execute("SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints"))


async def read_back(path: Path, shapes: dict[str, str]) -> tuple[dict[Key, Any], dict[str, Any]]:
    """Every checkpoint and every surviving thread's state, read with the key."""
    keys = sqlite_keys(path)
    alive = {t for t, _, _ in keys}
    async with sqlite_saver(path) as saver:
        return await read_all(saver, keys), await states(
            saver, {t: s for t, s in shapes.items() if t in alive}
        )


async def sweep_sqlite(path: Path, policies: str, key: str | None) -> SweepReport:
    """One sweep as the CLI runs it, with `encryption_key` in the config or not."""
    key_line = f"    encryption_key: {key}\n" if key else ""
    cfg = load_config_text(
        f"stores:\n  - name: app\n    kind: sqlite\n    path: {path}\n{key_line}"
        f"defaults: {{max_delete_fraction: 1.0}}\npolicies:\n{policies}\n"
    )
    settings = cfg.store_settings("app")
    engine = make_engine(cfg.store("app"), settings)
    await engine.open()
    try:
        return await sweep(
            engine,
            cfg.policies_for("app"),
            SweepOptions(settings=settings, max_delete_fraction=cfg.defaults.max_delete_fraction),
        )
    finally:
        await engine.close()


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("encrypted") / "template.db"

    async def fill() -> dict[str, str]:
        async with sqlite_saver(path) as saver:
            return await build(saver)

    shapes = asyncio.run(fill())
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # Encrypted for real: no checkpoint is plain msgpack.
        assert {t for (t,) in con.execute("SELECT DISTINCT type FROM checkpoints")} == {
            "msgpack+aes"
        }
    return path, shapes


@pytest.fixture
def store(
    tmp_path: Path, sqlite_template: tuple[Path, dict[str, str]]
) -> tuple[Path, dict[str, str]]:
    template, shapes = sqlite_template
    path = tmp_path / "store.db"
    shutil.copy(template, path)
    return path, shapes


async def test_without_key_a_head_that_may_wait_is_kept_as_undecodable(
    store: tuple[Path, dict[str, str]],
) -> None:
    path, shapes = store
    before = await read_back(path, shapes)
    report = await sweep_sqlite(path, EXPIRE, key=None)
    assert report.outcome is Outcome.SUCCESS
    # Nothing expires: a finished run cannot be told from a static breakpoint.
    assert await read_back(path, shapes) == before
    assert report.policies["idle"].deleted.threads == 0
    old = old_threads(shapes)
    assert report.policies["idle"].skipped == {
        "interrupted": len(SHOWN),
        "undecodable": len(old - SHOWN),
    }


async def test_with_key_finished_threads_expire_and_waiting_ones_stay(
    store: tuple[Path, dict[str, str]],
) -> None:
    path, shapes = store
    before_rows, before_states = await read_back(path, shapes)
    report = await sweep_sqlite(path, EXPIRE, key=KEY)
    old = old_threads(shapes)
    left = {t for t, _, _ in sqlite_keys(path)}
    assert left == set(shapes) - (old - SHOWN - HIDDEN)
    assert report.policies["idle"].deleted.threads == len(old - SHOWN - HIDDEN)
    assert report.policies["idle"].skipped == {"interrupted": len(SHOWN | HIDDEN)}
    rows, after_states = await read_back(path, shapes)
    assert rows == {k: v for k, v in before_rows.items() if k[0] in left}
    assert after_states == {t: s for t, s in before_states.items() if t in left}


async def test_without_key_interrupted_expire_expires_without_decoding(
    store: tuple[Path, dict[str, str]],
) -> None:
    path, shapes = store
    before_rows, before_states = await read_back(path, shapes)
    report = await sweep_sqlite(
        path, "  - {name: idle, expire_after: 30d, interrupted: expire}", key=None
    )
    old = old_threads(shapes)
    left = {t for t, _, _ in sqlite_keys(path)}
    assert left == set(shapes) - old
    assert report.policies["idle"].deleted.threads == len(old)
    assert not report.policies["idle"].skipped
    rows, after_states = await read_back(path, shapes)
    assert rows == {k: v for k, v in before_rows.items() if k[0] in left}
    assert after_states == {t: s for t, s in before_states.items() if t in left}


# ------------------------------------------------------------------ Postgres


@pytest.fixture(scope="module")
def pg_template(pg_server: PgServer) -> Iterator[tuple[str, dict[str, str]]]:
    dbs = Databases(pg_server, "encrypted_template")
    dsn = dbs.create()

    async def fill() -> dict[str, str]:
        async with pg_saver(dsn, serde=encrypted()) as saver:
            return await build(saver)

    yield dsn, asyncio.run(fill())
    dbs.drop_all()


async def pg_read_back(dsn: str, shapes: dict[str, str]) -> tuple[dict[Key, Any], dict[str, Any]]:
    keys = await all_keys(dsn)
    alive = {t for t, _, _ in keys}
    async with pg_saver(dsn, serde=encrypted()) as saver:
        return await read_all(saver, keys), await states(
            saver, {t: s for t, s in shapes.items() if t in alive}
        )


async def test_postgres_reads_waiting_without_the_key(
    pg_server: PgServer, pg_template: tuple[str, dict[str, str]]
) -> None:
    """The same rule as SQLite, where nothing needed is encrypted: no thread is undecodable."""
    template, shapes = pg_template
    dbs = Databases(pg_server, "encrypted")
    try:
        dsn = dbs.clone(template)
        before_rows, before_states = await pg_read_back(dsn, shapes)
        # The worker has no key: Postgres stores never take one to see waiting.
        report = await run_pg_sweep(dsn, EXPIRE, extra="defaults: {max_delete_fraction: 1.0}")
        old = old_threads(shapes)
        left = {t for t, _, _ in await all_keys(dsn)}
        assert left == set(shapes) - (old - SHOWN - HIDDEN)
        assert report.policies["idle"].skipped == {"interrupted": len(SHOWN | HIDDEN)}
        rows, after_states = await pg_read_back(dsn, shapes)
        assert rows == {k: v for k, v in before_rows.items() if k[0] in left}
        assert after_states == {t: s for t, s in before_states.items() if t in left}
    finally:
        dbs.drop_all()
