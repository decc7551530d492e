"""Batch sizing and pacing, so a sweep never starves the application.

Batches are sized by a target transaction time rather than a fixed row
count: the rows a store deletes per second vary by orders of magnitude with
row size, indexes and load, and the application's writers wait for the whole
of each write transaction.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class BatchSizer:
    """Rows per batch, adjusted after each batch toward `target_seconds`.

    Grows at most 2x and shrinks at most 4x per step, so one odd batch (a
    cold cache, a checkpoint of the WAL) does not swing the size.
    """

    target_seconds: float = 0.2
    max_rows: int = 20_000
    min_rows: int = 20
    rows: int = 500

    def observe(self, rows: int, seconds: float) -> None:
        """Record that a batch of `rows` took `seconds`."""
        if rows <= 0:
            return
        # Aim a little under the target, and grow by half at most: the rate
        # of the next batch is never quite the rate of this one.
        aim = self.target_seconds * 0.85
        wanted = self.rows * 2 if seconds <= 0 else int(rows * aim / seconds)
        wanted = max(self.rows // 4, min(wanted, self.rows * 3 // 2))
        self.rows = max(self.min_rows, min(self.max_rows, wanted))


def pause_after(batch_seconds: float, pause: float, pause_factor: float) -> float:
    """Seconds to rest after a batch: fixed, or a multiple of the batch's own time."""
    return max(pause, pause_factor * batch_seconds)
