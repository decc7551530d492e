#!/usr/bin/env python
"""Reclaim benchmark (issue "Space comes back", "Benchmark (not a test)").

On copies of the `sqlite_bench.py` store after `once` with keep_last 5:

  (a) a plain `VACUUM`: time and file size after it;
  (b) `checkpoint-janitor reclaim --convert`: time and file size after it;
  (c) on (b)'s converted file, a second sweep (keep_last 2), then
      `checkpoint-janitor reclaim` while an application process writes chat
      turns through the real `AsyncSqliteSaver` (tests/helpers/live_writer.py): time,
      steps, the longest step (write lock held), the writer's p99 turn latency
      during it and its errors, and the file size.

    python bench/reclaim_bench.py [--threads 2000 --per-thread 50 --workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from report import pct, write_results
from sqlite_bench import ensure_store, fresh_copy
from synthetic import log

ROOT = Path(__file__).resolve().parent.parent


def config(workdir: Path, db: Path, keep: int) -> Path:
    cfg = workdir / f"reclaim-{db.stem}-{keep}.yaml"
    cfg.write_text(
        f"stores:\n  - {{name: app, kind: sqlite, path: {db}}}\n"
        f"policies:\n  - {{name: trim, keep_last: {keep}}}\n"
        "logging: {format: json, level: info}\n"
    )
    return cfg


def janitor(cfg: Path, *args: str) -> tuple[float, str, str]:
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "worker", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{args} failed: {done.stderr[-2000:]}")
    return time.monotonic() - t0, done.stdout, done.stderr


def size(db: Path) -> int:
    wal = Path(f"{db}-wal")
    return db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2000)
    ap.add_argument("--per-thread", type=int, default=50)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--writer-seconds", type=float, default=60.0)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    base, _ = ensure_store(a.workdir, a.threads, a.per_thread, rebuild=False)
    res: dict[str, Any] = {"threads": a.threads, "per_thread": a.per_thread}
    res["base_bytes"] = size(base)

    da = fresh_copy(base, a.workdir / "reclaim-a.db")
    janitor(config(a.workdir, da, 5), "once")
    res["after_sweep_bytes"] = size(da)
    con = sqlite3.connect(da, isolation_level=None)
    t0 = time.monotonic()
    con.execute("VACUUM")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    res["a_vacuum_seconds"] = round(time.monotonic() - t0, 2)
    con.close()
    res["a_vacuum_bytes"] = size(da)
    log(f"(a) VACUUM {res['a_vacuum_seconds']} s -> {res['a_vacuum_bytes']} bytes")

    db = fresh_copy(base, a.workdir / "reclaim-b.db")
    janitor(config(a.workdir, db, 5), "once")
    seconds, out, _ = janitor(
        config(a.workdir, db, 5), "reclaim", "--store", "app", "--convert", "--yes",
        "--format", "json",
    )  # fmt: skip
    (conv,) = json.loads(out[out.index('{\n  "reclaimed"') :])["reclaimed"]
    res["b_convert_seconds"] = conv["seconds"]
    res["b_convert_process_seconds"] = round(seconds, 2)
    res["b_convert_bytes"] = size(db)
    log(f"(b) convert {conv['seconds']} s -> {res['b_convert_bytes']} bytes")

    janitor(config(a.workdir, db, 2), "once")
    res["c_after_second_sweep_bytes"] = size(db)
    # The reference: a VACUUM of the same state; and (c) alone, with no writer
    # adding rows, for the size comparison.
    ref = fresh_copy(db, a.workdir / "reclaim-ref.db")
    con = sqlite3.connect(ref, isolation_level=None)
    con.execute("VACUUM")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    res["c_vacuum_bytes"] = size(ref)
    quiet = fresh_copy(db, a.workdir / "reclaim-quiet.db")
    _, out, _ = janitor(config(a.workdir, quiet, 2), "reclaim", "--format", "json")
    (q,) = json.loads(out)["reclaimed"]
    res["c_quiet_seconds"] = q["seconds"]
    res["c_quiet_longest_step_seconds"] = q["longest_step_seconds"]
    res["c_quiet_bytes"] = size(quiet)
    res["c_vs_vacuum"] = round(res["c_quiet_bytes"] / res["c_vacuum_bytes"], 3)
    out_path = a.workdir / "reclaim-writer.json"
    writer = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "helpers" / "live_writer.py"), str(db),
         str(a.writer_seconds), str(out_path), *[f"live-{i}" for i in range(300)]],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    time.sleep(5)  # the writer's own baseline first
    t_from = time.time()
    _, out, _ = janitor(config(a.workdir, db, 2), "reclaim", "--format", "json")
    t_to = time.time()
    writer.wait()
    (inc,) = json.loads(out)["reclaimed"]
    w = json.loads(out_path.read_text())
    during = [
        lat for lat, end in zip(w["latencies"], w["ends"], strict=True) if t_from <= end <= t_to
    ]
    before = [lat for lat, end in zip(w["latencies"], w["ends"], strict=True) if end < t_from]
    res["c_writer_p99_ms_during"] = round((pct(during, 99) or 0) * 1000, 1)
    res["c_writer_turns_during"] = len(during)
    res["c_writer_p99_ms_before"] = round((pct(before, 99) or 0) * 1000, 1)
    res["c_reclaim_seconds"] = inc["seconds"]
    res["c_steps"] = inc["steps"]
    res["c_longest_step_seconds"] = inc["longest_step_seconds"]
    res["c_bytes_with_writer"] = size(db)
    res["c_writer_errors"] = len(w["errors"])
    res["c_writer_turns"] = sum(w["done"].values())
    log(json.dumps(res, indent=2))
    write_results(a.workdir / "reclaim-results.json", res)


if __name__ == "__main__":
    main()
