"""The Postgres engine: stores written by `langgraph-checkpoint-postgres`.

Tables `checkpoints` (checkpoint and metadata as JSONB), `checkpoint_blobs`
(channel values, shared between the checkpoints of a thread and namespace
through `checkpoint -> 'channel_versions'`), `checkpoint_writes` and
`checkpoint_migrations`. One asyncpg pool per store, shared by its policies.

Why deletes are safe beside a live application (docs/architecture.md, invariant 5):

- Checkpoints and writes go by the ids decided from the scan, never by "no
  checkpoint has this id": a run may commit a superstep's writes before their
  checkpoint, and what it saves during the sweep is not in the decided ids.
- Each batch is one READ COMMITTED transaction. It reads each thread's shape
  (count and newest id per namespace) before deleting and again after: a
  checkpoint committed in between — a new turn, a resume, a fork from an old
  checkpoint — changes the count, and the whole batch rolls back (and runs
  again without that thread). REPEATABLE READ could not do this: its snapshot
  would never see the resume. The window left is the few milliseconds
  between the last re-check and COMMIT.
- Blobs are the hard part: a fork (`update_state` from an old checkpoint B)
  reads B, then writes a new checkpoint that references B's blob versions
  without rewriting them (`aput` writes blobs only for the channels it
  changed, `ON CONFLICT DO NOTHING`), and no row lock of ours blocks its
  insert. The window is not one statement: it runs from the fork's read to
  its write, across our commit. A batch that trimmed B and, in the same
  transaction, collected the blob versions only B referenced (the thread
  being quiet) would leave the fork naming versions that are gone: it reads
  back with those channels empty. So a thread's unreferenced blobs are
  collected only when (a) the thread is quiet for the grace period (newest
  checkpoint), and (b) it has had no deletion — trim or policy expiry — for
  the grace period. Deletions are dated in the tool's own table
  `checkpoint_janitor_deletions(thread_id, deleted_at)` (created on first
  use, in the store's schema, upserted by one statement per batch in the
  deletes' transaction, at the sweep's clock); the collecting statement
  re-checks both the references (an anti-join against the committed
  checkpoints) and the date. Both plans (rows and aggregates) ask the same
  statement which threads hold collectable blobs, and the dry run counts
  none for a thread the batch trims. A row older than the grace period is
  dropped when a batch next collects on its thread; a purge drops it. Between
  a store's residue looks (`defaults.residue_check_every`) a row is also what
  makes a sweep look at its thread's blobs at all (`ThreadAggregate.dated`):
  the worker's own trims keep their timing, others' leftovers wait for a look.
  The window left: a run that read a checkpoint and saves a fork of it more
  than `grace_period` after a sweep deleted it. Deletions by other tools are
  not dated: the saver wrapper (`RetentionSaver`) frees blobs in its trim
  statement at once, as the official `prune` does, so a fork racing a
  wrapper trim of its base keeps the old window (see `worker/saver/postgres.py`).
- Expiry racing a run in flight. A resume, an `invoke(None)` retry or a new
  turn with `durability="exit"` reads the thread, then saves nothing until
  its node ends (a Command resume leaves a `__resume__` write first; the
  others nothing), so the fingerprint re-check cannot see it. If the expiry
  deleted the blobs, the run's next checkpoint would name blob versions that
  are gone (`aput` writes blobs only for the channels the step changed) and
  read back without them. So a policy's expiry deletes the thread's
  checkpoints and writes, and dates the thread in the tool's own table
  `checkpoint_janitor_expired(thread_id, expired_at, head_metadata)` (created
  on first use, in the store's schema, written in the expiry's transaction),
  but leaves its blobs. A run that read the thread before and saves after
  recreates it whole from its own state, without the expired history — what
  SQLite, whose values are inline, does anyway. Sweeps later than
  `grace_period` after the expiry delete the blobs of listed threads that
  still hold no checkpoint and no write (re-checked in the deleting
  statement), then the row; a thread that came back loses its row, and its
  old blobs go by the quiet-thread GC above. The window left: a run that read
  the thread before its expiry and saves more than `grace_period` after it
  (or during that one statement). A purge deletes the blobs at once (and the
  row): it names the thread for erasure.
  Skipping threads whose head holds a `__resume__` write was weighed and not
  taken: a write has no date, so a resume that crashed would keep its
  thread from ever expiring, and only Command resumes leave one.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import structlog
from psycopg.conninfo import conninfo_to_dict

from policies.config import redact_dsn
from policies.decide import is_delta_thread, root_head
from policies.ids import checkpoint_time
from policies.model import CheckpointSummary, ThreadView
from policies.plan import Detail, NamespaceAggregate, ThreadAggregate, ThreadPlan
from policies.summary import json_object, summarize
from policies.waiting import TASKS, is_waiting
from worker.stores import postgres_archive as pg_archive
from worker.stores.archive import Archive, Segment, SegmentReader, Selection
from worker.stores.engine import (
    HOLDS_TABLE,
    RESIDUE_TABLE,
    Counts,
    Fingerprint,
    Hold,
    Recovered,
    RestoreCounts,
    ScannedThread,
    StoreError,
    ThreadWork,
    TrimRange,
    WorkResult,
    fingerprint_of,
)
from worker.stores.stats import AgeHistogram

log = structlog.get_logger("checkpoint_janitor.postgres")

# ---------------------------------------------------------------- schema

REQUIRED_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes", "checkpoint_migrations")
# checkpoint_migrations.v of langgraph-checkpoint-postgres 2.x/3.x: 3 is the
# first with all three tables; 9 (task_path) the newest this worker knows.
MIN_MIGRATION, MAX_MIGRATION = 3, 9

TABLES_SQL = """
SELECT table_name FROM information_schema.tables
WHERE table_schema = $1 AND table_name = ANY($2::text[])
"""
MIGRATION_SQL = "SELECT max(v) FROM checkpoint_migrations"

# ---------------------------------------------------------------- scan

# Both tables' keyset pages merged in one statement, so the database alone
# orders and compares ids, in the column's own collation: Python's order is not
# an ICU collation's, and a cursor taken in one order and compared in another
# skips threads. Each branch is limited before the UNION, so it steps its
# thread_id index (in the column's collation: an ORDER BY ... COLLATE "C" would
# sort the whole table for every page). No skip scan before Postgres 18:
# DISTINCT walks each thread's index entries, which the scan reads next anyway.
# The first page has no lower bound, so the empty id is walked too.
_THREADS_PAGE_TEMPLATE = """
(SELECT DISTINCT thread_id FROM checkpoints {where} ORDER BY thread_id LIMIT $1)
UNION
(SELECT DISTINCT thread_id FROM checkpoint_writes {where} ORDER BY thread_id LIMIT $1){expired}
ORDER BY thread_id LIMIT $1
"""
# Once the tool's expired-threads table exists (see "expired threads' blobs"),
# its threads join the walk: UNION drops those that still hold rows.
_EXPIRED_BRANCH = """
UNION
(SELECT thread_id FROM checkpoint_janitor_expired {where} ORDER BY thread_id LIMIT $1)"""
# A purge prefix is byte-exact (`starts_with`), never a range compared in the
# collation, which an ICU collation folds by case and reorders by punctuation.
# On a C-collated database the planner makes `starts_with` an index range; on
# any other it filters the index walk past the cursor, reading the rest of the
# table per page: accepted, as a purge is an operator's one-off action.
_WALK_WHERE = {
    "first": "",
    "next": "WHERE thread_id > $2",
    "prefix_first": "WHERE starts_with(thread_id, $2)",
    "prefix_next": "WHERE starts_with(thread_id, $2) AND thread_id > $3",
}
WALK_SQL = {
    (kind, expired): _THREADS_PAGE_TEMPLATE.format(
        where=where, expired=_EXPIRED_BRANCH.format(where=where) if expired else ""
    )
    for kind, where in _WALK_WHERE.items()
    for expired in (False, True)
}
"""Keyset page of thread ids: (first | next | prefix_first | prefix_next, expired table exists)."""

COUNT_THREADS_SQL = "SELECT count(DISTINCT thread_id) FROM checkpoints"

# What `policies.plan` decides from: one GROUP BY over the primary-key index.
# Ids are compared in code-point order (COLLATE "C"), whatever the column's
# collation: a UUIDv6's text order is its time order only there.
AGGREGATE_SQL = """
SELECT thread_id, checkpoint_ns, count(*),
       min(checkpoint_id COLLATE "C"), max(checkpoint_id COLLATE "C")
FROM checkpoints
WHERE thread_id = ANY($1::text[])
GROUP BY thread_id, checkpoint_ns
"""
# Ids that are not canonical lowercase UUIDv6 (`policies.plan.is_regular_id`),
# counted only for the threads a plan would delete from.
IRREGULAR_IDS_SQL = """
SELECT thread_id, checkpoint_ns,
       count(*) FILTER (
           WHERE checkpoint_id COLLATE "C" !~ '^[0-9a-f]{8}-[0-9a-f]{4}-6[0-9a-f]{3}-.{17}$'
       )
FROM checkpoints
WHERE thread_id = ANY($1::text[])
GROUP BY thread_id, checkpoint_ns
"""
# What sends a thread to the row-level path: a DeltaChannel marker, or a
# v < 4 checkpoint (its pending sends live in its parent's writes).
MARKED_THREADS_SQL = """
SELECT DISTINCT thread_id FROM checkpoints
WHERE thread_id = ANY($1::text[])
  AND (metadata ? 'counters_since_delta_snapshot' OR metadata ? 'delta_writes_versioned'
       OR COALESCE((checkpoint ->> 'v')::int, 4) < 4)
"""
# Heads whose format (v < 4) makes waiting depend on the parent's writes.
OLD_HEADS_SQL = """
SELECT c.thread_id
FROM unnest($1::text[], $2::text[], $3::text[]) AS h(thread_id, checkpoint_ns, checkpoint_id)
JOIN checkpoints c
  ON c.thread_id = h.thread_id AND c.checkpoint_ns = h.checkpoint_ns
 AND c.checkpoint_id = h.checkpoint_id
WHERE COALESCE((c.checkpoint ->> 'v')::int, 4) < 4
"""
COUNT_BELOW_SQL = """
SELECT count(*) FROM checkpoints
WHERE thread_id = $1 AND checkpoint_ns = $2 AND checkpoint_id COLLATE "C" < $3
"""

# Everything the decision needs, without decoding a blob. `v < 4` checkpoints
# read their pending sends from their parent's `__pregel_tasks` writes.
SCAN_SQL = """
SELECT thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id,
       COALESCE((checkpoint ->> 'v')::int, 4) AS v,
       metadata -> 'parents' AS parents,
       metadata ->> 'source' AS source,
       metadata -> 'counters_since_delta_snapshot' AS counters,
       metadata ? 'delta_writes_versioned' AS delta_marked,
       pg_column_size(checkpoint) + pg_column_size(metadata) AS size
FROM checkpoints
WHERE thread_id = ANY($1::text[])
"""

# The heads' metadata of a whole page in one round trip, found by primary key.
HEADS_METADATA_SQL = """
SELECT c.thread_id, c.metadata
FROM unnest($1::text[], $2::text[], $3::text[]) AS h(thread_id, checkpoint_ns, checkpoint_id)
JOIN checkpoints c
  ON c.thread_id = h.thread_id AND c.checkpoint_ns = h.checkpoint_ns
 AND c.checkpoint_id = h.checkpoint_id
"""

# Which checkpoints hold sends for a v < 4 child; asked only for pages with one.
SENDS_WRITES_SQL = f"""
SELECT DISTINCT thread_id, checkpoint_ns, checkpoint_id FROM checkpoint_writes
WHERE thread_id = ANY($1::text[]) AND channel = '{TASKS}'
"""

ORPHAN_WRITES_SQL = """
SELECT DISTINCT w.thread_id, w.checkpoint_ns, w.checkpoint_id
FROM checkpoint_writes w
WHERE w.thread_id = ANY($1::text[])
AND NOT EXISTS (
    SELECT 1 FROM checkpoints c
    WHERE c.thread_id = w.thread_id AND c.checkpoint_ns = w.checkpoint_ns
    AND c.checkpoint_id = w.checkpoint_id
)
"""

# A channel has a value at a checkpoint when it is inline in the JSONB
# (primitives, snapshot markers) or its versioned blob is not "empty"; a
# DeltaChannel without a snapshot stores an "empty" blob. One expression on
# checkpoint row `c`, shared by the statements below and the saver wrapper.
PRESENT_CHANNELS_SQL = """
       ARRAY(SELECT jsonb_object_keys(COALESCE(c.checkpoint -> 'channel_values', '{}')))
       || ARRAY(
           SELECT v.key FROM jsonb_each_text(c.checkpoint -> 'channel_versions') v
           JOIN checkpoint_blobs b
             ON b.thread_id = c.thread_id AND b.checkpoint_ns = c.checkpoint_ns
            AND b.channel = v.key AND b.version = v.value
           WHERE b.type <> 'empty'
       )"""

# Every checkpoint's present and versioned channels; only for delta threads.
# `{thread}` is the driver's placeholder ($1 for asyncpg, %s for psycopg).
CHANNEL_KEYS_TEMPLATE = (
    """
SELECT c.checkpoint_ns, c.checkpoint_id,"""
    + PRESENT_CHANNELS_SQL
    + """ AS present,
       ARRAY(SELECT jsonb_object_keys(COALESCE(c.checkpoint -> 'channel_versions', '{}')))
           AS versioned
FROM checkpoints c
WHERE c.thread_id = {thread}
"""
)
CHANNEL_KEYS_SQL = CHANNEL_KEYS_TEMPLATE.replace("{thread}", "$1")

# The head as `is_waiting` reads it: present channels, versions, versions seen.
HEAD_STATE_SQL = (
    """
SELECT c.checkpoint -> 'channel_versions' AS versions,
       c.checkpoint -> 'versions_seen' AS seen,"""
    + PRESENT_CHANNELS_SQL
    + """ AS present,
       ARRAY(
           SELECT w.channel FROM checkpoint_writes w
           WHERE w.thread_id = c.thread_id AND w.checkpoint_ns = c.checkpoint_ns
             AND w.checkpoint_id = c.checkpoint_id
       ) AS write_channels
FROM checkpoints c
WHERE c.thread_id = $1 AND c.checkpoint_ns = $2 AND c.checkpoint_id = $3
"""
)

FINGERPRINT_SQL = """
SELECT thread_id, checkpoint_ns, count(*), max(checkpoint_id)
FROM checkpoints
WHERE thread_id = ANY($1::text[])
GROUP BY thread_id, checkpoint_ns
"""

# ---------------------------------------------------------------- delete

# Each deleting statement comes in two shapes built from one DELETE: the
# counting one (no archive: only counts cross to the worker) and the capturing
# one, `RETURNING <alias>.*`, whose rows go to the batch's archive segment
# before the commit (issue 13); the worker tallies those into the same counts.
SIZE_COLUMN = "janitor_size"
"""Extra column a capturing checkpoint delete returns: the bytes the counts report."""


@dataclass(frozen=True, slots=True)
class Deleting:
    """One deleting statement: its counting and capturing SQL, and how counts are grouped."""

    table: str
    """The saver's table it deletes from (and the archive table the rows go to)."""
    count: str
    """Returns (*by, count[, sum of size]) per group."""
    capture: str
    """Returns every column of each deleted row (and `SIZE_COLUMN` when `sized`)."""
    by: tuple[str, ...]
    sized: bool = False


def _deleting(
    table: str, alias: str, core: str, by: tuple[str, ...], sized: bool = False, ctes: str = ""
) -> Deleting:
    """Both shapes of the DELETE `core` (no RETURNING), after the table expressions `ctes`."""
    size = f"pg_column_size({alias}.checkpoint) + pg_column_size({alias}.metadata)"
    keys = ", ".join(f"{alias}.{c}" for c in by)
    groups = ", ".join(str(i + 1) for i in range(len(by)))
    count = (
        f"WITH {ctes + ', ' if ctes else ''}gone AS (\n{core}\n"
        f"    RETURNING {keys}{f', {size} AS size' if sized else ''}\n)\n"
        f"SELECT {', '.join(by)}, count(*){', sum(size)' if sized else ''} "
        f"FROM gone GROUP BY {groups}"
    )
    capture = (
        f"{'WITH ' + ctes if ctes else ''}\n{core}\n"
        f"RETURNING {alias}.*{f', {size} AS {SIZE_COLUMN}' if sized else ''}"
    )
    return Deleting(table, count, capture, by, sized)


# Deletes take the decided (thread, namespace, id) triples as parallel arrays,
# one statement per batch, each row found by primary key.
DELETE_WRITES = _deleting(
    "checkpoint_writes",
    "w",
    """
    DELETE FROM checkpoint_writes w
    USING unnest($1::text[], $2::text[], $3::text[]) AS d(thread_id, checkpoint_ns, checkpoint_id)
    WHERE w.thread_id = d.thread_id AND w.checkpoint_ns = d.checkpoint_ns
      AND w.checkpoint_id = d.checkpoint_id""",
    ("thread_id", "checkpoint_ns"),
)
DELETE_WRITES_SQL = DELETE_WRITES.count
DELETE_CHECKPOINTS = _deleting(
    "checkpoints",
    "c",
    """
    DELETE FROM checkpoints c
    USING unnest($1::text[], $2::text[], $3::text[]) AS d(thread_id, checkpoint_ns, checkpoint_id)
    WHERE c.thread_id = d.thread_id AND c.checkpoint_ns = d.checkpoint_ns
      AND c.checkpoint_id = d.checkpoint_id""",
    ("thread_id", "checkpoint_ns"),
)
DELETE_CHECKPOINTS_SQL = DELETE_CHECKPOINTS.count
# Parent nulling returns each changed row's old parent (the archive's
# `nulled_parents`). Postgres before 18 has no `OLD` in RETURNING, so the rows
# are read and locked (FOR UPDATE) in a subquery first: what it read is what
# the UPDATE overwrites, whatever commits meanwhile.
_NULLED = """
UPDATE checkpoints c SET parent_checkpoint_id = NULL
FROM ({locked}
    FOR UPDATE OF k
) o
WHERE c.thread_id = o.thread_id AND c.checkpoint_ns = o.checkpoint_ns
  AND c.checkpoint_id = o.checkpoint_id
RETURNING c.thread_id, c.checkpoint_ns, c.checkpoint_id, o.parent_checkpoint_id
"""
# Grouped per namespace so each namespace's remaining rows are read once,
# not once per deleted id (parent_checkpoint_id has no index).
NULL_PARENTS_SQL = _NULLED.format(
    locked="""
    SELECT k.thread_id, k.checkpoint_ns, k.checkpoint_id, k.parent_checkpoint_id
    FROM checkpoints k
    JOIN (
        SELECT thread_id, checkpoint_ns, array_agg(checkpoint_id) AS ids
        FROM unnest($1::text[], $2::text[], $3::text[])
             AS d(thread_id, checkpoint_ns, checkpoint_id)
        GROUP BY 1, 2
    ) d ON k.thread_id = d.thread_id AND k.checkpoint_ns = d.checkpoint_ns
       AND k.parent_checkpoint_id = ANY(d.ids)"""
)
# A fork saved after an earlier sweep deleted its base names a parent that is
# gone; on a quiet thread (no run can still save that parent) it is nulled too.
NULL_DANGLING_PARENTS_SQL = _NULLED.format(
    locked="""
    SELECT k.thread_id, k.checkpoint_ns, k.checkpoint_id, k.parent_checkpoint_id
    FROM checkpoints k
    WHERE k.thread_id = ANY($1::text[]) AND k.parent_checkpoint_id IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM checkpoints p
          WHERE p.thread_id = k.thread_id AND p.checkpoint_ns = k.checkpoint_ns
            AND p.checkpoint_id = k.parent_checkpoint_id
      )"""
)
# Set-based trims: each (thread, ns) loses its ids below one bound — the
# smallest of the plan's time bound, the keep-th newest id and the id past the
# `limit` oldest — read under the batch's first fingerprint check, so the
# namespace is as planned ('' if it holds fewer than `keep`: nothing goes).
TRIM_BOUNDS_SQL = """
SELECT CASE WHEN b.nth IS NULL THEN '' ELSE LEAST(r.before, b.nth, b.past) END
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::int[])
     WITH ORDINALITY AS r(thread_id, checkpoint_ns, before, keep, lim, i)
CROSS JOIN LATERAL (
    SELECT
        (SELECT c.checkpoint_id COLLATE "C" FROM checkpoints c
         WHERE c.thread_id = r.thread_id AND c.checkpoint_ns = r.checkpoint_ns
         ORDER BY c.checkpoint_id COLLATE "C" DESC LIMIT 1 OFFSET r.keep - 1) AS nth,
        (SELECT c.checkpoint_id COLLATE "C" FROM checkpoints c
         WHERE c.thread_id = r.thread_id AND c.checkpoint_ns = r.checkpoint_ns
         ORDER BY c.checkpoint_id COLLATE "C" LIMIT 1 OFFSET r.lim) AS past
) b
ORDER BY r.i
"""
# Before the deletes, so only parents that exist (and are about to go) are nulled.
TRIM_NULL_PARENTS_SQL = _NULLED.format(
    locked="""
    SELECT k.thread_id, k.checkpoint_ns, k.checkpoint_id, k.parent_checkpoint_id
    FROM checkpoints k
    JOIN unnest($1::text[], $2::text[], $3::text[]) AS d(thread_id, checkpoint_ns, bound)
      ON k.thread_id = d.thread_id AND k.checkpoint_ns = d.checkpoint_ns
    WHERE k.checkpoint_id COLLATE "C" >= d.bound AND k.parent_checkpoint_id COLLATE "C" < d.bound
      AND EXISTS (
          SELECT 1 FROM checkpoints p
          WHERE p.thread_id = k.thread_id AND p.checkpoint_ns = k.checkpoint_ns
            AND p.checkpoint_id = k.parent_checkpoint_id
      )"""
)
# The writes of the checkpoints these trims delete, by the same ranges; the
# EXISTS keeps a write whose checkpoint is not (yet) saved (invariant 5).
TRIM_WRITES = _deleting(
    "checkpoint_writes",
    "w",
    """
    DELETE FROM checkpoint_writes w
    USING unnest($1::text[], $2::text[], $3::text[]) AS d(thread_id, checkpoint_ns, bound)
    WHERE w.thread_id = d.thread_id AND w.checkpoint_ns = d.checkpoint_ns
      AND w.checkpoint_id COLLATE "C" < d.bound
      AND EXISTS (
          SELECT 1 FROM checkpoints c
          WHERE c.thread_id = w.thread_id AND c.checkpoint_ns = w.checkpoint_ns
            AND c.checkpoint_id = w.checkpoint_id
      )""",
    ("thread_id", "checkpoint_ns"),
)
TRIM_WRITES_SQL = TRIM_WRITES.count
TRIM_CHECKPOINTS = _deleting(
    "checkpoints",
    "c",
    """
    DELETE FROM checkpoints c
    USING unnest($1::text[], $2::text[], $3::text[]) AS d(thread_id, checkpoint_ns, bound)
    WHERE c.thread_id = d.thread_id AND c.checkpoint_ns = d.checkpoint_ns
      AND c.checkpoint_id COLLATE "C" < d.bound""",
    ("thread_id", "checkpoint_ns"),
    sized=True,
)
TRIM_CHECKPOINTS_SQL = TRIM_CHECKPOINTS.count
# Dry runs: the ids a trim range names (few: a plan's count), to count as the
# statements above would delete them.
RANGE_IDS_SQL = """
SELECT checkpoint_id FROM checkpoints
WHERE thread_id = $1 AND checkpoint_ns = $2 AND checkpoint_id COLLATE "C" < $3
ORDER BY checkpoint_id COLLATE "C" OFFSET $4
"""

RANGE_BYTES_SQL = """
SELECT sum(pg_column_size(c.checkpoint) + pg_column_size(c.metadata)) FROM checkpoints c
JOIN unnest($1::text[], $2::text[], $3::text[]) AS d(thread_id, checkpoint_ns, checkpoint_id)
  ON c.thread_id = d.thread_id AND c.checkpoint_ns = d.checkpoint_ns
 AND c.checkpoint_id = d.checkpoint_id
"""

# Re-checked in the statement: the checkpoint may have committed since the scan.
DELETE_ORPHAN_WRITES = _deleting(
    "checkpoint_writes",
    "w",
    """
    DELETE FROM checkpoint_writes w
    USING unnest($1::text[], $2::text[], $3::text[]) AS d(thread_id, checkpoint_ns, checkpoint_id)
    WHERE w.thread_id = d.thread_id AND w.checkpoint_ns = d.checkpoint_ns
      AND w.checkpoint_id = d.checkpoint_id
      AND NOT EXISTS (
          SELECT 1 FROM checkpoints c
          WHERE c.thread_id = w.thread_id AND c.checkpoint_ns = w.checkpoint_ns
            AND c.checkpoint_id = w.checkpoint_id
      )""",
    ("thread_id", "checkpoint_ns"),
)
DELETE_ORPHAN_WRITES_SQL = DELETE_ORPHAN_WRITES.count
# A whole thread, table by table (a policy's expiry skips "blobs": see the docstring).
EXPIRE = {
    "checkpoints": _deleting(
        "checkpoints",
        "c",
        "    DELETE FROM checkpoints c WHERE c.thread_id = ANY($1::text[])",
        ("thread_id",),
        sized=True,
    ),
    "writes": _deleting(
        "checkpoint_writes",
        "w",
        "    DELETE FROM checkpoint_writes w WHERE w.thread_id = ANY($1::text[])",
        ("thread_id",),
    ),
    "blobs": _deleting(
        "checkpoint_blobs",
        "b",
        "    DELETE FROM checkpoint_blobs b WHERE b.thread_id = ANY($1::text[])",
        ("thread_id",),
    ),
}
EXPIRE_SQL = {kind: d.count for kind, d in EXPIRE.items()}

# ---------------------------------------------------------------- dated deletions

# The tool's own table, beside `checkpoint_janitor_expired`: blobs carry no
# date and a deleted checkpoint leaves no row, so this dates each thread's
# latest deletion (trim or expiry). A fork that read a checkpoint before a
# sweep deleted it saves, after that sweep, a checkpoint naming the blob
# versions it read; so a thread's unreferenced blobs wait out the grace period
# after its last deletion (see the module docstring). One row per thread.
DELETIONS_TABLE = "checkpoint_janitor_deletions"
CREATE_DELETIONS_TABLE_SQL = f"""
CREATE TABLE IF NOT EXISTS {DELETIONS_TABLE} (
    thread_id TEXT PRIMARY KEY,
    deleted_at TIMESTAMPTZ NOT NULL
)
"""
DELETIONS_TABLE_EXISTS_SQL = f"SELECT to_regclass('{DELETIONS_TABLE}') IS NOT NULL"
# One statement per batch, in the deletes' transaction (a rollback forgets it).
# GREATEST: a sweep on a clock behind an earlier one's must not shorten a wait.
RECORD_DELETIONS_SQL = f"""
INSERT INTO {DELETIONS_TABLE} AS d (thread_id, deleted_at)
SELECT t.thread_id, to_timestamp($2) FROM unnest($1::text[]) AS t(thread_id)
ON CONFLICT (thread_id) DO UPDATE SET deleted_at = GREATEST(d.deleted_at, EXCLUDED.deleted_at)
"""
# A row past the grace period no longer holds anything back; by primary key,
# for the threads a batch collected blobs on (expired threads' included).
PRUNE_DELETIONS_SQL = f"""
DELETE FROM {DELETIONS_TABLE}
WHERE thread_id = ANY($1::text[]) AND deleted_at < to_timestamp($2)
"""
FORGET_DELETIONS_SQL = f"DELETE FROM {DELETIONS_TABLE} WHERE thread_id = ANY($1::text[])"
# The threads of a page whose residue a pass looks for whatever the cadence
# (`policies.plan`, `dated`): deleted from before the cutoff, so their blobs
# may be due, and not yet collected (collecting drops the row). By primary key.
DATED_THREADS_SQL = f"""
SELECT thread_id FROM {DELETIONS_TABLE}
WHERE thread_id = ANY($1::text[]) AND deleted_at < to_timestamp($2)
"""
# What the collecting statements below add once the table exists (`{cutoff}`:
# the placeholder of now - grace); a thread deleted from since then keeps its
# unreferenced blobs. Re-checked in the statement, like the references.
_NOT_RECENTLY_DELETED = f"""
  AND NOT EXISTS (
      SELECT 1 FROM {DELETIONS_TABLE} dd
      WHERE dd.thread_id = b.thread_id AND dd.deleted_at >= to_timestamp({{cutoff}})
  )"""


def _dated(template: str, cutoff: str) -> dict[bool, str]:
    """`template` without (False) and with (True) the recent-deletion check, bound to `cutoff`."""
    return {
        False: template.replace("{recent}", ""),
        True: template.replace("{recent}", _NOT_RECENTLY_DELETED.replace("{cutoff}", cutoff)),
    }


# The blobs no committed checkpoint of their thread and namespace references,
# on quiet threads not deleted from within the grace period (see the module
# docstring). The references are built once per thread (a hash anti-join),
# not probed per blob. Keyed by "the deletions table exists"; $2 is the cutoff.
_GARBAGE_REFS = """refs AS (
    SELECT DISTINCT c.thread_id, c.checkpoint_ns, v.key AS channel, v.value AS version
    FROM checkpoints c
    CROSS JOIN LATERAL jsonb_each_text(c.checkpoint -> 'channel_versions') AS v
    WHERE c.thread_id = ANY($1::text[])
)"""
DELETE_GARBAGE_BLOBS = {
    dated: _deleting("checkpoint_blobs", "b", core, ("thread_id",), ctes=_GARBAGE_REFS)
    for dated, core in _dated(
        """
    DELETE FROM checkpoint_blobs b
    WHERE b.thread_id = ANY($1::text[])
      AND NOT EXISTS (
          SELECT 1 FROM refs r
          WHERE r.thread_id = b.thread_id AND r.checkpoint_ns = b.checkpoint_ns
            AND r.channel = b.channel AND r.version = b.version
      ){recent}""",
        "$2",
    ).items()
}
DELETE_GARBAGE_BLOBS_SQL = {dated: d.count for dated, d in DELETE_GARBAGE_BLOBS.items()}
# Which quiet threads hold blobs the statement above would collect (left by
# trims made while the thread was busy or within the grace period): they get
# a sweep part of their own. Both plans (rows and aggregates) ask this.
GARBAGE_BLOB_THREADS_SQL = _dated(
    """
WITH refs AS (
    SELECT DISTINCT c.thread_id, c.checkpoint_ns, v.key AS channel, v.value AS version
    FROM checkpoints c
    CROSS JOIN LATERAL jsonb_each_text(c.checkpoint -> 'channel_versions') AS v
    WHERE c.thread_id = ANY($1::text[])
)
SELECT DISTINCT b.thread_id FROM checkpoint_blobs b
WHERE b.thread_id = ANY($1::text[])
  AND NOT EXISTS (
      SELECT 1 FROM refs r
      WHERE r.thread_id = b.thread_id AND r.checkpoint_ns = b.checkpoint_ns
        AND r.channel = b.channel AND r.version = b.version
  ){recent}
""",
    "$2",
)
COUNT_GARBAGE_BLOBS_SQL = _dated(
    """
WITH refs AS (
    SELECT DISTINCT c.thread_id, c.checkpoint_ns, v.key AS channel, v.value AS version
    FROM checkpoints c
    CROSS JOIN LATERAL jsonb_each_text(c.checkpoint -> 'channel_versions') AS v
    WHERE c.thread_id = ANY($1::text[])
      AND NOT (c.thread_id, c.checkpoint_ns, c.checkpoint_id) IN (
          SELECT * FROM unnest($2::text[], $3::text[], $4::text[])
      )
)
SELECT b.thread_id, count(*) FROM checkpoint_blobs b
WHERE b.thread_id = ANY($1::text[])
  AND NOT EXISTS (
      SELECT 1 FROM refs r
      WHERE r.thread_id = b.thread_id AND r.checkpoint_ns = b.checkpoint_ns
        AND r.channel = b.channel AND r.version = b.version
  ){recent}
GROUP BY 1
""",
    "$5",
)

# ---------------------------------------------------------------- expired threads' blobs

# The tool's own table, in the store's schema (the saver's tables have no
# place for it): blobs carry no date, so this dates each expiry; a thread's
# blobs outlive its expiry by the grace period (see the module docstring).
# `head_metadata` keeps what the policies matched the thread on.
EXPIRED_TABLE = "checkpoint_janitor_expired"
CREATE_EXPIRED_TABLE_SQL = f"""
CREATE TABLE IF NOT EXISTS {EXPIRED_TABLE} (
    thread_id TEXT PRIMARY KEY,
    expired_at TIMESTAMPTZ NOT NULL,
    head_metadata JSONB NOT NULL DEFAULT '{{}}'
)
"""
# to_regclass follows search_path (the store's schema) and never raises.
EXPIRED_TABLE_EXISTS_SQL = f"SELECT to_regclass('{EXPIRED_TABLE}') IS NOT NULL"
# In the expiry's transaction, before its deletes: the head (as `root_head`
# picks it) is still there to copy, and a rollback forgets the row too. A
# thread expired again is dated again.
RECORD_EXPIRED_SQL = f"""
INSERT INTO {EXPIRED_TABLE} AS e (thread_id, expired_at, head_metadata)
SELECT t.thread_id, to_timestamp($2), COALESCE((
    SELECT c.metadata FROM checkpoints c
    WHERE c.thread_id = t.thread_id
    ORDER BY c.checkpoint_ns = '' DESC,
             COALESCE(c.metadata -> 'parents', '{{}}') = '{{}}' DESC,
             c.checkpoint_id DESC
    LIMIT 1
), '{{}}')
FROM unnest($1::text[]) AS t(thread_id)
ON CONFLICT (thread_id) DO UPDATE
SET expired_at = EXCLUDED.expired_at, head_metadata = EXCLUDED.head_metadata
"""
EXPIRED_ROWS_SQL = f"""
SELECT thread_id, extract(epoch FROM expired_at)::float8 AS expired_at, head_metadata
FROM {EXPIRED_TABLE} WHERE thread_id = ANY($1::text[])
"""
# A thread some run recreated is a live thread again: its row goes, and its
# old blobs are left to the quiet-thread GC, which knows what it references.
DROP_RETURNED_SQL = f"""
DELETE FROM {EXPIRED_TABLE} e
WHERE e.thread_id = ANY($1::text[])
  AND EXISTS (SELECT 1 FROM checkpoints c WHERE c.thread_id = e.thread_id)
"""
# The blobs of threads expired before the cutoff (now - grace) that hold no
# checkpoint and no write, then their rows. Both conditions are re-checked
# in the statement: a run may recreate the thread at any time.
DELETE_EXPIRED_BLOBS = _deleting(
    "checkpoint_blobs",
    "b",
    """
    DELETE FROM checkpoint_blobs b USING due
    WHERE b.thread_id = due.thread_id""",
    ("thread_id",),
    ctes=f"""due AS (
    DELETE FROM {EXPIRED_TABLE} e
    WHERE e.thread_id = ANY($1::text[]) AND e.expired_at < to_timestamp($2)
      AND NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.thread_id = e.thread_id)
      AND NOT EXISTS (SELECT 1 FROM checkpoint_writes w WHERE w.thread_id = e.thread_id)
    RETURNING e.thread_id
)""",
)
DELETE_EXPIRED_BLOBS_SQL = DELETE_EXPIRED_BLOBS.count
COUNT_EXPIRED_BLOBS_SQL = f"""
SELECT b.thread_id, count(*) FROM checkpoint_blobs b
JOIN {EXPIRED_TABLE} e ON e.thread_id = b.thread_id
WHERE e.thread_id = ANY($1::text[]) AND e.expired_at < to_timestamp($2)
  AND NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.thread_id = e.thread_id)
  AND NOT EXISTS (SELECT 1 FROM checkpoint_writes w WHERE w.thread_id = e.thread_id)
GROUP BY 1
"""
# A purge names the thread for erasure: its row goes with its blobs.
FORGET_EXPIRED_SQL = f"DELETE FROM {EXPIRED_TABLE} WHERE thread_id = ANY($1::text[])"
EXPIRED_STATS_SQL = f"""
SELECT count(DISTINCT e.thread_id), count(b.thread_id) FROM {EXPIRED_TABLE} e
LEFT JOIN checkpoint_blobs b ON b.thread_id = e.thread_id
WHERE NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.thread_id = e.thread_id)
"""

# ---------------------------------------------------------------- legal holds

# The tool's own table, in the store's schema beside `checkpoint_janitor_expired`,
# created by the first `hold` (plan and stats must work without it).
CREATE_HOLDS_TABLE_SQL = f"""
CREATE TABLE IF NOT EXISTS {HOLDS_TABLE} (
    thread_id TEXT PRIMARY KEY,
    reason TEXT,
    held_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    held_by TEXT
)
"""
# Not to_regclass (as for the expired table): it reads the relation cache,
# which a batch that waited on the holds lock below has not refreshed, and it
# would miss the table a concurrent first `hold` just created. pg_class read
# with the statement's own snapshot sees every commit before the statement.
HOLDS_TABLE_EXISTS_SQL = f"""
SELECT EXISTS (
    SELECT 1 FROM pg_catalog.pg_class
    WHERE relname = '{HOLDS_TABLE}' AND relnamespace = current_schema()::regnamespace
)
"""
# A hold must win against a batch already running, and row locks cannot
# order an INSERT against a reader, nor a table that does not exist yet. So
# a hold takes this transaction-level advisory lock exclusively (around the
# table's creation and its insert) and every delete batch shares it before
# reading the holds: a hold committed first is seen, a later one waits for the
# batch's commit. Keyed by the schema, not the config's store name: another
# config may name the same database differently. Waits obey lock_timeout.
_HOLDS_LOCK_KEY = "hashtextextended('checkpoint-janitor-holds:' || current_schema(), 0)"
HOLDS_LOCK_SQL = f"SELECT pg_advisory_xact_lock({_HOLDS_LOCK_KEY})"
HOLDS_SHARED_LOCK_SQL = f"SELECT pg_advisory_xact_lock_shared({_HOLDS_LOCK_KEY})"
HELD_AMONG_SQL = f"SELECT thread_id FROM {HOLDS_TABLE} WHERE thread_id = ANY($1::text[])"
# Keyset pages compared by the database in its own collation (as the thread
# walk); the first page has no lower bound, so a hold on the empty id is read.
HOLDS_FIRST_PAGE_SQL = f"""
SELECT thread_id, reason, extract(epoch FROM held_at)::float8, held_by
FROM {HOLDS_TABLE} ORDER BY thread_id LIMIT $1
"""
HOLDS_NEXT_PAGE_SQL = f"""
SELECT thread_id, reason, extract(epoch FROM held_at)::float8, held_by
FROM {HOLDS_TABLE} WHERE thread_id > $1 ORDER BY thread_id LIMIT $2
"""
# A second hold on a held thread keeps the first (its time and reason stand).
INSERT_HOLD_SQL = f"""
INSERT INTO {HOLDS_TABLE} (thread_id, reason, held_by) VALUES ($1, $2, $3)
ON CONFLICT (thread_id) DO NOTHING
RETURNING extract(epoch FROM held_at)::float8
"""
DELETE_HOLD_SQL = f"DELETE FROM {HOLDS_TABLE} WHERE thread_id = $1 RETURNING thread_id"
HOLDS_PAGE = 1000

# ---------------------------------------------------------------- residue checks

# The tool's own table, in the store's schema beside the deletions table,
# created by the first sweep that completes a look at every quiet thread's
# residue (plan and stats must work without it). One row per policy, since a
# pass looks only at the policies due in it.
CREATE_RESIDUE_TABLE_SQL = f"""
CREATE TABLE IF NOT EXISTS {RESIDUE_TABLE} (
    policy TEXT PRIMARY KEY,
    checked_at TIMESTAMPTZ NOT NULL
)
"""
RESIDUE_TABLE_EXISTS_SQL = f"SELECT to_regclass('{RESIDUE_TABLE}') IS NOT NULL"
RESIDUE_CHECKS_SQL = f"""
SELECT policy, extract(epoch FROM checked_at)::float8 FROM {RESIDUE_TABLE}
"""
RECORD_RESIDUE_CHECKS_SQL = f"""
INSERT INTO {RESIDUE_TABLE} (policy, checked_at)
SELECT p, to_timestamp($2) FROM unnest($1::text[]) AS p
ON CONFLICT (policy) DO UPDATE SET checked_at = EXCLUDED.checked_at
"""

# Dry runs count what the statements above would delete.
COUNT_CHECKPOINTS_SQL = """
SELECT c.thread_id, c.checkpoint_ns, count(*) FROM checkpoints c
JOIN unnest($1::text[], $2::text[], $3::text[]) AS d(thread_id, checkpoint_ns, checkpoint_id)
  ON c.thread_id = d.thread_id AND c.checkpoint_ns = d.checkpoint_ns
 AND c.checkpoint_id = d.checkpoint_id
GROUP BY 1, 2
"""
COUNT_WRITES_SQL = """
SELECT w.thread_id, w.checkpoint_ns, count(*) FROM checkpoint_writes w
JOIN unnest($1::text[], $2::text[], $3::text[]) AS d(thread_id, checkpoint_ns, checkpoint_id)
  ON w.thread_id = d.thread_id AND w.checkpoint_ns = d.checkpoint_ns
 AND w.checkpoint_id = d.checkpoint_id
GROUP BY 1, 2
"""
COUNT_THREAD_SQL = {
    "checkpoints": "SELECT thread_id, count(*), "
    "sum(pg_column_size(checkpoint) + pg_column_size(metadata)) FROM checkpoints "
    "WHERE thread_id = ANY($1::text[]) GROUP BY 1",
    "writes": "SELECT thread_id, count(*) FROM checkpoint_writes "
    "WHERE thread_id = ANY($1::text[]) GROUP BY 1",
    "blobs": "SELECT thread_id, count(*) FROM checkpoint_blobs "
    "WHERE thread_id = ANY($1::text[]) GROUP BY 1",
}

# Session-level, so the lock dies with the connection (a killed worker frees
# it). Keyed per store name, so one replica sweeps a store at a time.
TRY_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtextextended('checkpoint-janitor:' || $1, 0))"
UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtextextended('checkpoint-janitor:' || $1, 0))"

# ---------------------------------------------------------------- stats

STATS_TABLE_SQL = """
SELECT relname, n_live_tup, n_dead_tup, pg_total_relation_size(relid)
FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = ANY($2::text[])
"""
STATS_IDS_SQL = "SELECT checkpoint_ns, checkpoint_id FROM checkpoints"
LARGEST_THREADS_SQL = """
SELECT thread_id, count(*), sum(pg_column_size(checkpoint) + pg_column_size(metadata)) AS size
FROM checkpoints GROUP BY thread_id ORDER BY size DESC LIMIT $1
"""

# Per thread of a page: the row bytes of its checkpoints (and metadata), writes and
# blobs, not the tables' disk size, which only VACUUM shrinks (a cap on it would
# evict until the next vacuum). Correlated sums: one index range per table and thread.
THREAD_BYTES_SQL = """
SELECT t.id,
    COALESCE((SELECT sum(pg_column_size(checkpoint) + pg_column_size(metadata))
              FROM checkpoints c WHERE c.thread_id = t.id), 0)
  + COALESCE((SELECT sum(pg_column_size(blob))
              FROM checkpoint_writes w WHERE w.thread_id = t.id), 0)
  + COALESCE((SELECT sum(pg_column_size(blob))
              FROM checkpoint_blobs b WHERE b.thread_id = t.id), 0)
FROM unnest($1::text[]) AS t(id)
"""

# Errors worth retrying the batch for: the application held a row past
# lock_timeout, a statement ran past statement_timeout, or Postgres picked
# this transaction as a deadlock or serialization victim.
RETRYABLE = (
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)
MAX_ATTEMPTS = 4


@dataclass(frozen=True, slots=True)
class _Triples:
    """(thread, namespace, id) triples as the three arrays a statement takes."""

    threads: list[str]
    namespaces: list[str]
    ids: list[str]

    @classmethod
    def of(cls, rows: Sequence[tuple[str, str, str]]) -> _Triples:
        return cls([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])

    def args(self) -> tuple[list[str], list[str], list[str]]:
        return self.threads, self.namespaces, self.ids


def _gave_up(batch: Sequence[ThreadWork], changed: set[str], on_hold: set[str]) -> list[WorkResult]:
    """Results of a batch whose retries ran out."""
    # Contention, not a change: the threads wait for the next sweep as
    # `locked` (those found changed or held before stay so).
    return [
        WorkResult(
            w.thread_id,
            Counts(),
            changed=w.thread_id in changed,
            on_hold=w.thread_id in on_hold,
            locked=w.thread_id not in changed | on_hold,
        )
        for w in batch
    ]


def _merged(
    batch: Sequence[ThreadWork],
    todo: Sequence[ThreadWork],
    done: Sequence[WorkResult],
    on_hold: set[str],
) -> list[WorkResult]:
    """The batch's results: what the attempt that committed (`todo`) did, the rest dropped."""
    results = {id(w): r for w, r in zip(todo, done, strict=True)}
    return [
        results.get(id(w))
        or (
            WorkResult(w.thread_id, Counts(), on_hold=True)
            if w.thread_id in on_hold
            else WorkResult(w.thread_id, Counts(), changed=True)
        )
        for w in batch
    ]


class _OnHold(Exception):
    """Threads of the batch are on hold: roll back, drop them, run the rest."""

    def __init__(self, threads: set[str]) -> None:
        super().__init__(f"{len(threads)} threads are on hold")
        self.threads = threads


class _Changed(Exception):
    """Threads changed between the checks of a batch: roll back, drop them, retry."""

    def __init__(self, threads: set[str]) -> None:
        super().__init__(f"{len(threads)} threads changed during the batch")
        self.threads = threads


@dataclass(slots=True)
class _BatchCounts:
    """What one batch's statements deleted, before it is attributed to the parts."""

    threads: defaultdict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    """Per thread: expiries' rows and collected blobs."""
    by_ns_ck: dict[tuple[str, str], int] = field(default_factory=dict)
    by_ns_wr: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    by_ns_bytes: dict[tuple[str, str], int] = field(default_factory=dict)


async def _delete(
    conn: asyncpg.Connection, segment: Segment | None, stmt: Deleting, *args: Any
) -> list[tuple[Any, ...]]:
    """Run `stmt`; rows as its counting shape returns them. With a segment, the deleted
    rows themselves come back and are added to it, and the counts are tallied here."""
    if segment is None:
        return [tuple(r) for r in await conn.fetch(stmt.count, *args)]
    rows = await conn.fetch(stmt.capture, *args)
    if not rows:
        return []
    # A Record iterates its values, not its column names.
    columns = [c for c in rows[0].keys() if c != SIZE_COLUMN]  # noqa: SIM118
    segment.add(stmt.table, columns, [tuple(r[c] for c in columns) for r in rows])
    tally: dict[tuple[Any, ...], list[int]] = {}
    for r in rows:
        t = tally.setdefault(tuple(r[c] for c in stmt.by), [0, 0])
        t[0] += 1
        if stmt.sized:
            t[1] += int(r[SIZE_COLUMN] or 0)
    return [(*k, n, size) if stmt.sized else (*k, n) for k, (n, size) in tally.items()]


async def _null_parents(
    conn: asyncpg.Connection, segment: Segment | None, sql: str, *args: Any
) -> None:
    """Run a parent-nulling statement; with a segment, record the old parents in it."""
    rows = await conn.fetch(sql, *args)
    if segment is not None and rows:
        segment.add_nulled_parents([(r[0], r[1], r[2], r[3]) for r in rows])


def connect_kwargs(dsn: str) -> dict[str, Any]:
    """asyncpg connection arguments from a URL or libpq keyword DSN."""
    try:
        info = conninfo_to_dict(dsn)
    except Exception:
        # psycopg's message can quote the DSN; never pass it on.
        raise ValueError(
            "the DSN is neither a postgresql:// URL nor libpq key=value pairs"
        ) from None
    out: dict[str, Any] = {}
    for key, target in (
        ("host", "host"),
        ("port", "port"),
        ("user", "user"),
        ("password", "password"),
        ("dbname", "database"),
        ("sslmode", "ssl"),
        ("connect_timeout", "timeout"),
    ):
        if key in info and info[key] != "":
            out[target] = info[key]
    if "port" in out:
        out["port"] = int(out["port"])
    if "timeout" in out:
        out["timeout"] = float(out["timeout"])
    return out


class PostgresStore:
    """A `StoreEngine` over one Postgres database, on one shared asyncpg pool."""

    def __init__(
        self,
        name: str,
        dsn: str,
        *,
        schema: str = "public",
        min_size: int = 1,
        max_size: int = 4,
        lock_timeout: float = 2.0,
        statement_timeout: float = 30.0,
        grace_period: float = 3600.0,
    ) -> None:
        self.name = name
        self._dsn = dsn
        self.schema = schema
        self.min_size = min_size
        self.max_size = max_size
        self.lock_timeout = lock_timeout
        self.statement_timeout = statement_timeout
        self.grace_period = grace_period
        self._pool: asyncpg.Pool | None = None
        self._lock_conn: asyncpg.Connection | None = None
        self.now: float | None = None
        """The sweep's clock; blob GC's quiet check uses it. Set by `begin_sweep`."""
        self._expired_table = False
        """`checkpoint_janitor_expired` is known to exist (it is never dropped)."""
        self._holds_table = False
        """`checkpoint_janitor_holds` is known to exist (it is never dropped)."""
        self._deletions_table = False
        """`checkpoint_janitor_deletions` is known to exist (it is never dropped)."""

    # ------------------------------------------------------------ lifecycle

    def _error(self, what: str, e: BaseException) -> StoreError:
        message = f"{what}: {type(e).__name__}: {e}"
        password = connect_kwargs_safe(self._dsn).get("password")
        if password:
            message = message.replace(str(password), "***")
        return StoreError(self.name, message.replace(self._dsn, redact_dsn(self._dsn)))

    @property
    def pool(self) -> asyncpg.Pool:
        """The open pool."""
        if self._pool is None:
            raise StoreError(self.name, "not open")
        return self._pool

    async def open(self) -> None:
        """Connect and check the tables and migration version."""
        try:
            kwargs = connect_kwargs(self._dsn)
        except ValueError as e:
            raise StoreError(self.name, str(e)) from None
        where = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 5432)}"
        try:
            self._pool = await asyncpg.create_pool(
                min_size=self.min_size,
                max_size=self.max_size,
                server_settings={
                    "search_path": self.schema,
                    "application_name": "checkpoint-janitor",
                    # The planner guesses 100 rows per jsonb_each_text (there
                    # are a handful), which switches JIT on: measured 1.1 s of
                    # compiling in a 1.4 s statement. The reference anti-joins
                    # sort ~150k rows per page, past the default 4 MB.
                    "jit": "off",
                    "work_mem": "32MB",
                },
                **kwargs,
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as e:
            raise self._error(f"cannot connect to {where}", e) from None
        try:
            await self._check_schema()
        except BaseException:
            await self.close()
            raise

    async def _check_schema(self) -> None:
        async with self.pool.acquire() as conn:
            found = {r[0] for r in await conn.fetch(TABLES_SQL, self.schema, list(REQUIRED_TABLES))}
            if missing := [t for t in REQUIRED_TABLES if t not in found]:
                raise StoreError(
                    self.name,
                    f"schema {self.schema!r} lacks tables {missing}: not a "
                    "langgraph-checkpoint-postgres store (run the saver's setup(), "
                    "or set `schema:`)",
                )
            version = await conn.fetchval(MIGRATION_SQL)
        if version is None or not MIN_MIGRATION <= version <= MAX_MIGRATION:
            raise StoreError(
                self.name,
                f"checkpoint_migrations version {version} is not one this worker knows "
                f"({MIN_MIGRATION}..{MAX_MIGRATION}); refusing to touch the store",
            )

    async def close(self) -> None:
        """Release the sweep lock and close the pool."""
        if self._lock_conn is not None:
            conn, self._lock_conn = self._lock_conn, None
            await self.pool.release(conn)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def ping(self) -> None:
        """Raise `StoreError` if the database does not answer within the statement timeout."""
        try:
            await self.pool.fetchval("SELECT 1", timeout=self.statement_timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
            raise self._error("does not answer", e) from None

    async def begin_sweep(self, now: float) -> bool:
        """Take the store's advisory lock; False if another worker is sweeping it."""
        self.now = now
        if self._lock_conn is not None:
            return True
        conn = await self.pool.acquire()
        try:
            got = bool(await conn.fetchval(TRY_LOCK_SQL, self.name))
        except BaseException:
            await self.pool.release(conn)
            raise
        if got:
            self._lock_conn = conn
        else:
            await self.pool.release(conn)
        return got

    # ------------------------------------------------------------ archive

    def _archived(self, segment: Segment) -> None:
        """A batch's segment is complete: its rows are safe in the archive."""
        if segment.counts:
            log.debug(
                "batch_archived",
                store=self.name,
                segment=segment.path,
                rows=segment.counts,
                bytes=segment.bytes,
            )

    async def recover_archive(self, archive: Archive) -> Recovered:
        """Settle the `.pending` segments earlier runs left in `archive`.

        A pending segment was sealed, and its batch's COMMIT then may or may
        not have happened (a crash, a lost connection). Its rows still in the
        store: the delete rolled back, the segment goes (a later batch archives
        them again). Gone: the delete committed, the segment is complete.
        Some of each (rows restored or re-written since): complete, so nothing
        deleted is left without its archive; restore skips rows that exist.
        """
        out = Recovered()
        for pending in await asyncio.to_thread(archive.pending):
            if not await asyncio.to_thread(pending.valid):
                # Renamed to .pending only once verified: a torn copy never ran a delete.
                await asyncio.to_thread(pending.discard)
                out.discarded += 1
                continue
            async with self.pool.acquire() as conn:
                verdict = await pg_archive.committed(conn, pending)
            if verdict is False:
                await asyncio.to_thread(pending.discard)
                out.discarded += 1
            else:
                await asyncio.to_thread(pending.promote)
                out.promoted += 1
            log.info(
                "archive_pending_settled",
                store=self.name,
                segment=pending.path,
                outcome="discarded" if verdict is False else "promoted",
                partly_present=verdict is None,
            )
        return out

    async def restore(
        self, segments: Sequence[SegmentReader], select: Selection, dry_run: bool
    ) -> RestoreCounts:
        """Put the selected archived rows back (or count what is missing, `dry_run`).

        Rows that exist are left as they are; nulled parents are re-linked
        where still NULL and the parent exists (`worker.stores.postgres_archive`).
        """
        async with self.pool.acquire() as conn:
            await conn.execute(f"SET lock_timeout = {int(self.lock_timeout * 1000)}")
            restorer = pg_archive.Restorer(conn, self.name)
            try:
                if dry_run:
                    return await restorer.count(segments, select)
                return await restorer.restore(segments, select)
            except pg_archive.RestoreError as e:
                raise StoreError(self.name, str(e)) from None
            except (OSError, asyncpg.PostgresError) as e:
                raise self._error("restore failed", e) from None

    async def end_sweep(self) -> None:
        """Release the store's advisory lock."""
        if self._lock_conn is not None:
            conn, self._lock_conn = self._lock_conn, None
            try:
                await conn.fetchval(UNLOCK_SQL, self.name)
            finally:
                await self.pool.release(conn)

    # ------------------------------------------------------------ scan

    async def count_threads(self) -> int:
        """Threads with at least one checkpoint."""
        return int(await self.pool.fetchval(COUNT_THREADS_SQL))

    def thread_pages(self, page_size: int) -> AsyncIterator[list[str]]:
        """Every thread id of checkpoints, writes and expired threads' waiting blobs, by pages."""
        return self._walk(None, page_size)

    def thread_prefix_pages(self, prefix: str, page_size: int) -> AsyncIterator[list[str]]:
        """Thread ids starting with `prefix` (byte-exact, any collation), by keyset pages."""
        return self._walk(prefix, page_size)

    async def _walk(self, prefix: str | None, page_size: int) -> AsyncIterator[list[str]]:
        # An expired thread whose blobs wait out the grace period holds nothing
        # else: a sweep must still meet it (to collect them), and so must a purge.
        async with self.pool.acquire() as conn:
            expired = await self._has_expired_table(conn)
        after: str | None = None
        while True:
            if prefix is None and after is None:
                rows = await self.pool.fetch(WALK_SQL["first", expired], page_size)
            elif prefix is None:
                rows = await self.pool.fetch(WALK_SQL["next", expired], page_size, after)
            elif after is None:
                rows = await self.pool.fetch(WALK_SQL["prefix_first", expired], page_size, prefix)
            else:
                rows = await self.pool.fetch(
                    WALK_SQL["prefix_next", expired], page_size, prefix, after
                )
            page = [r[0] for r in rows]
            if page:
                yield page
            if len(page) < page_size:
                return
            after = page[-1]

    async def _has_expired_table(self, conn: asyncpg.Connection) -> bool:
        if not self._expired_table:
            self._expired_table = bool(await conn.fetchval(EXPIRED_TABLE_EXISTS_SQL))
        return self._expired_table

    async def _has_deletions_table(self, conn: asyncpg.Connection) -> bool:
        if not self._deletions_table:
            self._deletions_table = bool(await conn.fetchval(DELETIONS_TABLE_EXISTS_SQL))
        return self._deletions_table

    async def _fetch_dated(
        self, conn: asyncpg.Connection, sql: dict[bool, str], *args: Any
    ) -> list[asyncpg.Record]:
        """A blob-collecting statement, with the recent-deletion check once there are dates."""
        if await self._has_deletions_table(conn):
            return list(await conn.fetch(sql[True], *args, self._cutoff()))
        return list(await conn.fetch(sql[False], *args))

    async def scan(self, thread_ids: Sequence[str]) -> list[ScannedThread]:
        """Summaries of `thread_ids`; delta threads' channel keys filled in."""
        ids = list(thread_ids)
        rows: dict[str, list[asyncpg.Record]] = defaultdict(list)
        async with self.pool.acquire() as conn:
            for r in await conn.fetch(SCAN_SQL, ids):
                rows[r["thread_id"]].append(r)
            sends: set[tuple[str, str, str]] = set()
            if any(r["v"] < 4 for rs in rows.values() for r in rs):
                sends = {(r[0], r[1], r[2]) for r in await conn.fetch(SENDS_WRITES_SQL, ids)}
            orphans: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for r in await conn.fetch(ORPHAN_WRITES_SQL, ids):
                orphans[r[0]].append((r[1], r[2]))
            summaries_of = {
                tid: tuple(_summary(tid, r, sends) for r in rows.get(tid, ())) for tid in ids
            }
            quiet = [t for t in ids if self._quiet(_fingerprint(summaries_of[t]))]
            garbage = (
                {r[0] for r in await self._fetch_dated(conn, GARBAGE_BLOB_THREADS_SQL, quiet)}
                if quiet
                else set()
            )
            # Expired threads' blobs, due once the grace period since the
            # expiry has passed; they are matched on the metadata they had.
            expired_meta: dict[str, dict[str, Any]] = {}
            empty = [t for t in ids if not summaries_of[t]]
            if empty and await self._has_expired_table(conn):
                for r in await conn.fetch(EXPIRED_ROWS_SQL, empty):
                    expired_meta[r["thread_id"]] = json_object(r["head_metadata"])
                    if self.now is not None and self.now - r["expired_at"] > self.grace_period:
                        garbage.add(r["thread_id"])
            for tid in ids:
                if is_delta_thread(summaries_of[tid]):
                    summaries_of[tid] = await self._channel_keys(conn, tid, summaries_of[tid])
            heads = {tid: h for tid in ids if (h := root_head(summaries_of[tid])) is not None}
            head_meta = {
                r[0]: json_object(r[1])
                for r in await conn.fetch(
                    HEADS_METADATA_SQL,
                    list(heads),
                    [h.namespace for h in heads.values()],
                    [h.checkpoint_id for h in heads.values()],
                )
            }
            out = []
            for tid in ids:
                summaries = summaries_of[tid]
                view = ThreadView(
                    thread_id=tid,
                    checkpoints=summaries,
                    head_metadata=head_meta.get(tid) or expired_meta.get(tid, {}),
                    orphan_writes=tuple(orphans.get(tid, ())),
                )
                out.append(
                    ScannedThread(view, _fingerprint(summaries), garbage_blobs=tid in garbage)
                )
        return out

    async def aggregate_pages(
        self, page_size: int, head_metadata: bool
    ) -> AsyncIterator[list[ThreadAggregate]]:
        """Every thread (checkpoints, writes, expired threads' blobs), with its aggregates."""
        async for page in self._walk(None, page_size):
            spaces: dict[str, list[NamespaceAggregate]] = defaultdict(list)
            for r in await self.pool.fetch(AGGREGATE_SQL, page):
                spaces[r[0]].append(NamespaceAggregate(r[1], int(r[2]), r[3], r[4]))
            dated: set[str] = set()
            async with self.pool.acquire() as conn:
                if await self._has_deletions_table(conn):
                    rows = await conn.fetch(DATED_THREADS_SQL, page, self._cutoff())
                    dated = {r[0] for r in rows}
            meta: dict[str, dict[str, Any]] = {}
            if head_metadata:
                heads = [(t, a.newest_id) for t in page for a in spaces[t] if a.namespace == ""]
                rows = await self.pool.fetch(
                    HEADS_METADATA_SQL,
                    [t for t, _ in heads],
                    ["" for _ in heads],
                    [h for _, h in heads],
                )
                meta = {r[0]: json_object(r[1]) for r in rows}
            yield [
                ThreadAggregate(
                    t, tuple(spaces[t]), head_metadata=meta.get(t, {}), dated=t in dated
                )
                for t in page
            ]

    async def details(
        self, asked: Sequence[tuple[ThreadAggregate, ThreadPlan]]
    ) -> list[ThreadAggregate]:
        """Fill in what each plan asked for; orphans come with the thread's garbage blobs."""
        out = {a.thread_id: a for a, _ in asked}

        def wanting(detail: Detail) -> list[str]:
            return [a.thread_id for a, p in asked if detail in p.needs]

        async with self.pool.acquire() as conn:
            if tids := wanting(Detail.ORPHANS):
                await self._orphans(conn, tids, out)
            if tids := wanting(Detail.MARKERS):
                marked = {r[0] for r in await conn.fetch(MARKED_THREADS_SQL, tids)}
                for t in tids:
                    out[t] = replace(out[t], markers=t in marked)
            if tids := wanting(Detail.REGULAR):
                irregular = {
                    (r[0], r[1]): int(r[2]) for r in await conn.fetch(IRREGULAR_IDS_SQL, tids)
                }
                for t in tids:
                    spaces = tuple(
                        replace(a, irregular=irregular.get((t, a.namespace), 0))
                        for a in out[t].namespaces
                    )
                    out[t] = replace(out[t], namespaces=spaces)
            for a, p in asked:
                if Detail.COUNT in p.needs:
                    below = dict(out[a.thread_id].below)
                    for ns, bound in p.count_below:
                        below[(ns, bound)] = int(
                            await conn.fetchval(COUNT_BELOW_SQL, a.thread_id, ns, bound)
                        )
                    out[a.thread_id] = replace(out[a.thread_id], below=below)
        if tids := wanting(Detail.WAITING):
            await self._waiting(tids, out)
        return [out[a.thread_id] for a, _ in asked]

    async def _orphans(
        self, conn: asyncpg.Connection, tids: list[str], out: dict[str, ThreadAggregate]
    ) -> None:
        found: dict[str, list[tuple[str, str]]] = {t: [] for t in tids}
        for r in await conn.fetch(ORPHAN_WRITES_SQL, tids):
            found[r[0]].append((r[1], r[2]))
        quiet = [t for t in tids if self._quiet(_aggregate_fingerprint(out[t]))]
        garbage = (
            {r[0] for r in await self._fetch_dated(conn, GARBAGE_BLOB_THREADS_SQL, quiet)}
            if quiet
            else set()
        )
        for t in tids:
            out[t] = replace(out[t], orphan_writes=tuple(found[t]), garbage_blobs=t in garbage)

    async def residue_checks(self) -> dict[str, float]:
        """When each policy's quiet threads were last all looked at for residue."""
        async with self.pool.acquire() as conn:
            if not await conn.fetchval(RESIDUE_TABLE_EXISTS_SQL):
                return {}
            return {str(r[0]): float(r[1]) for r in await conn.fetch(RESIDUE_CHECKS_SQL)}

    async def record_residue_checks(self, policies: Sequence[str], at: float) -> None:
        """Date a complete look at these policies' quiet threads (one upsert)."""
        try:
            async with self.pool.acquire() as conn:
                await conn.execute(CREATE_RESIDUE_TABLE_SQL)
                await conn.execute(RECORD_RESIDUE_CHECKS_SQL, list(policies), at)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise self._error("cannot record the residue check", e) from None

    async def _waiting(self, tids: list[str], out: dict[str, ThreadAggregate]) -> None:
        """Whether each head waits; a v < 4 head (sends in its parent's writes) goes to rows."""
        heads = [(t, a.newest_id) for t in tids for a in out[t].namespaces if a.namespace == ""]
        old = {
            r[0]
            for r in await self.pool.fetch(
                OLD_HEADS_SQL, [t for t, _ in heads], ["" for _ in heads], [h for _, h in heads]
            )
        }
        for t in old:
            out[t] = replace(out[t], rows=True)
        views = [
            ScannedThread(ThreadView(t, (CheckpointSummary("", h, None, checkpoint_time(h)),)), ())
            for t, h in heads
            if t not in old
        ]
        for v in await self.resolve_waiting(views):
            out[v.view.thread_id] = replace(
                out[v.view.thread_id],
                waiting=v.view.waiting,
                head_undecodable=v.view.head_undecodable,
            )

    async def _channel_keys(
        self, conn: asyncpg.Connection, thread_id: str, summaries: tuple[CheckpointSummary, ...]
    ) -> tuple[CheckpointSummary, ...]:
        keys = {
            (r["checkpoint_ns"], r["checkpoint_id"]): (
                frozenset(r["present"]),
                frozenset(r["versioned"]),
            )
            for r in await conn.fetch(CHANNEL_KEYS_SQL, thread_id)
        }
        out = []
        for s in summaries:
            k = keys.get((s.namespace, s.checkpoint_id))
            if k is not None:
                s = _with_keys(s, k)
            out.append(s)
        return tuple(out)

    async def resolve_waiting(self, threads: Sequence[ScannedThread]) -> list[ScannedThread]:
        """Read each thread's newest root checkpoint's pending tasks: does it wait?"""
        return [await self._resolve_one(t) for t in threads]

    async def _resolve_one(self, thread: ScannedThread) -> ScannedThread:
        view = thread.view
        head = root_head(view.checkpoints)
        waiting = False
        if head is not None:
            r = await self.pool.fetchrow(
                HEAD_STATE_SQL, view.thread_id, head.namespace, head.checkpoint_id
            )
            if r is None:
                waiting = True
            else:
                state = {
                    "channel_values": {k: True for k in r["present"]},
                    "channel_versions": json_object(r["versions"]),
                    "versions_seen": json_object(r["seen"]),
                }
                waiting = is_waiting(state, r["write_channels"])
                parent = next(
                    (
                        c
                        for c in view.checkpoints
                        if c.namespace == head.namespace and c.checkpoint_id == head.parent_id
                    ),
                    None,
                )
                # A v < 4 head's pending sends are its parent's __pregel_tasks writes.
                if head.reads_parent_sends and parent is not None and parent.has_sends_writes:
                    waiting = True
        from dataclasses import replace

        return replace(thread, view=replace(view, waiting=waiting))

    # ------------------------------------------------------------ delete

    async def apply(
        self, batch: Sequence[ThreadWork], dry_run: bool, archive: Archive | None = None
    ) -> list[WorkResult]:
        """One READ COMMITTED transaction for the batch, retried on lock and deadlock errors.

        With `archive`, every row it deletes and every parent id it nulls go to
        one segment, sealed before the COMMIT (`ArchivingStore.apply`).
        """
        if dry_run:
            return await self._count(batch)
        changed: set[str] = set()
        on_hold: set[str] = set()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            todo = [w for w in batch if w.thread_id not in changed | on_hold]
            try:
                done = await self._apply_once(todo, archive)
            except _OnHold as e:
                on_hold |= e.threads
                continue
            except _Changed as e:
                changed |= e.threads
                continue
            except RETRYABLE as e:
                if attempt == MAX_ATTEMPTS:
                    log.warning(
                        "batch_gave_up",
                        store=self.name,
                        error=type(e).__name__,
                        threads=len(todo),
                    )
                    return _gave_up(batch, changed, on_hold)
                delay = min(5.0, 0.1 * 2**attempt) * (0.5 + random.random())
                log.info(
                    "batch_retry",
                    store=self.name,
                    error=type(e).__name__,
                    attempt=attempt,
                    delay=round(delay, 3),
                )
                await asyncio.sleep(delay)
                continue
            return _merged(batch, todo, done, on_hold)
        return [WorkResult(w.thread_id, Counts(), changed=True) for w in batch]

    async def _apply_once(
        self, batch: Sequence[ThreadWork], archive: Archive | None
    ) -> list[WorkResult]:
        if not batch:
            return []
        tids = sorted({w.thread_id for w in batch})
        deferred = [w.thread_id for w in batch if w.expire and w.defer_blobs]
        if deferred and not self._expired_table:
            # Outside the batch's transaction: a rollback must not undo it.
            await self.pool.execute(CREATE_EXPIRED_TABLE_SQL)
            self._expired_table = True
        # Every trim and policy expiry dates its thread: its blobs wait (a purge erases).
        dated = sorted({w.thread_id for w in batch if w.checkpoints or w.ranges} | set(deferred))
        if dated and not self._deletions_table:
            await self.pool.execute(CREATE_DELETIONS_TABLE_SQL)
            self._deletions_table = True
        # The batch's archive segment: filled by the statements below, sealed
        # (written, fsynced, verified) before COMMIT, completed after it.
        segment = None if archive is None else archive.segment()
        sealed = False
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                counts = await self._batch(conn, batch, tids, deferred, dated, segment)
                if segment is not None:
                    # A seal that fails raises here: the transaction rolls back.
                    await asyncio.to_thread(segment.seal)
                    sealed = True
        except BaseException as e:
            if segment is None:
                raise
            if not sealed:
                await asyncio.to_thread(segment.abandon)
                raise
            # Sealed, then COMMIT failed: whether the delete committed is unknown.
            # The segment stays pending for the next run's recovery to settle,
            # and this batch is not retried (a retry would archive its rows again).
            raise StoreError(
                self.name,
                f"commit failed after the archive segment was sealed "
                f"({segment.path}); the next sweep settles it: {type(e).__name__}: {e}",
            ) from e
        if segment is not None:
            await asyncio.to_thread(segment.complete)
            self._archived(segment)
        return self._results(batch, counts)

    async def _batch(
        self,
        conn: asyncpg.Connection,
        batch: Sequence[ThreadWork],
        tids: list[str],
        deferred: list[str],
        dated: list[str],
        segment: Segment | None,
    ) -> _BatchCounts:
        """The batch's statements, in its transaction; deleted rows also go to `segment`."""
        before = await self._as_scanned(conn, batch, tids)
        bc = await self._delete_parts(conn, batch, segment)
        expire = [w.thread_id for w in batch if w.expire]
        if expire:
            await self._expire(conn, expire, deferred, bc.threads, segment)
        if dated:
            await conn.execute(RECORD_DELETIONS_SQL, dated, self._clock())

        # Re-read every thread: a checkpoint committed since the first
        # check (a resume, a fork) shows as a count we did not expect.
        after = await _fingerprints(conn, tids)
        expected = _expected_counts(batch, before, bc.by_ns_ck)
        if bad := {t for t in tids if _counts_of(after.get(t, ())) != expected.get(t, {})}:
            raise _Changed(bad)

        quiet = [t for t in tids if t not in expire and self._quiet(after.get(t, ()))]
        await self._collect_blobs(conn, batch, tids, quiet, bc.threads, segment)
        return bc

    async def _as_scanned(
        self, conn: asyncpg.Connection, batch: Sequence[ThreadWork], tids: list[str]
    ) -> dict[str, Fingerprint]:
        """Set the batch's timeouts, refuse held or changed threads; the fingerprints read."""
        await conn.execute(
            f"SET LOCAL lock_timeout = {int(self.lock_timeout * 1000)}; "
            f"SET LOCAL statement_timeout = {int(self.statement_timeout * 1000)}"
        )
        if on_hold := await self._held_among(conn, tids):
            raise _OnHold(on_hold)
        before = await _fingerprints(conn, tids)
        # A thread's first part must find the thread as scanned.
        first: dict[str, ThreadWork] = {}
        for w in batch:
            first.setdefault(w.thread_id, w)
        if bad := {t for t, w in first.items() if before.get(t, ()) != w.fingerprint}:
            raise _Changed(bad)
        return before

    async def _delete_parts(
        self, conn: asyncpg.Connection, batch: Sequence[ThreadWork], segment: Segment | None
    ) -> _BatchCounts:
        """The trims (named and ranged) and orphaned writes; what they deleted."""
        trims = [
            (w.thread_id, ns, i) for w in batch for ns, ids in w.checkpoints.items() for i in ids
        ]
        orphans = [(w.thread_id, ns, i) for w in batch for ns, ids in w.writes.items() for i in ids]
        bc = _BatchCounts()
        if trims:
            t = _Triples.of(trims)
            for r in await _delete(conn, segment, DELETE_WRITES, *t.args()):
                bc.by_ns_wr[(r[0], r[1])] += r[2]
            for r in await _delete(conn, segment, DELETE_CHECKPOINTS, *t.args()):
                bc.by_ns_ck[(r[0], r[1])] = r[2]
            await _null_parents(conn, segment, NULL_PARENTS_SQL, *t.args())
        if ranges := _merged_ranges(batch):
            await self._trim_ranges(conn, ranges, bc, segment)
        if orphans:
            t = _Triples.of(orphans)
            for r in await _delete(conn, segment, DELETE_ORPHAN_WRITES, *t.args()):
                bc.by_ns_wr[(r[0], r[1])] += r[2]
        return bc

    async def _expire(
        self,
        conn: asyncpg.Connection,
        expire: list[str],
        deferred: list[str],
        counts: defaultdict[str, Counts],
        segment: Segment | None,
    ) -> None:
        """Expire whole threads; a policy's expiry dates its blobs, a purge erases them."""
        if deferred:
            await conn.execute(RECORD_EXPIRED_SQL, deferred, self._clock())
        purged = sorted(set(expire) - set(deferred))
        for kind, stmt in EXPIRE.items():
            # A policy's expiry leaves the blobs for the grace period.
            targets = purged if kind == "blobs" else expire
            if not targets:
                continue
            for r in await _delete(conn, segment, stmt, targets):
                setattr(counts[r[0]], kind, getattr(counts[r[0]], kind) + r[1])
                if kind == "checkpoints":
                    counts[r[0]].bytes += int(r[2] or 0)
        if purged and await self._has_expired_table(conn):
            await conn.execute(FORGET_EXPIRED_SQL, purged)
        if purged and await self._has_deletions_table(conn):
            await conn.execute(FORGET_DELETIONS_SQL, purged)
        for t_id in expire:
            counts[t_id].threads = 1

    async def _collect_blobs(
        self,
        conn: asyncpg.Connection,
        batch: Sequence[ThreadWork],
        tids: list[str],
        quiet: list[str],
        counts: defaultdict[str, Counts],
        segment: Segment | None,
    ) -> None:
        """Quiet threads' unreferenced blobs, and expired threads' blobs past the grace period."""
        if quiet:
            await _null_parents(conn, segment, NULL_DANGLING_PARENTS_SQL, quiet)
            recent = await self._has_deletions_table(conn)
            args: tuple[Any, ...] = (quiet, self._cutoff()) if recent else (quiet,)
            for r in await _delete(conn, segment, DELETE_GARBAGE_BLOBS[recent], *args):
                counts[r[0]].blobs += r[1]
        gone = [w.thread_id for w in batch if w.gc_blobs and not w.fingerprint]
        if await self._has_expired_table(conn):
            await conn.execute(DROP_RETURNED_SQL, tids)
            if gone:
                for r in await _delete(conn, segment, DELETE_EXPIRED_BLOBS, gone, self._cutoff()):
                    counts[r[0]].blobs += r[1]
        if (quiet or gone) and await self._has_deletions_table(conn):
            await conn.execute(PRUNE_DELETIONS_SQL, [*quiet, *gone], self._cutoff())

    @staticmethod
    def _results(batch: Sequence[ThreadWork], bc: _BatchCounts) -> list[WorkResult]:
        """Attribute the batch's rows to its parts: each trim part has one namespace."""
        results = []
        seen_blobs: set[str] = set()
        for w in batch:
            c = Counts()
            if w.expire:
                c = bc.threads[w.thread_id]
            else:
                for ns in [*w.checkpoints, *w.ranges]:
                    c.checkpoints += bc.by_ns_ck.pop((w.thread_id, ns), 0)
                    c.writes += bc.by_ns_wr.pop((w.thread_id, ns), 0)
                    c.bytes += bc.by_ns_bytes.pop((w.thread_id, ns), 0)
                for ns in w.writes:
                    c.writes += bc.by_ns_wr.pop((w.thread_id, ns), 0)
                if w.thread_id not in seen_blobs:
                    c.blobs = bc.threads[w.thread_id].blobs
                    seen_blobs.add(w.thread_id)
            results.append(WorkResult(w.thread_id, c))
        return results

    async def _trim_ranges(
        self,
        conn: asyncpg.Connection,
        ranges: list[tuple[str, str, TrimRange]],
        bc: _BatchCounts,
        segment: Segment | None,
    ) -> None:
        """The batch's set-based trims: bounds, parents nulled, writes, checkpoints."""
        bounds = await _bounds(conn, ranges)
        args = ([t for t, _, _ in ranges], [ns for _, ns, _ in ranges], bounds)
        await _null_parents(conn, segment, TRIM_NULL_PARENTS_SQL, *args)
        for r in await _delete(conn, segment, TRIM_WRITES, *args):
            bc.by_ns_wr[(r[0], r[1])] += r[2]
        for r in await _delete(conn, segment, TRIM_CHECKPOINTS, *args):
            bc.by_ns_ck[(r[0], r[1])] = bc.by_ns_ck.get((r[0], r[1]), 0) + r[2]
            bc.by_ns_bytes[(r[0], r[1])] = int(r[3] or 0)

    def _clock(self) -> float:
        """The sweep's time (the wall clock outside a sweep: a purge)."""
        return time.time() if self.now is None else self.now

    def _cutoff(self) -> float:
        """Expiries before this have waited out the grace period."""
        return self._clock() - self.grace_period

    def _quiet(self, fp: Fingerprint) -> bool:
        if not fp or self.now is None:
            return False
        newest = max(checkpoint_time(cid) or float("inf") for _, _, cid in fp)
        return self.now - newest > self.grace_period

    async def _count(self, batch: Sequence[ThreadWork]) -> list[WorkResult]:
        async with self.pool.acquire() as conn:
            # A dry run names a range's ids, which the plan counted: few.
            named = [await _named(conn, w) if w.ranges else w for w in batch]
            results = await self._count_named(conn, named)
        for w, result in zip(named, results, strict=True):
            result.counts.bytes = result.counts.bytes or w.bytes
        return results

    async def _count_named(
        self, conn: asyncpg.Connection, batch: Sequence[ThreadWork]
    ) -> list[WorkResult]:
        expire = [w.thread_id for w in batch if w.expire]
        trims = [
            (w.thread_id, ns, i) for w in batch for ns, ids in w.checkpoints.items() for i in ids
        ]
        orphans = [(w.thread_id, ns, i) for w in batch for ns, ids in w.writes.items() for i in ids]
        ck: dict[tuple[str, str], int] = {}
        wr: dict[tuple[str, str], int] = defaultdict(int)
        if trims:
            t = _Triples.of(trims)
            ck = {(r[0], r[1]): r[2] for r in await conn.fetch(COUNT_CHECKPOINTS_SQL, *t.args())}
            for r in await conn.fetch(COUNT_WRITES_SQL, *t.args()):
                wr[(r[0], r[1])] += r[2]
        if orphans:
            for r in await conn.fetch(COUNT_WRITES_SQL, *_Triples.of(orphans).args()):
                wr[(r[0], r[1])] += r[2]
        whole: dict[str, Counts] = defaultdict(Counts)
        if expire:
            for kind, sql in COUNT_THREAD_SQL.items():
                for r in await conn.fetch(sql, expire):
                    setattr(whole[r[0]], kind, r[1])
                    if kind == "checkpoints":
                        whole[r[0]].bytes = int(r[2] or 0)
            # A policy's expiry leaves the blobs: a later sweep counts them.
            for w in batch:
                if w.expire and w.defer_blobs:
                    whole[w.thread_id].blobs = 0
        blobs = await self._count_blobs(conn, batch, trims)
        results = []
        for w in batch:
            if w.expire:
                c = whole[w.thread_id]
                c.threads = 1
            else:
                c = Counts()
                for ns in w.checkpoints:
                    c.checkpoints += ck.pop((w.thread_id, ns), 0)
                    c.writes += wr.pop((w.thread_id, ns), 0)
                for ns in w.writes:
                    c.writes += wr.pop((w.thread_id, ns), 0)
                c.blobs = blobs.pop(w.thread_id, 0)
            results.append(WorkResult(w.thread_id, c))
        return results

    async def _count_blobs(
        self,
        conn: asyncpg.Connection,
        batch: Sequence[ThreadWork],
        trims: list[tuple[str, str, str]],
    ) -> dict[str, int]:
        """Per thread: the blobs the batch would collect (`_collect_blobs`, counted)."""
        blobs: dict[str, int] = {}
        # A trim dates its thread, so the batch collects no blob of it.
        trimmed = {w.thread_id for w in batch if w.checkpoints or w.ranges}
        tids = sorted(
            {
                w.thread_id
                for w in batch
                if not w.expire and w.thread_id not in trimmed and self._quiet(w.fingerprint)
            }
        )
        if tids:
            t = _Triples.of(trims) if trims else _Triples([], [], [])
            rows = await self._fetch_dated(conn, COUNT_GARBAGE_BLOBS_SQL, tids, *t.args())
            blobs = {r[0]: r[1] for r in rows}
        gone = [w.thread_id for w in batch if w.gc_blobs and not w.fingerprint]
        if gone and await self._has_expired_table(conn):
            for r in await conn.fetch(COUNT_EXPIRED_BLOBS_SQL, gone, self._cutoff()):
                blobs[r[0]] = blobs.get(r[0], 0) + r[1]
        return blobs

    async def thread_bytes(self, thread_ids: Sequence[str]) -> dict[str, int]:
        """Bytes of each thread: checkpoints and metadata, writes and blobs."""
        rows = await self.pool.fetch(THREAD_BYTES_SQL, list(thread_ids))
        return {str(r[0]): int(r[1]) for r in rows}

    async def after_batch(self) -> None:
        """Nothing to do between batches: autovacuum reclaims dead tuples."""

    # ------------------------------------------------------------ legal holds

    async def _has_holds_table(self, conn: asyncpg.Connection) -> bool:
        # Once there, never dropped: only its absence is asked again.
        if not self._holds_table:
            self._holds_table = bool(await conn.fetchval(HOLDS_TABLE_EXISTS_SQL))
        return self._holds_table

    async def _held_among(self, conn: asyncpg.Connection, thread_ids: Sequence[str]) -> set[str]:
        """The held threads among `thread_ids`, read in the caller's transaction under the lock."""
        # Its own statement: READ COMMITTED takes a statement's snapshot when
        # it starts, so a read in the same statement would predate the wait.
        await conn.execute(HOLDS_SHARED_LOCK_SQL)
        if not await self._has_holds_table(conn):
            return set()
        return {r[0] for r in await conn.fetch(HELD_AMONG_SQL, list(thread_ids))}

    async def holds(self) -> list[Hold]:
        """Every hold, in thread-id order; none while the holds table does not exist."""
        out: list[Hold] = []
        async with self.pool.acquire() as conn:
            if not await self._has_holds_table(conn):
                return out
            after: str | None = None
            while True:
                if after is None:
                    rows = await conn.fetch(HOLDS_FIRST_PAGE_SQL, HOLDS_PAGE)
                else:
                    rows = await conn.fetch(HOLDS_NEXT_PAGE_SQL, after, HOLDS_PAGE)
                out.extend(Hold(r[0], r[1], float(r[2]), r[3]) for r in rows)
                if len(rows) < HOLDS_PAGE:
                    return out
                after = rows[-1][0]

    async def hold(self, thread_id: str, reason: str | None, held_by: str | None) -> Hold | None:
        """Hold `thread_id` (whether or not it has rows yet); None if it was held already."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {int(self.lock_timeout * 1000)}")
            await conn.execute(HOLDS_LOCK_SQL)
            if not await self._has_holds_table(conn):
                await conn.execute(CREATE_HOLDS_TABLE_SQL)
            held_at = await conn.fetchval(INSERT_HOLD_SQL, thread_id, reason, held_by)
        # Only now, committed: a rollback would leave no table behind.
        self._holds_table = True
        return None if held_at is None else Hold(thread_id, reason, float(held_at), held_by)

    async def release(self, thread_id: str) -> bool:
        """Lift the hold on `thread_id`; False if it had none."""
        async with self.pool.acquire() as conn:
            if not await self._has_holds_table(conn):
                return False
            return await conn.fetchval(DELETE_HOLD_SQL, thread_id) is not None

    # ------------------------------------------------------------ stats

    async def stats(self, now: float, largest: int = 10) -> dict[str, Any]:
        """Rows, dead tuples and bytes per table, ages per namespace, largest threads."""
        async with self.pool.acquire() as conn:
            tables = {
                r[0]: {"rows": int(r[1]), "dead_rows": int(r[2]), "bytes": int(r[3])}
                for r in await conn.fetch(STATS_TABLE_SQL, self.schema, list(REQUIRED_TABLES))
            }
            ages = AgeHistogram(now)
            async with conn.transaction():
                async for ns, cid in conn.cursor(STATS_IDS_SQL):
                    ages.add(ns, cid)
            top = [
                {"thread_id": r[0], "checkpoints": int(r[1]), "bytes": int(r[2])}
                for r in await conn.fetch(LARGEST_THREADS_SQL, largest)
            ]
            threads = int(await conn.fetchval(COUNT_THREADS_SQL))
            pending = (0, 0)
            if await self._has_expired_table(conn):
                r = await conn.fetchrow(EXPIRED_STATS_SQL)
                pending = (int(r[0]), int(r[1]))
        return {
            "store": self.name,
            "kind": "postgres",
            "threads": threads,
            "tables": tables,
            "ages": ages.counts,
            "largest_threads": top,
            # Expired threads whose blobs wait out the grace period (not in `threads`).
            "expired_awaiting_blob_gc": {"threads": pending[0], "blobs": pending[1]},
        }


def connect_kwargs_safe(dsn: str) -> dict[str, Any]:
    """`connect_kwargs`, or {} for a DSN that does not parse."""
    try:
        return connect_kwargs(dsn)
    except ValueError:
        return {}


async def _fingerprints(conn: asyncpg.Connection, tids: Sequence[str]) -> dict[str, Fingerprint]:
    found: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
    for tid, ns, n, newest in await conn.fetch(FINGERPRINT_SQL, list(tids)):
        found[tid].append((ns, int(n), newest))
    return {tid: tuple(sorted(v)) for tid, v in found.items()}


def _merged_ranges(batch: Sequence[ThreadWork]) -> list[tuple[str, str, TrimRange]]:
    """The batch's trim ranges, one per (thread, namespace).

    A huge trim's chunks are contiguous, oldest first, so the chunks of one
    namespace in one batch are one range with their limits added: bounds are
    read once, before any delete.
    """
    merged: dict[tuple[str, str], TrimRange] = {}
    for w in batch:
        for ns, r in w.ranges.items():
            have = merged.get((w.thread_id, ns))
            merged[(w.thread_id, ns)] = (
                r if have is None else replace(have, limit=have.limit + r.limit)
            )
    return [(t, ns, r) for (t, ns), r in merged.items()]


async def _bounds(
    conn: asyncpg.Connection, ranges: Sequence[tuple[str, str, TrimRange]]
) -> list[str]:
    rows = await conn.fetch(
        TRIM_BOUNDS_SQL,
        [t for t, _, _ in ranges],
        [ns for _, ns, _ in ranges],
        [r.before for _, _, r in ranges],
        [r.keep for _, _, r in ranges],
        [r.limit for _, _, r in ranges],
    )
    return [str(r[0]) for r in rows]


async def _named(conn: asyncpg.Connection, work: ThreadWork) -> ThreadWork:
    """A dry run's copy of `work` naming the ids its ranges would delete, and their size."""
    checkpoints = {ns: list(ids) for ns, ids in work.checkpoints.items()}
    for ns, r in work.ranges.items():
        whole = replace(r, limit=r.offset + r.limit)
        (bound,) = await _bounds(conn, [(work.thread_id, ns, whole)])
        rows = await conn.fetch(RANGE_IDS_SQL, work.thread_id, ns, bound, r.offset)
        checkpoints.setdefault(ns, []).extend(row[0] for row in rows)
    size = 0
    if checkpoints:
        t = _Triples.of([(work.thread_id, ns, i) for ns, ids in checkpoints.items() for i in ids])
        size = int(await conn.fetchval(RANGE_BYTES_SQL, *t.args()) or 0)
    return replace(work, checkpoints=checkpoints, ranges={}, bytes=work.bytes or size)


def _counts_of(fp: Fingerprint) -> dict[str, int]:
    return {ns: n for ns, n, _ in fp}


def _expected_counts(
    batch: Sequence[ThreadWork],
    before: dict[str, Fingerprint],
    deleted: dict[tuple[str, str], int],
) -> dict[str, dict[str, int]]:
    """Checkpoints per namespace of each thread once the batch's deletes are done.

    Counts alone detect an insert; the newest id of a namespace a chunk
    emptied from the top is not known here, and not needed.
    """
    expired = {w.thread_id for w in batch if w.expire}
    out: dict[str, dict[str, int]] = {}
    for tid, fp in before.items():
        if tid in expired:
            continue
        left = {ns: n - deleted.get((tid, ns), 0) for ns, n, _ in fp}
        out[tid] = {ns: n for ns, n in left.items() if n > 0}
    return out


def _summary(tid: str, r: asyncpg.Record, sends: set[tuple[str, str, str]]) -> CheckpointSummary:
    # The scan pulls only the metadata keys the decision reads out of the JSONB.
    meta: dict[str, Any] = {"parents": json_object(r["parents"])}
    if r["source"] is not None:
        meta["source"] = r["source"]
    if r["counters"] is not None:
        meta["counters_since_delta_snapshot"] = json_object(r["counters"])
    if r["delta_marked"]:
        meta["delta_writes_versioned"] = True
    return summarize(
        r["checkpoint_ns"],
        r["checkpoint_id"],
        r["parent_checkpoint_id"],
        meta,
        reads_parent_sends=r["v"] < 4,
        has_sends_writes=(tid, r["checkpoint_ns"], r["checkpoint_id"]) in sends,
        size=int(r["size"] or 0),
    )


def _with_keys(
    s: CheckpointSummary, keys: tuple[frozenset[str], frozenset[str]]
) -> CheckpointSummary:
    from dataclasses import replace

    return replace(s, inline_channels=keys[0], versioned_channels=keys[1])


def _aggregate_fingerprint(agg: ThreadAggregate) -> Fingerprint:
    return tuple(sorted((a.namespace, a.count, a.newest_id) for a in agg.namespaces))


def _fingerprint(summaries: Sequence[CheckpointSummary]) -> Fingerprint:
    by_ns: dict[str, list[str]] = defaultdict(list)
    for s in summaries:
        by_ns[s.namespace].append(s.checkpoint_id)
    return fingerprint_of(by_ns)
