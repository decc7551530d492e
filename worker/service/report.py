"""Rendering sweep reports for people (`table`) and programs (`json`, `jsonl`)."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from worker.stores.engine import Counts
from worker.stores.timestamps import iso_utc
from worker.sweep import SweepReport, ThreadPlan


def report_dict(report: SweepReport) -> dict[str, Any]:
    """A JSON-ready dict of one store's sweep (or plan)."""
    return {
        "store": report.store,
        "at": iso_utc(report.now),
        "dry_run": report.dry_run,
        "outcome": report.outcome.value,
        "threads_total": report.threads_total,
        "threads_scanned": report.threads_scanned,
        "safety_limit": {
            "max_threads_expired": report.expiry_limit,
            "threads_to_expire": report.expiries_wanted,
            "would_stop": report.would_hit_limit,
            "lifted": report.limit_lifted,
            "policy": report.limit_reached_by,
            "by_policy": dict(report.expiries_by_policy),
        },
        "policies": [
            {
                "policy": p.policy,
                **asdict(p.deleted),
                "by_reason": {reason.value: asdict(c) for reason, c in p.by_reason.items()},
                "oldest_eligible_age_seconds": p.oldest_eligible_age,
                "skipped": {reason.value: n for reason, n in p.skipped.items()},
                "ttl_fallbacks": {reason.value: n for reason, n in p.ttl_fallbacks.items()},
                "registry_error": (
                    {"reason": p.registry_error.reason.value, "error": p.registry_error.message}
                    if p.registry_error is not None
                    else None
                ),
            }
            for p in report.policies.values()
        ],
        "total": asdict(report.deleted),
        "batches": report.batches,
        "longest_batch_seconds": round(report.longest_batch_seconds, 4),
        "duration_seconds": round(report.duration_seconds, 3),
        "changed_threads": report.changed_threads,
        "locked_threads": report.locked_threads,
        "held_threads": report.held_threads,
        "over_quota": [
            {"policy": policy or None, "group": group or None, "bytes": n}
            for (policy, group), n in report.over_quota.items()
        ],
        "archived": {"rows": dict(report.archived_rows), "bytes": report.archive_bytes},
        "error": report.error,
    }


def thread_dict(entry: ThreadPlan) -> dict[str, Any]:
    """A JSON-ready dict of one per-thread plan entry."""
    return {
        "store": entry.store,
        "thread_id": entry.thread_id,
        "policy": entry.policy,
        "action": entry.action,
        "reason": entry.reason.value,
        "last_activity": iso_utc(entry.last_activity) if entry.last_activity is not None else None,
        "idle_seconds": round(entry.idle_seconds) if entry.idle_seconds is not None else None,
        "checkpoints": entry.counts.checkpoints,
        "writes": entry.counts.writes,
        "blobs": entry.counts.blobs,
        "bytes": entry.counts.bytes,
        "held_by_safety_limit": entry.held,
    }


def render_json(
    reports: Sequence[SweepReport],
    at: float | None = None,
    threads: Mapping[str, Sequence[ThreadPlan]] | None = None,
) -> str:
    """Every store's report as one JSON document; with `threads`, each store's thread list."""
    stores = []
    for r in reports:
        d = report_dict(r)
        if threads is not None:
            d["threads"] = [thread_dict(e) for e in threads.get(r.store, ())]
        stores.append(d)
    doc: dict[str, Any] = {"at": iso_utc(at)} if at is not None else {}
    doc["stores"] = stores
    return json.dumps(doc, indent=2)


def render_threads(entries: Sequence[ThreadPlan]) -> str:
    """A plain-text table of per-thread entries: what each thread loses, under which policy."""
    head = [
        "thread",
        "policy",
        "action",
        "reason",
        "last activity",
        "idle",
        "checkpoints",
        "writes",
        "bytes",
    ]
    rows = [
        [
            e.thread_id,
            e.policy,
            e.action + (" (held: safety limit)" if e.held else ""),
            e.reason.value,
            iso_utc(e.last_activity) if e.last_activity is not None else "-",
            _age(e.idle_seconds),
            str(e.counts.checkpoints),
            str(e.counts.writes),
            human_bytes(e.counts.bytes),
        ]
        for e in entries
    ]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = [str.ljust] * 5 + [str.rjust] * 4

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f(c, w) for f, c, w in zip(fmt, cells, widths, strict=True)).rstrip()

    return "\n".join([line(head), *(line(r) for r in rows)])


def render_holds(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of holds (`checkpoint-janitor holds`): thread, held at, by, reason."""
    head = ["thread", "held at", "held by", "reason"]
    cells = [
        [str(r["thread_id"]), str(r["held_at"]), r["held_by"] or "-", r["reason"] or "-"]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *cells]) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
        for x in [head, *cells]
    )


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


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
        verb = "would delete" if r.dry_run else "deleted"
        out.append(
            f"store {r.store}: {r.threads_total} threads; {verb} "
            f"{r.deleted.checkpoints} checkpoints in {r.duration_seconds:.2f}s"
        )
        out.extend(_table(r, blobs))
        out.extend(_notes(r))
        out.append("")
    return "\n".join(out)


def _table(r: SweepReport, blobs: bool) -> list[str]:
    """The store's rows per policy and reason, then its total, in aligned columns."""
    head = ["policy", "reason", "threads", "checkpoints", "writes", "blobs", "bytes"]
    if not blobs:
        head.remove("blobs")
    blank = [""] * (len(head) - 3)
    rows: list[list[str]] = []
    for p in r.policies.values():
        if not p.by_reason:
            rows.append([p.policy, "-", *_counts(Counts(), blobs)])
        for reason, c in sorted(p.by_reason.items()):
            rows.append([p.policy, reason.value, *_counts(c, blobs)])
        for reason_s, n in sorted(p.skipped.items()):
            rows.append([p.policy, f"skipped: {reason_s.value}", str(n), *blank])
        for fallback, n in sorted(p.ttl_fallbacks.items()):
            rows.append([p.policy, f"ttl fallback: {fallback.value}", str(n), *blank])
        if p.registry_error is not None:
            rows.append([p.policy, f"registry: {p.registry_error.reason.value}", "", *blank])
    rows.append(["total", "", *_counts(r.deleted, blobs)])
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    return [_row(head, widths), *(_row(x, widths) for x in rows)]


def _notes(r: SweepReport) -> list[str]:
    """What the operator should know beyond the counts: limits, holds, locks, caps, errors."""
    out: list[str] = []
    if r.would_hit_limit:
        verb = "would expire" if r.dry_run else "expired"
        out.append(
            f"safety limit: {r.expiries_wanted} threads to expire, at most "
            f"{r.expiry_limit} allowed per sweep (policy {r.limit_reached_by}): the sweep "
            f"{verb} none of them (trimming runs). Check the clock and the policies; then "
            "raise defaults.max_delete_fraction, or run "
            "`checkpoint-janitor once --allow-mass-expiry` once."
        )
    if r.held_threads:
        out.append(
            f"legal holds: {r.held_threads} threads held, never expired, trimmed or purged "
            "(`checkpoint-janitor holds` lists them)."
        )
    if r.locked_threads:
        out.append(
            f"write lock: {r.locked_threads} threads skipped, their batches never got the "
            "store's write lock (defaults.batch.busy_timeout); decided again next sweep."
        )
    for (policy, group), n in r.over_quota.items():
        if n > 0:
            what = f"policy {policy} group {group}" if policy else "the store"
            out.append(
                f"over quota: {what} stays {human_bytes(n)} over its cap after everything "
                "the policies allow to go (protected, waiting, held or undated threads hold "
                "the rest)."
            )
    for p in r.policies.values():
        if p.registry_error is not None:
            out.append(
                f"orphan registry of policy {p.policy}: {p.registry_error.message}; "
                "the policy matched no thread in this sweep."
            )
    if r.error:
        out.append(f"error: {r.error}")
    return out


def _counts(c: Counts, blobs: bool) -> list[str]:
    cells = [str(c.threads), str(c.checkpoints), str(c.writes)]
    return [*cells, str(c.blobs), human_bytes(c.bytes)] if blobs else [*cells, human_bytes(c.bytes)]
