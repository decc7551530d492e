"""Sweeps of Postgres stores written by real graphs through the real `AsyncPostgresSaver`.

For each policy scenario: read every checkpoint through the real saver,
sweep, and check that each checkpoint still there reads back equal (checkpoint
with every channel value, metadata, pending writes), that each thread's graph
state is unchanged, that no blob a remaining checkpoint references went, that
nothing is left orphaned on quiet threads, and that what went is what the
policy says should go. The official `aprune` is the reference for what a
correct deletion keeps (differential tests at the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.daemon_helpers import ChatThreads, build_postgres
from helpers.pg_scenarios import (
    NO_ORPHANS,
    BlobKey,
    Databases,
    Key,
    all_keys,
    blob_keys,
    cli,
    connect,
    dump,
    json_events,
    lost_blobs,
    ns_counts,
    orphans,
    pg_saver,
    quiet_threads,
    run_pg_sweep,
    table_counts,
    thread_counts,
    write_config,
)
from helpers.pgserver import PgServer
from helpers.scenarios import (
    DAY,
    OLD_DAYS,
    Flaky,
    approval_graph,
    breakpoint_graph,
    build_mixed_store,
    build_replay_store,
    error_graph,
    persistent_subgraph_graph,
    read_all,
    replay,
    resume,
    root_ids,
    send_graph,
    states,
    turns,
)
from langgraph.types import Command

from policies.model import Reason
from worker.service.demo import aged, chat_graph, subgraph_graph, thread
from worker.sweep import Outcome

MANY = "defaults: {max_delete_fraction: 1.0}"
LATER = 1.0 * DAY
"""How far ahead a sweep's clock is set so that every thread is quiet past the grace period."""


@pytest.fixture(scope="module")
def mixed_template(pg_server: PgServer, pg_collation: str) -> Iterator[tuple[str, dict[str, str]]]:
    """One mixed store, built once by real graphs; each test sweeps its own copy."""
    dbs = Databases(pg_server, "mixed_template", pg_collation)
    dsn = dbs.create()

    async def build() -> dict[str, str]:
        async with pg_saver(dsn) as saver:
            return await build_mixed_store(saver)

    shapes = asyncio.run(build())
    yield dsn, shapes
    dbs.drop_all()


@pytest.fixture
def dbs(
    pg_server: PgServer, pg_collation: str, request: pytest.FixtureRequest
) -> Iterator[Databases]:
    d = Databases(pg_server, request.node.name, pg_collation)
    yield d
    d.drop_all()


@pytest.fixture
def mixed(mixed_template: tuple[str, dict[str, str]], dbs: Databases) -> tuple[str, dict[str, str]]:
    template, shapes = mixed_template
    return dbs.clone(template), shapes


Snapshot = tuple[dict[Key, Any], dict[str, Any], set[BlobKey]]


async def snapshot(dsn: str, shapes: dict[str, str]) -> Snapshot:
    """Every checkpoint as the saver reads it, every thread head's state, every blob key."""
    async with pg_saver(dsn) as saver:
        everything = await read_all(saver, await all_keys(dsn))
        heads = await states(saver, shapes)
    return everything, heads, await blob_keys(dsn)


async def assert_kept_unchanged(
    dsn: str, shapes: dict[str, str], before: Snapshot, now: float | None = None
) -> set[Key]:
    """What a sweep keeps is as it was; nothing it leaves is orphaned. Returns the deleted keys.

    - every checkpoint still there reads back equal through the saver;
    - every surviving thread's `aget_state` (subgraphs included) is equal;
    - no blob that a remaining checkpoint references went;
    - no write without its checkpoint, no parent id naming a deleted checkpoint;
    - on threads quiet past the grace period at `now` that the sweep deleted nothing
      from: no unreferenced blob (a deletion makes them wait out the grace period, for
      a fork that read a deleted checkpoint: see `test_postgres_race`).
    """
    cps, heads, blobs = before
    after_keys = set(await all_keys(dsn))
    assert after_keys <= set(cps), "the sweep created checkpoints?"
    async with pg_saver(dsn) as saver:
        after = await read_all(saver, sorted(after_keys))
        changed = [k for k in after_keys if after[k] != cps[k]]
        assert not changed, f"kept checkpoints read back differently: {changed[:5]}"
        surviving = {t: s for t, s in shapes.items() if any(k[0] == t for k in after_keys)}
        after_heads = await states(saver, surviving)
    diff = {t: (heads[t], after_heads[t]) for t in surviving if heads[t] != after_heads[t]}
    assert not diff, f"thread states changed: {diff}"
    assert not await lost_blobs(dsn, blobs), "blobs of kept checkpoints were deleted"
    found = await orphans(dsn)
    assert found["orphan_writes"] == [], found["orphan_writes"]
    assert found["missing_parents"] == [], found["missing_parents"]
    deleted_from = {k[0] for k in set(cps) - after_keys}
    quiet = quiet_threads(after_keys, time.time() if now is None else now) - deleted_from
    stray = [r for r in found["unreferenced_blobs"] if r[0] in quiet]
    assert stray == [], f"unreferenced blobs left on quiet threads: {stray[:10]}"
    return set(cps) - after_keys


def old_threads(shapes: dict[str, str]) -> set[str]:
    return {t for t in shapes if "old" in t or t == "org-1:user-2:session-3"}


# ------------------------------------------------------------------ policy scenarios


async def test_keep_last_trims_every_shape(mixed: tuple[str, dict[str, str]]) -> None:
    """keep_last trims each (thread, namespace), keeps what kept checkpoints need, frees blobs."""
    dsn, shapes = mixed
    before = await snapshot(dsn, shapes)
    counts_before = await ns_counts(dsn)
    report = await run_pg_sweep(dsn, "  - {name: trim, keep_last: 2}")
    assert report.outcome is Outcome.SUCCESS, report.error
    gone = await assert_kept_unchanged(dsn, shapes, before)
    assert gone, "the sweep deleted nothing"
    counts = await ns_counts(dsn)
    for (tid, ns), n in counts.items():
        if ns == "" and shapes[tid] != "delta":
            assert n == min(2, counts_before[(tid, ns)]), (tid, ns, n)
    # Delta threads keep the ancestors back to a snapshot: more than 2, fewer than all.
    assert 2 < counts[("delta-new", "")] < counts_before[("delta-new", "")]
    # The persistent subgraph namespace is trimmed, not dropped: its 2 newest, and the
    # checkpoint replaying the kept step-0 root checkpoint loads (the turn before's last).
    assert counts[("subp-new", "memory")] == 3
    assert report.policies["trim"].deleted.checkpoints == len(gone)
    # A trim dates its thread: even on the quiet 60-day-old threads, the blobs only the
    # deleted checkpoints used wait out the grace period (a fork may have read them).
    assert report.policies["trim"].deleted.blobs == 0
    # Sweeping again deletes nothing more; past the grace period the blobs go.
    again = await run_pg_sweep(dsn, "  - {name: trim, keep_last: 2}")
    assert again.deleted.checkpoints == 0 and again.deleted.writes == 0
    assert again.deleted.blobs == 0
    past = time.time() + 2 * 3600
    later = await run_pg_sweep(dsn, "  - {name: trim, keep_last: 2}", now=past)
    assert later.deleted.checkpoints == 0 and later.deleted.writes == 0
    assert later.policies["trim"].deleted.blobs > 0
    await assert_kept_unchanged(dsn, shapes, before, now=past)
    # Subgraph calls of deleted root checkpoints went with them: writes at once, blobs
    # (on `sub-old`, quiet) past the grace period.
    for tid in ("sub-new", "sub-old"):
        sub_calls = {ns for (t, ns) in counts if t == tid and ns.startswith("inner:")}
        assert len(sub_calls) <= 1
        tables = ["checkpoint_writes"] + (["checkpoint_blobs"] if tid == "sub-old" else [])
        async with connect(dsn) as conn:
            for table in tables:
                rows = await conn.fetch(
                    f"SELECT DISTINCT checkpoint_ns FROM {table} WHERE thread_id = $1", tid
                )
                left = {r[0] for r in rows if r[0].startswith("inner:")}
                assert left <= sub_calls, (tid, table, left - sub_calls)


async def test_expiry_spares_waiting_and_protected_threads(
    mixed: tuple[str, dict[str, str]],
) -> None:
    """expire_after deletes idle threads whole, sparing waiting and vip ones: checkpoints and
    writes at once, blobs with the first sweep past the grace period (a run in flight may
    still save onto them)."""
    dsn, shapes = mixed
    before = await snapshot(dsn, shapes)
    policies = """
  - name: vip
    match: {thread_id: "vip-*"}
    protect: true
  - name: idle
    expire_after: 30d
"""
    report = await run_pg_sweep(dsn, policies, extra=MANY)
    assert report.outcome is Outcome.SUCCESS, report.error
    await assert_kept_unchanged(dsn, shapes, before)
    left = {t for t, _, _ in await all_keys(dsn)}
    old = old_threads(shapes)
    waiting_old = {"int-old", "brk-old", "err-old"}
    assert left == (set(shapes) - old) | waiting_old | {"vip-old"}
    assert report.policies["idle"].deleted.threads == len(old - waiting_old - {"vip-old"})
    assert report.policies["idle"].skipped["interrupted"] == len(waiting_old)
    assert report.deleted.blobs == 0

    async def stray(table: str) -> int:
        async with connect(dsn) as conn:
            return int(
                await conn.fetchval(
                    f"SELECT COUNT(*) FROM {table} WHERE thread_id <> ALL($1::text[])",
                    sorted(left),
                )
            )

    assert await stray("checkpoint_writes") == 0, "writes of expired threads left"
    waiting_blobs = await stray("checkpoint_blobs")
    assert waiting_blobs > 0
    later = await run_pg_sweep(dsn, policies, now=time.time() + 2 * 3600, extra=MANY)
    assert later.outcome is Outcome.SUCCESS, later.error
    assert later.policies["idle"].deleted.blobs == waiting_blobs
    assert later.policies["idle"].by_reason.keys() == {Reason.UNREFERENCED_BLOBS}
    assert await stray("checkpoint_blobs") == 0, "blobs of expired threads left"


async def test_interrupted_expire_takes_waiting_threads(
    mixed: tuple[str, dict[str, str]],
) -> None:
    """`interrupted: expire` expires waiting threads too; fresh waiting ones stay."""
    dsn, shapes = mixed
    before = await snapshot(dsn, shapes)
    policies = "  - {name: idle, expire_after: 30d, interrupted: expire}"
    report = await run_pg_sweep(dsn, policies, extra=MANY)
    assert report.outcome is Outcome.SUCCESS, report.error
    await assert_kept_unchanged(dsn, shapes, before)
    left = {t for t, _, _ in await all_keys(dsn)}
    assert not left & {"int-old", "brk-old", "err-old", "user-old-1"}
    assert {"int-new", "brk-new"} <= left


@pytest.mark.parametrize("shape_thread", ["int-new", "brk-new", "int-old", "brk-old", "err-old"])
async def test_waiting_thread_resumes_after_sweep_like_control(
    mixed_template: tuple[str, dict[str, str]], dbs: Databases, shape_thread: str
) -> None:
    """A waiting thread trimmed to its head resumes to the same final state as an unswept copy."""
    template, shapes = mixed_template
    dsn, control = dbs.clone(template), dbs.clone(template)
    counts_before = await ns_counts(dsn)
    report = await run_pg_sweep(
        dsn, "  - {name: trim, keep_last: 1, expire_after: 30d}", extra=MANY
    )
    assert report.outcome is Outcome.SUCCESS, report.error
    counts = await ns_counts(dsn)
    assert counts[(shape_thread, "")] == 1 < counts_before[(shape_thread, "")]
    results = []
    for db in (dsn, control):
        async with pg_saver(db) as saver:
            results.append(await resume(saver, shape_thread, shapes[shape_thread]))
    assert results[0] == results[1]
    assert any(s in str(results[0]) for s in ("human said yes", "reviewed", "recovered"))


async def test_namespace_rule_for_subgraph_calls(mixed: tuple[str, dict[str, str]]) -> None:
    """`checkpoint_ns: "inner:*"` governs subgraph calls; roots follow their own rule."""
    dsn, shapes = mixed
    before = await snapshot(dsn, shapes)
    counts_before = await ns_counts(dsn)
    policies = """
  - name: calls
    match: {checkpoint_ns: "inner:*"}
    keep_last: 1
  - name: roots
    match: {checkpoint_ns: ""}
    keep_last: 4
"""
    report = await run_pg_sweep(dsn, policies)
    assert report.outcome is Outcome.SUCCESS, report.error
    await assert_kept_unchanged(dsn, shapes, before)
    counts = await ns_counts(dsn)
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
def replay_template(pg_server: PgServer) -> Iterator[tuple[str, dict[str, str]]]:
    """Persistent subgraphs (plain and DeltaChannel, with forks), built once."""
    dbs = Databases(pg_server, "replay_template")
    dsn = dbs.create()

    async def build() -> dict[str, str]:
        async with pg_saver(dsn) as saver:
            return await build_replay_store(saver)

    shapes = asyncio.run(build())
    yield dsn, shapes
    dbs.drop_all()


@pytest.mark.parametrize("keep_last", [1, 3])
async def test_replay_from_every_kept_root_checkpoint_is_unchanged(
    replay_template: tuple[str, dict[str, str]], dbs: Databases, keep_last: int
) -> None:
    """Time travel (`invoke(None, checkpoint_id=R)`) from each root checkpoint the sweep kept
    returns what it returns on the unswept store, and leaves the same state.

    Each replay writes checkpoints, so each runs on its own clone of either database (the
    i-th kept root checkpoint of every thread on clone i: threads do not meet).
    """
    template, shapes = replay_template
    dsn = dbs.clone(template)
    before = await snapshot(dsn, shapes)
    now = time.time() + LATER
    report = await run_pg_sweep(dsn, f"  - {{name: trim, keep_last: {keep_last}}}", now=now)
    assert report.outcome is Outcome.SUCCESS, report.error
    assert await assert_kept_unchanged(dsn, shapes, before, now=now)
    kept = root_ids(await all_keys(dsn))
    for i in range(max(len(ids) for ids in kept.values())):
        results = []
        for source in (template, dsn):
            async with pg_saver(dbs.clone(source)) as saver:
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


async def test_root_graph_is_stored_under_empty_namespace(dbs: Databases) -> None:
    """Current LangGraph ignores a config's checkpoint_ns for the root graph (Postgres too)."""
    dsn = dbs.create()
    async with pg_saver(dsn) as saver:
        await chat_graph(saver).ainvoke(
            {"messages": ["hi"]}, thread("user-1", checkpoint_ns="workflow-a")
        )
    assert {ns for _, ns, _ in await all_keys(dsn)} == {""}


async def test_metadata_match_and_keep_within(mixed: tuple[str, dict[str, str]]) -> None:
    """A metadata match selects threads by their head's metadata; keep_within spares fresh ones."""
    dsn, shapes = mixed
    before = await snapshot(dsn, shapes)
    counts_before = await ns_counts(dsn)
    policies = """
  - name: support
    match: {metadata: {assistant_id: support-bot}}
    keep_last: 1
    keep_within: 7d
"""
    now = time.time() + 0.5 * DAY
    report = await run_pg_sweep(dsn, policies, now=now)
    assert report.outcome is Outcome.SUCCESS, report.error
    await assert_kept_unchanged(dsn, shapes, before, now=now)
    counts = await ns_counts(dsn)
    # Fresh support threads are younger than 7d: untouched. Old ones trimmed to 1.
    assert counts[("user-new-1", "")] == counts_before[("user-new-1", "")]
    assert counts[("user-old-1", "")] == 1
    # Other assistants and threads without the key are not matched.
    assert counts[("user-old-2", "")] == counts_before[("user-old-2", "")]
    assert counts[("vip-old", "")] == counts_before[("vip-old", "")]


async def test_safety_limit_stops_mass_expiry(mixed: tuple[str, dict[str, str]]) -> None:
    """A clock a year ahead makes every thread idle: past max_delete_fraction none expires."""
    dsn, _ = mixed
    n_before = len({t for t, _, _ in await all_keys(dsn)})
    policy = "  - {name: idle, expire_after: 30d, interrupted: expire}"
    report = await run_pg_sweep(dsn, policy, now=time.time() + 365 * DAY)
    assert report.outcome is Outcome.SAFETY_STOP
    assert report.limit_reached_by == "idle"
    # All or nothing: more threads are due than the limit allows, so none goes.
    assert report.expiries_wanted == n_before > report.expiry_limit == int(0.5 * n_before)
    assert report.deleted.threads == 0
    n_after = len({t for t, _, _ in await all_keys(dsn)})
    assert n_after == n_before
    plan = await run_pg_sweep(dsn, policy, now=time.time() + 365 * DAY, dry_run=True)
    assert plan.would_hit_limit
    assert len({t for t, _, _ in await all_keys(dsn)}) == n_after


IDLE = [f"idle-{i}" for i in range(5)]
FRESH = ["user-1", "user-2"]


async def test_safety_limit_expires_none_however_often_once_runs(
    tmp_path: Path, dbs: Databases
) -> None:
    """`once` on Postgres: 5 of 7 threads due, 3 allowed: run after run none goes, trims run.

    `--allow-mass-expiry` then expires the 5, blobs and writes with them.
    """
    dsn = dbs.create()
    threads = ChatThreads(fresh=dict.fromkeys(FRESH, 4), aged={60.0: dict.fromkeys(IDLE, 2)})
    await build_postgres(dsn, threads)
    cfg = write_config(
        tmp_path / "janitor.yaml", dsn, "  - {name: chats, expire_after: 30d, keep_last: 2}"
    )
    idle_keys = [k for k in await all_keys(dsn) if k[0] in IDLE]
    async with pg_saver(dsn) as saver:
        before = await read_all(saver, idle_keys)
    for run in range(3):
        r = await asyncio.to_thread(cli, "once", config=cfg)
        assert r.returncode == 3, (run, r.stderr)
        assert set(await thread_counts(dsn)) == set(IDLE + FRESH), run
        summary = json.loads(r.stdout)["stores"][0]
        assert summary["outcome"] == "safety_stop" and summary["total"]["threads"] == 0
        assert summary["safety_limit"]["threads_to_expire"] == 5
        assert "--allow-mass-expiry" in r.stderr
    counts = await thread_counts(dsn)
    assert {counts[t] for t in FRESH} == {2}
    async with pg_saver(dsn) as saver:
        assert await read_all(saver, idle_keys) == before

    r = await asyncio.to_thread(cli, "once", "--allow-mass-expiry", config=cfg)
    assert r.returncode == 0, r.stderr
    assert set(await thread_counts(dsn)) == set(FRESH)
    expired = [e for e in json_events(r.stderr) if e["event"] == "thread_expired"]
    assert sorted(e["thread_id"] for e in expired) == IDLE
    assert all(59 * DAY < e["idle_seconds"] < 61 * DAY for e in expired)
    async with connect(dsn) as conn:
        left = await conn.fetchval(
            "SELECT COUNT(*) FROM checkpoint_writes WHERE thread_id = ANY($1::text[])", IDLE
        )
        assert left == 0
        # The blobs wait out the grace period for a run in flight (README "What always stays").
        listed = await conn.fetch("SELECT thread_id FROM checkpoint_janitor_expired")
        assert sorted(r["thread_id"] for r in listed) == IDLE


async def test_dry_run_counts_without_deleting(mixed: tuple[str, dict[str, str]]) -> None:
    """A dry run changes no row and counts what the real sweep then deletes."""
    dsn, _ = mixed
    raw = await dump(dsn)
    policy = "  - {name: trim, keep_last: 2}"
    plan = await run_pg_sweep(dsn, policy, dry_run=True, now=time.time() + LATER)
    assert plan.outcome is Outcome.SUCCESS, plan.error
    assert await dump(dsn) == raw
    real = await run_pg_sweep(dsn, policy, now=time.time() + LATER)
    assert plan.deleted.checkpoints == real.deleted.checkpoints > 0
    assert plan.deleted.writes == real.deleted.writes
    assert plan.deleted.blobs == real.deleted.blobs
    assert plan.policies["trim"].by_reason.keys() == real.policies["trim"].by_reason.keys()
    # The counts are the rows that went.
    after = await table_counts(dsn)
    assert real.deleted.checkpoints == len(raw["checkpoints"]) - after["checkpoints"]
    assert real.deleted.writes == len(raw["checkpoint_writes"]) - after["checkpoint_writes"]
    assert real.deleted.blobs == len(raw["checkpoint_blobs"]) - after["checkpoint_blobs"]


async def test_future_clock_never_trims_by_age(mixed: tuple[str, dict[str, str]]) -> None:
    """keep_within measured from a clock two days behind never trims fresh checkpoints."""
    dsn, _ = mixed
    counts_before = await ns_counts(dsn)
    await run_pg_sweep(dsn, "  - {name: recent, keep_within: 1d}", now=time.time() - 2 * DAY)
    counts = await ns_counts(dsn)
    fresh = {k for k in counts_before if "old" not in k[0] and k[0] != "org-1:user-2:session-3"}
    assert fresh and all(counts[k] == counts_before[k] for k in fresh)
    # ... while the 60-day-old threads were trimmed to their newest checkpoint.
    assert counts[("user-old-1", "")] == 1


async def test_non_default_schema(dbs: Databases) -> None:
    """`schema: app` sweeps a store the application keeps in schema `app`."""
    dsn = dbs.create()
    async with connect(dsn) as conn:
        await conn.execute("CREATE SCHEMA app")
    app_dsn = f"{dsn}?options=-csearch_path%3Dapp"
    async with pg_saver(app_dsn) as saver:
        await turns(chat_graph(saver), "user-1", 4)
    async with connect(dsn) as conn:
        n = await conn.fetchval("SELECT COUNT(*) FROM app.checkpoints")
        assert await conn.fetchval("SELECT to_regclass('public.checkpoints')") is None
    report = await run_pg_sweep(
        dsn, "  - {name: trim, keep_last: 2}", store_extra="    schema: app\n"
    )
    assert report.outcome is Outcome.SUCCESS, report.error
    async with connect(dsn) as conn:
        assert await conn.fetchval("SELECT COUNT(*) FROM app.checkpoints") == 2 < n
    async with pg_saver(app_dsn) as saver:
        values = (await chat_graph(saver).aget_state(thread("user-1"))).values
    assert values["messages"][-1] == "reply to turn 3"


# ------------------------------------------------------------------ no orphans


@pytest.mark.parametrize(
    "policies",
    [
        "  - {name: trim, keep_last: 1}",
        "  - {name: trim, keep_last: 3}",
        "  - {name: calls, match: {checkpoint_ns: 'inner:*'}, keep_last: 1}\n"
        "  - {name: roots, keep_last: 2}",
        "  - {name: idle, expire_after: 30d, keep_last: 2}",
    ],
    ids=["keep_last_1", "keep_last_3", "namespaces", "expire_and_trim"],
)
async def test_no_orphans_after_a_sweep_past_the_grace_period(
    mixed: tuple[str, dict[str, str]], policies: str
) -> None:
    """With every thread quiet, a sweep leaves no write without a checkpoint, and everything
    it keeps reads back equal; the next sweep past the grace period leaves no unreferenced
    blob. (A trimmed or expired thread's unreferenced blobs wait out the grace period after
    the deletion, for a fork or a run that read what it deleted.)"""
    dsn, shapes = mixed
    before = await snapshot(dsn, shapes)
    now = time.time() + LATER
    report = await run_pg_sweep(dsn, policies, now=now, extra=MANY)
    assert report.outcome is Outcome.SUCCESS, report.error
    assert report.deleted.checkpoints > 0
    gone = await assert_kept_unchanged(dsn, shapes, before, now=now)
    found = await orphans(dsn)
    assert found != NO_ORPHANS
    assert {r[0] for r in found["unreferenced_blobs"]} <= {t for t, _, _ in gone}
    later = await run_pg_sweep(dsn, policies, now=now + 2 * 3600, extra=MANY)
    assert later.outcome is Outcome.SUCCESS, later.error
    assert later.deleted.blobs > 0 and later.deleted.checkpoints == 0
    await assert_kept_unchanged(dsn, shapes, before, now=now + 2 * 3600)
    assert await orphans(dsn) == NO_ORPHANS


async def test_leftovers_of_a_crashed_run_go_after_grace(dbs: Databases) -> None:
    """Writes and blobs a crashed run saved without their checkpoint go once the thread is quiet.

    `aput` saves blobs and the checkpoint in separate autocommit statements and
    writes go before their checkpoint, so a crash leaves both behind.
    """
    from langgraph.checkpoint.base.id import uuid6

    dsn = dbs.create()
    with aged(OLD_DAYS):
        async with pg_saver(dsn) as saver:
            await turns(chat_graph(saver), "user-1", 3)
            await turns(chat_graph(saver), "user-2", 1)
            for tid in ("user-1", "user-2"):
                head = await saver.aget_tuple(thread(tid))
                assert head is not None
                # Writes against a checkpoint that never committed.
                ghost = {**head.config["configurable"], "checkpoint_id": str(uuid6())}
                await saver.aput_writes({"configurable": ghost}, [("messages", ["lost"])], "t-1")
    async with connect(dsn) as conn:
        # ... and a blob version no checkpoint references.
        await conn.execute(
            "INSERT INTO checkpoint_blobs SELECT thread_id, checkpoint_ns, channel, "
            "'99999999999999999999999999999999.0.1', type, blob FROM checkpoint_blobs "
            "WHERE channel = 'messages' AND version = (SELECT MAX(version) FROM "
            "checkpoint_blobs WHERE channel = 'messages' AND thread_id = 'user-1') "
            "AND thread_id = 'user-1'"
        )
        await conn.execute(
            "INSERT INTO checkpoint_blobs SELECT 'user-2', checkpoint_ns, channel, version, "
            "type, blob FROM checkpoint_blobs WHERE thread_id = 'user-1' "
            "AND version = '99999999999999999999999999999999.0.1'"
        )
    found = await orphans(dsn)
    assert len(found["orphan_writes"]) == 2 and len(found["unreferenced_blobs"]) == 2
    async with pg_saver(dsn) as saver:
        heads = {
            t: (await chat_graph(saver).aget_state(thread(t))).values for t in ("user-1", "user-2")
        }
    # user-1 is trimmed; user-2 has nothing to trim (its blob is the only leftover).
    # Cadence 0: every sweep looks at every quiet thread's residue.
    report = await run_pg_sweep(dsn, "  - {name: trim, keep_last: 10}", residue_check_every=0)
    assert report.outcome is Outcome.SUCCESS, report.error
    assert report.policies["trim"].deleted.writes == 2
    assert await orphans(dsn) == NO_ORPHANS
    async with pg_saver(dsn) as saver:
        for t, values in heads.items():
            assert (await chat_graph(saver).aget_state(thread(t))).values == values


async def test_residue_cadence_dated_threads_every_sweep_others_at_the_next_look(
    dbs: Databases,
) -> None:
    """With `residue_check_every`, a sweep between looks still collects the unreferenced
    blobs of the threads it trimmed (dated in `checkpoint_janitor_deletions`), and
    leaves a crashed run's leftovers on another quiet thread to the next look, dated per
    policy in `checkpoint_janitor_residue_checks`. Kept checkpoints read back equal."""
    from langgraph.checkpoint.base.id import uuid6

    dsn = dbs.create()
    with aged(OLD_DAYS):
        async with pg_saver(dsn) as saver:
            await turns(chat_graph(saver), "user-1", 4)
            await turns(chat_graph(saver), "user-2", 1)
    # Trims user-1 (four turns), not user-2 (one turn).
    policy = "  - {name: trim, keep_last: 5}"
    t0 = time.time()
    first = await run_pg_sweep(dsn, policy, now=t0, residue_check_every=DAY)
    assert first.outcome is Outcome.SUCCESS, first.error
    assert first.policies["trim"].deleted.checkpoints > 0
    # The trim's leftovers wait out the grace period after it.
    assert {r[0] for r in (await orphans(dsn))["unreferenced_blobs"]} == {"user-1"}
    async with connect(dsn) as conn:
        checked = await conn.fetch(
            "SELECT policy, extract(epoch FROM checked_at)::float8 "
            "FROM checkpoint_janitor_residue_checks"
        )
    assert [(r[0], pytest.approx(r[1])) for r in checked] == [("trim", pytest.approx(t0))]

    # A crashed run on user-2: a write without its checkpoint, a blob no one references.
    async with pg_saver(dsn) as saver:
        head = await saver.aget_tuple(thread("user-2"))
        assert head is not None
        with aged(OLD_DAYS):
            ghost = {**head.config["configurable"], "checkpoint_id": str(uuid6())}
        await saver.aput_writes({"configurable": ghost}, [("messages", ["lost"])], "t-1")
    async with connect(dsn) as conn:
        await conn.execute(
            "INSERT INTO checkpoint_blobs SELECT thread_id, checkpoint_ns, channel, "
            "'99999999999999999999999999999999.0.1', type, blob FROM checkpoint_blobs "
            "WHERE thread_id = 'user-2' AND channel = 'messages' LIMIT 1"
        )
    untouched = dbs.clone(dsn)
    async with pg_saver(untouched) as saver:
        before = await read_all(saver, await all_keys(untouched))

    second = await run_pg_sweep(dsn, policy, now=t0 + 2 * 3600, residue_check_every=DAY)
    assert second.outcome is Outcome.SUCCESS, second.error
    left = await orphans(dsn)
    assert {r[0] for r in left["unreferenced_blobs"]} == {"user-2"}
    assert {r[0] for r in left["orphan_writes"]} == {"user-2"}

    third = await run_pg_sweep(dsn, policy, now=t0 + DAY + 1, residue_check_every=DAY)
    assert third.outcome is Outcome.SUCCESS, third.error
    assert third.policies["trim"].deleted.writes == 1
    assert await orphans(dsn) == NO_ORPHANS
    async with pg_saver(dsn) as saver:
        assert await read_all(saver, await all_keys(dsn)) == before


async def test_late_fork_of_a_deleted_checkpoint_gets_its_parent_nulled(dbs: Databases) -> None:
    """A fork that commits just after a sweep deleted its base names a deleted parent; a sweep
    once the thread is quiet nulls it (invariant 6), as the official prune would.

    The fork is saved as `aupdate_state` saves one (`aput` on the base's config), with
    the head's channel values so that every blob it references exists.
    """
    from langgraph.checkpoint.base.id import uuid6

    dsn = dbs.create()
    with aged(1):
        async with pg_saver(dsn) as saver:
            await turns(chat_graph(saver), "user-1", 4)
    async with pg_saver(dsn) as saver:
        history = [t async for t in saver.alist(thread("user-1"))]
    base, head = history[-3], history[0]
    report = await run_pg_sweep(dsn, "  - {name: trim, keep_last: 3}")
    assert report.outcome is Outcome.SUCCESS, report.error
    left = {c for _, _, c in await all_keys(dsn)}
    assert base.config["configurable"]["checkpoint_id"] not in left
    async with pg_saver(dsn) as saver:
        fork = {**head.checkpoint, "id": str(uuid6())}
        fork_config = await saver.aput(
            base.config, fork, {**head.metadata, "source": "update", "step": 99}, {}
        )
        before = await read_all(saver, [("user-1", "", fork["id"])])
    assert (await orphans(dsn))["missing_parents"] == [("user-1", "", fork["id"])]
    report = await run_pg_sweep(dsn, "  - {name: trim, keep_last: 3}", now=time.time() + LATER)
    assert report.outcome is Outcome.SUCCESS, report.error
    assert report.deleted.checkpoints == 1
    async with pg_saver(dsn) as saver:
        assert await read_all(saver, [("user-1", "", fork["id"])]) == before
        tup = await saver.aget_tuple(fork_config)
        assert tup is not None
    assert (await orphans(dsn))["missing_parents"] == [], "the fork's parent id is dangling"
    assert tup.parent_config is None


# ------------------------------------------------------------------ against the official prune


AWKWARD_OLD = ["", "Chat-OLD_%[*?]\U0010ffff"]
AWKWARD_NEW = ["CHAT-new-1", "chat-new-\ud7ff" + "x" * 290, "\ue000"]
"""Ids the keyset walk must order and reach like any other: the empty one, case
variants, glob metacharacters, surrogate edges, a long one."""


async def build_plain_store(dsn: str) -> list[str]:
    """Threads without DeltaChannel, some 60 days old: chats, subgraph calls, a persistent
    subgraph, Send, interrupts, a breakpoint, an error. Returns the old threads."""
    async with pg_saver(dsn) as saver:
        chat = chat_graph(saver)
        with aged(OLD_DAYS):
            await turns(chat, "chat-old-1", 4, assistant_id="support-bot")
            await turns(chat, "chat-old-2", 1)
            for tid in AWKWARD_OLD:
                await turns(chat, tid, 2)
            await turns(subgraph_graph(saver), "sub-old", 3)
            await turns(send_graph(saver), "send-old", 2)
            await approval_graph(saver).ainvoke({"messages": ["refund?"]}, thread("int-old"))
            Flaky.fail = True
            with contextlib.suppress(RuntimeError):
                await error_graph(saver).ainvoke({"messages": ["go"]}, thread("err-old"))
        await turns(chat, "chat-new-1", 5, user_id="u1")
        await turns(chat, "chat-new-2", 2)
        for tid in AWKWARD_NEW:
            await turns(chat, tid, 2)
        await turns(subgraph_graph(saver), "sub-new", 3)
        await turns(persistent_subgraph_graph(saver), "subp-new", 3)
        await turns(send_graph(saver), "send-new", 3)
        app = approval_graph(saver)
        await app.ainvoke({"messages": ["refund?"]}, thread("int-new"))
        await app.ainvoke({"messages": ["again?"]}, thread("int-twice"))
        await app.ainvoke(Command(resume="yes"), thread("int-twice"))
        await app.ainvoke({"messages": ["and again?"]}, thread("int-twice"))
        await breakpoint_graph(saver).ainvoke({"messages": ["hi"]}, thread("brk-new"))
    return ["chat-old-1", "chat-old-2", *AWKWARD_OLD, "sub-old", "send-old", "int-old", "err-old"]


def table_diff(ours: dict[str, list[Any]], theirs: dict[str, list[Any]]) -> dict[str, Any]:
    """Rows only in our result and only in the official one, per table (first few)."""
    out = {}
    for table in ours:
        a, b = set(ours[table]), set(theirs[table])
        if a != b or ours[table] != theirs[table]:
            out[table] = {
                "only_ours": sorted(a - b, key=repr)[:5],
                "only_official": sorted(b - a, key=repr)[:5],
                "counts": (len(ours[table]), len(theirs[table])),
            }
    return out


@pytest.fixture(scope="module")
def plain_template(pg_server: PgServer, pg_collation: str) -> Iterator[tuple[str, list[str]]]:
    dbs = Databases(pg_server, "plain_template", pg_collation)
    dsn = dbs.create()
    old = asyncio.run(build_plain_store(dsn))
    yield dsn, old
    dbs.drop_all()


async def official(dsn: str, thread_ids: list[str], strategy: str) -> None:
    async with pg_saver(dsn) as saver:
        await saver.aprune(thread_ids, strategy=strategy)


async def test_keep_last_1_leaves_the_rows_official_keep_latest_leaves(
    plain_template: tuple[str, list[str]], dbs: Databases
) -> None:
    """`keep_last: 1` on quiet threads == `aprune(ids, strategy="keep_latest")`, row for row.

    The sweep's clock is a day ahead so that every thread is quiet past the
    grace period, and a second sweep past the grace period after the trims
    collects the blobs they left (blobs are collected only then); no
    keep_within or expiry.
    """
    template, _ = plain_template
    ours, theirs = dbs.clone(template), dbs.clone(template)
    ids = sorted({t for t, _, _ in await all_keys(template)})
    for later in (LATER, LATER + 2 * 3600):
        report = await run_pg_sweep(ours, "  - {name: trim, keep_last: 1}", now=time.time() + later)
        assert report.outcome is Outcome.SUCCESS, report.error
    await official(theirs, ids, "keep_latest")
    mine, ref = await dump(ours), await dump(theirs)
    assert await dump(template) != ref, "the official prune deleted nothing"
    assert mine == ref, table_diff(mine, ref)


async def test_keep_last_1_on_fresh_threads_then_later_matches_official(
    plain_template: tuple[str, list[str]], dbs: Databases
) -> None:
    """At today's clock (fresh threads not yet quiet) `keep_last: 1` leaves the same
    checkpoints and writes as the official prune, and blobs at least those; a sweep
    after the grace period then leaves exactly the official rows."""
    template, _ = plain_template
    ours, theirs = dbs.clone(template), dbs.clone(template)
    ids = sorted({t for t, _, _ in await all_keys(template)})
    before = await blob_keys(ours)
    report = await run_pg_sweep(ours, "  - {name: trim, keep_last: 1}")
    assert report.outcome is Outcome.SUCCESS, report.error
    await official(theirs, ids, "keep_latest")
    mine, ref = await dump(ours), await dump(theirs)
    assert mine["checkpoints"] == ref["checkpoints"], table_diff(mine, ref)
    assert mine["checkpoint_writes"] == ref["checkpoint_writes"], table_diff(mine, ref)
    assert set(ref["checkpoint_blobs"]) <= set(mine["checkpoint_blobs"]), table_diff(mine, ref)
    assert not await lost_blobs(ours, before)
    report = await run_pg_sweep(ours, "  - {name: trim, keep_last: 1}", now=time.time() + LATER)
    assert report.outcome is Outcome.SUCCESS, report.error
    mine = await dump(ours)
    assert mine == ref, table_diff(mine, ref)


async def test_expire_after_leaves_the_rows_official_delete_leaves(
    plain_template: tuple[str, list[str]], dbs: Databases
) -> None:
    """`expire_after: 30d` (interrupted: expire) == `aprune(old_ids, strategy="delete")`.

    The 60-day-old threads expire; the fresh ones (a day idle at the sweep's
    clock, so quiet past the grace period) must keep every row.
    """
    template, old = plain_template
    ours, theirs = dbs.clone(template), dbs.clone(template)
    report = await run_pg_sweep(
        ours,
        "  - {name: idle, expire_after: 30d, interrupted: expire}",
        now=time.time() + LATER,
        extra=MANY,
    )
    assert report.outcome is Outcome.SUCCESS, report.error
    assert report.deleted.threads == len(old)
    await official(theirs, old, "delete")
    mine, ref = await dump(ours), await dump(theirs)
    # The expired threads' blobs wait out the grace period; the first sweep past it takes them.
    assert {t: rows for t, rows in mine.items() if t != "checkpoint_blobs"} == {
        t: rows for t, rows in ref.items() if t != "checkpoint_blobs"
    }
    assert {r[0][1] for r in mine["checkpoint_blobs"]} - {
        r[0][1] for r in ref["checkpoint_blobs"]
    } == set(old)
    report = await run_pg_sweep(
        ours,
        "  - {name: idle, expire_after: 30d, interrupted: expire}",
        now=time.time() + LATER + 2 * 3600,
        extra=MANY,
    )
    assert report.outcome is Outcome.SUCCESS, report.error
    mine = await dump(ours)
    assert mine == ref, table_diff(mine, ref)
    # Everything expires a year later: both stores end empty.
    for later in (365 * DAY, 365 * DAY + 2 * 3600):
        report = await run_pg_sweep(
            ours,
            "  - {name: idle, expire_after: 30d, interrupted: expire}",
            now=time.time() + later,
            allow_mass_expiry=True,
        )
        assert report.outcome is Outcome.SUCCESS, report.error
    await official(theirs, sorted({t for t, _, _ in await all_keys(theirs)}), "delete")
    assert await dump(ours) == await dump(theirs) == {table: [] for table in mine}
