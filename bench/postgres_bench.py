#!/usr/bin/env python
"""Postgres benchmark for checkpoint-janitor (issue 3, "Benchmark (not a test)").

Builds a database in the real schema of langgraph-checkpoint-postgres (created
by running the real `AsyncPostgresSaver.setup()`) holding THREADS x PER_THREAD
checkpoints laid out as the saver lays them out, proves with the real
`AsyncPostgresSaver` (`aget_tuple`, `alist`) that sampled rows read back, then
times on identical copies of it (`CREATE DATABASE ... TEMPLATE base`):

  (a)      the physical limit: one set-based DELETE keeping the newest 5 per
           (thread, namespace), their writes, parents nulled, and the blobs no
           remaining checkpoint references, in ONE transaction;
  (b)      `checkpoint-janitor once` with `keep_last: 5`, then the later
           blob-collecting sweep (see "Blob GC" below), timed apart;
  (b-load) (b) while another process puts checkpoints at ~50/s with the real
           `AsyncPostgresSaver.aput` + `aput_writes` (and a baseline of that
           writer alone);
  (c)      the official `AsyncPostgresSaver.aprune(all_thread_ids,
           strategy="keep_latest")`, against
  (b')     `checkpoint-janitor once` with `keep_last: 1` and its blob GC
           sweep; both must leave the same rows in checkpoints,
           checkpoint_writes and checkpoint_blobs;
  (noop)   `checkpoint-janitor once` with nothing due (keep_last 50,
           expire_after 365d) against its limit: the per-(thread, namespace)
           GROUP BY aggregate plus the heads' metadata (issue 10), timed on
           the second sweep: the first on a copy looks at every quiet
           thread's residue (`defaults.residue_check_every`) and is reported
           beside it.

    python bench/postgres_bench.py [--threads 20000 --per-thread 50 --workdir DIR]
                                   [--dsn postgresql://user:pw@host/postgres]

Without --dsn it starts a private throwaway PostgreSQL cluster
(tests/helpers/pgserver.py) and removes it at the end. With --dsn (a superuser
connection to a maintenance database) the base database is kept and reused
when its shape matches and it is less than a day old.

The layout is what a chat graph (START -> agent) run through the real saver
leaves, turn after turn, 3 checkpoints a turn:
  input checkpoint   source "input": a `__start__` blob (the turn's input);
                     `messages` unchanged, so it shares the previous
                     checkpoint's `messages` blob;
  after `__start__`  a new `messages` blob, `branch:to:agent` inline (null),
                     `__start__` bumped to a version that has no blob;
  after `agent`      a new `messages` blob.
So about one blob per checkpoint, blobs shared between consecutive checkpoints
whose channel did not change, and every checkpoint has 2 writes (its task's
`messages` and `branch:to:agent`). JSONB is what `aput` sends
(`json.dumps` of the checkpoint without its blob values, and
`get_serializable_checkpoint_metadata`), blob and write bytes come from the
saver's own `_dump_blobs` / `_dump_writes` on templates and are reused.
Checkpoint ids are UUIDv6 minted like `langgraph.checkpoint.base.id.uuid6`
but at past times (the newest of each thread 2 to 28 days old), so every
thread is quiet for longer than the worker's blob grace period.

Blob GC: the worker collects a trimmed thread's unreferenced blobs only once
the thread has been quiet AND had no deletion for `grace_period` (a fork may
still name them; table checkpoint_janitor_deletions), so one `once` leaves the
trimmed checkpoints' blobs. (b), (b0), (b-nojit), (b') and (b-load) therefore
run, after their sweep, a second `once` with the same policy and
`grace_period: 1s` past that second (as `--only reclaim` does), report it on
its own row, and compare sweep + blob GC against (a), which deletes the blobs
in its one transaction.

Results are printed as a table and written to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from langgraph.checkpoint.base import get_serializable_checkpoint_metadata
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from report import (  # noqa: E402
    child_usage,
    cpu_model,
    fmt,
    janitor_cmd,
    log_events,
    print_table,
    print_verdict,
    print_writer_load,
    ram_gib,
    under_time,
    version,
    write_results,
)
from report import latency_stats as _latency_stats  # noqa: E402
from report import mb as _mb  # noqa: E402
from report import rounded as _r  # noqa: E402
from report import summarize_writer as _summarize_writer  # noqa: E402
from synthetic import MESSAGES, log, uuid6_at, uuid6_time  # noqa: E402

from worker.stores.postgres import connect_kwargs  # noqa: E402

BENCH_FORMAT = 1  # bump when the generated layout changes (invalidates a kept base)
KEEP_LAST = 5
DAY = 86400.0
CACHE_MAX_AGE = DAY  # the newest checkpoint of a thread is >= 2 days old when built
GRACE = 3600.0  # the worker's default defaults.batch.grace_period
LOAD_THREADS_PER_TXN = 1000  # threads per bulk-load transaction
RUN_SUFFIX = ""  # "-r2" etc. while repeating, so each repetition keeps its logs

MAX_CONVERSATION = 16  # the `messages` value grows over a thread up to this many messages
START_PATH = "~__pregel_pull, __start__"
AGENT_PATH = "~__pregel_pull, agent"
BRANCH = "branch:to:agent"


class Templates:
    """Bytes the saver's own serializer produced for template values, reused for every row."""

    def __init__(self, saver: AsyncPostgresSaver) -> None:
        self.serde = saver.serde
        conv = [MESSAGES[i % len(MESSAGES)] for i in range(MAX_CONVERSATION)]
        # `messages` blobs: the conversation's first L messages (L = 1..16).
        self.messages: dict[int, list[str]] = {n: conv[:n] for n in range(1, MAX_CONVERSATION + 1)}
        self.messages_blob: dict[int, tuple[str, bytes]] = {}
        for n, value in self.messages.items():
            row = saver._dump_blobs("t", "", {"messages": value}, {"messages": "1"})[0]
            self.messages_blob[n] = (row[4], row[5])
        # `__start__` blobs: the turn's input.
        self.start: dict[int, dict[str, Any]] = {
            m: {"messages": [MESSAGES[m]]} for m in range(len(MESSAGES))
        }
        self.start_blob: dict[int, tuple[str, bytes]] = {}
        for m, value in self.start.items():
            row = saver._dump_blobs("t", "", {"__start__": value}, {"__start__": "1"})[0]
            self.start_blob[m] = (row[4], row[5])
        # The two writes of a task, by (task path, message index): (idx, channel, type, blob).
        self.writes: dict[tuple[str, int], list[tuple[int, str, str, bytes]]] = {}
        self.write_values: dict[int, list[tuple[str, Any]]] = {}
        for m in range(len(MESSAGES)):
            values = [("messages", [MESSAGES[m]]), (BRANCH, None)]
            self.write_values[m] = values
            for path in (START_PATH, AGENT_PATH):
                rows = saver._dump_writes("t", "", "c", "task", path, values)
                self.writes[(path, m)] = [(r[5], r[6], r[7], r[8]) for r in rows]

    def conversation_length(self, i: int, per_thread: int) -> int:
        return 1 + min(MAX_CONVERSATION - 1, i * MAX_CONVERSATION // max(per_thread, 1))


@dataclass(slots=True)
class ThreadRows:
    thread_id: str
    checkpoint_rows: list[tuple[Any, ...]]
    blob_rows: list[tuple[Any, ...]]
    write_rows: list[tuple[Any, ...]]
    # Filled only when asked for (read-back checks): what aget_tuple must return.
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    metadatas: list[dict[str, Any]] = field(default_factory=list)
    writes: list[list[tuple[str, str, Any]]] = field(default_factory=list)
    blob_keys: list[set[tuple[str, str]]] = field(default_factory=list)  # blobs each references


def _thread_times(rng: random.Random, per_thread: int, now: float) -> list[float]:
    """Checkpoint times oldest first: newest 2 to 28 days old, 10 s to 40 min apart."""
    newest = now - rng.uniform(2 * DAY, 28 * DAY)
    times = [newest]
    for _ in range(per_thread - 1):
        times.append(times[-1] - rng.uniform(10, 2400))
    times.reverse()
    return times


def gen_thread(
    thread_id: str, per_thread: int, now: float, tpl: Templates, expected: bool = False
) -> ThreadRows:
    """One thread's rows, deterministic in (thread_id, per_thread, now)."""
    rng = random.Random(f"thread:{thread_id}")
    times = _thread_times(rng, per_thread, now)
    node = rng.getrandbits(48)
    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    out = ThreadRows(thread_id, [], [], [])
    versions: dict[str, str] = {}
    seen: dict[str, dict[str, str]] = {"__input__": {}}
    blob_values: dict[tuple[str, str], Any] = {}  # only kept when `expected`
    blob_keys: set[tuple[str, str]] = set()
    parent: str | None = None
    for i, t in enumerate(times):
        step = i - 1  # the first checkpoint is the input checkpoint, step -1
        phase = i % 3
        turn = i // 3
        # One new version per step for every channel the step updates (as Pregel does).
        v = f"{i + 1:032}.{rng.random():016}"
        cid = uuid6_at(int(t * 1e9), step, node)
        ts = datetime.fromtimestamp(t, UTC).isoformat()
        inline: dict[str, Any] = {}
        conv = tpl.conversation_length(i, per_thread)
        if phase == 0:  # the turn's input
            m = (2 * turn) % len(MESSAGES)
            versions["__start__"] = v
            typ, data = tpl.start_blob[m]
            out.blob_rows.append((thread_id, "", "__start__", v, typ, data))
            blob_keys.add(("__start__", v))
            if expected:
                blob_values[("__start__", v)] = tpl.start[m]
            updated = ["__start__"]
            source = "input"
            path = START_PATH
        elif phase == 1:  # after __start__: the input is in `messages`, agent triggered
            seen["__start__"] = {"__start__": versions["__start__"]}
            versions["messages"] = versions["__start__"] = versions[BRANCH] = v
            typ, data = tpl.messages_blob[conv]
            out.blob_rows.append((thread_id, "", "messages", v, typ, data))
            blob_keys.add(("messages", v))
            if expected:
                blob_values[("messages", v)] = tpl.messages[conv]
            inline = {BRANCH: None}
            updated = [BRANCH, "messages"]
            source = "loop"
            path = AGENT_PATH
        else:  # after agent: its reply is in `messages`
            seen["agent"] = {BRANCH: versions[BRANCH]}
            versions["messages"] = versions[BRANCH] = v
            typ, data = tpl.messages_blob[conv]
            out.blob_rows.append((thread_id, "", "messages", v, typ, data))
            blob_keys.add(("messages", v))
            if expected:
                blob_values[("messages", v)] = tpl.messages[conv]
            updated = ["messages"]
            source = "loop"
            path = AGENT_PATH
        # What `aput` stores: the checkpoint without its blob values, as JSONB.
        stored = {
            "v": 4,
            "id": cid,
            "ts": ts,
            "versions_seen": {k: dict(s) for k, s in seen.items()},
            "channel_values": inline,
            "channel_versions": dict(versions),
            "updated_channels": updated,
        }
        meta = get_serializable_checkpoint_metadata(
            config, {"source": source, "step": step, "parents": {}}
        )
        out.checkpoint_rows.append(
            (thread_id, "", cid, parent, None, json.dumps(stored), json.dumps(meta))
        )
        task_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        m = (i + 1) % len(MESSAGES)
        for idx, channel, typ, data in tpl.writes[(path, m)]:
            out.write_rows.append((thread_id, "", cid, task_id, idx, channel, typ, data, path))
        if expected:
            refs = {(ch, ver) for ch, ver in versions.items() if (ch, ver) in blob_values}
            full = json.loads(json.dumps(stored))
            full["channel_values"] = {
                **full["channel_values"],
                **{ch: blob_values[(ch, ver)] for ch, ver in refs},
            }
            out.checkpoints.append(full)
            out.metadatas.append(json.loads(json.dumps(meta)))
            out.writes.append([(task_id, ch, val) for ch, val in tpl.write_values[m]])
            out.blob_keys.append(refs)
        parent = cid
    return out


def thread_ids(n: int) -> list[str]:
    rng = random.Random(f"threads:{n}")
    return sorted(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n))


def expected_blobs_after_keep(per_thread: int, keep: int, tpl: Templates) -> int:
    """Blobs per thread that the newest `keep` checkpoints reference (the layout is fixed)."""
    rows = gen_thread("x", per_thread, time.time(), tpl, expected=True)
    return len(set().union(*rows.blob_keys[-keep:]))


# =========================================================== databases


class Server:
    """The Postgres to benchmark on: a throwaway PgServer, or --dsn."""

    def __init__(self, admin_dsn: str | None) -> None:
        self.pg = None
        if admin_dsn is None:
            from helpers.pgserver import PgServer

            self.pg = PgServer()
            log("starting a throwaway PostgreSQL cluster (tests/helpers/pgserver.py)")
            self.pg.start()
            admin_dsn = self.pg.dsn("postgres")
        self.admin_dsn = admin_dsn

    def dsn(self, db: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=db)

    def admin(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def exists(self, db: str) -> bool:
        return bool(self.admin("SELECT 1 FROM pg_database WHERE datname = %s", (db,)))

    def drop(self, db: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    def copy(self, base: str, db: str) -> str:
        """`CREATE DATABASE db TEMPLATE base` (a file copy); needs no other session on base."""
        self.drop(db)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.admin(f'CREATE DATABASE "{db}" TEMPLATE "{base}" STRATEGY FILE_COPY')
                return self.dsn(db)
            except psycopg.errors.ObjectInUse:
                # An autovacuum worker may be on base; it is told to leave.
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def settings(self) -> dict[str, Any]:
        names = (
            "server_version",
            "shared_buffers",
            "work_mem",
            "maintenance_work_mem",
            "effective_cache_size",
            "max_wal_size",
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "autovacuum",
            "jit",
        )
        rows = self.admin(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)", (list(names),)
        )
        out = {n: (s if not u else f"{s} ({u})") for n, s, u in rows}
        out["version"] = self.admin("SELECT version()")[0][0]
        return out

    def log_offset(self) -> int:
        if self.pg is None:
            return 0
        try:
            return self.pg.log_file.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        if self.pg is None:
            return ""
        try:
            with open(self.pg.log_file, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        if self.pg is not None:
            self.pg.close()


def db_comment(server: Server, db: str) -> dict[str, Any] | None:
    rows = server.admin(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (db,)
    )
    if not rows or not rows[0][0]:
        return None
    try:
        return json.loads(rows[0][0])
    except ValueError:
        return None


# =========================================================== build


async def build_base(dsn: str, n_threads: int, per_thread: int, now: float) -> dict[str, Any]:
    """The real saver's schema by the real saver's setup(), then COPY of the generated rows."""
    async with AsyncPostgresSaver.from_conn_string(dsn) as saver:
        await saver.setup()
        tpl = Templates(saver)
    conn = await asyncpg.connect(**connect_kwargs(dsn))
    ck_cols = [
        "thread_id",
        "checkpoint_ns",
        "checkpoint_id",
        "parent_checkpoint_id",
        "type",
        "checkpoint",
        "metadata",
    ]
    bl_cols = ["thread_id", "checkpoint_ns", "channel", "version", "type", "blob"]
    wr_cols = [
        "thread_id",
        "checkpoint_ns",
        "checkpoint_id",
        "task_id",
        "idx",
        "channel",
        "type",
        "blob",
        "task_path",
    ]
    t0 = time.monotonic()
    gen_s = copy_s = 0.0
    last_log = t0
    ids = thread_ids(n_threads)
    try:
        for start in range(0, len(ids), LOAD_THREADS_PER_TXN):
            g0 = time.monotonic()
            cks: list[tuple[Any, ...]] = []
            bls: list[tuple[Any, ...]] = []
            wrs: list[tuple[Any, ...]] = []
            for tid in ids[start : start + LOAD_THREADS_PER_TXN]:
                rows = gen_thread(tid, per_thread, now, tpl)
                cks += rows.checkpoint_rows
                bls += rows.blob_rows
                wrs += rows.write_rows
            c0 = time.monotonic()
            gen_s += c0 - g0
            async with conn.transaction():
                await conn.copy_records_to_table("checkpoint_blobs", records=bls, columns=bl_cols)
                await conn.copy_records_to_table("checkpoints", records=cks, columns=ck_cols)
                await conn.copy_records_to_table("checkpoint_writes", records=wrs, columns=wr_cols)
            copy_s += time.monotonic() - c0
            done = min(start + LOAD_THREADS_PER_TXN, len(ids))
            if time.monotonic() - last_log > 15 or done == len(ids):
                last_log = time.monotonic()
                log(
                    f"  loaded {done}/{n_threads} threads ({last_log - t0:.0f} s;"
                    f" generate {gen_s:.0f} s, COPY {copy_s:.0f} s)"
                )
        v0 = time.monotonic()
        # Hint bits, visibility map and statistics settled once, so every copy starts equal.
        for table in ("checkpoints", "checkpoint_blobs", "checkpoint_writes"):
            await conn.execute(f"VACUUM (FREEZE, ANALYZE) {table}")
        await conn.execute("CHECKPOINT")
        vacuum_s = time.monotonic() - v0
    finally:
        await conn.close()
    return {
        "threads": n_threads,
        "per_thread": per_thread,
        "build_seconds": round(time.monotonic() - t0, 1),
        "generate_seconds": round(gen_s, 1),
        "copy_seconds": round(copy_s, 1),
        "vacuum_seconds": round(vacuum_s, 1),
    }


def _expect_tuple(
    tup: Any, exp: ThreadRows, i: int, parent: str | None, where: tuple[Any, ...]
) -> None:
    assert tup is not None, where
    assert tup.checkpoint == exp.checkpoints[i], (where, tup.checkpoint, exp.checkpoints[i])
    assert tup.metadata == exp.metadatas[i], (where, tup.metadata)
    assert [tuple(w) for w in tup.pending_writes or []] == exp.writes[i], where
    got_parent = tup.parent_config["configurable"]["checkpoint_id"] if tup.parent_config else None
    assert got_parent == parent, (where, got_parent, parent)


async def verify_readback(
    dsn: str, n_threads: int, per_thread: int, now: float, samples: int, keep: int | None = None
) -> int:
    """Read sampled checkpoints back through the real AsyncPostgresSaver and assert them.

    `keep=None`: the untouched store (every checkpoint, parents chained).
    `keep=k`: after a keep-last-k trim: exactly the newest k remain, whole, and
    the oldest of them has no parent any more.
    """
    ids = thread_ids(n_threads)
    rng = random.Random(f"verify:{keep}")
    checked = 0
    async with AsyncPostgresSaver.from_conn_string(dsn) as saver:
        tpl = Templates(saver)
        for tid in rng.sample(ids, min(samples, len(ids))):
            exp = gen_thread(tid, per_thread, now, tpl, expected=True)
            first = 0 if keep is None else per_thread - keep
            cfg = {"configurable": {"thread_id": tid, "checkpoint_ns": ""}}
            listed = [t async for t in saver.alist(cfg)]
            want = [c["id"] for c in reversed(exp.checkpoints[first:])]
            assert [t.checkpoint["id"] for t in listed] == want, (tid, keep)
            for i in range(first, per_thread) if keep is not None else [rng.randrange(per_thread)]:
                parent = exp.checkpoints[i - 1]["id"] if i > first else None
                cid = exp.checkpoints[i]["id"]
                c = {"configurable": {**cfg["configurable"], "checkpoint_id": cid}}
                _expect_tuple(await saver.aget_tuple(c), exp, i, parent, (tid, i))
                _expect_tuple(listed[per_thread - 1 - i], exp, i, parent, (tid, i, "alist"))
                # Age read from the id, as the worker reads it.
                assert (
                    abs(
                        uuid6_time(exp.checkpoints[i]["id"])
                        - datetime.fromisoformat(exp.checkpoints[i]["ts"]).timestamp()
                    )
                    < 1e-3
                )
                checked += 1
            head = await saver.aget_tuple(cfg)
            last = per_thread - 1
            head_parent = exp.checkpoints[last - 1]["id"] if last > first else None
            _expect_tuple(head, exp, last, head_parent, (tid, "head"))
    return checked


def ensure_base(
    server: Server, workdir: Path, n_threads: int, per_thread: int, rebuild: bool
) -> tuple[str, dict[str, Any]]:
    base = f"bench_base_{n_threads}x{per_thread}"
    meta = None if rebuild else db_comment(server, base)
    if meta is not None:
        fresh = time.time() - meta.get("now", 0) < CACHE_MAX_AGE
        if meta.get("format") != BENCH_FORMAT or not fresh:
            log("kept base database is stale (format or age): rebuilding")
            meta = None
        else:
            log(f"using kept base database {base} (built {meta['built_at']})")
    if meta is None:
        now = time.time()
        server.drop(base)
        server.admin(f'CREATE DATABASE "{base}"')
        log(f"building {n_threads} threads x {per_thread} checkpoints into database {base}")
        info = asyncio.run(build_base(server.dsn(base), n_threads, per_thread, now))
        log(
            f"built in {info['build_seconds']} s (generate {info['generate_seconds']} s,"
            f" COPY {info['copy_seconds']} s, VACUUM FREEZE ANALYZE {info['vacuum_seconds']} s)"
        )
        meta = {
            "format": BENCH_FORMAT,
            "now": now,
            "built_at": datetime.fromtimestamp(now, UTC).isoformat(),
            **info,
        }
        server.admin(f"COMMENT ON DATABASE \"{base}\" IS '{json.dumps(meta)}'")
    checked = asyncio.run(
        verify_readback(server.dsn(base), n_threads, per_thread, meta["now"], samples=20)
    )
    log(f"read-back through the real AsyncPostgresSaver: {checked} sampled checkpoints OK")
    meta["readback_checked"] = checked
    return base, meta


# =========================================================== helpers


def q1(dsn: str, sql: str, params: Any = None) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchone()[0]


def wal_lsn(dsn: str) -> int:
    return int(q1(dsn, "SELECT pg_current_wal_lsn() - '0/0'"))


def table_sizes(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        out: dict[str, Any] = {}
        for t in ("checkpoints", "checkpoint_writes", "checkpoint_blobs"):
            n = conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            b = conn.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0]
            out[t] = {"rows": n, "bytes": b}
        out["database_bytes"] = conn.execute(
            "SELECT pg_database_size(current_database())"
        ).fetchone()[0]
    return out


UNREFERENCED_BLOBS_SQL = """
SELECT b.thread_id, count(*) FROM checkpoint_blobs b
WHERE NOT EXISTS (
    SELECT 1 FROM checkpoints c
    WHERE c.thread_id = b.thread_id AND c.checkpoint_ns = b.checkpoint_ns
      AND c.checkpoint -> 'channel_versions' ->> b.channel = b.version
)
GROUP BY 1
"""


def shape_after_trim(
    dsn: str, n_threads: int, keep: int, blobs_per_thread: int, now: float
) -> dict[str, Any]:
    """Correctness after a keep_last trim: `keep` per thread, their writes and blobs only."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        q = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
        threads = q("SELECT count(DISTINCT thread_id) FROM checkpoints")
        not_k = q(
            "SELECT count(*) FROM (SELECT thread_id, count(*) AS n FROM checkpoints"
            f" GROUP BY thread_id) s WHERE n != {keep}"
        )
        checkpoints = q("SELECT count(*) FROM checkpoints")
        writes = q("SELECT count(*) FROM checkpoint_writes")
        blobs = q("SELECT count(*) FROM checkpoint_blobs")
        orphan_writes = q(
            "SELECT count(*) FROM checkpoint_writes w WHERE NOT EXISTS (SELECT 1 FROM checkpoints"
            " c WHERE c.thread_id = w.thread_id AND c.checkpoint_ns = w.checkpoint_ns"
            " AND c.checkpoint_id = w.checkpoint_id)"
        )
        dangling = q(
            "SELECT count(*) FROM checkpoints c WHERE parent_checkpoint_id IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM checkpoints p WHERE p.thread_id = c.thread_id"
            " AND p.checkpoint_ns = c.checkpoint_ns AND p.checkpoint_id = c.parent_checkpoint_id)"
        )
        unref = dict(conn.execute(UNREFERENCED_BLOBS_SQL).fetchall())
        heads = dict(
            conn.execute(
                "SELECT thread_id, max(checkpoint_id) FROM checkpoints GROUP BY 1"
            ).fetchall()
        )
    unref_quiet = sum(
        n for t, n in unref.items() if t not in heads or now - uuid6_time(heads[t]) > GRACE
    )
    out = {
        "threads": threads,
        f"threads_not_{keep}": not_k,
        "checkpoints": checkpoints,
        "writes": writes,
        "blobs": blobs,
        "blobs_expected": n_threads * blobs_per_thread,
        "orphan_writes": orphan_writes,
        "dangling_parents": dangling,
        "unreferenced_blobs": sum(unref.values()),
        "unreferenced_blobs_on_quiet_threads": unref_quiet,
    }
    out["ok"] = (
        threads == n_threads
        and not_k == 0
        and orphan_writes == 0
        and dangling == 0
        and writes == 2 * checkpoints
        and out["unreferenced_blobs"] == 0
        and blobs == out["blobs_expected"]
    )
    return out


ROWSET_SQL = {
    "checkpoints": """
        SELECT count(*), md5(string_agg(concat_ws('|', thread_id, checkpoint_ns, checkpoint_id,
               coalesce(parent_checkpoint_id, '-'), coalesce(type, '-'), checkpoint::text,
               metadata::text), E'\\n' ORDER BY thread_id, checkpoint_ns, checkpoint_id))
        FROM checkpoints""",
    "checkpoint_writes": """
        SELECT count(*), md5(string_agg(concat_ws('|', thread_id, checkpoint_ns, checkpoint_id,
               task_id, idx, task_path, channel, coalesce(type, '-'), md5(blob)),
               E'\\n' ORDER BY thread_id, checkpoint_ns, checkpoint_id, task_id, idx))
        FROM checkpoint_writes""",
    "checkpoint_blobs": """
        SELECT count(*), md5(string_agg(concat_ws('|', thread_id, checkpoint_ns, channel, version,
               type, coalesce(md5(blob), '-')),
               E'\\n' ORDER BY thread_id, checkpoint_ns, channel, version))
        FROM checkpoint_blobs""",
}


def rowset_digest(dsn: str) -> dict[str, list[Any]]:
    """Count and md5 of every row (all columns) of the three tables, in key order."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {t: list(conn.execute(sql).fetchone()) for t, sql in ROWSET_SQL.items()}


def pct(values: list[float], p: float) -> float | None:
    # Not report.pct: round() goes half to even, so where p/100*n is an odd
    # integer this picks one rank higher than nearest rank. Kept so figures stay
    # comparable with those in docs/benchmarks.md; the Postgres figures use it.
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def latency_stats(values: list[float]) -> dict[str, Any]:
    return _latency_stats(values, pct)


def summarize_writer(result: dict[str, Any], t_from: float | None, t_to: float | None) -> dict:
    return _summarize_writer(result, t_from, t_to, pct)


def mb(n: int | None) -> str:
    return _mb(n, "MB")


_DURATION_RE = re.compile(r"duration: ([0-9.]+) ms\s+(statement|execute|parse|bind)[^:]*: ?(.*)")


def slow_statements(text: str, top: int = 8) -> dict[str, Any]:
    """Statements the server logged (log_min_duration_statement), grouped by their first words."""
    by: dict[str, list[float]] = {}
    lines = text.splitlines()
    for n, line in enumerate(lines):
        m = _DURATION_RE.search(line)
        if not m:
            continue
        ms = float(m.group(1))
        sql = m.group(3)
        if not sql.strip():  # a multi-line statement continues on tab-indented lines
            cont: list[str] = []
            k = n + 1
            while k < len(lines) and lines[k].startswith("\t") and len(cont) < 80:
                cont.append(lines[k].strip())
                k += 1
            sql = " ".join(cont)
        flat = " ".join(sql.split())
        # Head and tail: statements that open alike (WITH refs AS ...) end differently.
        key = f"{m.group(2)}: {flat[:90]}" + (f" ... {flat[-70:]}" if len(flat) > 90 else "")
        by.setdefault(key, []).append(ms)
    rows = sorted(
        (
            {"statement": k, "count": len(v), "max_ms": round(max(v), 1), "sum_ms": round(sum(v))}
            for k, v in by.items()
        ),
        key=lambda r: -r["max_ms"],
    )
    return {"logged": sum(r["count"] for r in rows), "top": rows[:top]}


# =========================================================== (a)

# Keep the newest KEEP_LAST per (thread, namespace): the two windows share the
# primary key's order, so no sort is needed.
A_SQL = [
    f"""CREATE TEMP TABLE doomed ON COMMIT DROP AS
    SELECT thread_id, checkpoint_ns, checkpoint_id FROM (
        SELECT thread_id, checkpoint_ns, checkpoint_id,
               count(*) OVER (PARTITION BY thread_id, checkpoint_ns) AS n,
               row_number() OVER (PARTITION BY thread_id, checkpoint_ns
                                  ORDER BY checkpoint_id) AS rn
        FROM checkpoints) s
    WHERE n - rn >= {KEEP_LAST}""",
    "ANALYZE doomed",
    """DELETE FROM checkpoint_writes w USING doomed d
    WHERE w.thread_id = d.thread_id AND w.checkpoint_ns = d.checkpoint_ns
      AND w.checkpoint_id = d.checkpoint_id""",
    """DELETE FROM checkpoints c USING doomed d
    WHERE c.thread_id = d.thread_id AND c.checkpoint_ns = d.checkpoint_ns
      AND c.checkpoint_id = d.checkpoint_id""",
    # As the official prune (and the worker): a kept checkpoint whose parent went has none.
    """UPDATE checkpoints c SET parent_checkpoint_id = NULL FROM doomed d
    WHERE c.thread_id = d.thread_id AND c.checkpoint_ns = d.checkpoint_ns
      AND c.parent_checkpoint_id = d.checkpoint_id""",
    # Blobs no remaining checkpoint of their thread and namespace references.
    """WITH refs AS MATERIALIZED (
        SELECT DISTINCT c.thread_id, c.checkpoint_ns, v.key AS channel, v.value AS version
        FROM checkpoints c
        CROSS JOIN LATERAL jsonb_each_text(c.checkpoint -> 'channel_versions') AS v
    )
    DELETE FROM checkpoint_blobs b
    WHERE NOT EXISTS (
        SELECT 1 FROM refs r
        WHERE r.thread_id = b.thread_id AND r.checkpoint_ns = b.checkpoint_ns
          AND r.channel = b.channel AND r.version = b.version)""",
]
A_STEPS = ["doomed", "analyze", "writes", "checkpoints", "parents", "blobs"]


def run_a(
    server: Server, base: str, n_threads: int, blobs_per_thread: int, now: float
) -> dict[str, Any]:
    dsn = server.copy(base, "bench_copy_a")
    wal0 = wal_lsn(dsn)
    steps: dict[str, float] = {}
    counts: dict[str, int] = {}
    with psycopg.connect(dsn) as conn:
        t0 = time.monotonic()
        with conn.transaction():
            for name, sql in zip(A_STEPS, A_SQL, strict=True):
                s0 = time.monotonic()
                cur = conn.execute(sql)
                steps[name] = round(time.monotonic() - s0, 2)
                counts[name] = cur.rowcount
        seconds = time.monotonic() - t0
    wal = wal_lsn(dsn) - wal0
    shape = shape_after_trim(dsn, n_threads, KEEP_LAST, blobs_per_thread, now)
    server.drop("bench_copy_a")
    return {
        "seconds": round(seconds, 2),
        "step_seconds": steps,
        "checkpoints_deleted": counts["checkpoints"],
        "writes_deleted": counts["writes"],
        "blobs_deleted": counts["blobs"],
        "parents_nulled": counts["parents"],
        "checkpoints_per_s": round(counts["checkpoints"] / seconds),
        "rows_per_s": round((counts["checkpoints"] + counts["writes"] + counts["blobs"]) / seconds),
        "longest_txn_s": round(seconds, 2),
        "wal_bytes": wal,
        "shape": shape,
    }


# =========================================================== worker runs


def write_config(
    workdir: Path,
    name: str,
    policy: dict[str, Any],
    batch: dict[str, Any] | None = None,
    reclaim: dict[str, Any] | None = None,
    policy_name: str | None = None,
) -> Path:
    """WORKDIR/config-`name`.yaml: store `bench`, one policy (named `name` unless given)."""
    import yaml

    cfg: dict[str, Any] = {
        # The DSN (with its password) comes from the environment, not the file.
        "stores": [{"name": "bench", "kind": "postgres", "dsn": "${BENCH_PG_DSN}"}],
        "policies": [{"name": policy_name or name, **policy}],
        "logging": {"format": "json", "level": "info"},
    }
    if batch:
        cfg["defaults"] = {"batch": batch}
    if reclaim:
        cfg.setdefault("defaults", {})["reclaim"] = reclaim
    path = workdir / f"config-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def default_pause_factor() -> float:
    """`defaults.batch.pause_factor` when the config does not set it (the worker sleeps
    at least this multiple of each batch's time after it)."""
    from policies.config import BatchSettings

    return float(BatchSettings().pause_factor)


@dataclass
class WorkerRun:
    returncode: int
    wall_seconds: float
    peak_rss_kb: int | None
    wal_bytes: int
    batch_seconds: list[float] = field(default_factory=list)
    batch_rows: list[int] = field(default_factory=list)
    batch_threads: list[int] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    gave_up: int = 0
    started_at: float = 0.0
    ended_at: float = 0.0
    stderr_tail: str = ""
    slow: dict[str, Any] = field(default_factory=dict)
    pause_factor: float = 0.0


def run_worker(
    server: Server,
    config: Path,
    dsn: str,
    workdir: Path,
    tag: str,
    extra: list[str] | None = None,
    pause_factor: float | None = None,
) -> WorkerRun:
    cmd = [*janitor_cmd(), "--config", str(config), "--log-level", "debug", "once", *(extra or [])]
    tag += RUN_SUFFIX
    timefile = workdir / f"time-{tag}.txt"
    errfile = workdir / f"worker-{tag}.log"
    cmd, use_time = under_time(cmd, timefile)
    env = {**os.environ, "BENCH_PG_DSN": dsn}
    wal0 = wal_lsn(dsn)
    log_off = server.log_offset()
    with open(errfile, "wb") as err:
        started = time.time()
        t0 = time.monotonic()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, check=False, env=env)
        wall = time.monotonic() - t0
        ended = time.time()
    wal = wal_lsn(dsn) - wal0
    peak, _cpu = child_usage(use_time, timefile)
    run = WorkerRun(proc.returncode, wall, peak, wal, started_at=started, ended_at=ended)
    run.pause_factor = default_pause_factor() if pause_factor is None else pause_factor
    text = errfile.read_text(errors="replace")
    for ev in log_events(errfile):
        kind = ev.get("event")
        if kind == "batch":
            run.batch_seconds.append(float(ev["seconds"]))
            run.batch_rows.append(int(ev.get("rows", 0)))
            run.batch_threads.append(int(ev.get("threads", 0)))
        elif kind == "sweep":
            run.summary = ev
        elif kind == "batch_retry":
            run.retries += 1
        elif kind == "batch_gave_up":
            run.gave_up += 1
    run.stderr_tail = "\n".join(text.splitlines()[-5:])
    run.slow = slow_statements(server.log_since(log_off))
    return run


def worker_numbers(run: WorkerRun) -> dict[str, Any]:
    s = run.summary
    cps = int(s.get("checkpoints", 0) or 0)
    rows = cps + int(s.get("writes", 0) or 0) + int(s.get("blobs", 0) or 0)
    in_batches = sum(run.batch_seconds)
    # The sweep sleeps pause_factor x each batch's time after it (defaults.batch.pause 0).
    pauses = in_batches * run.pause_factor
    sweep_s = float(s.get("duration_seconds") or 0.0)
    return {
        "exit_code": run.returncode,
        "wall_seconds": round(run.wall_seconds, 2),
        "sweep_seconds": s.get("duration_seconds"),
        "checkpoints_deleted": cps,
        "writes_deleted": s.get("writes"),
        "blobs_deleted": s.get("blobs"),
        "checkpoints_per_s": round(cps / run.wall_seconds) if run.wall_seconds else None,
        "rows_per_s": round(rows / run.wall_seconds) if run.wall_seconds else None,
        "checkpoints_per_s_sweep": (
            round(cps / s["duration_seconds"]) if s.get("duration_seconds") else None
        ),
        "batches": len(run.batch_seconds),
        "longest_txn_s": round(max(run.batch_seconds), 4) if run.batch_seconds else None,
        "batch_p50_s": _r(pct(run.batch_seconds, 50), 4),
        "batch_p99_s": _r(pct(run.batch_seconds, 99), 4),
        "batches_over_250ms": sum(1 for x in run.batch_seconds if x >= 0.25),
        "time_split_s": {
            "process_start_and_exit": round(run.wall_seconds - sweep_s, 2),
            "in_batch_transactions": round(in_batches, 2),
            "pauses_between_batches": round(pauses, 2),
            "scan_and_decide": round(sweep_s - in_batches - pauses, 2),
        },
        "pause_factor": run.pause_factor,
        "batch_threads_p50": pct([float(r) for r in run.batch_threads], 50),
        "batch_rows_p50": pct([float(r) for r in run.batch_rows], 50),
        "retries": run.retries,
        "gave_up": run.gave_up,
        "peak_rss_mb": round(run.peak_rss_kb / 1024, 1) if run.peak_rss_kb else None,
        "wal_bytes": run.wal_bytes,
        "changed_threads": s.get("changed_threads"),
        "outcome": s.get("outcome"),
        "slow_statements": run.slow,
    }


def _log_slow(server: Server, db: str, ms: int) -> None:
    # Only new sessions of `db` (the worker's) log statements slower than `ms`.
    if server.pg is not None:
        server.admin(f'ALTER DATABASE "{db}" SET log_min_duration_statement = {int(ms)}')
        server.admin(f'ALTER DATABASE "{db}" SET log_parameter_max_length = 0')


# The worker keeps a trimmed thread's blobs until it has had no deletion for
# grace_period (a fork may still name them), so the sweep that collects them is
# a later one: same policy (and policy name, as a daemon's next sweep: the
# residue look the first sweep dated is not due again), a 1 s grace period,
# started past that second.
BLOB_GC_GRACE = "1s"
BLOB_GC_WAIT_S = 1.5


def run_blob_gc(
    server: Server,
    dsn: str,
    workdir: Path,
    tag: str,
    policy: dict[str, Any],
    batch: dict[str, Any] | None = None,
    *,
    policy_name: str,
) -> dict[str, Any]:
    """The later sweep that collects the blobs the first left, timed on its own.

    `policy_name`: the first sweep's, so that this is the next sweep of the same
    policy (a renamed policy would be due for a whole residue look).
    """
    time.sleep(BLOB_GC_WAIT_S)
    gc_batch = {**(batch or {}), "grace_period": BLOB_GC_GRACE}
    config = write_config(workdir, f"{tag}-gc", policy, gc_batch, policy_name=policy_name)
    pf = None if "pause_factor" not in gc_batch else float(gc_batch["pause_factor"])
    run = run_worker(server, config, dsn, workdir, f"{tag}-gc", pause_factor=pf)
    out = worker_numbers(run)
    if run.returncode != 0:
        out["stderr_tail"] = run.stderr_tail
    return out


def with_blob_gc(sweep: dict[str, Any], gc: dict[str, Any]) -> dict[str, Any]:
    """Sweep + blob GC sweep as one job: what (a)'s one transaction with blob GC does."""
    seconds = sweep["wall_seconds"] + gc["wall_seconds"]
    cps = sweep["checkpoints_deleted"] + gc["checkpoints_deleted"]
    rows = sum(
        int(x.get(k) or 0)
        for x in (sweep, gc)
        for k in ("checkpoints_deleted", "writes_deleted", "blobs_deleted")
    )
    return {
        "wall_seconds": round(seconds, 2),
        "checkpoints_deleted": cps,
        "writes_deleted": int(sweep.get("writes_deleted") or 0)
        + int(gc.get("writes_deleted") or 0),
        "blobs_deleted": int(sweep.get("blobs_deleted") or 0) + int(gc.get("blobs_deleted") or 0),
        "checkpoints_per_s": round(cps / seconds) if seconds else None,
        "rows_per_s": round(rows / seconds) if seconds else None,
        "wal_bytes": sweep["wal_bytes"] + gc["wal_bytes"],
    }


def run_b(
    server: Server,
    base: str,
    workdir: Path,
    n_threads: int,
    per_thread: int,
    now: float,
    blobs_per_thread: int,
    tag: str = "b",
    batch: dict[str, Any] | None = None,
    db_settings: dict[str, str] | None = None,
) -> dict[str, Any]:
    db = f"bench_copy_{tag}"
    dsn = server.copy(base, db)
    _log_slow(server, db, 100)
    # Session defaults for the worker's connections (ALTER DATABASE, not the worker's code).
    for name, value in (db_settings or {}).items():
        server.admin(f'ALTER DATABASE "{db}" SET {name} = {value}')
    policy = {"keep_last": KEEP_LAST}
    config = write_config(workdir, f"keep5-{tag}", policy, batch)
    pf = None if not batch or "pause_factor" not in batch else float(batch["pause_factor"])
    run = run_worker(server, config, dsn, workdir, tag, pause_factor=pf)
    out = worker_numbers(run)
    if run.returncode != 0:
        out["stderr_tail"] = run.stderr_tail
    out["shape_before_blob_gc"] = shape_after_trim(dsn, n_threads, KEEP_LAST, blobs_per_thread, now)
    log(f"  ({tag}) blob GC sweep: keep_last {KEEP_LAST}, grace_period {BLOB_GC_GRACE}")
    out["blob_gc"] = run_blob_gc(
        server, dsn, workdir, tag, policy, batch, policy_name=f"keep5-{tag}"
    )
    out["with_blob_gc"] = with_blob_gc(out, out["blob_gc"])
    out["shape"] = shape_after_trim(dsn, n_threads, KEEP_LAST, blobs_per_thread, now)
    out["readback_checked"] = asyncio.run(
        verify_readback(dsn, n_threads, per_thread, now, samples=20, keep=KEEP_LAST)
    )
    server.drop(db)
    return out


# =========================================================== the concurrent writer


def writer_main(spec_path: str) -> None:
    """A separate process: real AsyncPostgresSaver.aput + aput_writes at `rate` per second."""
    spec = json.loads(Path(spec_path).read_text())
    asyncio.run(_writer(spec))


async def _writer(spec: dict[str, Any]) -> None:
    from langgraph.checkpoint.base.id import uuid6

    rate = float(spec["rate"])
    stop_file = Path(spec["stop_file"])
    deadline = time.monotonic() + spec["duration"] if spec.get("duration") else None
    swept = list(spec["swept_heads"])  # [thread_id, head checkpoint id], each used once
    swept_every = int(spec.get("swept_every", 5))
    prefix = spec["prefix"]
    records: list[dict[str, Any]] = []
    committed: list[tuple[str, str]] = []
    load_heads: dict[str, str | None] = {}
    per_load_thread = 3
    conv = [MESSAGES[i % len(MESSAGES)] for i in range(8)]
    async with AsyncPostgresSaver.from_conn_string(spec["dsn"]) as saver:
        Path(spec["ready_file"]).write_text("ready")
        t_start = time.monotonic()
        k = 0
        while True:
            if stop_file.exists() or (deadline is not None and time.monotonic() >= deadline):
                break
            target = t_start + k / rate
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if k % swept_every == swept_every - 1 and swept:
                tid, parent = swept.pop()
                kind = "swept"
            else:
                n = k // per_load_thread
                tid = f"{prefix}-{n:07d}"
                parent = load_heads.get(tid)
                kind = "load"
            step = k % 50
            v = saver.get_next_version(None, None)
            ck = {
                "v": 4,
                "id": str(uuid6(clock_seq=step)),
                "ts": datetime.now(UTC).isoformat(),
                "channel_values": {"messages": conv[: 1 + k % 8], BRANCH: None},
                "channel_versions": {"messages": v, BRANCH: v},
                "versions_seen": {"agent": {BRANCH: v}},
                "updated_channels": ["messages", BRANCH],
            }
            cfg: dict[str, Any] = {"configurable": {"thread_id": tid, "checkpoint_ns": ""}}
            if parent:
                cfg["configurable"]["checkpoint_id"] = parent
            rec: dict[str, Any] = {"t": time.time(), "kind": kind}
            t0 = time.perf_counter()
            try:
                new_cfg = await saver.aput(
                    cfg,
                    ck,  # type: ignore[arg-type]
                    {"source": "loop", "step": step, "parents": {}},
                    {"messages": v, BRANCH: v},
                )
                rec["aput"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                await saver.aput_writes(
                    new_cfg,
                    [("messages", [MESSAGES[k % len(MESSAGES)]]), (BRANCH, None)],
                    str(uuid.uuid4()),
                    AGENT_PATH,
                )
                rec["aput_writes"] = time.perf_counter() - t1
                committed.append((tid, ck["id"]))
                if kind == "load":
                    load_heads[tid] = ck["id"]
            except Exception as e:  # recorded, not raised: errors are a result
                rec["error"] = f"{type(e).__name__}: {e}"
                rec.setdefault("aput", time.perf_counter() - t0)
            records.append(rec)
            k += 1
    Path(spec["out"]).write_text(json.dumps({"records": records, "committed": committed}))


class Writer:
    def __init__(
        self, workdir: Path, dsn: str, tag: str, rate: float, swept: list, duration: float | None
    ) -> None:
        self.stop_file = workdir / f"writer-{tag}.stop"
        self.ready_file = workdir / f"writer-{tag}.ready"
        self.out = workdir / f"writer-{tag}.json"
        for p in (self.stop_file, self.ready_file, self.out):
            p.unlink(missing_ok=True)
        spec = {
            "dsn": dsn,
            "rate": rate,
            "duration": duration,
            "stop_file": str(self.stop_file),
            "ready_file": str(self.ready_file),
            "out": str(self.out),
            "swept_heads": swept,
            "prefix": f"zz-load-{tag}",
        }
        self.spec_path = workdir / f"writer-{tag}.spec.json"
        self.spec_path.write_text(json.dumps(spec))
        os.chmod(self.spec_path, 0o600)  # holds the DSN
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"writer-{tag}.log"

    def start(self) -> None:
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--writer", str(self.spec_path)],
                stdout=err,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"writer died: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("writer not ready after 60 s")
            time.sleep(0.05)

    def finish(self) -> dict[str, Any]:
        assert self.proc is not None
        self.stop_file.write_text("stop")
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        if not self.out.exists():
            raise RuntimeError(f"writer wrote no results: {self.log.read_text()[-2000:]}")
        return json.loads(self.out.read_text())


def swept_heads(dsn: str, count: int, seed: str) -> list[list[str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT thread_id, max(checkpoint_id) FROM checkpoints WHERE checkpoint_ns = ''"
            " GROUP BY thread_id"
        ).fetchall()
    rng = random.Random(seed)
    return [list(r) for r in rng.sample(rows, min(count, len(rows)))]


def run_b_load(
    server: Server,
    base: str,
    workdir: Path,
    n_threads: int,
    now: float,
    blobs_per_thread: int,
    rate: float,
    baseline_seconds: float,
) -> dict[str, Any]:
    dsn = server.copy(base, "bench_copy_bload")
    _log_slow(server, "bench_copy_bload", 100)
    config = write_config(workdir, "keep5-load", {"keep_last": KEEP_LAST})
    heads = swept_heads(dsn, 20_000, "swept")
    half = len(heads) // 2
    # Baseline: the writer alone, on the same database.
    log(f"  (b-load) baseline: writer alone for {baseline_seconds:.0f} s at {rate}/s")
    w0 = Writer(workdir, dsn, "baseline", rate, heads[:half], duration=baseline_seconds)
    w0.start()
    w0.proc.wait()  # type: ignore[union-attr]
    baseline = summarize_writer(json.loads(w0.out.read_text()), None, None)
    # Under the sweep.
    log("  (b-load) sweep with the writer running")
    w1 = Writer(workdir, dsn, "load", rate, heads[half:], duration=None)
    w1.start()
    time.sleep(1.0)
    run = run_worker(server, config, dsn, workdir, "bload")
    time.sleep(1.0)
    result = w1.finish()
    during = summarize_writer(result, run.started_at, run.ended_at)
    overall = summarize_writer(result, None, None)
    # No checkpoint the writer committed is lost: each is the newest of its
    # thread (swept threads get one; load threads <= 3), so keep_last keeps it.
    committed = result["committed"] + json.loads(w0.out.read_text())["committed"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        present = {
            (t, c)
            for t, c in conn.execute(
                "SELECT c.thread_id, c.checkpoint_id FROM checkpoints c"
                " JOIN unnest(%s::text[], %s::text[]) AS k(t, i)"
                " ON c.thread_id = k.t AND c.checkpoint_ns = '' AND c.checkpoint_id = k.i",
                ([t for t, _ in committed], [c for _, c in committed]),
            ).fetchall()
        }
        over = conn.execute(
            "SELECT count(*) FROM (SELECT thread_id, count(*) AS n FROM checkpoints"
            f" GROUP BY thread_id) s WHERE n > {KEEP_LAST}"
        ).fetchone()[0]
    lost = sum(1 for t, c in committed if (t, c) not in present)
    out = worker_numbers(run)
    if run.returncode != 0:
        out["stderr_tail"] = run.stderr_tail
    before_gc = shape_after_trim(dsn, n_threads, KEEP_LAST, blobs_per_thread, now)
    # Run after the writer stopped: its threads must be quiet for the grace period too.
    log(f"  (b-load) blob GC sweep: keep_last {KEEP_LAST}, grace_period {BLOB_GC_GRACE}")
    out["blob_gc"] = run_blob_gc(
        server, dsn, workdir, "bload", {"keep_last": KEEP_LAST}, policy_name="keep5-load"
    )
    out["with_blob_gc"] = with_blob_gc(out, out["blob_gc"])
    shape = shape_after_trim(dsn, n_threads, KEEP_LAST, blobs_per_thread, now)
    out.update(
        {
            "writer_baseline": baseline,
            "writer_during_sweep": during,
            "writer_whole_run": overall,
            "writer_checkpoints_committed": len(committed),
            "writer_checkpoints_lost": lost,
            "threads_left_over_5": over,
            "orphan_writes": shape["orphan_writes"],
            "dangling_parents": shape["dangling_parents"],
            "unreferenced_blobs_before_blob_gc": before_gc["unreferenced_blobs"],
            "unreferenced_blobs": shape["unreferenced_blobs"],
            "unreferenced_blobs_on_quiet_threads": shape["unreferenced_blobs_on_quiet_threads"],
        }
    )
    server.drop("bench_copy_bload")
    return out


# =========================================================== no-op sweep

# A no-op sweep's limit, part 1: the per-(thread, namespace) summary a planner
# needs; count/min/max of the key columns only, so an index-only scan can serve it.
NOOP_AGGREGATE_SQL = """SELECT thread_id, checkpoint_ns, count(*), min(checkpoint_id),
    max(checkpoint_id) FROM checkpoints GROUP BY 1, 2"""
# Part 2: each head's metadata (metadata rules and the waiting check look at
# heads only), fetched in one statement by primary key from the aggregate's heads.
NOOP_HEAD_METADATA_SQL = """SELECT c.metadata FROM checkpoints c
    JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k(t, n, i)
      ON c.thread_id = k.t AND c.checkpoint_ns = k.n AND c.checkpoint_id = k.i"""
# The bench store's threads hold 50 checkpoints, the newest 2 to 28 days old:
# keep_last 50 keeps them all and expire_after 365d expires no thread.
NOOP_POLICY = {"keep_last": 50, "expire_after": "365d"}


def noop_limit(dsn: str) -> dict[str, Any]:
    """Time the aggregate and the heads' metadata (decoded to dicts) on `dsn`."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        load0 = os.getloadavg()
        t0 = time.monotonic()
        groups = conn.execute(NOOP_AGGREGATE_SQL).fetchall()
        t1 = time.monotonic()
        metas = conn.execute(
            NOOP_HEAD_METADATA_SQL,
            ([g[0] for g in groups], [g[1] for g in groups], [g[4] for g in groups]),
        ).fetchall()
        t2 = time.monotonic()
    return {
        "seconds": round(t2 - t0, 3),
        "aggregate_seconds": round(t1 - t0, 3),
        "head_metadata_seconds": round(t2 - t1, 3),
        "groups": len(groups),
        "checkpoints": sum(g[2] for g in groups),
        "heads_with_metadata": sum(1 for (m,) in metas if isinstance(m, dict)),
        "loadavg_before_after": [load0, os.getloadavg()],
    }


def run_noop(server: Server, base: str, workdir: Path) -> dict[str, Any]:
    """A sweep with nothing due against its limit, on one copy (nothing is deleted).

    The limit runs before and after the worker and the faster run counts, so
    neither side gets a buffer cache the other warmed. The worker runs twice:
    the first sweep of a store looks at every quiet thread's residue and dates
    the look (`defaults.residue_check_every`, default 1d); the second is the
    steady state the ratio is taken on.
    """
    db = "bench_copy_noop"
    dsn = server.copy(base, db)
    _log_slow(server, db, 100)
    before = noop_limit(dsn)
    config = write_config(workdir, "noop", NOOP_POLICY)
    first = run_worker(server, config, dsn, workdir, "noop-first")
    run = run_worker(server, config, dsn, workdir, "noop")
    after = noop_limit(dsn)
    worker = worker_numbers(run)
    if run.returncode != 0:
        worker["stderr_tail"] = run.stderr_tail
    worker["rows_unchanged"] = after["checkpoints"] == before["checkpoints"]
    limit = min(before, after, key=lambda x: x["seconds"])
    limit["runs_seconds"] = [before["seconds"], after["seconds"]]
    server.drop(db)
    return {
        "limit": limit,
        "worker": worker,
        "first_sweep": worker_numbers(first),
        "ratio_worker_to_limit": round(run.wall_seconds / limit["seconds"], 2),
        "ratio_first_sweep_to_limit": round(first.wall_seconds / limit["seconds"], 2),
    }


# =========================================================== (c) and (b')


async def _aprune_all(dsn: str) -> tuple[int, float]:
    async with AsyncPostgresSaver.from_conn_string(dsn) as saver:
        async with saver._cursor() as cur:
            await cur.execute("SELECT DISTINCT thread_id FROM checkpoints ORDER BY 1")
            ids = [r["thread_id"] for r in await cur.fetchall()]
        t0 = time.monotonic()
        await saver.aprune(ids, strategy="keep_latest")
        return len(ids), time.monotonic() - t0


def run_c(
    server: Server, base: str, workdir: Path, n_threads: int, per_thread: int, now: float,
    tpl_blobs_keep1: int,
) -> dict[str, Any]:  # fmt: skip
    # The official implementation first.
    dsn_c = server.copy(base, "bench_copy_c")
    _log_slow(server, "bench_copy_c", 100)
    wal0 = wal_lsn(dsn_c)
    log_off = server.log_offset()
    log("  (c) AsyncPostgresSaver.aprune(all thread ids, strategy='keep_latest')")
    n_ids, seconds = asyncio.run(_aprune_all(dsn_c))
    official = {
        "threads": n_ids,
        "seconds": round(seconds, 2),
        "wal_bytes": wal_lsn(dsn_c) - wal0,
        "slow_statements": slow_statements(server.log_since(log_off)),
    }
    sizes_c = table_sizes(dsn_c)
    official["checkpoints_deleted"] = n_threads * per_thread - sizes_c["checkpoints"]["rows"]
    official["checkpoints_per_s"] = round(official["checkpoints_deleted"] / seconds)
    official["shape"] = shape_after_trim(dsn_c, n_threads, 1, tpl_blobs_keep1, now)
    digest_c = rowset_digest(dsn_c)
    server.drop("bench_copy_c")
    # The worker with keep_last: 1.
    dsn_b1 = server.copy(base, "bench_copy_b1")
    _log_slow(server, "bench_copy_b1", 100)
    config = write_config(workdir, "keep1", {"keep_last": 1})
    log("  (b') checkpoint-janitor once, keep_last: 1")
    run = run_worker(server, config, dsn_b1, workdir, "b1")
    worker = worker_numbers(run)
    if run.returncode != 0:
        worker["stderr_tail"] = run.stderr_tail
    worker["shape_before_blob_gc"] = shape_after_trim(dsn_b1, n_threads, 1, tpl_blobs_keep1, now)
    log(f"  (b') blob GC sweep: keep_last 1, grace_period {BLOB_GC_GRACE}")
    worker["blob_gc"] = run_blob_gc(
        server, dsn_b1, workdir, "b1", {"keep_last": 1}, policy_name="keep1"
    )
    worker["with_blob_gc"] = with_blob_gc(worker, worker["blob_gc"])
    worker["shape"] = shape_after_trim(dsn_b1, n_threads, 1, tpl_blobs_keep1, now)
    digest_b1 = rowset_digest(dsn_b1)
    worker["readback_checked"] = asyncio.run(
        verify_readback(dsn_b1, n_threads, per_thread, now, samples=20, keep=1)
    )
    server.drop("bench_copy_b1")
    same = digest_c == digest_b1
    return {
        "official_aprune": official,
        "worker_keep1": worker,
        "same_rows": same,
        "digest_official": digest_c,
        "digest_worker": digest_b1,
    }


# =========================================================== reclaim (issue 12)

RECLAIM_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")
# The statistics collector's view (no scan of the tables: a scan would prune
# dead tuples off the pages it reads and change what is being measured).
RECLAIM_TABLE_STATS_SQL = """
SELECT s.relname, pg_total_relation_size(s.relid), pg_table_size(s.relid),
       pg_indexes_size(s.relid), pg_relation_size(s.relid), s.n_live_tup, s.n_dead_tup,
       s.last_vacuum, s.last_autovacuum, s.vacuum_count, s.autovacuum_count, s.last_analyze
FROM pg_stat_user_tables s WHERE s.relname = ANY(%s) ORDER BY 1"""
# A backend flushes its table counts at exit before it leaves pg_stat_activity:
# once the worker's sessions are gone, its deletes and vacuums are counted.
RECLAIM_OTHER_SESSIONS_SQL = """SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_type = 'client backend'"""
# What the main heap's pages really hold, whatever the statistics say (they can
# lag: see the docs). The _approx variant reads only pages not all-visible and
# never prunes, so measuring leaves the dead tuples where they are.
RECLAIM_PHYSICAL_SQL = """SELECT table_len, scanned_percent, approx_tuple_count, dead_tuple_count,
       dead_tuple_len, approx_free_space FROM pgstattuple_approx(%s::regclass)"""
# Per-table autovacuum off on the copy only: the "without" run must show what
# the sweep leaves, not what an autovacuum worker did meanwhile.
RECLAIM_AUTOVACUUM_OFF_SQL = (
    "ALTER TABLE {table} SET (autovacuum_enabled = off, toast.autovacuum_enabled = off)"
)


def reclaim_table_stats(dsn: str, wait_for_sessions: bool = True) -> dict[str, Any]:
    """Per checkpoint table: total/table/index bytes, live/dead tuples, vacuum times."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if wait_for_sessions:
            deadline = time.monotonic() + 60
            while conn.execute(RECLAIM_OTHER_SESSIONS_SQL).fetchone()[0]:  # type: ignore[index]
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker's sessions did not go away in 60 s")
                time.sleep(0.1)
        conn.execute("SELECT pg_stat_force_next_flush()")
        rows = conn.execute(RECLAIM_TABLE_STATS_SQL, (list(RECLAIM_TABLES),)).fetchall()
        db_bytes = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]  # type: ignore[index]
    out: dict[str, Any] = {}
    for name, total, table, index, heap, live, dead, lv, lav, vc, avc, la in rows:
        out[name] = {
            "total_bytes": total,
            "table_bytes": table,
            "index_bytes": index,
            "heap_bytes": heap,
            "n_live_tup": live,
            "n_dead_tup": dead,
            "last_vacuum": lv.isoformat() if lv else None,
            "last_autovacuum": lav.isoformat() if lav else None,
            "vacuum_count": vc,
            "autovacuum_count": avc,
            "last_analyze": la.isoformat() if la else None,
        }
    out["database_bytes"] = db_bytes
    return out


def reclaim_physical(dsn: str) -> dict[str, Any]:
    """pgstattuple_approx of each checkpoint table's main heap (TOAST not included)."""
    out: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in RECLAIM_TABLES:
            t0 = time.monotonic()
            row = conn.execute(RECLAIM_PHYSICAL_SQL, (table,)).fetchone()
            assert row is not None
            length, scanned, live, dead, dead_len, free = row
            out[table] = {
                "heap_bytes": length,
                "scanned_percent": round(scanned, 1),
                "live_tuples": live,
                "dead_tuples": dead,
                "dead_tuple_bytes": dead_len,
                "free_bytes": int(free),
                "seconds": round(time.monotonic() - t0, 2),
            }
    return out


def janitor_stats(config: Path, dsn: str) -> dict[str, Any]:
    """What `checkpoint-janitor stats --format json` reports about the store's space."""
    t0 = time.monotonic()
    done = subprocess.run(
        [*janitor_cmd(), "--config", str(config), "stats", "--format", "json"],
        capture_output=True, text=True, check=False, env={**os.environ, "BENCH_PG_DSN": dsn},
    )  # fmt: skip
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    (s,) = json.loads(done.stdout)["stores"]
    return {
        "seconds": round(time.monotonic() - t0, 2),
        "store_bytes": s["store_bytes"],
        "reclaimable_bytes": s["reclaimable_bytes"],
        "tables": {
            name: {k: t[k] for k in ("dead_rows", "reclaimable_bytes", "last_vacuum")}
            for name, t in s["space"]["tables"].items()
        },
    }


def reclaim_events(log_path: Path) -> dict[str, Any]:
    """The worker's `table_vacuumed` and `reclaim` events (VACUUM times) from its log."""
    vacuums: list[dict[str, Any]] = []
    summary: dict[str, Any] | None = None
    for ev in log_events(log_path):
        if ev.get("event") == "table_vacuumed":
            vacuums.append({"table": ev["table"], "seconds": ev["seconds"]})
        elif ev.get("event") == "reclaim":
            summary = {k: v for k, v in ev.items() if k not in ("event", "level", "timestamp")}
    return {"vacuums": vacuums, "reclaim": summary}


def reclaim_sweep(
    server: Server, dsn: str, workdir: Path, tag: str, vacuum: bool, grace: str | None
) -> dict[str, Any]:
    """`once` with keep_last 5 and `reclaim.after_sweep` = `vacuum`, and its aftermath."""
    batch = {"grace_period": grace} if grace else None
    config = write_config(
        workdir, tag, {"keep_last": KEEP_LAST}, batch, reclaim={"after_sweep": vacuum}
    )
    run = run_worker(server, config, dsn, workdir, tag)
    sweep = worker_numbers(run)
    sweep.pop("slow_statements", None)
    if run.returncode != 0:
        sweep["stderr_tail"] = run.stderr_tail
    events = reclaim_events(workdir / f"worker-{tag}{RUN_SUFFIX}.log")
    after = reclaim_table_stats(dsn)
    # After the table statistics: `stats` reads the checkpoints table.
    return {
        "sweep": sweep,
        "vacuum_seconds": round(sum(v["seconds"] for v in events["vacuums"]), 3),
        **events,
        "after": after,
        "janitor_stats_after": janitor_stats(config, dsn),
        "physical_after": reclaim_physical(dsn),
    }


def reclaim_variant(
    server: Server, base: str, workdir: Path, vacuum: bool, autovacuum: bool, full: bool
) -> dict[str, Any]:
    """On a fresh copy: two `once` runs of keep_last 5, with or without the VACUUM step.

    The first trims every thread to 5; its blobs wait out the grace period
    (worker.stores.postgres: a fork may still name them), so the second, run with a
    1 s grace period, is the later sweep that collects them.
    """
    name = "with_vacuum" if vacuum else "without_vacuum"
    db = f"bench_copy_reclaim_{'on' if vacuum else 'off'}"
    dsn = server.copy(base, db)
    out: dict[str, Any] = {"database": db, "table_autovacuum": autovacuum}
    # Cumulative statistics are per database: a TEMPLATE copy starts with none.
    out["copy_stats_fresh"] = reclaim_table_stats(dsn, wait_for_sessions=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        for table in RECLAIM_TABLES:
            if not autovacuum:
                conn.execute(RECLAIM_AUTOVACUUM_OFF_SQL.format(table=table))  # type: ignore[arg-type]
            conn.execute(f"ANALYZE {table}")  # type: ignore[arg-type]
    out["before"] = reclaim_table_stats(dsn, wait_for_sessions=False)
    config = write_config(workdir, f"reclaim-{name}-stats", {"keep_last": KEEP_LAST})
    out["janitor_stats_before"] = janitor_stats(config, dsn)
    out["physical_before"] = reclaim_physical(dsn)
    log(f"  (reclaim {name}) sweep 1: keep_last {KEEP_LAST}")
    out["sweep1"] = reclaim_sweep(server, dsn, workdir, f"reclaim-{name}-1", vacuum, None)
    time.sleep(1.5)  # past the second sweep's 1 s grace period since the first's deletions
    log(f"  (reclaim {name}) sweep 2: keep_last {KEEP_LAST}, grace_period 1s (blob GC)")
    out["sweep2"] = reclaim_sweep(server, dsn, workdir, f"reclaim-{name}-2", vacuum, "1s")
    if full:
        log(f"  (reclaim {name}) reclaim --full (VACUUM FULL, operator's choice)")
        t0 = time.monotonic()
        done = subprocess.run(
            [*janitor_cmd(), "--config", str(config), "reclaim", "--store", "bench", "--full",
             "--yes", "--format", "json"],
            capture_output=True, text=True, check=False, env={**os.environ, "BENCH_PG_DSN": dsn},
        )  # fmt: skip
        wall = time.monotonic() - t0
        if done.returncode != 0:
            out["full"] = {"error": done.stderr[-2000:]}
        else:
            (r,) = json.loads(done.stdout[done.stdout.index('{\n  "reclaimed"') :])["reclaimed"]
            out["full"] = {"wall_seconds": round(wall, 2), **r}
            out["full"]["after"] = reclaim_table_stats(dsn)
            out["full"]["physical_after"] = reclaim_physical(dsn)
    server.drop(db)
    return out


def run_reclaim(
    server: Server, base: str, workdir: Path, autovacuum: bool, full: bool
) -> dict[str, Any]:
    """Issue 12 (Postgres): sizes and dead tuples around keep_last 5, without and with VACUUM."""
    return {
        "server_autovacuum": server.settings().get("autovacuum"),
        "without_vacuum": with_load(
            reclaim_variant, server, base, workdir, False, autovacuum, False
        ),
        "with_vacuum": with_load(reclaim_variant, server, base, workdir, True, autovacuum, full),
    }


def print_reclaim(r: dict[str, Any]) -> None:
    """The issue 12 table: per table and moment, bytes and tuples, both variants."""
    print()
    print(f"reclaim: server autovacuum {r['server_autovacuum']}, per-table autovacuum on the"
          f" copies {'on' if r['without_vacuum']['table_autovacuum'] else 'off'}")  # fmt: skip
    hdr = ("variant", "moment", "table", "total", "table", "indexes", "live", "dead",
           "last vacuum", "last autovacuum", "heap dead (pgstattuple)", "heap free")  # fmt: skip
    rows: list[tuple[str, ...]] = []
    for key in ("without_vacuum", "with_vacuum"):
        v = r.get(key)
        if not v:
            continue
        s1, s2 = v["sweep1"], v["sweep2"]
        moments = [("before", v["before"], v["physical_before"]),
                   ("after sweep 1", s1["after"], s1["physical_after"]),
                   ("after sweep 2", s2["after"], s2["physical_after"])]  # fmt: skip
        if isinstance(v.get("full"), dict) and "after" in v["full"]:
            moments.append(("after VACUUM FULL", v["full"]["after"], v["full"]["physical_after"]))
        for moment, snap, phys in moments:
            for t in RECLAIM_TABLES:
                s = snap[t]
                rows.append((key, moment, t, mb(s["total_bytes"]), mb(s["table_bytes"]),
                             mb(s["index_bytes"]), fmt(s["n_live_tup"]), fmt(s["n_dead_tup"]),
                             (s["last_vacuum"] or "-")[11:19] or "-",
                             (s["last_autovacuum"] or "-")[11:19] or "-",
                             fmt(phys[t]["dead_tuples"]), mb(phys[t]["free_bytes"])))  # fmt: skip
    widths = [max(len(str(x[i])) for x in [hdr, *rows]) for i in range(len(hdr))]
    for row in [hdr, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))
    print()
    for key in ("without_vacuum", "with_vacuum"):
        v = r.get(key)
        if not v:
            continue
        for n in ("sweep1", "sweep2"):
            sw = v[n]
            js = sw["janitor_stats_after"]
            print(
                f"{key} {n}: wall {sw['sweep']['wall_seconds']} s (sweep"
                f" {sw['sweep']['sweep_seconds']} s), deleted {sw['sweep']['checkpoints_deleted']}"
                f" checkpoints / {sw['sweep']['writes_deleted']} writes /"
                f" {sw['sweep']['blobs_deleted']} blobs; VACUUM {sw['vacuum_seconds']} s"
                f" {sw['vacuums']}; stats after: store {mb(js.get('store_bytes'))},"
                f" reclaimable {mb(js.get('reclaimable_bytes'))}"
            )
        js = v["janitor_stats_before"]
        print(f"{key} stats before: store {mb(js.get('store_bytes'))},"
              f" reclaimable {mb(js.get('reclaimable_bytes'))}")  # fmt: skip
        if isinstance(v.get("full"), dict):
            f = v["full"]
            what = f.get("error") or f.get("tables")
            print(f"{key} reclaim --full: {f.get('wall_seconds')} s, {what}")


# =========================================================== --explain


def run_explain(server: Server, base: str, workdir: Path, now: float) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the worker's statements for its first page and batch.

    The statements are imported from worker/stores/postgres_sql.py, with the
    parameters the worker passes: a page of `page_threads` (1,000) threads for
    the scan, and the first batch (the threads that fit in max_batch_rows
    20,000 rows) for the deletes, which are rolled back.
    """
    from worker.stores import postgres_sql as ps

    dsn = server.copy(base, "bench_copy_explain")
    plans: dict[str, Any] = {}

    async def go() -> None:
        conn = await asyncpg.connect(**connect_kwargs(dsn))
        try:

            async def explain(name: str, sql: str, *args: Any) -> None:
                t0 = time.monotonic()
                rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
                text = "\n".join(r[0] for r in rows)
                ms = None
                if m := re.search(r"Execution Time: ([0-9.]+) ms", text):
                    ms = float(m.group(1))
                wall_ms = round((time.monotonic() - t0) * 1000, 1)
                plans[name] = {"execution_ms": ms, "wall_ms": wall_ms}
                (workdir / f"explain-{name}.txt").write_text(f"{sql.strip()}\n\n{text}\n")

            # The base has none of the tool's tables: the walk without the expired
            # threads' branch, the blob statements without the recent-deletion check.
            first, after = ps.WALK_SQL["first", False], ps.WALK_SQL["next", False]
            garbage = ps.GARBAGE_BLOB_THREADS_SQL[False]
            page = [r[0] for r in await conn.fetch(first, 1000)]
            await explain("threads_page_first", first, 1000)
            await explain("threads_page_next", after, 1000, page[-1])
            await explain("aggregate", ps.AGGREGATE_SQL, page)
            await explain("scan", ps.SCAN_SQL, page)
            await explain("orphan_writes", ps.ORPHAN_WRITES_SQL, page)
            await explain("garbage_blob_threads", garbage, page)
            # The same with JIT compilation off (Postgres' default is on; the worker's off).
            await conn.execute("SET jit = off")
            await explain("aggregate_nojit", ps.AGGREGATE_SQL, page)
            await explain("scan_nojit", ps.SCAN_SQL, page)
            await explain("orphan_writes_nojit", ps.ORPHAN_WRITES_SQL, page)
            await explain("garbage_blob_threads_nojit", garbage, page)
            await conn.execute("RESET jit")
            # The first batch: keep the newest KEEP_LAST per thread, up to 20,000 rows.
            rows = await conn.fetch(
                "SELECT thread_id, checkpoint_ns, checkpoint_id FROM ("
                " SELECT thread_id, checkpoint_ns, checkpoint_id, row_number() OVER"
                " (PARTITION BY thread_id, checkpoint_ns ORDER BY checkpoint_id DESC) AS rn"
                " FROM checkpoints WHERE thread_id = ANY($1::text[])) s WHERE rn > $2"
                " ORDER BY thread_id, checkpoint_id DESC",
                page,
                KEEP_LAST,
            )
            per_thread = max(1, len(rows) // max(1, len(page)))
            n_batch = min(500, max(1, 20_000 // per_thread))
            batch_threads = sorted({r[0] for r in rows})[:n_batch]
            keep = set(batch_threads)
            trip = [r for r in rows if r[0] in keep]
            args = ([r[0] for r in trip], [r[1] for r in trip], [r[2] for r in trip])
            plans["batch"] = {"threads": len(batch_threads), "checkpoints": len(trip)}
            tr = conn.transaction()
            await tr.start()
            try:
                await explain("fingerprints", ps.FINGERPRINT_SQL, batch_threads)
                await explain("delete_writes", ps.DELETE_WRITES_SQL, *args)
                await explain("delete_checkpoints", ps.DELETE_CHECKPOINTS_SQL, *args)
                await explain("null_parents", ps.NULL_PARENTS_SQL, *args)
                sp = conn.transaction()
                await sp.start()
                # What the blob GC sweep later collects on these threads.
                gc = ps.DELETE_GARBAGE_BLOBS_SQL[False]
                await explain("delete_garbage_blobs", gc, batch_threads)
                await sp.rollback()
                await conn.execute("SET LOCAL jit = off")
                await explain("delete_garbage_blobs_nojit", gc, batch_threads)
            finally:
                await tr.rollback()
        finally:
            await conn.close()

    asyncio.run(go())
    server.drop("bench_copy_explain")
    return plans


# =========================================================== report


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "ram_gib": ram_gib(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "langgraph": version("langgraph"),
        "langgraph-checkpoint-postgres": version("langgraph-checkpoint-postgres"),
        "asyncpg": version("asyncpg"),
        "psycopg": version("psycopg"),
        "checkpoint-janitor": version("checkpoint-janitor"),
    }


def git_state() -> dict[str, Any]:
    """The commit benchmarked, and which engine files differ from it (others edit them)."""

    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "dirty_engine_files": git("status", "--porcelain", "--", "worker", "policies").splitlines(),
    }


def ratios(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    a, b, bl, c = res.get("a"), res.get("b"), res.get("b_load"), res.get("c")
    if res.get("noop"):
        out["(noop) worker / aggregate limit, seconds"] = res["noop"]["ratio_worker_to_limit"]
    # (a) deletes the blobs in its one transaction; the worker in a later sweep
    # (grace_period), so the fair throughput is over sweep + blob GC sweep.
    if a and b:
        out["(b)/(a) throughput, sweep + blob GC"] = round(
            b["with_blob_gc"]["checkpoints_per_s"] / a["checkpoints_per_s"], 3
        )
        out["(b)/(a) throughput, sweep only (blobs left)"] = round(
            b["checkpoints_per_s"] / a["checkpoints_per_s"], 3
        )
        if b.get("checkpoints_per_s_sweep"):
            out["(b)/(a) throughput, sweep's own time only (blobs left)"] = round(
                b["checkpoints_per_s_sweep"] / a["checkpoints_per_s"], 3
            )
    if a and res.get("b0"):
        out["(b0)/(a) throughput, sweep + blob GC"] = round(
            res["b0"]["with_blob_gc"]["checkpoints_per_s"] / a["checkpoints_per_s"], 3
        )
    if a and res.get("bnojit"):
        out["(b-nojit)/(a) throughput, sweep + blob GC"] = round(
            res["bnojit"]["with_blob_gc"]["checkpoints_per_s"] / a["checkpoints_per_s"], 3
        )
    if a and bl:
        out["(b-load)/(a) throughput, sweep + blob GC"] = round(
            bl["with_blob_gc"]["checkpoints_per_s"] / a["checkpoints_per_s"], 3
        )
    if c:
        # aprune deletes the blobs itself: (b') counts its blob GC sweep too.
        out["(b') speedup over (c): (c) s / (b') sweep + blob GC s"] = round(
            c["official_aprune"]["seconds"] / c["worker_keep1"]["with_blob_gc"]["wall_seconds"], 3
        )
    if a and c:
        out["(c) official aprune / (a) seconds"] = round(
            c["official_aprune"]["seconds"] / a["seconds"], 2
        )
    if bl:
        base_p99 = bl["writer_baseline"]["aput"]["p99_ms"]
        load_p99 = bl["writer_during_sweep"]["aput"]["p99_ms"]
        if base_p99 and load_p99:
            out["(b-load) writer aput p99 during sweep / alone"] = round(load_p99 / base_p99, 2)
    return out


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    a, b, bl, c = res.get("a"), res.get("b"), res.get("b_load"), res.get("c")
    r = res.get("ratios", {})

    def add(name: str, value: str, met: bool | None) -> None:
        out.append({"target": name, "measured": value, "met": met})

    if res.get("noop"):
        v = r["(noop) worker / aggregate limit, seconds"]
        add("(noop) no-op sweep <= 3x its aggregate limit", f"{v:.1f}x", v <= 3)
    if a and b:
        v = r["(b)/(a) throughput, sweep + blob GC"]
        add("(b) sweep + blob GC throughput >= 80% of (a)", f"{v * 100:.0f}% of (a)", v >= 0.8)
    for key, label in (("b", "(b)"), ("b_load", "(b-load)")):
        for run, what in ((res.get(key), ""), ((res.get(key) or {}).get("blob_gc"), " blob GC")):
            if run and run.get("longest_txn_s") is not None:
                v = run["longest_txn_s"]
                add(f"{label}{what} every transaction < 250 ms", f"longest {v * 1000:.0f} ms",
                    v < 0.25)  # fmt: skip
    if c:
        v = r["(b') speedup over (c): (c) s / (b') sweep + blob GC s"]
        # Issue 10's target (issue 3 asked 7x): one transaction is ~4.8x aprune.
        add("(b') >= 3.5x faster than (c) official aprune", f"{v:.2f}x", v >= 3.5)
        add(
            "(b') and (c) leave identical rows",
            "identical" if c["same_rows"] else "DIFFERENT",
            c["same_rows"],
        )
    if bl:
        v = r.get("(b-load) writer aput p99 during sweep / alone")
        add(
            "(b-load) writer aput p99 during sweep <= 3x alone",
            f"{v}x ({bl['writer_baseline']['aput']['p99_ms']} -> "
            f"{bl['writer_during_sweep']['aput']['p99_ms']} ms)",
            v is not None and v <= 3,
        )
        d = bl["writer_during_sweep"]
        add("(b-load) writer never errors", f"{d['errors']} errors / {d['puts']} puts",
            d["errors"] == 0)  # fmt: skip
        add(
            "(b-load) writer loses nothing",
            f"{bl['writer_checkpoints_lost']} lost of {bl['writer_checkpoints_committed']}",
            bl["writer_checkpoints_lost"] == 0,
        )
    for key, label in (("noop", "(noop)"), ("b", "(b)"), ("b_load", "(b-load)"), ("c", "(b')")):
        rr = res.get(key)
        if rr and key == "c":
            rr = rr["worker_keep1"]
        if rr and key == "noop":
            rr = rr["worker"]
        if rr and rr.get("peak_rss_mb") is not None:
            add(f"{label} peak RSS < 200 MB", f"{rr['peak_rss_mb']} MB", rr["peak_rss_mb"] < 200)
    for key, label in (("b", "(b)"), ("c", "(b')")):
        rr = res.get(key)
        if rr and key == "c":
            rr = rr["worker_keep1"]
        if rr:
            left = rr["shape_before_blob_gc"]["unreferenced_blobs"]
            add(f"{label} no unreferenced blob left after the blob GC sweep",
                f"{rr['shape']['unreferenced_blobs']} (sweep left {left},"
                f" GC deleted {rr['blob_gc']['blobs_deleted']})",
                rr["shape"]["unreferenced_blobs"] == 0)  # fmt: skip
    return out


def print_report(res: dict[str, Any]) -> None:
    print()
    print("=" * 110)
    m = res["machine"]
    s = res["store"]
    pg = res["postgres"]
    print(
        f"machine: {m['nproc']} cpu ({m['cpu']}), {m['ram_gib']} GiB RAM, Python {m['python']},"
        f" langgraph {m['langgraph']}, langgraph-checkpoint-postgres"
        f" {m['langgraph-checkpoint-postgres']}"
    )
    print(
        f"postgres: {pg.get('server_version')}, shared_buffers {pg.get('shared_buffers')},"
        f" work_mem {pg.get('work_mem')}, fsync {pg.get('fsync')},"
        f" synchronous_commit {pg.get('synchronous_commit')}"
    )
    print(
        f"store: {s['threads']:,} threads x {s['per_thread']} = {s['checkpoints']:,} checkpoints,"
        f" {s['writes']:,} writes, {s['blobs']:,} blobs, {mb(s['database_bytes'])}"
    )
    rows = []
    hdr = (
        "run",
        "seconds",
        "checkpoints",
        "writes",
        "blobs",
        "ckpt/s",
        "rows/s",
        "longest txn",
        "peak RSS",
        "WAL",
        "check",
    )
    if noop := res.get("noop"):
        lim, w = noop["limit"], noop["worker"]
        rows.append(
            ("(noop) limit: GROUP BY + heads", fmt(lim["seconds"]), "-", "-", "-", "-", "-",
             "-", "-", "-", f"{lim['groups']:,} groups")
        )  # fmt: skip
        if f := noop.get("first_sweep"):
            rows.append(
                (
                    "(noop) first sweep (residue look)",
                    fmt(f["wall_seconds"]),
                    fmt(f["checkpoints_deleted"]),
                    fmt(f["writes_deleted"]),
                    fmt(f["blobs_deleted"]),
                    "-",
                    "-",
                    f"{(f['longest_txn_s'] or 0) * 1000:.0f} ms",
                    f"{f['peak_rss_mb']} MB",
                    mb(f["wal_bytes"]),
                    "ok" if f["exit_code"] == 0 else "BAD",
                )
            )
        rows.append(
            (
                "(noop) janitor, nothing due",
                fmt(w["wall_seconds"]),
                fmt(w["checkpoints_deleted"]),
                fmt(w["writes_deleted"]),
                fmt(w["blobs_deleted"]),
                "-",
                "-",
                f"{(w['longest_txn_s'] or 0) * 1000:.0f} ms",
                f"{w['peak_rss_mb']} MB",
                mb(w["wal_bytes"]),
                "ok" if w["rows_unchanged"] and w["exit_code"] == 0 else "BAD",
            )
        )
    if a := res.get("a"):
        rows.append(
            (
                "(a) one DELETE txn, keep 5",
                fmt(a["seconds"]),
                fmt(a["checkpoints_deleted"]),
                fmt(a["writes_deleted"]),
                fmt(a["blobs_deleted"]),
                fmt(a["checkpoints_per_s"]),
                fmt(a["rows_per_s"]),
                f"{a['longest_txn_s']:.2f} s",
                "-",
                mb(a["wal_bytes"]),
                "ok" if a["shape"]["ok"] else "BAD",
            )
        )

    def wrow(label: str, b: dict[str, Any], ok: bool) -> tuple[str, ...]:
        return (
            label,
            fmt(b["wall_seconds"]),
            fmt(b["checkpoints_deleted"]),
            fmt(b["writes_deleted"]),
            fmt(b["blobs_deleted"]),
            fmt(b["checkpoints_per_s"]),
            fmt(b["rows_per_s"]),
            f"{(b['longest_txn_s'] or 0) * 1000:.0f} ms",
            f"{b['peak_rss_mb']} MB",
            mb(b["wal_bytes"]),
            "ok" if ok and b["exit_code"] == 0 else "BAD",
        )

    def gc_rows(label: str, b: dict[str, Any], ok: bool) -> None:
        # The sweep, its later blob GC sweep, and the two as one job (what (a) compares to);
        # `check` is the store after the blob GC sweep.
        gc, both = b["blob_gc"], b["with_blob_gc"]
        rows.append(wrow(label, b, ok and gc["exit_code"] == 0))
        rows.append(wrow("  then blob GC, grace 1s", gc, ok))
        rows.append(
            (
                "  = sweep + blob GC",
                fmt(both["wall_seconds"]),
                fmt(both["checkpoints_deleted"]),
                fmt(both["writes_deleted"]),
                fmt(both["blobs_deleted"]),
                fmt(both["checkpoints_per_s"]),
                fmt(both["rows_per_s"]),
                "-",
                "-",
                mb(both["wal_bytes"]),
                "ok" if ok else "BAD",
            )
        )

    if b := res.get("b"):
        gc_rows("(b) janitor keep_last 5", b, b["shape"]["ok"])
    if b0 := res.get("b0"):
        gc_rows("(b0) same, pause_factor 0", b0, b0["shape"]["ok"])
    if bj := res.get("bnojit"):
        gc_rows("(b-nojit) same, jit = off", bj, bj["shape"]["ok"])
    if bl := res.get("b_load"):
        ok = (
            bl["writer_checkpoints_lost"] == 0
            and bl["orphan_writes"] == 0
            and bl["unreferenced_blobs_on_quiet_threads"] == 0
        )
        gc_rows("(b-load) + aput 50/s", bl, ok)
    if c := res.get("c"):
        o, w = c["official_aprune"], c["worker_keep1"]
        rows.append(
            (
                "(c) official aprune keep_latest",
                fmt(o["seconds"]),
                fmt(o["checkpoints_deleted"]),
                "-",
                "-",
                fmt(o["checkpoints_per_s"]),
                "-",
                "1 txn/thread",
                "-",
                mb(o["wal_bytes"]),
                "ok" if o["shape"]["ok"] else "BAD",
            )
        )
        gc_rows("(b') janitor keep_last 1", w, w["shape"]["ok"] and c["same_rows"])
    print_table(hdr, rows)
    if bl := res.get("b_load"):
        print()
        print_writer_load(bl, "writer alone (baseline)", "writer during sweep")
    if rc := res.get("reclaim"):
        print_reclaim(rc)
    reps = res.get("repetitions", [])
    if len(reps) > 1:
        print()
        print("per repetition:")
        for name in res.get("ratios", {}):
            print(f"  ratio {name}: {[one.get('ratios', {}).get(name) for one in reps]}")
    print_verdict(res.get("ratios", {}), res.get("targets", []))
    print("=" * 110)


# =========================================================== main


def main() -> None:
    global RUN_SUFFIX
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=20_000)
    ap.add_argument("--per-thread", type=int, default=50)
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "checkpoint-janitor-pgbench",
    )
    ap.add_argument(
        "--dsn",
        help="superuser DSN of a maintenance database on the server to use"
        " (default: start a throwaway cluster)",
    )
    ap.add_argument(
        "--only",
        default="a,b,c,bload",
        help="comma-separated subset of noop,a,b,b0,bnojit,c,bload,explain,reclaim (default:"
        " a,b,c,bload;"
        " noop is a sweep with nothing due (keep_last 50, expire_after 365d) against its"
        " aggregate limit;"
        " b0 is (b) with defaults.batch.pause_factor 0, bnojit is (b) with jit = off for the"
        " copy's sessions, explain writes EXPLAIN ANALYZE of the worker's statements to the"
        " workdir; reclaim is issue 12's table sizes and dead tuples around keep_last 5,"
        " without and with the VACUUM step, on two copies)",
    )
    ap.add_argument(
        "--reclaim-autovacuum",
        choices=("off", "on"),
        default="off",
        help="(reclaim) autovacuum of the copies' tables (default off: the sweep's own effect)",
    )
    ap.add_argument(
        "--reclaim-full",
        action="store_true",
        help="(reclaim) end the with-VACUUM copy with `reclaim --full` (VACUUM FULL)",
    )
    ap.add_argument("--rebuild", action="store_true", help="rebuild a kept base database")
    ap.add_argument("--rate", type=float, default=50.0, help="(b-load) writer puts per second")
    ap.add_argument("--baseline-seconds", type=float, default=20.0)
    ap.add_argument(
        "--repeat", type=int, default=1, help="run the measurements N times (median reported)"
    )
    ap.add_argument("--writer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.writer:
        writer_main(args.writer)
        return
    if args.per_thread <= KEEP_LAST:
        ap.error(f"--per-thread must exceed {KEEP_LAST}")
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    shown = sys.argv[1:]
    if "--dsn" in shown:
        shown[shown.index("--dsn") + 1] = "***"
    res: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, sys.argv[0], *shown]),
        "started_at": datetime.now(UTC).isoformat(),
        "machine": machine(),
        "git_at_start": git_state(),
    }
    reps: list[dict[str, Any]] = []
    res["repetitions"] = reps
    server = Server(args.dsn)
    try:
        res["postgres"] = server.settings()
        base, meta = ensure_base(server, workdir, args.threads, args.per_thread, args.rebuild)
        now = meta["now"]
        sizes = table_sizes(server.dsn(base))
        with offline_templates() as tpl:
            blobs_keep5 = expected_blobs_after_keep(args.per_thread, KEEP_LAST, tpl)
            blobs_keep1 = expected_blobs_after_keep(args.per_thread, 1, tpl)
        res["store"] = {
            "threads": args.threads,
            "per_thread": args.per_thread,
            "checkpoints": sizes["checkpoints"]["rows"],
            "writes": sizes["checkpoint_writes"]["rows"],
            "blobs": sizes["checkpoint_blobs"]["rows"],
            "tables": sizes,
            "database_bytes": sizes["database_bytes"],
            "built_at": meta["built_at"],
            "build_seconds": meta.get("build_seconds"),
            "readback_checked": meta["readback_checked"],
            "blobs_per_thread_after_keep_5": blobs_keep5,
            "blobs_per_thread_after_keep_1": blobs_keep1,
        }
        log(
            f"store: {sizes['checkpoints']['rows']:,} checkpoints,"
            f" {sizes['checkpoint_writes']['rows']:,} writes,"
            f" {sizes['checkpoint_blobs']['rows']:,} blobs, {mb(sizes['database_bytes'])}"
        )
        partial = workdir / "results-partial.json"
        one: dict[str, Any] = {}
        tag = ""

        def phase(key: str, label: str, fn: Any, *a: Any, **kw: Any) -> dict[str, Any] | None:
            """Run one phase; a failure is recorded and the next phase still runs."""
            log(label + tag)
            try:
                one[key] = with_load(fn, *a, **kw)
                return one[key]
            except Exception:
                one.setdefault("errors", {})[key] = traceback.format_exc()
                log(f"    FAILED:\n{one['errors'][key]}")
                return None
            finally:
                partial.write_text(json.dumps(res, indent=2))

        for rep_no in range(args.repeat):
            RUN_SUFFIX = f"-r{rep_no + 1}" if args.repeat > 1 else ""
            tag = f" [repetition {rep_no + 1}/{args.repeat}]" if args.repeat > 1 else ""
            one = {}
            reps.append(one)
            if "noop" in only and (
                r := phase(
                    "noop",
                    "(noop) a sweep with nothing due vs its aggregate limit",
                    run_noop,
                    server,
                    base,
                    workdir,
                )
            ):
                log(f"    worker {r['worker']['wall_seconds']} s, limit {r['limit']['seconds']} s")

            if "explain" in only and (
                r := phase(
                    "explain",
                    "EXPLAIN ANALYZE of the worker's statements (first page and batch)",
                    run_explain,
                    server,
                    base,
                    workdir,
                    now,
                )
            ):
                for k, v in r.items():
                    log(f"    {k}: {v}")
            if "a" in only and (
                r := phase(
                    "a",
                    "(a) one set-based DELETE in one transaction",
                    run_a,
                    server,
                    base,
                    args.threads,
                    blobs_keep5,
                    now,
                )
            ):
                log(f"    {r['seconds']} s, {r['checkpoints_per_s']} checkpoints/s,"
                    f" steps {r['step_seconds']}")  # fmt: skip
            for key, label, batch in (
                ("b", "(b) checkpoint-janitor once, keep_last: 5", None),
                (
                    "b0",
                    "(b0) checkpoint-janitor once, keep_last: 5, defaults.batch.pause_factor: 0",
                    {"pause_factor": 0},
                ),
                ("bnojit", "(b-nojit) (b) with ALTER DATABASE copy SET jit = off", None),
            ):
                if key in only and (
                    r := phase(
                        key,
                        label,
                        run_b,
                        server,
                        base,
                        workdir,
                        args.threads,
                        args.per_thread,
                        now,
                        blobs_keep5,
                        tag=key,
                        batch=batch,
                        db_settings={"jit": "off"} if key == "bnojit" else None,
                    )
                ):
                    log(f"    {r['wall_seconds']} s, {r['checkpoints_per_s']} checkpoints/s,"
                        f" longest batch {r['longest_txn_s']} s")  # fmt: skip
            if "c" in only and (
                r := phase(
                    "c",
                    "(c) official aprune(keep_latest) vs (b') keep_last: 1",
                    run_c,
                    server,
                    base,
                    workdir,
                    args.threads,
                    args.per_thread,
                    now,
                    blobs_keep1,
                )
            ):
                log(f"    aprune {r['official_aprune']['seconds']} s,"
                    f" worker {r['worker_keep1']['wall_seconds']} s,"
                    f" same rows: {r['same_rows']}")  # fmt: skip
            if "bload" in only and (
                r := phase(
                    "b_load",
                    "(b-load) (b) under a concurrent aput writer",
                    run_b_load,
                    server,
                    base,
                    workdir,
                    args.threads,
                    now,
                    blobs_keep5,
                    args.rate,
                    args.baseline_seconds,
                )
            ):
                log(f"    {r['wall_seconds']} s")
            if "reclaim" in only and (
                r := phase(
                    "reclaim",
                    "(reclaim) keep_last 5 without and with the VACUUM step (issue 12)",
                    run_reclaim,
                    server,
                    base,
                    workdir,
                    args.reclaim_autovacuum == "on",
                    args.reclaim_full,
                )
            ):
                log(f"    with VACUUM: {r['with_vacuum']['sweep1']['vacuum_seconds']} s of VACUUM")
            one["ratios"] = ratios(one)
    finally:
        server.close()
    # The run of median time stands for each kind; ratios are taken within each
    # repetition (same moment, same load) and their median reported.
    for key, metric in (
        ("noop", lambda x: x["worker"]["wall_seconds"]),
        ("explain", lambda x: 0),
        ("a", lambda x: x["seconds"]),
        ("b", lambda x: x["wall_seconds"]),
        ("b0", lambda x: x["wall_seconds"]),
        ("bnojit", lambda x: x["wall_seconds"]),
        ("c", lambda x: x["worker_keep1"]["wall_seconds"]),
        ("b_load", lambda x: x["wall_seconds"]),
        ("reclaim", lambda x: x["with_vacuum"]["sweep1"]["sweep"]["wall_seconds"]),
    ):
        runs = [one[key] for one in reps if key in one]
        if runs:
            res[key] = sorted(runs, key=metric)[(len(runs) - 1) // 2]
    if any("errors" in one for one in reps):
        res["errors"] = [one.get("errors") for one in reps]
    res["ratios"] = {
        name: round(
            statistics.median(one["ratios"][name] for one in reps if name in one.get("ratios", {})),
            3,
        )
        for name in dict.fromkeys(n for one in reps for n in one.get("ratios", {}))
    }
    res["targets"] = targets(res)
    res["finished_at"] = datetime.now(UTC).isoformat()
    res["git_at_end"] = git_state()
    out = workdir / f"results-{args.threads}x{args.per_thread}.json"
    write_results(out, res)
    write_results(workdir / "results.json", res)
    print_report(res)
    log(f"results written to {out}")


def with_load(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """`fn(...)`, with the machine's load averages before and after (other work skews times)."""
    before = os.getloadavg()
    out: dict[str, Any] = fn(*args, **kwargs)
    out["loadavg_before_after"] = [before, os.getloadavg()]
    return out


@contextlib.contextmanager
def offline_templates() -> Any:
    """Templates from a saver object that never connects (only its serde is used)."""

    class _Offline(AsyncPostgresSaver):
        def __init__(self) -> None:  # no connection, no event loop
            from langgraph.checkpoint.postgres.base import BasePostgresSaver

            BasePostgresSaver.__init__(self)

    yield Templates(_Offline())


if __name__ == "__main__":
    main()
