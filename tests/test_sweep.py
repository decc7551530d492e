"""Sweep scenarios that are the same on every backend, run on each (`helpers.backends`).

For each policy scenario: read every checkpoint through the real saver,
sweep, and check that each checkpoint still there reads back equal (checkpoint
with every channel value, metadata, pending writes), that each thread's graph
state is unchanged, that no blob a remaining checkpoint references went, that
nothing is left orphaned on quiet threads, and that what went is what the
policy says should go. Backend-specific scenarios (the sync SQLite saver,
Postgres schemas, the official `aprune`, residue cadence) stay in
test_sqlite_sweep.py and test_postgres_sweep.py.
"""

from __future__ import annotations

import time

import pytest
from helpers.backends import (
    Backend,
    Stores,
    Template,
    assert_kept_unchanged,
    old_threads,
    snapshot,
)
from helpers.scenarios import DAY, replay, resume, root_ids

from policies.model import Reason
from worker.service.demo import chat_graph, thread
from worker.sweep import Outcome

MANY = "defaults: {max_delete_fraction: 1.0}"
LATER = 1.0 * DAY
"""How far ahead a sweep's clock is set so that every thread is quiet past the grace period."""
GRACE_PASSED = 2 * 3600
"""Past the grace period (an hour) after a deletion: its unreferenced blobs may go."""


async def test_keep_last_trims_every_shape(backend: Backend, mixed: Template) -> None:
    """keep_last trims each (thread, namespace), keeps what kept checkpoints need, frees blobs."""
    store, shapes = mixed
    before = await snapshot(backend, store, shapes)
    counts_before = await backend.ns_counts(store)
    report = await backend.run_sweep(store, "  - {name: trim, keep_last: 2}")
    assert report.outcome is Outcome.SUCCESS, report.error
    gone = await assert_kept_unchanged(backend, store, shapes, before)
    assert gone, "the sweep deleted nothing"
    counts = await backend.ns_counts(store)
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
    again = await backend.run_sweep(store, "  - {name: trim, keep_last: 2}")
    assert again.deleted.checkpoints == 0 and again.deleted.writes == 0
    assert again.deleted.blobs == 0
    past = time.time() + GRACE_PASSED
    later = await backend.run_sweep(store, "  - {name: trim, keep_last: 2}", now=past)
    assert later.deleted.checkpoints == 0 and later.deleted.writes == 0
    assert (later.policies["trim"].deleted.blobs > 0) is backend.has_blobs
    await assert_kept_unchanged(backend, store, shapes, before, now=past)
    # Subgraph calls of deleted root checkpoints went with them: writes at once, blobs
    # (on `sub-old`, quiet) past the grace period.
    for tid in ("sub-new", "sub-old"):
        sub_calls = {ns for (t, ns) in counts if t == tid and ns.startswith("inner:")}
        assert len(sub_calls) <= 1
        for role in ["writes"] + (["blobs"] if tid == "sub-old" else []):
            left = {
                ns for ns in await backend.namespaces(store, role, tid) if ns.startswith("inner:")
            }
            assert left <= sub_calls, (tid, role, left - sub_calls)


async def test_expiry_spares_waiting_and_protected_threads(
    backend: Backend, mixed: Template
) -> None:
    """expire_after deletes idle threads whole, sparing waiting and vip ones: checkpoints and
    writes at once, blobs with the first sweep past the grace period (a run in flight may
    still save onto them)."""
    store, shapes = mixed
    before = await snapshot(backend, store, shapes)
    policies = """
  - name: vip
    match: {thread_id: "vip-*"}
    protect: true
  - name: idle
    expire_after: 30d
"""
    report = await backend.run_sweep(store, policies, extra=MANY)
    assert report.outcome is Outcome.SUCCESS, report.error
    await assert_kept_unchanged(backend, store, shapes, before)
    left = {t for t, _, _ in await backend.all_keys(store)}
    old = old_threads(shapes)
    waiting_old = {"int-old", "brk-old", "err-old"}
    assert left == (set(shapes) - old) | waiting_old | {"vip-old"}
    assert report.policies["idle"].deleted.threads == len(old - waiting_old - {"vip-old"})
    assert report.policies["idle"].skipped["interrupted"] == len(waiting_old)
    assert report.deleted.blobs == 0
    assert await backend.rows_outside(store, "writes", left) == 0, "writes of expired threads left"
    if not backend.has_blobs:
        return
    waiting_blobs = await backend.rows_outside(store, "blobs", left)
    assert waiting_blobs > 0
    later = await backend.run_sweep(store, policies, now=time.time() + GRACE_PASSED, extra=MANY)
    assert later.outcome is Outcome.SUCCESS, later.error
    assert later.policies["idle"].deleted.blobs == waiting_blobs
    assert later.policies["idle"].by_reason.keys() == {Reason.UNREFERENCED_BLOBS}
    assert await backend.rows_outside(store, "blobs", left) == 0, "blobs of expired threads left"


async def test_interrupted_expire_takes_waiting_threads(backend: Backend, mixed: Template) -> None:
    """`interrupted: expire` expires waiting threads too; fresh waiting ones stay."""
    store, shapes = mixed
    before = await snapshot(backend, store, shapes)
    policies = "  - {name: idle, expire_after: 30d, interrupted: expire}"
    report = await backend.run_sweep(store, policies, extra=MANY)
    assert report.outcome is Outcome.SUCCESS, report.error
    await assert_kept_unchanged(backend, store, shapes, before)
    left = {t for t, _, _ in await backend.all_keys(store)}
    assert not left & {"int-old", "brk-old", "err-old", "user-old-1"}
    assert {"int-new", "brk-new"} <= left


@pytest.mark.parametrize("shape_thread", ["int-new", "brk-new", "int-old", "brk-old", "err-old"])
async def test_waiting_thread_resumes_after_sweep_like_control(
    backend: Backend, mixed_template: Template, stores: Stores, shape_thread: str
) -> None:
    """A waiting thread trimmed to its head resumes to the same final state as an unswept copy."""
    template, shapes = mixed_template
    store, control = stores.clone(template), stores.clone(template)
    counts_before = await backend.ns_counts(store)
    report = await backend.run_sweep(
        store, "  - {name: trim, keep_last: 1, expire_after: 30d}", extra=MANY
    )
    assert report.outcome is Outcome.SUCCESS, report.error
    counts = await backend.ns_counts(store)
    assert counts[(shape_thread, "")] == 1 < counts_before[(shape_thread, "")]
    results = []
    for db in (store, control):
        async with backend.saver(db) as saver:
            results.append(await resume(saver, shape_thread, shapes[shape_thread]))
    assert results[0] == results[1]
    assert any(s in str(results[0]) for s in ("human said yes", "reviewed", "recovered"))


async def test_namespace_rule_for_subgraph_calls(backend: Backend, mixed: Template) -> None:
    """`checkpoint_ns: "inner:*"` governs subgraph calls; roots follow their own rule."""
    store, shapes = mixed
    before = await snapshot(backend, store, shapes)
    counts_before = await backend.ns_counts(store)
    policies = """
  - name: calls
    match: {checkpoint_ns: "inner:*"}
    keep_last: 1
  - name: roots
    match: {checkpoint_ns: ""}
    keep_last: 4
"""
    report = await backend.run_sweep(store, policies)
    assert report.outcome is Outcome.SUCCESS, report.error
    await assert_kept_unchanged(backend, store, shapes, before)
    counts = await backend.ns_counts(store)
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


@pytest.mark.parametrize("keep_last", [1, 3])
async def test_replay_from_every_kept_root_checkpoint_is_unchanged(
    backend: Backend, replay_template: Template, stores: Stores, keep_last: int
) -> None:
    """Time travel (`invoke(None, checkpoint_id=R)`) from each root checkpoint the sweep kept
    returns what it returns on the unswept store, and leaves the same state.

    Each replay writes checkpoints, so each runs on its own copy of either store (the
    i-th kept root checkpoint of every thread on copy i: threads do not meet).
    """
    template, shapes = replay_template
    store = stores.clone(template)
    before = await snapshot(backend, store, shapes)
    now = time.time() + LATER
    report = await backend.run_sweep(store, f"  - {{name: trim, keep_last: {keep_last}}}", now=now)
    assert report.outcome is Outcome.SUCCESS, report.error
    assert await assert_kept_unchanged(backend, store, shapes, before, now=now)
    kept = root_ids(await backend.all_keys(store))
    for i in range(max(len(ids) for ids in kept.values())):
        results = []
        for source in (template, store):
            async with backend.saver(stores.clone(source)) as saver:
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


async def test_root_graph_is_stored_under_empty_namespace(backend: Backend, stores: Stores) -> None:
    """Current LangGraph ignores a config's checkpoint_ns for the root graph."""
    store = stores.create()
    async with backend.saver(store) as saver:
        await chat_graph(saver).ainvoke(
            {"messages": ["hi"]}, thread("user-1", checkpoint_ns="workflow-a")
        )
    assert {ns for _, ns, _ in await backend.all_keys(store)} == {""}


async def test_metadata_match_and_keep_within(backend: Backend, mixed: Template) -> None:
    """A metadata match selects threads by their head's metadata; keep_within spares fresh ones."""
    store, shapes = mixed
    before = await snapshot(backend, store, shapes)
    counts_before = await backend.ns_counts(store)
    policies = """
  - name: support
    match: {metadata: {assistant_id: support-bot}}
    keep_last: 1
    keep_within: 7d
"""
    now = time.time() + 0.5 * DAY
    report = await backend.run_sweep(store, policies, now=now)
    assert report.outcome is Outcome.SUCCESS, report.error
    await assert_kept_unchanged(backend, store, shapes, before, now=now)
    counts = await backend.ns_counts(store)
    # Fresh support threads are younger than 7d: untouched. Old ones trimmed to 1.
    assert counts[("user-new-1", "")] == counts_before[("user-new-1", "")]
    assert counts[("user-old-1", "")] == 1
    # Other assistants and threads without the key are not matched.
    assert counts[("user-old-2", "")] == counts_before[("user-old-2", "")]
    assert counts[("vip-old", "")] == counts_before[("vip-old", "")]


async def test_safety_limit_stops_mass_expiry(backend: Backend, mixed: Template) -> None:
    """A clock a year ahead makes every thread idle: past max_delete_fraction none expires."""
    store, _ = mixed
    n_before = len({t for t, _, _ in await backend.all_keys(store)})
    policy = "  - {name: idle, expire_after: 30d, interrupted: expire}"
    report = await backend.run_sweep(store, policy, now=time.time() + 365 * DAY)
    assert report.outcome is Outcome.SAFETY_STOP
    assert report.limit_reached_by == "idle"
    # All or nothing: more threads are due than the limit allows, so none goes.
    assert report.expiries_wanted == n_before > report.expiry_limit == int(0.5 * n_before)
    assert report.deleted.threads == 0
    n_after = len({t for t, _, _ in await backend.all_keys(store)})
    assert n_after == n_before
    plan = await backend.run_sweep(store, policy, now=time.time() + 365 * DAY, dry_run=True)
    assert plan.would_hit_limit
    assert len({t for t, _, _ in await backend.all_keys(store)}) == n_after


@pytest.mark.parametrize("ahead", [0.0, LATER], ids=["now", "later"])
async def test_dry_run_counts_without_deleting(
    backend: Backend, mixed: Template, ahead: float
) -> None:
    """A dry run changes nothing in the store and counts what the real sweep then deletes."""
    store, _ = mixed
    raw = await backend.raw(store)
    counts_before = await backend.table_counts(store)
    policy = "  - {name: trim, keep_last: 2}"
    plan = await backend.run_sweep(store, policy, dry_run=True, now=time.time() + ahead)
    assert plan.outcome is Outcome.SUCCESS, plan.error
    assert await backend.raw(store) == raw
    real = await backend.run_sweep(store, policy, now=time.time() + ahead)
    assert plan.deleted.checkpoints == real.deleted.checkpoints > 0
    assert plan.deleted.writes == real.deleted.writes
    assert plan.deleted.blobs == real.deleted.blobs
    assert plan.policies["trim"].by_reason.keys() == real.policies["trim"].by_reason.keys()
    # The counts are the rows that went.
    after = await backend.table_counts(store)
    assert real.deleted.checkpoints == counts_before["checkpoints"] - after["checkpoints"]
    assert real.deleted.writes == counts_before["writes"] - after["writes"]
    assert real.deleted.blobs == counts_before["blobs"] - after["blobs"]


async def test_future_clock_never_trims_by_age(backend: Backend, mixed: Template) -> None:
    """keep_within measured from a clock two days behind never trims fresh checkpoints."""
    store, _ = mixed
    counts_before = await backend.ns_counts(store)
    await backend.run_sweep(store, "  - {name: recent, keep_within: 1d}", now=time.time() - 2 * DAY)
    counts = await backend.ns_counts(store)
    fresh = {k for k in counts_before if "old" not in k[0] and k[0] != "org-1:user-2:session-3"}
    assert fresh and all(counts[k] == counts_before[k] for k in fresh)
    # ... while the 60-day-old threads were trimmed to their newest checkpoint.
    assert counts[("user-old-1", "")] == 1
