"""The one text form of a moment the tool writes: ISO 8601 UTC to the second.

SQLite stores keep it (a hold's `held_at`, written by the engine and by the
saver alike; a residue check's date) as well as plans, reports and logs
showing it, so it lives with the stores, below every layer that writes or
shows it.
"""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(timestamp: float) -> str:
    """Unix seconds as ISO 8601 UTC to the second (`2026-03-01T12:00:00Z`), for logs and plans."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
