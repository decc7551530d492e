#!/usr/bin/env python
"""Archive benchmark (issue 13, "Benchmark (not a test)").

On identical copies of the `sqlite_bench.py` store (1M checkpoints by default),
times `checkpoint-janitor once` with `keep_last: 5`:

  (plain)    without an archive;
  (archive)  with `defaults.archive: {path: DIR}` (every deleted row and each
             nulled parent link written to a verified SQLite segment per batch
             before the batch's delete commits).

It reports each run's wall time, rows/s, longest write transaction (the
slowest batch, which with an archive includes writing, fsyncing and
verifying its segment), peak RSS (`/usr/bin/time -v`) and the archive /
plain time ratio (target: at most 1.5x), and, for the archive run, the
archive's bytes (apparent and allocated) and segment count beside the
store's size.

Then, on the archived copy, it times `checkpoint-janitor restore --store bench
--from DIR --thread-prefix P --yes`, P being the one-hex-digit prefix of the
(random UUID) thread ids whose count is closest to `--restore-threads` (1,000),
and checks that every selected thread equals the untouched store (row counts,
checkpoint ids, and every column of checkpoints and writes, by digest), that
no other thread changed, and that sampled threads read back through the real
`SqliteSaver` as on the untouched store (every checkpoint tuple, pending
writes and parent included). It also times single-thread restores (`--thread
ID`), each from the whole archive and from only the one segment holding that
thread, and one `restore --threads-from FILE` of `--named-threads` (1,000)
random threads outside the prefix, checked the same way. Restore reads and
verifies only the segments holding selected rows; it asks every segment
whether it holds any (one query per table). `--diag` times verifying every
segment alone (in this process), what `--all` does first.

    python bench/archive_bench.py [--threads 20000 --per-thread 50 --workdir DIR --repeat 2]

The store is built (or reused from the workdir) by `sqlite_bench.ensure_store`.
Results go to WORKDIR/archive-results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from langgraph.checkpoint.sqlite import SqliteSaver
from report import janitor_cmd, log_events, write_results
from sqlite_bench import (
    KEEP_LAST,
    ensure_store,
    file_size,
    fresh_copy,
    loadavg,
    remove_db,
    results_header,
    run_worker,
    shape_after_trim,
    store_arguments,
    thread_set,
    worker_numbers,
    write_config,
)
from synthetic import log

STORE = "bench"  # the store name sqlite_bench.write_config gives
# Every column of the selected threads' rows, in key order: equal digests mean
# the restore put back exactly what the sweep took (ids, parents, blobs).
CHECKPOINT_ROWS_SQL = """SELECT thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id,
    type, checkpoint, metadata FROM checkpoints
    WHERE thread_id IN (SELECT value FROM json_each(?)) ORDER BY 1, 2, 3"""
WRITE_ROWS_SQL = """SELECT thread_id, checkpoint_ns, checkpoint_id, task_id, idx, channel,
    type, value, task_path FROM writes
    WHERE thread_id IN (SELECT value FROM json_each(?)) ORDER BY 1, 2, 3, 4, 5"""
TABLE_COUNT_SQL = "SELECT count(*) FROM {table}"
# Which segment holds a thread: one indexed-free scan per segment, read-only.
SEGMENT_HAS_THREAD_SQL = "SELECT 1 FROM checkpoints WHERE thread_id = ? LIMIT 1"
SEGMENT_META_SQL = "SELECT key, value FROM archive_meta"


def rows_digest(db: Path, threads: list[str]) -> dict[str, Any]:
    """Per table: row count, distinct checkpoint ids and a sha256 of every column, in key order."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    out: dict[str, Any] = {}
    try:
        arg = json.dumps(sorted(threads))
        for table, sql in (("checkpoints", CHECKPOINT_ROWS_SQL), ("writes", WRITE_ROWS_SQL)):
            h = hashlib.sha256()
            n = 0
            ids = set()
            for row in conn.execute(sql, (arg,)):
                h.update(repr(row).encode())
                ids.add(row[2])
                n += 1
            out[table] = {"rows": n, "checkpoint_ids": len(ids), "sha256": h.hexdigest()}
    finally:
        conn.close()
    return out


def table_counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {
            t: conn.execute(TABLE_COUNT_SQL.format(table=t)).fetchone()[0]
            for t in ("checkpoints", "writes")
        }
    finally:
        conn.close()


def saver_view(db: Path, thread_id: str) -> list[tuple[Any, ...]]:
    """A thread as the real saver reads it: every checkpoint tuple, newest first, and the head."""
    cfg = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    with SqliteSaver.from_conn_string(str(db)) as saver:
        tuples = [
            (t.config, t.checkpoint, t.metadata, t.parent_config, t.pending_writes)
            for t in saver.list(cfg)  # type: ignore[arg-type]
        ]
        head = saver.get_tuple(cfg)  # type: ignore[arg-type]
    assert head is not None, thread_id
    return [*tuples, ("head", head.config, head.checkpoint)]


def segments_of(archive: Path) -> list[Path]:
    return sorted(p for p in archive.rglob("*.sqlite") if not p.name.endswith(".pending.sqlite"))


def archive_usage(archive: Path) -> dict[str, Any]:
    """Apparent and allocated bytes, segment counts, and the rows `archive_meta` records."""
    files = [p for p in archive.rglob("*") if p.is_file()]
    segs = segments_of(archive)
    rows: dict[str, int] = {}
    for seg in segs:
        conn = sqlite3.connect(f"file:{seg}?mode=ro", uri=True)
        try:
            for key, value in conn.execute(SEGMENT_META_SQL):
                if key.startswith("rows."):
                    rows[key[5:]] = rows.get(key[5:], 0) + int(value)
        finally:
            conn.close()
    sizes = [p.stat().st_size for p in segs]
    return {
        "segments": len(segs),
        "pending": sum(p.name.endswith(".pending.sqlite") for p in files),
        "partial": sum(p.name.endswith(".partial") for p in files),
        "sweep_dirs": len({p.parent for p in segs}),
        "bytes": sum(p.stat().st_size for p in files),
        "allocated_bytes": sum(p.stat().st_blocks * 512 for p in files),
        "segment_bytes_p50": int(statistics.median(sizes)) if sizes else None,
        "segment_bytes_max": max(sizes, default=None),
        "rows": rows,
    }


def segment_holding(archive: Path, thread_id: str) -> Path:
    for seg in segments_of(archive):
        conn = sqlite3.connect(f"file:{seg}?mode=ro", uri=True)
        try:
            if conn.execute(SEGMENT_HAS_THREAD_SQL, (thread_id,)).fetchone():
                return seg
        finally:
            conn.close()
    raise SystemExit(f"no segment holds thread {thread_id}")


def run_restore(
    config: Path, source: Path, selector: list[str], workdir: Path, tag: str
) -> dict[str, Any]:
    """`checkpoint-janitor restore ... --yes` under /usr/bin/time -v: wall, CPU, peak RSS."""
    cmd = [*janitor_cmd(), "--config", str(config), "restore", "--store", STORE]
    cmd += ["--from", str(source), *selector, "--yes"]
    timefile = workdir / f"time-restore-{tag}.txt"
    outfile = workdir / f"restore-{tag}.log"
    if Path("/usr/bin/time").exists():
        cmd = ["/usr/bin/time", "-v", "-o", str(timefile), *cmd]
    t0 = time.monotonic()
    with open(outfile, "wb") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.monotonic() - t0
    res: dict[str, Any] = {"exit_code": proc.returncode, "wall_seconds": round(wall, 2)}
    if timefile.exists():
        for line in timefile.read_text().splitlines():
            if "Maximum resident set size" in line:
                res["peak_rss_mb"] = round(int(line.rsplit(":", 1)[1]) / 1024, 1)
            elif "User time (seconds)" in line:
                res["user_s"] = float(line.rsplit(":", 1)[1])
            elif "System time (seconds)" in line:
                res["sys_s"] = float(line.rsplit(":", 1)[1])
    lines = outfile.read_text(errors="replace").splitlines()
    res["summary"] = next((ln for ln in reversed(lines) if "restored" in ln), lines[-1:])
    return res


def restore_named(
    config: Path, base: Path, db: Path, archive: Path, named: list[str], workdir: Path, tag: str
) -> dict[str, Any]:
    """`restore --threads-from FILE` of `named` (random threads, so spread over the
    archive): time, then the same checks as the prefix restore."""
    ids = workdir / f"named-{tag}.txt"
    ids.write_text("".join(f"{t}\n" for t in named))
    before = table_counts(db)
    log(f"  restore --threads-from ({len(named)} named threads) [{tag}]")
    out = run_restore(config, archive, ["--threads-from", str(ids)], workdir, f"named-{tag}")
    out["threads_selected"] = len(named)
    after = table_counts(db)
    out["equal"] = rows_digest(db, named) == rows_digest(base, named)
    out["counts_before"], out["counts_after"] = before, after
    sample = random.Random(f"saver-named:{tag}").sample(named, min(20, len(named)))
    out["saver_equal"] = all(saver_view(db, t) == saver_view(base, t) for t in sample)
    log(
        f"    {out['wall_seconds']} s ({out['summary']}); equal to the untouched store:"
        f" {out['equal']}, SqliteSaver sample of {len(sample)} equal: {out['saver_equal']}"
    )
    return out


def run_plain(base: Path, workdir: Path, n_threads: int, tag: str) -> dict[str, Any]:
    db = fresh_copy(base, workdir / "archive-copy-plain.db")
    config = write_config(workdir, db, "keep5-plain", {"keep_last": KEEP_LAST})
    log(f"  (plain) checkpoint-janitor once, keep_last {KEEP_LAST} [{tag}]")
    run = run_worker(config, db, workdir, f"plain-{tag}")
    out = worker_numbers(run)
    if run.returncode != 0:
        out["stderr_tail"] = run.stderr_tail
    out["shape"] = shape_after_trim(db, n_threads)
    out["db_bytes_after"] = file_size(db)
    out["write_txns"] = write_txns(workdir / f"worker-plain-{tag}.log")
    remove_db(db)
    log(f"    {out['wall_seconds']} s, {out['batches']} batches, peak RSS {out['peak_rss_mb']} MB")
    return out


def run_archived(
    base: Path,
    workdir: Path,
    args: argparse.Namespace,
    prefix: str,
    selected: list[str],
    others: list[str],
    named: list[str],
    tag: str,
) -> dict[str, Any]:
    """The sweep with an archive, then the restores on the same copy and their checks."""
    db = fresh_copy(base, workdir / "archive-copy-archive.db")
    archive = workdir / "archive-dir"
    shutil.rmtree(archive, ignore_errors=True)
    archive.mkdir()
    os.sync()
    config = write_config(
        workdir, db, "keep5-archive", {"keep_last": KEEP_LAST}, {"archive": {"path": str(archive)}}
    )
    log(f"  (archive) checkpoint-janitor once, keep_last {KEEP_LAST}, archive {archive} [{tag}]")
    run = run_worker(config, db, workdir, f"archive-{tag}")
    out = worker_numbers(run)
    if run.returncode != 0:
        out["stderr_tail"] = run.stderr_tail
    out["shape"] = shape_after_trim(db, args.threads)
    out["db_bytes_after"] = file_size(db)
    out["archive"] = archive_usage(archive)
    out["archive_phases"] = archive_phases(workdir / f"worker-archive-{tag}.log")
    out["write_txns"] = write_txns(workdir / f"worker-archive-{tag}.log")
    out["archive"]["over_store_bytes"] = round(out["archive"]["bytes"] / out["db_bytes_after"], 3)
    a = out["archive"]
    log(
        f"    {out['wall_seconds']} s, {out['batches']} batches, peak RSS {out['peak_rss_mb']} MB;"
        f" archive {a['bytes'] / 2**30:.2f} GiB in {a['segments']} segments, rows {a['rows']};"
        f" phases {out['archive_phases']}; write txns {out['write_txns']}"
    )
    # Single threads first (the prefix restore would already have put them back
    # if they were under it; they are not): whole archive, then one segment.
    singles: list[dict[str, Any]] = []
    for tid in others[: args.singles]:
        one: dict[str, Any] = {"thread": tid}
        one["whole_archive"] = run_restore(
            config, archive, ["--thread", tid], workdir, f"one-{tag}"
        )
        seg = segment_holding(archive, tid)
        # Restore from the one segment on a thread whose rows are back already
        # inserts nothing but does the same reading, so it is a fair "one segment" time.
        one["one_segment"] = run_restore(config, seg, ["--thread", tid], workdir, f"seg-{tag}")
        one["same_as_untouched"] = rows_digest(db, [tid]) == rows_digest(base, [tid])
        log(
            f"    restore --thread {tid}: {one['whole_archive']['wall_seconds']} s from the whole"
            f" archive, {one['one_segment']['wall_seconds']} s from its segment;"
            f" equal: {one['same_as_untouched']}"
        )
        singles.append(one)
    out["single_restores"] = singles
    if named:
        out["named_restore"] = restore_named(config, base, db, archive, named, workdir, tag)
    before = table_counts(db)

    log(f"  restore --thread-prefix {prefix!r} ({len(selected)} threads) [{tag}]")
    out["restore"] = run_restore(
        config, archive, ["--thread-prefix", prefix], workdir, f"pfx-{tag}"
    )
    out["restore"]["threads_selected"] = len(selected)
    restored = rows_digest(db, selected)
    untouched = rows_digest(base, selected)
    after = table_counts(db)
    n_back = len(selected) + len(singles) + len(named)
    per = args.per_thread - KEEP_LAST
    rng = random.Random(f"saver-sample:{tag}")
    sample = rng.sample(selected, min(args.saver_sample, len(selected)))
    out["check"] = {
        "restored": restored,
        "untouched": untouched,
        "equal": restored == untouched,
        "counts_before": before,
        "counts_after": after,
        # Only the restored threads grew: each got back its (per_thread - 5)
        # checkpoints and their two writes apiece.
        "others_unchanged": after["checkpoints"] == before["checkpoints"] + per * len(selected)
        and after["writes"] == before["writes"] + 2 * per * len(selected),
        "saver_sample": len(sample),
        "saver_equal": all(saver_view(db, t) == saver_view(base, t) for t in sample),
        "threads_back": n_back,
    }
    c = out["check"]
    log(
        f"    {out['restore']['wall_seconds']} s ({out['restore']['summary']});"
        f" rows equal to the untouched store: {c['equal']}, others unchanged:"
        f" {c['others_unchanged']}, SqliteSaver sample of {len(sample)} equal: {c['saver_equal']}"
    )
    if args.diag:
        out["verify_all"] = time_verify(archive)
        log(f"    verify of every segment alone (in-process): {out['verify_all']}")
    remove_db(db)
    shutil.rmtree(archive, ignore_errors=True)
    return out


def archive_phases(worker_log: Path) -> dict[str, Any]:
    """Seconds per archive phase summed over the sweep's batches (the worker's debug
    `archive_segment` events): the wait for the SQL copies once the deletes were
    done, and the seal (image, write with fsync, verify, publish)."""
    totals: dict[str, float] = {}
    segments = 0
    for ev in log_events(worker_log):
        if ev.get("event") != "archive_segment":
            continue
        segments += 1
        for key, value in ev.items():
            if key.endswith("_seconds"):
                totals[key] = totals.get(key, 0.0) + float(value)
    return {"segments": segments, **{k: round(v, 2) for k, v in sorted(totals.items())}}


def write_txns(worker_log: Path) -> dict[str, Any]:
    """The batches' write transactions (the worker's debug `batch` events: `seconds`
    less `lock_wait`, the part of a batch spent outside its transaction: waiting for
    the lock and, with an archive copied before the lock, that copy and its seal's
    write): longest, p99, and how many reached 250 ms, and the pre-lock seconds."""
    txns: list[float] = []
    outside = 0.0
    for ev in log_events(worker_log):
        if ev.get("event") != "batch" or ev.get("dry_run"):
            continue
        wait = float(ev.get("lock_wait") or 0.0)
        txns.append(float(ev["seconds"]) - wait)
        outside += wait
    txns.sort()
    return {
        "longest_txn_s": round(txns[-1], 4) if txns else None,
        "txn_p99_s": round(txns[min(len(txns) - 1, int(len(txns) * 0.99))], 4) if txns else None,
        "txns_250ms_or_more": sum(t >= 0.25 for t in txns),
        "txn_seconds_total": round(sum(txns), 1),
        "outside_txn_seconds_total": round(outside, 1),
    }


def time_verify(archive: Path) -> dict[str, Any]:
    """What `restore` does before anything else, whatever it selects: list and verify
    every segment (row digests recomputed in Python), timed alone in this process."""
    from worker.stores.archive import read_segments

    t0 = time.monotonic()
    cpu0 = time.process_time()
    segments = list(read_segments(str(archive), store=STORE))
    for seg in segments:
        seg.verify()
    return {
        "segments": len(segments),
        "seconds": round(time.monotonic() - t0, 2),
        "cpu_seconds": round(time.process_time() - cpu0, 2),
    }


def pick_prefix(threads: list[str], want: int) -> tuple[str, list[str]]:
    """The one-hex-digit prefix whose thread count is closest to `want` (ties: lowest)."""
    best = min("0123456789abcdef", key=lambda p: abs(sum(t.startswith(p) for t in threads) - want))
    return best, [t for t in threads if t.startswith(best)]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    store_arguments(ap)
    ap.add_argument("--repeat", type=int, default=2, help="repetitions (median reported)")
    ap.add_argument("--restore-threads", type=int, default=1_000)
    ap.add_argument(
        "--singles", type=int, default=2, help="single-thread restores timed per repetition"
    )
    ap.add_argument("--saver-sample", type=int, default=20)
    ap.add_argument(
        "--named-threads",
        type=int,
        default=1_000,
        help="random threads (outside the prefix) restored by one --threads-from (0: skip)",
    )
    ap.add_argument(
        "--diag",
        action="store_true",
        help="also time verifying every segment alone (the part of restore that reads them all)",
    )
    args = ap.parse_args()
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = results_header()
    base, meta = ensure_store(workdir, args.threads, args.per_thread, rebuild=False)
    every = sorted(thread_set(base))
    prefix, selected = pick_prefix(every, args.restore_threads)
    others = [t for t in random.Random("singles").sample(every, len(every)) if t[0] != prefix]
    res["store"] = {
        "path": str(base),
        "built_at": meta["built_at"],
        "threads": len(every),
        "db_bytes": file_size(base),
        **table_counts(base),
    }
    res["restore_prefix"] = {"prefix": prefix, "threads": len(selected)}
    log(f"restore selection: --thread-prefix {prefix!r}, {len(selected)} threads")
    reps: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        # Alternate the order, so neither kind always gets the warmer page cache.
        order = ["plain", "archive"] if rep % 2 == 0 else ["archive", "plain"]
        tag = f"r{rep + 1}"
        one: dict[str, Any] = {"order": order, "loadavg_before": loadavg()}
        for kind in order:
            if kind == "plain":
                one[kind] = run_plain(base, workdir, args.threads, tag)
            else:
                singles = others[rep * args.singles : (rep + 1) * args.singles]
                named = [t for t in others if t not in singles][: args.named_threads]
                one[kind] = run_archived(base, workdir, args, prefix, selected, singles, named, tag)
        one["loadavg_after"] = loadavg()
        p, a = one["plain"], one["archive"]
        one["archive_over_plain_seconds"] = round(a["wall_seconds"] / p["wall_seconds"], 3)
        one["archive_over_plain_cpu"] = round(
            sum(a["cpu_seconds"].values()) / sum(p["cpu_seconds"].values()), 3
        )
        log(
            f"  rep {rep + 1}: archive / plain = {one['archive_over_plain_seconds']}x time,"
            f" {one['archive_over_plain_cpu']}x CPU"
        )
        reps.append(one)
        (workdir / "archive-results.json").write_text(
            json.dumps({**res, "repetitions": reps}, indent=2)
        )
    res["repetitions"] = reps
    res["median_archive_over_plain_seconds"] = round(
        statistics.median(r["archive_over_plain_seconds"] for r in reps), 3
    )
    res["target_met"] = all(r["archive_over_plain_seconds"] <= 1.5 for r in reps)
    res["all_checks_ok"] = all(
        r["archive"]["check"]["equal"]
        and r["archive"]["check"]["others_unchanged"]
        and r["archive"]["check"]["saver_equal"]
        and all(s["same_as_untouched"] for s in r["archive"]["single_restores"])
        and all(
            n["equal"] and n["saver_equal"] and n["exit_code"] == 0
            for n in [r["archive"].get("named_restore")]
            if n
        )
        and r["plain"]["shape"]["ok"]
        and r["archive"]["shape"]["ok"]
        for r in reps
    )
    res["finished_at"] = datetime.now(UTC).isoformat()
    write_results(workdir / "archive-results.json", res)
    print_report(res)


def print_report(res: dict[str, Any]) -> None:
    print()
    print("rep  order            plain s  archive s  ratio  cpu ratio  ckpt/s plain/archive"
          "  longest txn plain/archive  peak RSS plain/archive")  # fmt: skip
    for n, r in enumerate(res["repetitions"], 1):
        p, a = r["plain"], r["archive"]
        print(
            f"{n:<4} {','.join(r['order']):<15} {p['wall_seconds']:>8}  {a['wall_seconds']:>9}"
            f"  {r['archive_over_plain_seconds']:>5}  {r['archive_over_plain_cpu']:>9}"
            f"  {p['checkpoints_per_s']:>7}/{a['checkpoints_per_s']:<7}"
            f"  {p['longest_write_txn_s']:>9}/{a['longest_write_txn_s']:<9}"
            f"  {p['peak_rss_mb']:>7}/{a['peak_rss_mb']} MB"
        )
    print()
    print("rep  archive GiB (alloc)  segments  store GiB  restore prefix (threads)  s     RSS MB"
          "  one thread: whole archive s / one segment s")  # fmt: skip
    for n, r in enumerate(res["repetitions"], 1):
        a = r["archive"]
        z, rs = a["archive"], a["restore"]
        singles = ", ".join(
            f"{s['whole_archive']['wall_seconds']}/{s['one_segment']['wall_seconds']}"
            for s in a["single_restores"]
        )
        print(
            f"{n:<4} {z['bytes'] / 2**30:>6.2f} ({z['allocated_bytes'] / 2**30:.2f})"
            f"  {z['segments']:>13}  {a['db_bytes_after'] / 2**30:>9.2f}"
            f"  {res['restore_prefix']['prefix']!r} ({rs['threads_selected']})"
            f"  {rs['wall_seconds']:>14}  {rs.get('peak_rss_mb')}  {singles}"
        )
    for n, r in enumerate(res["repetitions"], 1):
        if named := r["archive"].get("named_restore"):
            print(
                f"rep {n}: restore --threads-from ({named['threads_selected']} threads):"
                f" {named['wall_seconds']} s, {named.get('user_s')} user-s,"
                f" {named.get('peak_rss_mb')} MB; equal {named['equal']}"
            )
    print(
        f"median archive / plain: {res['median_archive_over_plain_seconds']}x (target <= 1.5x:"
        f" {'MET' if res['target_met'] else 'MISSED'}); all checks ok: {res['all_checks_ok']}"
    )


if __name__ == "__main__":
    main()
