"""Reporting code the bench scripts share: statistics, tables, targets, child processes, JSON.

Data generation lives in `synthetic.py`; this module only measures and prints,
so every script reports a figure the same way and a fix lands once.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

Percentile = Callable[[list[float], float], float | None]


def pct(values: list[float], p: float) -> float | None:
    """The `p`th percentile of `values` by nearest rank (None when empty)."""
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))  # nearest rank
    return s[k]


def rounded(v: float | None, nd: int = 2) -> float | None:
    """`round(v, nd)`, passing None through (a figure that was not measured)."""
    return None if v is None else round(v, nd)


def latency_stats(values: list[float], percentile: Percentile = pct) -> dict[str, Any]:
    """Latencies in seconds summarised in milliseconds: n, p50, p99, p99.9, max, mean."""
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": rounded(percentile(ms, 50)),
        "p99_ms": rounded(percentile(ms, 99)),
        "p99_9_ms": rounded(percentile(ms, 99.9)),
        "max_ms": rounded(max(ms) if ms else None),
        "mean_ms": rounded(statistics.fmean(ms) if ms else None),
    }


def summarize_writer(
    result: dict[str, Any],
    t_from: float | None,
    t_to: float | None,
    percentile: Percentile = pct,
) -> dict[str, Any]:
    """A writer process's records between `t_from` and `t_to`: rate, errors, latencies."""
    recs = [
        r
        for r in result["records"]
        if (t_from is None or r["t"] >= t_from) and (t_to is None or r["t"] <= t_to)
    ]
    errors = [r["error"] for r in recs if "error" in r]
    aput = [r["aput"] for r in recs if "error" not in r]
    writes = [r["aput_writes"] for r in recs if "aput_writes" in r]
    span = (recs[-1]["t"] - recs[0]["t"]) if len(recs) > 1 else 0.0
    return {
        "puts": len(recs),
        "seconds": round(span, 1),
        "puts_per_s": round(len(recs) / span, 1) if span else None,
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "aput": latency_stats(aput, percentile),
        "aput_writes": latency_stats(writes, percentile),
    }


def fmt(v: Any, unit: str = "") -> str:
    """A table cell: thousands separators, two decimals for floats, "-" for None."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v}{unit}"


def mb(n: int | None, unit: str = "MiB") -> str:
    """Bytes as mebibytes; `unit` is only the label (the Postgres report has said "MB")."""
    return "-" if n is None else f"{n / 1024 / 1024:,.1f} {unit}"


def print_table(hdr: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Columns padded to their widest cell: the first left-aligned, the figures right."""
    table = [hdr, *rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(hdr))]
    for r in table:
        print(
            "  ".join(
                str(x).rjust(wd) if i else str(x).ljust(wd)
                for i, (x, wd) in enumerate(zip(r, widths, strict=True))
            )
        )


def print_writer_load(bl: dict[str, Any], alone: str, during: str) -> None:
    """The live writer alone and during the sweep, then what the sweep lost of its writes."""
    for label, d in ((alone, bl["writer_baseline"]), (during, bl["writer_during_sweep"])):
        ap = d["aput"]
        print(
            f"{label:>24}: {d['puts']} puts ({d['puts_per_s']}/s), errors {d['errors']},"
            f" aput p50 {ap['p50_ms']} ms, p99 {ap['p99_ms']} ms,"
            f" p99.9 {ap['p99_9_ms']} ms, max {ap['max_ms']} ms"
        )
    print(
        f"{'':>24}  writer checkpoints lost: {bl['writer_checkpoints_lost']}"
        f" of {bl['writer_checkpoints_committed']}"
    )


def print_verdict(ratios: dict[str, Any], targets: Iterable[dict[str, Any]]) -> None:
    """The ratios, then each target marked MET, MISSED or ? (not measured in this run)."""
    print()
    for k, v in ratios.items():
        print(f"ratio {k}: {v}")
    print()
    for t in targets:
        mark = {True: "MET", False: "MISSED", None: "?"}[t["met"]]
        print(f"  [{mark:>6}] {t['target']}: {t['measured']}")


# ---------------------------------------------------------------- child processes


def janitor_cmd() -> list[str]:
    """The installed `checkpoint-janitor` beside this interpreter, else `python -m worker`."""
    exe = Path(sys.executable).with_name("checkpoint-janitor")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "worker"]


def under_time(cmd: list[str], timefile: Path) -> tuple[list[str], bool]:
    """`cmd` run by GNU `/usr/bin/time -v` into `timefile` when it is installed.

    It reports the child's own peak RSS and CPU; without it only
    RUSAGE_CHILDREN is left, the maximum over every child so far.
    """
    if not Path("/usr/bin/time").exists():
        return cmd, False
    return ["/usr/bin/time", "-v", "-o", str(timefile), *cmd], True


def child_usage(timed: bool, timefile: Path) -> tuple[int | None, dict[str, float]]:
    """Peak RSS (KiB) and user/sys CPU seconds of the child `under_time` ran."""
    peak = None
    cpu: dict[str, float] = {}
    if timed and timefile.exists():
        for line in timefile.read_text().splitlines():
            if "Maximum resident set size" in line:
                peak = int(line.rsplit(":", 1)[1])
            elif "User time (seconds)" in line:
                cpu["user_s"] = float(line.rsplit(":", 1)[1])
            elif "System time (seconds)" in line:
                cpu["sys_s"] = float(line.rsplit(":", 1)[1])
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak, cpu


# ---------------------------------------------------------------- the machine, results


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def ram_gib() -> float | None:
    """Total memory in GiB from /proc/meminfo (None where there is none)."""
    mem = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    return mem


def version(dist: str) -> str | None:
    """The installed version of distribution `dist`, None when it is not installed."""
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def write_results(path: Path, res: dict[str, Any]) -> None:
    """The results as indented JSON (the form docs/benchmarks.md quotes)."""
    path.write_text(json.dumps(res, indent=2))


def log_events(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON events of a worker's log file, in order; other lines (tracebacks, text
    from a crashed start) are skipped."""
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            yield ev
