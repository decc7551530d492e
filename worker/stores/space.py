"""What a store takes on disk, and what a reclamation gave back: the same for every engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Space:
    """A store's size on disk now, and the part of it a reclamation could give back."""

    store_bytes: int
    """SQLite: the file and its WAL. Postgres: the checkpoint tables with TOAST and indexes."""
    reclaimable_bytes: int
    """SQLite: free pages. Postgres: an estimate of the space dead tuples hold."""
    detail: dict[str, Any] = field(default_factory=dict)
    """Engine-specific figures for `stats` (pages and mode; per-table tuples and bytes)."""


@dataclass(slots=True)
class Reclaimed:
    """One reclamation of one store: what it did, how long it took, and the space around it."""

    store: str
    action: str
    """`incremental`, `convert`, `vacuum`, `vacuum_full`, or `none` (only measured)."""
    before: Space
    after: Space
    seconds: float = 0.0
    steps: int = 0
    """Write transactions it ran (SQLite steps, Postgres tables vacuumed)."""
    longest_step_seconds: float = 0.0
    """The longest time it held a write lock in one step."""
    tables: list[str] = field(default_factory=list)
    """(Postgres) the tables it vacuumed."""
    note: str = ""
    """Why it did less than asked (wrong mode, lock busy, WAL busy), for the operator."""

    @property
    def reclaimed_bytes(self) -> int:
        """Bytes the store shrank by (never negative: the application may have grown it)."""
        return max(0, self.before.store_bytes - self.after.store_bytes)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary for logs and `--format json`."""
        return {
            "store": self.store,
            "action": self.action,
            "seconds": round(self.seconds, 3),
            "steps": self.steps,
            "longest_step_seconds": round(self.longest_step_seconds, 4),
            "store_bytes_before": self.before.store_bytes,
            "store_bytes_after": self.after.store_bytes,
            "reclaimable_bytes_before": self.before.reclaimable_bytes,
            "reclaimable_bytes_after": self.after.reclaimable_bytes,
            "reclaimed_bytes": self.reclaimed_bytes,
            "tables": self.tables,
            "note": self.note,
        }


class ReclaimRefused(Exception):
    """A reclamation that must not or cannot run: the message says why and what to do."""
