"""The archive a sweep writes before it deletes and restore reads (README "Getting data back").

Layout: `<path>/<store>/<sweep start UTC>-<pid>/<NNNNNN>.sqlite`, one SQLite
"segment" file per deleting batch. A segment holds the batch's deleted rows in
tables named and shaped as the source saver's own (`checkpoints`, `writes`;
Postgres: `checkpoints`, `checkpoint_blobs`, `checkpoint_writes`), the parent
ids the batch set to NULL (`nulled_parents`), and `archive_meta`.

The image is an in-memory database attached as `seg`. A SQLite engine opens
it on a read-only connection to the store (`Segment.open_source`) and fills it
with `INSERT INTO seg.<table> SELECT ...` (`Segment.copy`): the rows never pass
through Python on the way in, nor on the way out (the checksum is over pages).
Rows an engine already holds (Postgres, SQLite's one-thread deletes) come in
through `Segment.add`.

A segment's life, so that a crash never leaves a half-written file that counts:
`NNNNNN.partial` (`Segment.prepare`: the database image, built in memory,
written in one go and fsynced once, then re-read: the same bytes) ->
`NNNNNN.pending.sqlite` (`Segment.seal`: renamed, the directory fsynced,
under the batch's write lock: the store's delete may now commit) ->
`NNNNNN.sqlite` (`Segment.complete`: the delete committed). A `.partial`
never counts; a `.pending.sqlite` left by a crash is resolved by the next
sweep (`Archive.pending`): removed when its rows are still in the store,
promoted when they are gone.

Crash safety of each step (the guarantees: the segment is durable and verified
before the delete commits; a crash leaves nothing half-written that counts):

- `prepare` may run while the batch takes its write lock and deletes (SQLite,
  below), in a worker thread. Its only file is the `.partial`; a crash at any
  point leaves at most a `.partial`, which no reader, recovery or restore
  counts. The batch waits for it before its count check, `seal` and COMMIT,
  and on any failure before abandoning it. A batch that drops a prepared
  segment (the lock stayed busy, another connection committed) removes the
  `.partial` with no fsync: a removal lost to a crash leaves a `.partial`,
  which still never counts.
- The re-read compares the file with the image byte for byte; it no longer
  opens the file as SQLite to count its rows. The image holds the rows, the
  per-table counts (`rows.<table>`) and the checksum in `archive_meta`, all
  computed from the image itself before it was serialized, so equal bytes
  are equal rows, counts and checksum; a torn or short write differs in its bytes.
- `seal` renames the fsynced `.partial` to `.pending.sqlite` and fsyncs the
  directory, still before the COMMIT (for a prepared segment: under the write
  lock, after the batch checked that its copy is what its deletes removed).
  The data was fsynced before the rename, so the name that counts never
  points at unsynced bytes; a crash before the directory fsync loses at most
  the new name, and the delete has not committed.
- `complete` renames `.pending.sqlite` to `.sqlite` after the COMMIT and does
  not fsync the directory: a crash that loses the rename leaves the
  `.pending.sqlite`, whose rows are gone from the store, and the next sweep's
  recovery promotes it, as it would after a crash between COMMIT and rename.

On SQLite (`worker.stores.sqlite`) a batch made only of batch-wide trims and
expiries copies its rows before `BEGIN IMMEDIATE`: it notes its connection's
`PRAGMA data_version` (v0), reads what it would decide under the lock (holds,
fingerprints, the trims' bounds) and copies with the deletes' own WHEREs on
the segment's read-only connection; `prepare` then runs in a worker thread
while the batch takes the lock (and deletes, if it keeps the copy). Under the
lock it reads `data_version` again (v1). The copy equals the deletes when v1 == v0:
`data_version` changes whenever a connection other than the batch's commits
(the application, another worker; the copy's connection only reads), so every
read between v0 and v1 saw one and the same commit, C0; the batch's own
connection committed nothing in that span either (its previous batch
committed before v0, and its own commits do not change its `data_version`
anyway, which is why only that connection's value is used). Under the lock
the deletes start from C0, with bounds, holds and fingerprints decided on C0,
so they remove exactly the rows the copy read from C0. When v1 != v0 the
prepared segment is dropped and the batch runs as before, copying under the
lock (a thread whose fingerprint changed is then refused, so neither deleted
nor archived). Either way the rows deleted are compared with the rows copied
per table, and a difference rolls the batch back. Copy-before-lock for batch
N+1 while batch N deletes (pipelining) is not done: the sweep hands the engine
one batch at a time, and N+1's contents are decided after N's results.

Format version 3 (written now, method `page-xxh3-128-v3`,
`archive_meta.xxh3_128`) checksums the file's pages (`page_checksum`): xxh3-128
of the bytes from offset 100 on, less the root page of `archive_meta`, which
holds the checksum. The image is built with a placeholder there, serialized and
hashed, then the checksum is written over the placeholder (same length, same
page) and the pages hashed again to prove nothing else moved. Its cost is a
hash over bytes in hand (GB/s), where versions 1 and 2 brought every row into
Python to encode it (about 10 CPU-s of a 1M sweep, before the lock).
Versions 1 and 2 checksum rows, in any order: for each table in name order,
feed the hash with `table:<name>\\n<col1>,<col2>,...\\n` and then the sorted
digests of its rows, each digest over the row's values in column order encoded
as `N` (NULL), `I<decimal>;` (integer), `R<repr>;` (real), `T<len>:<utf-8>`
(text), `B<len>:<bytes>` (blob); version 2 with xxh3-128 (16-byte digests,
`row-xxh3-128-sorted-v2`), version 1 with SHA-256 (32-byte digests,
`archive_meta.sha256`, `row-sha256-sorted-v1`). Each guards against torn
writes and edits by mistake, not against forgery. Readers verify all three,
each by the method its version names (`READABLE_VERSIONS`), and refuse any
other. The upload read-back of an `s3://` segment compares SHA-256 of the
bytes (rare, and the file is compared whole).

A restore of some threads reads only the segments that hold them: it asks
each segment (`SegmentReader.holds`, one `LIMIT 1` query per table, over
`thread_id`) and verifies, then reads, those that do; a file that cannot be
queried counts as holding them.

File I/O is synchronous; engines call it through `asyncio.to_thread`. A path
with a scheme (`s3://bucket/prefix`) goes through `fsspec`: the segment is
written and verified in a local temporary directory, uploaded as
`.pending.sqlite`, read back and compared (size and SHA-256 of the bytes).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import mmap
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import IO, Any, Literal, NoReturn
from urllib.parse import quote

import xxhash

from policies.config import ArchiveConfig, StoreConfig


@dataclass(frozen=True)
class ChecksumMethod:
    """How a segment's checksum is computed (module docstring): the one row encoding,
    hashed per row with `row`, the sorted row digests fed to `new()`."""

    name: str
    """`archive_meta.checksum_method`."""
    key: str
    """The `archive_meta` key holding the checksum's hex digest."""
    row: Callable[[bytes], bytes]
    new: Callable[[], Any]


SHA256_V1 = ChecksumMethod(
    "row-sha256-sorted-v1", "sha256", lambda data: hashlib.sha256(data).digest(), hashlib.sha256
)
"""Format version 1's checksum; still verified on read."""
XXH3_V2 = ChecksumMethod(
    "row-xxh3-128-sorted-v2", "xxh3_128", xxhash.xxh3_128_digest, xxhash.xxh3_128
)
"""Format version 2's: the same encoding and order, xxh3-128 in place of SHA-256
(an integrity check against torn writes and edits, not against forgery)."""

FORMAT_VERSION = 3
"""Bumped on any change a reader of the previous version would misread (2: xxh3 row
checksum; 3: xxh3 over the file's pages)."""
ROW_CHECKSUM_VERSIONS = {"1": SHA256_V1, "2": XXH3_V2}
"""Older format versions a reader verifies, with the row checksum each was written with."""
PAGE_CHECKSUM = "page-xxh3-128-v3"
"""Format version 3's checksum (`page_checksum`), the one segments are written with."""
CHECKSUM_KEY = "xxh3_128"
"""The `archive_meta` key holding version 3's checksum (hex), as version 2's."""
READABLE_VERSIONS = {**{v: m.name for v, m in ROW_CHECKSUM_VERSIONS.items()}, "3": PAGE_CHECKSUM}
"""Format versions a reader verifies, with the checksum method each was written with."""

META_TABLE = "archive_meta"
NULLED_TABLE = "nulled_parents"
NULLED_COLUMNS = ("thread_id", "checkpoint_ns", "checkpoint_id", "parent_checkpoint_id")

PARTIAL_SUFFIX = ".partial"
PENDING_SUFFIX = ".pending.sqlite"
COMPLETE_SUFFIX = ".sqlite"
LOCK_NAME = ".lock"

_SEGMENT_RE = re.compile(r"^(\d{6})(\.pending)?\.sqlite$")
_SWEEP_DIR_RE = re.compile(r"^(\d{8}T\d{6}Z)-(\d+)(?:-(\d+))?$")

# The reader learns the tables from the file itself, so a segment written by a
# newer engine with another table still restores what it knows.
LIST_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
TABLE_COLUMNS = "SELECT name FROM pragma_table_info(?) ORDER BY cid"
READ_META = f"SELECT key, value FROM {META_TABLE}"
COUNT_ROWS = 'SELECT count(*) FROM "{table}"'
# The image a segment is built in: an in-memory database attached as `seg`, so
# that a connection whose main database is the store can fill it with
# `INSERT INTO seg.<table> SELECT ... FROM <store table>` (no row through Python).
IMAGE_SCHEMA = "seg"
ATTACH_IMAGE = f"ATTACH DATABASE ':memory:' AS {IMAGE_SCHEMA}"
# 64 KiB pages: a checkpoint blob of a few KB fits one page instead of an
# overflow chain of 4 KiB pages, so the image is built faster and is ~20% smaller.
IMAGE_PAGE_SIZE = f"PRAGMA {IMAGE_SCHEMA}.page_size = 65536"
# Untyped columns (no declared type, so no affinity): SQLite keeps every value
# exactly as inserted (text stays text, a blob stays a blob, an int an int).
CREATE_IMAGE_TABLE = f'CREATE TABLE {IMAGE_SCHEMA}."{{table}}" ({{columns}})'
DROP_IMAGE_TABLE = f'DROP TABLE {IMAGE_SCHEMA}."{{table}}"'
CREATE_IMAGE_META = (
    f"CREATE TABLE {IMAGE_SCHEMA}.{META_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
)
INSERT_IMAGE_META = f"INSERT INTO {IMAGE_SCHEMA}.{META_TABLE} (key, value) VALUES (?, ?)"
INSERT_IMAGE_ROW = f'INSERT INTO {IMAGE_SCHEMA}."{{table}}" ({{columns}}) VALUES ({{marks}})'
# `select` names the store's tables unqualified: they resolve to the store (main).
COPY_ROWS = f'INSERT INTO {IMAGE_SCHEMA}."{{table}}" ({{columns}}) {{select}}'
COUNT_IMAGE_ROWS = f'SELECT count(*) FROM {IMAGE_SCHEMA}."{{table}}"'
# Version 3's checksum skips the meta table's root page (which holds the checksum):
# its page number, in the image and in a segment file.
IMAGE_META_ROOT = f"SELECT rootpage FROM {IMAGE_SCHEMA}.sqlite_master WHERE name = '{META_TABLE}'"
META_ROOT = f"SELECT rootpage FROM sqlite_master WHERE name = '{META_TABLE}'"
# The value has the placeholder's length, so the page keeps its layout; only that page changes.
SET_IMAGE_CHECKSUM = f"UPDATE {IMAGE_SCHEMA}.{META_TABLE} SET value = ? WHERE key = ?"
_CHECKSUM_PLACEHOLDER = "0" * 32
# Exact thread / code-point prefix match (LIKE would treat `_` as a wildcard and fold case).
SELECT_ROWS = 'SELECT {columns} FROM "{table}"{where}'
# Many named threads as one JSON array parameter: no limit on bound variables,
# one statement however many threads, and SQLite probes the list as a set.
NAMED_THREADS = "thread_id IN (SELECT value FROM json_each(?))"
# Whether a table holds any row of the selected threads: a restore reads and
# verifies only the segments that do. LIMIT 1 stops at the first such row.
HOLDS_SELECTED = 'SELECT 1 FROM "{table}"{where} LIMIT 1'
# The tables have no index, so a miss scans every leaf page: mapped, not copied,
# that scan takes about half the time (a restore asks it of every segment).
MAP_SEGMENT = "PRAGMA mmap_size = 268435456"


class ArchiveError(Exception):
    """An archive that cannot be written or read; the message names store, path and reason."""

    def __init__(self, store: str, path: str, reason: str) -> None:
        super().__init__(f"archive of store {store!r} at {path}: {reason}")
        self.store = store
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ArchiveSettings:
    """Where a store's archive lives, and the size its directory must stay under."""

    path: str
    """A directory, or an fsspec URL (`s3://bucket/prefix`)."""
    max_bytes: int | None = None
    """Refuse (and so delete nothing) a segment that would bring the store's
    archive directory past this many bytes."""


@dataclass(frozen=True, slots=True)
class Selection:
    """Which threads a restore takes: one id, named ids, an id prefix, or all (all None)."""

    thread_id: str | None = None
    prefix: str | None = None
    thread_ids: frozenset[str] | None = None
    """Several named threads (`of_threads`); one name is a `thread_id`."""

    @classmethod
    def of_threads(cls, thread_ids: Iterable[str]) -> Selection:
        """The named threads (at least one): `thread_id` for one, `thread_ids` for more."""
        ids = frozenset(thread_ids)
        if not ids:
            raise ValueError("a selection of named threads needs at least one thread id")
        if len(ids) == 1:
            return cls(thread_id=next(iter(ids)))
        return cls(thread_ids=ids)

    @property
    def kind(self) -> Literal["thread", "threads", "prefix", "all"]:
        """Which of the four selections this is."""
        if self.thread_id is not None:
            return "thread"
        if self.thread_ids is not None:
            return "threads"
        return "prefix" if self.prefix is not None else "all"

    def matches(self, thread_id: str) -> bool:
        """Whether `thread_id` is selected (prefix is code-point exact)."""
        if self.thread_id is not None:
            return thread_id == self.thread_id
        if self.thread_ids is not None:
            return thread_id in self.thread_ids
        if self.prefix is not None:
            return thread_id.startswith(self.prefix)
        return True

    def ids_json(self) -> str:
        """The named threads as one JSON array, the parameter of a `json_each` filter."""
        return json.dumps(sorted(self.thread_ids or ()))

    def where(self) -> tuple[str, tuple[Any, ...]]:
        """A WHERE clause over a `thread_id` column (empty for all), with its parameters."""
        if self.thread_id is not None:
            return " WHERE thread_id = ?", (self.thread_id,)
        if self.thread_ids is not None:
            return f" WHERE {NAMED_THREADS}", (self.ids_json(),)
        if self.prefix is not None:
            # substr, not LIKE: exact code points, no wildcard in the prefix.
            return " WHERE substr(thread_id, 1, ?) = ?", (len(self.prefix), self.prefix)
        return "", ()


ArchiveFactory = Callable[[float], "Archive"]
"""Opens a store's `Archive` for a sweep started at the given unix time."""


def archive_factory(store: StoreConfig, config: ArchiveConfig | None) -> ArchiveFactory | None:
    """How sweeps of `store` open their archive (None: the store has none)."""
    if config is None:
        return None
    settings = ArchiveSettings(config.path, config.max_bytes)

    def open_archive(started: float) -> Archive:
        return Archive(store.name, store.kind, settings, started)

    return open_archive


# -- checksum ---------------------------------------------------------------


_STORED_TYPES = frozenset({type(None), int, float, str, bytes})
"""Python types SQLite stores and returns unchanged (`_normalize` leaves them as they are)."""


def _normalize(value: Any) -> Any:
    """The value as SQLite stores and returns it (bool -> int, buffers -> bytes)."""
    if value is None or isinstance(value, str | bytes | float):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"cannot archive a value of type {type(value).__name__}")


def _encode(value: Any) -> bytes:
    if value is None:
        return b"N"
    if isinstance(value, int):
        return b"I%d;" % value
    if isinstance(value, float):
        return b"R" + repr(value).encode() + b";"
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        return b"T%d:" % len(data) + data
    assert isinstance(value, bytes)
    return b"B%d:" % len(value) + value


def row_digest(row: Sequence[Any], method: ChecksumMethod = XXH3_V2) -> bytes:
    """The digest of one row's canonical encoding (module docstring) by `method`."""
    parts: list[bytes] = []
    for value in row:
        # The common types inline: this runs for every archived value.
        kind = value.__class__
        if kind is bytes:
            parts += (b"B%d:" % len(value), value)
        elif kind is str:
            data = value.encode("utf-8", "surrogatepass")
            parts += (b"T%d:" % len(data), data)
        elif kind is int:
            parts.append(b"I%d;" % value)
        else:
            parts.append(_encode(value))
    return method.row(b"".join(parts))


def checksum(
    tables: Iterable[tuple[str, Sequence[str], Iterable[bytes]]],
    method: ChecksumMethod = XXH3_V2,
) -> str:
    """The segment checksum from (table, columns, row digests), any order of tables or rows."""
    h = method.new()
    for name, columns, digests in sorted(tables, key=lambda t: t[0]):
        h.update(f"table:{name}\n{','.join(columns)}\n".encode())
        for d in sorted(digests):
            h.update(d)
    return str(h.hexdigest())


def page_checksum(data: Any, meta_root: int) -> str:
    """Format version 3's checksum of a segment file's bytes (`data`: bytes, or a buffer
    such as an mmap): xxh3-128 over the file from byte 100 on, less the page that is
    the `archive_meta` table's root (`meta_root`, from `sqlite_master`), which holds
    the checksum. Bytes 0-99 are SQLite's header, whose change counter moves when the
    checksum is written; every row of every other table is in the pages it covers."""
    view = memoryview(data)
    size = int.from_bytes(view[16:18], "big")
    page = 65536 if size == 1 else size
    if meta_root < 2 or len(view) < meta_root * page:
        raise ValueError(f"no page {meta_root} of {page} bytes in a file of {len(view)} bytes")
    h = xxhash.xxh3_128()
    h.update(view[100 : (meta_root - 1) * page])
    h.update(view[meta_root * page :])
    return str(h.hexdigest())


# -- places: a local directory or an fsspec filesystem ----------------------


def _is_url(path: str) -> bool:
    return "://" in path


def _dir_name(store: str) -> str:
    """A store name as one path component (any `/` or odd character %-escaped)."""
    name = quote(store, safe="-_.@+=,")
    return name.replace(".", "%2E") if name in {".", ".."} else name


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: str, data: bytes) -> None:
    """Write `data` as the whole of `path` and fsync it: one write, one fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _verify_image(path: str, image: bytes) -> None:
    """Re-read a written segment; raise `OSError` unless it is `image` to the byte.

    That comparison covers every row, the row counts and the checksum the image
    records in `archive_meta` (the image was built from the rows the checksum
    and counts were computed over), so the file is not opened again as SQLite to
    count its rows: what it would find is, byte for byte, what was built.
    """
    chunk = 1 << 20
    with open(path, "rb") as f:
        for start in range(0, max(len(image), 1), chunk):
            if f.read(chunk) != image[start : start + chunk]:
                raise OSError(f"read back bytes that differ from those written at offset {start}")
        if f.read(1):
            raise OSError(f"read back more than the {len(image)} bytes written")


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def _filesystem(url: str) -> Any:
    """The fsspec filesystem for `url` (imported only for URLs: local paths need no fsspec)."""
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec is a dependency
        raise RuntimeError(f"fsspec is needed for archive URL {url}") from exc
    fs, _ = fsspec.core.url_to_fs(url)
    return fs


def _strip_protocol(fs: Any, url: str) -> str:
    return str(fs._strip_protocol(url))


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


# -- writing -----------------------------------------------------------------


@dataclass(slots=True)
class _Table:
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]] = field(default_factory=list)


class Archive:
    """One store's archive during one sweep: hands out a segment per deleting batch."""

    def __init__(
        self,
        store: str,
        backend: Literal["sqlite", "postgres"],
        settings: ArchiveSettings,
        started: float,
    ) -> None:
        self.store = store
        self.backend = backend
        self.settings = settings
        self.started = started
        self.remote = _is_url(settings.path)
        self._fs: Any = _filesystem(settings.path) if self.remote else None
        root = _strip_protocol(self._fs, settings.path) if self.remote else settings.path
        self.store_dir = (
            _join(root, _dir_name(store)) if self.remote else os.path.join(root, _dir_name(store))
        )
        self._stamp = datetime.fromtimestamp(started, UTC).strftime("%Y%m%dT%H%M%SZ")
        self._sweep_dir: str | None = None
        self._local_dir: str | None = None
        """Where segments are written first: the sweep dir, or a temp dir for a URL."""
        self._lock: IO[bytes] | None = None
        self._next = 1
        self.segments_written = 0
        self.bytes_written = 0
        self.completed_rows: dict[str, int] = {}
        """Rows per table in segments this sweep completed (their delete committed)."""
        self.completed_bytes = 0
        """Bytes of the segments this sweep completed."""
        self._used: int | None = None
        """The store's archive size for `max_bytes`: one walk of its folder, plus the
        segments this Archive published since, less those it abandoned (`_size_with`)."""

    @property
    def sweep_dir(self) -> str | None:
        """This sweep's directory (None until the first segment is sealed)."""
        return self._sweep_dir

    def error(self, reason: str, path: str | None = None) -> ArchiveError:
        """An `ArchiveError` naming this store and `path` (default: its archive directory)."""
        shown = path or (self._shown(self.store_dir))
        return ArchiveError(self.store, shown, reason)

    def _shown(self, path: str) -> str:
        if self.remote:
            protocol = self._fs.protocol
            scheme = protocol[0] if isinstance(protocol, tuple | list) else protocol
            return f"{scheme}://{path}"
        return path

    def segment(self) -> Segment:
        """The next batch's segment (nothing is written until `seal`)."""
        number = self._next
        self._next += 1
        return Segment(self, number)

    def pending(self) -> list[PendingSegment]:
        """`.pending.sqlite` segments earlier runs left behind, oldest first.

        A sweep directory whose lock another live sweep holds is skipped: its
        pending segment may be a batch whose delete is committing right now.
        """
        found: list[PendingSegment] = []
        for sweep_dir in self._sweep_dirs():
            if sweep_dir == self._sweep_dir or self._is_live(sweep_dir):
                continue
            for name in self._list(sweep_dir):
                m = _SEGMENT_RE.match(name)
                if m and m[2]:
                    found.append(PendingSegment(self, self._path_in(sweep_dir, name)))
        return found

    def close(self) -> None:
        """Release this sweep's directory lock and any local temporary files."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self.remote and self._local_dir is not None:
            shutil.rmtree(self._local_dir, ignore_errors=True)
            self._local_dir = None

    # -- file system helpers --

    def _path_in(self, directory: str, name: str) -> str:
        return _join(directory, name) if self.remote else os.path.join(directory, name)

    def _list(self, directory: str) -> list[str]:
        if self.remote:
            try:
                entries = self._fs.ls(directory, detail=False)
            except FileNotFoundError:
                return []
            return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)
        try:
            return sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _sweep_dirs(self) -> list[str]:
        names = [n for n in self._list(self.store_dir) if _SWEEP_DIR_RE.match(n)]
        return [self._path_in(self.store_dir, n) for n in sorted(names, key=_sweep_order)]

    def _is_live(self, sweep_dir: str) -> bool:
        """Another sweep (any process on this host) still holds `sweep_dir`'s lock."""
        if self.remote:
            return False
        try:
            f = open(os.path.join(sweep_dir, LOCK_NAME), "rb")  # noqa: SIM115
        except FileNotFoundError:
            return False
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def _ensure_dirs(self) -> str:
        """Create this sweep's directory (once), locked against recovery by another sweep."""
        if self._local_dir is not None:
            return self._local_dir
        base = f"{self._stamp}-{os.getpid()}"
        try:
            if self.remote:
                self._fs.makedirs(self.store_dir, exist_ok=True)
                taken = set(self._list(self.store_dir))
                suffix = 0
                name = base
                while name in taken:
                    suffix += 1
                    name = f"{base}-{suffix}"
                self._sweep_dir = _join(self.store_dir, name)
                # A no-op on object stores; a file:// or sftp target needs the directory.
                self._fs.makedirs(self._sweep_dir, exist_ok=True)
                self._local_dir = tempfile.mkdtemp(prefix="janitor-archive-")
                return self._local_dir
            os.makedirs(self.store_dir, exist_ok=True)
            suffix = 0
            while True:
                name = base if suffix == 0 else f"{base}-{suffix}"
                path = os.path.join(self.store_dir, name)
                try:
                    os.mkdir(path)
                    break
                except FileExistsError:
                    suffix += 1
            lock = open(os.path.join(path, LOCK_NAME), "wb")  # noqa: SIM115
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._lock = lock
            _fsync_dir(self.store_dir)
        except OSError as exc:
            raise self.error(f"cannot create the archive directory: {exc.strerror or exc}") from exc
        self._sweep_dir = path
        self._local_dir = path
        return path

    def _size_with(self, size: int) -> int:
        """The archive's size once a sealed segment of `size` bytes is published.

        The folder is walked once per Archive (a sweep), not per segment, which
        made a sweep quadratic in its segments; this Archive's own segments are
        then added as it publishes them. Files others add to the folder during
        the sweep (a second sweep of the same store, an operator's copy) are
        not in that running total, and files others remove make it too high,
        so the folder is walked again whenever the total would pass
        `max_bytes`: a refusal is always decided on a fresh walk (one walk per
        refusal, not per segment), while an acceptance may miss others' bytes
        written since the sweep's first seal.
        """
        limit = self.settings.max_bytes
        if self._used is None or (limit is not None and self._used + size > limit):
            self._used = self._used_bytes()
            if not self.remote:
                self._used -= size  # the partial is already inside the directory
        return self._used + size

    def _published(self, size: int) -> None:
        """A segment of `size` bytes joined the archive (`_size_with`'s running total)."""
        if self._used is not None:
            self._used += size

    def _used_bytes(self) -> int:
        """Bytes in the store's archive folder, walked (or `du` for a URL)."""
        if self.remote:
            try:
                return int(self._fs.du(self.store_dir, total=True))
            except FileNotFoundError:
                return 0
        return _tree_bytes(self.store_dir)


def _sweep_order(name: str) -> tuple[str, int, int]:
    m = _SWEEP_DIR_RE.match(name)
    assert m is not None
    return (m[1], int(m[3] or 0), int(m[2]))


class Segment:
    """One deleting batch's archive: rows are collected, then sealed before the delete commits.

    Rows arrive two ways: `add` (values the engine already holds in Python:
    Postgres, and SQLite's rarer one-thread deletes) and `copy` (SQLite: an
    `INSERT INTO seg.<table> SELECT ...` run by SQLite itself from the store,
    no row crossing into Python). Both land in one in-memory database, the
    image that `seal` writes.
    """

    def __init__(self, archive: Archive, number: int) -> None:
        self.archive = archive
        self.number = number
        self._tables: dict[str, _Table] = {}
        self._state: Literal["open", "prepared", "pending", "complete", "abandoned"] = "open"
        self._partial: str | None = None
        """The verified `.partial` between `prepare` and `seal` (None when empty)."""
        self.path: str | None = None
        """Where the segment is now (its `.pending.sqlite` after `seal`, final after `complete`)."""
        self.bytes = 0
        self.counts: dict[str, int] = {}
        """Rows per table, as sealed."""
        self._db: sqlite3.Connection | None = None
        """The connection holding the image (attached as `seg`); its main is the
        store (read-only) once `open_source` was called."""
        self._db_lock = threading.Lock()
        """`copy` runs in a worker thread: closing waits for it."""
        self._state_lock = threading.Lock()
        """`prepare` (a worker thread the engine may stop waiting for) and `abandon`
        decide between them which one removes the `.partial`."""
        self._copied: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        """Seconds of the seal's steps (image, write with its fsync, publish), for logs."""
        self._columns: dict[str, tuple[str, ...]] = {}
        """Columns of each table created in the image."""

    @property
    def sealed(self) -> bool:
        """`seal` ran (or the segment was abandoned): its name counts, or it is gone."""
        return self._state not in ("open", "prepared")

    def open_source(self, uri: str) -> None:
        """Open the store (a read-only `file:` URI) for `copy`; before any `copy` or `add`.

        The copies read the store's last commit: called while the engine holds
        the write lock and before it commits, that is the state its deletes start from.
        """
        if self._db is not None:
            raise RuntimeError(f"segment {self.number} already has its database")
        try:
            self._db = self._connect(uri)
        except sqlite3.Error as exc:
            raise self.archive.error(f"cannot open the store to copy its rows: {exc}") from exc

    def _database(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._connect(":memory:")
        return self._db

    @staticmethod
    def _connect(uri: str) -> sqlite3.Connection:
        # check_same_thread off: `copy` and `seal` run in asyncio's worker threads,
        # one at a time (the engine awaits each), serialized by `_db_lock` besides.
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(ATTACH_IMAGE)
            conn.execute(IMAGE_PAGE_SIZE)
        except BaseException:
            conn.close()
            raise
        return conn

    def _create(self, table: str, columns: tuple[str, ...]) -> None:
        """Create `table` in the image (once); its columns must not change."""
        held = self._columns.get(table)
        if held is None:
            cols = ", ".join(f'"{c}"' for c in columns)
            self._database().execute(CREATE_IMAGE_TABLE.format(table=table, columns=cols))
            self._columns[table] = columns
        elif held != columns:
            raise ValueError(f"table {table!r} was added with columns {held}, now {columns}")

    def copy(
        self,
        table: str,
        columns: Sequence[str],
        select: str,
        params: Sequence[Any] | dict[str, Any],
    ) -> int:
        """Insert the rows `select` (run on the store opened by `open_source`) returns into
        the image's `table`, in SQL; the number of rows copied. Blocking: call in a thread."""
        if self._state != "open":
            raise RuntimeError(f"segment {self.number} is {self._state}")
        if self._db is None:
            raise RuntimeError(f"segment {self.number} has no source to copy from")
        if table == META_TABLE or not table:
            raise ValueError(f"reserved table name {table!r}")
        cols = tuple(columns)
        names = ", ".join(f'"{c}"' for c in cols)
        with self._db_lock:
            try:
                self._create(table, cols)
                copied = self._db.execute(
                    COPY_ROWS.format(table=table, columns=names, select=select), params
                ).rowcount
            except sqlite3.Error as exc:
                raise self.archive.error(f"cannot copy rows of {table}: {exc}") from exc
        self._copied[table] = self._copied.get(table, 0) + copied
        return copied

    def add(self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
        """Add rows of `table` (values exactly as the store returned them)."""
        if self._state != "open":
            raise RuntimeError(f"segment {self.number} is {self._state}")
        if table in (META_TABLE,) or not table:
            raise ValueError(f"reserved table name {table!r}")
        cols = tuple(columns)
        held = self._tables.get(table)
        if held is None:
            held = self._tables[table] = _Table(cols)
        elif held.columns != cols:
            raise ValueError(f"table {table!r} was added with columns {held.columns}, now {cols}")
        try:
            if {v.__class__ for row in rows for v in row} <= _STORED_TYPES:
                # What sqlite3 returns needs no conversion (most rows of a sweep).
                held.rows.extend(tuple(row) for row in rows)
            else:
                held.rows.extend(tuple(_normalize(v) for v in row) for row in rows)
        except TypeError as exc:
            raise self.archive.error(f"table {table}: {exc}") from exc

    def add_nulled_parents(self, rows: Sequence[tuple[str, str, str, str]]) -> None:
        """Record parent ids the batch sets to NULL on checkpoints it keeps."""
        self.add(NULLED_TABLE, NULLED_COLUMNS, rows)

    def empty(self) -> bool:
        """No row was added nor copied: nothing to seal."""
        return not any(t.rows for t in self._tables.values()) and not any(self._copied.values())

    def added_threads(self) -> set[str]:
        """Threads with rows given by `add` (thread_id is every table's first column)."""
        return {str(row[0]) for t in self._tables.values() for row in t.rows}

    def rows(self, table: str) -> int:
        """Rows added to (or copied into) `table` so far."""
        held = self._tables.get(table)
        return (len(held.rows) if held else 0) + self._copied.get(table, 0)

    def close(self) -> None:
        """Drop the image (after a seal wrote it, or with the batch abandoned)."""
        with self._db_lock:
            if self._db is not None:
                db, self._db = self._db, None
                db.close()

    def prepare(self) -> None:
        """The seal's first half: build the image, write the `.partial` and fsync it once,
        re-read it (the same bytes), and check the size limit. No name that counts
        exists yet: a crash now leaves a `.partial`, which never counts.

        A SQLite engine prepares before it takes the write lock when it can (see
        `worker.stores.sqlite`); `seal` then only publishes, under the lock.
        Raises `ArchiveError` (leaving no file behind) when any step fails or the
        store's archive would pass `max_bytes`. An empty segment writes nothing.
        """
        if self._state != "open":
            raise RuntimeError(f"segment {self.number} is {self._state}")
        if self.empty():
            self._state = "prepared"
            self.close()
            return
        archive = self.archive
        partial = os.path.join(archive._ensure_dirs(), f"{self.number:06d}{PARTIAL_SUFFIX}")
        try:
            clock = time.monotonic()
            image = self._image()
            self.timings["image"] = time.monotonic() - clock
            _write_synced(partial, image)
            self.timings["write"] = time.monotonic() - clock - self.timings["image"]
            _verify_image(partial, image)
            self.bytes = len(image)
            del image
            limit = archive.settings.max_bytes
            if limit is not None and (total := archive._size_with(self.bytes)) > limit:
                raise _Refused(
                    f"segment of {self.bytes} bytes would bring the archive to "
                    f"{total} bytes, past max_bytes {limit}; nothing deleted"
                )
        except BaseException as exc:
            _remove(partial)
            self._raise(exc)
        finally:
            self.close()
        with self._state_lock:
            if self.sealed:
                # Abandoned while this thread wrote (a cancelled batch does not wait for
                # it): nobody else knows the file.
                _remove(partial)
                return
            self._partial = partial
            self._state = "prepared"

    def _raise(self, exc: BaseException) -> NoReturn:
        """Raise a failed seal step as an `ArchiveError` naming the segment (`exc` itself
        when it is no error of the archive's, such as a cancellation)."""
        archive = self.archive
        if isinstance(exc, _Refused):
            raise archive.error(str(exc)) from None
        if isinstance(exc, OSError | sqlite3.Error):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise archive.error(
                f"cannot write segment {self.number:06d}: {reason}; nothing deleted",
                archive._shown(archive.sweep_dir or archive.store_dir),
            ) from exc
        if isinstance(exc, Exception):  # fsspec backends raise their own errors
            raise archive.error(
                f"cannot write segment {self.number:06d}: {exc}; nothing deleted"
            ) from exc
        raise exc

    def seal(self) -> None:
        """Prepare the segment (unless `prepare` already did), then rename the verified
        `.partial` to `.pending.sqlite` and fsync the directory once: from then on the
        store's delete may commit.

        Raises `ArchiveError` (leaving no file behind) when any step fails.
        """
        if self._state == "open":
            self.prepare()
        if self._state != "prepared":
            raise RuntimeError(f"segment {self.number} is {self._state}")
        partial, self._partial = self._partial, None
        if partial is not None:
            try:
                clock = time.monotonic()
                self.path = self._publish(partial)
                self.timings["publish"] = time.monotonic() - clock
            except BaseException as exc:
                _remove(partial)
                self._state = "abandoned"
                self._raise(exc)
            self.archive._published(self.bytes)
            self.archive.segments_written += 1
            self.archive.bytes_written += self.bytes
        self._state = "pending"

    def _image(self) -> bytes:
        """The segment as the bytes of a SQLite database file, its checksum written in.

        Built in memory, not in the `.partial` itself: a `.partial` never counts,
        so a journal and the fsyncs of its commit would buy nothing, and the
        bytes in hand let the seal compare the file it wrote with them exactly.
        The checksum is taken over the image's pages (`page_checksum`), with a
        placeholder in `archive_meta`, then written in place of it; the pages it
        covers do not change, which the image is checked for once more.
        """
        with self._db_lock:
            db = self._database()
            db.execute("BEGIN")
            try:
                for name, t in sorted(self._tables.items()):
                    self._create(name, t.columns)
                    cols = ", ".join(f'"{c}"' for c in t.columns)
                    marks = ", ".join("?" * len(t.columns))
                    db.executemany(
                        INSERT_IMAGE_ROW.format(table=name, columns=cols, marks=marks), t.rows
                    )
                self._tables.clear()
                self.counts = self._counted(db)
                db.execute(CREATE_IMAGE_META)
                meta = self._meta(_CHECKSUM_PLACEHOLDER)
                db.executemany(INSERT_IMAGE_META, sorted(meta.items()))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            (root,) = db.execute(IMAGE_META_ROOT).fetchone()
            expected = page_checksum(db.serialize(name=IMAGE_SCHEMA), root)
            db.execute(SET_IMAGE_CHECKSUM, (expected, CHECKSUM_KEY))
            image = db.serialize(name=IMAGE_SCHEMA)
            if page_checksum(image, root) != expected:
                raise RuntimeError(f"segment {self.number}: writing the checksum moved its pages")
            return image

    def _counted(self, db: sqlite3.Connection) -> dict[str, int]:
        """Rows per table of the image; empty tables are dropped (a segment holds the
        tables it has rows for)."""
        counts: dict[str, int] = {}
        for name in sorted(self._columns):
            (n,) = db.execute(COUNT_IMAGE_ROWS.format(table=name)).fetchone()
            if n:
                counts[name] = int(n)
            else:
                db.execute(DROP_IMAGE_TABLE.format(table=name))
        return counts

    def _meta(self, expected: str) -> dict[str, str]:
        archive = self.archive
        return {
            "format_version": str(FORMAT_VERSION),
            "store": archive.store,
            "backend": archive.backend,
            "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "sweep_started": datetime.fromtimestamp(archive.started, UTC).isoformat(),
            "segment": str(self.number),
            "tool": "checkpoint-janitor",
            "tool_version": _tool_version(),
            "checksum_method": PAGE_CHECKSUM,
            CHECKSUM_KEY: expected,
            **{f"rows.{name}": str(n) for name, n in sorted(self.counts.items())},
        }

    def _publish(self, partial: str) -> str:
        """Move a verified partial to its `.pending.sqlite` name (uploading it for a URL)."""
        archive = self.archive
        name = f"{self.number:06d}{PENDING_SUFFIX}"
        if not archive.remote:
            pending = os.path.join(os.path.dirname(partial), name)
            os.replace(partial, pending)
            _fsync_dir(os.path.dirname(pending))
            return pending
        assert archive.sweep_dir is not None
        remote = _join(archive.sweep_dir, name)
        fs = archive._fs
        fs.put_file(partial, remote)
        back = partial + ".readback"
        try:
            fs.get_file(remote, back)
            if os.path.getsize(back) != os.path.getsize(partial) or _file_sha256(
                back
            ) != _file_sha256(partial):
                with contextlib.suppress(Exception):
                    fs.rm_file(remote)
                raise OSError(f"uploaded {archive._shown(remote)} reads back different")
        finally:
            _remove(back)
            _remove(partial)
        return remote

    def complete(self) -> None:
        """The batch's delete committed: give the segment its final name."""
        if self._state != "pending":
            raise RuntimeError(f"segment {self.number} is {self._state}, not pending")
        self._state = "complete"
        if self.path is None:
            return
        archive = self.archive
        for table, n in self.counts.items():
            archive.completed_rows[table] = archive.completed_rows.get(table, 0) + n
        archive.completed_bytes += self.bytes
        self.path = _promote(archive, self.path)

    def abandon(self) -> None:
        """The batch's delete rolled back: remove the segment."""
        with self._state_lock:
            abandoning = self._state in ("open", "prepared")
            if abandoning:
                self._state = "abandoned"
                partial, self._partial = self._partial, None
        if abandoning:
            # A `.partial` never counts: removing it needs no fsync. One a `prepare`
            # still writing makes, that `prepare` removes.
            self.close()
            if partial is not None:
                _remove(partial)
            return
        if self._state != "pending":
            raise RuntimeError(f"segment {self.number} is {self._state}, not pending")
        self._state = "abandoned"
        if self.path is not None:
            _discard(self.archive, self.path)
            self.archive._published(-self.bytes)
            self.path = None


class _Refused(Exception):
    """The size limit refuses a segment (not an I/O failure)."""


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _final_name(pending: str) -> str:
    assert pending.endswith(PENDING_SUFFIX)
    return pending[: -len(PENDING_SUFFIX)] + COMPLETE_SUFFIX


def _promote(archive: Archive, pending: str) -> str:
    final = _final_name(pending)
    try:
        if archive.remote:
            archive._fs.copy(pending, final)
            archive._fs.rm_file(pending)
        else:
            # No folder fsync: a rename lost to a crash leaves the `.pending.sqlite`,
            # whose rows are gone from the store, and recovery promotes it.
            os.replace(pending, final)
    except Exception as exc:
        raise archive.error(f"cannot complete the segment: {exc}", archive._shown(pending)) from exc
    return final


def _discard(archive: Archive, pending: str) -> None:
    try:
        if archive.remote:
            archive._fs.rm_file(pending)
        else:
            _remove(pending)
            _fsync_dir(os.path.dirname(pending))
    except FileNotFoundError:
        pass
    except Exception as exc:
        raise archive.error(f"cannot remove the segment: {exc}", archive._shown(pending)) from exc


@functools.cache
def _tool_version() -> str:
    try:
        return metadata.version("checkpoint-janitor")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        return "unknown"


# -- reading -----------------------------------------------------------------


def _connect_ro(path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)


def _verify_pages(path: str) -> tuple[dict[str, int], str]:
    """Row counts per table and version 3's checksum, recomputed from the file."""
    conn = _connect_ro(path)
    try:
        counts: dict[str, int] = {}
        for (name,) in conn.execute(LIST_TABLES).fetchall():
            if name != META_TABLE:
                (counts[name],) = conn.execute(COUNT_ROWS.format(table=name)).fetchone()
        (root,) = conn.execute(META_ROOT).fetchone()
    finally:
        conn.close()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            return counts, page_checksum(data, int(root))
        except ValueError as exc:
            raise sqlite3.DatabaseError(str(exc)) from exc


def _verify_file(path: str, method: ChecksumMethod) -> tuple[dict[str, int], str]:
    """Row counts per table and the row checksum by `method` (versions 1 and 2),
    recomputed from the file's rows."""
    conn = _connect_ro(path)
    try:
        counts: dict[str, int] = {}
        parts: list[tuple[str, list[str], list[bytes]]] = []
        for (name,) in conn.execute(LIST_TABLES).fetchall():
            if name == META_TABLE:
                continue
            columns = [c for (c,) in conn.execute(TABLE_COLUMNS, (name,))]
            cols = ", ".join(f'"{c}"' for c in columns)
            digests = [
                row_digest(r, method)
                for r in conn.execute(SELECT_ROWS.format(columns=cols, table=name, where=""))
            ]
            counts[name] = len(digests)
            parts.append((name, columns, digests))
        return counts, checksum(parts, method)
    finally:
        conn.close()


class SegmentReader:
    """One sealed segment (complete or pending), read with plain sqlite3."""

    def __init__(self, location: str, local_path: str, *, pending: bool, remote: bool) -> None:
        self.location = location
        """Where the segment is (path or URL), for messages."""
        self.local_path = local_path
        self.pending = pending
        """A `.pending.sqlite` segment: its batch's delete may not have committed."""
        self._remote = remote
        self._meta: dict[str, str] | None = None

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the local copy of a downloaded segment."""
        if self._remote:
            _remove(self.local_path)

    def _connect(self) -> sqlite3.Connection:
        try:
            return _connect_ro(self.local_path)
        except sqlite3.Error as exc:
            raise ArchiveError("?", self.location, f"cannot open: {exc}") from exc

    @property
    def meta(self) -> dict[str, str]:
        """The segment's `archive_meta` as a dict."""
        if self._meta is None:
            conn = self._connect()
            try:
                self._meta = dict(conn.execute(READ_META).fetchall())
            except sqlite3.Error as exc:
                raise ArchiveError("?", self.location, f"not an archive segment: {exc}") from exc
            finally:
                conn.close()
        return self._meta

    @property
    def store(self) -> str:
        """The store the rows were deleted from."""
        return self.meta.get("store", "?")

    @property
    def backend(self) -> str:
        """`sqlite` or `postgres`: which saver's tables the segment holds."""
        return self.meta.get("backend", "?")

    def tables(self) -> list[str]:
        """The tables of deleted rows (not `nulled_parents` nor `archive_meta`), by name."""
        conn = self._connect()
        try:
            return [
                n
                for (n,) in conn.execute(LIST_TABLES).fetchall()
                if n not in (META_TABLE, NULLED_TABLE)
            ]
        finally:
            conn.close()

    def columns(self, table: str) -> list[str]:
        """The column names of `table`, in order."""
        conn = self._connect()
        try:
            return [c for (c,) in conn.execute(TABLE_COLUMNS, (table,))]
        finally:
            conn.close()

    def rows(self, table: str, select: Selection | None = None) -> Iterator[tuple[Any, ...]]:
        """The archived rows of `table` (columns as `columns(table)`) of the selected threads."""
        columns = self.columns(table)
        if not columns:
            return
        where, params = (select or Selection()).where()
        cols = ", ".join(f'"{c}"' for c in columns)
        conn = self._connect()
        try:
            yield from conn.execute(
                SELECT_ROWS.format(columns=cols, table=table, where=where), params
            )
        finally:
            conn.close()

    def nulled_parents(self, select: Selection | None = None) -> list[tuple[str, str, str, str]]:
        """(thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id) the batch set to NULL."""
        return [(str(a), str(b), str(c), str(d)) for a, b, c, d in self.rows(NULLED_TABLE, select)]

    def counts(self, select: Selection | None = None) -> dict[str, dict[str, int]]:
        """thread_id -> table -> archived rows of the selected threads (nulled parents included)."""
        out: dict[str, dict[str, int]] = {}
        where, params = (select or Selection()).where()
        conn = self._connect()
        try:
            names = [n for (n,) in conn.execute(LIST_TABLES).fetchall() if n != META_TABLE]
            for table in names:
                sql = f'SELECT thread_id, count(*) FROM "{table}"{where} GROUP BY thread_id'
                for thread_id, n in conn.execute(sql, params):
                    out.setdefault(thread_id, {})[table] = n
        finally:
            conn.close()
        return out

    def holds(self, select: Selection) -> bool:
        """Whether the segment holds any row of the selected threads (always true for all).

        One `LIMIT 1` query per table (nulled parents included): much less than
        `verify`, which digests every row. Raises `ArchiveError` when the file
        cannot be read as a segment, since whether it holds selected rows is
        then unknown and a restore must not pass it by.
        """
        if select.kind == "all":
            return True
        where, params = select.where()
        conn = self._connect()
        try:
            conn.execute(MAP_SEGMENT)
            for (name,) in conn.execute(LIST_TABLES).fetchall():
                columns = {c for (c,) in conn.execute(TABLE_COLUMNS, (name,))}
                if name == META_TABLE or "thread_id" not in columns:
                    continue
                if conn.execute(HOLDS_SELECTED.format(table=name, where=where), params).fetchone():
                    return True
            return False
        except sqlite3.Error as exc:
            raise ArchiveError(self.store, self.location, f"unreadable: {exc}") from exc
        finally:
            conn.close()

    def verify(self) -> None:
        """Raise `ArchiveError` unless the rows match the counts and checksum in `archive_meta`."""
        try:
            meta = self.meta
        except sqlite3.Error as exc:
            raise ArchiveError(self.store, self.location, f"unreadable: {exc}") from exc
        version = str(meta.get("format_version"))
        method = READABLE_VERSIONS.get(version)
        if method is None or meta.get("checksum_method", method) != method:
            raise ArchiveError(
                self.store,
                self.location,
                f"format_version {meta.get('format_version')!r}, "
                f"checksum_method {meta.get('checksum_method')!r}",
            )
        rows = ROW_CHECKSUM_VERSIONS.get(version)
        key = rows.key if rows is not None else CHECKSUM_KEY
        try:
            if rows is None:
                counts, found = _verify_pages(self.local_path)
            else:
                counts, found = _verify_file(self.local_path, rows)
        except (sqlite3.Error, OSError) as exc:
            raise ArchiveError(self.store, self.location, f"unreadable: {exc}") from exc
        want = {k[5:]: int(v) for k, v in meta.items() if k.startswith("rows.")}
        if counts != want:
            raise ArchiveError(self.store, self.location, f"row counts {counts} != meta {want}")
        if found != meta.get(key):
            raise ArchiveError(self.store, self.location, "checksum mismatch: a row was changed")


class PendingSegment:
    """A `.pending.sqlite` an earlier run left: its delete may or may not have committed."""

    def __init__(self, archive: Archive, path: str) -> None:
        self.archive = archive
        self.path = path
        self.reader = _reader(archive.remote, archive._fs, path, archive._shown(path))

    def valid(self) -> bool:
        """The segment verifies. One that does not was never sealed, so its delete never ran."""
        try:
            self.reader.verify()
        except ArchiveError:
            return False
        return True

    def promote(self) -> None:
        """Its rows are gone from the store: the delete committed, so it is complete."""
        self.reader.close()
        _promote(self.archive, self.path)

    def discard(self) -> None:
        """Its rows are still in the store: the delete never committed, so remove it."""
        self.reader.close()
        _discard(self.archive, self.path)
        # Not this Archive's segment: its size is the next walk's to see.
        self.archive._used = None


def _reader(remote: bool, fs: Any, path: str, shown: str) -> SegmentReader:
    pending = path.endswith(PENDING_SUFFIX)
    if not remote:
        return SegmentReader(path, path, pending=pending, remote=False)
    fd, local = tempfile.mkstemp(prefix="janitor-segment-", suffix=".sqlite")
    os.close(fd)
    fs.get_file(path, local)
    return SegmentReader(shown, local, pending=pending, remote=True)


def read_segments(path: str, store: str | None = None) -> Iterator[SegmentReader]:
    """Every complete and pending segment under `path`, oldest first.

    `path` may be the archive root (the `path` of the config), a store's
    directory, a sweep's directory or one segment file; `store` keeps the
    segments of that store only (by their `archive_meta`). `.partial` files
    are never read.
    """
    remote = _is_url(path)
    fs: Any = _filesystem(path) if remote else None
    found: list[tuple[tuple[str, int, int], int, str]] = []

    def shown(p: str) -> str:
        if not remote:
            return p
        protocol = fs.protocol
        return f"{protocol[0] if isinstance(protocol, tuple | list) else protocol}://{p}"

    root = _strip_protocol(fs, path) if remote else path
    if remote:
        candidates = [str(p) for p in fs.find(root)] if fs.isdir(root) else [root]
    elif os.path.isfile(root):
        candidates = [root]
    else:
        candidates = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
    for candidate in candidates:
        parts = candidate.replace(os.sep, "/").rstrip("/").split("/")
        m = _SEGMENT_RE.match(parts[-1])
        if not m:
            continue
        sweep = parts[-2] if len(parts) >= 2 else ""
        order = _sweep_order(sweep) if _SWEEP_DIR_RE.match(sweep) else ("", 0, 0)
        found.append((order, int(m[1]), candidate))
    found.sort()

    def generate() -> Iterator[SegmentReader]:
        for _order, _n, candidate in found:
            reader = _reader(remote, fs, candidate, shown(candidate))
            try:
                if store is not None and reader.store != store:
                    reader.close()
                    continue
            except ArchiveError:
                reader.close()
                raise
            yield reader

    return generate()
