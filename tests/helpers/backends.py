"""One adapter per store backend, so that a scenario is written once and runs on each.

A test that asks for the `backend` fixture (tests/conftest.py) runs on SQLite,
Postgres with the C collation and Postgres with ICU. A store is named by a
string: a file path (SQLite) or a DSN (Postgres). The adapter builds stores
(`stores()`: empty or copied), opens the real saver on one, runs a sweep as the
CLI runs it, and reads the tables back. What only one backend has (blobs) is
a capability (`has_blobs`), not a branch on the name in the tests.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import re
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from helpers import pg_scenarios as pg
from helpers import scenarios
from helpers.pgserver import COLLATIONS, PgServer
from helpers.scenarios import read_all, states
from policies.config import Config
from worker.service.config_files import load_config_text
from worker.service.demo import aged
from worker.stores import make_engine
from worker.stores.engine import StoreEngine
from worker.sweep import SweepOptions, SweepReport, sweep

BACKENDS = ["sqlite", *(f"postgres-{c}" for c in sorted(COLLATIONS))]
"""What a `backend` test runs on: SQLite, and Postgres with each default collation."""
Key = tuple[str, str, str]
BlobKey = tuple[str, str, str, str]
ROLES = ("checkpoints", "writes", "blobs")
"""The tables a store has, by role (Postgres calls writes `checkpoint_writes`)."""

# The Postgres orphan queries are plain SQL that SQLite runs too; only the writes table's
# name differs.
SQLITE_ORPHAN_WRITES_SQL = pg.ORPHAN_WRITES_SQL.replace("checkpoint_writes", "writes")
SQLITE_MISSING_PARENTS_SQL = pg.MISSING_PARENTS_SQL
# The three below are formatted, not bound: thread ids in these tests are plain text
# without quotes, and one text then serves both dialects (`?` against `$1`).
COUNT_ROWS_SQL = "SELECT COUNT(*) FROM {table}"
NAMESPACES_SQL = "SELECT DISTINCT checkpoint_ns FROM {table} WHERE thread_id = '{thread_id}'"
ROWS_OUTSIDE_SQL = "SELECT COUNT(*) FROM {table} WHERE thread_id NOT IN ({listed})"
# Both below read the same in either dialect.
# Each thread's newest checkpoint id: the head a sweep must never delete.
HEADS_SQL = "SELECT thread_id, MAX(checkpoint_id) FROM checkpoints GROUP BY 1"
# Checkpoints per thread, all namespaces.
PER_THREAD_SQL = "SELECT thread_id, COUNT(*) FROM checkpoints GROUP BY 1"

# Formatted with a saver table's name. The key columns lead: sorted rows are in key order.
SQLITE_DUMP_SQL = "SELECT * FROM {table}"
# Formatted with one of our two fixed table names; the thread id is bound.
SQLITE_DELETE_THREAD_SQL = "DELETE FROM {table} WHERE thread_id = ?"


class Stores(abc.ABC):
    """The stores of one test or module on one backend, removed by `close()`."""

    @abc.abstractmethod
    def create(self) -> str:
        """A fresh empty store; returns its name (path or DSN)."""
        raise NotImplementedError

    @abc.abstractmethod
    def clone(self, source: str) -> str:
        """An exact copy of `source` (no one may be writing to it)."""
        raise NotImplementedError

    @abc.abstractmethod
    def close(self) -> None:
        """Remove every store made here."""
        raise NotImplementedError


class Backend(abc.ABC):
    """What a backend-parametrised test needs of a backend; see the module docstring."""

    name: str
    kind: str
    has_blobs: bool

    @abc.abstractmethod
    def stores(self, hint: str) -> Stores:
        """A fresh set of stores; `hint` names them (test or module name)."""
        raise NotImplementedError

    @abc.abstractmethod
    def saver(self, store: str) -> contextlib.AbstractAsyncContextManager[BaseCheckpointSaver[Any]]:
        """The real async LangGraph saver on `store`, tables created."""
        raise NotImplementedError

    @abc.abstractmethod
    def store_yaml(self, store: str, store_extra: str = "") -> str:
        """The `stores:` section naming `store` as store `app` (`store_extra`: more of its
        lines, indented four spaces)."""
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def engine(self, store: str) -> AsyncIterator[StoreEngine]:
        """The worker's engine on `store` (store `app`), open, as the CLI makes it."""
        cfg = self.config(store, "  - {name: any, keep_last: 1}")
        opened = make_engine(cfg.store("app"), cfg.store_settings("app"))
        await opened.open()
        try:
            yield opened
        finally:
            await opened.close()

    @abc.abstractmethod
    async def all_keys(self, store: str) -> list[Key]:
        """(thread, namespace, checkpoint id) of every checkpoint row, sorted."""
        raise NotImplementedError

    @abc.abstractmethod
    async def rows(self, store: str, sql: str) -> list[tuple[Any, ...]]:
        """The rows of a query in the backend's own dialect."""
        raise NotImplementedError

    @abc.abstractmethod
    async def orphans(self, store: str) -> dict[str, list[Any]]:
        """`unreferenced_blobs`, `orphan_writes`, `missing_parents` (as `pg_scenarios.orphans`)."""
        raise NotImplementedError

    async def blob_keys(self, store: str) -> set[BlobKey]:
        """Every blob row's key (none without blobs)."""
        return set()

    async def lost_blobs(self, store: str, before: set[BlobKey]) -> set[BlobKey]:
        """Blobs in `before` that a checkpoint references now and that are gone."""
        return set()

    @abc.abstractmethod
    async def raw(self, store: str) -> Any:
        """Everything the store holds, to compare for `==` (a dry run changes none of it)."""
        raise NotImplementedError

    @abc.abstractmethod
    async def dump(self, store: str) -> dict[str, list[tuple[tuple[str, Any], ...]]]:
        """Every row of the saver's tables, by role (`ROLES`, those the backend has), in
        primary-key order, each row as its (column, value) pairs."""
        raise NotImplementedError

    @abc.abstractmethod
    def table(self, role: str) -> str:
        """The table of `role` (one of `ROLES`)."""
        raise NotImplementedError

    @abc.abstractmethod
    async def replicate(self, store: str, template: str, prefixes: list[str]) -> None:
        """Copy thread `template`'s real rows under `prefix + template` for each prefix,
        then delete the template thread: a large store every row of which the real saver
        wrote."""
        raise NotImplementedError

    @abc.abstractmethod
    async def check_integrity(self, store: str) -> None:
        """Fail if the store's own consistency check fails (where the backend has one)."""

    async def heads(self, store: str) -> dict[str, str]:
        """Each thread's newest checkpoint id."""
        return {r[0]: r[1] for r in await self.rows(store, HEADS_SQL)}

    async def per_thread(self, store: str) -> dict[str, int]:
        """Checkpoints per thread."""
        return {r[0]: int(r[1]) for r in await self.rows(store, PER_THREAD_SQL)}

    async def ns_counts(self, store: str) -> Counter[tuple[str, str]]:
        """Checkpoints per (thread, namespace)."""
        return Counter((t, ns) for t, ns, _ in await self.all_keys(store))

    async def table_counts(self, store: str) -> dict[str, int]:
        """Rows per role (`blobs` is 0 without blobs)."""
        out = {}
        for role in ROLES:
            if role == "blobs" and not self.has_blobs:
                out[role] = 0
                continue
            sql = COUNT_ROWS_SQL.format(table=self.table(role))
            out[role] = int((await self.rows(store, sql))[0][0])
        return out

    async def namespaces(self, store: str, role: str, thread_id: str) -> set[str]:
        """The namespaces `thread_id` has rows under in the table of `role`."""
        if role == "blobs" and not self.has_blobs:
            return set()
        assert "'" not in thread_id
        sql = NAMESPACES_SQL.format(table=self.table(role), thread_id=thread_id)
        return {r[0] for r in await self.rows(store, sql)}

    async def rows_outside(self, store: str, role: str, threads: Collection[str]) -> int:
        """Rows of the table of `role` whose thread is not one of `threads`."""
        if role == "blobs" and not self.has_blobs:
            return 0
        names = sorted(threads)
        assert all("'" not in t for t in names)
        listed = ", ".join(f"'{t}'" for t in names) or "''"
        sql = ROWS_OUTSIDE_SQL.format(table=self.table(role), listed=listed)
        return int((await self.rows(store, sql))[0][0])

    def config(self, store: str, policies_yaml: str, extra: str = "") -> Config:
        """The config of store `app` on `store` with these policies."""
        return load_config_text(f"{self.store_yaml(store)}{extra}\npolicies:\n{policies_yaml}\n")

    async def run_sweep(
        self,
        store: str,
        policies_yaml: str,
        *,
        extra: str = "",
        now: float | None = None,
        **options: Any,
    ) -> SweepReport:
        """One sweep of `store` (store `app`) as the CLI runs it; `options` as `sweep_config`."""
        return await sweep_config(self.config(store, policies_yaml, extra), "app", now, **options)


async def sweep_config(
    cfg: Config, name: str, now: float | None = None, **options: Any
) -> SweepReport:
    """One sweep of store `name` of `cfg`, as the CLI runs it. `options`: `SweepOptions`
    fields besides the config's batch settings and `max_delete_fraction` (by default every
    sweep looks at every quiet thread's residue)."""
    settings = cfg.store_settings(name)
    engine = make_engine(cfg.store(name), settings)
    await engine.open()
    try:
        return await sweep(
            engine,
            cfg.policies_for(name),
            SweepOptions(
                settings=settings,
                max_delete_fraction=cfg.defaults.max_delete_fraction,
                **options,
            ),
            now=now,
        )
    finally:
        await engine.close()


# ------------------------------------------------------------------ SQLite


class SqliteStores(Stores):
    """Store files in a temporary folder of their own."""

    def __init__(self, hint: str) -> None:
        stem = re.sub(r"[^A-Za-z0-9_]+", "_", hint)[:40]
        self.folder = Path(tempfile.mkdtemp(prefix=f"janitor-{stem}-"))
        self.made = 0

    def _next(self) -> Path:
        self.made += 1
        return self.folder / f"store-{self.made}.db"

    def create(self) -> str:
        return str(self._next())

    def clone(self, source: str) -> str:
        # The WAL is folded into the file first: a copy of the file alone is then whole.
        with contextlib.closing(sqlite3.connect(source)) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        target = self._next()
        shutil.copy(source, target)
        return str(target)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class SqliteBackend(Backend):
    """A store file written by `AsyncSqliteSaver`."""

    name = "sqlite"
    kind = "sqlite"
    has_blobs = False

    def stores(self, hint: str) -> Stores:
        return SqliteStores(hint)

    def saver(self, store: str) -> contextlib.AbstractAsyncContextManager[BaseCheckpointSaver[Any]]:
        return AsyncSqliteSaver.from_conn_string(store)

    def store_yaml(self, store: str, store_extra: str = "") -> str:
        return f"stores:\n  - name: app\n    kind: sqlite\n    path: {store}\n{store_extra}"

    def table(self, role: str) -> str:
        return {"checkpoints": "checkpoints", "writes": "writes"}[role]

    async def rows(self, store: str, sql: str) -> list[tuple[Any, ...]]:
        # A sweep may hold the write lock for a batch: wait for it as an application would.
        with contextlib.closing(sqlite3.connect(store, timeout=10)) as con:
            return [tuple(r) for r in con.execute(sql)]

    async def replicate(self, store: str, template: str, prefixes: list[str]) -> None:
        scenarios.replicate(store, template, prefixes)
        with contextlib.closing(sqlite3.connect(store)) as con, con:
            for table in ("checkpoints", "writes"):
                con.execute(SQLITE_DELETE_THREAD_SQL.format(table=table), (template,))

    async def check_integrity(self, store: str) -> None:
        assert (await self.rows(store, "PRAGMA integrity_check"))[0][0] == "ok"

    async def all_keys(self, store: str) -> list[Key]:
        sql = "SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints ORDER BY 1, 2, 3"
        return [(r[0], r[1], r[2]) for r in await self.rows(store, sql)]

    async def orphans(self, store: str) -> dict[str, list[Any]]:
        return {
            "unreferenced_blobs": [],
            "orphan_writes": await self.rows(store, SQLITE_ORPHAN_WRITES_SQL),
            "missing_parents": await self.rows(store, SQLITE_MISSING_PARENTS_SQL),
        }

    async def raw(self, store: str) -> Any:
        return Path(store).read_bytes()

    async def dump(self, store: str) -> dict[str, list[tuple[tuple[str, Any], ...]]]:
        out = {}
        with contextlib.closing(sqlite3.connect(store, timeout=10)) as con:
            for role in ("checkpoints", "writes"):
                cur = con.execute(SQLITE_DUMP_SQL.format(table=self.table(role)))
                names = [d[0] for d in cur.description]
                out[role] = sorted(tuple(zip(names, r, strict=True)) for r in cur)
        return out


# ------------------------------------------------------------------ Postgres


class PostgresStores(Stores):
    """Throwaway databases of one default collation (`pg_scenarios.Databases`)."""

    def __init__(self, server: PgServer, hint: str, collation: str) -> None:
        self.databases = pg.Databases(server, hint, collation)

    def create(self) -> str:
        return self.databases.create()

    def clone(self, source: str) -> str:
        return self.databases.clone(source)

    def close(self) -> None:
        self.databases.drop_all()


class PostgresBackend(Backend):
    """A database written by `AsyncPostgresSaver`, of one default collation."""

    kind = "postgres"
    has_blobs = True

    def __init__(self, server: PgServer, collation: str) -> None:
        self.server = server
        self.collation = collation
        self.name = f"postgres-{collation}"

    def stores(self, hint: str) -> Stores:
        return PostgresStores(self.server, hint, self.collation)

    def saver(self, store: str) -> contextlib.AbstractAsyncContextManager[BaseCheckpointSaver[Any]]:
        return pg.pg_saver(store)

    def store_yaml(self, store: str, store_extra: str = "") -> str:
        return f"stores:\n  - name: app\n    kind: postgres\n    dsn: '{store}'\n{store_extra}"

    def table(self, role: str) -> str:
        return {"checkpoints": "checkpoints", "writes": "checkpoint_writes"}.get(
            role, "checkpoint_blobs"
        )

    async def rows(self, store: str, sql: str) -> list[tuple[Any, ...]]:
        async with pg.connect(store) as conn:
            return [tuple(r) for r in await conn.fetch(sql)]

    async def all_keys(self, store: str) -> list[Key]:
        return await pg.all_keys(store)

    async def replicate(self, store: str, template: str, prefixes: list[str]) -> None:
        await pg.replicate(store, template, prefixes)

    async def check_integrity(self, store: str) -> None:
        # No file-level check to run: the server keeps its pages consistent through a
        # killed client (the tests check heads, orphans and reads instead).
        return None

    async def orphans(self, store: str) -> dict[str, list[Any]]:
        return await pg.orphans(store)

    async def blob_keys(self, store: str) -> set[BlobKey]:
        return await pg.blob_keys(store)

    async def lost_blobs(self, store: str, before: set[BlobKey]) -> set[BlobKey]:
        return await pg.lost_blobs(store, before)

    async def raw(self, store: str) -> Any:
        return await pg.dump(store)

    async def dump(self, store: str) -> dict[str, list[tuple[tuple[str, Any], ...]]]:
        tables = await pg.dump(store)
        return {role: tables[self.table(role)] for role in ROLES}


# ------------------------------------------------------------------ scenario stores and checks


Template = tuple[str, dict[str, str]]
"""A store built by real graphs and its threads' shapes (`scenarios.build_mixed_store`)."""
Pair = tuple[str, str, dict[str, str]]
"""Two copies of a template (one to act on, one untouched control) and the shapes."""
Snapshot = tuple[dict[Key, Any], dict[str, Any], set[BlobKey]]


def build_template(
    backend: Backend,
    made: Stores,
    builder: Callable[[BaseCheckpointSaver[Any]], Awaitable[dict[str, str]]],
) -> Template:
    """A new store in `made`, written by `builder` through the real saver (outside a loop)."""
    store = made.create()

    async def build() -> dict[str, str]:
        async with backend.saver(store) as saver:
            return await builder(saver)

    return store, asyncio.run(build())


async def snapshot(backend: Backend, store: str, shapes: dict[str, str]) -> Snapshot:
    """Every checkpoint as the saver reads it, every thread head's state, every blob key."""
    async with backend.saver(store) as saver:
        everything = await read_all(saver, await backend.all_keys(store))
        heads = await states(saver, shapes)
    return everything, heads, await backend.blob_keys(store)


async def assert_kept_unchanged(
    backend: Backend,
    store: str,
    shapes: dict[str, str],
    before: Snapshot,
    now: float | None = None,
) -> set[Key]:
    """What a sweep keeps is as it was; nothing it leaves is orphaned. Returns the deleted keys.

    - every checkpoint still there reads back equal through the saver;
    - every surviving thread's `aget_state` (subgraphs included) is equal;
    - no blob that a remaining checkpoint references went;
    - no write without its checkpoint, no parent id naming a deleted checkpoint;
    - on threads quiet past the grace period at `now` that the sweep deleted nothing
      from: no unreferenced blob (a deletion makes them wait out the grace period, for
      a fork that read a deleted checkpoint: see `test_postgres_race`).
    """
    cps, heads, blobs = before
    after_keys = set(await backend.all_keys(store))
    assert after_keys <= set(cps), "the sweep created checkpoints?"
    async with backend.saver(store) as saver:
        after = await read_all(saver, sorted(after_keys))
        changed = [k for k in after_keys if after[k] != cps[k]]
        assert not changed, f"kept checkpoints read back differently: {changed[:5]}"
        surviving = {t: s for t, s in shapes.items() if any(k[0] == t for k in after_keys)}
        after_heads = await states(saver, surviving)
    diff = {t: (heads[t], after_heads[t]) for t in surviving if heads[t] != after_heads[t]}
    assert not diff, f"thread states changed: {diff}"
    assert not await backend.lost_blobs(store, blobs), "blobs of kept checkpoints were deleted"
    found = await backend.orphans(store)
    assert found["orphan_writes"] == [], found["orphan_writes"]
    assert found["missing_parents"] == [], found["missing_parents"]
    deleted_from = {k[0] for k in set(cps) - after_keys}
    quiet = pg.quiet_threads(after_keys, time.time() if now is None else now) - deleted_from
    stray = [r for r in found["unreferenced_blobs"] if r[0] in quiet]
    assert stray == [], f"unreferenced blobs left on quiet threads: {stray[:10]}"
    return set(cps) - after_keys


async def build_bulk(
    backend: Backend,
    store: str,
    graph: Callable[[BaseCheckpointSaver[Any]], Any],
    prefix: str,
    threads: int,
    n_turns: int,
    age_days: float = 0.0,
) -> None:
    """One real thread `age_days` old, of `n_turns` turns of `graph`, replicated as
    `{prefix}{i:05d}-t` for `i` below `threads` (the thread itself then deleted)."""
    with aged(age_days):
        async with backend.saver(store) as saver:
            await scenarios.turns(graph(saver), "t", n_turns)
    await backend.replicate(store, "t", [f"{prefix}{i:05d}-" for i in range(threads)])


def old_threads(shapes: dict[str, str]) -> set[str]:
    """The mixed store's 60-day-old threads."""
    return {t for t in shapes if "old" in t or t == "org-1:user-2:session-3"}
