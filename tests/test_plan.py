"""The plan from aggregates (`policies.plan`) against the row-level decision as oracle.

For any thread, `plan_thread` fed the thread's per-namespace aggregates (and
the details it asks for) must delete exactly what `decide` deletes from the
rows, expire exactly when it expires, and skip for the same reasons — or hand
the thread to the row-level path. The store-level twins, over real graphs and
awkward thread ids on SQLite and Postgres, are in the sweep test files.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_decide import DAY, GRACE, NOW, THREAD_IDS, make_id, rulesets, threads

from policies.config import Match, Orphaned, Policy
from policies.decide import decide
from policies.ids import checkpoint_time
from policies.matching import Ruleset
from policies.model import CheckpointSummary, Reason, SkipReason, ThreadView
from policies.plan import (
    Detail,
    NamespaceAggregate,
    ThreadAggregate,
    ThreadPlan,
    id_bound,
    is_regular_id,
    plan_thread,
)


def aggregate_of(view: ThreadView) -> ThreadAggregate:
    """What an engine's GROUP BY over the primary key says of `view`."""
    by_ns: dict[str, list[str]] = {}
    for c in view.checkpoints:
        by_ns.setdefault(c.namespace, []).append(c.checkpoint_id)
    spaces = tuple(
        NamespaceAggregate(ns, len(ids), min(ids), max(ids)) for ns, ids in sorted(by_ns.items())
    )
    return ThreadAggregate(view.thread_id, spaces, head_metadata=view.head_metadata)


def fill(agg: ThreadAggregate, view: ThreadView, plan: ThreadPlan) -> ThreadAggregate:
    """Answer the plan's questions from the rows, as an engine would."""
    if Detail.ORPHANS in plan.needs:
        agg = replace(agg, orphan_writes=view.orphan_writes)
    if Detail.WAITING in plan.needs:
        agg = replace(agg, waiting=view.waiting, head_undecodable=view.head_undecodable)
    if Detail.MARKERS in plan.needs:
        marked = any(c.delta_marked or c.reads_parent_sends for c in view.checkpoints)
        agg = replace(agg, markers=marked)
    if Detail.REGULAR in plan.needs:
        irregular = {
            ns.namespace: sum(
                not is_regular_id(c.checkpoint_id)
                for c in view.checkpoints
                if c.namespace == ns.namespace
            )
            for ns in agg.namespaces
        }
        spaces = tuple(replace(ns, irregular=irregular[ns.namespace]) for ns in agg.namespaces)
        agg = replace(agg, namespaces=spaces)
    if Detail.COUNT in plan.needs:
        below = dict(agg.below)
        for ns, bound in plan.count_below:
            below[(ns, bound)] = sum(
                1 for c in view.checkpoints if c.namespace == ns and c.checkpoint_id < bound
            )
        agg = replace(agg, below=below)
    return agg


def planned(view: ThreadView, rules: Ruleset) -> ThreadPlan:
    agg = aggregate_of(view)
    for _ in range(6):
        plan = plan_thread(agg, rules, NOW, GRACE)
        if not plan.needs:
            return plan
        agg = fill(agg, view, plan)
    raise AssertionError(f"the plan keeps asking: {plan.needs}")


def deleted_by(plan: ThreadPlan, view: ThreadView) -> set[tuple[str, str]]:
    """The rows a plan's trims name: below `before`, not among the `keep` newest."""
    out = set()
    for t in plan.trims:
        ids = sorted(c.checkpoint_id for c in view.checkpoints if c.namespace == t.namespace)
        newest = ids[-t.keep :]
        gone = {i for i in ids if i < t.before and i not in newest}
        assert len(gone) == t.deletes
        out |= {(t.namespace, i) for i in gone}
    return out


def assert_same(view: ThreadView, policies: list[Policy] | Ruleset) -> ThreadPlan:
    rules = policies if isinstance(policies, Ruleset) else Ruleset(policies)
    plan = planned(view, rules)
    if plan.rows:
        return plan
    d = decide(view, rules, NOW, GRACE)
    assert (plan.expiry is None) == (d.expiry is None)
    if d.expiry is not None:
        assert plan.expiry is not None
        assert plan.expiry.policy == d.expiry.policy
        assert plan.expiry.reason == d.expiry.reason
        assert plan.expiry.age_seconds == pytest.approx(d.expiry.age_seconds)
        assert plan.skips == d.skips
        return plan
    assert deleted_by(plan, view) == {(x.namespace, x.checkpoint_id) for x in d.deletions}
    assert {t.policy for t in plan.trims} == {x.policy for x in d.deletions}
    assert plan.writes == d.writes
    assert plan.skips == d.skips
    return plan


def root_view(
    thread_id: str, rnd: random.Random, age_days: float, n: int, step: float = 60, **kw: Any
) -> ThreadView:
    """A root-only thread of `n` regular ids `step` seconds apart, the oldest `age_days` old
    (`kw`: the view's other fields, such as `waiting` or `head_metadata`)."""
    ids = [make_id(NOW - age_days * DAY + i * step, rnd) for i in range(n)]
    summaries = tuple(CheckpointSummary("", i, None, checkpoint_time(i)) for i in ids)
    return ThreadView(thread_id, summaries, **kw)


def _irregular(rnd: random.Random, t: float) -> str:
    kind = rnd.choice(["v4", "upper", "v1-like"])
    if kind == "v4":
        return str(uuid.UUID(int=rnd.getrandbits(128), version=4))
    if kind == "upper":
        return make_id(t, rnd).upper()
    return make_id(t, rnd)[:14] + "1" + make_id(t, rnd)[15:]


@st.composite
def root_threads(draw: st.DrawFn) -> ThreadView:
    """Root-only threads (what the plan decides itself): ages, futures, orphans, waiting."""
    rnd = random.Random(draw(st.integers(0, 2**32)))
    n = draw(st.integers(1, 15))
    start = NOW - draw(st.floats(0, 90 * DAY))
    step = draw(st.sampled_from([0.0000001, 0.5, 60.0, 3600.0, DAY]))
    cps: list[CheckpointSummary] = []
    parent: str | None = None
    t = start
    for _ in range(n):
        cid = make_id(t, rnd)
        cps.append(CheckpointSummary("", cid, parent, checkpoint_time(cid)))
        parent = cid
        t += step
    if draw(st.booleans()):
        cid = make_id(NOW + draw(st.floats(0.0000001, 3 * DAY)), rnd)
        cps.append(CheckpointSummary("", cid, parent, checkpoint_time(cid)))
    if draw(st.integers(0, 9)) == 0:
        cid = _irregular(rnd, t)
        cps.append(CheckpointSummary("", cid, parent, checkpoint_time(cid) or t))
    if draw(st.integers(0, 9)) == 0:
        cps = [replace(c, delta_marked=True) for c in cps]
    orphans = []
    for _ in range(draw(st.integers(0, 2))):
        ns = draw(st.sampled_from(["", "inner:1"]))
        orphans.append((ns, make_id(NOW - draw(st.floats(0, 3 * GRACE)), rnd)))
    return ThreadView(
        thread_id=draw(st.one_of(st.sampled_from(THREAD_IDS), st.text(max_size=40))),
        checkpoints=tuple(cps),
        head_metadata={"assistant_id": draw(st.sampled_from(["bot", "other"]))},
        waiting=draw(st.booleans()),
        head_undecodable=draw(st.integers(0, 5)) == 0,
        orphan_writes=tuple(orphans),
    )


@settings(max_examples=1500, deadline=None)
@given(root_threads(), rulesets())
@example(
    ThreadView("user-1", (), orphan_writes=(("", make_id(NOW - 2 * GRACE, random.Random(1))),)),
    [Policy(name="main", keep_last=1)],
)
def test_plan_deletes_what_decide_deletes(view: ThreadView, policies: list[Policy]) -> None:
    assert_same(view, policies)


@settings(max_examples=300, deadline=None)
@given(threads(), rulesets())
def test_plan_on_any_thread_shape_agrees_or_hands_over(
    view: ThreadView, policies: list[Policy]
) -> None:
    plan = assert_same(view, policies)
    if len({c.namespace for c in view.checkpoints}) > 1:
        assert plan.rows


def test_plan_decides_the_common_thread_without_rows() -> None:
    """50 root checkpoints, keep_last 5: one trim below the 5th newest, no row read."""
    view = root_view("user-1", random.Random(7), 40, 50)
    rules = Ruleset([Policy(name="main", keep_last=5, expire_after=timedelta(days=90))])
    plan = plan_thread(aggregate_of(view), rules, NOW, GRACE)
    assert plan.needs == {Detail.ORPHANS}  # quiet: orphan writes may go
    agg = aggregate_of(view)
    regular = tuple(replace(ns, irregular=0) for ns in agg.namespaces)
    plan = plan_thread(
        replace(agg, namespaces=regular, orphan_writes=(), markers=False), rules, NOW, GRACE
    )
    assert not plan.rows and not plan.needs
    assert [(t.keep, t.deletes) for t in plan.trims] == [(5, 45)]
    assert_same(view, [Policy(name="main", keep_last=5)])


def test_dated_thread_between_residue_looks_gets_only_its_blobs_looked_at() -> None:
    """A quiet thread the tool trimmed (dated), with no residue look due on it: the plan
    asks for its unreferenced blobs alone (not its orphan writes, which wait for the
    look), and collects them in a part sized by their count (the engine's answer)."""
    rnd = random.Random(11)
    view = root_view("user-1", rnd, 40, 5)
    rules = Ruleset([Policy(name="main", keep_last=5)])
    agg = replace(aggregate_of(view), dated=True)
    plan = plan_thread(agg, rules, NOW, GRACE, residue=frozenset())
    assert plan.needs == {Detail.BLOBS}
    plan = plan_thread(replace(agg, garbage_blobs=30), rules, NOW, GRACE, residue=frozenset())
    assert not plan.needs and plan.gc_blobs == "main" and not plan.writes
    # Not dated, no look due: nothing is read; a look due: orphans (and blobs with them).
    assert plan_thread(aggregate_of(view), rules, NOW, GRACE, residue=frozenset()).is_empty
    assert plan_thread(agg, rules, NOW, GRACE, residue=None).needs == {Detail.ORPHANS}
    # Busy (within the grace period): neither.
    busy = replace(
        agg, namespaces=tuple(replace(a, newest_id=make_id(NOW - 1, rnd)) for a in agg.namespaces)
    )
    assert plan_thread(busy, rules, NOW, GRACE, residue=frozenset()).is_empty


def test_expiry_candidate_asks_its_facts_in_one_round() -> None:
    """An expiry candidate asks for its orphan writes, id regularity and waiting check
    together, so the engine reads them in one round; then it expires as `decide` says."""
    rnd = random.Random(11)
    view = root_view("idle", rnd, 40, 5, waiting=False)
    rules = Ruleset([Policy(name="idle", expire_after=timedelta(days=30))])
    agg = aggregate_of(view)
    plan = plan_thread(agg, rules, NOW, GRACE)
    assert plan.needs == {Detail.ORPHANS, Detail.REGULAR, Detail.WAITING}
    plan = plan_thread(fill(agg, view, plan), rules, NOW, GRACE)
    assert not plan.needs and plan.expiry is not None
    # A thread still inside its TTL asks for no more than before.
    young = root_view("young", rnd, 10, 5)
    assert plan_thread(aggregate_of(young), rules, NOW, GRACE).needs == {Detail.ORPHANS}
    assert_same(view, rules)


@settings(max_examples=3000, deadline=None)
@given(st.floats(0, 2 * NOW), st.integers(-3, 3))
def test_id_bound_splits_ids_by_their_date(horizon: float, offset: int) -> None:
    rnd = random.Random(int(horizon))
    ticks = int(horizon * 10_000_000) + 0x01B21DD213814000 + offset
    value = ((ticks >> 12) << 80) | (0x6 << 76) | ((ticks & 0xFFF) << 64) | (0b10 << 62)
    cid = str(uuid.UUID(int=value | rnd.getrandbits(62)))
    t = checkpoint_time(cid)
    assert t is not None and is_regular_id(cid)
    assert (cid < id_bound(horizon)) == (t <= horizon)


def test_metadata_rule_reads_the_head() -> None:
    view = root_view("t", random.Random(3), 10, 5, step=1, head_metadata={"assistant_id": "bot"})
    rule = Policy(name="bot", match=Match(metadata={"assistant_id": "bot"}), keep_last=2)
    plan = assert_same(view, [rule])
    assert [t.deletes for t in plan.trims] == [3]
    other = replace(view, head_metadata={"assistant_id": "other"})
    assert planned(other, Ruleset([rule])).is_empty


@st.composite
def expiring_rules(draw: st.DrawFn) -> list[Policy]:
    """An expiry policy (often with a trim rule too), sometimes behind a protect rule."""
    policies = []
    if draw(st.booleans()):
        policies.append(Policy(name="vip", match=Match(thread_id=("vip-*",)), protect=True))
    policies.append(
        Policy(
            name="idle",
            expire_after=timedelta(hours=draw(st.integers(1, 24 * 60))),
            keep_last=draw(st.one_of(st.none(), st.integers(1, 6))),
            interrupted=draw(st.sampled_from(["keep", "expire"])),
        )
    )
    return policies


@settings(max_examples=800, deadline=None)
@given(root_threads(), expiring_rules())
def test_plan_expires_what_decide_expires(view: ThreadView, policies: list[Policy]) -> None:
    assert_same(view, policies)


# ------------------------------------------------------------------ orphan registries

REGISTRY = Orphaned(query="SELECT id FROM chats")


@st.composite
def orphan_rules(draw: st.DrawFn) -> list[Policy]:
    """An `orphaned` policy (grace, maybe a trim), sometimes behind a protect rule, often
    with a fallback policy that the threads the registry lists fall through to."""
    policies = []
    if draw(st.booleans()):
        policies.append(Policy(name="vip", match=Match(thread_id=("vip-*",)), protect=True))
    policies.append(
        Policy(
            name="orphans",
            match=Match(metadata={"assistant_id": "bot"}) if draw(st.booleans()) else Match(),
            orphaned=REGISTRY,
            expire_after=timedelta(hours=draw(st.integers(1, 24 * 60))),
            keep_last=draw(st.one_of(st.none(), st.integers(1, 6))),
            interrupted=draw(st.sampled_from(["keep", "expire"])),
        )
    )
    if draw(st.booleans()):
        policies.append(
            Policy(
                name="rest",
                keep_last=draw(st.integers(1, 6)),
                expire_after=draw(st.one_of(st.none(), st.integers(1, 90).map(_days))),
            )
        )
    return policies


def _days(n: int) -> timedelta:
    return timedelta(days=n)


def registry_rules(policies: list[Policy], thread_id: str, answer: str) -> Ruleset:
    """The rules as a page's registry answer leaves them: `listed`, `unlisted`, or
    `failed` (no answer: the policy matches nothing)."""
    rules = Ruleset(policies)
    if answer == "failed":
        return rules
    return rules.for_page({"orphans": {thread_id, "other"} if answer == "listed" else {"other"}})


def decides_itself(view: ThreadView) -> bool:
    """A root-only thread of regular ids without markers: the plan needs no rows for it."""
    return all(is_regular_id(c.checkpoint_id) and not c.delta_marked for c in view.checkpoints)


@settings(max_examples=1500, deadline=None)
@given(root_threads(), orphan_rules(), st.sampled_from(["listed", "unlisted", "failed"]))
def test_plan_reconciles_orphans_as_decide(
    view: ThreadView, policies: list[Policy], answer: str
) -> None:
    plan = assert_same(view, registry_rules(policies, view.thread_id, answer))
    # The registry's answer is all an orphan policy needs beyond the aggregates.
    assert not plan.rows or not decides_itself(view)


def test_orphan_expiry_is_planned_from_aggregates() -> None:
    """An idle thread the registry does not list: expired as orphaned, from the aggregates
    and its orphan-writes check alone; listed, it falls through; unanswered, it is skipped."""
    view = root_view("chat-1", random.Random(5), 10, 20, waiting=False)
    policies = [
        Policy(name="orphans", orphaned=REGISTRY, expire_after=timedelta(days=1)),
        Policy(name="rest", keep_last=5),
    ]
    unlisted = assert_same(view, registry_rules(policies, "chat-1", "unlisted"))
    assert unlisted.expiry is not None and unlisted.expiry.reason is Reason.ORPHANED
    assert unlisted.expiry.policy == "orphans"
    listed = assert_same(view, registry_rules(policies, "chat-1", "listed"))
    assert listed.expiry is None and [(t.policy, t.deletes) for t in listed.trims] == [("rest", 15)]
    failed = assert_same(view, registry_rules(policies, "chat-1", "failed"))
    assert failed.expiry is None and [t.policy for t in failed.trims] == ["rest"]
    assert [(s.policy, s.reason) for s in failed.skips] == [
        ("orphans", SkipReason.REGISTRY_UNAVAILABLE)
    ]
