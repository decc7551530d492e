#!/usr/bin/env python
"""RetentionSaver write-path overhead (issue 5, "Benchmark (not a test)").

Times `aput` through `RetentionSaver(inner, keep_last=20)` against the bare
saver, on `AsyncSqliteSaver` (a WAL file) and `AsyncPostgresSaver` (a
throwaway cluster started from tests/helpers/pgserver.py), 10,000 puts each:

- each side has its own store (a file, a database), so the bare store's
  growth does not slow the wrapped one or the other way round;
- the puts go to THREADS threads in turn, each put continuing its thread's
  history (the parent is the previous checkpoint), with LangGraph-shaped
  checkpoints: a growing message list, channel versions, metadata;
- runs are interleaved in blocks (bare, wrapped, wrapped, bare, ...: ABBA, so
  drift on a shared machine hits both sides alike); a third side, the
  wrapper with no rule on a store of its own, measures the wrapper's own
  cost apart from what trimmed tables cost the store (`--no-passthrough`
  skips it);
- every put is timed alone (`perf_counter_ns`); reported: median and p99 per
  put of each side and their ratios (wrapped / bare), the wrapped puts split
  into those that ran a trim and those that did not, the trims run and the
  rows left.

    python bench/saver_bench.py [--puts 10000 --threads 20 --block 500 --keep-last 20 --slack N]

Prints a line per store and writes JSON to `--out` (default: $TMPDIR/saver_bench_results.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from prometheus_client import CollectorRegistry
from report import cpu_model, version
from synthetic import log

from worker.saver import RetentionSaver


class Workload:
    """LangGraph-shaped puts: per thread a chain, a message list that grows by two a turn."""

    def __init__(self, saver: BaseCheckpointSaver[Any], threads: int, prefix: str) -> None:
        self.saver = saver
        self.threads = [f"{prefix}-{i:03d}" for i in range(threads)]
        self.parent: dict[str, str | None] = dict.fromkeys(self.threads)
        self.step: dict[str, int] = dict.fromkeys(self.threads, 0)
        self.version: dict[str, Any] = dict.fromkeys(self.threads)
        self.next = 0

    async def put(self) -> int:
        """One `aput`; returns its duration in ns."""
        tid = self.threads[self.next % len(self.threads)]
        self.next += 1
        step = self.step[tid]
        self.step[tid] = step + 1
        version = self.saver.get_next_version(self.version[tid], None)
        self.version[tid] = version
        # The last 12 messages (the rest are older versions, not re-written).
        messages = [f"message {i} of {tid}: " + "lorem ipsum " * 4 for i in range(step % 12)]
        checkpoint: Any = {
            "v": 4,
            "id": str(uuid6(clock_seq=step)),
            "ts": datetime.now(UTC).isoformat(),
            "channel_values": {"messages": messages, "branch:to:reply": None},
            "channel_versions": {"messages": version, "branch:to:reply": version},
            "versions_seen": {"reply": {"branch:to:reply": version}},
            "updated_channels": ["messages"],
        }
        configurable: dict[str, Any] = {"thread_id": tid, "checkpoint_ns": ""}
        if self.parent[tid] is not None:
            configurable["checkpoint_id"] = self.parent[tid]
        metadata: Any = {"source": "loop", "step": step, "parents": {}}
        new_versions = {"messages": version, "branch:to:reply": version}
        t0 = time.perf_counter_ns()
        out = await self.saver.aput(
            {"configurable": configurable}, checkpoint, metadata, new_versions
        )
        elapsed = time.perf_counter_ns() - t0
        self.parent[tid] = out["configurable"]["checkpoint_id"]
        return elapsed


def pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k] / 1e3  # µs


async def interleave(
    bare: BaseCheckpointSaver[Any],
    wrapped: RetentionSaver,
    passthrough: RetentionSaver | None,
    registry: CollectorRegistry,
    puts: int,
    threads: int,
    block: int,
) -> dict[str, Any]:
    """ABBA blocks of bare and wrapped puts (and passthrough ones, after each wrapped pair)."""
    sides: dict[str, Workload] = {
        "bare": Workload(bare, threads, "t"),
        "wrapped": Workload(wrapped, threads, "t"),
    }
    if passthrough is not None:
        sides["passthrough"] = Workload(passthrough, threads, "t")
    times: dict[str, list[int]] = {side: [] for side in sides}
    trim_puts: list[int] = []
    no_trim_puts: list[int] = []

    def trims() -> float:
        return (
            registry.get_sample_value(
                "checkpoint_janitor_saver_trims_total", {"saver": wrapped.name}
            )
            or 0.0
        )

    # Warm-up (connections, statement caches, setup) outside the measurement.
    for w in sides.values():
        for _ in range(threads):
            await w.put()
    order = ["bare", "wrapped", "wrapped", "bare"]
    if passthrough is not None:
        order = ["bare", "wrapped", "passthrough", "passthrough", "wrapped", "bare"]
    i = 0
    while any(len(ts) < puts for ts in times.values()):
        side = order[i % len(order)]
        i += 1
        n = min(block, puts - len(times[side]))
        for _ in range(n):
            before = trims()
            t = await sides[side].put()
            times[side].append(t)
            if side == "wrapped":
                (trim_puts if trims() > before else no_trim_puts).append(t)
    out: dict[str, Any] = {}
    for side, ts in times.items():
        out[side] = summary(ts)
    out["wrapped_without_trim"] = summary(no_trim_puts)
    out["wrapped_with_trim"] = summary(trim_puts)
    for stat in ("median", "p99", "mean"):
        out[f"{stat}_ratio"] = round(out["wrapped"][f"{stat}_us"] / out["bare"][f"{stat}_us"], 3)
        if passthrough is not None:
            out[f"passthrough_{stat}_ratio"] = round(
                out["passthrough"][f"{stat}_us"] / out["bare"][f"{stat}_us"], 3
            )
    return out


def summary(ts: list[int]) -> dict[str, Any]:
    """Count, median, p99, mean (µs) and total (s) of put durations in ns."""
    if not ts:
        return {"puts": 0}
    return {
        "puts": len(ts),
        "median_us": round(pct(ts, 0.5), 1),
        "p99_us": round(pct(ts, 0.99), 1),
        "mean_us": round(statistics.fmean(ts) / 1e3, 1),
        "total_s": round(sum(ts) / 1e9, 3),
    }


def retention_counts(saver: RetentionSaver, registry: CollectorRegistry) -> dict[str, float]:
    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"saver": saver.name, **labels}) or 0.0

    return {
        "trims": sample("checkpoint_janitor_saver_trims_total"),
        "checkpoints_deleted": sample(
            "checkpoint_janitor_saver_deleted_total", kind="checkpoints", reason="trimmed"
        ),
        "blobs_deleted": sample(
            "checkpoint_janitor_saver_deleted_total", kind="blobs", reason="trimmed"
        ),
        "failures": sample("checkpoint_janitor_saver_failures_total", operation="trim"),
    }


async def count_rows(saver: Any) -> int:
    n = 0
    async for _ in saver.alist(None):
        n += 1
    return n


@contextlib.asynccontextmanager
async def sqlite_pair(workdir: Path) -> AsyncIterator[tuple[Any, Any, Any, str]]:
    async with (
        AsyncSqliteSaver.from_conn_string(str(workdir / "bare.db")) as bare,
        AsyncSqliteSaver.from_conn_string(str(workdir / "wrapped.db")) as inner,
        AsyncSqliteSaver.from_conn_string(str(workdir / "passthrough.db")) as plain,
    ):
        for saver in (bare, inner, plain):
            await saver.setup()
        version = __import__("sqlite3").sqlite_version
        yield bare, inner, plain, f"SQLite {version} (WAL file, aiosqlite)"


@contextlib.asynccontextmanager
async def postgres_pair() -> AsyncIterator[tuple[Any, Any, Any, str]]:
    from helpers.pgserver import PgServer
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    server = PgServer()
    server.start()
    try:
        dsns = [server.create_database(f"bench_{n}") for n in ("bare", "wrapped", "plain")]
        version = server.psql("SHOW server_version").strip().splitlines()[-1].strip()
        async with (
            AsyncPostgresSaver.from_conn_string(dsns[0]) as bare,
            AsyncPostgresSaver.from_conn_string(dsns[1]) as inner,
            AsyncPostgresSaver.from_conn_string(dsns[2]) as plain,
        ):
            for saver in (bare, inner, plain):
                await saver.setup()
            label = f"PostgreSQL {version} (local TCP, one psycopg connection each)"
            yield bare, inner, plain, label
    finally:
        server.close()


def machine() -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model() or platform.processor() or "-",
        "cpus": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {
            p: version(p) or "-"
            for p in (
                "langgraph",
                "langgraph-checkpoint",
                "langgraph-checkpoint-sqlite",
                "langgraph-checkpoint-postgres",
                "psycopg",
                "aiosqlite",
            )
        },
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--puts", type=int, default=10_000, help="measured puts per side")
    parser.add_argument("--threads", type=int, default=20)
    parser.add_argument("--block", type=int, default=500, help="puts per interleaved block")
    parser.add_argument("--keep-last", type=int, default=20)
    parser.add_argument(
        "--slack", type=int, default=None, help="RetentionSaver slack (default: its own)"
    )
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument(
        "--no-passthrough",
        action="store_true",
        help="skip the third side (the wrapper with no rule: its own cost)",
    )
    parser.add_argument(
        "--out", default=str(Path(tempfile.gettempdir()) / "saver_bench_results.json")
    )
    args = parser.parse_args()

    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "stores": {}}
    m = results["machine"]
    log(f"machine: {m['cpu']} x{m['cpus']}, load {m['load_average_1_5_15']}")
    with tempfile.TemporaryDirectory(prefix="saver-bench-") as tmp:
        for store in args.stores.split(","):
            pair = sqlite_pair(Path(tmp)) if store == "sqlite" else postgres_pair()
            async with pair as (bare, inner, plain, label):
                if args.no_passthrough:
                    plain = None
                registry = CollectorRegistry()
                wrapped = RetentionSaver(
                    inner, keep_last=args.keep_last, slack=args.slack, registry=registry
                )
                # The wrapper with no rule, on its own store: its own cost per put.
                passthrough = (
                    RetentionSaver(plain, registry=CollectorRegistry(), name="passthrough")
                    if plain is not None
                    else None
                )
                log(f"{store}: {label}; {args.puts} puts a side, slack {wrapped.slack}")
                r = await interleave(
                    bare, wrapped, passthrough, registry, args.puts, args.threads, args.block
                )
                r["store"] = label
                r["slack"] = wrapped.slack
                r["retention"] = retention_counts(wrapped, registry)
                r["rows_left"] = {
                    "bare": await count_rows(bare),
                    "wrapped": await count_rows(inner),
                }
                results["stores"][store] = r
                log(
                    f"{store}: median {r['bare']['median_us']} -> {r['wrapped']['median_us']} µs "
                    f"(x{r['median_ratio']}), p99 {r['bare']['p99_us']} -> "
                    f"{r['wrapped']['p99_us']} µs (x{r['p99_ratio']}), mean x{r['mean_ratio']}; "
                    f"passthrough median x{r.get('passthrough_median_ratio')}; "
                    f"wrapped puts without/with a trim: median "
                    f"{r['wrapped_without_trim'].get('median_us')} / "
                    f"{r['wrapped_with_trim'].get('median_us')} µs; "
                    f"rows {r['rows_left']}, {r['retention']}"
                )
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    log(f"results in {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
