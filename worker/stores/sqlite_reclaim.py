"""Giving a SQLite store's free pages back to the filesystem.

Deleting rows leaves free pages in the file. A file in incremental
auto-vacuum mode (`auto_vacuum = 2`) gives them back in steps: each step is
one short `BEGIN IMMEDIATE` transaction running `PRAGMA incremental_vacuum(N)`,
sized like a delete batch (`BatchSizer` toward `target_batch_seconds`) and
followed by the same pause, so the application's writers keep flowing. In WAL
mode the file itself shrinks when a checkpoint copies the moved pages back,
so every step is followed by a passive checkpoint, and a WAL that has grown
is truncated at the end (a non-blocking attempt).

A file `SqliteSaver` created is not in that mode. Switching it takes one
`VACUUM`, which rewrites the whole file under the write lock: that is
`convert`, an explicit operator action, checked first (free disk for the
copies, free pages worth it) and never run on its own.

Atomicity is SQLite's own: a step and a conversion are single transactions,
so a SIGKILL at any point leaves the file as before that transaction, and the
next run carries on from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from policies.config import BatchSettings, ReclaimSettings
from worker.stores.space import Reclaimed, ReclaimRefused, Space
from worker.stores.sqlite import SqliteStore
from worker.stores.sqlite_sql import (
    COMPILE_OPTIONS_SQL,
    PAGES_SQL,
    SET_INCREMENTAL_SQL,
    STEP_SQL,
    TEMP_DIR_SQL,
    TEMP_STORE_SQL,
    VACUUM_SQL,
    WAL_PASSIVE_SQL,
    WAL_TRUNCATE_SQL,
)
from worker.stores.throttle import BatchSizer, pause_after

log = structlog.get_logger("checkpoint_janitor.sqlite_reclaim")


AUTO_VACUUM_MODES = {0: "none", 1: "full", 2: "incremental"}
INCREMENTAL = 2

FIRST_STEP_PAGES = 256
MIN_STEP_PAGES = 16
MAX_STEP_PAGES = 100_000

PROGRESS_OPCODES = 100_000
"""SQLite calls the progress handler every this many virtual machine steps."""
PROGRESS_SECONDS = 1.0

WAL_FRAME_HEADER = 24
"""Bytes each page carries in the WAL besides its content."""

CONVERT_BYTES_PER_SECOND = 100e6
"""Rate `convert` predicts its duration with: bytes of live pages per second.

VACUUM reads the live pages, writes them to the temporary copy, then writes
them again into the WAL; free pages cost next to nothing. Measured 175 MB/s
of live pages (a 458 MB file, 56 MB live, in 0.32 s) on a shared 2-core
machine with a local SSD (docs/benchmarks.md, "Reclaim"); the estimate
assumes a little over half that, and says so.
"""

# Where SQLite's unix VFS puts temporary files when no directory is set:
# the first of these that is a writable directory.
_TEMP_ENV = ("SQLITE_TMPDIR", "TMPDIR")
_TEMP_DIRS = ("/var/tmp", "/usr/tmp", "/tmp", ".")


@dataclass(frozen=True, slots=True)
class Pages:
    """A SQLite file's page figures."""

    page_size: int
    page_count: int
    free_pages: int
    auto_vacuum: int

    @property
    def live_bytes(self) -> int:
        """What a VACUUM would keep: the pages in use."""
        return (self.page_count - self.free_pages) * self.page_size

    @property
    def free_fraction(self) -> float:
        """Free pages as a share of the file."""
        return self.free_pages / self.page_count if self.page_count else 0.0

    @property
    def mode(self) -> str:
        """The auto-vacuum mode by name."""
        return AUTO_VACUUM_MODES.get(self.auto_vacuum, str(self.auto_vacuum))


async def pages(store: SqliteStore) -> Pages:
    """The file's page size, page count, free pages and auto-vacuum mode."""
    async with store.conn.execute(PAGES_SQL) as cur:
        row = await cur.fetchone()
    assert row is not None  # the pragmas always answer one row
    return Pages(*(int(v) for v in row))


def wal_bytes(store: SqliteStore) -> int:
    """The WAL file's size (0 when there is none)."""
    try:
        return os.path.getsize(store.path + "-wal")
    except OSError:
        return 0


async def measure(store: SqliteStore) -> Space:
    """The file and WAL on disk, and the free pages a reclamation could give back."""
    p = await pages(store)
    return Space(
        store_bytes=os.path.getsize(store.path) + wal_bytes(store),
        reclaimable_bytes=p.free_pages * p.page_size,
        detail={
            "auto_vacuum": p.mode,
            "page_size": p.page_size,
            "page_count": p.page_count,
            "free_pages": p.free_pages,
            "free_fraction": round(p.free_fraction, 4),
            "wal_bytes": wal_bytes(store),
        },
    )


# ------------------------------------------------------------------ incremental


StepFn = Callable[[int, float], None]


async def reclaim_incremental(
    store: SqliteStore,
    batch: BatchSettings,
    settings: ReclaimSettings,
    *,
    stop: asyncio.Event | None = None,
    on_step: StepFn | None = None,
) -> Reclaimed:
    """Give free pages back in short steps; on a file not in incremental mode, say so.

    `on_step` hears each step's pages freed and seconds the write lock was held.
    """
    started = time.monotonic()
    before = await measure(store)
    result = Reclaimed(store.name, "incremental", before, before)
    p = await pages(store)
    if p.auto_vacuum != INCREMENTAL:
        result.action = "none"
        if p.auto_vacuum == 0 and p.free_pages:
            result.note = (
                f"auto_vacuum is {p.mode}: free pages stay in the file; run "
                f"`checkpoint-janitor reclaim --store {store.name} --convert` once to switch "
                "it to incremental mode"
            )
    sizer = BatchSizer(
        target_seconds=batch.target_batch_seconds,
        max_rows=MAX_STEP_PAGES,
        min_rows=MIN_STEP_PAGES,
        rows=FIRST_STEP_PAGES,
    )
    free = p.free_pages if p.auto_vacuum == INCREMENTAL else 0
    while free > 0 and not (stop is not None and stop.is_set()):
        held = await _step(store, sizer.rows)
        if held is None:
            result.note = "the application held the write lock past busy_timeout; stopped early"
            log.warning("reclaim_step_skipped", store=store.name, reason="write lock busy")
            break
        now_free = (await pages(store)).free_pages
        freed, free = max(0, free - now_free), now_free
        sizer.observe(max(freed, 1), held)
        result.steps += 1
        result.longest_step_seconds = max(result.longest_step_seconds, held)
        if on_step is not None:
            on_step(freed, held)
        log.debug("reclaim_step", store=store.name, pages=freed, seconds=round(held, 4))
        # Read to the end: a statement left mid-row would make the next COMMIT fail.
        async with store.conn.execute(WAL_PASSIVE_SQL) as cur:
            await cur.fetchall()
        if free > 0:
            await _rest(pause_after(held, batch.pause, batch.pause_factor), stop)
    await _truncate_wal(store, settings, result)
    result.after = await measure(store)
    result.seconds = time.monotonic() - started
    return result


async def _step(store: SqliteStore, pages: int) -> float | None:
    """One step of at most `pages`; the seconds it held the write lock, None if it never got it.

    BEGIN IMMEDIATE waits one short busy slice inside SQLite; the step is
    retried as a delete batch's BEGIN is, up to the store's busy_timeout.
    """
    deadline = time.monotonic() + store.busy_timeout
    pause = 0.005
    while True:
        t0 = time.monotonic()
        try:
            await store.conn.executescript(STEP_SQL.format(pages=pages))
            return time.monotonic() - t0
        except BaseException as e:
            # Also on cancellation: the step is all or nothing.
            if store.conn.in_transaction:
                await store.conn.execute("ROLLBACK")
            if not isinstance(e, sqlite3.OperationalError) or not _busy(e):
                raise
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)


def _busy(e: sqlite3.OperationalError) -> bool:
    return "locked" in str(e) or "busy" in str(e)


async def _rest(seconds: float, stop: asyncio.Event | None) -> None:
    if seconds <= 0:
        return
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _truncate_wal(store: SqliteStore, settings: ReclaimSettings, result: Reclaimed) -> None:
    """Checkpoint and truncate a WAL past `wal_truncate_mb`, if no one is in the way now."""
    size = wal_bytes(store)
    if size <= settings.wal_truncate_mb * 1024 * 1024:
        return
    async with store.conn.execute(WAL_TRUNCATE_SQL) as cur:
        row = await cur.fetchone()
    if row is not None and int(row[0]) != 0:
        note = f"WAL of {size} bytes not truncated: the application is reading or writing"
        result.note = f"{result.note}; {note}" if result.note else note
        log.info("wal_truncate_busy", store=store.name, wal_bytes=size)


# ------------------------------------------------------------------ convert


@dataclass(frozen=True, slots=True)
class DiskNeed:
    """Room a conversion needs on one filesystem."""

    where: str
    """The directories on this filesystem (the file's, SQLite's temp dir)."""
    needed: int
    free: int

    @property
    def enough(self) -> bool:
        """The filesystem has the room."""
        return self.free >= self.needed


@dataclass(frozen=True, slots=True)
class ConvertPlan:
    """What `convert` would do to a file, and whether it should."""

    store: str
    path: str
    pages: Pages
    file_bytes: int
    temp_dir: str | None
    """Where VACUUM writes its temporary copy; None when SQLite keeps it in memory."""
    disks: tuple[DiskNeed, ...]
    expected_seconds: float
    refusal: str | None
    """Why it must not run; None when it may."""

    def describe(self) -> list[str]:
        """The lines an operator reads before agreeing."""
        p = self.pages
        lines = [
            f"store {self.store}: {self.path}: {_mb(self.file_bytes)}, "
            f"{p.free_pages} of {p.page_count} pages free ({p.free_fraction:.0%}), "
            f"auto_vacuum={p.mode}",
            f"  converts to auto_vacuum=incremental with one VACUUM; the file becomes at most "
            f"about {_mb(p.live_bytes)}",
            f"  expected to take about {_duration(self.expected_seconds)} "
            f"(assuming {CONVERT_BYTES_PER_SECOND / 1e6:.0f} MB/s of live pages; slower disks "
            "take longer)",
            "  blocks: it holds the write lock the whole time; the application's writes wait, "
            "and a write waiting past its busy timeout (sqlite3's default 5 s) fails with "
            "'database is locked'. Reads go on (WAL).",
            "  temporary copy: "
            + (
                f"{_mb(p.live_bytes)} in {self.temp_dir}"
                if self.temp_dir is not None
                else "in memory (temp_store=MEMORY)"
            )
            + f"; the WAL grows by about {_mb(p.live_bytes)} until it is checkpointed",
        ]
        for d in self.disks:
            lines.append(
                f"  disk {d.where}: needs {_mb(d.needed)} free, has {_mb(d.free)}"
                + ("" if d.enough else "  <- not enough")
            )
        return lines


async def plan_convert(store: SqliteStore, settings: ReclaimSettings) -> ConvertPlan:
    """Check a conversion: mode, free pages worth it, room on disk for the copies."""
    p = await pages(store)
    file_bytes = os.path.getsize(store.path)
    temp_dir = await _temp_dir(store)
    # VACUUM writes the live pages twice: into its temporary copy, then into
    # the WAL (with a frame header each) before a checkpoint shrinks the file.
    wal_need = (p.page_count - p.free_pages) * (p.page_size + WAL_FRAME_HEADER)
    needs: dict[int, tuple[list[str], int]] = {}
    folder = os.path.dirname(os.path.abspath(store.path))
    margin = int(settings.min_disk_margin * file_bytes)
    for where, amount in ((folder, wal_need + margin), (temp_dir, p.live_bytes)):
        if where is None:
            continue
        dev = os.stat(where).st_dev
        dirs, total = needs.get(dev, ([], 0))
        needs[dev] = ([*dirs, where], total + amount)
    disks = tuple(
        DiskNeed(" and ".join(dirs), total, shutil.disk_usage(dirs[0]).free)
        for dirs, total in needs.values()
    )
    refusal = None
    if p.auto_vacuum == INCREMENTAL:
        refusal = (
            "already in incremental auto-vacuum mode: nothing to convert; "
            f"`checkpoint-janitor reclaim --store {store.name}` gives free pages back"
        )
    elif p.auto_vacuum != 0:
        refusal = f"auto_vacuum={p.mode} already gives free pages back at every commit"
    elif p.free_fraction < settings.min_free_fraction:
        refusal = (
            f"not worth it: {p.free_fraction:.1%} of the file is free pages, below "
            f"reclaim.min_free_fraction {settings.min_free_fraction:.0%}; the rewrite would "
            "block writers for little gain (lower the threshold to convert anyway)"
        )
    else:
        for d in disks:
            if not d.enough:
                refusal = (
                    f"not enough disk on {d.where}: the conversion needs {_mb(d.needed)} free "
                    f"(copies plus reclaim.min_disk_margin {settings.min_disk_margin:g} of the "
                    f"file), {_mb(d.free)} is"
                )
                break
    return ConvertPlan(
        store=store.name,
        path=store.path,
        pages=p,
        file_bytes=file_bytes,
        temp_dir=temp_dir,
        disks=disks,
        expected_seconds=p.live_bytes / CONVERT_BYTES_PER_SECOND,
        refusal=refusal,
    )


async def convert(
    store: SqliteStore,
    settings: ReclaimSettings,
    plan: ConvertPlan | None = None,
    progress: Callable[[float], None] | None = None,
) -> Reclaimed:
    """Switch the file to incremental auto-vacuum with one VACUUM, after `plan_convert` agrees.

    `progress` hears the seconds elapsed from inside the VACUUM (at its start,
    then every `PROGRESS_SECONDS`), on SQLite's thread. Raises `ReclaimRefused`
    when the plan refuses, or when the application holds the write lock past
    the store's busy timeout.
    """
    plan = plan or await plan_convert(store, settings)
    if plan.refusal is not None:
        raise ReclaimRefused(f"store {store.name}: {plan.refusal}")
    started = time.monotonic()
    before = await measure(store)
    await store.conn.execute(SET_INCREMENTAL_SQL)
    if progress is not None:
        await store.conn.set_progress_handler(_ticker(progress), PROGRESS_OPCODES)
    try:
        await _vacuum(store)
    finally:
        if progress is not None:
            # sqlite3 clears the handler on None; aiosqlite's annotation omits it.
            await store.conn.set_progress_handler(None, PROGRESS_OPCODES)  # type: ignore[arg-type]
    held = time.monotonic() - started
    result = Reclaimed(store.name, "convert", before, before, steps=1, longest_step_seconds=held)
    p = await pages(store)
    if p.auto_vacuum != INCREMENTAL:
        raise ReclaimRefused(
            f"store {store.name}: VACUUM ran but auto_vacuum is still {p.mode}; "
            "is the file read-only or in a journal mode that forbids the change?"
        )
    # A conversion always grows the WAL by the whole file: truncate it now.
    await _truncate_wal(store, settings.model_copy(update={"wal_truncate_mb": 0.0}), result)
    result.after = await measure(store)
    result.seconds = time.monotonic() - started
    return result


def _ticker(progress: Callable[[float], None]) -> Callable[[], int]:
    """A SQLite progress handler calling `progress(elapsed)` now and then; never aborts."""
    t0 = time.monotonic()
    last: list[float] = []

    def tick() -> int:
        elapsed = time.monotonic() - t0
        if not last or elapsed - last[0] >= PROGRESS_SECONDS:
            last[:] = [elapsed]
            progress(elapsed)
        return 0

    return tick


async def _vacuum(store: SqliteStore) -> None:
    """VACUUM, retried while the application holds the write lock, up to busy_timeout."""
    deadline = time.monotonic() + store.busy_timeout
    pause = 0.005
    while True:
        try:
            await store.conn.execute(VACUUM_SQL)
            return
        except sqlite3.OperationalError as e:
            if not _busy(e):
                raise
        if time.monotonic() >= deadline:
            raise ReclaimRefused(
                f"store {store.name}: the application held the write lock for "
                f"{store.busy_timeout:g} s (busy_timeout); nothing was changed, try again "
                "in a quieter moment or raise defaults.batch.busy_timeout"
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)


async def _temp_dir(store: SqliteStore) -> str | None:
    """The directory SQLite's VACUUM writes its temporary copy to; None if in memory."""
    async with store.conn.execute(TEMP_STORE_SQL) as cur:
        row = await cur.fetchone()
    pragma = int(row[0]) if row else 0
    compiled = 1
    async with store.conn.execute(COMPILE_OPTIONS_SQL) as cur:
        for (option,) in await cur.fetchall():
            if str(option).startswith("TEMP_STORE="):
                compiled = int(str(option).split("=", 1)[1])
    # SQLite's rule: 0 always a file, 3 always memory; 1 and 2 follow the
    # pragma when it is set (1 file, 2 memory), else their own default.
    in_memory = compiled == 3 or (
        compiled in (1, 2) and (pragma == 2 or (pragma == 0 and compiled == 2))
    )
    if in_memory:
        return None
    async with store.conn.execute(TEMP_DIR_SQL) as cur:
        row = await cur.fetchone()
    candidates: list[Any] = [row[0] if row else None]
    candidates += [os.environ.get(name) for name in _TEMP_ENV]
    candidates += list(_TEMP_DIRS)
    for c in candidates:
        if c and os.path.isdir(c) and os.access(c, os.W_OK | os.X_OK):
            return os.path.abspath(str(c))
    return os.path.abspath(".")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
