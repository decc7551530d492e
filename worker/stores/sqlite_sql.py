"""Every SQLite statement of this tool: the sweep engine's and the saver wrapper's.

The engine (`worker.stores.sqlite`, aiosqlite), its vacuum
(`worker.stores.sqlite_reclaim`) and the `RetentionSaver` backend
(`worker.saver.sqlite`, on the application's own sqlite3 or aiosqlite
connection) all talk to the same tables: the saver's (`checkpoints`,
`writes`) and this tool's own. One module holds all their SQL, as
`worker.stores.postgres_sql` does for Postgres, so that
where the engine and the wrapper do the same thing they share one text (the
deletes by decided ids, the parent nulling, a thread's expiry, the blob read,
the holds), and where they differ on purpose the two statements stand side by
side with the reason (section "the saver wrapper"):

- thread paging: the engine's walk unions `checkpoints` and `writes`; the
  wrapper's pages only `checkpoints`;
- the scan: the engine's reads a page of threads with each row's size; the
  wrapper's reads one thread, metadata only;
- the re-check: the engine's fingerprints count and newest id per namespace;
  the wrapper's expiry takes the whole thread, so per thread;
- reading holds: the engine's asks about a batch's threads, or lists holds in
  pages; the wrapper's caches every held id at once.
- whole-thread deletes: the engine counts and sizes the rows first, for its
  report; the wrapper takes the deletes' own row counts.

SQLite stores no blobs apart (channel values are inline in the checkpoint),
so unlike Postgres no trim or expiry has blobs to keep or free. The
archive's statements (the deletes that return their rows, the copies into a
segment, the recovery probes) are here too, in "archive and restore"; the
engine pairs the copies with the image tables they fill.

Only SQL lives here, with what builds it (templates, fragments): no driver is
imported, so the saver backend need not import the engine. Limits and
page sizes stay with the code that uses them. docs/architecture.md says where
each statement runs.
"""

from __future__ import annotations

from worker.stores.engine import HOLDS_TABLE, RESIDUE_TABLE

# ---------------------------------------------------------------- the saver's tables

# What `langgraph-checkpoint-sqlite` creates and the statements below name;
# `open` refuses a file whose tables lack one (not a checkpoint store, or the
# saver's `setup()` never ran there) before a statement meets it.
REQUIRED_COLUMNS = {
    "checkpoints": {
        "thread_id",
        "checkpoint_ns",
        "checkpoint_id",
        "parent_checkpoint_id",
        "type",
        "checkpoint",
        "metadata",
    },
    "writes": {"thread_id", "checkpoint_ns", "checkpoint_id", "task_id", "idx", "channel"},
}

# A table-valued pragma: a missing table gives no rows rather than an error.
TABLE_COLUMNS_SQL = "SELECT name FROM pragma_table_info(?)"

# ---------------------------------------------------------------- reading and planning

# Both tables' keyset pages merged in one statement (threads with only orphaned
# writes have no checkpoint row), so the database alone orders and compares ids
# and the cursor is the last id in its own order. Each branch is limited before
# the UNION, so it steps its primary-key index instead of sorting everything
# past the cursor. BINARY collation is code-point order, so a prefix is the
# exact range `prefix <= id < prefix_upper_bound(prefix)`; a walk of every
# thread is the prefix "", and `>= ''` is no bound at all (the empty id included).
_THREADS_PAGE_TEMPLATE = """
SELECT thread_id FROM (
    SELECT DISTINCT thread_id FROM checkpoints WHERE {where} ORDER BY thread_id LIMIT :n
)
UNION
SELECT thread_id FROM (
    SELECT DISTINCT thread_id FROM writes WHERE {where} ORDER BY thread_id LIMIT :n
)
ORDER BY thread_id LIMIT :n
"""
THREADS_PAGE_SQL = {
    # (first page of the walk, the prefix has an upper bound) -> statement
    (True, False): _THREADS_PAGE_TEMPLATE.format(where="thread_id >= :low"),
    (True, True): _THREADS_PAGE_TEMPLATE.format(where="thread_id >= :low AND thread_id < :high"),
    (False, False): _THREADS_PAGE_TEMPLATE.format(where="thread_id > :after"),
    (False, True): _THREADS_PAGE_TEMPLATE.format(where="thread_id > :after AND thread_id < :high"),
}

# Threads with a checkpoint, counted from the primary-key index's leading column.
COUNT_THREADS_SQL = "SELECT COUNT(DISTINCT thread_id) FROM checkpoints"

# A page of thread ids of both tables by a loose index scan: each step is one
# primary-key seek to the next distinct id, so a page costs its threads, not
# their rows (the aggregate below reads those rows' index entries once).
_LOOSE_PAGE_TEMPLATE = """
WITH RECURSIVE
c(id) AS (
    SELECT (SELECT min(thread_id) FROM checkpoints WHERE thread_id {op} :after)
    UNION ALL
    SELECT (SELECT min(thread_id) FROM checkpoints WHERE thread_id > c.id) FROM c
    WHERE c.id IS NOT NULL LIMIT :n
),
w(id) AS (
    SELECT (SELECT min(thread_id) FROM writes WHERE thread_id {op} :after)
    UNION ALL
    SELECT (SELECT min(thread_id) FROM writes WHERE thread_id > w.id) FROM w
    WHERE w.id IS NOT NULL LIMIT :n
)
SELECT id FROM c WHERE id IS NOT NULL
UNION
SELECT id FROM w WHERE id IS NOT NULL
ORDER BY id LIMIT :n
"""
LOOSE_PAGE_SQL = {
    # first page (no lower bound: the empty id too) -> statement
    True: _LOOSE_PAGE_TEMPLATE.format(op=">="),
    False: _LOOSE_PAGE_TEMPLATE.format(op=">"),
}

# What `policies.plan` decides from, read from the primary-key index alone
# (a covering scan: no row is read, and no per-row expression is computed).
AGGREGATE_SQL = """
SELECT thread_id, checkpoint_ns, count(*), min(checkpoint_id), max(checkpoint_id)
FROM checkpoints
WHERE thread_id >= :first AND thread_id <= :last
GROUP BY thread_id, checkpoint_ns
"""

# Ids that are not canonical lowercase UUIDv6 (`policies.plan.is_regular_id`),
# whose text order is not their time order: counted (from the index) only for
# the threads a plan would delete from.
_HEX = "[0-9a-f]"
_REGULAR_ID_GLOB = _HEX * 8 + "-" + _HEX * 4 + "-6" + _HEX * 3 + "-*"
IRREGULAR_IDS_SQL = f"""
SELECT thread_id, checkpoint_ns,
       sum(length(checkpoint_id) <> 36 OR checkpoint_id NOT GLOB '{_REGULAR_ID_GLOB}')
FROM checkpoints
WHERE thread_id IN (SELECT value FROM json_each(?))
GROUP BY thread_id, checkpoint_ns
"""

# The heads' metadata, found by primary key ([thread, ns, id] triples).
HEAD_METADATA_SQL = """
SELECT c.thread_id, CAST(c.metadata AS TEXT)
FROM json_each(?) AS k
JOIN checkpoints c
  ON c.thread_id = json_extract(k.value, '$[0]') AND c.checkpoint_ns = json_extract(k.value, '$[1]')
 AND c.checkpoint_id = json_extract(k.value, '$[2]')
"""

# Threads with a DeltaChannel marker in any checkpoint's metadata: the same
# substring test `_summary` makes before parsing (a false positive only sends
# the thread to the row-level path).
MARKED_THREADS_SQL = """
SELECT DISTINCT thread_id FROM checkpoints
WHERE thread_id IN (SELECT value FROM json_each(?))
AND (instr(CAST(metadata AS TEXT), 'counters_since_delta_snapshot') > 0
     OR instr(CAST(metadata AS TEXT), 'delta_writes_versioned') > 0)
"""

# An index range count: how many checkpoints a time bound would reach.
COUNT_BELOW_SQL = """
SELECT count(*) FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id < ?
"""

# Metadata is JSON text in a BLOB column. SQLite's JSON functions cost more
# per row than the rest of the scan, so the text comes back whole and Python
# parses only the rows that need it (see `_summaries`).
SCAN_SQL = """
SELECT thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id,
       COALESCE(length(checkpoint), 0) + COALESCE(length(metadata), 0),
       CAST(metadata AS TEXT)
FROM checkpoints
WHERE thread_id IN (SELECT value FROM json_each(?))
"""

# Writes whose checkpoint is not (yet) saved: a crashed run's, or a live
# run's whose checkpoint commits after them. `decide` tells them apart by age.
ORPHAN_WRITES_SQL = """
SELECT DISTINCT w.thread_id, w.checkpoint_ns, w.checkpoint_id
FROM writes w
WHERE w.thread_id IN (SELECT value FROM json_each(?))
AND NOT EXISTS (
    SELECT 1 FROM checkpoints c
    WHERE c.thread_id = w.thread_id AND c.checkpoint_ns = w.checkpoint_ns
    AND c.checkpoint_id = w.checkpoint_id
)
"""

# One thread's checkpoint blobs, for the row-level path alone (delta threads,
# ids that carry no time): the scan never reads a blob.
THREAD_BLOBS_SQL = """
SELECT checkpoint_ns, checkpoint_id, type, checkpoint FROM checkpoints WHERE thread_id = ?
"""

# The heads of a page's expiry candidates, named as [thread, ns, id] triples.
HEAD_BLOBS_SQL = """
SELECT c.thread_id, c.type, c.checkpoint
FROM json_each(?) AS k
JOIN checkpoints c
  ON c.thread_id = json_extract(k.value, '$[0]') AND c.checkpoint_ns = json_extract(k.value, '$[1]')
 AND c.checkpoint_id = json_extract(k.value, '$[2]')
"""
HEAD_WRITE_CHANNELS_SQL = """
SELECT w.thread_id, w.channel
FROM json_each(?) AS k
JOIN writes w
  ON w.thread_id = json_extract(k.value, '$[0]') AND w.checkpoint_ns = json_extract(k.value, '$[1]')
 AND w.checkpoint_id = json_extract(k.value, '$[2]')
"""

# One checkpoint's blob by primary key: the `ts` of an id that carries no time.
CHECKPOINT_BLOB_SQL = """
SELECT type, checkpoint FROM checkpoints
WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id = ?
"""


# The same shape the scan fingerprints, read again under the write lock.
FINGERPRINT_SQL = """
SELECT thread_id, checkpoint_ns, COUNT(*), MAX(checkpoint_id)
FROM checkpoints
WHERE thread_id IN (SELECT value FROM json_each(?))
GROUP BY thread_id, checkpoint_ns
"""

# ---------------------------------------------------------------- deleting

# By the ids decided, never by "no checkpoint has this id": a run may save a
# superstep's writes before their checkpoint.
DELETE_WRITES_SQL = """
DELETE FROM writes
WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id IN (SELECT value FROM json_each(?))
"""
DELETE_CHECKPOINTS_SQL = """
DELETE FROM checkpoints
WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id IN (SELECT value FROM json_each(?))
"""
# As the official `prune`: a kept checkpoint whose parent went has none.
NULL_PARENTS_SQL = """
UPDATE checkpoints SET parent_checkpoint_id = NULL
WHERE thread_id = ? AND checkpoint_ns = ?
AND parent_checkpoint_id IN (SELECT value FROM json_each(?))
"""
# Re-checked under the write lock: the checkpoint may have committed since.
DELETE_ORPHAN_WRITES_SQL = """
DELETE FROM writes
WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id IN (SELECT value FROM json_each(?))
AND NOT EXISTS (
    SELECT 1 FROM checkpoints c
    WHERE c.thread_id = writes.thread_id AND c.checkpoint_ns = writes.checkpoint_ns
    AND c.checkpoint_id = writes.checkpoint_id
)
"""
# A whole thread goes, writes included: nothing of an expired thread is kept
# (SQLite has no blobs apart to wait out a grace period).
EXPIRE_WRITES_SQL = "DELETE FROM writes WHERE thread_id = ?"
EXPIRE_CHECKPOINTS_SQL = "DELETE FROM checkpoints WHERE thread_id = ?"

# Many whole threads per statement, counted first by one grouped read per
# table under the same write lock: a row per thread, where RETURNING handed
# Python a row per deleted row (1.5M at 1M checkpoints, a third of the
# expiry's CPU). The writes are counted from the primary-key index alone;
# `length` of a BLOB reads its record header, not its overflow pages, and the
# delete right after finds the same pages in the connection's cache.
EXPIRE_COUNT_WRITES_SQL = """
SELECT thread_id, count(*) FROM writes
WHERE thread_id IN (SELECT value FROM json_each(?)) GROUP BY thread_id
"""
EXPIRE_SIZE_CHECKPOINTS_SQL = """
SELECT thread_id, count(*), sum(COALESCE(length(checkpoint), 0) + COALESCE(length(metadata), 0))
FROM checkpoints WHERE thread_id IN (SELECT value FROM json_each(?)) GROUP BY thread_id
"""
EXPIRE_MANY_WRITES_SQL = "DELETE FROM writes WHERE thread_id IN (SELECT value FROM json_each(?))"
EXPIRE_MANY_CHECKPOINTS_SQL = """
DELETE FROM checkpoints WHERE thread_id IN (SELECT value FROM json_each(?))
"""

# A set-based trim deletes the ids of (thread, ns) below one bound: the
# smallest of the plan's time bound, the keep-th newest id and, for a chunk,
# the id just past its `limit` oldest. Read under the write lock, after the
# fingerprint re-check, so it is the bound the plan meant. The last branch
# gives '' (nothing goes) should the namespace hold fewer than `keep`.
TRIM_BOUND_SQL = """
SELECT min(b) FROM (
    SELECT :before AS b
    UNION ALL
    SELECT * FROM (
        SELECT checkpoint_id FROM checkpoints WHERE thread_id = :t AND checkpoint_ns = :ns
        ORDER BY checkpoint_id DESC LIMIT 1 OFFSET :keep - 1
    )
    UNION ALL
    SELECT * FROM (
        SELECT checkpoint_id FROM checkpoints WHERE thread_id = :t AND checkpoint_ns = :ns
        ORDER BY checkpoint_id LIMIT 1 OFFSET :limit
    )
    UNION ALL
    SELECT '' WHERE (
        SELECT count(*) FROM (
            SELECT 1 FROM checkpoints WHERE thread_id = :t AND checkpoint_ns = :ns LIMIT :keep
        )
    ) < :keep
)
"""
# The kept rows whose parent exists and is about to go: one text for the
# UPDATE below and the archive's read of those parents before it
# (`ARCHIVE_TRIM_NULL_PARENTS_SQL`), so both always pick the same rows.
_TRIM_PARENT_GOES = """
WHERE thread_id = :t AND checkpoint_ns = :ns AND checkpoint_id >= :bound
AND parent_checkpoint_id < :bound
AND EXISTS (
    SELECT 1 FROM checkpoints p
    WHERE p.thread_id = :t AND p.checkpoint_ns = :ns
    AND p.checkpoint_id = checkpoints.parent_checkpoint_id
)
"""
# Before the delete, so only parents that exist (and are about to go) are
# nulled, as the official `prune` does; it reads the kept rows only.
TRIM_NULL_PARENTS_SQL = f"""
UPDATE checkpoints SET parent_checkpoint_id = NULL{_TRIM_PARENT_GOES}"""
# The writes of the checkpoints this trim deletes, by the same range; the
# EXISTS keeps a write whose checkpoint is not (yet) saved (invariant 5, docs/architecture.md).
TRIM_WRITES_SQL = """
DELETE FROM writes
WHERE thread_id = :t AND checkpoint_ns = :ns AND checkpoint_id < :bound
AND EXISTS (
    SELECT 1 FROM checkpoints c
    WHERE c.thread_id = :t AND c.checkpoint_ns = :ns AND c.checkpoint_id = writes.checkpoint_id
)
"""
# RETURNING the sizes the report adds up, from the rows as they go.
TRIM_CHECKPOINTS_SQL = """
DELETE FROM checkpoints WHERE thread_id = :t AND checkpoint_ns = :ns AND checkpoint_id < :bound
RETURNING COALESCE(length(checkpoint), 0) + COALESCE(length(metadata), 0)
"""

# The same trims for every thread of a batch at once, in four statements in
# all rather than four per thread: each statement is one trip to aiosqlite's
# thread, and per thread those trips cost as much as the deletes. The bounds
# are TRIM_BOUND_SQL's, picked in Python (`_batch_bound`) from the ids of each
# namespace, read from the index in one statement: a LIMIT cannot take a
# correlated value, and window functions over the same rows cost five times
# the read. No ORDER BY: Python sorts each namespace's ids as the column
# compares them (BINARY is code-point order), without a temp b-tree.
BATCH_TRIM_IDS_SQL = """
SELECT k.key, c.checkpoint_id
FROM json_each(:spaces) AS k CROSS JOIN checkpoints AS c
WHERE c.thread_id = json_extract(k.value, '$[0]')
AND c.checkpoint_ns = json_extract(k.value, '$[1]')
"""
# The keys of each bounded namespace's ids on one side of its bound, from
# [thread, ns, bound] triples; the CROSS JOIN makes the short JSON list the
# outer loop, so each namespace is one primary-key range (the planner has no
# statistics for json_each and would otherwise scan the table).
_BATCH_RANGE = """
    SELECT c.thread_id, c.checkpoint_ns, c.checkpoint_id
    FROM json_each(:bounds) AS k CROSS JOIN checkpoints AS c
    WHERE c.thread_id = json_extract(k.value, '$[0]')
    AND c.checkpoint_ns = json_extract(k.value, '$[1]')
    AND c.checkpoint_id {op} json_extract(k.value, '$[2]'){more}
"""
# As TRIM_NULL_PARENTS_SQL: kept rows whose parent exists and is about to go.
_PARENT_GOES = """
    AND c.parent_checkpoint_id < json_extract(k.value, '$[2]')
    AND EXISTS (
        SELECT 1 FROM checkpoints p
        WHERE p.thread_id = c.thread_id AND p.checkpoint_ns = c.checkpoint_ns
        AND p.checkpoint_id = c.parent_checkpoint_id
    )"""
_BATCH_KEPT_WITH_PARENT_GOING = _BATCH_RANGE.format(op=">=", more=_PARENT_GOES)
BATCH_TRIM_NULL_PARENTS_SQL = f"""
UPDATE checkpoints SET parent_checkpoint_id = NULL
WHERE (thread_id, checkpoint_ns, checkpoint_id) IN ({_BATCH_KEPT_WITH_PARENT_GOING})
"""
# The writes of exactly the checkpoints that go (they exist: the writes go
# first), so a write whose checkpoint is not saved stays (DESIGN invariant 5).
BATCH_TRIM_WRITES_SQL = f"""
DELETE FROM writes
WHERE (thread_id, checkpoint_ns, checkpoint_id) IN ({_BATCH_RANGE.format(op="<", more="")})
"""
BATCH_TRIM_CHECKPOINTS_SQL = f"""
DELETE FROM checkpoints
WHERE (thread_id, checkpoint_ns, checkpoint_id) IN ({_BATCH_RANGE.format(op="<", more="")})
"""
# What the two deletes above will remove, counted (and the checkpoints sized)
# per thread just before them under the same write lock: a row per thread,
# where RETURNING handed Python a row per deleted row (as EXPIRE_COUNT_WRITES_SQL).
BATCH_TRIM_COUNT_WRITES_SQL = f"""
SELECT thread_id, count(*) FROM writes
WHERE (thread_id, checkpoint_ns, checkpoint_id) IN ({_BATCH_RANGE.format(op="<", more="")})
GROUP BY thread_id
"""
BATCH_TRIM_SIZE_CHECKPOINTS_SQL = """
SELECT c.thread_id, count(*),
       sum(COALESCE(length(c.checkpoint), 0) + COALESCE(length(c.metadata), 0))
FROM json_each(:bounds) AS k CROSS JOIN checkpoints AS c
WHERE c.thread_id = json_extract(k.value, '$[0]')
AND c.checkpoint_ns = json_extract(k.value, '$[1]')
AND c.checkpoint_id < json_extract(k.value, '$[2]')
GROUP BY c.thread_id
"""

# Dry runs: a chunk counts from the id past what the chunks before it name.
TRIM_LOW_SQL = """
SELECT checkpoint_id FROM checkpoints WHERE thread_id = :t AND checkpoint_ns = :ns
ORDER BY checkpoint_id LIMIT 1 OFFSET :offset
"""
COUNT_TRIM_SQL = """
SELECT count(*), total(COALESCE(length(checkpoint), 0) + COALESCE(length(metadata), 0))
FROM checkpoints
WHERE thread_id = :t AND checkpoint_ns = :ns AND checkpoint_id >= :low AND checkpoint_id < :bound
"""
COUNT_TRIM_WRITES_SQL = """
SELECT count(*) FROM writes
WHERE thread_id = :t AND checkpoint_ns = :ns AND checkpoint_id >= :low AND checkpoint_id < :bound
AND EXISTS (
    SELECT 1 FROM checkpoints c
    WHERE c.thread_id = :t AND c.checkpoint_ns = :ns AND c.checkpoint_id = writes.checkpoint_id
)
"""
COUNT_THREAD_BYTES_SQL = """
SELECT total(COALESCE(length(checkpoint), 0) + COALESCE(length(metadata), 0))
FROM checkpoints WHERE thread_id = ?
"""

# Dry runs count what the statements above would delete.
COUNT_CHECKPOINTS_SQL = """
SELECT COUNT(*) FROM checkpoints
WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id IN (SELECT value FROM json_each(?))
"""
COUNT_WRITES_SQL = """
SELECT COUNT(*) FROM writes
WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id IN (SELECT value FROM json_each(?))
"""
COUNT_THREAD_CHECKPOINTS_SQL = "SELECT COUNT(*) FROM checkpoints WHERE thread_id = ?"
COUNT_THREAD_WRITES_SQL = "SELECT COUNT(*) FROM writes WHERE thread_id = ?"

# ---------------------------------------------------------------- archive and restore
# With an archive (README "Getting data back") every delete returns the whole
# rows it removes (`RETURNING *`, SQLite >= 3.35), so what is archived is
# exactly what went, read in the same statement under the same write lock.
RETURNING_ALL = " RETURNING *"
ARCHIVE_DELETE_WRITES_SQL = DELETE_WRITES_SQL + RETURNING_ALL
ARCHIVE_DELETE_CHECKPOINTS_SQL = DELETE_CHECKPOINTS_SQL + RETURNING_ALL
ARCHIVE_DELETE_ORPHAN_WRITES_SQL = DELETE_ORPHAN_WRITES_SQL + RETURNING_ALL
ARCHIVE_EXPIRE_WRITES_SQL = EXPIRE_WRITES_SQL + RETURNING_ALL
ARCHIVE_EXPIRE_CHECKPOINTS_SQL = EXPIRE_CHECKPOINTS_SQL + RETURNING_ALL
ARCHIVE_EXPIRE_MANY_WRITES_SQL = """
DELETE FROM writes WHERE thread_id IN (SELECT value FROM json_each(?)) RETURNING *
"""
ARCHIVE_EXPIRE_MANY_CHECKPOINTS_SQL = """
DELETE FROM checkpoints WHERE thread_id IN (SELECT value FROM json_each(?)) RETURNING *
"""
ARCHIVE_TRIM_WRITES_SQL = TRIM_WRITES_SQL + RETURNING_ALL
ARCHIVE_TRIM_CHECKPOINTS_SQL = """
DELETE FROM checkpoints WHERE thread_id = :t AND checkpoint_ns = :ns AND checkpoint_id < :bound
RETURNING *
"""
# RETURNING shows an UPDATE's new values (NULL), so the parents about to be
# nulled are read first, by the same WHERE as the UPDATE that follows.
ARCHIVE_NULL_PARENTS_SQL = """
SELECT thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id FROM checkpoints
WHERE thread_id = ? AND checkpoint_ns = ?
AND parent_checkpoint_id IN (SELECT value FROM json_each(?))
"""
ARCHIVE_TRIM_NULL_PARENTS_SQL = f"""
SELECT thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id FROM checkpoints\
{_TRIM_PARENT_GOES}"""
# The SQL-side copies of `_trim_many` and `_expire` with an archive: the rows go
# from the store into the segment's image inside SQLite (`Segment.copy`, on the
# segment's own read-only connection), never through Python; the statements
# on the batch's connection are the plain ones. Each SELECT is the WHERE of
# the statement it archives (the parents to be nulled: the UPDATE's own WHERE).
# It reads the store's last commit; the batch holds the write lock and has
# not committed, so that is the state its statements start from, and the
# copy runs while they do.
COPY_BATCH_TRIM_NULLED_SQL = f"""
SELECT thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id FROM checkpoints
WHERE (thread_id, checkpoint_ns, checkpoint_id) IN ({_BATCH_KEPT_WITH_PARENT_GOING})
"""
COPY_BATCH_TRIM_WRITES_SQL = f"""
SELECT * FROM writes
WHERE (thread_id, checkpoint_ns, checkpoint_id) IN ({_BATCH_RANGE.format(op="<", more="")})
"""
COPY_BATCH_TRIM_CHECKPOINTS_SQL = f"""
SELECT * FROM checkpoints
WHERE (thread_id, checkpoint_ns, checkpoint_id) IN ({_BATCH_RANGE.format(op="<", more="")})
"""
COPY_EXPIRE_WRITES_SQL = "SELECT * FROM writes WHERE thread_id IN (SELECT value FROM json_each(?))"
COPY_EXPIRE_CHECKPOINTS_SQL = """
SELECT * FROM checkpoints WHERE thread_id IN (SELECT value FROM json_each(?))
"""
# Columns in `SELECT *` order, for the image's tables.
ORDERED_COLUMNS_SQL = "SELECT name FROM pragma_table_info(?) ORDER BY cid"
JOURNAL_MODE_SQL = "PRAGMA journal_mode"
# Recovery of a `.pending` segment: one still-present key means its delete never committed.
CHECKPOINT_PRESENT_SQL = """
SELECT 1 FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id = ?
"""
WRITE_PRESENT_SQL = """
SELECT 1 FROM writes
WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id = ? AND task_id = ? AND idx = ?
"""

# Restore: a segment is ATTACHed read-only and copied in SQL: no row crosses into
# Python, and the primary keys (thread, ns, id[, task, idx]) decide what is
# missing. The filter is on the archived side's thread_id (alias s).
ATTACH_SEGMENT_SQL = "ATTACH DATABASE ? AS archived"
DETACH_SEGMENT_SQL = "DETACH DATABASE archived"
# The segment's tables have no index: each restore statement scans them, and a
# mapped file is scanned without copying every page (the store keeps its own setting).
MAP_SEGMENT_SQL = "PRAGMA archived.mmap_size = 268435456"
# Whether the attached segment recorded nulled parents (older batches may not have any).
ARCHIVED_NULLED_SQL = "SELECT 1 FROM archived.sqlite_master WHERE type = 'table' AND name = ?"
RESTORE_FILTER = {
    "all": "1",
    "thread": "s.thread_id = :thread",
    # Named threads as one JSON array: no bound-variable limit, one statement.
    "threads": "s.thread_id IN (SELECT value FROM json_each(:threads))",
    "prefix": "substr(s.thread_id, 1, :n) = :prefix",
}
RESTORE_KEYS = {
    "checkpoints": ("thread_id", "checkpoint_ns", "checkpoint_id"),
    "writes": ("thread_id", "checkpoint_ns", "checkpoint_id", "task_id", "idx"),
}
"""The primary key of each saver table: what "the row exists" means."""
# Per thread, the archived rows whose key the store lacks (counted before the insert).
RESTORE_MISSING_SQL = """
SELECT s.thread_id, count(*) FROM archived."{table}" s
WHERE {filter} AND NOT EXISTS (SELECT 1 FROM main."{table}" m WHERE {keys})
GROUP BY s.thread_id
"""
# How many archived rows the filter selects; less the missing ones, those present.
RESTORE_SELECTED_SQL = 'SELECT count(*) FROM archived."{table}" s WHERE {filter}'
# OR IGNORE: a row the store has (the application wrote it again, or an earlier
# restore did) stays as it is.
RESTORE_INSERT_SQL = """
INSERT OR IGNORE INTO main."{table}" ({columns})
SELECT {columns} FROM archived."{table}" s WHERE {filter}
"""
# Only where the parent is still NULL (nothing set it since) and the parent row
# is back: a kept checkpoint then reads as before the sweep.
RESTORE_RELINK_MATCH = """
{filter}
AND m.thread_id = s.thread_id AND m.checkpoint_ns = s.checkpoint_ns
AND m.checkpoint_id = s.checkpoint_id AND m.parent_checkpoint_id IS NULL
AND EXISTS (
    SELECT 1 FROM main.checkpoints p
    WHERE p.thread_id = s.thread_id AND p.checkpoint_ns = s.checkpoint_ns
    AND p.checkpoint_id = s.parent_checkpoint_id
)
"""
# RETURNING names the updated table's columns unqualified (SQLite allows no alias there).
RESTORE_RELINK_SQL = (
    "UPDATE main.checkpoints AS m SET parent_checkpoint_id = s.parent_checkpoint_id\n"
    "FROM archived.nulled_parents s WHERE" + RESTORE_RELINK_MATCH + "RETURNING thread_id"
)
# A dry run inserts no parent, so it counts every link still NULL (an upper bound).
RESTORE_RELINK_COUNT_SQL = """
SELECT m.thread_id, count(*) FROM main.checkpoints m, archived.nulled_parents s
WHERE {filter}
AND m.thread_id = s.thread_id AND m.checkpoint_ns = s.checkpoint_ns
AND m.checkpoint_id = s.checkpoint_id AND m.parent_checkpoint_id IS NULL
GROUP BY m.thread_id
"""

# ---------------------------------------------------------------- stats and sizes

# Whole-table aggregates: `stats` is an operator's look, not a sweep's hot path;
# bytes are `length()` of the columns that hold data, as the sweep's sizes.
STATS_TABLE_SQL = {
    "checkpoints": "SELECT COUNT(*), COALESCE(SUM(length(checkpoint) + length(metadata)), 0) "
    "FROM checkpoints",
    "writes": "SELECT COUNT(*), COALESCE(SUM(length(value)), 0) FROM writes",
}
STATS_IDS_SQL = "SELECT checkpoint_ns, checkpoint_id FROM checkpoints"
LARGEST_THREADS_SQL = """
SELECT thread_id, COUNT(*), COALESCE(SUM(length(checkpoint) + length(metadata)), 0) AS size
FROM checkpoints GROUP BY thread_id ORDER BY size DESC LIMIT ?
"""
# Per thread of a page, as STATS_TABLE_SQL counts bytes; correlated sums, so each
# thread is one primary-key range of each table, not a scan of the store.
THREAD_BYTES_SQL = """
SELECT k.value,
    (SELECT COALESCE(SUM(length(checkpoint) + length(metadata)), 0)
     FROM checkpoints WHERE thread_id = k.value)
  + (SELECT COALESCE(SUM(length(value)), 0) FROM writes WHERE thread_id = k.value)
FROM json_each(?) AS k
"""
# Deleted rows leave free pages in the file until VACUUM: what could be reclaimed.
FILE_PAGES_SQL = "SELECT * FROM pragma_page_size, pragma_page_count, pragma_freelist_count"

# ---------------------------------------------------------------- legal holds

# The tool's own table in the store's file, created by the first `hold`: plan
# and stats open the file read-only, so reading must not need it to exist.
# `held_at` is ISO 8601 UTC text, readable with the sqlite3 shell.
CREATE_HOLDS_TABLE_SQL = f"""
CREATE TABLE IF NOT EXISTS {HOLDS_TABLE} (
    thread_id TEXT PRIMARY KEY,
    reason TEXT,
    held_at TEXT NOT NULL,
    held_by TEXT
)
"""
# sqlite_master rather than a SELECT that fails: a missing table means no holds.
HOLDS_TABLE_EXISTS_SQL = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
# Keyset pages over the primary key; the first page has no lower bound, so
# a hold on the empty id is read too.
HOLDS_FIRST_PAGE_SQL = f"""
SELECT thread_id, reason, held_at, held_by FROM {HOLDS_TABLE} ORDER BY thread_id LIMIT ?
"""
HOLDS_NEXT_PAGE_SQL = f"""
SELECT thread_id, reason, held_at, held_by FROM {HOLDS_TABLE}
WHERE thread_id > ? ORDER BY thread_id LIMIT ?
"""
# Read inside a batch's BEGIN IMMEDIATE, after the write lock is taken: a hold
# placed since the scan is seen, and one placed later waits for the commit.
HELD_AMONG_SQL = f"""
SELECT thread_id FROM {HOLDS_TABLE} WHERE thread_id IN (SELECT value FROM json_each(?))
"""
# A second hold on a held thread keeps the first (its time and reason stand).
INSERT_HOLD_SQL = f"""
INSERT INTO {HOLDS_TABLE} (thread_id, reason, held_at, held_by) VALUES (?, ?, ?, ?)
ON CONFLICT (thread_id) DO NOTHING
"""
# By primary key; a release of a thread not held changes no row (and says so).
DELETE_HOLD_SQL = f"DELETE FROM {HOLDS_TABLE} WHERE thread_id = ?"

# ---------------------------------------------------------------- residue checks

# The tool's own table in the store's file, created by the first sweep that
# completes a look at every quiet thread's residue: plan and stats open the
# file read-only, so reading must not need it. One row per policy, since a
# pass looks only at the policies due in it; `checked_at` is ISO 8601 UTC
# text to the second, rounded down (an earlier date only brings a look forward).
CREATE_RESIDUE_TABLE_SQL = f"""
CREATE TABLE IF NOT EXISTS {RESIDUE_TABLE} (
    policy TEXT PRIMARY KEY,
    checked_at TEXT NOT NULL
)
"""
# Every policy's last look at once: a handful of rows, read once a pass.
RESIDUE_CHECKS_SQL = f"SELECT policy, checked_at FROM {RESIDUE_TABLE}"
RECORD_RESIDUE_CHECK_SQL = f"""
INSERT INTO {RESIDUE_TABLE} (policy, checked_at) VALUES (?, ?)
ON CONFLICT (policy) DO UPDATE SET checked_at = excluded.checked_at
"""


# ---------------------------------------------------------------- the WAL

# PASSIVE never waits for the application's readers or writers, so it is
# safe to run between batches to keep the WAL from growing over a sweep.
WAL_CHECKPOINT_SQL = "PRAGMA wal_checkpoint(PASSIVE)"
# The worker's connection never checkpoints inside its COMMIT (SQLite's
# default does, every 1000 pages): `after_batch` does, outside the batch's
# time, so a batch's time is its transaction's and the sizer aims at that.
NO_AUTOCHECKPOINT_SQL = "PRAGMA wal_autocheckpoint = 0"
# Changes when another connection commits (our own commits leave it alone):
# how a batch learns that the application wrote since the one before.
DATA_VERSION_SQL = "PRAGMA data_version"

# ---------------------------------------------------------------- reclaim

# One round trip for the figures every decision here reads. freelist_count
# is kept in the file header, so this costs nothing on a large file.
PAGES_SQL = (
    "SELECT * FROM pragma_page_size, pragma_page_count, pragma_freelist_count, pragma_auto_vacuum"
)
# One step, as one script: the pragma frees a page per row it steps, and
# Python's `execute` steps a statement without result columns only once, while
# `executescript` runs each statement to the end (and commits any open
# transaction first, so the BEGIN must be inside the script).
STEP_SQL = "BEGIN IMMEDIATE; PRAGMA incremental_vacuum({pages:d}); COMMIT;"
# Only sets the mode the next VACUUM writes; on its own it changes nothing.
SET_INCREMENTAL_SQL = "PRAGMA auto_vacuum = INCREMENTAL"
# Rewrites the file into a temporary database and copies it back through the
# WAL: the one statement that can switch an existing file's auto-vacuum mode.
VACUUM_SQL = "VACUUM"
# PASSIVE between steps never waits for anyone; TRUNCATE at the end waits
# only as long as the connection's short busy slice, then gives up.
# PASSIVE: the engine's own between-batch checkpoint (`WAL_CHECKPOINT_SQL`).
WAL_PASSIVE_SQL = WAL_CHECKPOINT_SQL
WAL_TRUNCATE_SQL = "PRAGMA wal_checkpoint(TRUNCATE)"
# Where VACUUM puts its temporary copy, and whether it is on disk at all.
TEMP_STORE_SQL = "PRAGMA temp_store"
TEMP_DIR_SQL = "PRAGMA temp_store_directory"
# The build's TEMP_STORE default, which decides when the pragma is unset.
COMPILE_OPTIONS_SQL = "PRAGMA compile_options"

# ---------------------------------------------------------------- the saver wrapper

# `RetentionSaver`'s SQLite backend (`worker.saver.sqlite`): these run on the
# saver's own connection, inside the application, usually on the write path
# of the thread they touch. Each names its engine counterpart above and says
# why the two differ. Where they must not differ the wrapper runs the engine's
# own text: the deletes by decided ids and the parent nulling
# (`DELETE_WRITES_SQL`, `DELETE_CHECKPOINTS_SQL`, `NULL_PARENTS_SQL`: a
# checkpoint goes with its writes, and orphaned parents go, the same way
# whoever deletes it), a thread's expiry (`EXPIRE_WRITES_SQL`,
# `EXPIRE_CHECKPOINTS_SQL`), the blob read (`THREAD_BLOBS_SQL`) and the holds
# (`CREATE_HOLDS_TABLE_SQL`, `HOLDS_TABLE_EXISTS_SQL`, `INSERT_HOLD_SQL`,
# `DELETE_HOLD_SQL`), so a hold placed through the wrapper is the CLI's.

# The wrapper's scan of one thread. Engine counterpart: `SCAN_SQL`, a page of
# threads at once, with each row's size (the sweep's size caps need it); here
# one thread, no size. SQLite keeps metadata as a JSON text blob; it is parsed
# in Python (one json.loads a row) rather than with json_extract per key,
# since the head's whole metadata is wanted anyway.
SQLITE_SCAN_SQL = """
SELECT checkpoint_ns, checkpoint_id, parent_checkpoint_id, CAST(metadata AS TEXT)
FROM checkpoints WHERE thread_id = ?
"""
# The re-check under the write lock: a checkpoint saved since the scan
# changes the count or the newest id. Engine counterpart: `FINGERPRINT_SQL`,
# count and newest id per namespace, since a sweep batch may hold only some of
# a thread's trims; the wrapper's expiry takes the whole thread in one
# transaction, so the thread's count and newest id suffice.
SQLITE_STAMP_SQL = "SELECT COUNT(*), MAX(checkpoint_id) FROM checkpoints WHERE thread_id = ?"
# No index covers metadata: `delete_for_runs` reads every row once, then
# works thread by thread. No engine counterpart: the sweep never selects by run.
SQLITE_RUN_THREADS_SQL = """
SELECT DISTINCT thread_id FROM checkpoints
WHERE json_extract(CAST(metadata AS TEXT), '$.run_id') IN (SELECT value FROM json_each(?))
"""
# Keyset page over the primary key's leading column: never "load every id".
# Only `checkpoints`, unlike the engine's walk (`THREADS_PAGE_SQL`,
# which unions `writes`): its one caller, `delete_checkpoints(before=...)`,
# deletes checkpoints, so a thread holding only orphaned writes has nothing
# for it; those are the sweep's.
# The first page has no lower bound (a cursor of "" would skip the empty id).
SQLITE_FIRST_THREAD_PAGE_SQL = """
SELECT DISTINCT thread_id FROM checkpoints ORDER BY thread_id LIMIT ?
"""
SQLITE_THREAD_PAGE_SQL = """
SELECT DISTINCT thread_id FROM checkpoints WHERE thread_id > ? ORDER BY thread_id LIMIT ?
"""
# Every row of the named threads, writes first. Engine counterpart:
# `EXPIRE_MANY_WRITES_SQL` / `EXPIRE_MANY_CHECKPOINTS_SQL`, the same deletes;
# the writes' text is the engine's own, the checkpoints' differs only in
# layout (one line here). The engine counts and sizes the rows first
# (`EXPIRE_COUNT_WRITES_SQL`, `EXPIRE_SIZE_CHECKPOINTS_SQL`) for its report;
# the wrapper's caller needs only the row counts the deletes return.
SQLITE_DELETE_THREADS_SQL = (
    EXPIRE_MANY_WRITES_SQL,
    "DELETE FROM checkpoints WHERE thread_id IN (SELECT value FROM json_each(?))",
)
# Legal holds: the worker's own table and statements (above). Only the read
# differs: the wrapper caches every held id at once, where the engine lists
# holds in pages with their reason and time (`HOLDS_FIRST_PAGE_SQL`) and a
# batch asks only about its own threads (`HELD_AMONG_SQL`, under its write lock).
SQLITE_HELD_SQL = f"SELECT thread_id FROM {HOLDS_TABLE}"
