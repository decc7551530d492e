"""Property tests of the pure decision (`policies.decide`) over random thread shapes.

Threads are generated as LangGraph lays them out: a root chain in namespace
"", subgraph calls `node:<task>` hanging off root checkpoints, a persistent
`checkpointer=True` namespace, DeltaChannel snapshots, v < 4 sends parents.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import replace
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.config import Match, Policy
from policies.decide import decide, is_subgraph_call, root_head
from policies.ids import checkpoint_time
from policies.matching import Ruleset
from policies.model import CheckpointSummary, Reason, SkipReason, ThreadView

NOW = 1_800_000_000.0
DAY = 86400.0
_GREG = 0x01B21DD213814000


def make_id(t: float, rnd: random.Random) -> str:
    """A UUIDv6 dated `t`, laid out as `langgraph.checkpoint.base.id.uuid6` does."""
    ticks = int(t * 10_000_000) + _GREG
    value = ((ticks >> 12) << 80) | (0x6 << 76) | ((ticks & 0xFFF) << 64)
    value |= (0b10 << 62) | rnd.getrandbits(62)
    return str(uuid.UUID(int=value))


def test_make_id_round_trips() -> None:
    rnd = random.Random(1)
    t = NOW - 12345.678
    assert abs(checkpoint_time(make_id(t, rnd)) - t) < 1e-6  # type: ignore[operator]


THREAD_IDS = [
    "user-1", "vip-1", "org-1:user-2:s-3", "", "VIP-1", "Vip-1", "vip-", "vip_1", "vip-\U0010ffff",
    "[vip]-*?%", "vip-\ud7ff", "\ue000", "\uffff\U00010000", "é-e\u0301", "x" * 300,
]  # fmt: skip
"""Case variants of the protect glob `vip-*`, glob metacharacters, the empty id, surrogate
edges, a long id: ids are matched as given, never folded or pattern-read."""


@st.composite
def threads(draw: st.DrawFn) -> ThreadView:
    """A random thread: root chain, calls, a persistent subgraph, delta and sends markers."""
    rnd = random.Random(draw(st.integers(0, 2**32)))
    n_root = draw(st.integers(1, 12))
    start = NOW - draw(st.floats(0, 90 * DAY))
    step = draw(st.floats(1, 2 * DAY))
    delta = draw(st.booleans())
    old_format = draw(st.booleans())
    future = draw(st.booleans())
    forks = draw(st.booleans())
    cps: list[CheckpointSummary] = []
    t = start
    parent: str | None = None
    root_ids: list[str] = []
    for _ in range(n_root):
        cid = make_id(t, rnd)
        inline = frozenset({"items"}) if delta and rnd.random() < 0.3 else frozenset()
        source = "loop"
        if forks and root_ids and rnd.random() < 0.3:
            # `update_state` on the head, or a fork from an older checkpoint
            # (a "fork" is what replaying a checkpoint starts with).
            source = rnd.choice(["update", "fork"])
            parent = rnd.choice([root_ids[-1], rnd.choice(root_ids)])
        cps.append(
            CheckpointSummary(
                namespace="",
                checkpoint_id=cid,
                parent_id=parent,
                created_at=checkpoint_time(cid),
                source=source,
                # Counters name the channel except at its snapshot steps.
                delta_channels=frozenset({"items"})
                if delta and "items" not in inline
                else frozenset(),
                delta_marked=delta,
                reads_parent_sends=old_format,
                has_sends_writes=rnd.random() < 0.3,
                inline_channels=(inline | {"messages"}) if delta else None,
                versioned_channels=frozenset({"items", "messages"}) if delta else None,
            )
        )
        root_ids.append(cid)
        parent = cid
        t += step
    # Subgraph calls started from random root checkpoints.
    for k in range(draw(st.integers(0, 3))):
        root = rnd.choice(root_ids)
        ns = f"inner:{uuid.UUID(int=rnd.getrandbits(128))}"
        p = None
        ct = checkpoint_time(root) or start
        for _ in range(rnd.randint(1, 3)):
            ct += 1
            cid = make_id(ct, rnd)
            cps.append(
                CheckpointSummary(
                    ns,
                    cid,
                    p,
                    checkpoint_time(cid),
                    parents={"": root},
                    inline_channels=frozenset({"messages"}) if delta else None,
                    versioned_channels=frozenset({"messages"}) if delta else None,
                )
            )
            p = cid
        if k == 0 and draw(st.booleans()):
            # A call whose root checkpoint is gone (crash, ad-hoc DELETE).
            cps[-1] = replace(cps[-1], parents={"": make_id(start - 5, rnd)})
    if draw(st.booleans()):
        # A persistent namespace saves whenever a root step runs it: its ids
        # interleave with the root's.
        p = None
        span = n_root * step
        for ct in sorted(start + rnd.uniform(0, span) + 0.5 for _ in range(rnd.randint(1, 8))):
            cid = make_id(ct, rnd)
            inline = frozenset({"items"}) if delta and rnd.random() < 0.3 else frozenset()
            cps.append(
                CheckpointSummary(
                    "memory",
                    cid,
                    p,
                    checkpoint_time(cid),
                    parents={"": rnd.choice(root_ids)},
                    delta_channels=frozenset({"items"})
                    if delta and "items" not in inline
                    else frozenset(),
                    inline_channels=(inline | {"messages"}) if delta else None,
                    versioned_channels=frozenset({"items", "messages"}) if delta else None,
                )
            )
            p = cid
    if future:
        cid = make_id(NOW + 3 * DAY, rnd)
        cps.append(
            CheckpointSummary(
                "",
                cid,
                parent,
                checkpoint_time(cid),
                inline_channels=frozenset({"items"}) if delta else None,
                versioned_channels=frozenset({"items"}) if delta else None,
            )
        )
    # Give every summary of a delta thread the markers a real one carries.
    if delta:
        cps = [replace(c, delta_marked=True) for c in cps]
    # Make call namespaces consistent: every checkpoint shares the call's parents.
    by_ns: dict[str, dict[str, str]] = {}
    for c in cps:
        if c.namespace.startswith("inner:"):
            by_ns.setdefault(c.namespace, dict(c.parents))
    cps = [replace(c, parents=by_ns[c.namespace]) if c.namespace in by_ns else c for c in cps]
    return ThreadView(
        thread_id=draw(st.one_of(st.sampled_from(THREAD_IDS), st.text(max_size=300))),
        checkpoints=tuple(cps),
        head_metadata={"assistant_id": draw(st.sampled_from(["bot", "other"]))},
        waiting=draw(st.booleans()),
    )


durations = st.one_of(st.none(), st.integers(1, 60).map(lambda d: timedelta(days=d)))


@st.composite
def rulesets(draw: st.DrawFn) -> list[Policy]:
    """A random ordered policy list, often with a protect rule and a namespace rule first."""
    policies: list[Policy] = []
    if draw(st.booleans()):
        policies.append(Policy(name="vip", match=Match(thread_id=("vip-*",)), protect=True))
    if draw(st.booleans()):
        policies.append(
            Policy(
                name="calls",
                match=Match(checkpoint_ns="inner:*"),
                keep_last=draw(st.integers(1, 3)),
            )
        )
    keep_last = draw(st.one_of(st.none(), st.integers(1, 6)))
    keep_within = draw(durations)
    expire_after = draw(durations)
    if keep_last is None and keep_within is None and expire_after is None:
        keep_last = 1
    policies.append(
        Policy(
            name="main",
            match=Match(metadata={"assistant_id": "bot"}) if draw(st.booleans()) else Match(),
            keep_last=keep_last,
            keep_within=keep_within,
            expire_after=expire_after,
            interrupted=draw(st.sampled_from(["keep", "expire"])) if expire_after else "keep",
        )
    )
    return policies


GRACE = 3600.0


def apply(view: ThreadView, decision_ids: set[tuple[str, str]]) -> ThreadView:
    """The thread after an engine carried out the deletions (parents of kept nulled)."""
    gone = {cid for _, cid in decision_ids}
    kept = []
    for c in view.checkpoints:
        if (c.namespace, c.checkpoint_id) in decision_ids:
            continue
        kept.append(replace(c, parent_id=None) if c.parent_id in gone else c)
    return replace(view, checkpoints=tuple(kept))


def replay_reads(view: ThreadView) -> dict[str, dict[str, str | None]]:
    """Root id -> persistent namespace -> the checkpoint LangGraph's replay of that root loads.

    An independent re-implementation of `ReplayState`: the newest checkpoint of
    the namespace with an id below the bound, which is the root checkpoint's
    parent for an "update"/"fork" checkpoint that has one, else its own id.
    """
    subs: dict[str, list[str]] = {}
    for c in view.checkpoints:
        if c.namespace and c.parents and ":" not in c.namespace.rsplit("|", 1)[-1]:
            subs.setdefault(c.namespace, []).append(c.checkpoint_id)
    out = {}
    for r in view.checkpoints:
        if r.namespace != "":
            continue
        fork = r.source in ("update", "fork") and r.parent_id is not None
        bound = r.parent_id if fork and r.parent_id is not None else r.checkpoint_id
        out[r.checkpoint_id] = {
            ns: max((i for i in ids if i < bound), default=None) for ns, ids in subs.items()
        }
    return out


def walk_needs(by_id: dict[str, CheckpointSummary], c: CheckpointSummary) -> set[str]:
    """What LangGraph's delta walk reads to rebuild `c` (an independent re-implementation)."""
    need = {"items"} & (c.versioned_channels or set()) - (c.inline_channels or set())
    out: set[str] = set()
    p = c.parent_id
    while need and p in by_id and p not in out:
        out.add(p)
        need -= by_id[p].inline_channels or set()
        p = by_id[p].parent_id
    return out


@settings(max_examples=400, deadline=None)
@given(threads(), rulesets())
def test_decision_invariants(view: ThreadView, policies: list[Policy]) -> None:
    rules = Ruleset(policies)
    d = decide(view, rules, NOW, GRACE)
    assert not d.needs_waiting  # waiting is known in these views
    by_key = {(c.namespace, c.checkpoint_id): c for c in view.checkpoints}
    first = rules.first_match(view.thread_id, "", view.head_metadata)

    if d.expiry is not None:
        assert first is not None and first.expire_after is not None
        newest = max(c.created_at for c in view.checkpoints if c.created_at is not None)
        assert NOW - newest > first.expire_after.total_seconds()
        assert not (first.interrupted == "keep" and view.waiting)
        assert not d.deletions
        return

    deleted = {(x.namespace, x.checkpoint_id) for x in d.deletions}
    assert deleted <= set(by_key)
    # Nothing a protect policy governs.
    for ns, cid in deleted:
        p = rules.first_match(view.thread_id, ns, view.head_metadata)
        assert not (p is not None and p.protect), f"deleted protected {ns} {cid}"
    for x in d.deletions:
        c = by_key[(x.namespace, x.checkpoint_id)]
        policy = next(p for p in policies if p.name == x.policy)
        if x.reason is Reason.TRIMMED:
            # Never younger than keep_within, never in the future.
            assert c.created_at is not None and c.created_at <= NOW
            if policy.keep_within is not None:
                assert NOW - c.created_at >= policy.keep_within.total_seconds()
    # The newest checkpoint of a namespace survives trimming.
    namespaces = {c.namespace for c in view.checkpoints}
    for ns in namespaces:
        in_ns = [c for c in view.checkpoints if c.namespace == ns]
        newest = max(in_ns, key=lambda c: c.checkpoint_id)
        if (ns, newest.checkpoint_id) in deleted:
            reasons = {x.reason for x in d.deletions if x.namespace == ns}
            assert reasons <= {Reason.SUBGRAPH_CALL, Reason.ORPHAN_CALL}
            assert is_subgraph_call(ns, newest.parents)
            # ... and then the call goes whole.
            assert all((ns, c.checkpoint_id) in deleted for c in in_ns)
    # A call goes with its root checkpoint (unless protected).
    for ns in namespaces:
        in_ns = [c for c in view.checkpoints if c.namespace == ns]
        root = in_ns[0].parents.get("")
        p = rules.first_match(view.thread_id, ns, view.head_metadata)
        if (
            is_subgraph_call(ns, in_ns[0].parents)
            and ("", root) in deleted
            and not (p is not None and p.protect)
        ):
            assert all((ns, c.checkpoint_id) in deleted for c in in_ns)
    # Kept checkpoints keep what they need: sends parents and delta ancestors.
    kept = [c for k, c in by_key.items() if k not in deleted]
    skipped_undecodable = any(s.reason is SkipReason.UNDECODABLE for s in d.skips)
    for c in kept:
        same_ns = {x.checkpoint_id: x for x in view.checkpoints if x.namespace == c.namespace}
        if (
            c.reads_parent_sends
            and c.parent_id in same_ns
            and same_ns[c.parent_id].has_sends_writes
        ):
            assert (c.namespace, c.parent_id) not in deleted
        if any(x.delta_marked for x in view.checkpoints) and not skipped_undecodable:
            for anc in walk_needs(same_ns, c):
                assert (c.namespace, anc) not in deleted

    # Replaying a kept root checkpoint loads the same persistent-subgraph
    # checkpoints as before (parents of kept checkpoints nulled as engines do).
    after = apply(view, deleted)
    reads_before, reads_after = replay_reads(view), replay_reads(after)
    for root, reads in reads_after.items():
        assert reads == reads_before[root], root

    # Applying the decision and deciding again deletes nothing more.
    again = decide(after, rules, NOW, GRACE)
    assert again.expiry is None
    assert not again.deletions, again.deletions


@settings(max_examples=200, deadline=None)
@given(threads())
def test_unmatched_thread_is_kept_whole(view: ThreadView) -> None:
    rules = Ruleset(
        [
            Policy(
                name="other",
                match=Match(thread_id=("nobody-*",)),
                keep_last=1,
                expire_after=timedelta(days=1),
            )
        ]
    )
    d = decide(view, rules, NOW, GRACE)
    assert d.is_empty and not d.skips


@settings(max_examples=200, deadline=None)
@given(threads())
def test_waiting_unknown_asks_before_expiring(view: ThreadView) -> None:
    rules = Ruleset([Policy(name="ttl", expire_after=timedelta(seconds=1))])
    d = decide(replace(view, waiting=None), rules, NOW, GRACE)
    idle = NOW - max(c.created_at for c in view.checkpoints if c.created_at is not None)
    if idle > 1:
        assert d.needs_waiting and d.is_empty
        waiting = decide(replace(view, waiting=True), rules, NOW, GRACE)
        assert waiting.expiry is None
        assert [s.reason for s in waiting.skips] == [SkipReason.INTERRUPTED]
        assert decide(replace(view, waiting=False), rules, NOW, GRACE).expiry is not None
    else:
        assert not d.needs_waiting and d.expiry is None


@settings(max_examples=200, deadline=None)
@given(threads())
def test_undecodable_head_is_kept_as_undecodable_not_interrupted(view: ThreadView) -> None:
    unknown = replace(view, waiting=None, head_undecodable=True)
    keep = Ruleset([Policy(name="ttl", expire_after=timedelta(seconds=1))])
    d = decide(unknown, keep, NOW, GRACE)
    idle = NOW - max(c.created_at for c in view.checkpoints if c.created_at is not None)
    assert not d.needs_waiting and d.expiry is None
    if idle > 1:
        assert [s.reason for s in d.skips] == [SkipReason.UNDECODABLE]
        expire = Ruleset(
            [Policy(name="ttl", expire_after=timedelta(seconds=1), interrupted="expire")]
        )
        assert decide(unknown, expire, NOW, GRACE).expiry is not None


def test_future_checkpoint_is_never_old() -> None:
    rnd = random.Random(3)
    cid = make_id(NOW + 10 * DAY, rnd)
    old = make_id(NOW - 100 * DAY, rnd)
    view = ThreadView(
        "user-1",
        (
            CheckpointSummary("", old, None, checkpoint_time(old)),
            CheckpointSummary("", cid, old, checkpoint_time(cid)),
        ),
        waiting=False,
    )
    ttl = Ruleset([Policy(name="ttl", expire_after=timedelta(days=1))])
    assert decide(view, ttl, NOW, GRACE).is_empty
    trim = Ruleset([Policy(name="trim", keep_within=timedelta(days=1))])
    assert [x.checkpoint_id for x in decide(view, trim, NOW, GRACE).deletions] == [old]


def test_root_head_prefers_root_namespace() -> None:
    rnd = random.Random(4)
    a, b, c = (make_id(NOW - i, rnd) for i in (30, 20, 10))
    cps = (
        CheckpointSummary("", a, None, None),
        CheckpointSummary("inner:x", c, None, None, parents={"": a}),
        CheckpointSummary("legacy", b, None, None),
    )
    assert root_head(cps) == cps[0]
    assert root_head(cps[1:]) == cps[2]


def test_orphan_writes_go_only_on_quiet_threads() -> None:
    rnd = random.Random(5)
    old = make_id(NOW - 2 * GRACE, rnd)
    fresh = make_id(NOW - 10, rnd)
    rules = Ruleset([Policy(name="trim", keep_last=5)])
    quiet = ThreadView(
        "t",
        (CheckpointSummary("", old, None, checkpoint_time(old)),),
        orphan_writes=(("", make_id(NOW - 3 * GRACE, rnd)),),
    )
    assert [w.namespace for w in decide(quiet, rules, NOW, GRACE).writes] == [""]
    busy = replace(quiet, checkpoints=(CheckpointSummary("", fresh, None, checkpoint_time(fresh)),))
    assert decide(busy, rules, NOW, GRACE).writes == ()


def test_checkpoint_time_reads_real_ids() -> None:
    """The fast v6 path agrees with LangGraph's own ids; other versions fall back."""
    import time as _time

    from langgraph.checkpoint.base.id import uuid6

    for _ in range(100):
        assert abs(checkpoint_time(str(uuid6())) - _time.time()) < 5  # type: ignore[operator]
    assert abs(checkpoint_time(str(uuid.uuid1())) - _time.time()) < 5  # type: ignore[operator]
    assert checkpoint_time(str(uuid.uuid4())) is None
    assert checkpoint_time("not-an-id") is None
    assert checkpoint_time("zzzzzzzz-zzzz-6zzz-8zzz-zzzzzzzzzzzz") is None


def _persistent_thread(rnd: random.Random, fork_from: int | None) -> ThreadView:
    """Three turns of a root graph running a `checkpointer=True` subgraph `memory` in step 0.

    Each turn saves root input, step 0 (memory pending), memory's three
    checkpoints, root step 1. With `fork_from`, an `update_state` on root
    checkpoint number `fork_from` follows (source "update", that parent).
    """
    cps: list[CheckpointSummary] = []
    t = NOW - 30 * DAY
    root_parent: str | None = None
    sub_parent: str | None = None
    for _ in range(3):
        for kind in ("input", "loop", "memory", "memory", "memory", "loop"):
            t += 60
            cid = make_id(t, rnd)
            if kind == "memory":
                root = root_parent or ""
                cps.append(
                    CheckpointSummary(
                        "memory", cid, sub_parent, checkpoint_time(cid), parents={"": root}
                    )
                )
                sub_parent = cid
            else:
                cps.append(
                    CheckpointSummary("", cid, root_parent, checkpoint_time(cid), source=kind)
                )
                root_parent = cid
    if fork_from is not None:
        base = [c for c in cps if c.namespace == ""][fork_from]
        cid = make_id(t + 60, rnd)
        cps.append(
            CheckpointSummary("", cid, base.checkpoint_id, checkpoint_time(cid), source="update")
        )
    return ThreadView("user-1", tuple(cps), waiting=False)


def test_kept_root_checkpoint_keeps_the_subgraph_checkpoint_its_replay_reads() -> None:
    """keep_last 3: the step-0 root checkpoint of the last turn replays memory from the
    turn before, so that turn's last memory checkpoint stays beside memory's own 3."""
    view = _persistent_thread(random.Random(6), fork_from=None)
    d = decide(view, Ruleset([Policy(name="trim", keep_last=3)]), NOW, GRACE)
    gone = {x.checkpoint_id for x in d.deletions}
    memory = sorted(c.checkpoint_id for c in view.checkpoints if c.namespace == "memory")
    assert [m for m in memory if m not in gone] == [memory[5], *memory[-3:]]
    reads = replay_reads(view)
    after = replay_reads(apply(view, {(x.namespace, x.checkpoint_id) for x in d.deletions}))
    assert after == {r: reads[r] for r in after}


def test_fork_keeps_its_parent_when_the_subgraph_saved_in_between() -> None:
    """An `update_state` on an old root checkpoint replays memory from before that parent.

    Deleting the parent would null the fork's parent id and move the bound
    to the fork itself, past memory checkpoints that stay: the parent stays.
    An update of the head has no memory checkpoint in between: its parent
    may go (and its subgraph read is the same either way).
    """
    rules = Ruleset([Policy(name="trim", keep_last=2)])
    old = _persistent_thread(random.Random(7), fork_from=1)
    roots = sorted(c.checkpoint_id for c in old.checkpoints if c.namespace == "")
    gone = {x.checkpoint_id for x in decide(old, rules, NOW, GRACE).deletions}
    assert roots[1] not in gone
    head = _persistent_thread(random.Random(8), fork_from=-1)
    roots = sorted(c.checkpoint_id for c in head.checkpoints if c.namespace == "")
    d = decide(head, Ruleset([Policy(name="trim", keep_last=1)]), NOW, GRACE)
    assert roots[-2] in {x.checkpoint_id for x in d.deletions}
    after = apply(head, {(x.namespace, x.checkpoint_id) for x in d.deletions})
    assert replay_reads(after)[roots[-1]] == replay_reads(head)[roots[-1]]
