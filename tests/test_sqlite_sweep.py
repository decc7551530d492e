"""Sweeps of SQLite stores written by real graphs through the real savers.

For each policy scenario: read every checkpoint through the real saver,
sweep, and check that each checkpoint still there reads back equal, that
each thread's graph state is unchanged, and that what went is what the
policy says should go.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from helpers.scenarios import (
    DAY,
    OLD_DAYS,
    build_mixed_store,
    build_replay_store,
    read_all,
    replay,
    resume,
    root_ids,
    states,
)
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from worker.service.config_files import load_config_text
from worker.service.demo import aged, chat_graph, thread
from worker.stores.sqlite import SqliteStore
from worker.sweep import Outcome, SweepOptions, SweepReport, sweep

Key = tuple[str, str, str]


def all_keys(path: Path) -> list[Key]:
    with sqlite3.connect(path) as con:
        return [
            (t, ns, c)
            for t, ns, c in con.execute(
                "SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints"
            )
        ]


def ns_counts(path: Path) -> Counter[tuple[str, str]]:
    return Counter((t, ns) for t, ns, _ in all_keys(path))


def config(policies_yaml: str, path: Path, extra: str = "") -> Any:
    return load_config_text(
        f"""
stores:
  - name: app
    kind: sqlite
    path: {path}
{extra}
policies:
{policies_yaml}
"""
    )


async def run_sweep(
    path: Path,
    policies_yaml: str,
    *,
    now: float | None = None,
    dry_run: bool = False,
    extra: str = "",
    expiries_in_memory: int = 10_000,
    residue_check_every: float = 0.0,
) -> SweepReport:
    cfg = config(policies_yaml, path, extra)
    engine = SqliteStore("app", str(path))
    await engine.open()
    try:
        return await sweep(
            engine,
            cfg.policies_for("app"),
            SweepOptions(
                settings=cfg.store_settings("app"),
                max_delete_fraction=cfg.defaults.max_delete_fraction,
                dry_run=dry_run,
                expiries_in_memory=expiries_in_memory,
                residue_check_every=residue_check_every,
            ),
            now=now,
        )
    finally:
        await engine.close()


@pytest.fixture(scope="module")
def mixed_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """One mixed store, built once; each test sweeps its own copy."""
    import asyncio

    path = tmp_path_factory.mktemp("mixed") / "template.db"

    async def build() -> dict[str, str]:
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            return await build_mixed_store(saver)

    shapes = asyncio.run(build())
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path, shapes


@pytest.fixture
def mixed(
    tmp_path: Path, mixed_template: tuple[Path, dict[str, str]]
) -> tuple[Path, dict[str, str]]:
    template, shapes = mixed_template
    path = tmp_path / "store.db"
    shutil.copy(template, path)
    return path, shapes


async def snapshot(path: Path, shapes: dict[str, str]) -> tuple[dict[Key, Any], dict[str, Any]]:
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        return await read_all(saver, all_keys(path)), await states(saver, shapes)


async def assert_kept_unchanged(
    path: Path, shapes: dict[str, str], before: dict[Key, Any], before_states: dict[str, Any]
) -> set[Key]:
    """Every checkpoint still there reads back equal; every surviving thread's state is equal."""
    after_keys = set(all_keys(path))
    assert after_keys <= set(before)
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        after = await read_all(saver, sorted(after_keys))
        for key in after_keys:
            assert after[key] == before[key], key
        surviving = {t: s for t, s in shapes.items() if any(k[0] == t for k in after_keys)}
        assert await states(saver, surviving) == {t: before_states[t] for t in surviving}
    return set(before) - after_keys


async def test_keep_last_trims_every_shape(mixed: tuple[Path, dict[str, str]]) -> None:
    path, shapes = mixed
    before, before_states = await snapshot(path, shapes)
    counts_before = ns_counts(path)
    report = await run_sweep(path, "  - {name: trim, keep_last: 2}")
    assert report.outcome is Outcome.SUCCESS
    gone = await assert_kept_unchanged(path, shapes, before, before_states)
    assert gone, "the sweep deleted nothing"
    counts = ns_counts(path)
    for (tid, ns), n in counts.items():
        shape = shapes[tid]
        if ns == "" and shape != "delta":
            assert n == min(2, counts_before[(tid, ns)]), (tid, ns, n)
    # Delta threads keep the ancestors back to a snapshot: more than 2, fewer than all.
    assert 2 < counts[("delta-new", "")] < counts_before[("delta-new", "")]
    # Subgraph calls of deleted root checkpoints went with them.
    sub_calls = [ns for (t, ns) in counts if t == "sub-new" and ns.startswith("inner:")]
    assert len(sub_calls) <= 1
    # The persistent subgraph namespace is trimmed, not dropped: its 2 newest, and the
    # checkpoint replaying the kept step-0 root checkpoint loads (the turn before's last).
    assert counts[("subp-new", "memory")] == 3
    assert report.policies["trim"].deleted.checkpoints == len(gone)
    # Writes of deleted checkpoints went; the kept ones' stayed (checked by read_all).
    with sqlite3.connect(path) as con:
        orphans = con.execute(
            "SELECT COUNT(*) FROM writes w WHERE NOT EXISTS (SELECT 1 FROM checkpoints c "
            "WHERE c.thread_id = w.thread_id AND c.checkpoint_ns = w.checkpoint_ns "
            "AND c.checkpoint_id = w.checkpoint_id)"
        ).fetchone()[0]
        parents_missing = con.execute(
            "SELECT COUNT(*) FROM checkpoints c WHERE parent_checkpoint_id IS NOT NULL AND NOT "
            "EXISTS (SELECT 1 FROM checkpoints p WHERE p.thread_id = c.thread_id AND "
            "p.checkpoint_ns = c.checkpoint_ns AND p.checkpoint_id = c.parent_checkpoint_id)"
        ).fetchone()[0]
    assert orphans == 0
    assert parents_missing == 0
    # Sweeping again deletes nothing more.
    again = await run_sweep(path, "  - {name: trim, keep_last: 2}")
    assert again.deleted.checkpoints == 0 and again.deleted.writes == 0


async def test_expiry_spares_waiting_and_protected_threads(
    mixed: tuple[Path, dict[str, str]],
) -> None:
    path, shapes = mixed
    before, before_states = await snapshot(path, shapes)
    policies = """
  - name: vip
    match: {thread_id: "vip-*"}
    protect: true
  - name: idle
    expire_after: 30d
"""
    report = await run_sweep(path, policies, extra="defaults: {max_delete_fraction: 1.0}")
    assert report.outcome is Outcome.SUCCESS
    await assert_kept_unchanged(path, shapes, before, before_states)
    left = {t for t, _, _ in all_keys(path)}
    old = {t for t in shapes if "old" in t or t == "org-1:user-2:session-3"}
    waiting_old = {"int-old", "brk-old", "err-old"}
    assert left == (set(shapes) - old) | waiting_old | {"vip-old"}
    assert report.policies["idle"].deleted.threads == len(old - waiting_old - {"vip-old"})
    assert report.policies["idle"].skipped["interrupted"] == len(waiting_old)
    with sqlite3.connect(path) as con:
        stray = con.execute(
            "SELECT COUNT(*) FROM writes WHERE thread_id NOT IN (SELECT thread_id FROM checkpoints)"
        ).fetchone()[0]
    assert stray == 0


async def test_interrupted_expire_takes_waiting_threads(mixed: tuple[Path, dict[str, str]]) -> None:
    path, _ = mixed
    policies = "  - {name: idle, expire_after: 30d, interrupted: expire}"
    await run_sweep(path, policies, extra="defaults: {max_delete_fraction: 1.0}")
    left = {t for t, _, _ in all_keys(path)}
    assert not left & {"int-old", "brk-old", "err-old", "user-old-1"}
    assert {"int-new", "brk-new"} <= left


@pytest.mark.parametrize("shape_thread", ["int-new", "brk-new", "int-old", "brk-old", "err-old"])
async def test_waiting_thread_resumes_after_sweep_like_control(
    tmp_path: Path, mixed: tuple[Path, dict[str, str]], shape_thread: str
) -> None:
    path, shapes = mixed
    control = tmp_path / "control.db"
    shutil.copy(path, control)
    await run_sweep(
        path,
        "  - {name: trim, keep_last: 1, expire_after: 30d}",
        extra="defaults: {max_delete_fraction: 1.0}",
    )
    assert any(k[0] == shape_thread for k in all_keys(path))
    results = []
    for db in (path, control):
        async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:
            results.append(await resume(saver, shape_thread, shapes[shape_thread]))
    assert results[0] == results[1]
    assert (
        "human said yes" in str(results[0])
        or "reviewed" in str(results[0])
        or ("recovered" in str(results[0]))
    )


async def test_namespace_rule_for_subgraph_calls(mixed: tuple[Path, dict[str, str]]) -> None:
    path, shapes = mixed
    before, before_states = await snapshot(path, shapes)
    counts_before = ns_counts(path)
    policies = """
  - name: calls
    match: {checkpoint_ns: "inner:*"}
    keep_last: 1
  - name: roots
    match: {checkpoint_ns: ""}
    keep_last: 4
"""
    report = await run_sweep(path, policies)
    await assert_kept_unchanged(path, shapes, before, before_states)
    counts = ns_counts(path)
    for (tid, ns), n in counts.items():
        if ns.startswith("inner:"):
            assert n == 1
        elif ns == "" and shapes[tid] != "delta":
            assert n == min(4, counts_before[(tid, ns)])
        elif ns == "memory":
            # No rule matches the persistent namespace: kept whole.
            assert n == counts_before[(tid, ns)]
    assert report.policies["calls"].by_reason
    assert report.policies["roots"].deleted.checkpoints > 0


@pytest.fixture(scope="module")
def replay_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Persistent subgraphs (plain and DeltaChannel, with forks), built once."""
    import asyncio

    path = tmp_path_factory.mktemp("replay") / "template.db"

    async def build() -> dict[str, str]:
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            return await build_replay_store(saver)

    shapes = asyncio.run(build())
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path, shapes


@pytest.mark.parametrize("keep_last", [1, 3])
async def test_replay_from_every_kept_root_checkpoint_is_unchanged(
    tmp_path: Path, replay_template: tuple[Path, dict[str, str]], keep_last: int
) -> None:
    """Time travel (`invoke(None, checkpoint_id=R)`) from each root checkpoint the sweep kept
    returns what it returns on the unswept store, and leaves the same state.

    Each replay writes checkpoints, so each runs on its own copy of either store (the i-th
    kept root checkpoint of every thread on copy i: threads do not meet).
    """
    template, shapes = replay_template
    path = tmp_path / "store.db"
    shutil.copy(template, path)
    before, before_states = await snapshot(path, shapes)
    report = await run_sweep(path, f"  - {{name: trim, keep_last: {keep_last}}}")
    assert report.outcome is Outcome.SUCCESS
    assert await assert_kept_unchanged(path, shapes, before, before_states)
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    kept = root_ids(all_keys(path))
    for i in range(max(len(ids) for ids in kept.values())):
        results = []
        for source in (template, path):
            copy = tmp_path / f"replay-{i}-{source.stem}.db"
            shutil.copy(source, copy)
            async with AsyncSqliteSaver.from_conn_string(str(copy)) as saver:
                results.append(
                    {
                        (tid, ids[i]): await replay(saver, shapes[tid], tid, ids[i])
                        for tid, ids in kept.items()
                        if i < len(ids)
                    }
                )
        assert results[1] == results[0]
    # The update_state fork keeps its old parent: subgraph checkpoints stay in between.
    assert len(kept["subp-fork"]) > keep_last and len(kept["subd-fork"]) > keep_last


async def test_root_graph_is_stored_under_empty_namespace(tmp_path: Path) -> None:
    """Current LangGraph ignores a config's checkpoint_ns for the root graph."""
    path = tmp_path / "ns.db"
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        await chat_graph(saver).ainvoke(
            {"messages": ["hi"]}, thread("user-1", checkpoint_ns="workflow-a")
        )
    assert {ns for _, ns, _ in all_keys(path)} == {""}


async def test_metadata_match_and_keep_within(mixed: tuple[Path, dict[str, str]]) -> None:
    path, shapes = mixed
    before, before_states = await snapshot(path, shapes)
    counts_before = ns_counts(path)
    policies = """
  - name: support
    match: {metadata: {assistant_id: support-bot}}
    keep_last: 1
    keep_within: 7d
"""
    await run_sweep(path, policies, now=time.time() + 0.5 * DAY)
    await assert_kept_unchanged(path, shapes, before, before_states)
    counts = ns_counts(path)
    # Fresh support threads are younger than 7d: untouched. Old ones trimmed to 1.
    assert counts[("user-new-1", "")] == counts_before[("user-new-1", "")]
    assert counts[("user-old-1", "")] == 1
    # Other assistants and threads without the key are not matched.
    assert counts[("user-old-2", "")] == counts_before[("user-old-2", "")]
    assert counts[("vip-old", "")] == counts_before[("vip-old", "")]


async def test_safety_limit_stops_mass_expiry(mixed: tuple[Path, dict[str, str]]) -> None:
    path, _ = mixed
    n_before = len({t for t, _, _ in all_keys(path)})
    # A clock a year ahead makes every thread idle: the limit must hold.
    report = await run_sweep(
        path,
        "  - {name: idle, expire_after: 30d, interrupted: expire}",
        now=time.time() + 365 * DAY,
    )
    assert report.outcome is Outcome.SAFETY_STOP
    assert report.limit_reached_by == "idle"
    # All or nothing: more threads are due than the limit allows, so none goes.
    assert report.expiries_wanted == n_before > report.expiry_limit == int(0.5 * n_before)
    assert report.deleted.threads == 0
    n_after = len({t for t, _, _ in all_keys(path)})
    assert n_after == n_before
    plan = await run_sweep(
        path,
        "  - {name: idle, expire_after: 30d, interrupted: expire}",
        now=time.time() + 365 * DAY,
        dry_run=True,
    )
    assert plan.would_hit_limit and len({t for t, _, _ in all_keys(path)}) == n_after


async def test_expiries_held_in_a_temp_file_all_go(mixed: tuple[Path, dict[str, str]]) -> None:
    """Past `expiries_in_memory` the pass notes expiries in a file; each still goes, once."""
    path, shapes = mixed
    policy = "  - {name: idle, expire_after: 30d, interrupted: expire}"
    report = await run_sweep(
        path,
        policy,
        now=time.time() + 365 * DAY,
        extra="defaults: {max_delete_fraction: 1.0}",
        expiries_in_memory=2,
    )
    assert report.outcome is Outcome.SUCCESS
    assert report.expiries_wanted == report.deleted.threads == len(shapes)
    assert report.changed_threads == 0
    assert all_keys(path) == []


async def test_dry_run_counts_without_deleting(mixed: tuple[Path, dict[str, str]]) -> None:
    path, _ = mixed
    raw = path.read_bytes()
    plan = await run_sweep(path, "  - {name: trim, keep_last: 2}", dry_run=True)
    assert path.read_bytes() == raw
    real = await run_sweep(path, "  - {name: trim, keep_last: 2}")
    assert plan.deleted.checkpoints == real.deleted.checkpoints > 0
    assert plan.deleted.writes == real.deleted.writes
    assert plan.policies["trim"].by_reason.keys() == real.policies["trim"].by_reason.keys()


async def test_future_clock_never_trims_by_age(mixed: tuple[Path, dict[str, str]]) -> None:
    path, _ = mixed
    counts_before = ns_counts(path)
    # keep_within measured from a clock two days behind: nothing fresh is old.
    await run_sweep(path, "  - {name: recent, keep_within: 1d}", now=time.time() - 2 * DAY)
    counts = ns_counts(path)
    fresh = {k for k in counts_before if "old" not in k[0] and k[0] != "org-1:user-2:session-3"}
    assert fresh and all(counts[k] == counts_before[k] for k in fresh)
    # ... while the 60-day-old threads were trimmed to their newest checkpoint.
    assert counts[("user-old-1", "")] == 1


def test_sync_sqlite_saver_store(tmp_path: Path) -> None:
    """A store written by the sync `SqliteSaver` sweeps the same way."""
    import asyncio

    path = tmp_path / "sync.db"
    with SqliteSaver.from_conn_string(str(path)) as saver:
        app = chat_graph(saver)
        for i in range(5):
            app.invoke({"messages": [f"turn {i}"]}, thread("sync-1"))
        before = {
            t.config["configurable"]["checkpoint_id"]: (t.checkpoint, t.metadata, t.pending_writes)
            for t in saver.list(thread("sync-1"))
        }
        state = app.get_state(thread("sync-1")).values
    asyncio.run(run_sweep(path, "  - {name: trim, keep_last: 3}"))
    with SqliteSaver.from_conn_string(str(path)) as saver:
        after = {
            t.config["configurable"]["checkpoint_id"]: (t.checkpoint, t.metadata, t.pending_writes)
            for t in saver.list(thread("sync-1"))
        }
        assert len(after) == 3
        assert all(after[k] == before[k] for k in after)
        assert sorted(after) == sorted(before)[-3:]
        assert chat_graph(saver).get_state(thread("sync-1")).values == state


async def test_orphan_writes_of_crashed_run_go_after_grace(tmp_path: Path) -> None:
    path = tmp_path / "orphan.db"
    with aged(OLD_DAYS):
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            await chat_graph(saver).ainvoke({"messages": ["hi"]}, thread("user-1"))
            head = await saver.aget_tuple(thread("user-1"))
            assert head is not None
            from langgraph.checkpoint.base.id import uuid6

            # A crashed run: writes against a checkpoint that never committed.
            ghost = {**head.config["configurable"], "checkpoint_id": str(uuid6())}
            await saver.aput_writes({"configurable": ghost}, [("messages", ["lost"])], "task-1")
    with sqlite3.connect(path) as con:
        n_writes = con.execute("SELECT COUNT(*) FROM writes").fetchone()[0]
    # Cadence 0: every sweep looks at every quiet thread's residue.
    report = await run_sweep(path, "  - {name: trim, keep_last: 10}", residue_check_every=0)
    assert report.policies["trim"].deleted.writes == 1
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT COUNT(*) FROM writes").fetchone()[0] == n_writes - 1


async def crash_a_run(path: Path, thread_id: str) -> None:
    """Writes against a checkpoint that never committed, dated `OLD_DAYS` ago."""
    from langgraph.checkpoint.base.id import uuid6

    with aged(OLD_DAYS):
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            head = await saver.aget_tuple(thread(thread_id))
            assert head is not None
            ghost = {**head.config["configurable"], "checkpoint_id": str(uuid6())}
            await saver.aput_writes({"configurable": ghost}, [("messages", ["lost"])], "task-1")


def count_writes(path: Path) -> int:
    with sqlite3.connect(path) as con:
        return int(con.execute("SELECT COUNT(*) FROM writes").fetchone()[0])


async def test_residue_waits_for_its_cadence_then_goes(tmp_path: Path) -> None:
    """With `residue_check_every`, a sweep looks at quiet threads' orphan writes only once
    the last complete look is that old; the look is dated in the store, and what the
    skipped sweep left goes with the next look, the kept checkpoints reading back equal."""
    path = tmp_path / "cadence.db"
    with aged(OLD_DAYS):
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            for tid in ("user-1", "user-2"):
                await chat_graph(saver).ainvoke({"messages": ["hi"]}, thread(tid))
    policy = "  - {name: trim, keep_last: 10}"
    day = 86400.0
    t0 = time.time()
    first = await run_sweep(path, policy, now=t0, residue_check_every=day)
    assert first.outcome is Outcome.SUCCESS, first.error
    with sqlite3.connect(path) as con:
        dated = con.execute("SELECT policy, checked_at FROM checkpoint_janitor_residue_checks")
        assert [(p, datetime.fromisoformat(at).timestamp()) for p, at in dated] == [
            ("trim", float(int(t0)))
        ]
    await crash_a_run(path, "user-1")
    untouched = tmp_path / "untouched.db"
    shutil.copy(path, untouched)
    n_writes = count_writes(path)
    async with AsyncSqliteSaver.from_conn_string(str(untouched)) as saver:
        before = await read_all(saver, all_keys(untouched))

    # Within the cadence: the crashed run's writes are not looked for.
    skipped = await run_sweep(path, policy, now=t0 + 3600, residue_check_every=day)
    assert skipped.policies["trim"].deleted.writes == 0
    assert count_writes(path) == n_writes

    # A day after the last look: the next sweep looks, and they go.
    caught_up = await run_sweep(path, policy, now=t0 + day + 1, residue_check_every=day)
    assert caught_up.policies["trim"].deleted.writes == 1
    assert count_writes(path) == n_writes - 1
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        assert await read_all(saver, all_keys(path)) == before
    with sqlite3.connect(path) as con:
        (at,) = con.execute("SELECT checked_at FROM checkpoint_janitor_residue_checks").fetchone()
    assert datetime.fromisoformat(at).timestamp() == float(int(t0 + day + 1))


async def test_expiry_candidates_read_their_orphan_writes_between_looks(tmp_path: Path) -> None:
    """Between residue looks, an idle thread's orphan writes still date it: a run that
    crashed an hour ago keeps a thread whose checkpoints are old from expiring."""
    from langgraph.checkpoint.base.id import uuid6

    path = tmp_path / "idle.db"
    with aged(OLD_DAYS):
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            await chat_graph(saver).ainvoke({"messages": ["hi"]}, thread("user-1"))
    policy = "  - {name: idle, expire_after: 30d}"
    day = 86400.0
    t0 = time.time()
    with aged(-1 / 24):
        # Minted an hour ahead: seen from the sweep an hour later, the crash is fresh.
        async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
            head = await saver.aget_tuple(thread("user-1"))
            assert head is not None
            ghost = {**head.config["configurable"], "checkpoint_id": str(uuid6())}
            await saver.aput_writes({"configurable": ghost}, [("messages", ["x"])], "task-1")
    with sqlite3.connect(path) as con:
        con.execute(
            "CREATE TABLE checkpoint_janitor_residue_checks "
            "(policy TEXT PRIMARY KEY, checked_at TEXT NOT NULL)"
        )
        con.execute(
            "INSERT INTO checkpoint_janitor_residue_checks VALUES ('idle', ?)",
            (datetime.fromtimestamp(t0, UTC).isoformat(),),
        )
    report = await run_sweep(path, policy, now=t0 + 3600, residue_check_every=day)
    assert report.outcome is Outcome.SUCCESS, report.error
    assert report.expiries_wanted == 0
    assert {t for t, _, _ in all_keys(path)} == {"user-1"}
