#!/usr/bin/env python
"""Orphan reconciliation benchmark (issue 14, "Benchmark (not a test)").

On identical copies of the `sqlite_bench.py` store (1M checkpoints by default),
with a registry listing half the threads, times `checkpoint-janitor once
--allow-mass-expiry` for:

  (orphan) an `orphaned` policy whose registry (a table in another SQLite file,
           `source: {kind: sqlite}`) lists every thread that is NOT idle for
           30 days, with a 1-day grace period (`expire_after: 1d`);
  (idle)   an idle-expiry policy, `expire_after: 30d`.

The registry is chosen so that both delete exactly the same threads: the
unlisted ones are the idle ones (newest checkpoint 32 to 58 days old, so they
are past both the 1-day grace and the 30 days; the listed ones are 10 minutes
to 28 days old). The bench checks it: both runs must leave the same row counts
and the same (thread, namespace, checkpoint id) keys of checkpoints and writes.
It reports each run's wall time and peak RSS (`/usr/bin/time -v`) and the
orphan / idle time ratio (target: at most 1.5x).

`--diag` adds (idle-rows): the same idle expiry written as a per-thread TTL
that no thread sets (`expire_after: {metadata_key: ..., default: 30d}`), which
the sweep decides from rows, where plain `expire_after` (and, since the
orphan planning of issue 14, an `orphaned` policy) is planned from
per-thread aggregates: it shows what reading rows costs.

    python bench/orphan_bench.py [--threads 20000 --per-thread 50 --workdir DIR --repeat 2]

The store is built (or reused from the workdir) by `sqlite_bench.ensure_store`;
each run gets a fresh copy. Results go to WORKDIR/orphan-results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from report import write_results
from sqlite_bench import (
    IDLE_DAYS,
    ensure_store,
    fresh_copy,
    idle_threads,
    integrity_ok,
    loadavg,
    remove_db,
    results_header,
    run_worker,
    store_arguments,
    thread_set,
    worker_numbers,
    write_config,
)
from synthetic import log

# The application's thread table, as a registry usually is: the id is its key,
# so the worker's per-page lookup (`id IN (<page>)`) is answered by the index.
REGISTRY_DDL = "CREATE TABLE chats (id TEXT PRIMARY KEY) WITHOUT ROWID"
REGISTRY_QUERY = "SELECT id FROM chats"
# The rows a sweep leaves, in key order, for comparing two stores exactly.
CHECKPOINT_KEYS_SQL = (
    "SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints ORDER BY 1, 2, 3"
)
WRITE_KEYS_SQL = (
    "SELECT thread_id, checkpoint_ns, checkpoint_id, task_id, idx FROM writes"
    " ORDER BY 1, 2, 3, 4, 5"
)
GRACE = "1d"


def build_registry(path: Path, listed: list[str]) -> None:
    """A separate SQLite file holding the application's known thread ids."""
    remove_db(path)
    conn = sqlite3.connect(str(path))
    try:
        conn.execute(REGISTRY_DDL)
        conn.executemany("INSERT INTO chats (id) VALUES (?)", ((t,) for t in sorted(listed)))
        conn.commit()
    finally:
        conn.close()


def store_digest(db: Path) -> dict[str, Any]:
    """Row counts and a sha256 of the sorted keys of checkpoints and writes."""
    conn = sqlite3.connect(str(db))
    out: dict[str, Any] = {}
    try:
        for table, sql in (("checkpoints", CHECKPOINT_KEYS_SQL), ("writes", WRITE_KEYS_SQL)):
            h = hashlib.sha256()
            n = 0
            for row in conn.execute(sql):
                h.update("|".join(map(str, row)).encode())
                h.update(b"\n")
                n += 1
            out[table] = {"rows": n, "sha256": h.hexdigest()}
    finally:
        conn.close()
    return out


def one_run(
    base: Path, workdir: Path, kind: str, policy: dict[str, Any], tag: str, integrity: bool
) -> dict[str, Any]:
    db = fresh_copy(base, workdir / f"orphan-copy-{kind}.db")
    config = write_config(workdir, db, f"{kind}", policy)
    log(f"  ({kind}) checkpoint-janitor once --allow-mass-expiry [{tag}]")
    run = run_worker(config, db, workdir, f"{kind}-{tag}", ["--allow-mass-expiry"])
    out = worker_numbers(run)
    if run.returncode != 0:
        out["stderr_tail"] = run.stderr_tail
    out["threads_left"] = len(thread_set(db))
    out["digest"] = store_digest(db)
    if integrity:
        out["integrity_check"] = integrity_ok(db)
    remove_db(db)
    log(
        f"    {out['wall_seconds']} s, peak RSS {out['peak_rss_mb']} MB,"
        f" {out['threads_expired']} threads expired, {out['checkpoints_deleted']} checkpoints"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    store_arguments(ap)
    ap.add_argument("--repeat", type=int, default=2, help="repetitions (median reported)")
    ap.add_argument("--integrity", action="store_true", help="PRAGMA integrity_check each copy")
    ap.add_argument(
        "--diag",
        action="store_true",
        help="also run (idle-rows): idle expiry decided from rows, not from aggregates",
    )
    args = ap.parse_args()
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = results_header()
    base, meta = ensure_store(workdir, args.threads, args.per_thread, rebuild=False)
    now = datetime.now(UTC).timestamp()
    every = sorted(thread_set(base))
    idle = set(idle_threads(base, now))
    listed = [t for t in every if t not in idle]
    registry = workdir / "orphan-registry.db"
    build_registry(registry, listed)
    res["store"] = {"path": str(base), "built_at": meta["built_at"], "threads": len(every)}
    res["registry"] = {"path": str(registry), "listed": len(listed), "unlisted": len(idle)}
    log(f"registry: {len(listed)} of {len(every)} threads listed, {len(idle)} not (the idle ones)")
    policies = {
        "orphan": {
            "orphaned": {
                "query": REGISTRY_QUERY,
                "source": {"kind": "sqlite", "path": str(registry)},
            },
            "expire_after": GRACE,
        },
        "idle": {"expire_after": f"{IDLE_DAYS}d"},
        # No checkpoint's metadata has this key: every thread falls back to 30d.
        "idle_rows": {"expire_after": {"metadata_key": "bench_ttl_minutes", "default": "30d"}},
    }
    reps: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        # Alternate the order, so neither kind always gets the warmer page cache.
        order = ["orphan", "idle"] if rep % 2 == 0 else ["idle", "orphan"]
        if args.diag:
            order.append("idle_rows")
        one: dict[str, Any] = {"order": order, "loadavg_before": loadavg()}
        for kind in order:
            one[kind] = one_run(base, workdir, kind, policies[kind], f"r{rep + 1}", args.integrity)
        one["loadavg_after"] = loadavg()
        o, i = one["orphan"], one["idle"]
        one["same_rows"] = o["digest"] == i["digest"]
        one["orphan_over_idle_seconds"] = round(o["wall_seconds"] / i["wall_seconds"], 3)
        one["orphan_over_idle_rss"] = round(o["peak_rss_mb"] / i["peak_rss_mb"], 3)
        if "idle_rows" in one:
            one["same_rows"] = one["same_rows"] and one["idle_rows"]["digest"] == i["digest"]
        log(
            f"  rep {rep + 1}: orphan / idle = {one['orphan_over_idle_seconds']}x time,"
            f" {one['orphan_over_idle_rss']}x RSS, same rows left: {one['same_rows']}"
        )
        reps.append(one)
    res["repetitions"] = reps
    ratio = statistics.median(r["orphan_over_idle_seconds"] for r in reps)
    res["median_orphan_over_idle_seconds"] = round(ratio, 3)
    res["target_met"] = all(r["orphan_over_idle_seconds"] <= 1.5 for r in reps)
    res["all_same_rows"] = all(r["same_rows"] for r in reps)
    res["finished_at"] = datetime.now(UTC).isoformat()
    write_results(workdir / "orphan-results.json", res)
    print()
    print("rep  order         orphan s  idle s  ratio  orphan RSS  idle RSS  expired  same rows")
    for n, r in enumerate(reps, 1):
        o, i = r["orphan"], r["idle"]
        print(
            f"{n:<4} {','.join(r['order']):<13} {o['wall_seconds']:>8}  {i['wall_seconds']:>6}"
            f"  {r['orphan_over_idle_seconds']:>5}  {o['peak_rss_mb']:>7} MB"
            f"  {i['peak_rss_mb']:>5} MB"
            f"  {o['threads_expired']}/{i['threads_expired']}  {r['same_rows']}"
        )
        if d := r.get("idle_rows"):
            print(f"     idle-rows: {d['wall_seconds']} s, peak RSS {d['peak_rss_mb']} MB")
    print(
        f"median orphan / idle: {res['median_orphan_over_idle_seconds']}x (target <= 1.5x:"
        f" {'MET' if res['target_met'] else 'MISSED'}); identical stores: {res['all_same_rows']}"
    )


if __name__ == "__main__":
    main()
