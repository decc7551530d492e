"""Postgres stores written by the real `AsyncPostgresSaver`, their copies, and ways to compare them.

Graph shapes come from `scenarios` (the SQLite tests use the same ones). This
module adds what is specific to Postgres: a saver on a DSN, throwaway
databases copied with `CREATE DATABASE ... TEMPLATE`, full table dumps, the
orphan queries, bulk replication of a real thread, running a sweep or the CLI
on a `kind: postgres` store, and an application process that forks threads
while a sweep runs (run this file: `python -m helpers.pg_scenarios fork ...`; the
process that writes turns is `helpers/live_writer.py`, for either backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import operator
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypedDict

import asyncpg
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.graph import START, StateGraph

from helpers import scenarios
from helpers.pgserver import PgServer, PgServerError, unique_db_name
from policies.config import Config
from policies.ids import checkpoint_time
from worker.service.config_files import load_config_text
from worker.service.demo import thread
from worker.sweep import SweepReport

TESTS = Path(__file__).resolve().parents[1]

Key = tuple[str, str, str]
TABLES = ("checkpoints", "checkpoint_writes", "checkpoint_blobs")
PRIMARY_KEYS = {
    "checkpoints": "thread_id, checkpoint_ns, checkpoint_id",
    "checkpoint_writes": "thread_id, checkpoint_ns, checkpoint_id, task_id, idx",
    "checkpoint_blobs": "thread_id, checkpoint_ns, channel, version",
}


# ------------------------------------------------------------------ savers and databases


@contextlib.asynccontextmanager
async def pg_saver(
    dsn: str, serde: SerializerProtocol | None = None
) -> AsyncIterator[AsyncPostgresSaver]:
    """The real saver on `dsn` (with `serde`, e.g. an `EncryptedSerializer`), tables created."""
    async with AsyncPostgresSaver.from_conn_string(dsn, serde=serde) as saver:
        await saver.setup()
        yield saver


def db_name(dsn: str) -> str:
    """The database a URL DSN names."""
    return dsn.rsplit("/", 1)[1].split("?", 1)[0]


class Databases:
    """Extra databases of one test or module, dropped by `drop_all()`.

    `collation` is the default collation of the databases `create` makes (a
    key of `pgserver.COLLATIONS`); a clone keeps its template's.
    """

    def __init__(self, server: PgServer, hint: str = "", collation: str = "c") -> None:
        self.server = server
        self.hint = hint
        self.collation = collation
        self.names: list[str] = []

    def create(self) -> str:
        """A fresh empty database; returns its DSN."""
        name = unique_db_name(self.hint)
        self.names.append(name)
        return self.server.create_database(name, self.collation)

    def clone(self, source_dsn: str) -> str:
        """An exact copy of `source_dsn`'s database (no one may be connected to it)."""
        name = unique_db_name(self.hint)
        source = db_name(source_dsn)
        for attempt in range(50):
            try:
                self.server.psql(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
                break
            except PgServerError as e:
                # A client that just disconnected may linger a moment in the server.
                if "being accessed by other users" not in str(e) or attempt == 49:
                    raise
                time.sleep(0.1)
        self.names.append(name)
        return self.server.dsn(name)

    def drop_all(self) -> None:
        self.server.ensure_running()
        for name in self.names:
            self.server.drop_database(name)
        self.names.clear()


# ------------------------------------------------------------------ reading the tables


@contextlib.asynccontextmanager
async def connect(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


# Every session on the database but the asking one. A backend reports its
# pending statistics as it exits, before it leaves pg_stat_activity.
OTHER_SESSIONS_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


async def sessions_gone(dsn: str, timeout: float = 30.0) -> None:
    """Wait (at most `timeout` s) until no other session is connected to `dsn`'s database.

    Then every count those sessions took is in `pg_stat_user_tables`: nothing
    reported late can change it any more.
    """
    deadline = time.monotonic() + timeout
    async with connect(dsn) as conn:
        while (left := await conn.fetchval(OTHER_SESSIONS_SQL)) > 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"{left} sessions still on {db_name(dsn)} after {timeout:g} s")
            await asyncio.sleep(0.05)


async def all_keys(dsn: str) -> list[Key]:
    """(thread, namespace, checkpoint id) of every checkpoint row."""
    async with connect(dsn) as conn:
        rows = await conn.fetch(
            "SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints ORDER BY 1, 2, 3"
        )
    return [(r[0], r[1], r[2]) for r in rows]


async def ns_counts(dsn: str) -> Counter[tuple[str, str]]:
    """Checkpoints per (thread, namespace)."""
    return Counter((t, ns) for t, ns, _ in await all_keys(dsn))


# Byte-exact, whatever the database's collation (a range in ICU order is not a prefix).
THREAD_COUNTS_SQL = (
    "SELECT thread_id, COUNT(*) FROM checkpoints WHERE starts_with(thread_id, $1) GROUP BY 1"
)


async def thread_counts(dsn: str, prefix: str = "") -> dict[str, int]:
    """Checkpoints per thread (all namespaces) of the threads starting with `prefix`."""
    async with connect(dsn) as conn:
        rows = await conn.fetch(THREAD_COUNTS_SQL, prefix)
    return {r[0]: r[1] for r in rows}


async def table_counts(dsn: str) -> dict[str, int]:
    async with connect(dsn) as conn:
        return {t: await conn.fetchval(f"SELECT COUNT(*) FROM {t}") for t in TABLES}


async def dump(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the three tables, all columns, in primary-key order (JSONB as text)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with connect(dsn) as conn:
        for table in TABLES:
            rows = await conn.fetch(f"SELECT * FROM {table} ORDER BY {PRIMARY_KEYS[table]}")
            out[table] = [tuple(r.items()) for r in rows]
    return out


UNREFERENCED_BLOBS_SQL = """
SELECT b.thread_id, b.checkpoint_ns, b.channel, b.version FROM checkpoint_blobs b
WHERE NOT EXISTS (
    SELECT 1 FROM checkpoints c
    WHERE c.thread_id = b.thread_id AND c.checkpoint_ns = b.checkpoint_ns
    AND c.checkpoint -> 'channel_versions' ->> b.channel = b.version
)
ORDER BY 1, 2, 3, 4
"""
ORPHAN_WRITES_SQL = """
SELECT DISTINCT w.thread_id, w.checkpoint_ns, w.checkpoint_id FROM checkpoint_writes w
WHERE NOT EXISTS (
    SELECT 1 FROM checkpoints c
    WHERE c.thread_id = w.thread_id AND c.checkpoint_ns = w.checkpoint_ns
    AND c.checkpoint_id = w.checkpoint_id
)
ORDER BY 1, 2, 3
"""
MISSING_PARENTS_SQL = """
SELECT c.thread_id, c.checkpoint_ns, c.checkpoint_id FROM checkpoints c
WHERE c.parent_checkpoint_id IS NOT NULL AND NOT EXISTS (
    SELECT 1 FROM checkpoints p
    WHERE p.thread_id = c.thread_id AND p.checkpoint_ns = c.checkpoint_ns
    AND p.checkpoint_id = c.parent_checkpoint_id
)
ORDER BY 1, 2, 3
"""
BLOB_KEYS_SQL = "SELECT thread_id, checkpoint_ns, channel, version FROM checkpoint_blobs"
REFERENCED_SQL = """
SELECT DISTINCT c.thread_id, c.checkpoint_ns, v.key, v.value FROM checkpoints c
CROSS JOIN LATERAL jsonb_each_text(c.checkpoint -> 'channel_versions') AS v
"""
BlobKey = tuple[str, str, str, str]


async def orphans(dsn: str, threads: Collection[str] | None = None) -> dict[str, list[Any]]:
    """What no sweep may leave behind (on `threads`, default all), by kind.

    `unreferenced_blobs`: blobs no checkpoint of their (thread, namespace)
    references (a sweep must collect them once the thread is quiet);
    `orphan_writes`: writes whose checkpoint is gone; `missing_parents`:
    parent ids naming a deleted checkpoint (they must be NULL).
    """
    async with connect(dsn) as conn:
        found = {
            name: [tuple(r) for r in await conn.fetch(sql)]
            for name, sql in (
                ("unreferenced_blobs", UNREFERENCED_BLOBS_SQL),
                ("orphan_writes", ORPHAN_WRITES_SQL),
                ("missing_parents", MISSING_PARENTS_SQL),
            )
        }
    if threads is not None:
        wanted = set(threads)
        found = {k: [r for r in rows if r[0] in wanted] for k, rows in found.items()}
    return found


NO_ORPHANS = {"unreferenced_blobs": [], "orphan_writes": [], "missing_parents": []}


async def blob_keys(dsn: str) -> set[BlobKey]:
    """Every blob row's key."""
    async with connect(dsn) as conn:
        return {(r[0], r[1], r[2], r[3]) for r in await conn.fetch(BLOB_KEYS_SQL)}


async def lost_blobs(dsn: str, before: set[BlobKey]) -> set[BlobKey]:
    """Blobs that existed in `before`, are referenced by a checkpoint now, and are gone.

    (A checkpoint references versions of channels that had no value, which
    never had a blob row: only blobs that were there count.)
    """
    async with connect(dsn) as conn:
        referenced = {(r[0], r[1], r[2], r[3]) for r in await conn.fetch(REFERENCED_SQL)}
    return (referenced & before) - await blob_keys(dsn)


def quiet_threads(keys: Iterable[Key], now: float, grace: float = 3600.0) -> set[str]:
    """Threads whose newest checkpoint (by its id's time) is older than `grace` at `now`."""
    newest: dict[str, float] = {}
    for tid, _, cid in keys:
        t = checkpoint_time(cid)
        if t is not None:
            newest[tid] = max(newest.get(tid, t), t)
    return {tid for tid, t in newest.items() if now - t > grace}


# ------------------------------------------------------------------ bulk


REPLICATE_SQL = (
    """
    INSERT INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id,
                             type, checkpoint, metadata)
    SELECT p || c.thread_id, c.checkpoint_ns, c.checkpoint_id, c.parent_checkpoint_id,
           c.type, c.checkpoint, c.metadata
    FROM checkpoints c CROSS JOIN unnest($1::text[]) AS p WHERE c.thread_id = $2
    """,
    """
    INSERT INTO checkpoint_writes (thread_id, checkpoint_ns, checkpoint_id, task_id, task_path,
                                   idx, channel, type, blob)
    SELECT p || w.thread_id, w.checkpoint_ns, w.checkpoint_id, w.task_id, w.task_path,
           w.idx, w.channel, w.type, w.blob
    FROM checkpoint_writes w CROSS JOIN unnest($1::text[]) AS p WHERE w.thread_id = $2
    """,
    """
    INSERT INTO checkpoint_blobs (thread_id, checkpoint_ns, channel, version, type, blob)
    SELECT p || b.thread_id, b.checkpoint_ns, b.channel, b.version, b.type, b.blob
    FROM checkpoint_blobs b CROSS JOIN unnest($1::text[]) AS p WHERE b.thread_id = $2
    """,
)


async def replicate(dsn: str, template: str, prefixes: Sequence[str], drop: bool = True) -> None:
    """Copy thread `template`'s real rows (all three tables) under `prefix + template`.

    A fast way to a large store whose every row was written by the real saver.
    With `drop`, the template thread itself is deleted afterwards.
    """
    async with connect(dsn) as conn, conn.transaction():
        for sql in REPLICATE_SQL:
            await conn.execute(sql, list(prefixes), template)
        if drop:
            for table in TABLES:
                await conn.execute(f"DELETE FROM {table} WHERE thread_id = $1", template)
    async with connect(dsn) as conn:
        await conn.execute("VACUUM ANALYZE")


# ------------------------------------------------------------------ graphs


class ForkState(TypedDict):
    """A chat with a second list channel, so a fork can leave `messages` as it was."""

    messages: Annotated[list[str], operator.add]
    notes: Annotated[list[str], operator.add]


def fork_graph(checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """START -> reply -> END, appending to `messages` only.

    `aupdate_state(old, {"notes": [...]}, as_node="reply")` makes a checkpoint
    that references the old checkpoint's `messages` blob version.
    """
    g = StateGraph(ForkState)
    g.add_node("reply", lambda s: {"messages": [f"reply to {s['messages'][-1]}"]})
    g.add_edge(START, "reply")
    return g.compile(checkpointer=checkpointer)


# ------------------------------------------------------------------ running the worker


def store_yaml(dsn: str, store_extra: str = "") -> str:
    """The `stores:` section naming `dsn` as store `pg`."""
    return f"stores:\n  - name: pg\n    kind: postgres\n    dsn: '{dsn}'\n{store_extra}"


def pg_config(policies_yaml: str, dsn: str, extra: str = "", store_extra: str = "") -> Config:
    return load_config_text(f"{store_yaml(dsn, store_extra)}{extra}\npolicies:\n{policies_yaml}\n")


async def run_pg_sweep(
    dsn: str,
    policies_yaml: str,
    *,
    now: float | None = None,
    dry_run: bool = False,
    extra: str = "",
    store_extra: str = "",
    allow_mass_expiry: bool = False,
    residue_check_every: float = 0.0,
) -> SweepReport:
    """One sweep of store `pg` on `dsn`, as the CLI runs it (by default every sweep looks
    at every quiet thread's residue)."""
    # Imported here: helpers.backends imports this module.
    from helpers.backends import sweep_config

    return await sweep_config(
        pg_config(policies_yaml, dsn, extra, store_extra),
        "pg",
        now,
        dry_run=dry_run,
        allow_mass_expiry=allow_mass_expiry,
        residue_check_every=residue_check_every,
    )


def write_config(path: Path, dsn: str, policies: str, extra: str = "") -> Path:
    """A config file for store `pg` on `dsn`, JSON logs at debug level."""
    path.write_text(
        f"{store_yaml(dsn)}{extra}\npolicies:\n{policies}\n"
        "logging: {format: json, level: debug}\n"
    )
    return path


def cli(
    *args: str,
    config: Path | None = None,
    input: str | None = None,
    env: dict[str, str] | None = None,
    terminal: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`scenarios.cli` with room for the slower Postgres commands."""
    return scenarios.cli(*args, config=config, input=input, env=env, timeout=300, terminal=terminal)


def once(cfg: Path, *extra: str) -> subprocess.Popen[str]:
    """`python -m worker --config CFG once`, started, not waited for."""
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "--config", str(cfg), "once", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=TESTS.parent,
    )


def json_events(stderr: str) -> list[dict[str, Any]]:
    """The structured log lines of a CLI run."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def app_process(*args: str) -> subprocess.Popen[bytes]:
    """This file run as an application process (`fork`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "helpers.pg_scenarios", *args],
        env={**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}"},
    )


# ------------------------------------------------------------------ application processes


async def _fork(dsn: str, out: str, threads: list[str]) -> None:
    """Fork each thread from its oldest finished turn; record each fork as it reads back.

    For each thread: find the oldest checkpoint with messages and nothing to
    run, and `aupdate_state` it with a note, which leaves the fork referencing
    that checkpoint's `messages` blob version. A thread whose old checkpoint a
    sweep deleted first is counted as `gone`.
    """
    forks: list[dict[str, Any]] = []
    gone: list[str] = []
    errors: list[str] = []
    async with AsyncPostgresSaver.from_conn_string(dsn) as saver:
        app = fork_graph(saver)
        for tid in threads:
            try:
                history = [s async for s in app.aget_state_history(thread(tid))]
                old = [s for s in history if s.values.get("messages") and not s.next]
                if len(old) < 2:
                    gone.append(tid)
                    continue
                base = old[-1]
                base_tuple = await saver.aget_tuple(base.config)
                if base_tuple is None:
                    gone.append(tid)
                    continue
                cfg = await app.aupdate_state(base.config, {"notes": [f"fork of {tid}"]}, "reply")
                state = await app.aget_state(cfg)
                tup = await saver.aget_tuple(cfg)
                assert tup is not None
                forks.append(
                    {
                        "thread_id": tid,
                        "at": time.time(),
                        # LangGraph forks a base deleted since the check above from an
                        # empty checkpoint: such a fork references nothing of the base.
                        "from_deleted": "messages" not in tup.checkpoint["channel_versions"],
                        "config": cfg,
                        "base": base.config["configurable"]["checkpoint_id"],
                        "values": state.values,
                        "next": list(state.next),
                        "channel_values": repr(sorted(tup.checkpoint["channel_values"].items())),
                        "channel_versions": tup.checkpoint["channel_versions"],
                        "base_versions": base_tuple.checkpoint["channel_versions"],
                    }
                )
            except Exception as e:  # recorded: the test asserts there are none
                errors.append(f"{tid}: {type(e).__name__}: {e}")
    Path(out).write_text(json.dumps({"forks": forks, "gone": gone, "errors": errors}))


if __name__ == "__main__":
    mode, dsn_arg = sys.argv[1], sys.argv[2]
    if mode == "fork":
        asyncio.run(_fork(dsn_arg, sys.argv[3], sys.argv[4:]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
