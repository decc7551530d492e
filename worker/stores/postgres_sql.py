"""Every Postgres statement of this tool: the sweep engine's and the saver wrapper's.

The engine (`worker.stores.postgres`, asyncpg), its restore and vacuum
(`postgres_archive`, `postgres_reclaim`) and the `RetentionSaver` backend
(`worker.saver.postgres`, psycopg on the application's own connection) all
talk to the same tables: the saver's (`checkpoints`, `checkpoint_blobs`,
`checkpoint_writes`, `checkpoint_migrations`) and this tool's own. One module
holds all their SQL, as `langgraph-checkpoint-postgres` keeps its schema's
statements in its `base.py`, so that where the engine and the wrapper do the
same thing they share one text, and where they differ on purpose the two
statements stand side by side with the reason (section "the saver wrapper"):

- thread paging: the engine's walk unions `checkpoints`, `checkpoint_writes`
  and the expired-threads table; the wrapper's pages only `checkpoints`;
- trims: the engine's deletes no blob and collects unreferenced blobs later,
  on threads quiet and not deleted from within the grace period; the
  wrapper's one-statement delete frees them at once, as the official `prune`;
- expiry: the engine's leaves the thread's blobs for the grace period; the
  wrapper's deletes every row of the thread;
- placeholders: asyncpg's `$1` in the engine's, psycopg's `%s` / `%(name)s`
  in the wrapper's; a shared text is converted by `to_psycopg`.

Only SQL lives here, with what builds it (table names, templates, the
deleting statements' two shapes): no driver is imported, so the saver for a
Postgres app loads no asyncpg and `import worker` loads neither.
docs/architecture.md says where each statement runs; the engine's module
docstring argues why its deletes are safe beside a live application.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from textwrap import indent

from policies.waiting import TASKS
from worker.stores.engine import HOLDS_TABLE, RESIDUE_TABLE


def to_psycopg(sql: str) -> str:
    """An asyncpg statement (`$1`, `$2` in order, each once) with psycopg's `%s`."""
    return re.sub(r"\$\d+", "%s", sql)


# ---------------------------------------------------------------- the saver's tables

DATA_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")
"""The saver's tables that hold a thread's rows, a checkpoint's first."""

# What `langgraph-checkpoint-postgres` creates; `open` refuses a schema that
# lacks one (the saver's `setup()` never ran there) before any statement below
# meets a missing table.
REQUIRED_TABLES = (*DATA_TABLES, "checkpoint_migrations")
# Looked up in the store's own schema, not through search_path: the error then
# names the schema the config gave.
TABLES_SQL = """
SELECT table_name FROM information_schema.tables
WHERE table_schema = $1 AND table_name = ANY($2::text[])
"""
# The saver's schema version, checked against the range the engine knows
# (`MIN_MIGRATION`, `MAX_MIGRATION` in `worker.stores.postgres`).
MIGRATION_SQL = "SELECT max(v) FROM checkpoint_migrations"

# ---------------------------------------------------------------- this tool's own tables

# Each table's DDL and existence check is written out whole, though they look
# alike: a schema is read, and changed, one table at a time, as the README
# documents each ("Legal holds", "Residue", "Postgres stores").

# The tool's own table, beside `checkpoint_janitor_expired`: blobs carry no
# date and a deleted checkpoint leaves no row, so this dates each thread's
# latest deletion (trim or expiry). A fork that read a checkpoint before a
# sweep deleted it saves, after that sweep, a checkpoint naming the blob
# versions it read; so a thread's unreferenced blobs wait out the grace period
# after its last deletion (`worker.stores.postgres`'s docstring). One row per
# thread.
# Each of the tool's own tables (deletions, expired, holds, residue) has its own
# whole CREATE and existence probe: alike in shape, but DDL reads best whole.
DELETIONS_TABLE = "checkpoint_janitor_deletions"
CREATE_DELETIONS_TABLE_SQL = f"""
CREATE TABLE IF NOT EXISTS {DELETIONS_TABLE} (
    thread_id TEXT PRIMARY KEY,
    deleted_at TIMESTAMPTZ NOT NULL
)
"""
DELETIONS_TABLE_EXISTS_SQL = f"SELECT to_regclass('{DELETIONS_TABLE}') IS NOT NULL"

# The tool's own table, in the store's schema (the saver's tables have no
# place for it): blobs carry no date, so this dates each expiry; a thread's
# blobs outlive its expiry by the grace period (`worker.stores.postgres`'s
# docstring). `head_metadata` keeps what the policies matched the thread on.
# Alike in shape to the deletions table's statements above, on purpose (see there).
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
# which a batch that waited on the holds lock (`HOLDS_SHARED_LOCK_SQL`) has
# not refreshed, and it would miss the table a concurrent first `hold` just
# created. pg_class read with the statement's own snapshot sees every commit
# before the statement.
HOLDS_TABLE_EXISTS_SQL = f"""
SELECT EXISTS (
    SELECT 1 FROM pg_catalog.pg_class
    WHERE relname = '{HOLDS_TABLE}' AND relnamespace = current_schema()::regnamespace
)
"""

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

# ---------------------------------------------------------------- the sweep's lock

# Transaction ids are the cluster's commit counter (what `PRAGMA data_version` is to
# SQLite): read first in a batch, before it writes, this is one past the newest id that
# has ended; past the previous batch's own id + 1, another session wrote in between.
# The txid_* forms exist on every supported server (pg_current_snapshot needs 13).
SNAPSHOT_XMAX_SQL = "SELECT txid_snapshot_xmax(txid_current_snapshot())"
# The batch's own id, read last in its transaction (it has written, so it has one).
OWN_XID_SQL = "SELECT txid_current()"

# Session-level, so the lock dies with the connection (a killed worker frees
# it). Keyed per store name, so one replica sweeps a store at a time.
TRY_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtextextended('checkpoint-janitor:' || $1, 0))"
UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtextextended('checkpoint-janitor:' || $1, 0))"

# ---------------------------------------------------------------- reading and planning

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
# Once the tool's expired-threads table exists (section "blob GC: expired
# threads"), its threads join the walk: UNION drops those that still hold rows.
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

# The safety limit's base: threads with a checkpoint (the walk's writes-only
# and expired threads are not there for a policy to expire).
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
# A page's heads (thread, namespace, id arrays), each found by primary key.
_HEADS = """
FROM unnest($1::text[], $2::text[], $3::text[]) AS h(thread_id, checkpoint_ns, checkpoint_id)
JOIN checkpoints c
  ON c.thread_id = h.thread_id AND c.checkpoint_ns = h.checkpoint_ns
 AND c.checkpoint_id = h.checkpoint_id
"""
# Heads whose format (v < 4) makes waiting depend on the parent's writes.
OLD_HEADS_SQL = f"""
SELECT c.thread_id{_HEADS}WHERE COALESCE((c.checkpoint ->> 'v')::int, 4) < 4
"""
# A plan's `Detail`: how many of a namespace's ids sort below a bound, in
# code-point order like the bounds themselves, off the primary-key index.
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
HEADS_METADATA_SQL = f"""
SELECT c.thread_id, c.metadata{_HEADS}"""

# Which checkpoints hold sends for a v < 4 child; asked only for pages with one.
SENDS_WRITES_SQL = f"""
SELECT DISTINCT thread_id, checkpoint_ns, checkpoint_id FROM checkpoint_writes
WHERE thread_id = ANY($1::text[]) AND channel = '{TASKS}'
"""

# Writes no committed checkpoint has (yet): residue candidates, which go only
# once their thread is quiet for the grace period (invariant 5).
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

# A thread's shape, read before a batch's deletes and again after: a
# checkpoint committed in between changes a count or a newest id.
FINGERPRINT_SQL = """
SELECT thread_id, checkpoint_ns, count(*), max(checkpoint_id)
FROM checkpoints
WHERE thread_id = ANY($1::text[])
GROUP BY thread_id, checkpoint_ns
"""

# The residue cadence: when each policy's quiet threads were last all looked at.
RESIDUE_CHECKS_SQL = f"""
SELECT policy, extract(epoch FROM checked_at)::float8 FROM {RESIDUE_TABLE}
"""
RECORD_RESIDUE_CHECKS_SQL = f"""
INSERT INTO {RESIDUE_TABLE} (policy, checked_at)
SELECT p, to_timestamp($2) FROM unnest($1::text[]) AS p
ON CONFLICT (policy) DO UPDATE SET checked_at = EXCLUDED.checked_at
"""

# ---------------------------------------------------------------- stats and sizes

# `stats`: the statistics collector's counts, never count(*) over the tables.
STATS_TABLE_SQL = """
SELECT relname, n_live_tup, n_dead_tup, pg_total_relation_size(relid)
FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = ANY($2::text[])
"""
# Ids only (no JSONB): `AgeHistogram` dates each from its UUIDv6.
STATS_IDS_SQL = "SELECT checkpoint_ns, checkpoint_id FROM checkpoints"
# `stats`: the threads whose checkpoints weigh most, from row sizes (no detoast).
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

# ---------------------------------------------------------------- deleting

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
# one statement per batch, each row found by primary key. One builder for every
# table: the deletes differ only in the table, its alias and an added check.
def _by_ids(table: str, alias: str, check: str = "") -> str:
    """The DELETE (no RETURNING) of `table`'s rows the triples name, and `check`."""
    return f"""
    DELETE FROM {table} {alias}
    USING unnest($1::text[], $2::text[], $3::text[]) AS d(thread_id, checkpoint_ns, checkpoint_id)
    WHERE {alias}.thread_id = d.thread_id AND {alias}.checkpoint_ns = d.checkpoint_ns
      AND {alias}.checkpoint_id = d.checkpoint_id{check}"""


# Set-based trims delete each (thread, ns)'s ids below one bound (`TRIM_BOUNDS_SQL`).
def _below_bounds(table: str, alias: str, check: str = "") -> str:
    """The DELETE (no RETURNING) of `table`'s rows below each (thread, ns)'s bound, and `check`."""
    return f"""
    DELETE FROM {table} {alias}
    USING unnest($1::text[], $2::text[], $3::text[]) AS d(thread_id, checkpoint_ns, bound)
    WHERE {alias}.thread_id = d.thread_id AND {alias}.checkpoint_ns = d.checkpoint_ns
      AND {alias}.checkpoint_id COLLATE "C" < d.bound{check}"""


# A write's checkpoint, for `EXISTS` (keep writes whose checkpoint is not saved
# yet, invariant 5) and `NOT EXISTS` (orphaned writes): one definition of "its".
_WRITE_CHECKPOINT = """ (
          SELECT 1 FROM checkpoints c
          WHERE c.thread_id = w.thread_id AND c.checkpoint_ns = w.checkpoint_ns
            AND c.checkpoint_id = w.checkpoint_id
      )"""
_NS = ("thread_id", "checkpoint_ns")

DELETE_WRITES = _deleting("checkpoint_writes", "w", _by_ids("checkpoint_writes", "w"), _NS)
DELETE_WRITES_SQL = DELETE_WRITES.count
DELETE_CHECKPOINTS = _deleting("checkpoints", "c", _by_ids("checkpoints", "c"), _NS)
DELETE_CHECKPOINTS_SQL = DELETE_CHECKPOINTS.count
# Parent nulling returns each changed row's old parent (the archive's
# `nulled_parents`). Postgres before 18 has no `OLD` in RETURNING, so the rows
# are read and locked (FOR UPDATE) in a subquery first: what it read is what
# the UPDATE overwrites, whatever commits meanwhile. `{locked}`: which rows.
_NULLED = """
UPDATE checkpoints c SET parent_checkpoint_id = NULL
FROM (
    SELECT k.thread_id, k.checkpoint_ns, k.checkpoint_id, k.parent_checkpoint_id
    FROM checkpoints k{locked}
    FOR UPDATE OF k
) o
WHERE c.thread_id = o.thread_id AND c.checkpoint_ns = o.checkpoint_ns
  AND c.checkpoint_id = o.checkpoint_id
RETURNING c.thread_id, c.checkpoint_ns, c.checkpoint_id, o.parent_checkpoint_id
"""


def _parent_row(child: str, pad: str) -> str:
    """`(SELECT 1 ...)`: the parent row of checkpoint `child`, for EXISTS / NOT EXISTS."""
    return f""" (
{pad}    SELECT 1 FROM checkpoints p
{pad}    WHERE p.thread_id = {child}.thread_id AND p.checkpoint_ns = {child}.checkpoint_ns
{pad}      AND p.checkpoint_id = {child}.parent_checkpoint_id
{pad})"""


# Grouped per namespace so each namespace's remaining rows are read once,
# not once per deleted id (parent_checkpoint_id has no index).
NULL_PARENTS_SQL = _NULLED.format(
    locked="""
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
    WHERE k.thread_id = ANY($1::text[]) AND k.parent_checkpoint_id IS NOT NULL
      AND NOT EXISTS"""
    + _parent_row("k", "      ")
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
    JOIN unnest($1::text[], $2::text[], $3::text[]) AS d(thread_id, checkpoint_ns, bound)
      ON k.thread_id = d.thread_id AND k.checkpoint_ns = d.checkpoint_ns
    WHERE k.checkpoint_id COLLATE "C" >= d.bound AND k.parent_checkpoint_id COLLATE "C" < d.bound
      AND EXISTS"""
    + _parent_row("k", "      ")
)
# The writes of the checkpoints these trims delete, by the same ranges; the
# EXISTS keeps a write whose checkpoint is not (yet) saved (invariant 5).
TRIM_WRITES = _deleting(
    "checkpoint_writes",
    "w",
    _below_bounds("checkpoint_writes", "w", "\n      AND EXISTS" + _WRITE_CHECKPOINT),
    _NS,
)
TRIM_WRITES_SQL = TRIM_WRITES.count
TRIM_CHECKPOINTS = _deleting("checkpoints", "c", _below_bounds("checkpoints", "c"), _NS, sized=True)
TRIM_CHECKPOINTS_SQL = TRIM_CHECKPOINTS.count
# Dry runs: the ids a trim range names (few: a plan's count), to count as the
# statements above would delete them.
RANGE_IDS_SQL = """
SELECT checkpoint_id FROM checkpoints
WHERE thread_id = $1 AND checkpoint_ns = $2 AND checkpoint_id COLLATE "C" < $3
ORDER BY checkpoint_id COLLATE "C" OFFSET $4
"""

# Dry runs: the bytes of the checkpoints a trim names, as the capturing
# delete's size column would report them.
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
    _by_ids("checkpoint_writes", "w", "\n      AND NOT EXISTS" + _WRITE_CHECKPOINT),
    _NS,
)
DELETE_ORPHAN_WRITES_SQL = DELETE_ORPHAN_WRITES.count
# A whole thread, table by table (a policy's expiry skips "blobs": see the docstring).
EXPIRE = {
    kind: _deleting(
        table,
        alias,
        f"    DELETE FROM {table} {alias} WHERE {alias}.thread_id = ANY($1::text[])",
        ("thread_id",),
        sized=kind == "checkpoints",
    )
    for kind, table, alias in (
        ("checkpoints", "checkpoints", "c"),
        ("writes", "checkpoint_writes", "w"),
        ("blobs", "checkpoint_blobs", "b"),
    )
}
EXPIRE_SQL = {kind: d.count for kind, d in EXPIRE.items()}

# Dry runs count what the statements above would delete.
_COUNT_BY_IDS = """
SELECT {a}.thread_id, {a}.checkpoint_ns, count(*) FROM {table} {a}
JOIN unnest($1::text[], $2::text[], $3::text[]) AS d(thread_id, checkpoint_ns, checkpoint_id)
  ON {a}.thread_id = d.thread_id AND {a}.checkpoint_ns = d.checkpoint_ns
 AND {a}.checkpoint_id = d.checkpoint_id
GROUP BY 1, 2
"""
COUNT_CHECKPOINTS_SQL = _COUNT_BY_IDS.format(table="checkpoints", a="c")
COUNT_WRITES_SQL = _COUNT_BY_IDS.format(table="checkpoint_writes", a="w")
COUNT_THREAD_SQL = {
    "checkpoints": "SELECT thread_id, count(*), "
    "sum(pg_column_size(checkpoint) + pg_column_size(metadata)) FROM checkpoints "
    "WHERE thread_id = ANY($1::text[]) GROUP BY 1",
    "writes": "SELECT thread_id, count(*) FROM checkpoint_writes "
    "WHERE thread_id = ANY($1::text[]) GROUP BY 1",
    "blobs": "SELECT thread_id, count(*) FROM checkpoint_blobs "
    "WHERE thread_id = ANY($1::text[]) GROUP BY 1",
}

# ---------------------------------------------------------------- blob GC: dated deletions

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
# A blob `b` no reference in `refs` names: one definition for the collecting
# statement and the two that ask what it would collect.
_UNREFERENCED = """  AND NOT EXISTS (
      SELECT 1 FROM refs r
      WHERE r.thread_id = b.thread_id AND r.checkpoint_ns = b.checkpoint_ns
        AND r.channel = b.channel AND r.version = b.version
  )"""
DELETE_GARBAGE_BLOBS = {
    dated: _deleting("checkpoint_blobs", "b", core, ("thread_id",), ctes=_GARBAGE_REFS)
    for dated, core in _dated(
        """
    DELETE FROM checkpoint_blobs b
    WHERE b.thread_id = ANY($1::text[])
"""
        + indent(_UNREFERENCED, "    ")
        + "{recent}",
        "$2",
    ).items()
}
DELETE_GARBAGE_BLOBS_SQL = {dated: d.count for dated, d in DELETE_GARBAGE_BLOBS.items()}
# Which quiet threads hold blobs the statement above would collect (left by
# trims made while the thread was busy or within the grace period), and how
# many: they get a sweep part of their own, sized in blobs (the batch's cost
# is the blob rows it deletes, a thread can hold thousands). Counted in the
# same anti-join DISTINCT would need. Both plans (rows and aggregates) ask this.
GARBAGE_BLOB_THREADS_SQL = _dated(
    f"""
WITH {_GARBAGE_REFS}
SELECT b.thread_id, count(*) FROM checkpoint_blobs b
WHERE b.thread_id = ANY($1::text[])
{_UNREFERENCED}{{recent}}
GROUP BY 1
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
"""
    + _UNREFERENCED
    + """{recent}
GROUP BY 1
""",
    "$5",
)

# ---------------------------------------------------------------- blob GC: expired threads

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
# An empty thread of a page may be an expired one waiting out its blobs: its
# row keeps the date and the head's metadata the policies match on.
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
# Which expired threads' blobs are due: expired before the cutoff, no checkpoint
# and no write (the thread did not come back). One definition for the delete
# and the dry run's count of it.
_EXPIRED_DUE = """e.thread_id = ANY($1::text[]) AND e.expired_at < to_timestamp($2)
  AND NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.thread_id = e.thread_id)
  AND NOT EXISTS (SELECT 1 FROM checkpoint_writes w WHERE w.thread_id = e.thread_id)"""
DELETE_EXPIRED_BLOBS = _deleting(
    "checkpoint_blobs",
    "b",
    """
    DELETE FROM checkpoint_blobs b USING due
    WHERE b.thread_id = due.thread_id""",
    ("thread_id",),
    ctes=f"""due AS (
    DELETE FROM {EXPIRED_TABLE} e
    WHERE {indent(_EXPIRED_DUE, "    ").lstrip()}
    RETURNING e.thread_id
)""",
)
DELETE_EXPIRED_BLOBS_SQL = DELETE_EXPIRED_BLOBS.count
COUNT_EXPIRED_BLOBS_SQL = f"""
SELECT b.thread_id, count(*) FROM checkpoint_blobs b
JOIN {EXPIRED_TABLE} e ON e.thread_id = b.thread_id
WHERE {_EXPIRED_DUE}
GROUP BY 1
"""
# A purge names the thread for erasure: its row goes with its blobs.
FORGET_EXPIRED_SQL = f"DELETE FROM {EXPIRED_TABLE} WHERE thread_id = ANY($1::text[])"
# `stats`: expired threads not recreated and the blobs they still hold.
EXPIRED_STATS_SQL = f"""
SELECT count(DISTINCT e.thread_id), count(b.thread_id) FROM {EXPIRED_TABLE} e
LEFT JOIN checkpoint_blobs b ON b.thread_id = e.thread_id
WHERE NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.thread_id = e.thread_id)
"""

# ---------------------------------------------------------------- legal holds

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

# ---------------------------------------------------------------- archive and restore

# The store's own column types (search_path is the store's schema), so each
# archived column is cast to what the table holds: jsonb from its text, bytea
# from the BLOB, integer idx; whatever migration the table is at.
COLUMN_TYPES_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
"""
# One array parameter per column, unnested into rows. No conflict target: any
# unique key the saver's table has (its primary key) makes an existing row win.
RESTORE_ROWS_TEMPLATE = """
INSERT INTO {table} ({columns})
SELECT * FROM unnest({arrays})
ON CONFLICT DO NOTHING
RETURNING thread_id
"""
# Which archived keys are (EXISTS) or are not (NOT EXISTS) in the table now,
# counted per thread: the dry run counts what a restore would insert, and
# recovery asks whether a pending segment's delete committed.
KEYS_PRESENT_TEMPLATE = """
SELECT k.thread_id, count(*)
FROM unnest({arrays}) AS k({keys})
WHERE {exists} (SELECT 1 FROM {table} t WHERE {match})
GROUP BY 1
"""
# The nulled parents a segment holds (child thread, ns, id and its old parent).
_NULLED_ROWS = """
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
     AS n(thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id)"""
# Only where the child is still there with no parent, and the parent row is
# back: a checkpoint the application re-parented, or a parent the restore did
# not bring (not selected, or never archived), is left as it is.
RELINK_PARENTS_SQL = f"""
UPDATE checkpoints c SET parent_checkpoint_id = n.parent_checkpoint_id{_NULLED_ROWS}
WHERE c.thread_id = n.thread_id AND c.checkpoint_ns = n.checkpoint_ns
  AND c.checkpoint_id = n.checkpoint_id AND c.parent_checkpoint_id IS NULL
  AND EXISTS{_parent_row("n", "  ")}
RETURNING c.thread_id
"""
# The dry run's count of the same re-links: parents the restore would insert
# count too, so it is asked with the keys the restore brings (`$5..$7`).
COUNT_RELINKS_SQL = f"""
SELECT n.thread_id, count(*){_NULLED_ROWS}
JOIN checkpoints c
  ON c.thread_id = n.thread_id AND c.checkpoint_ns = n.checkpoint_ns
 AND c.checkpoint_id = n.checkpoint_id AND c.parent_checkpoint_id IS NULL
WHERE EXISTS{_parent_row("n", "  ")}
   OR (n.thread_id, n.checkpoint_ns, n.parent_checkpoint_id) IN (
      SELECT * FROM unnest($5::text[], $6::text[], $7::text[])
  )
GROUP BY 1
"""
# A pending segment that holds only parent nullings: committed if the parents
# are NULL now, not if they still name the archived parent.
PARENTS_STILL_LINKED_SQL = f"""
SELECT count(*){_NULLED_ROWS}
JOIN checkpoints c
  ON c.thread_id = n.thread_id AND c.checkpoint_ns = n.checkpoint_ns
 AND c.checkpoint_id = n.checkpoint_id AND c.parent_checkpoint_id = n.parent_checkpoint_id
"""

# ---------------------------------------------------------------- reclaim

# The statistics collector's counts, not count(*): reading a 100M-row table
# to decide whether to vacuum it would cost more than the vacuum.
# pg_table_size includes TOAST (where checkpoint JSONB lives) but not indexes.
TABLE_SPACE_SQL = """
SELECT s.relname, s.n_live_tup, s.n_dead_tup,
       pg_table_size(s.relid), pg_indexes_size(s.relid),
       s.vacuum_count, s.autovacuum_count, s.last_vacuum, s.last_autovacuum
FROM pg_stat_user_tables s
WHERE s.schemaname = $1 AND s.relname = ANY($2::text[])
"""
# VACUUM cannot run inside a transaction block; asyncpg sends an argument-less
# statement as a simple query outside one. Names come from
# `postgres_reclaim.TABLES` and the store's validated schema identifier, never
# from input.
VACUUM_SQL = 'VACUUM (ANALYZE) "{schema}"."{table}"'
VACUUM_FULL_SQL = 'VACUUM (FULL, ANALYZE) "{schema}"."{table}"'
# A VACUUM FULL waiting for its lock queues every later reader of the table
# behind it: wait at most the store's lock_timeout, then give up.
SET_LOCK_TIMEOUT_SQL = "SELECT set_config('lock_timeout', $1, false)"
RESET_LOCK_TIMEOUT_SQL = "RESET lock_timeout"
# Named in the one-line refusal when VACUUM skipped a table for privileges.
CURRENT_USER_SQL = "SELECT current_user"
# A backend keeps its table counts (a DELETE's dead tuples) pending and
# reports them at most once a second, else after 10 s idle or at exit: when a
# sweep ends, its sessions often hold their last batches' counts. A VACUUM
# that runs first sets n_dead_tup to what it found (none), then the late
# report adds the deletions back (issue 12: 1.7 GiB "reclaimable" in tables
# holding no dead tuple). pg_stat_force_next_flush() (PostgreSQL 15+, PUBLIC)
# makes this very statement's end report everything pending, before the
# answer comes back, so the counts are in before the VACUUM starts.
FORCE_STATS_FLUSH_SQL = "SELECT pg_stat_force_next_flush()"
# Before PostgreSQL 15 a backend reports at the end of any transaction that
# ends 500 ms (PGSTAT_STAT_INTERVAL) after its last report, and never when
# idle: an empty statement after that wait is the report.
REPORT_STATS_SQL = "SELECT 1"

# ---------------------------------------------------------------- the saver wrapper (psycopg)

# `RetentionSaver`'s Postgres backend (`worker.saver.postgres`). psycopg (`%s`,
# `%(name)s`), not asyncpg: these run on the saver's own connection, inside the
# application, usually on the write path of the thread they touch. Each names
# its engine counterpart above and says why the two differ; where they must not
# differ (what counts as a channel with a value, holds) they share the text.

# The wrapper's scan of one thread. Engine counterpart: `SCAN_SQL`, a page of
# threads at once, which reads `v` and the row size from every checkpoint (the
# sweep runs beside the application and needs sizes for size caps); here,
# metadata only, not the checkpoint JSONB (reading `v` or `ts` would detoast
# every row): the format version matters only for a checkpoint whose parent
# holds `__pregel_tasks` writes (v < 4 reads its pending sends there), so it is
# read just for those, as the official prune's heads query does. The per-row
# probes (primary-key prefix lookups) run only when the thread has such a
# write at all (`s.sends`, evaluated once; CASE guarantees the order), which
# threads without `Send` never do.
PG_SCAN_SQL = f"""
SELECT c.checkpoint_ns, c.checkpoint_id, c.parent_checkpoint_id, c.metadata,
       CASE WHEN s.sends AND EXISTS (
           SELECT 1 FROM checkpoint_writes w
           WHERE w.thread_id = c.thread_id AND w.checkpoint_ns = c.checkpoint_ns
             AND w.checkpoint_id = c.parent_checkpoint_id AND w.channel = '{TASKS}'
       ) THEN COALESCE((c.checkpoint ->> 'v')::int, 4) END AS v,
       CASE WHEN s.sends THEN EXISTS (
           SELECT 1 FROM checkpoint_writes w
           WHERE w.thread_id = c.thread_id AND w.checkpoint_ns = c.checkpoint_ns
             AND w.checkpoint_id = c.checkpoint_id AND w.channel = '{TASKS}'
       ) ELSE false END AS has_sends
FROM checkpoints c,
     (SELECT EXISTS (
         SELECT 1 FROM checkpoint_writes WHERE thread_id = %(thread)s AND channel = '{TASKS}'
     ) AS sends) s
WHERE c.thread_id = %(thread)s
"""
# The `ts` of checkpoints whose id carries no time (not UUIDv6): rare, so apart.
PG_TS_SQL = """
SELECT checkpoint_ns, checkpoint_id, checkpoint ->> 'ts' AS ts FROM checkpoints
WHERE thread_id = %s AND checkpoint_id = ANY(%s)
"""
# The engine's statement (`CHANNEL_KEYS_TEMPLATE`) with psycopg's placeholder:
# one rule for what counts as a channel with a value. Delta threads only.
PG_CHANNEL_KEYS_SQL = CHANNEL_KEYS_TEMPLATE.replace("{thread}", "%s")
# One statement deletes the decided checkpoints of a thread (any namespaces)
# with everything that goes with them, so it is atomic without a transaction
# block and costs one round trip on the application's write path:
# - writes by the ids of the checkpoints deleted, never by "no checkpoint has
#   this id" (a run may save a superstep's writes before their checkpoint);
# - kept checkpoints whose parent went get none (as the official prune);
# - blob versions the deleted checkpoints referenced and no other checkpoint
#   of their namespace does (`kept` reads the statement's snapshot less the
#   deleted ids), at once, as the official prune does. The window left is
#   wider than this statement: a fork (`update_state`) that read a deleted
#   checkpoint before it and saves after it names blob versions this freed
#   (`aput` rewrites only changed channels) and reads back without them. The
#   worker closes it by dating deletions (`worker.stores.postgres`'s docstring,
#   "Blobs are the hard part"); here the trim runs inside the application, typically on the
#   thread's own write path, and keeping freed blobs would need that table and
#   a later sweep, so the window is documented (README, RetentionSaver).
# Different from the engine on purpose: its counterpart, the sweep's trim
# (`TRIM_WRITES` / `TRIM_CHECKPOINTS`, `DELETE_WRITES` / `DELETE_CHECKPOINTS`
# with `NULL_PARENTS_SQL`, section "deleting"), deletes no blob;
# `DELETE_GARBAGE_BLOBS` (section "blob GC") collects them later, on threads
# quiet for the grace period and not deleted from within it.
# The UPDATE and the DELETE touch disjoint rows of `checkpoints`.
PG_DELETE_SQL = """
WITH d AS (
    SELECT * FROM unnest(%(ns)s::text[], %(ids)s::text[]) AS d(checkpoint_ns, checkpoint_id)
), gone AS (
    DELETE FROM checkpoints c USING d
    WHERE c.thread_id = %(thread)s
      AND c.checkpoint_ns = d.checkpoint_ns AND c.checkpoint_id = d.checkpoint_id
    RETURNING c.checkpoint_ns, c.checkpoint -> 'channel_versions' AS versions
), writes AS (
    DELETE FROM checkpoint_writes w USING d
    WHERE w.thread_id = %(thread)s
      AND w.checkpoint_ns = d.checkpoint_ns AND w.checkpoint_id = d.checkpoint_id
    RETURNING 1
), parents AS (
    UPDATE checkpoints c SET parent_checkpoint_id = NULL
    WHERE c.thread_id = %(thread)s
      AND (c.checkpoint_ns, c.parent_checkpoint_id) IN (SELECT * FROM d)
      AND (c.checkpoint_ns, c.checkpoint_id) NOT IN (SELECT * FROM d)
    RETURNING 1
), freed AS (
    SELECT gone.checkpoint_ns, v.key AS channel, v.value AS version
    FROM gone CROSS JOIN LATERAL jsonb_each_text(gone.versions) AS v
), kept AS (
    SELECT c.checkpoint_ns, v.key AS channel, v.value AS version
    FROM checkpoints c
    CROSS JOIN LATERAL jsonb_each_text(c.checkpoint -> 'channel_versions') AS v
    WHERE c.thread_id = %(thread)s
      AND c.checkpoint_ns IN (SELECT checkpoint_ns FROM d)
      AND (c.checkpoint_ns, c.checkpoint_id) NOT IN (SELECT * FROM d)
), blobs AS (
    DELETE FROM checkpoint_blobs b
    USING (SELECT * FROM freed EXCEPT SELECT * FROM kept) g
    WHERE b.thread_id = %(thread)s AND b.checkpoint_ns = g.checkpoint_ns
      AND b.channel = g.channel AND b.version = g.version
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS checkpoints, (SELECT count(*) FROM writes) AS writes,
       (SELECT count(*) FROM blobs) AS blobs
"""
# The expiry's re-check, before and after its deletes. Engine counterpart:
# `FINGERPRINT_SQL`, count and newest id per namespace, since a sweep batch may
# hold only some of a thread's trims; the wrapper's expiry takes the whole
# thread in one transaction, so the thread's count and newest id suffice.
PG_STAMP_SQL = (
    "SELECT count(*) AS n, max(checkpoint_id) AS newest FROM checkpoints WHERE thread_id = %s"
)
# Whole-thread deletes, in the official prune's order (checkpoints, blobs,
# writes). Engine counterpart: `EXPIRE`, whose policy expiry skips `blobs` and
# dates the thread in `checkpoint_janitor_expired` instead, leaving its blobs
# for the grace period (a run in flight recreates the thread from them); the
# wrapper's expiry and explicit deletions free them at once, as the official
# `delete_thread` does, and its expiry re-checks `PG_STAMP_SQL` around them.
# Every Postgres statement here returns rows, counts included: in pipeline
# mode a statement's results (and rowcount) exist only once fetched.
PG_DELETE_THREADS_SQL = tuple(
    f"WITH gone AS (DELETE FROM {table} WHERE thread_id = ANY(%s) RETURNING 1) "
    "SELECT count(*) AS n FROM gone"
    for table in ("checkpoints", "checkpoint_blobs", "checkpoint_writes")
)
# `metadata ->> 'run_id'` has no index: one pass over the table, then per thread.
PG_RUN_THREADS_SQL = (
    "SELECT DISTINCT thread_id FROM checkpoints WHERE metadata ->> 'run_id' = ANY(%s)"
)
# Ordered and compared by the database alike (in the column's collation, so
# the primary key serves it); the first page has no lower bound, for the empty id.
# Only `checkpoints`, unlike the engine's walk (`WALK_SQL`, which
# unions `checkpoint_writes` and the expired-threads table): its one caller,
# `delete_checkpoints(before=...)`, deletes checkpoints, so a thread holding
# only orphaned writes or expired blobs has nothing for it; those are the sweep's.
PG_FIRST_THREAD_PAGE_SQL = """
SELECT DISTINCT thread_id FROM checkpoints ORDER BY thread_id LIMIT %s
"""
PG_THREAD_PAGE_SQL = """
SELECT DISTINCT thread_id FROM checkpoints WHERE thread_id > %s ORDER BY thread_id LIMIT %s
"""

# The worker's holds statements, lock included, so a hold placed through the
# wrapper orders against the worker's batches exactly as the CLI's does. Only
# the read differs: the wrapper caches every held id at once (`PG_HELD_SQL`),
# where the engine lists holds in pages with their reason and time
# (`HOLDS_FIRST_PAGE_SQL`) and a batch asks only about its own threads
# (`HELD_AMONG_SQL`, under the shared holds lock).
PG_HOLDS_TABLE_EXISTS_SQL = HOLDS_TABLE_EXISTS_SQL
PG_HELD_SQL = f"SELECT thread_id FROM {HOLDS_TABLE}"
PG_HOLDS_LOCK_SQL = HOLDS_LOCK_SQL
PG_CREATE_HOLDS_TABLE_SQL = CREATE_HOLDS_TABLE_SQL
PG_INSERT_HOLD_SQL = to_psycopg(INSERT_HOLD_SQL)
PG_DELETE_HOLD_SQL = to_psycopg(DELETE_HOLD_SQL)
