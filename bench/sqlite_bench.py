#!/usr/bin/env python
"""SQLite benchmark for checkpoint-janitor (issue 2, "Benchmark (not a test)").

Builds a store in the real schema of langgraph-checkpoint-sqlite (the saver's
own `setup()` DDL) holding THREADS x PER_THREAD checkpoints, each with two
writes, proves with the real `SqliteSaver` that sampled rows read back, then
times on identical copies of it:

  (a)      the physical limit: one set-based DELETE keeping the newest 5 per
           (thread, namespace), and their writes, in ONE transaction;
  (b)      `checkpoint-janitor once` with `keep_last: 5`;
  (b-load) (b) while another process puts checkpoints at ~50/s with the real
           `AsyncSqliteSaver.aput` + `aput_writes` (and a baseline of that
           writer alone);
  (c)      `checkpoint-janitor once --allow-mass-expiry` with `expire_after: 30d`
           against the official `SqliteSaver.delete_thread` loop over the same
           idle threads;
  (noop)   `checkpoint-janitor once` with nothing due (keep_last 50,
           expire_after 365d) against its limit: the per-(thread, namespace)
           GROUP BY aggregate plus reading each head's metadata (issue 10),
           timed on the second sweep: the first on a copy looks at every
           quiet thread's residue (`defaults.residue_check_every`) and is
           reported beside it;
  (tb)     (b-load) once per `--target-batch` value of
           `defaults.batch.target_batch_seconds`: writer p99 against throughput.

    python bench/sqlite_bench.py [--threads 20000 --per-thread 50 --workdir DIR]
    python bench/sqlite_bench.py --scale 20000,200000   # 1M vs 10M, small payloads

`--scale` builds small-payload stores once (10M checkpoints is ~15 GB) and
times (noop) and (b) on each size, reporting the time ratios and peak RSS.

The built store is cached in the workdir (rebuilt when missing, when its shape
differs or when it is more than a day old: idleness is relative to "now").
Results are printed as a table and written to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import empty_checkpoint, get_checkpoint_metadata
from langgraph.checkpoint.sqlite import SqliteSaver
from report import (
    child_usage,
    cpu_model,
    fmt,
    janitor_cmd,
    log_events,
    mb,
    pct,
    print_table,
    print_verdict,
    print_writer_load,
    ram_gib,
    summarize_writer,
    under_time,
    version,
    write_results,
)
from report import rounded as _r
from synthetic import MESSAGES, log, uuid6_at, uuid6_time

BENCH_FORMAT = 3  # bump when the generated layout changes (invalidates the cache)
KEEP_LAST = 5
RUN_SUFFIX = ""  # "-r2" etc. while repeating, so each repetition keeps its logs
IDLE_DAYS = 30
DAY = 86400.0
CACHE_MAX_AGE = DAY  # idle/recent margins are 2 days wide (see _thread_times)

N_TEMPLATES = 8
# Template j: the conversation after j+1 turns (2 + 2j messages); reused lists.
TEMPLATES = [MESSAGES[: 2 + 2 * j] for j in range(N_TEMPLATES)]
TASK_PATH = "~__pregel_pull, agent"
# Payload "small" (the scale stores): the same rows, keys, chains and writes,
# but each checkpoint carries one short message, so a 10M store stays a size
# that copies in minutes. Row count is what scales a sweep's work.
PAYLOADS = ("chat", "small")
SMALL_MESSAGES = [f"{'human' if i % 2 == 0 else 'ai'}: turn {i}" for i in range(8)]
# Bytes per checkpoint measured on built stores (row, writes, indexes), for the disk check.
BYTES_PER_CHECKPOINT = {"chat": 4_600, "small": 1_550}


@dataclass(slots=True)
class ThreadRows:
    thread_id: str
    checkpoint_rows: list[tuple[Any, ...]]
    write_rows: list[tuple[Any, ...]]
    checkpoints: list[dict[str, Any]]  # the checkpoint dicts, oldest first
    metadatas: list[dict[str, Any]]
    writes: list[list[tuple[str, str, Any]]]  # pending writes per checkpoint
    idle: bool


def _thread_times(rng: random.Random, per_thread: int, now: float) -> tuple[bool, list[float]]:
    """(idle, checkpoint times oldest first); spread over the last 60 days.

    Idle threads' newest checkpoint is 32-58 days old, recent ones' 10 min to
    28 days: no thread sits near the 30-day line, so a cached store stays
    valid for a day. Checkpoints of a thread are 10 s to 40 min apart.
    """
    idle = rng.random() < 0.5
    newest = now - (rng.uniform(32 * DAY, 58 * DAY) if idle else rng.uniform(600, 28 * DAY))
    times = [newest]
    for _ in range(per_thread - 1):
        times.append(times[-1] - rng.uniform(10, 2400))
    times.reverse()
    return idle, times


def gen_thread(
    thread_id: str, per_thread: int, now: float, serde: Any, payload: str = "chat"
) -> ThreadRows:
    """One thread's rows, deterministic in (thread_id, per_thread, now, payload)."""
    rng = random.Random(f"thread:{thread_id}")
    idle, times = _thread_times(rng, per_thread, now)
    node = rng.getrandbits(48)
    base = empty_checkpoint()
    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    ck_rows: list[tuple[Any, ...]] = []
    w_rows: list[tuple[Any, ...]] = []
    cks: list[dict[str, Any]] = []
    metas: list[dict[str, Any]] = []
    writes: list[list[tuple[str, str, Any]]] = []
    parent: str | None = None
    v_start = f"{1:032}.{rng.random():016}"
    for i, t in enumerate(times):
        step = i - 1  # the first checkpoint is the input checkpoint, step -1
        ns = int(t * 1e9)
        cid = uuid6_at(ns, step, node)
        ts = datetime.fromtimestamp(t, UTC).isoformat()
        msgs = (
            TEMPLATES[min(N_TEMPLATES - 1, i * N_TEMPLATES // max(per_thread, 1))]
            if payload == "chat"
            else [SMALL_MESSAGES[i % len(SMALL_MESSAGES)]]
        )
        if step < 0:
            ck = {
                **base,
                "id": cid,
                "ts": ts,
                "channel_values": {"__start__": {"messages": msgs[:1]}},
                "channel_versions": {"__start__": v_start},
                "versions_seen": {"__input__": {}},
            }
            source = "input"
        else:
            v = f"{step + 2:032}.{rng.random():016}"
            ck = {
                **base,
                "id": cid,
                "ts": ts,
                "channel_values": {"messages": msgs},
                "channel_versions": {
                    "__start__": v_start,
                    "messages": v,
                    "branch:to:agent": v,
                },
                "versions_seen": {
                    "__input__": {},
                    "__start__": {"__start__": v_start},
                    "agent": {"branch:to:agent": v},
                },
            }
            source = "loop"
        meta = get_checkpoint_metadata(config, {"source": source, "step": step, "parents": {}})
        type_, blob = serde.dumps_typed(ck)
        meta_bytes = json.dumps(meta, ensure_ascii=False).encode("utf-8", "ignore")
        ck_rows.append((thread_id, "", cid, parent, type_, blob, meta_bytes))
        # The task that ran from this checkpoint wrote two channels.
        task_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        reply = (
            [MESSAGES[(i * 2 + 1) % len(MESSAGES)]]
            if payload == "chat"
            else [SMALL_MESSAGES[(i * 2 + 1) % len(SMALL_MESSAGES)]]
        )
        pending = [(task_id, "messages", reply), (task_id, "branch:to:agent", None)]
        for idx, (_, channel, value) in enumerate(pending):
            wt, wv = serde.dumps_typed(value)
            w_rows.append((thread_id, "", cid, task_id, TASK_PATH, idx, channel, wt, wv))
        cks.append(ck)
        metas.append(meta)
        writes.append(pending)
        parent = cid
    return ThreadRows(thread_id, ck_rows, w_rows, cks, metas, writes, idle)


def thread_ids(n: int) -> list[str]:
    rng = random.Random(f"threads:{n}")
    return sorted(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n))


# =========================================================== build


def build_store(
    path: Path, n_threads: int, per_thread: int, now: float, payload: str = "chat"
) -> dict[str, Any]:
    """Create `path` with the saver's DDL and bulk-insert the generated rows."""
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)
    # The real saver's schema, by the real saver.
    with SqliteSaver.from_conn_string(str(path)) as saver:
        saver.setup()
        serde = saver.serde
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    ck_sql = (
        "INSERT INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id,"
        " type, checkpoint, metadata) VALUES (?, ?, ?, ?, ?, ?, ?)"
    )
    w_sql = (
        "INSERT INTO writes (thread_id, checkpoint_ns, checkpoint_id, task_id, task_path, idx,"
        " channel, type, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    t0 = time.monotonic()
    ids = thread_ids(n_threads)
    idle = 0
    last_log = t0
    ck_buf: list[tuple[Any, ...]] = []
    w_buf: list[tuple[Any, ...]] = []
    conn.execute("BEGIN")
    for k, tid in enumerate(ids):
        rows = gen_thread(tid, per_thread, now, serde, payload)
        idle += rows.idle
        ck_buf.extend(rows.checkpoint_rows)
        w_buf.extend(rows.write_rows)
        if len(ck_buf) >= 200_000 or k == len(ids) - 1:
            conn.executemany(ck_sql, ck_buf)
            conn.executemany(w_sql, w_buf)
            ck_buf.clear()
            w_buf.clear()
            conn.execute("COMMIT")
            conn.execute("BEGIN")
            if time.monotonic() - last_log > 15 or k == len(ids) - 1:
                last_log = time.monotonic()
                log(f"  built {k + 1}/{n_threads} threads ({last_log - t0:.0f} s)")
    conn.execute("COMMIT")
    # As the saver leaves it.
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    assert mode == "wal", mode
    conn.close()
    return {
        "threads": n_threads,
        "per_thread": per_thread,
        "idle_threads_built": idle,
        "build_seconds": round(time.monotonic() - t0, 1),
    }


def verify_readback(
    path: Path, n_threads: int, per_thread: int, now: float, samples: int, payload: str = "chat"
) -> int:
    """Read sampled rows back through the real SqliteSaver; assert they are what was written."""
    ids = thread_ids(n_threads)
    rng = random.Random("verify")
    checked = 0
    with SqliteSaver.from_conn_string(str(path)) as saver:
        for tid in rng.sample(ids, min(samples, len(ids))):
            exp = gen_thread(tid, per_thread, now, saver.serde, payload)
            i = rng.randrange(per_thread)
            cid = exp.checkpoints[i]["id"]
            cfg = {"configurable": {"thread_id": tid, "checkpoint_ns": "", "checkpoint_id": cid}}
            tup = saver.get_tuple(cfg)
            assert tup is not None, (tid, cid)
            assert tup.checkpoint == exp.checkpoints[i], (tid, cid, tup.checkpoint)
            assert tup.metadata == exp.metadatas[i], (tid, cid, tup.metadata)
            assert [tuple(w) for w in tup.pending_writes or []] == exp.writes[i], (tid, cid)
            want_parent = exp.checkpoints[i - 1]["id"] if i > 0 else None
            got_parent = (
                tup.parent_config["configurable"]["checkpoint_id"] if tup.parent_config else None
            )
            assert got_parent == want_parent, (tid, cid, got_parent, want_parent)
            head = saver.get_tuple({"configurable": {"thread_id": tid, "checkpoint_ns": ""}})
            assert head is not None and head.checkpoint == exp.checkpoints[-1]
            listed = [
                t.checkpoint["id"]
                for t in saver.list({"configurable": {"thread_id": tid, "checkpoint_ns": ""}})
            ]
            assert listed == [c["id"] for c in reversed(exp.checkpoints)], tid
            # Age read from the id, as the worker reads it.
            assert (
                abs(uuid6_time(cid) - datetime.fromisoformat(exp.checkpoints[i]["ts"]).timestamp())
                < 1e-3
            )
            checked += 1
    checked += asyncio.run(_averify_heads(path, rng.sample(ids, min(5, len(ids))), per_thread,
                                          now, payload))  # fmt: skip
    return checked


async def _averify_heads(
    path: Path, ids: list[str], per_thread: int, now: float, payload: str
) -> int:
    """The async reader too: `AsyncSqliteSaver.aget_tuple` of a few heads and first checkpoints."""
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    checked = 0
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        for tid in ids:
            exp = gen_thread(tid, per_thread, now, saver.serde, payload)
            cfg = {"configurable": {"thread_id": tid, "checkpoint_ns": ""}}
            head = await saver.aget_tuple(cfg)  # type: ignore[arg-type]
            assert head is not None and head.checkpoint == exp.checkpoints[-1], tid
            assert head.metadata == exp.metadatas[-1], tid
            first_cfg = {"configurable": {**cfg["configurable"],
                                          "checkpoint_id": exp.checkpoints[0]["id"]}}  # fmt: skip
            first = await saver.aget_tuple(first_cfg)  # type: ignore[arg-type]
            assert first is not None and first.checkpoint == exp.checkpoints[0], tid
            assert first.parent_config is None, tid
            assert [tuple(w) for w in first.pending_writes or []] == exp.writes[0], tid
            checked += 2
    return checked


def store_name(n_threads: int, per_thread: int, payload: str) -> str:
    return f"base-{n_threads}x{per_thread}" + ("" if payload == "chat" else f"-{payload}")


def check_free_disk(workdir: Path, need: int, what: str) -> None:
    """Refuse to start a build (or a copy) that would fill the disk the workdir is on."""
    free = shutil.disk_usage(workdir).free
    log(f"{what}: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free in {workdir}")
    if free < need:
        raise SystemExit(f"not enough free disk in {workdir} for {what}")


def ensure_store(
    workdir: Path, n_threads: int, per_thread: int, rebuild: bool, payload: str = "chat"
) -> tuple[Path, dict]:
    """The cached base store for this shape, built (and read back) when missing or stale.

    The "small" stores serve only keep_last and no-op sweeps, whose result does
    not depend on how old the checkpoints are, so they never go stale by age;
    the "chat" store's idle/recent split is relative to its build time.
    """
    name = store_name(n_threads, per_thread, payload)
    base = workdir / f"{name}.db"
    meta_path = workdir / f"{name}.json"
    meta: dict[str, Any] | None = None
    if not rebuild and base.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        fresh = payload != "chat" or time.time() - meta.get("now", 0) < CACHE_MAX_AGE
        if meta.get("format") != BENCH_FORMAT or not fresh:
            log("cached store is stale (format or age): rebuilding")
            meta = None
        else:
            log(f"using cached store {base} (built {meta['built_at']})")
    if meta is None:
        now = time.time()
        remove_db(base)
        # The store, then at least one copy of it next to it.
        need = 2 * n_threads * per_thread * BYTES_PER_CHECKPOINT[payload] + 2**30
        check_free_disk(workdir, need, f"building {name} and one copy")
        log(f"building {n_threads} threads x {per_thread} checkpoints ({payload}) into {base}")
        tmp = workdir / (base.name + ".building")
        info = build_store(tmp, n_threads, per_thread, now, payload)
        log(f"built in {info['build_seconds']} s; verifying read-back through SqliteSaver")
        checked = verify_readback(tmp, n_threads, per_thread, now, 20, payload)
        for p in (base, Path(f"{base}-wal"), Path(f"{base}-shm")):
            p.unlink(missing_ok=True)
        tmp.rename(base)
        meta = {
            "format": BENCH_FORMAT,
            "now": now,
            "built_at": datetime.fromtimestamp(now, UTC).isoformat(),
            "readback_checked": checked,
            "payload": payload,
            "db_bytes": file_size(base),
            **info,
        }
        meta_path.write_text(json.dumps(meta, indent=2))
    # Re-verify the cached file cheaply every run (the saver reads it back).
    checked = verify_readback(base, n_threads, per_thread, meta["now"], 20, payload)
    log(f"read-back through the real SqliteSaver: {checked} sampled checkpoints OK")
    meta["readback_checked"] = checked
    return base, meta


def fresh_copy(base: Path, dst: Path) -> Path:
    """An identical copy of the built store, flushed to disk before it is measured.

    Without the sync the kernel writes the copy back while the measurement
    runs, and every fsync of a commit waits behind gigabytes of it.
    """
    remove_db(dst)
    # A reflink where the filesystem has them (btrfs, xfs): instant and shares
    # blocks until written; elsewhere `cp` falls back to a full copy.
    try:
        subprocess.run(["cp", "--reflink=auto", str(base), str(dst)], check=True)
    except (OSError, subprocess.CalledProcessError):
        shutil.copyfile(base, dst)
    os.sync()
    return dst


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def code_version() -> dict[str, Any]:
    """Which worker code was measured: git HEAD, dirty files, a hash of worker/ and policies/."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for sub in ("worker", "policies"):
        # Recursive: the code moved into subpackages (worker/stores, worker/sweep, ...).
        for f in sorted((root / sub).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
            ).stdout.rstrip("\n")
        except (OSError, subprocess.CalledProcessError):
            return None

    dirty = git("status", "--porcelain", "--", "worker", "policies")
    return {
        "git_head": (git("rev-parse", "--short", "HEAD") or "").strip() or None,
        "dirty_files": [line[3:] for line in dirty.splitlines()] if dirty else [],
        "code_sha256": h.hexdigest()[:16],
    }


def remove_db(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        p.unlink(missing_ok=True)


# =========================================================== helpers


def wal_size(db: Path) -> int:
    try:
        return os.path.getsize(f"{db}-wal")
    except OSError:
        return 0


class WalSampler:
    """Samples the size of `db`-wal every `interval` seconds; keeps the max."""

    def __init__(self, db: Path, interval: float = 0.02) -> None:
        self.db, self.interval = db, interval
        self.max = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max = max(self.max, wal_size(self.db))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> WalSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.max = max(self.max, wal_size(self.db))


def file_size(path: Path) -> int:
    return os.path.getsize(path) if path.exists() else 0


def integrity_ok(db: Path) -> str:
    conn = sqlite3.connect(str(db))
    try:
        return ";".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def shape_after_trim(db: Path, n_threads: int) -> dict[str, Any]:
    """Correctness after a keep_last trim: 5 per thread, their writes, no dangling parents."""
    conn = sqlite3.connect(str(db))
    try:
        q = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
        threads = q("SELECT COUNT(DISTINCT thread_id) FROM checkpoints")
        not_five = q(
            "SELECT COUNT(*) FROM (SELECT thread_id, COUNT(*) AS n FROM checkpoints"
            f" GROUP BY thread_id) WHERE n != {KEEP_LAST}"
        )
        checkpoints = q("SELECT COUNT(*) FROM checkpoints")
        writes = q("SELECT COUNT(*) FROM writes")
        orphan_writes = q(
            "SELECT COUNT(*) FROM writes w WHERE NOT EXISTS (SELECT 1 FROM checkpoints c"
            " WHERE c.thread_id = w.thread_id AND c.checkpoint_ns = w.checkpoint_ns"
            " AND c.checkpoint_id = w.checkpoint_id)"
        )
        dangling = q(
            "SELECT COUNT(*) FROM checkpoints c WHERE parent_checkpoint_id IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM checkpoints p WHERE p.thread_id = c.thread_id"
            " AND p.checkpoint_ns = c.checkpoint_ns AND p.checkpoint_id = c.parent_checkpoint_id)"
        )
    finally:
        conn.close()
    return {
        "threads": threads,
        "threads_not_5": not_five,
        "checkpoints": checkpoints,
        "writes": writes,
        "orphan_writes": orphan_writes,
        "dangling_parents": dangling,
        "ok": threads == n_threads
        and not_five == 0
        and orphan_writes == 0
        and dangling == 0
        and writes == 2 * checkpoints,
    }


# =========================================================== (a)

A_SQL = [
    f"""CREATE TEMP TABLE doomed AS
    SELECT thread_id, checkpoint_ns, checkpoint_id FROM (
        SELECT thread_id, checkpoint_ns, checkpoint_id,
               ROW_NUMBER() OVER (PARTITION BY thread_id, checkpoint_ns
                                  ORDER BY checkpoint_id DESC) AS rn
        FROM checkpoints)
    WHERE rn > {KEEP_LAST}""",
    """DELETE FROM writes WHERE (thread_id, checkpoint_ns, checkpoint_id)
    IN (SELECT thread_id, checkpoint_ns, checkpoint_id FROM doomed)""",
    """DELETE FROM checkpoints WHERE (thread_id, checkpoint_ns, checkpoint_id)
    IN (SELECT thread_id, checkpoint_ns, checkpoint_id FROM doomed)""",
    # As the official prune (and the worker): a kept checkpoint whose parent went has none.
    """UPDATE checkpoints SET parent_checkpoint_id = NULL
    WHERE parent_checkpoint_id IS NOT NULL AND (thread_id, checkpoint_ns, parent_checkpoint_id)
    IN (SELECT thread_id, checkpoint_ns, checkpoint_id FROM doomed)""",
]


def run_a(base: Path, workdir: Path, n_threads: int) -> dict[str, Any]:
    db = fresh_copy(base, workdir / "copy-a.db")
    size_before = file_size(db)
    conn = sqlite3.connect(str(db), isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    load0 = loadavg()
    cpu0 = time.process_time()
    t0 = time.monotonic()
    conn.execute("BEGIN IMMEDIATE")
    counts = []
    for sql in A_SQL:
        cur = conn.execute(sql)
        counts.append(cur.rowcount)
    conn.execute("COMMIT")
    seconds = time.monotonic() - t0
    cpu_seconds = time.process_time() - cpu0
    wal_after = wal_size(db)
    # Timed apart, not in `seconds`: the deleted pages are still only in the WAL
    # (the build zeroes them, SECURE_DELETE), and a worker that keeps its WAL
    # bounded copies them into the file while it runs.
    t1 = time.monotonic()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    checkpoint_seconds = time.monotonic() - t1
    conn.execute("DROP TABLE temp.doomed")
    conn.close()
    shape = shape_after_trim(db, n_threads)
    out = {
        "seconds": round(seconds, 2),
        "checkpoints_deleted": counts[2],
        "writes_deleted": counts[1],
        "parents_nulled": counts[3],
        "checkpoints_per_s": round(counts[2] / seconds),
        "longest_write_txn_s": round(seconds, 2),
        "wal_bytes_after": wal_after,
        "wal_checkpoint_seconds": round(checkpoint_seconds, 2),
        "db_bytes_before": size_before,
        "db_bytes_after": file_size(db),
        "shape": shape,
        "cpu_seconds": round(cpu_seconds, 1),
        "loadavg_before_after": [load0, loadavg()],
    }
    remove_db(db)
    return out


# =========================================================== worker runs


def write_config(
    workdir: Path,
    db: Path,
    name: str,
    policy: dict[str, Any],
    defaults: dict[str, Any] | None = None,
) -> Path:
    import yaml

    cfg: dict[str, Any] = {"stores": [{"name": "bench", "kind": "sqlite", "path": str(db)}]}
    if defaults:
        cfg["defaults"] = defaults
    cfg["policies"] = [{"name": name, **policy}]
    cfg["logging"] = {"format": "json", "level": "info"}
    path = workdir / f"config-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass
class WorkerRun:
    returncode: int
    wall_seconds: float
    peak_rss_kb: int | None
    wal_max_bytes: int
    batch_seconds: list[float] = field(default_factory=list)
    batch_rows: list[int] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    expired_events: int = 0
    started_at: float = 0.0
    ended_at: float = 0.0
    stderr_tail: str = ""
    cpu: dict[str, float] = field(default_factory=dict)
    code: dict[str, Any] = field(default_factory=dict)
    load: list[Any] = field(default_factory=list)


def run_worker(
    config: Path, db: Path, workdir: Path, tag: str, extra: list[str] | None = None
) -> WorkerRun:
    cmd = [*janitor_cmd(), "--config", str(config), "--log-level", "debug", "once", *(extra or [])]
    tag += RUN_SUFFIX
    timefile = workdir / f"time-{tag}.txt"
    errfile = workdir / f"worker-{tag}.log"
    cmd, use_time = under_time(cmd, timefile)
    load0 = loadavg()
    with WalSampler(db) as wal, open(errfile, "wb") as err:
        started = time.time()
        t0 = time.monotonic()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, check=False)
        wall = time.monotonic() - t0
        ended = time.time()
    peak, cpu = child_usage(use_time, timefile)
    run = WorkerRun(proc.returncode, wall, peak, wal.max, started_at=started, ended_at=ended)
    run.cpu = cpu
    run.code = code_version()
    run.load = [load0, loadavg()]
    text = errfile.read_text(errors="replace")
    for ev in log_events(errfile):
        if ev.get("event") == "batch":
            run.batch_seconds.append(float(ev["seconds"]))
            run.batch_rows.append(int(ev.get("rows", 0)))
        elif ev.get("event") == "sweep":
            run.summary = ev
        elif ev.get("event") == "thread_expired":
            run.expired_events += 1
    run.stderr_tail = "\n".join(text.splitlines()[-5:])
    return run


def worker_numbers(run: WorkerRun) -> dict[str, Any]:
    s = run.summary
    cps = int(s.get("checkpoints", 0))
    return {
        "exit_code": run.returncode,
        "wall_seconds": round(run.wall_seconds, 2),
        "sweep_seconds": s.get("duration_seconds"),
        "checkpoints_deleted": cps,
        "writes_deleted": s.get("writes"),
        "threads_expired": s.get("threads_expired"),
        "checkpoints_per_s": round(cps / run.wall_seconds) if run.wall_seconds else None,
        "checkpoints_per_s_sweep": (
            round(cps / s["duration_seconds"]) if s.get("duration_seconds") else None
        ),
        "batches": len(run.batch_seconds),
        "batch_seconds_total": round(sum(run.batch_seconds), 1),
        "longest_write_txn_s": round(max(run.batch_seconds), 4) if run.batch_seconds else None,
        "batch_p50_s": _r(pct(run.batch_seconds, 50), 4),
        "batch_p99_s": _r(pct(run.batch_seconds, 99), 4),
        "batches_250ms_or_more": sum(x >= 0.25 for x in run.batch_seconds),
        "batch_rows_p50": pct([float(r) for r in run.batch_rows], 50),
        "peak_rss_mb": round(run.peak_rss_kb / 1024, 1) if run.peak_rss_kb else None,
        "wal_max_bytes": run.wal_max_bytes,
        "changed_threads": s.get("changed_threads"),
        "outcome": s.get("outcome"),
        "cpu_seconds": run.cpu,
        "loadavg_before_after": run.load,
        "worker_code": run.code,
    }


def run_b(
    base: Path,
    workdir: Path,
    n_threads: int,
    no_pause: bool = False,
    db: Path | None = None,
    check_integrity: bool = True,
) -> dict[str, Any]:
    """(b); with `no_pause` the diagnostic (b0): the same with `pause_factor: 0`.

    `db`: an untouched copy to use (the no-op run's, which deleted nothing)
    instead of a fresh one; it is removed afterwards either way.
    """
    tag = "b0" if no_pause else "b"
    if db is None:
        db = fresh_copy(base, workdir / f"copy-{tag}.db")
    defaults = {"batch": {"pause_factor": 0}} if no_pause else None
    name = "keep5-nopause" if no_pause else "keep5"
    config = write_config(workdir, db, name, {"keep_last": KEEP_LAST}, defaults)
    run = run_worker(config, db, workdir, tag)
    out = worker_numbers(run)
    if run.returncode != 0:
        out["stderr_tail"] = run.stderr_tail
    out["shape"] = shape_after_trim(db, n_threads)
    # integrity_check reads every page: minutes on the 10M store, so scale runs skip it.
    out["integrity_check"] = integrity_ok(db) if check_integrity else "ok (not run)"
    out["db_bytes_after"] = file_size(db)
    remove_db(db)
    return out


# =========================================================== no-op sweep

# A no-op sweep's limit, part 1: the per-(thread, namespace) summary a planner
# needs, read from the primary-key index alone (GROUP BY follows its order).
NOOP_AGGREGATE_SQL = """SELECT thread_id, checkpoint_ns, count(*), min(checkpoint_id),
    max(checkpoint_id) FROM checkpoints GROUP BY 1, 2"""
# Part 2: each head's metadata (metadata rules and the waiting check look at
# heads only), one primary-key lookup per head.
NOOP_HEAD_METADATA_SQL = """SELECT metadata FROM checkpoints
    WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id = ?"""
# The bench stores hold at most 50 checkpoints a thread, none older than 60
# days: keep_last 50 keeps them all and expire_after 365d expires no thread.
NOOP_POLICY = {"keep_last": 50, "expire_after": "365d"}


def noop_limit(db: Path) -> dict[str, Any]:
    """Time the aggregate and the heads' metadata reads (with JSON decoding) on `db`."""
    conn = sqlite3.connect(str(db))
    try:
        load0 = loadavg()
        cpu0 = time.process_time()
        t0 = time.monotonic()
        groups = conn.execute(NOOP_AGGREGATE_SQL).fetchall()
        t1 = time.monotonic()
        decoded = 0
        for tid, ns, _n, _lo, head in groups:
            (meta,) = conn.execute(NOOP_HEAD_METADATA_SQL, (tid, ns, head)).fetchone()
            decoded += bool(json.loads(meta))
        t2 = time.monotonic()
        cpu = time.process_time() - cpu0
    finally:
        conn.close()
    return {
        "seconds": round(t2 - t0, 3),
        "aggregate_seconds": round(t1 - t0, 3),
        "head_metadata_seconds": round(t2 - t1, 3),
        "groups": len(groups),
        "checkpoints": sum(g[2] for g in groups),
        "heads_with_metadata": decoded,
        "cpu_seconds": round(cpu, 2),
        "loadavg_before_after": [load0, loadavg()],
    }


def run_noop(
    base: Path, workdir: Path, keep_copy: bool = False
) -> tuple[dict[str, Any], Path | None]:
    """A sweep with nothing due against its limit, on one copy (nothing is deleted).

    The limit runs first and again after the worker, and the faster of the two
    counts, so neither side gets the page cache the other warmed. The worker
    runs twice: the first sweep of a store looks at every quiet thread's
    residue and dates the look (`defaults.residue_check_every`, default 1d),
    the second is the steady state the ratio is taken on. With `keep_copy`
    the untouched copy is handed back for (b).
    """
    db = fresh_copy(base, workdir / "copy-noop.db")
    before = noop_limit(db)
    config = write_config(workdir, db, "noop", NOOP_POLICY)
    first = run_worker(config, db, workdir, "noop-first")
    run = run_worker(config, db, workdir, "noop")
    after = noop_limit(db)
    worker = worker_numbers(run)
    if run.returncode != 0:
        worker["stderr_tail"] = run.stderr_tail
    limit = min(before, after, key=lambda x: x["seconds"])
    limit["runs_seconds"] = [before["seconds"], after["seconds"]]
    worker["rows_unchanged"] = after["checkpoints"] == before["checkpoints"]
    out = {
        "limit": limit,
        "worker": worker,
        "first_sweep": worker_numbers(first),
        "ratio_worker_to_limit": round(run.wall_seconds / limit["seconds"], 2),
        "ratio_first_sweep_to_limit": round(first.wall_seconds / limit["seconds"], 2),
    }
    if keep_copy and worker["rows_unchanged"] and not worker["checkpoints_deleted"]:
        return out, db
    remove_db(db)
    return out, None


# =========================================================== the concurrent writer


def writer_main(spec_path: str) -> None:
    """A separate process: real AsyncSqliteSaver.aput + aput_writes at `rate` per second."""
    spec = json.loads(Path(spec_path).read_text())
    asyncio.run(_writer(spec))


async def _writer(spec: dict[str, Any]) -> None:
    from langgraph.checkpoint.base.id import uuid6
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

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
    async with AsyncSqliteSaver.from_conn_string(spec["db"]) as saver:
        await saver.setup()
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
            ck = empty_checkpoint()
            ck["id"] = str(uuid6(clock_seq=step))
            msgs = TEMPLATES[k % N_TEMPLATES]
            v = saver.get_next_version(None, None)
            ck["channel_values"] = {"messages": msgs}
            ck["channel_versions"] = {"messages": v, "branch:to:agent": v}
            ck["versions_seen"] = {"agent": {"branch:to:agent": v}}
            cfg: dict[str, Any] = {"configurable": {"thread_id": tid, "checkpoint_ns": ""}}
            if parent:
                cfg["configurable"]["checkpoint_id"] = parent
            rec: dict[str, Any] = {"t": time.time(), "kind": kind}
            t0 = time.perf_counter()
            try:
                new_cfg = await saver.aput(
                    cfg,
                    ck,
                    {"source": "loop", "step": step, "parents": {}},
                    {"messages": v, "branch:to:agent": v},
                )
                rec["aput"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                await saver.aput_writes(
                    new_cfg,
                    [("messages", [MESSAGES[k % len(MESSAGES)]]), ("branch:to:agent", None)],
                    str(uuid.uuid4()),
                    TASK_PATH,
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
        self, workdir: Path, db: Path, tag: str, rate: float, swept: list, duration: float | None
    ) -> None:
        self.workdir = workdir
        self.stop_file = workdir / f"writer-{tag}.stop"
        self.ready_file = workdir / f"writer-{tag}.ready"
        self.out = workdir / f"writer-{tag}.json"
        for p in (self.stop_file, self.ready_file, self.out):
            p.unlink(missing_ok=True)
        spec = {
            "db": str(db),
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


def swept_heads(db: Path, count: int, seed: str) -> list[list[str]]:
    conn = sqlite3.connect(str(db))
    try:
        rows = conn.execute(
            "SELECT thread_id, MAX(checkpoint_id) FROM checkpoints WHERE checkpoint_ns = ''"
            " GROUP BY thread_id"
        ).fetchall()
    finally:
        conn.close()
    rng = random.Random(seed)
    return [list(r) for r in rng.sample(rows, min(count, len(rows)))]


def run_b_load(
    base: Path,
    workdir: Path,
    n_threads: int,
    rate: float,
    baseline_seconds: float,
    target_batch: float | None = None,
    pause_factor: float | None = None,
) -> dict[str, Any]:
    """(b-load); with `target_batch`, the same with `defaults.batch.target_batch_seconds` set
    (and `pause_factor`, when given, `defaults.batch.pause_factor`)."""
    tag = "bload" if target_batch is None else f"tb{target_batch:g}"
    batch: dict[str, float] = {}
    if target_batch is not None:
        batch["target_batch_seconds"] = target_batch
    if pause_factor is not None:
        batch["pause_factor"] = pause_factor
        tag += f"-pf{pause_factor:g}"
    db = fresh_copy(base, workdir / f"copy-{tag}.db")
    defaults = {"batch": batch} if batch else None
    config = write_config(workdir, db, f"keep5-{tag}", {"keep_last": KEEP_LAST}, defaults)
    heads = swept_heads(db, 20_000, "swept")
    half = len(heads) // 2
    # Baseline: the writer alone.
    log(f"  (b-load) baseline: writer alone for {baseline_seconds:.0f} s at {rate}/s")
    w0 = Writer(workdir, db, f"baseline-{tag}", rate, heads[:half], duration=baseline_seconds)
    w0.start()
    w0.proc.wait()  # type: ignore[union-attr]
    baseline = summarize_writer(json.loads(w0.out.read_text()), None, None)
    # Under the sweep.
    log("  (b-load) sweep with the writer running")
    w1 = Writer(workdir, db, f"load-{tag}", rate, heads[half:], duration=None)
    w1.start()
    time.sleep(1.0)
    run = run_worker(config, db, workdir, tag)
    time.sleep(1.0)
    result = w1.finish()
    during = summarize_writer(result, run.started_at, run.ended_at)
    overall = summarize_writer(result, None, None)
    # No checkpoint the writer committed is lost: each is the newest of its
    # thread (swept threads get one; load threads <= 3), so keep_last keeps it.
    conn = sqlite3.connect(str(db))
    try:
        lost = sum(
            1
            for tid, cid in result["committed"]
            if conn.execute(
                "SELECT 1 FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = '' AND"
                " checkpoint_id = ?",
                (tid, cid),
            ).fetchone()
            is None
        )
        over = conn.execute(
            "SELECT COUNT(*) FROM (SELECT thread_id, COUNT(*) AS n FROM checkpoints"
            f" GROUP BY thread_id) WHERE n > {KEEP_LAST}"
        ).fetchone()[0]
    finally:
        conn.close()
    out = worker_numbers(run)
    if run.returncode != 0:
        out["stderr_tail"] = run.stderr_tail
    out.update(
        {
            "writer_baseline": baseline,
            "writer_during_sweep": during,
            "writer_whole_run": overall,
            "writer_checkpoints_committed": len(result["committed"]),
            "writer_checkpoints_lost": lost,
            "threads_left_over_5": over,
            "integrity_check": integrity_ok(db),
            "target_batch_seconds": target_batch,
        }
    )
    remove_db(db)
    return out


# =========================================================== (c)


def idle_threads(db: Path, now: float) -> list[str]:
    conn = sqlite3.connect(str(db))
    try:
        rows = conn.execute(
            "SELECT thread_id, MAX(checkpoint_id) FROM checkpoints WHERE checkpoint_ns = ''"
            " GROUP BY thread_id"
        ).fetchall()
    finally:
        conn.close()
    return [tid for tid, head in rows if now - uuid6_time(head) > IDLE_DAYS * DAY]


def thread_set(db: Path) -> set[str]:
    conn = sqlite3.connect(str(db))
    try:
        a = {r[0] for r in conn.execute("SELECT DISTINCT thread_id FROM checkpoints")}
        b = {r[0] for r in conn.execute("SELECT DISTINCT thread_id FROM writes")}
        return a | b
    finally:
        conn.close()


def run_c(base: Path, workdir: Path) -> dict[str, Any]:
    now = time.time()
    # The official loop first: SqliteSaver.delete_thread over the idle threads.
    db_loop = fresh_copy(base, workdir / "copy-c-loop.db")
    idle = idle_threads(db_loop, now)
    conn = sqlite3.connect(str(db_loop))
    rows_before = sum(
        conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("checkpoints", "writes")
    )
    conn.close()
    log(f"  (c) delete_thread loop over {len(idle)} idle threads")
    per_call: list[float] = []
    with SqliteSaver.from_conn_string(str(db_loop)) as saver:
        saver.setup()
        load0 = loadavg()
        with WalSampler(db_loop) as wal:
            cpu0 = time.process_time()
            t0 = time.monotonic()
            for tid in idle:
                t1 = time.perf_counter()
                saver.delete_thread(tid)
                per_call.append(time.perf_counter() - t1)
            loop_seconds = time.monotonic() - t0
            loop_cpu = time.process_time() - cpu0
    conn = sqlite3.connect(str(db_loop))
    rows_after = sum(
        conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("checkpoints", "writes")
    )
    conn.close()
    left_loop = thread_set(db_loop)
    remove_db(db_loop)
    loop = {
        "threads": len(idle),
        "rows_deleted": rows_before - rows_after,
        "seconds": round(loop_seconds, 2),
        "threads_per_s": round(len(idle) / loop_seconds, 1),
        "longest_write_txn_s": round(max(per_call), 4) if per_call else None,
        "txn_p50_s": _r(pct(per_call, 50), 4),
        "wal_max_bytes": wal.max,
        "cpu_seconds": round(loop_cpu, 1),
        "loadavg_before_after": [load0, loadavg()],
    }
    # The worker: expire_after 30d, safety limit lifted for this one run.
    db = fresh_copy(base, workdir / "copy-c-worker.db")
    config = write_config(workdir, db, "idle30", {"expire_after": f"{IDLE_DAYS}d"})
    log("  (c) checkpoint-janitor once --allow-mass-expiry, expire_after: 30d")
    run = run_worker(config, db, workdir, "c", ["--allow-mass-expiry"])
    worker = worker_numbers(run)
    if run.returncode != 0:
        worker["stderr_tail"] = run.stderr_tail
    worker["thread_expired_events"] = run.expired_events
    left_worker = thread_set(db)
    worker["same_threads_left_as_loop"] = left_worker == left_loop
    worker["integrity_check"] = integrity_ok(db)
    expired = int(run.summary.get("threads_expired", 0) or 0)
    worker["threads_per_s"] = round(expired / run.wall_seconds, 1) if run.wall_seconds else None
    worker["rows_deleted"] = int(run.summary.get("checkpoints", 0) or 0) + int(
        run.summary.get("writes", 0) or 0
    )
    remove_db(db)
    return {"delete_thread_loop": loop, "worker": worker}


# =========================================================== report


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "ram_gib": ram_gib(),
        "sqlite": sqlite3.sqlite_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "langgraph": version("langgraph"),
        "langgraph-checkpoint-sqlite": version("langgraph-checkpoint-sqlite"),
        "checkpoint-janitor": version("checkpoint-janitor"),
    }


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    a, b, bl, c = res.get("a"), res.get("b"), res.get("b_load"), res.get("c")

    def add(name: str, value: str, met: bool | None) -> None:
        out.append({"target": name, "measured": value, "met": met})

    if noop := res.get("noop"):
        r = noop["ratio_worker_to_limit"]
        add("(noop) no-op sweep <= 3x its aggregate limit", f"{r:.1f}x", r <= 3)
        mib = noop["worker"]["peak_rss_mb"]
        if mib is not None:
            add("(noop) peak RSS < 200 MB", f"{mib} MiB", mib * 2**20 < 200e6)
    if a and b:
        r = b["checkpoints_per_s"] / a["checkpoints_per_s"]
        add("(b) throughput >= (a)", f"{r:.2f}x of (a)", r >= 1.0)
    if c:
        r = c["delete_thread_loop"]["seconds"] / c["worker"]["wall_seconds"]
        add("(c) >= 1.3x the delete_thread loop", f"{r:.2f}x", r >= 1.3)
    for key, label in (("b", "(b)"), ("b_load", "(b-load)")):
        if res.get(key) and res[key].get("longest_write_txn_s") is not None:
            v = res[key]["longest_write_txn_s"]
            add(f"{label} longest write transaction < 250 ms", f"{v * 1000:.0f} ms", v < 0.25)
    if c and c["worker"].get("longest_write_txn_s") is not None:
        v = c["worker"]["longest_write_txn_s"]
        add("(c) longest write transaction < 250 ms", f"{v * 1000:.0f} ms", v < 0.25)
    if bl:
        d = bl["writer_during_sweep"]
        add(
            "(b-load) writer never errors",
            f"{d['errors']} errors / {d['puts']} puts",
            d["errors"] == 0,
        )
        p99 = d["aput"]["p99_ms"]
        add(
            "(b-load) writer aput p99 during sweep < 50 ms",
            f"{p99} ms",
            p99 is not None and p99 < 50,
        )
    for value, r_tb in res.get("tb", {}).items():
        p99 = r_tb["writer_during_sweep"]["aput"]["p99_ms"]
        tput = r_tb["checkpoints_per_s"] / a["checkpoints_per_s"] if a else None
        add(
            f"(tb {value}) writer p99 <= 50 ms at >= 0.6x of (a)",
            f"p99 {p99} ms at " + (f"{tput:.2f}x" if tput is not None else "? (no (a))"),
            p99 is not None and p99 <= 50 and tput is not None and tput >= 0.6,
        )
        add(
            f"(tb {value}) writer never errors",
            f"{r_tb['writer_during_sweep']['errors']} errors",
            r_tb["writer_during_sweep"]["errors"] == 0,
        )
    for key, label in (("b", "(b)"), ("b_load", "(b-load)")):
        if res.get(key):
            v = res[key]["wal_max_bytes"]
            # "Bounded": a fixed size, far from the store's; we call < 128 MiB bounded.
            add(f"{label} WAL bounded during sweep (< 128 MiB)", mb(v), v < 128 * 2**20)
    for key, label in (("b", "(b)"), ("b_load", "(b-load)"), ("c", "(c)")):
        r = res.get(key)
        if r and key == "c":
            r = r["worker"]
        if r and r.get("peak_rss_mb") is not None:
            mib = r["peak_rss_mb"]
            add(f"{label} peak RSS < 200 MB", f"{mib} MiB", mib * 2**20 < 200e6)
    return out


def ratios_of(one: dict[str, Any]) -> dict[str, float]:
    ratios: dict[str, float] = {}
    if one.get("noop"):
        ratios["(noop) worker / aggregate limit, seconds"] = one["noop"]["ratio_worker_to_limit"]
    for value, r in one.get("tb", {}).items():
        if one.get("a"):
            ratios[f"(tb {value}) throughput / (a)"] = round(
                r["checkpoints_per_s"] / one["a"]["checkpoints_per_s"], 3
            )
        ratios[f"(tb {value}) writer aput p99 ms"] = r["writer_during_sweep"]["aput"]["p99_ms"]
    if one.get("a") and one.get("b"):
        ratios["(b)/(a) throughput"] = round(
            one["b"]["checkpoints_per_s"] / one["a"]["checkpoints_per_s"], 3
        )
        if (ckpt := one["a"].get("wal_checkpoint_seconds")) is not None:
            whole = one["a"]["checkpoints_deleted"] / (one["a"]["seconds"] + ckpt)
            ratios["(b)/(a + its WAL checkpoint) throughput"] = round(
                one["b"]["checkpoints_per_s"] / whole, 3
            )
    if one.get("a") and one.get("b0"):
        ratios["(b0)/(a) throughput"] = round(
            one["b0"]["checkpoints_per_s"] / one["a"]["checkpoints_per_s"], 3
        )
    if one.get("a") and one.get("b_load"):
        ratios["(b-load)/(a) throughput"] = round(
            one["b_load"]["checkpoints_per_s"] / one["a"]["checkpoints_per_s"], 3
        )
    if one.get("c"):
        ratios["(c) worker speedup over delete_thread loop"] = round(
            one["c"]["delete_thread_loop"]["seconds"] / one["c"]["worker"]["wall_seconds"], 3
        )
    if one.get("b_load"):
        bl = one["b_load"]
        base_p99 = bl["writer_baseline"]["aput"]["p99_ms"]
        load_p99 = bl["writer_during_sweep"]["aput"]["p99_ms"]
        if base_p99 and load_p99:
            ratios["(b-load) writer aput p99 during sweep / alone"] = round(load_p99 / base_p99, 2)
    return ratios


def worker_cpu(run: dict[str, Any]) -> str:
    cpu = run.get("cpu_seconds") or {}
    return fmt(round(cpu["user_s"] + cpu["sys_s"], 1)) if cpu else "-"


def print_report(res: dict[str, Any]) -> None:
    print()
    print("=" * 100)
    m = res["machine"]
    s = res["store"]
    print(
        f"machine: {m['nproc']} cpu ({m['cpu']}), {m['ram_gib']} GiB RAM, SQLite {m['sqlite']},"
        f" Python {m['python']}, langgraph {m['langgraph']},"
        f" langgraph-checkpoint-sqlite {m['langgraph-checkpoint-sqlite']}"
    )
    cv = res["worker_code"]
    print(
        f"worker code: git {cv['git_head']}, sha256 {cv['code_sha256']},"
        f" {len(cv['dirty_files'])} uncommitted files; load average at start"
        f" {res['loadavg_at_start']}, at end {res.get('loadavg_at_end')}"
    )
    print(
        f"store: {s['threads']:,} threads x {s['per_thread']} = {s['checkpoints']:,} checkpoints,"
        f" {s['writes']:,} writes, {mb(s['db_bytes'])}, {s['idle_threads']:,} idle (> 30 d)"
    )
    rows: list[tuple[str, ...]] = []
    hdr = (
        "run",
        "seconds",
        "cpu s",
        "checkpoints",
        "writes",
        "ckpt/s",
        "longest txn",
        "peak RSS",
        "max WAL",
        "check",
    )
    if noop := res.get("noop"):
        lim, w = noop["limit"], noop["worker"]
        rows.append(
            (
                "(noop) limit: GROUP BY + heads",
                fmt(lim["seconds"]),
                fmt(lim["cpu_seconds"]),
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                f"{lim['groups']:,} groups",
            )
        )
        if f := noop.get("first_sweep"):
            rows.append(
                (
                    "(noop) first sweep (residue look)",
                    fmt(f["wall_seconds"]),
                    worker_cpu(f),
                    fmt(f["checkpoints_deleted"]),
                    fmt(f["writes_deleted"]),
                    "-",
                    "-",
                    f"{f['peak_rss_mb']} MiB",
                    mb(f["wal_max_bytes"]),
                    "ok" if f["exit_code"] == 0 else "BAD",
                )
            )
        rows.append(
            (
                "(noop) janitor, nothing due",
                fmt(w["wall_seconds"]),
                worker_cpu(w),
                fmt(w["checkpoints_deleted"]),
                fmt(w["writes_deleted"]),
                "-",
                "-",
                f"{w['peak_rss_mb']} MiB",
                mb(w["wal_max_bytes"]),
                "ok" if w["rows_unchanged"] and w["exit_code"] == 0 else "BAD",
            )
        )
    if a := res.get("a"):
        rows.append(
            (
                "(a) one DELETE txn",
                fmt(a["seconds"]),
                fmt(a.get("cpu_seconds")),
                fmt(a["checkpoints_deleted"]),
                fmt(a["writes_deleted"]),
                fmt(a["checkpoints_per_s"]),
                f"{a['longest_write_txn_s']:.2f} s",
                "-",
                mb(a["wal_bytes_after"]),
                "ok" if a["shape"]["ok"] else "BAD",
            )
        )
    for key, label in (
        ("b", "(b) janitor keep_last 5"),
        ("b0", "(b0) as (b), pause_factor 0"),
        ("b_load", "(b-load) + aput 50/s"),
    ):
        if b := res.get(key):
            chk = "ok" if b.get("integrity_check") == "ok" else "BAD"
            if key in ("b", "b0"):
                chk = "ok" if b["shape"]["ok"] and chk == "ok" else "BAD"
            rows.append(
                (
                    label,
                    fmt(b["wall_seconds"]),
                    worker_cpu(b),
                    fmt(b["checkpoints_deleted"]),
                    fmt(b["writes_deleted"]),
                    fmt(b["checkpoints_per_s"]),
                    f"{(b['longest_write_txn_s'] or 0) * 1000:.0f} ms",
                    f"{b['peak_rss_mb']} MiB",
                    mb(b["wal_max_bytes"]),
                    chk,
                )
            )
    if c := res.get("c"):
        lp, w = c["delete_thread_loop"], c["worker"]
        rows.append(
            (
                f"(c) delete_thread x{lp['threads']:,}",
                fmt(lp["seconds"]),
                fmt(lp.get("cpu_seconds")),
                "-",
                f"{lp['rows_deleted']:,} rows",
                "-",
                f"{lp['longest_write_txn_s'] * 1000:.0f} ms",
                "-",
                mb(lp["wal_max_bytes"]),
                "-",
            )
        )
        chk = "ok" if w["integrity_check"] == "ok" and w["same_threads_left_as_loop"] else "BAD"
        rows.append(
            (
                "(c) janitor expire_after 30d",
                fmt(w["wall_seconds"]),
                worker_cpu(w),
                fmt(w["checkpoints_deleted"]),
                fmt(w["writes_deleted"]),
                fmt(w["checkpoints_per_s"]),
                f"{(w['longest_write_txn_s'] or 0) * 1000:.0f} ms",
                f"{w['peak_rss_mb']} MiB",
                mb(w["wal_max_bytes"]),
                chk,
            )
        )
    for value, t in res.get("tb", {}).items():
        ok = t.get("integrity_check") == "ok" and not t["writer_checkpoints_lost"]
        chk = "ok" if ok else "BAD"
        rows.append(
            (
                f"(tb {value}) b-load, target {value} s",
                fmt(t["wall_seconds"]),
                worker_cpu(t),
                fmt(t["checkpoints_deleted"]),
                fmt(t["writes_deleted"]),
                fmt(t["checkpoints_per_s"]),
                f"{(t['longest_write_txn_s'] or 0) * 1000:.0f} ms",
                f"{t['peak_rss_mb']} MiB",
                mb(t["wal_max_bytes"]),
                chk,
            )
        )
    print_table(hdr, rows)
    loaded = [("b-load", res["b_load"])] if res.get("b_load") else []
    loaded += [(f"tb {v}", t) for v, t in res.get("tb", {}).items()]
    for name, bl in loaded:
        print()
        print_writer_load(bl, f"{name} writer alone", f"{name} writer in sweep")
    reps = res.get("repetitions", [])
    if len(reps) > 1:
        print()
        print("per repetition (seconds):")
        for key, get in (
            ("noop", lambda x: (x["limit"]["seconds"], x["worker"]["wall_seconds"])),
            ("a", lambda x: x["seconds"]),
            ("b", lambda x: x["wall_seconds"]),
            ("b0", lambda x: x["wall_seconds"]),
            ("b_load", lambda x: x["wall_seconds"]),
            ("c", lambda x: (x["delete_thread_loop"]["seconds"], x["worker"]["wall_seconds"])),
        ):
            vals = [get(one[key]) for one in reps if key in one]
            if vals:
                print(f"  {key}: {vals}")
        for name in reps[0]["ratios"]:
            print(f"  ratio {name}: {[one['ratios'][name] for one in reps]}")
    print_verdict(res.get("ratios", {}), res.get("targets", []))
    print("=" * 100)


# =========================================================== --scale


def run_scale(
    workdir: Path, sizes: list[int], per_thread: int, repeat: int, rebuild: bool
) -> dict[str, Any]:
    """The no-op sweep and keep_last 5 on small-payload stores of each size.

    Each repetition measures every size in turn (same moment, similar load), so
    the big/small time ratios are taken within one repetition. The no-op run's
    copy, untouched, is the keep_last run's copy.
    """
    global RUN_SUFFIX
    stores: dict[int, dict[str, Any]] = {}
    for n in sizes:
        base, meta = ensure_store(workdir, n, per_thread, rebuild, "small")
        stores[n] = {
            "path": str(base),
            "threads": n,
            "per_thread": per_thread,
            "checkpoints": n * per_thread,
            "db_bytes": file_size(base),
            "built_at": meta["built_at"],
            "build_seconds": meta.get("build_seconds"),
            "readback_checked": meta["readback_checked"],
        }
    reps: list[dict[str, Any]] = []
    for r in range(repeat):
        one: dict[str, Any] = {"sizes": {}}
        for n in sizes:
            base = Path(stores[n]["path"])
            RUN_SUFFIX = f"-{n}" + (f"-r{r + 1}" if repeat > 1 else "")
            check_free_disk(workdir, file_size(base) + 2**30, f"a copy of {base.name}")
            log(f"(scale {n:,} threads, rep {r + 1}/{repeat}) no-op sweep vs its limit")
            noop, db = run_noop(base, workdir, keep_copy=True)
            w_s, lim_s = noop["worker"]["wall_seconds"], noop["limit"]["seconds"]
            log(f"    worker {w_s} s, limit {lim_s} s")
            log(f"(scale {n:,} threads, rep {r + 1}/{repeat}) keep_last 5")
            b = run_b(base, workdir, n, db=db, check_integrity=False)
            log(f"    {b['wall_seconds']} s, {b['checkpoints_per_s']} checkpoints/s")
            one["sizes"][str(n)] = {"noop": noop, "b": b}
        one["ratios"] = scale_ratios(one["sizes"], sizes)
        reps.append(one)
    median: dict[str, Any] = {}
    for n in sizes:
        runs = [one["sizes"][str(n)] for one in reps]
        median[str(n)] = {
            kind: sorted((x[kind] for x in runs), key=lambda v: v["wall_seconds"]
                         if kind == "b" else v["worker"]["wall_seconds"])[(len(runs) - 1) // 2]
            for kind in ("noop", "b")
        }  # fmt: skip
    ratios = {
        name: round(statistics.median(one["ratios"][name] for one in reps), 3)
        for name in reps[0]["ratios"]
    }
    out = {"stores": stores, "repetitions": reps, "median": median, "ratios": ratios}
    out["targets"] = scale_targets(out, sizes)
    return out


def scale_ratios(by_size: dict[str, Any], sizes: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for lo, hi in itertools.pairwise(sizes):
        a, b = by_size[str(lo)], by_size[str(hi)]
        out[f"rows x{hi / lo:g}: no-op sweep time ratio"] = round(
            b["noop"]["worker"]["wall_seconds"] / a["noop"]["worker"]["wall_seconds"], 2
        )
        out[f"rows x{hi / lo:g}: no-op limit time ratio"] = round(
            b["noop"]["limit"]["seconds"] / a["noop"]["limit"]["seconds"], 2
        )
        out[f"rows x{hi / lo:g}: keep_last 5 time ratio"] = round(
            b["b"]["wall_seconds"] / a["b"]["wall_seconds"], 2
        )
    return out


def scale_targets(res: dict[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
    out = []
    for lo, hi in itertools.pairwise(sizes):
        cap = 1.1 * hi / lo  # "at most linear": 11x for 10x the rows
        for kind in ("no-op sweep", "keep_last 5"):
            per_rep = [one["ratios"][f"rows x{hi / lo:g}: {kind} time ratio"] for one in
                       res["repetitions"]]  # fmt: skip
            out.append({
                "target": f"{kind}: {hi:,} threads take <= {cap:g}x the time of {lo:,}",
                "measured": " | ".join(f"{v}x" for v in per_rep),
                "met": all(v <= cap for v in per_rep),
            })  # fmt: skip
    rss: list[tuple[str, str, float | None]] = []
    for one in res["repetitions"]:
        for n, run in one["sizes"].items():
            rss.append((n, "no-op", run["noop"]["worker"]["peak_rss_mb"]))
            rss.append((n, "keep5", run["b"]["peak_rss_mb"]))
    worst = max((v for _, _, v in rss if v is not None), default=None)
    out.append({
        "target": "peak RSS < 200 MB at every size",
        "measured": ", ".join(f"{int(n):,} {k}: {v} MiB" for n, k, v in rss),
        "met": worst is not None and worst * 2**20 < 200e6,
    })  # fmt: skip
    return out


def print_scale(res: dict[str, Any]) -> None:
    sc = res["scale"]
    print()
    print("=" * 100)
    cv = res["worker_code"]
    print(
        f"worker code: git {cv['git_head']}, sha256 {cv['code_sha256']},"
        f" {len(cv['dirty_files'])} uncommitted files; load average at start"
        f" {res['loadavg_at_start']}, at end {res.get('loadavg_at_end')}"
    )
    hdr = (
        "store (small payload)",
        "file",
        "no-op s",
        "limit s",
        "no-op/limit",
        "no-op RSS",
        "keep5 s",
        "ckpt/s",
        "longest txn",
        "keep5 RSS",
        "load 1 min (keep5)",
    )
    rows = []
    for n, st in sc["stores"].items():
        m = sc["median"][str(n)]
        noop, b = m["noop"], m["b"]
        rows.append(
            (
                f"{st['threads']:,} x {st['per_thread']} = {st['checkpoints']:,}",
                f"{st['db_bytes'] / 2**30:.2f} GiB",
                fmt(noop["worker"]["wall_seconds"]),
                fmt(noop["limit"]["seconds"]),
                f"{noop['ratio_worker_to_limit']}x",
                f"{noop['worker']['peak_rss_mb']} MiB",
                fmt(b["wall_seconds"]),
                fmt(b["checkpoints_per_s"]),
                f"{(b['longest_write_txn_s'] or 0) * 1000:.0f} ms",
                f"{b['peak_rss_mb']} MiB",
                "{} -> {}".format(*(x[0] if x else "?" for x in b["loadavg_before_after"])),
            )
        )
    print_table(hdr, rows)
    print_verdict(sc["ratios"], sc["targets"])
    print("=" * 100)


def store_arguments(ap: argparse.ArgumentParser) -> None:
    """The store options every bench built on this one takes: its size and workdir."""
    ap.add_argument("--threads", type=int, default=20_000)
    ap.add_argument("--per-thread", type=int, default=50)
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "checkpoint-janitor-bench",
    )


def results_header() -> dict[str, Any]:
    """What every results file starts with: the command, when, the machine, the code."""
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": datetime.now(UTC).isoformat(),
        "machine": machine(),
        "worker_code": code_version(),
    }


# =========================================================== main


def main() -> None:
    global RUN_SUFFIX
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    store_arguments(ap)
    ap.add_argument(
        "--only",
        default="a,b,bload,c",
        help="comma-separated subset of noop,a,b,bload,c,tb (default: a,b,bload,c), plus the"
        " diagnostic b0 ((b) with pause_factor: 0); noop is a sweep with nothing due against"
        " its aggregate limit, tb is (b-load) once per --target-batch value",
    )
    ap.add_argument(
        "--target-batch",
        default="0.05,0.1,0.2",
        help="tb: the defaults.batch.target_batch_seconds values to run (default 0.05,0.1,0.2)",
    )
    ap.add_argument(
        "--tb-pause-factor",
        type=float,
        help="tb: also set defaults.batch.pause_factor (default: the worker's own default)",
    )
    ap.add_argument(
        "--scale",
        help="THREADS,THREADS,...: instead of the runs above, the no-op sweep and keep_last 5"
        " on small-payload stores of each size (--per-thread each), and the time and RSS"
        " ratios between them (e.g. 20000,200000 for 1M and 10M)",
    )
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached store")
    ap.add_argument(
        "--payload",
        choices=PAYLOADS,
        default="chat",
        help="checkpoint payload: chat (the default, ~4.6 KB a checkpoint with its writes) or"
        " small (a few hundred bytes; used by --scale)",
    )
    ap.add_argument(
        "--build-only", action="store_true", help="build (or check) the store, measure nothing"
    )
    ap.add_argument("--rate", type=float, default=50.0, help="(b-load) writer puts per second")
    ap.add_argument("--baseline-seconds", type=float, default=10.0)
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
    res: dict[str, Any] = {
        **results_header(),
        "loadavg_at_start": loadavg(),
    }
    if args.scale:
        sizes = [int(x) for x in args.scale.split(",") if x.strip()]
        res["scale"] = run_scale(workdir, sizes, args.per_thread, args.repeat, args.rebuild)
        res["finished_at"] = datetime.now(UTC).isoformat()
        res["loadavg_at_end"] = loadavg()
        out = workdir / f"results-scale-{'-'.join(map(str, sizes))}x{args.per_thread}.json"
        write_results(out, res)
        print_scale(res)
        log(f"results written to {out}")
        return
    base, meta = ensure_store(workdir, args.threads, args.per_thread, args.rebuild, args.payload)
    if args.build_only:
        log(f"store ready: {base} ({file_size(base) / 2**30:.2f} GiB)")
        return
    conn = sqlite3.connect(str(base))
    res["store"] = {
        "threads": args.threads,
        "per_thread": args.per_thread,
        "checkpoints": conn.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0],
        "writes": conn.execute("SELECT COUNT(*) FROM writes").fetchone()[0],
        "db_bytes": file_size(base),
        "page_size": conn.execute("PRAGMA page_size").fetchone()[0],
        "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
        "idle_threads": len(idle_threads(base, time.time())),
        "built_at": meta["built_at"],
        "build_seconds": meta.get("build_seconds"),
        "readback_checked": meta["readback_checked"],
    }
    conn.close()
    reps: list[dict[str, Any]] = []
    for r in range(args.repeat):
        RUN_SUFFIX = f"-r{r + 1}" if args.repeat > 1 else ""
        tag = f" [repetition {r + 1}/{args.repeat}]" if args.repeat > 1 else ""
        one: dict[str, Any] = {}
        if "noop" in only:
            log(f"(noop) a sweep with nothing due vs its aggregate limit{tag}")
            # (b) gets a fresh copy like (a), not the no-op run's: both then
            # start from a just-written file, whatever (a) did to the page cache.
            one["noop"], _ = run_noop(base, workdir)
            log(
                f"    worker {one['noop']['worker']['wall_seconds']} s,"
                f" limit {one['noop']['limit']['seconds']} s"
            )
        if "a" in only:
            log(f"(a) one set-based DELETE in one transaction{tag}")
            one["a"] = run_a(base, workdir, args.threads)
            log(f"    {one['a']['seconds']} s, {one['a']['checkpoints_per_s']} checkpoints/s")
        if "b" in only:
            log(f"(b) checkpoint-janitor once, keep_last: 5{tag}")
            one["b"] = run_b(base, workdir, args.threads)
            log(f"    {one['b']['wall_seconds']} s, {one['b']['checkpoints_per_s']} checkpoints/s")
        if "b0" in only:
            log(f"(b0) diagnostic: (b) with pause_factor 0{tag}")
            one["b0"] = run_b(base, workdir, args.threads, no_pause=True)
            log(
                f"    {one['b0']['wall_seconds']} s, {one['b0']['checkpoints_per_s']} checkpoints/s"
            )
        if "bload" in only:
            log(f"(b-load) the same under a concurrent aput writer{tag}")
            one["b_load"] = run_b_load(
                base, workdir, args.threads, args.rate, args.baseline_seconds
            )
            log(f"    {one['b_load']['wall_seconds']} s")
        if "c" in only:
            log(f"(c) expire_after 30d vs the delete_thread loop{tag}")
            one["c"] = run_c(base, workdir)
            log(
                f"    loop {one['c']['delete_thread_loop']['seconds']} s,"
                f" worker {one['c']['worker']['wall_seconds']} s"
            )
        if "tb" in only:
            for tb in [float(x) for x in args.target_batch.split(",") if x.strip()]:
                log(f"(tb) (b-load) with target_batch_seconds {tb:g}{tag}")
                pf = args.tb_pause_factor
                r_tb = run_b_load(
                    base, workdir, args.threads, args.rate, args.baseline_seconds, tb, pf
                )
                key = f"{tb:g}" if pf is None else f"{tb:g} pause_factor {pf:g}"
                one.setdefault("tb", {})[key] = r_tb
                log(
                    f"    {r_tb['wall_seconds']} s, writer p99"
                    f" {r_tb['writer_during_sweep']['aput']['p99_ms']} ms"
                )
        one["ratios"] = ratios_of(one)
        one["targets"] = targets(one)
        reps.append(one)
    res["repetitions"] = reps
    # The run of median time stands for each kind in the table; ratios are
    # taken within each repetition (same moment, same load) and their median
    # reported; a target counts as met only if every repetition met it.
    for key, metric in (
        ("noop", lambda x: x["worker"]["wall_seconds"]),
        ("a", lambda x: x["seconds"]),
        ("b", lambda x: x["wall_seconds"]),
        ("b0", lambda x: x["wall_seconds"]),
        ("b_load", lambda x: x["wall_seconds"]),
        ("c", lambda x: x["worker"]["wall_seconds"]),
    ):
        runs = [one[key] for one in reps if key in one]
        if runs:
            res[key] = sorted(runs, key=metric)[(len(runs) - 1) // 2]
    for value in reps[0].get("tb", {}):
        runs = [one["tb"][value] for one in reps]
        res.setdefault("tb", {})[value] = sorted(runs, key=lambda x: x["wall_seconds"])[
            (len(runs) - 1) // 2
        ]
    res["ratios"] = {
        name: round(statistics.median(one["ratios"][name] for one in reps), 3)
        for name in reps[0]["ratios"]
    }
    res["targets"] = [
        {
            "target": t["target"],
            "measured": " | ".join(one["targets"][i]["measured"] for one in reps),
            "met": all(one["targets"][i]["met"] for one in reps),
        }
        for i, t in enumerate(reps[0]["targets"])
    ]
    res["finished_at"] = datetime.now(UTC).isoformat()
    res["loadavg_at_end"] = loadavg()
    out = workdir / f"results-{args.threads}x{args.per_thread}.json"
    write_results(out, res)
    write_results(workdir / "results.json", res)
    print_report(res)
    log(f"results written to {out}")


if __name__ == "__main__":
    main()
