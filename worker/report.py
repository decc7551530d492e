"""Rendering sweep reports for people (`table`) and programs (`json`)."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import asdict
from typing import Any

from worker.engine import Counts
from worker.sweep import SweepReport


def report_dict(report: SweepReport) -> dict[str, Any]:
    """A JSON-ready dict of one store's sweep (or plan)."""
    return {
        "store": report.store,
        "dry_run": report.dry_run,
        "outcome": report.outcome.value,
        "threads_total": report.threads_total,
        "threads_scanned": report.threads_scanned,
        "safety_limit": {
            "max_threads_expired": report.expiry_limit,
            "threads_to_expire": report.expiries_wanted,
            "would_stop": report.would_hit_limit,
            "policy": report.limit_reached_by,
        },
        "policies": [
            {
                "policy": p.policy,
                **asdict(p.deleted),
                "by_reason": {reason.value: asdict(c) for reason, c in p.by_reason.items()},
                "oldest_eligible_age_seconds": p.oldest_eligible_age,
                "skipped": {reason.value: n for reason, n in p.skipped.items()},
            }
            for p in report.policies.values()
        ],
        "total": asdict(report.deleted),
        "batches": report.batches,
        "longest_batch_seconds": round(report.longest_batch_seconds, 4),
        "duration_seconds": round(report.duration_seconds, 3),
        "changed_threads": report.changed_threads,
        "error": report.error,
    }


def render_json(reports: Sequence[SweepReport]) -> str:
    """Every store's report as one JSON document."""
    return json.dumps({"stores": [report_dict(r) for r in reports]}, indent=2)


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(
        c.ljust(w) if i < 2 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    ).rstrip()


def render_table(reports: Sequence[SweepReport], blob_stores: Collection[str] = ()) -> str:
    """A plain-text table per store: policy, reason, threads, checkpoints, writes, bytes.

    A `blobs` column only for the stores named in `blob_stores` (those with a
    blobs table: Postgres) or that report blobs: a SQLite store has none, and
    a column of zeros there would suggest it does.
    """
    out: list[str] = []
    for r in reports:
        blobs = r.store in blob_stores or any(
            c.blobs for p in r.policies.values() for c in (p.deleted, *p.by_reason.values())
        )
        head = ["policy", "reason", "threads", "checkpoints", "writes", "blobs", "bytes"]
        if not blobs:
            head.remove("blobs")
        blank = [""] * (len(head) - 3)
        verb = "would delete" if r.dry_run else "deleted"
        out.append(
            f"store {r.store}: {r.threads_total} threads; {verb} "
            f"{r.deleted.checkpoints} checkpoints in {r.duration_seconds:.2f}s"
        )
        rows: list[list[str]] = []
        for p in r.policies.values():
            if not p.by_reason:
                rows.append([p.policy, "-", *_counts(Counts(), blobs)])
            for reason, c in sorted(p.by_reason.items()):
                rows.append([p.policy, reason.value, *_counts(c, blobs)])
            for reason_s, n in sorted(p.skipped.items()):
                rows.append([p.policy, f"skipped: {reason_s.value}", str(n), *blank])
        rows.append(["total", "", *_counts(r.deleted, blobs)])
        widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
        out.append(_row(head, widths))
        out.extend(_row(x, widths) for x in rows)
        if r.would_hit_limit:
            out.append(
                f"safety limit: {r.expiries_wanted} threads to expire, at most "
                f"{r.expiry_limit} allowed per sweep (policy {r.limit_reached_by}): the sweep "
                "stops there. Raise defaults.max_delete_fraction, or run "
                "`checkpoint-janitor once --allow-mass-expiry` once."
            )
        if r.error:
            out.append(f"error: {r.error}")
        out.append("")
    return "\n".join(out)


def _counts(c: Counts, blobs: bool) -> list[str]:
    cells = [str(c.threads), str(c.checkpoints), str(c.writes)]
    return [*cells, str(c.blobs), human_bytes(c.bytes)] if blobs else [*cells, human_bytes(c.bytes)]
