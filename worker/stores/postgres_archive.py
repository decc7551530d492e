"""Putting archived rows back into a Postgres store, and settling pending segments (issue 13).

A segment of a Postgres store holds the saver's own tables (`checkpoints`,
`checkpoint_blobs`, `checkpoint_writes`, JSONB as its text, bytea as BLOB)
and `nulled_parents` (README "Getting data back"). Restore inserts what is
missing (`INSERT ... ON CONFLICT DO NOTHING`: a row that exists, e.g. one the
application wrote since, is left alone), then re-links each nulled parent
where the child's parent is still NULL and the parent row exists. Every
statement is idempotent, so a restore that stopped half-way is simply run
again.

The column list and types come from the store's catalog, not from this
module: a segment written under an older saver migration (no `task_path`)
restores into a newer table (the column takes its default).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import asyncpg
import structlog

from worker.stores.archive import PendingSegment, SegmentReader, Selection
from worker.stores.engine import RestoreCounts
from worker.stores.postgres_sql import (
    COLUMN_TYPES_SQL,
    COUNT_RELINKS_SQL,
    DATA_TABLES,
    KEYS_PRESENT_TEMPLATE,
    PARENTS_STILL_LINKED_SQL,
    RELINK_PARENTS_SQL,
    RESTORE_ROWS_TEMPLATE,
)

log = structlog.get_logger("checkpoint_janitor.postgres_archive")

RESTORED_TABLES = DATA_TABLES
"""In this order: a checkpoint before the blobs and writes that hang off it."""

KEYS = {
    "checkpoints": ("thread_id", "checkpoint_ns", "checkpoint_id"),
    "checkpoint_blobs": ("thread_id", "checkpoint_ns", "channel", "version"),
    "checkpoint_writes": ("thread_id", "checkpoint_ns", "checkpoint_id", "task_id", "idx"),
}
"""Each table's primary key, as the saver's migrations create it."""

CHUNK = 500
"""Rows per INSERT: bounds one statement's parameters (blobs can be large)."""

RECOVERY_SAMPLE = 1000
"""Keys of a pending segment looked up to tell whether its delete committed."""


class RestoreError(Exception):
    """A segment that does not fit the store's tables (unknown table or column)."""


def _cast_arrays(types: Sequence[str], first: int = 1) -> str:
    return ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types))


def _columns_of(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [[r[i] for r in rows] for i in range(width)]


def _chunks(rows: Iterable[tuple[Any, ...]], size: int = CHUNK) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for r in rows:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def column_types(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    """Column name -> SQL type of the store's `table`."""
    return {r[0]: r[1] for r in await conn.fetch(COLUMN_TYPES_SQL, table)}


def _keys_sql(table: str, types: dict[str, str], exists: bool) -> str:
    keys = KEYS[table]
    return KEYS_PRESENT_TEMPLATE.format(
        arrays=_cast_arrays([types[k] for k in keys]),
        keys=", ".join(keys),
        exists="EXISTS" if exists else "NOT EXISTS",
        table=table,
        match=" AND ".join(f"t.{k} = k.{k}" for k in keys),
    )


class Restorer:
    """Restores segments into one store on one connection (a transaction per segment)."""

    def __init__(self, conn: asyncpg.Connection, store: str) -> None:
        self.conn = conn
        self.store = store
        self._types: dict[str, dict[str, str]] = {}

    async def _table_types(self, table: str) -> dict[str, str]:
        if table not in self._types:
            self._types[table] = await column_types(self.conn, table)
        return self._types[table]

    async def _columns(self, segment: SegmentReader, table: str) -> list[str]:
        columns = segment.columns(table)
        types = await self._table_types(table)
        if unknown := [c for c in columns if c not in types]:
            raise RestoreError(
                f"store {self.store!r}: segment {segment.location} has columns {unknown} "
                f"that table {table} lacks"
            )
        return columns

    def _tables(self, segment: SegmentReader) -> list[str]:
        tables = segment.tables()
        if unknown := [t for t in tables if t not in RESTORED_TABLES]:
            raise RestoreError(
                f"store {self.store!r}: segment {segment.location} holds tables {unknown}, "
                f"not a Postgres store's ({segment.backend} segment?)"
            )
        return [t for t in RESTORED_TABLES if t in tables]

    async def restore(self, segments: Sequence[SegmentReader], select: Selection) -> RestoreCounts:
        """Insert the selected missing rows of every segment, then re-link nulled parents."""
        out = RestoreCounts(segments=len(segments))
        nulled: list[tuple[str, str, str, str]] = []
        for segment in segments:
            async with self.conn.transaction():
                for table in self._tables(segment):
                    columns = await self._columns(segment, table)
                    types = await self._table_types(table)
                    sql = RESTORE_ROWS_TEMPLATE.format(
                        table=table,
                        columns=", ".join(columns),
                        arrays=_cast_arrays([types[c] for c in columns]),
                    )
                    for chunk in _chunks(segment.rows(table, select)):
                        inserted = Counter(
                            r[0]
                            for r in await self.conn.fetch(sql, *_columns_of(chunk, len(columns)))
                        )
                        for thread_id, n in inserted.items():
                            out.add(thread_id, table, n)
                        out.present += len(chunk) - inserted.total()
            nulled.extend(segment.nulled_parents(select))
        # After every segment's rows: a parent nulled by a later sweep (a
        # dangling one) may come back from an earlier segment.
        for chunk in _chunks(nulled):
            relinked = Counter(
                r[0] for r in await self.conn.fetch(RELINK_PARENTS_SQL, *_columns_of(chunk, 4))
            )
            for thread_id, n in relinked.items():
                out.relink(thread_id, n)
        return out

    async def count(self, segments: Sequence[SegmentReader], select: Selection) -> RestoreCounts:
        """What `restore` would do now: the selected archived rows missing from the store."""
        out = RestoreCounts(segments=len(segments))
        keys: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
        nulled: set[tuple[str, str, str, str]] = set()
        for segment in segments:
            for table in self._tables(segment):
                columns = await self._columns(segment, table)
                at = [columns.index(k) for k in KEYS[table]]
                for r in segment.rows(table, select):
                    keys[table].add(tuple(r[i] for i in at))
                    out.present += 1
            nulled.update(segment.nulled_parents(select))
        for table, found in keys.items():
            sql = _keys_sql(table, await self._table_types(table), exists=False)
            for chunk in _chunks(sorted(found)):
                for r in await self.conn.fetch(sql, *_columns_of(chunk, len(KEYS[table]))):
                    out.add(r[0], table, int(r[1]))
                    out.present -= int(r[1])
        back = sorted(keys.get("checkpoints", ()))
        for chunk in _chunks(sorted(nulled)):
            args = [*_columns_of(chunk, 4), *_columns_of(back, 3)]
            for r in await self.conn.fetch(COUNT_RELINKS_SQL, *args):
                out.relink(r[0], int(r[1]))
        return out


async def committed(conn: asyncpg.Connection, pending: PendingSegment) -> bool | None:
    """Whether the delete of a pending segment committed: its rows are gone from the store.

    True: every sampled row is gone; False: every one is still there (the
    delete rolled back); None: some are back (restored, or re-written by the
    application since). The sample is the first table holding rows, in
    `RESTORED_TABLES` order (checkpoint ids never come back by themselves),
    else the nulled parents.
    """
    reader = pending.reader
    tables = [t for t in RESTORED_TABLES if t in reader.tables()]
    for table in tables:
        columns = reader.columns(table)
        at = [columns.index(k) for k in KEYS[table]]
        sample = []
        for r in reader.rows(table):
            sample.append(tuple(r[i] for i in at))
            if len(sample) == RECOVERY_SAMPLE:
                break
        if not sample:
            continue
        sql = _keys_sql(table, await column_types(conn, table), exists=True)
        present = sum(int(r[1]) for r in await conn.fetch(sql, *_columns_of(sample, len(at))))
        return _verdict(present, len(sample))
    parents = reader.nulled_parents()[:RECOVERY_SAMPLE]
    if not parents:
        return True
    linked = int(await conn.fetchval(PARENTS_STILL_LINKED_SQL, *_columns_of(parents, 4)))
    return _verdict(linked, len(parents))


def _verdict(present: int, sampled: int) -> bool | None:
    if present == 0:
        return True
    if present == sampled:
        return False
    return None
