"""Sweeps of Postgres stores written by real graphs through the real `AsyncPostgresSaver`:
what only Postgres has (blobs and their grace period, schemas, the official `aprune`).

The policy scenarios every backend shares run on Postgres (C and ICU) in test_sweep.py.
For each scenario here: read every checkpoint through the real saver,
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
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.backends import Backend, Template, assert_kept_unchanged, snapshot
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
    orphans,
    pg_saver,
    run_pg_sweep,
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
    error_graph,
    persistent_subgraph_graph,
    read_all,
    send_graph,
    turns,
)
from langgraph.types import Command

from worker.service.demo import aged, chat_graph, subgraph_graph, thread
from worker.sweep import Outcome

# The tests that share the mixed store (`mixed`, a `backend` fixture) run on Postgres only here;
# the scenarios every backend shares are in test_sweep.py.
pytestmark = pytest.mark.backends("postgres-c", "postgres-icu")

MANY = "defaults: {max_delete_fraction: 1.0}"
LATER = 1.0 * DAY
"""How far ahead a sweep's clock is set so that every thread is quiet past the grace period."""


@pytest.fixture
def dbs(
    pg_server: PgServer, pg_collation: str, request: pytest.FixtureRequest
) -> Iterator[Databases]:
    d = Databases(pg_server, request.node.name, pg_collation)
    yield d
    d.drop_all()


Snapshot = tuple[dict[Key, Any], dict[str, Any], set[BlobKey]]


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
    backend: Backend, mixed: Template, policies: str
) -> None:
    """With every thread quiet, a sweep leaves no write without a checkpoint, and everything
    it keeps reads back equal; the next sweep past the grace period leaves no unreferenced
    blob. (A trimmed or expired thread's unreferenced blobs wait out the grace period after
    the deletion, for a fork or a run that read what it deleted.)"""
    dsn, shapes = mixed
    before = await snapshot(backend, dsn, shapes)
    now = time.time() + LATER
    report = await run_pg_sweep(dsn, policies, now=now, extra=MANY)
    assert report.outcome is Outcome.SUCCESS, report.error
    assert report.deleted.checkpoints > 0
    gone = await assert_kept_unchanged(backend, dsn, shapes, before, now=now)
    found = await orphans(dsn)
    assert found != NO_ORPHANS
    assert {r[0] for r in found["unreferenced_blobs"]} <= {t for t, _, _ in gone}
    later = await run_pg_sweep(dsn, policies, now=now + 2 * 3600, extra=MANY)
    assert later.outcome is Outcome.SUCCESS, later.error
    assert later.deleted.blobs > 0 and later.deleted.checkpoints == 0
    await assert_kept_unchanged(backend, dsn, shapes, before, now=now + 2 * 3600)
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


async def test_blob_gc_sweep_sizes_its_batches_in_blobs_and_reads_no_orphan_writes(
    dbs: Databases,
) -> None:
    """The sweep that collects trimmed threads' blobs, one grace period after the trim and
    between residue looks, sizes its batches by the blobs each thread holds (the unit a
    trim is sized in is its checkpoints): with `max_batch_rows` 20, no batch takes more
    than 20 blobs plus the last thread's. It looks at the dated threads' blobs only: a
    crashed run's write on one of them waits for the residue look. Kept checkpoints read
    back equal to an untouched copy's."""
    from langgraph.checkpoint.base.id import uuid6

    dsn = dbs.create()
    threads = [f"user-{i}" for i in range(6)]
    with aged(OLD_DAYS):
        async with pg_saver(dsn) as saver:
            for t in threads:
                await turns(chat_graph(saver), t, 3)
    policy = "  - {name: trim, keep_last: 1}"
    batch = "defaults:\n  batch: {max_batch_rows: 20, pause_factor: 0}"
    t0 = time.time()
    first = await run_pg_sweep(dsn, policy, now=t0, extra=batch, residue_check_every=DAY)
    assert first.outcome is Outcome.SUCCESS, first.error
    assert first.policies["trim"].deleted.checkpoints > 0
    left = Counter(r[0] for r in (await orphans(dsn))["unreferenced_blobs"])
    assert set(left) == set(threads)
    # A write without its checkpoint on a dated thread: residue, not the trim's leftover.
    async with pg_saver(dsn) as saver:
        head = await saver.aget_tuple(thread("user-0"))
        assert head is not None
        with aged(OLD_DAYS):
            ghost = {**head.config["configurable"], "checkpoint_id": str(uuid6())}
        await saver.aput_writes({"configurable": ghost}, [("messages", ["lost"])], "t-1")
    untouched = dbs.clone(dsn)
    async with pg_saver(untouched) as saver:
        before = await read_all(saver, await all_keys(untouched))

    second = await run_pg_sweep(
        dsn, policy, now=t0 + 2 * 3600, extra=batch, residue_check_every=DAY
    )
    assert second.outcome is Outcome.SUCCESS, second.error
    assert second.policies["trim"].deleted.blobs == sum(left.values())
    # Greedy batches close once they reach 20 blobs: at least this many of them.
    most = max(left.values())
    assert second.batches >= math.ceil(sum(left.values()) / (20 + most - 1)) >= 2
    assert second.policies["trim"].deleted.writes == 0
    found = await orphans(dsn)
    assert found["unreferenced_blobs"] == [] and {r[0] for r in found["orphan_writes"]} == {
        "user-0"
    }
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
