"""The archive format (worker/stores/archive.py) on its own, and sweeps that archive."""

from __future__ import annotations

import contextlib
import gzip
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import xxhash

from worker.stores import archive as archive_module
from worker.stores.archive import (
    FORMAT_VERSION,
    NULLED_COLUMNS,
    Archive,
    ArchiveError,
    ArchiveSettings,
    Selection,
    checksum,
    read_segments,
    row_digest,
)

CHECKPOINT_COLUMNS = (
    "thread_id",
    "checkpoint_ns",
    "checkpoint_id",
    "parent_checkpoint_id",
    "type",
    "checkpoint",
    "metadata",
)
WRITE_COLUMNS = (
    "thread_id",
    "checkpoint_ns",
    "checkpoint_id",
    "task_id",
    "idx",
    "channel",
    "type",
    "value",
)


def _rows(thread: str, n: int) -> list[tuple[Any, ...]]:
    return [
        (
            thread,
            "",
            f"id-{i:03d}",
            f"id-{i - 1:03d}" if i else None,
            "msgpack",
            bytes([i]) * 5,
            b"{}",
        )
        for i in range(n)
    ]


def _filled(archive: Archive) -> Any:
    seg = archive.segment()
    seg.add("checkpoints", CHECKPOINT_COLUMNS, _rows("t1", 3) + _rows("t2", 2))
    seg.add("writes", WRITE_COLUMNS, [("t1", "", "id-000", "task", -1, "__error__", "json", b"x")])
    seg.add_nulled_parents([("t1", "", "id-003", "id-002")])
    return seg


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_seal_writes_a_pending_segment_that_reads_back_exactly(tmp_path: Path) -> None:
    archive = Archive("main", "sqlite", ArchiveSettings(str(tmp_path)), time.time())
    seg = _filled(archive)
    seg.seal()
    assert seg.path is not None and seg.path.endswith("000001.pending.sqlite")
    assert not [f for f in _files(tmp_path) if "partial" in f]
    [reader] = list(read_segments(str(tmp_path)))
    assert reader.pending
    reader.verify()
    assert reader.meta["format_version"] == str(FORMAT_VERSION)
    assert reader.meta["store"] == "main" and reader.backend == "sqlite"
    assert reader.meta["rows.checkpoints"] == "5" and reader.meta["rows.writes"] == "1"
    assert sorted(reader.rows("checkpoints")) == sorted(_rows("t1", 3) + _rows("t2", 2))
    assert list(reader.rows("checkpoints", Selection(thread_id="t2"))) == _rows("t2", 2)
    assert reader.nulled_parents() == [("t1", "", "id-003", "id-002")]
    assert reader.counts(Selection(prefix="t1")) == {
        "t1": {"checkpoints": 3, "writes": 1, "nulled_parents": 1}
    }
    # Readable with plain sqlite3, in the saver's own column names and types.
    conn = sqlite3.connect(reader.local_path)
    assert conn.execute("SELECT typeof(idx), typeof(value) FROM writes").fetchone() == (
        "integer",
        "blob",
    )
    conn.close()

    seg.complete()
    assert seg.path.endswith("000001.sqlite")
    [reader] = list(read_segments(str(tmp_path), store="main"))
    assert not reader.pending
    reader.verify()
    assert list(read_segments(str(tmp_path), store="other")) == []
    archive.close()


def test_seal_fsyncs_the_file_then_renames_then_fsyncs_the_folder_once_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The durable order the delete relies on, with no fsync beyond it: the
    `.partial` is synced whole before it gets the `.pending` name, and the folder
    (so the name) is synced after, before `seal` returns."""
    archive = Archive("main", "sqlite", ArchiveSettings(str(tmp_path)), time.time())
    seg = _filled(archive)
    archive._ensure_dirs()  # the sweep folder's own creation is not the seal's
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def recording_replace(src: str, dst: str) -> None:
        events.append(("rename", f"{os.path.basename(src)}>{os.path.basename(dst)}"))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    seg.seal()
    monkeypatch.undo()
    sweep_dir = os.path.basename(str(archive.sweep_dir))
    assert events == [
        ("fsync", "000001.partial"),
        ("rename", "000001.partial>000001.pending.sqlite"),
        ("fsync", sweep_dir),
    ]
    [reader] = list(read_segments(str(tmp_path)))
    reader.verify()
    assert sorted(reader.rows("checkpoints")) == sorted(_rows("t1", 3) + _rows("t2", 2))
    archive.close()


def test_abandon_removes_the_segment(tmp_path: Path) -> None:
    archive = Archive("main", "sqlite", ArchiveSettings(str(tmp_path)), time.time())
    seg = _filled(archive)
    seg.seal()
    seg.abandon()
    assert list(read_segments(str(tmp_path))) == []
    archive.close()


def test_an_empty_segment_writes_nothing(tmp_path: Path) -> None:
    archive = Archive("main", "sqlite", ArchiveSettings(str(tmp_path)), time.time())
    seg = archive.segment()
    assert seg.empty()
    seg.seal()
    seg.complete()
    assert _files(tmp_path) == []


def test_a_partial_is_never_read(tmp_path: Path) -> None:
    archive = Archive("main", "sqlite", ArchiveSettings(str(tmp_path)), time.time())
    seg = _filled(archive)
    seg.seal()
    seg.complete()
    sweep_dir = Path(archive.sweep_dir or "")
    (sweep_dir / "000002.partial").write_bytes(b"SQLite format 3\x00 torn write")
    archive.close()
    assert [r.meta["segment"] for r in read_segments(str(tmp_path))] == ["1"]
    later = Archive("main", "sqlite", ArchiveSettings(str(tmp_path)), time.time() + 5)
    assert later.pending() == []


def test_the_checksum_catches_a_changed_row(tmp_path: Path) -> None:
    archive = Archive("main", "sqlite", ArchiveSettings(str(tmp_path)), time.time())
    seg = _filled(archive)
    seg.seal()
    seg.complete()
    assert seg.path is not None
    conn = sqlite3.connect(seg.path)
    conn.execute("UPDATE checkpoints SET checkpoint = X'00' WHERE checkpoint_id = 'id-001'")
    conn.commit()
    conn.close()
    [reader] = list(read_segments(str(tmp_path)))
    with pytest.raises(ArchiveError, match="checksum mismatch"):
        reader.verify()


V1_SEGMENT = Path(__file__).parent / "data" / "segment-v1.sqlite.gz"
"""A format version 1 segment (checksum `row-sha256-sorted-v1`) as the version 1 writer
(commit 499b128) sealed it: `_filled`'s rows, store `main`."""


def _v1_segment(root: Path) -> Path:
    """The version 1 segment, unpacked where `read_segments` finds it."""
    path = root / "main" / "20261201T223245Z-11911" / "000001.sqlite"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.decompress(V1_SEGMENT.read_bytes()))
    return path


def test_new_segments_are_version_3_with_a_page_checksum(tmp_path: Path) -> None:
    """Segments are written as format version 3, `page-xxh3-128-v3`: the checksum is the
    documented one (recomputed here from the file's bytes with xxhash, not the module's
    code), and a row changed afterwards, or a byte of a data page, is refused."""
    archive = Archive("main", "sqlite", ArchiveSettings(str(tmp_path)), time.time())
    seg = _filled(archive)
    seg.seal()
    seg.complete()
    [reader] = list(read_segments(str(tmp_path)))
    meta = reader.meta
    assert (meta["format_version"], meta["checksum_method"]) == ("3", "page-xxh3-128-v3")
    assert "sha256" not in meta
    assert seg.path is not None
    data = Path(seg.path).read_bytes()
    with contextlib.closing(sqlite3.connect(seg.path)) as conn:
        (page,) = conn.execute("PRAGMA page_size").fetchone()
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'archive_meta'"
        ).fetchone()
    documented = xxhash.xxh3_128(data[100 : (root - 1) * page] + data[root * page :]).hexdigest()
    assert meta["xxh3_128"] == documented
    reader.verify()
    with contextlib.closing(sqlite3.connect(seg.path)) as conn:
        conn.execute("UPDATE writes SET idx = -2")
        conn.commit()
    with pytest.raises(ArchiveError, match="checksum mismatch"):
        reader.verify()
    # One bit of a row flipped on disk, no SQL (a torn or rotten page): refused too.
    damaged = bytearray(data)
    damaged[damaged.index(b"__error__")] ^= 0x01
    Path(seg.path).write_bytes(bytes(damaged))
    with pytest.raises(ArchiveError, match="checksum mismatch"):
        reader.verify()


V2_SEGMENT = Path(__file__).parent / "data" / "segment-v2.sqlite.gz"
"""A format version 2 segment (checksum `row-xxh3-128-sorted-v2`) as the version 2 writer
(commit 292d0ac) sealed it: `_filled`'s rows, store `main`."""


def test_a_version_2_segment_still_verifies_and_reads(tmp_path: Path) -> None:
    """A segment the version 2 writer sealed (row xxh3 checksum, as documented) verifies
    and reads back its rows; a row changed in it is refused."""
    path = tmp_path / "main" / "20261202T011203Z-15277" / "000001.sqlite"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.decompress(V2_SEGMENT.read_bytes()))
    [reader] = list(read_segments(str(tmp_path), "main"))
    meta = reader.meta
    assert (meta["format_version"], meta["checksum_method"]) == ("2", "row-xxh3-128-sorted-v2")
    rows = {
        "checkpoints": (CHECKPOINT_COLUMNS, _rows("t1", 3) + _rows("t2", 2)),
        "nulled_parents": (NULLED_COLUMNS, [("t1", "", "id-003", "id-002")]),
        "writes": (WRITE_COLUMNS, [("t1", "", "id-000", "task", -1, "__error__", "json", b"x")]),
    }
    assert meta["xxh3_128"] == _documented_checksum(rows, xxhash.xxh3_128, xxhash.xxh3_128_digest)
    reader.verify()
    assert sorted(reader.rows("checkpoints")) == sorted(_rows("t1", 3) + _rows("t2", 2))
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE writes SET idx = -2")
        conn.commit()
    with pytest.raises(ArchiveError, match="checksum mismatch"):
        reader.verify()


def _documented_checksum(
    tables: dict[str, tuple[Sequence[str], list[tuple[Any, ...]]]],
    new: Callable[[], Any],
    row_hash: Callable[[bytes], bytes],
) -> str:
    """The checksum as README "Getting data back" defines it (ints, text, blobs, NULL)."""

    def encode(v: Any) -> bytes:
        if v is None:
            return b"N"
        if isinstance(v, int):
            return f"I{v};".encode()
        data = v.encode() if isinstance(v, str) else v
        return (b"T" if isinstance(v, str) else b"B") + f"{len(data)}:".encode() + data

    h = new()
    for name, (columns, table_rows) in sorted(tables.items()):
        h.update(f"table:{name}\n{','.join(columns)}\n".encode())
        for d in sorted(row_hash(b"".join(encode(v) for v in r)) for r in table_rows):
            h.update(d)
    return str(h.hexdigest())


def test_a_version_1_segment_still_verifies_and_reads(tmp_path: Path) -> None:
    """A segment the version 1 writer sealed (SHA-256 checksum) verifies and reads back its
    rows; a row changed in it is refused, as in version 1."""
    path = _v1_segment(tmp_path)
    [reader] = list(read_segments(str(tmp_path), "main"))
    assert (reader.meta["format_version"], reader.meta["checksum_method"]) == (
        "1",
        "row-sha256-sorted-v1",
    )
    reader.verify()
    assert sorted(reader.rows("checkpoints")) == sorted(_rows("t1", 3) + _rows("t2", 2))
    assert reader.nulled_parents() == [("t1", "", "id-003", "id-002")]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE checkpoints SET checkpoint = X'00' WHERE checkpoint_id = 'id-001'")
        conn.commit()
    with pytest.raises(ArchiveError, match="checksum mismatch"):
        reader.verify()


def test_a_segment_whose_method_does_not_match_its_version_is_refused(tmp_path: Path) -> None:
    """A reader takes the checksum method from the format version: a version 1 segment
    claiming another method (or an unknown version) is refused, not verified loosely."""
    path = _v1_segment(tmp_path)
    for key, value in (("checksum_method", "row-xxh3-128-sorted-v2"), ("format_version", "9")):
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("UPDATE archive_meta SET value = ? WHERE key = ?", (value, key))
            conn.commit()
        [reader] = list(read_segments(str(tmp_path), "main"))
        with pytest.raises(ArchiveError, match="format_version"):
            reader.verify()


def test_the_checksum_ignores_row_order_but_not_types() -> None:
    rows = _rows("t", 4)
    forward = checksum([("checkpoints", CHECKPOINT_COLUMNS, [row_digest(r) for r in rows])])
    backward = checksum([("checkpoints", CHECKPOINT_COLUMNS, [row_digest(r) for r in rows[::-1]])])
    assert forward == backward
    assert row_digest(("1",)) != row_digest((1,)) != row_digest((b"1",))


def test_max_bytes_refuses_a_segment_and_leaves_nothing(tmp_path: Path) -> None:
    archive = Archive("main", "sqlite", ArchiveSettings(str(tmp_path), max_bytes=1000), time.time())
    seg = _filled(archive)
    with pytest.raises(ArchiveError, match="max_bytes 1000") as info:
        seg.seal()
    assert "'main'" in str(info.value) and str(tmp_path) in str(info.value)
    assert [f for f in _files(tmp_path) if f.endswith(".sqlite") or "partial" in f] == []


def _segment_bytes(tmp_path: Path) -> int:
    """The size of a `_filled` segment, sealed in a folder of its own (page-sized, so fixed)."""
    scratch = Archive("main", "sqlite", ArchiveSettings(str(tmp_path / "scratch")), time.time())
    seg = _filled(scratch)
    seg.seal()
    scratch.close()
    return int(seg.bytes)


def test_max_bytes_walks_the_folder_once_per_sweep_not_per_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = _segment_bytes(tmp_path)
    walks: list[str] = []
    walk = archive_module._tree_bytes

    def counted(path: str) -> int:
        walks.append(path)
        return walk(path)

    monkeypatch.setattr(archive_module, "_tree_bytes", counted)
    root = tmp_path / "archive"
    earlier = Archive("main", "sqlite", ArchiveSettings(str(root)), time.time() - 60)
    _filled(earlier).seal()
    earlier.close()
    # Room for the earlier segment and three of this sweep's, not a fourth.
    settings = ArchiveSettings(str(root), max_bytes=4 * size + size // 2)
    archive = Archive("main", "sqlite", settings, time.time())
    for _ in range(2):
        seg = _filled(archive)
        seg.seal()
        seg.complete()
    gone = _filled(archive)
    gone.seal()
    gone.abandon()  # its bytes leave the running total with its file
    _filled(archive).seal()
    assert len(walks) == 1
    with pytest.raises(ArchiveError, match=f"to {5 * size} bytes, past max_bytes"):
        _filled(archive).seal()
    # The refusal is decided on a fresh walk, which agrees with the running total.
    assert len(walks) == 2
    mine, theirs = (os.path.basename(a.sweep_dir or "") for a in (archive, earlier))
    kept = [f"{mine}/000001.sqlite", f"{mine}/000002.sqlite", f"{mine}/000004.pending.sqlite"]
    assert [f for f in _files(Path(archive.store_dir)) if f.endswith(".sqlite")] == sorted(
        [*kept, f"{theirs}/000001.pending.sqlite"]
    )
    archive.close()


def test_max_bytes_sees_segments_removed_during_the_sweep(tmp_path: Path) -> None:
    size = _segment_bytes(tmp_path)
    root = tmp_path / "archive"
    earlier = Archive("main", "sqlite", ArchiveSettings(str(root)), time.time() - 60)
    _filled(earlier).seal()
    earlier.close()
    settings = ArchiveSettings(str(root), max_bytes=2 * size + size // 2)
    archive = Archive("main", "sqlite", settings, time.time())
    _filled(archive).seal()
    # An operator prunes the earlier sweep: the running total is now too high,
    # and the walk before a refusal finds the room.
    assert earlier.sweep_dir is not None
    os.remove(os.path.join(earlier.sweep_dir, "000001.pending.sqlite"))
    _filled(archive).seal()
    archive.close()


def test_a_path_under_a_regular_file_fails_with_store_and_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    archive = Archive("main", "sqlite", ArchiveSettings(str(blocker / "archive")), time.time())
    with pytest.raises(ArchiveError, match="cannot create the archive directory") as info:
        _filled(archive).seal()
    assert "'main'" in str(info.value) and "file/archive" in str(info.value)


def test_pending_finds_segments_of_finished_runs_only(tmp_path: Path) -> None:
    settings = ArchiveSettings(str(tmp_path))
    crashed = Archive("main", "sqlite", settings, time.time() - 60)
    _filled(crashed).seal()
    crashed.close()  # its process died: the lock went with it
    running = Archive("main", "sqlite", settings, time.time() - 30)
    _filled(running).seal()
    current = Archive("main", "sqlite", settings, time.time())
    _filled(current).seal()
    # `running` still holds its lock: its pending may be committing right now.
    assert [p.path for p in current.pending()] == [
        os.path.join(crashed.sweep_dir or "", "000001.pending.sqlite")
    ]
    running.close()
    found = current.pending()
    assert len(found) == 2 and all(p.valid() for p in found)
    found[0].promote()
    found[1].discard()
    names = _files(tmp_path)
    assert sum(n.endswith("000001.sqlite") and "pending" not in n for n in names) == 1
    assert sum("pending" in n for n in names) == 1  # current's own
    current.close()


def test_two_archives_of_one_second_do_not_collide(tmp_path: Path) -> None:
    settings = ArchiveSettings(str(tmp_path))
    started = time.time()
    first = Archive("main", "sqlite", settings, started)
    second = Archive("main", "sqlite", settings, started)
    for archive in (first, second):
        seg = _filled(archive)
        seg.seal()
        seg.complete()
    assert first.sweep_dir != second.sweep_dir
    assert len(list(read_segments(str(tmp_path)))) == 2


def test_an_odd_store_name_stays_one_directory(tmp_path: Path) -> None:
    archive = Archive("../team/a b", "sqlite", ArchiveSettings(str(tmp_path)), time.time())
    seg = _filled(archive)
    seg.seal()
    seg.complete()
    assert seg.path is not None
    assert Path(seg.path).resolve().is_relative_to(tmp_path.resolve())
    assert [r.store for r in read_segments(str(tmp_path), store="../team/a b")] == ["../team/a b"]


def test_a_file_url_goes_through_fsspec(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/arch"
    archive = Archive("main", "postgres", ArchiveSettings(url), time.time())
    seg = _filled(archive)
    seg.seal()
    assert seg.path is not None and seg.path.endswith(".pending.sqlite")
    seg.complete()
    archive.close()
    [reader] = list(read_segments(url, store="main"))
    reader.verify()
    assert reader.backend == "postgres" and not reader.pending
    assert sorted(reader.rows("checkpoints", Selection(thread_id="t1"))) == _rows("t1", 3)
    reader.close()


def test_s3_through_a_local_moto_server(tmp_path: Path) -> None:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="janitor")
            url = "s3://janitor/archive"
            archive = Archive("main", "sqlite", ArchiveSettings(url, max_bytes=10**6), time.time())
            seg = _filled(archive)
            seg.seal()
            assert seg.path is not None and seg.path.endswith(".pending.sqlite")
            gone = archive.segment()
            gone.add("checkpoints", CHECKPOINT_COLUMNS, _rows("t3", 1))
            gone.seal()
            gone.abandon()
            seg.complete()
            archive.close()
            readers = list(read_segments(url))
            assert [(r.meta["segment"], r.pending) for r in readers] == [("1", False)]
            readers[0].verify()
            assert sorted(readers[0].rows("checkpoints")) == sorted(_rows("t1", 3) + _rows("t2", 2))
            readers[0].close()
            tiny = Archive("main", "sqlite", ArchiveSettings(url, max_bytes=100), time.time())
            with pytest.raises(ArchiveError, match="max_bytes"):
                _filled(tiny).seal()
    finally:
        server.stop()


def test_a_segment_keeps_every_value_type_exactly(tmp_path: Path) -> None:
    """Rows of every type SQLite stores (NUL bytes, non-UTF-8 blobs, reals, extreme
    integers) seal, verify, and read back as they were added."""
    rows = [
        ("t", None, 0, -5),
        ("t", "", b"", "h\u00e9llo\x00x"),
        ("t", b"\x00\xff\xfe", 2**62, "\u65e5\u672c"),
        ("t", 1.5, "x", None),
        ("t", b"B3:abc", "T", 10**18),
        ("t", -(2**63), 2**63 - 1, "a\x00"),
    ]
    archive = Archive("main", "sqlite", ArchiveSettings(str(tmp_path)), time.time())
    seg = archive.segment()
    seg.add("odd", ("thread_id", "a", "b", "c"), rows)
    seg.seal()
    seg.complete()
    [reader] = list(read_segments(str(tmp_path)))
    reader.verify()
    assert reader.meta["rows.odd"] == str(len(rows))
    assert sorted(map(repr, reader.rows("odd"))) == sorted(map(repr, rows))


def test_a_segment_abandoned_while_it_prepares_leaves_no_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch cancelled while its segment's `prepare` runs in a worker thread abandons
    the segment without waiting for that thread (it cannot be stopped): the `.partial`
    the thread then finishes writing is removed, not left behind. Timing is forced: the
    write waits until `abandon` has returned."""
    written = threading.Event()
    abandoned = threading.Event()
    real_write = archive_module._write_synced

    def held_write(path: str, data: bytes) -> None:
        real_write(path, data)
        written.set()
        assert abandoned.wait(10), "abandon did not run"

    monkeypatch.setattr(archive_module, "_write_synced", held_write)
    archive = Archive("main", "sqlite", ArchiveSettings(str(tmp_path)), time.time())
    seg = _filled(archive)
    preparing = threading.Thread(target=seg.prepare)
    preparing.start()
    assert written.wait(10)
    assert [f for f in _files(tmp_path) if f.endswith(".partial")]  # being written now
    seg.abandon()
    abandoned.set()
    preparing.join(10)
    assert not preparing.is_alive()
    assert not [f for f in _files(tmp_path) if "partial" in f or f.endswith(".sqlite")]
    assert list(read_segments(str(tmp_path))) == []
