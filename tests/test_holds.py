"""Legal holds on SQLite and memory stores: sweeps, purges, the CLI and `RetentionSaver`
(holds against every rule on Postgres too: the test marked for every backend).

Stores are written by real graphs through the real savers; what a hold keeps
is compared through the real saver (`aget_tuple`, graph state) with the same
store before the sweep, and what the rules do is compared with an untouched
copy swept without the hold.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.backends import BACKENDS, Backend, Pair, SqliteBackend
from helpers.scenarios import cli, read_all, states, turns
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from prometheus_client import CollectorRegistry

from worker import RetentionSaver
from worker.service.config_files import load_config_text
from worker.service.demo import aged, chat_graph, thread
from worker.service.metrics import Metrics
from worker.stores.engine import HOLDS_TABLE, ThreadWork
from worker.stores.sqlite import CREATE_HOLDS_TABLE_SQL, INSERT_HOLD_SQL, SqliteStore
from worker.sweep import Outcome, SweepOptions, SweepReport, sweep

# The tests on the mixed store (`mixed`) run on SQLite, but for the one marked for every backend.
pytestmark = pytest.mark.backends("sqlite")

SQLITE = SqliteBackend()
Key = tuple[str, str, str]
MANY = "defaults: {max_delete_fraction: 1.0}"
HELD = ("user-old-1", "int-old", "err-old", "brk-old", "delta-new", "sub-new", "user-new-1")
"""Threads of every kind a rule below would touch: idle, waiting, delta, subgraph, fresh."""
RULES = {
    "expire_after": "  - {name: r, expire_after: 30d}",
    "interrupted_expire": "  - {name: r, expire_after: 30d, interrupted: expire}",
    "keep_last": "  - {name: r, keep_last: 1}",
    "keep_within": "  - {name: r, keep_within: 1d}",
}


def all_keys(path: Path) -> list[Key]:
    with sqlite3.connect(path) as con:
        return sorted(
            con.execute("SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints")
        )


def config_text(path: Path, policies: str, extra: str = MANY) -> str:
    return (
        f"stores:\n  - name: app\n    kind: sqlite\n    path: {path}\n{extra}\n"
        f"policies:\n{policies}\nlogging: {{format: json}}\n"
    )


async def run_sweep(path: Path, policies: str, now: float, **kwargs: Any) -> SweepReport:
    cfg = load_config_text(config_text(path, policies))
    engine = SqliteStore("app", str(path))
    await engine.open()
    try:
        options = SweepOptions(
            settings=cfg.store_settings("app"), max_delete_fraction=1.0, dry_run=False
        )
        return await sweep(engine, cfg.policies_for("app"), options, now=now, **kwargs)
    finally:
        await engine.close()


async def hold_threads(backend: Backend, store: str, *thread_ids: str) -> None:
    """Hold threads as `checkpoint-janitor hold` does (through the worker's engine)."""
    async with backend.engine(store) as engine:
        for tid in thread_ids:
            assert await engine.hold(tid, "case 42", "legal") is not None


async def release_threads(backend: Backend, store: str, *thread_ids: str) -> None:
    """Release threads as `checkpoint-janitor release` does."""
    async with backend.engine(store) as engine:
        for tid in thread_ids:
            assert await engine.release(tid)


async def hold(path: Path, *thread_ids: str) -> None:
    await hold_threads(SQLITE, str(path), *thread_ids)


async def release(path: Path, *thread_ids: str) -> None:
    await release_threads(SQLITE, str(path), *thread_ids)


async def read_threads(
    backend: Backend, store: str, shapes: dict[str, str], threads: set[str]
) -> Any:
    """Every checkpoint of `threads` as the real saver reads it, their graph states, their
    blobs (where the backend has them)."""
    keys = [k for k in await backend.all_keys(store) if k[0] in threads]
    async with backend.saver(store) as saver:
        checkpoints = await read_all(saver, keys)
        heads = await states(saver, {t: s for t, s in shapes.items() if t in threads})
    blobs = {b for b in await backend.blob_keys(store) if b[0] in threads}
    return checkpoints, heads, blobs


@pytest.fixture
def mixed(mixed_pair: Pair) -> tuple[Path, Path, Any]:
    """Two copies of the mixed store on SQLite: one to hold threads in, one untouched control."""
    held, control, shapes = mixed_pair
    return Path(held), Path(control), shapes


# ------------------------------------------------------------------ sweeps


@pytest.mark.backends(*BACKENDS)
@pytest.mark.parametrize("rule", sorted(RULES))
async def test_held_threads_survive_every_rule_and_release_makes_them_eligible(
    backend: Backend, mixed_pair: Pair, rule: str
) -> None:
    store, control, shapes = mixed_pair
    now = time.time()
    await hold_threads(backend, store, *HELD)
    before = await read_threads(backend, store, shapes, set(HELD))

    report = await backend.run_sweep(store, RULES[rule], now=now, extra=MANY)
    control_report = await backend.run_sweep(control, RULES[rule], now=now, extra=MANY)
    assert report.outcome is Outcome.SUCCESS and control_report.outcome is Outcome.SUCCESS

    # The held threads read back exactly as before: every checkpoint, state and blob.
    assert await read_threads(backend, store, shapes, set(HELD)) == before
    # The rule would have touched some of them (the control lost rows of them) ...
    held_keys = {k for k in await backend.all_keys(store) if k[0] in HELD}
    control_held = {k for k in await backend.all_keys(control) if k[0] in HELD}
    assert control_held < held_keys
    # ... and every other thread went exactly as without the holds.
    assert {k for k in await backend.all_keys(store) if k[0] not in HELD} == {
        k for k in await backend.all_keys(control) if k[0] not in HELD
    }
    assert report.policies["r"].skipped["held"] == len(HELD)
    assert report.held_threads == len(HELD)
    assert report.deleted.checkpoints < control_report.deleted.checkpoints

    # Released, they are decided again: the next sweep leaves what the control kept.
    await release_threads(backend, store, *HELD)
    again = await backend.run_sweep(store, RULES[rule], now=now, extra=MANY)
    assert "held" not in again.policies["r"].skipped and again.held_threads == 0
    assert await backend.all_keys(store) == await backend.all_keys(control)


async def test_a_hold_placed_after_the_scan_wins_against_the_running_sweep(
    mixed: tuple[Path, Path, dict[str, str]],
) -> None:
    """The pass notes expiries while it scans and deletes them at its end; a hold placed
    in between (here: by the progress callback, after the last page) keeps the thread."""
    path, _, shapes = mixed
    before = await read_threads(SQLITE, str(path), shapes, {"user-old-2"})
    placed: list[str] = []

    def hold_after_scan(done: int, total: int) -> None:
        if placed:
            return
        # Another process's `hold`, on its own connection, as the CLI writes it.
        with sqlite3.connect(path) as con:
            con.execute(CREATE_HOLDS_TABLE_SQL)
            con.execute(INSERT_HOLD_SQL, ("user-old-2", "late", "2026-01-01T00:00:00Z", "x"))
        placed.append("user-old-2")

    report = await run_sweep(
        path, "  - {name: idle, expire_after: 30d}", time.time(), progress=hold_after_scan
    )
    assert placed and report.held_threads == 0, "the hold came after the sweep read the holds"
    assert report.outcome is Outcome.SUCCESS
    assert report.policies["idle"].skipped["held"] == 1
    assert report.policies["idle"].deleted.threads > 0
    left = {k[0] for k in all_keys(path)}
    assert "user-old-2" in left and "user-old-1" not in left
    assert await read_threads(SQLITE, str(path), shapes, {"user-old-2"}) == before


async def test_a_batch_rechecks_holds_under_the_write_lock(
    mixed: tuple[Path, Path, dict[str, str]],
) -> None:
    """A trim decided before a hold and carried out after it deletes nothing."""
    path, _, _ = mixed
    engine = SqliteStore("app", str(path))
    await engine.open()
    try:
        (scanned,) = await engine.scan(["user-new-1"])
        oldest = min(c.checkpoint_id for c in scanned.view.checkpoints if c.namespace == "")
        work = ThreadWork("user-new-1", scanned.fingerprint, checkpoints={"": [oldest]})
        await hold(path, "user-new-1")
        before = all_keys(path)
        (result,) = await engine.apply([work], dry_run=False)
        assert result.on_hold and not result.changed and result.counts.checkpoints == 0
        assert all_keys(path) == before
        # The same work, once released, goes: it was valid all along.
        await release(path, "user-new-1")
        (result,) = await engine.apply([work], dry_run=False)
        assert not result.on_hold and result.counts.checkpoints == 1
    finally:
        await engine.close()


# ------------------------------------------------------------------ command line


def test_hold_release_holds_commands(tmp_path: Path, mixed: tuple[Path, Path, Any]) -> None:
    path, _, _ = mixed
    cfg = tmp_path / "janitor.yaml"
    cfg.write_text(config_text(path, "  - {name: idle, expire_after: 30d}"))
    r = cli("holds", "--store", "app", config=cfg)
    assert r.returncode == 0, r.stderr
    assert "0 threads on legal hold" in r.stdout
    with sqlite3.connect(path) as con:
        # Listing creates nothing: the table comes with the first hold.
        assert not con.execute(
            "SELECT 1 FROM sqlite_master WHERE name = ?", (HOLDS_TABLE,)
        ).fetchall()
    r = cli("hold", "--store", "app", "--thread", "user-old-1", "--reason", "case 42", config=cfg)
    assert r.returncode == 0, r.stderr
    # A hold may precede the thread's data.
    r = cli("hold", "--store", "app", "--thread", "not-yet", "--by", "legal", config=cfg)
    assert r.returncode == 0, r.stderr
    r = cli("hold", "--store", "app", "--thread", "user-old-1", "--reason", "other", config=cfg)
    assert r.returncode == 0 and "already held" in r.stdout
    r = cli("holds", "--store", "app", "--format", "json", config=cfg)
    assert r.returncode == 0, r.stderr
    holds = {h["thread_id"]: h for h in json.loads(r.stdout)["holds"]}
    assert set(holds) == {"user-old-1", "not-yet"}
    assert holds["user-old-1"]["reason"] == "case 42" and holds["not-yet"]["held_by"] == "legal"
    assert holds["not-yet"]["held_at"].endswith("Z")
    r = cli("holds", "--store", "app", config=cfg)
    assert "case 42" in r.stdout and "not-yet" in r.stdout
    for args in (
        ("hold", "--store", "nope", "--thread", "x"),
        ("release", "--store", "nope", "--thread", "x"),
        ("holds", "--store", "nope"),
    ):
        r = cli(*args, config=cfg)
        assert r.returncode == 2 and "no store named 'nope'" in r.stderr, args
    r = cli("release", "--store", "app", "--thread", "not-yet", config=cfg)
    assert r.returncode == 0 and "released" in r.stdout
    r = cli("release", "--store", "app", "--thread", "not-yet", config=cfg)
    assert r.returncode == 0 and "was not held" in r.stdout


def test_purge_refuses_held_threads_by_name_and_by_prefix(
    tmp_path: Path, mixed: tuple[Path, Path, Any]
) -> None:
    path, _, _ = mixed
    cfg = tmp_path / "janitor.yaml"
    cfg.write_text(config_text(path, "  - {name: idle, expire_after: 30d}"))
    asyncio.run(hold(path, "org-1:user-2:session-3"))
    before = all_keys(path)
    for args in (
        ("--thread", "org-1:user-2:session-3"),
        # Refused whole: the unheld thread named beside it stays too.
        ("--thread", "user-old-1", "--thread", "org-1:user-2:session-3"),
        # A prefix that covers a held thread: nothing under it goes.
        ("--thread-prefix", "org-1:user-2:"),
    ):
        r = cli("purge", *args, "--yes", config=cfg)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "'org-1:user-2:session-3'" in r.stderr and "legal hold" in r.stderr
        assert all_keys(path) == before, args
    # A prefix that covers no held thread purges as ever (`user-2:` is not `user-20:`).
    r = cli("purge", "--thread-prefix", "org-1:user-20:", "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    assert not any(k[0].startswith("org-1:user-20:") for k in all_keys(path))
    # A hold on a thread with no rows yet refuses its purge too.
    asyncio.run(hold(path, "org-9:user-1:later"))
    r = cli("purge", "--thread-prefix", "org-9:", "--yes", config=cfg)
    assert r.returncode == 2 and "org-9:user-1:later" in r.stderr
    # Released, it can be purged.
    asyncio.run(release(path, "org-1:user-2:session-3"))
    r = cli("purge", "--thread-prefix", "org-1:user-2:", "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    assert not any(k[0].startswith("org-1:user-2:") for k in all_keys(path))


def test_plan_stats_and_metric_show_holds(tmp_path: Path, mixed: tuple[Path, Path, Any]) -> None:
    path, _, _ = mixed
    cfg = tmp_path / "janitor.yaml"
    cfg.write_text(config_text(path, "  - {name: idle, expire_after: 30d}"))
    asyncio.run(hold(path, "user-old-1", "user-new-1"))
    r = cli("plan", config=cfg)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if "skipped: held" in line)
    assert row.split()[:4] == ["idle", "skipped:", "held", "2"]
    assert "legal holds: 2 threads held" in r.stdout
    r = cli("plan", "--format", "json", config=cfg)
    store = json.loads(r.stdout)["stores"][0]
    assert store["held_threads"] == 2
    assert store["policies"][0]["skipped"]["held"] == 2
    assert "user-old-1" not in {t["thread_id"] for t in store["threads"]}
    r = cli("stats", "--format", "json", config=cfg)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stores"][0]["held_threads"] == 2
    r = cli("stats", config=cfg)
    assert "held threads" in r.stdout

    report = asyncio.run(run_sweep(path, "  - {name: idle, expire_after: 30d}", time.time()))
    metrics = Metrics()
    metrics.record(report, ["idle"])
    value = metrics.registry.get_sample_value
    assert value("checkpoint_janitor_held_threads", {"store": "app"}) == 2
    assert (
        value(
            "checkpoint_janitor_skipped_threads_total",
            {"store": "app", "policy": "idle", "reason": "held"},
        )
        == 2
    )


def test_plan_on_a_read_only_store_without_holds_table(
    tmp_path: Path, mixed: tuple[Path, Path, Any]
) -> None:
    path, _, _ = mixed
    cfg = tmp_path / "janitor.yaml"
    cfg.write_text(config_text(path, "  - {name: idle, expire_after: 30d}"))
    path.chmod(0o444)
    r = cli("plan", "--format", "json", config=cfg)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stores"][0]["held_threads"] == 0


# ------------------------------------------------------------------ RetentionSaver


async def history(saver: BaseCheckpointSaver[Any], thread_id: str) -> list[Any]:
    """The thread's checkpoints as the saver lists them: step, source and channel values."""
    return [
        (t.metadata["step"], t.metadata["source"], t.checkpoint["channel_values"])
        async for t in saver.alist(thread(thread_id))
    ]


async def check_wrapper_honours_holds(
    saver: RetentionSaver, control: BaseCheckpointSaver[Any]
) -> None:
    """`saver` wraps a store where `held` and `old-held` are on hold; `control` is a plain
    saver of the same kind. The held threads keep what they would keep without any
    retention; `free` is trimmed; an idle held thread is neither hidden nor expired."""
    for tid in ("held", "free"):
        await turns(chat_graph(saver), tid, 3)
        await turns(chat_graph(control), tid, 3)
    assert await history(saver, "held") == await history(control, "held")
    assert len(await history(control, "held")) == 9
    assert len(await history(saver, "free")) == 1
    # Idle for 60 days, expire_after 30d: the held one reads back, the free one does not.
    with aged(60):
        for tid in ("old-held", "old-free"):
            await turns(chat_graph(saver.inner), tid, 2)
            await turns(chat_graph(control), tid, 2)
    assert await saver.aget_tuple(thread("old-free")) is None
    tup = await saver.aget_tuple(thread("old-held"))
    assert tup is not None
    assert tup == await saver.inner.aget_tuple(thread("old-held"))
    # A turn continues the held thread's history instead of starting it afresh.
    await turns(chat_graph(saver), "old-held", 1)
    await turns(chat_graph(control), "old-held", 1)
    state = await chat_graph(saver).aget_state(thread("old-held"))
    assert state.values == (await chat_graph(control).aget_state(thread("old-held"))).values
    assert len(state.values["messages"]) == 6
    # Released, the next put trims it.
    assert await saver.arelease("held")
    await turns(chat_graph(saver), "held", 1)
    assert len(await history(saver, "held")) == 1


def wrapper(inner: BaseCheckpointSaver[Any]) -> RetentionSaver:
    return RetentionSaver(
        inner, keep_last=1, slack=0, expire_after="30d", registry=CollectorRegistry()
    )


async def test_wrapper_honours_holds_in_memory() -> None:
    saver = wrapper(InMemorySaver())
    assert saver.hold("held", "case 42")
    assert not saver.hold("held")
    assert saver.hold("old-held")
    await check_wrapper_honours_holds(saver, InMemorySaver())


async def test_wrapper_honours_holds_placed_by_the_cli_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    async with AsyncSqliteSaver.from_conn_string(str(path)) as inner:
        await inner.setup()
        # Placed by the worker (another process, its own connection), read by the wrapper.
        await hold(path, "held")
        saver = wrapper(inner)
        assert await saver.ahold("old-held")
        async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "control.db")) as control:
            await check_wrapper_honours_holds(saver, control)


async def test_wrapper_sees_a_hold_from_elsewhere_within_holds_refresh() -> None:
    """A hold placed by another process (here: another wrapper of the same store) binds
    a wrapper that has read the holds once its `holds_refresh` has passed, as documented."""
    store = InMemorySaver()
    now = [time.time() + 3600]  # every checkpoint below is in its past
    saver = RetentionSaver(
        store,
        keep_last=1,
        slack=0,
        registry=CollectorRegistry(),
        clock=lambda: now[0],
        holds_refresh=timedelta(seconds=60),
    )
    await turns(chat_graph(saver), "t", 2)
    assert len(await history(saver, "t")) == 1  # trimmed: the holds (none) are read now
    other = RetentionSaver(store, registry=CollectorRegistry())
    assert other.hold("t")
    now[0] += 59
    await turns(chat_graph(saver), "t", 1)
    assert len(await history(saver, "t")) == 1  # within the interval: not seen yet
    now[0] += 2
    await turns(chat_graph(saver), "t", 2)
    assert len(await history(saver, "t")) == 7  # seen: kept whole from here on
