"""Batch sizing and pacing, so a sweep never starves the application.

Batches are sized by a target transaction time rather than a fixed row
count: the rows a store deletes per second vary by orders of magnitude with
row size, indexes and load, and the application's writers wait for the whole
of each write transaction.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

RATE_WINDOW = 8
"""Batches whose rates the sizer remembers: it sizes by the slowest of them."""
AIM = 0.7
"""The share of the target a batch is sized to take: rates of consecutive batches
vary by 1.5x and more (a busy core, the disk flushing), and the target is a
ceiling for the application's waits, not an average."""


@dataclass(slots=True)
class BatchSizer:
    """Rows per batch, adjusted after each batch toward `target_seconds`.

    The size is what the slowest of the last `RATE_WINDOW` batches would
    have deleted in a little under the target: the rate of the next batch is
    never quite the rate of the last one (a busy core, a cold page), and a
    size taken from the fastest batch is what made transactions overshoot.
    Grows at most 1.5x and shrinks at most 4x per step, so one odd batch
    does not swing the size; the first batch is small and calibrates.
    """

    target_seconds: float = 0.2
    max_rows: int = 20_000
    min_rows: int = 20
    rows: int = 500
    rates: deque[float] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))
    """Rows per second of the recent batches."""

    def observe(self, rows: int, seconds: float) -> None:
        """Record that a batch of `rows` took `seconds`."""
        if rows <= 0:
            return
        aim = self.target_seconds * AIM
        if seconds <= 0:
            wanted = self.rows * 2
        else:
            self.rates.append(rows / seconds)
            wanted = int(min(self.rates) * aim)
        wanted = max(self.rows // 4, min(wanted, self.rows * 3 // 2))
        self.rows = max(self.min_rows, min(self.max_rows, wanted))


PROBE_SECONDS = 0.11
"""A rest long enough for any writer waiting in SQLite's default busy handler to
retry inside it: that handler sleeps at most 100 ms between two tries."""
PROBE_EVERY = 2.0
"""Seconds of sweeping between two probes while no writer is seen: about the longest
a writer that starts meanwhile waits, well below the 5 s busy timeout of the savers."""
WRITER_WINDOW = 2.0
"""Seconds of sweeping (batches and rests) after the last sign of a writer during
which the sweep still rests `pause_factor` after every batch."""


@dataclass(slots=True)
class Pacer:
    """How long to rest after each batch.

    `pause` always applies. `pause_factor` x the batch's time applies after
    every batch of an engine that cannot tell whether the application writes
    (`writer_seen` None), and, for one that can (SQLite, Postgres), while a
    writer was seen in the last `WRITER_WINDOW` seconds of the sweep. A writer
    is seen when another connection committed since the sweep's last batch, or
    the batch met it (SQLite: its BEGIN waited for the write lock; Postgres: a
    thread changed under it, or a lock error retried it). With no writer seen, a
    rest of `PROBE_SECONDS` every `PROBE_EVERY` seconds lets in a writer that
    started waiting meanwhile (it cannot be seen while it waits); once it
    commits it is seen. A `pause_factor` of 0 turns the probes off as well.

    Time here is the sweep's own (batch and rest seconds added up), so the
    rule needs no clock.
    """

    pause: float = 0.0
    pause_factor: float = 0.5
    since_writer: float = float("inf")
    """Sweep seconds since the last sign of a writer (inf: none seen yet)."""
    since_probe: float = 0.0
    """Sweep seconds since the last rest that let a waiting writer in."""

    def rest(self, batch_seconds: float, writer_seen: bool | None) -> float:
        """Seconds to rest after a batch of `batch_seconds`."""
        paced = max(self.pause, self.pause_factor * batch_seconds)
        if writer_seen is None:
            return paced
        if writer_seen:
            self.since_writer = 0.0
        else:
            self.since_writer += batch_seconds
        self.since_probe += batch_seconds
        if self.since_writer < WRITER_WINDOW:
            rest = paced
        elif self.pause_factor > 0 and self.since_probe >= PROBE_EVERY:
            rest = max(self.pause, PROBE_SECONDS)
        else:
            rest = self.pause
        if rest >= PROBE_SECONDS:
            self.since_probe = 0.0
        else:
            self.since_probe += rest
        self.since_writer += rest
        return rest


def pause_after(batch_seconds: float, pause: float, pause_factor: float) -> float:
    """Seconds to rest after a batch: fixed, or a multiple of the batch's own time."""
    return max(pause, pause_factor * batch_seconds)
