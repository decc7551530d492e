"""The decision: what one thread loses under an ordered set of policies.

One pure function, `decide`, shared by every store engine and the saver
wrapper, so the rules live in one place. It honours the numbered invariants
of docs/architecture.md ("What always stays"):

1. writes go only with the checkpoint they belong to (engines delete writes by
   the ids decided here), so a kept checkpoint keeps its writes; blobs are the
   engine's business (referenced by kept `channel_versions`);
2. a kept v < 4 checkpoint keeps the parent whose `__pregel_tasks` writes hold
   its pending sends;
3. a kept checkpoint of a `DeltaChannel` thread keeps every ancestor back to
   the nearest snapshot of each delta channel it has to replay;
4. a subgraph call's namespace goes with the root checkpoint it started from;
   a kept root checkpoint keeps, in each persistent (`checkpointer=True`)
   subgraph namespace, the checkpoint replaying it loads (`replay_bound`);
5. nothing is decided from "no checkpoint has this id" except writes on a
   thread quiet for the grace period;
6. (parents of kept checkpoints are nulled by the engines).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from policies.config import Policy, ThreadTTL
from policies.ids import checkpoint_time
from policies.matching import Ruleset
from policies.model import (
    CheckpointSummary,
    Deletion,
    Expiry,
    Reason,
    Skip,
    SkipReason,
    ThreadDecision,
    ThreadView,
    TtlFallback,
    TtlFallbackReason,
    WritesDeletion,
)


def root_head(checkpoints: Iterable[CheckpointSummary]) -> CheckpointSummary | None:
    """The thread's newest root checkpoint: where policies read metadata and waiting.

    The root graph lives in namespace "". Stores written by older LangGraph or
    custom code may keep a root graph elsewhere; `metadata.parents == {}`
    tells such a namespace from a subgraph's.
    """
    cps = list(checkpoints)
    for candidates in (
        [c for c in cps if c.namespace == ""],
        [c for c in cps if not c.parents],
        cps,
    ):
        if candidates:
            return max(candidates, key=lambda c: c.checkpoint_id)
    return None


def is_subgraph_call(namespace: str, parents: Mapping[str, str]) -> bool:
    """A subgraph call's namespace (`node:<task id>`), as opposed to a persistent one.

    A `checkpointer=True` subgraph keeps its namespace across calls and has no
    task id in its last segment; an old root namespace has no parents.
    """
    return bool(parents) and ":" in namespace.rsplit("|", 1)[-1]


def is_persistent_subgraph(namespace: str, parents: Mapping[str, str]) -> bool:
    """A `checkpointer=True` subgraph's namespace: it has parents and no task id."""
    return bool(parents) and not is_subgraph_call(namespace, parents)


FORK_SOURCES = frozenset({"update", "fork"})
"""`metadata.source` of checkpoints `update_state` writes (and of a replay's own fork)."""


def replay_bound(c: CheckpointSummary) -> str:
    """The id below which replaying root checkpoint `c` reads each persistent subgraph.

    As LangGraph's loop hands it to `ReplayState`: a checkpoint `update_state`
    wrote ("update"/"fork") replays its subgraphs from before its parent (the
    fork came after the subgraph checkpoints of the run it branches from);
    any other from before itself (the replay forks from it). Each persistent
    namespace then loads its newest checkpoint with an id below that bound.
    """
    if c.source in FORK_SOURCES and c.parent_id is not None:
        return c.parent_id
    return c.checkpoint_id


def last_activity(view: ThreadView) -> float | None:
    """Unix time of the thread's newest activity anywhere; None when nothing dates it.

    A long subgraph call or a crashed run's writes keep the thread alive as
    much as a root checkpoint does, so every namespace and orphan write counts.
    """
    times = [c.created_at for c in view.checkpoints if c.created_at is not None]
    times += [t for _, cid in view.orphan_writes if (t := checkpoint_time(cid)) is not None]
    return max(times) if times else None


def expiry_seconds(
    policy: Policy, head_metadata: Mapping[str, Any]
) -> tuple[float | None, TtlFallbackReason | None]:
    """How long a thread may stay idle under `policy` (None: it never expires), and
    why its own TTL was not used when `expire_after` reads one from metadata.

    The one place a policy's `expire_after` becomes a number for a thread: a
    per-thread TTL is read from the head's metadata, and a missing, invalid,
    zero or negative one gives the policy's default.
    """
    rule = policy.expire_after
    if rule is None or policy.protect:
        return None, None
    if not isinstance(rule, ThreadTTL):
        return rule.total_seconds(), None
    own = rule.seconds_for(head_metadata)
    if isinstance(own, TtlFallbackReason):
        return rule.default.total_seconds(), own
    return own, None


def _idle_trim(policy: Policy, idle: float | None) -> bool:
    """Whether `policy`'s `when_idle` trimming applies to a thread idle `idle` seconds."""
    rule = policy.when_idle
    return rule is not None and idle is not None and idle > rule.after.total_seconds()


def _deletes(policy: Policy | None) -> bool:
    return policy is not None and not policy.protect


def _trims(policy: Policy | None) -> bool:
    return _deletes(policy) and (
        policy is not None
        and (
            policy.keep_last is not None
            or policy.keep_within is not None
            or policy.when_idle is not None
        )
    )


def _base_keep(
    cps: Sequence[CheckpointSummary], policy: Policy, now: float, idle: float | None
) -> set[str]:
    """Ids kept by `keep_last` / `keep_within` (or, idle, `when_idle`) alone; `cps` newest first."""
    if policy.when_idle is not None and _idle_trim(policy, idle):
        keep = {c.checkpoint_id for c in cps[: policy.when_idle.keep_last]}
        # Undated checkpoints are never old, idle thread or not.
        keep.update(c.checkpoint_id for c in cps if c.created_at is None)
        return keep
    if policy.keep_last is None and policy.keep_within is None:
        return {c.checkpoint_id for c in cps}  # `when_idle` alone: a busy thread keeps all
    keep_n = policy.keep_last if policy.keep_last is not None else 1
    keep = {c.checkpoint_id for c in cps[: max(keep_n, 1)]}
    horizon = now if policy.keep_within is None else now - policy.keep_within.total_seconds()
    # Unknown ages and future dates (a clock behind the application's) are never old.
    keep.update(c.checkpoint_id for c in cps if c.created_at is None or c.created_at > horizon)
    return keep


class UndecodableHistory(Exception):
    """A `DeltaChannel` history cannot be read, so what a replay needs is unknown.

    Raised by `close_keep`; whoever decides keeps the namespace whole.
    """


def delta_channels_of(checkpoints: Iterable[CheckpointSummary]) -> frozenset[str] | None:
    """The thread's `DeltaChannel`s, for `close_keep`; None for a thread without any.

    Empty (not None) when the thread is marked as using one but names none.
    """
    cps = list(checkpoints)
    if not is_delta_thread(cps):
        return None
    return frozenset().union(*(c.delta_channels for c in cps))


def close_keep(
    by_id: Mapping[str, CheckpointSummary],
    keep: set[str],
    delta_channels: frozenset[str] | None,
) -> set[str]:
    """`keep` plus what kept checkpoints need: v < 4 sends parents, delta ancestors to their seeds.

    The one statement of invariants 2 and 3, for the decision and for the
    saver wrapper's explicit deletions. `by_id` is one namespace's
    checkpoints by id; `delta_channels` as `delta_channels_of` gives it.
    Repeats until nothing is added, since an ancestor kept for one checkpoint
    has needs of its own.

    Raises:
        UndecodableHistory: a delta history cannot be read, or the thread is
            marked as using a `DeltaChannel` but names none (LangGraph.js marks
            threads with `delta_writes_versioned` only): which ancestors a
            replay reads is unknown.
    """
    if delta_channels is not None and not delta_channels:
        raise UndecodableHistory
    keep = set(keep)
    work = list(keep)
    while work:
        c = by_id[work.pop()]
        needed: list[str] = []
        parent = by_id.get(c.parent_id) if c.parent_id is not None else None
        if c.reads_parent_sends and parent is not None and parent.has_sends_writes:
            needed.append(parent.checkpoint_id)
        if delta_channels:
            needed.extend(_delta_ancestors(by_id, c, delta_channels))
        for cid in needed:
            if cid not in keep:
                keep.add(cid)
                work.append(cid)
    return keep


def _delta_ancestors(
    by_id: Mapping[str, CheckpointSummary], c: CheckpointSummary, delta_channels: frozenset[str]
) -> list[str]:
    """The ancestors LangGraph's delta walk reads to rebuild `c`, nearest first.

    As `get_delta_channel_history` does: a channel with a version but no
    inline value at `c` is rebuilt from the writes of each ancestor back to
    the nearest one holding a value for it (a `_DeltaSnapshot`, or a plain
    value from before the channel became a DeltaChannel), which is kept too.
    """
    if c.inline_channels is None or c.versioned_channels is None:
        raise UndecodableHistory
    pending = {
        ch for ch in delta_channels if ch in c.versioned_channels and ch not in c.inline_channels
    }
    out: list[str] = []
    seen = {c.checkpoint_id}
    parent = c.parent_id
    # `put` is INSERT OR REPLACE, so a chain can loop: stop on a repeated id.
    while pending and parent is not None and parent in by_id and parent not in seen:
        anc = by_id[parent]
        if anc.inline_channels is None:
            raise UndecodableHistory
        seen.add(parent)
        out.append(parent)
        pending -= anc.inline_channels
        parent = anc.parent_id
    return out


def decide(view: ThreadView, rules: Ruleset, now: float, grace_seconds: float) -> ThreadDecision:
    """What `view`'s thread loses under `rules` at time `now` (Unix seconds).

    First match wins per (thread, namespace); `expire_after` is decided on the
    root namespace and takes the whole thread. A thread no policy matches keeps
    everything. Applying the result and deciding again deletes nothing more.
    """
    tid = view.thread_id
    meta = view.head_metadata
    by_ns = _by_namespace(view.checkpoints)
    policy_of = {ns: rules.first_match(tid, ns, meta) for ns in by_ns}
    root_policy = rules.first_match(tid, "", meta)

    active = last_activity(view)
    idle = now - active if active is not None else None
    ttl, fallback = (None, None) if root_policy is None else expiry_seconds(root_policy, meta)
    ttl_fallback = None
    if root_policy is not None and fallback is not None:
        ttl_fallback = TtlFallback(root_policy.name, fallback)

    skips: list[Skip] = []
    if rules.has_orphan_policies and (unanswered := rules.unreconciled(tid, meta)) is not None:
        skips.append(Skip(unanswered.name, SkipReason.REGISTRY_UNAVAILABLE))
    if root_policy is not None and ttl is not None and idle is not None and idle > ttl:
        verdict = _expiry_verdict(view, root_policy, policy_of, idle)
        if isinstance(verdict, Skip):
            skips.append(verdict)
        elif verdict == "needs_waiting":
            return ThreadDecision(tid, needs_waiting=True, ttl_fallback=ttl_fallback)
        else:
            return ThreadDecision(
                tid, expiry=verdict, skips=tuple(skips), ttl_fallback=ttl_fallback
            )

    trimmer = _Trimmer(by_ns, policy_of, now, idle, delta_channels_of(view.checkpoints))
    calls = sorted(ns for ns, cps in by_ns.items() if is_subgraph_call(ns, cps[0].parents))
    kept = _replay_keeps(trimmer, by_ns)
    for ns in sorted(by_ns):
        if ns not in kept and ns not in calls:
            kept[ns] = trimmer.keep(ns)
    deletions = [d for ns in sorted(kept) for d in trimmer.deletions(ns, kept[ns])]
    quiet = idle is not None and idle > grace_seconds
    deletions += _call_deletions(trimmer, calls, root_policy, deletions, quiet)
    skips.extend(
        Skip(p.name, SkipReason.UNDECODABLE)
        for ns in [*sorted(kept), *calls]
        if ns in trimmer.undecodable and (p := policy_of[ns]) is not None
    )
    writes = _orphan_writes(view, rules, policy_of, now, grace_seconds) if quiet else []
    return ThreadDecision(
        tid,
        deletions=tuple(deletions),
        writes=tuple(writes),
        skips=tuple(skips),
        ttl_fallback=ttl_fallback,
    )


def _by_namespace(checkpoints: Iterable[CheckpointSummary]) -> dict[str, list[CheckpointSummary]]:
    """The thread's checkpoints per namespace, newest first."""
    by_ns: dict[str, list[CheckpointSummary]] = defaultdict(list)
    for c in checkpoints:
        by_ns[c.namespace].append(c)
    for cps in by_ns.values():
        cps.sort(key=lambda c: c.checkpoint_id, reverse=True)
    return by_ns


# `_expiry_verdict` and `_orphan_writes` look alike only in their signatures (a
# thread's view and its policies); their logic differs.
def _expiry_verdict(
    view: ThreadView,
    root_policy: Policy,
    policy_of: Mapping[str, Policy | None],
    idle: float,
) -> Expiry | Skip | Literal["needs_waiting"]:
    """An expired thread's fate: it goes whole, a skip says why not, or decode its head first."""
    if any(p is not None and p.protect for p in policy_of.values()):
        return Skip(root_policy.name, SkipReason.PROTECTED_NAMESPACE)
    if root_policy.interrupted == "keep" and view.head_undecodable:
        # Never counted as interrupted: it may as well be a finished run.
        return Skip(root_policy.name, SkipReason.UNDECODABLE)
    if root_policy.interrupted == "keep" and view.waiting is None:
        return "needs_waiting"
    if root_policy.interrupted == "keep" and view.waiting:
        return Skip(root_policy.name, SkipReason.INTERRUPTED)
    reason = Reason.ORPHANED if root_policy.orphaned is not None else Reason.EXPIRED
    return Expiry(root_policy.name, idle, reason)


def _call_deletions(
    trimmer: _Trimmer,
    calls: Sequence[str],
    root_policy: Policy | None,
    decided: Sequence[Deletion],
    quiet: bool,
) -> list[Deletion]:
    """Deletions in subgraph call namespaces: whole with their root checkpoint, else trimmed."""
    deleted_roots = {d.checkpoint_id for d in decided if d.namespace == ""}
    root_ids = {c.checkpoint_id for c in trimmer.by_ns.get("", ())}
    deletions: list[Deletion] = []
    for ns in calls:
        cps = trimmer.by_ns[ns]
        policy = trimmer.policy_of[ns]
        if policy is not None and policy.protect:
            continue
        root_id = cps[0].parents.get("")
        whole: tuple[str, Reason] | None = None
        if root_id is not None and root_id in deleted_roots and root_policy is not None:
            whole = (root_policy.name, Reason.SUBGRAPH_CALL)
        elif root_id is not None and root_id not in root_ids and quiet:
            # Runs save in the background, so a call may commit before its
            # root checkpoint: only a quiet thread's call is truly orphaned.
            owner = policy if _deletes(policy) else root_policy if _deletes(root_policy) else None
            if owner is not None:
                whole = (owner.name, Reason.ORPHAN_CALL)
        if whole is not None:
            deletions.extend(Deletion(ns, c.checkpoint_id, whole[0], whole[1]) for c in cps)
        else:
            deletions.extend(trimmer.deletions(ns, trimmer.keep(ns)))
    return deletions


# Alike in signature to `_expiry_verdict` only (see there).
def _orphan_writes(
    view: ThreadView,
    rules: Ruleset,
    policy_of: Mapping[str, Policy | None],
    now: float,
    grace_seconds: float,
) -> list[WritesDeletion]:
    """A quiet thread's writes whose checkpoint is gone, once older than the grace period."""
    writes: list[WritesDeletion] = []
    for ns, cid in view.orphan_writes:
        t = checkpoint_time(cid)
        if t is not None and now - t <= grace_seconds:
            continue
        policy = policy_of.get(ns) or rules.first_match(view.thread_id, ns, view.head_metadata)
        if policy is not None and not policy.protect:
            writes.append(WritesDeletion(ns, cid, policy.name))
    return writes


class _Trimmer:
    """History trimming of one thread's namespaces, each under its own policy."""

    # Field by field, like the other planners' constructors: each class's
    # own settings, so their alike shape is not logic to share.
    def __init__(
        self,
        by_ns: Mapping[str, Sequence[CheckpointSummary]],
        policy_of: Mapping[str, Policy | None],
        now: float,
        idle: float | None,
        delta_channels: frozenset[str] | None,
    ) -> None:
        self.by_ns = by_ns
        self.policy_of = policy_of
        self.now = now
        self.idle = idle
        self.delta_channels = delta_channels
        self.undecodable: set[str] = set()
        """Namespaces whose trimming was held back: a delta history could not be read."""
        self._by_id: dict[str, dict[str, CheckpointSummary]] = {}

    def by_id(self, ns: str) -> dict[str, CheckpointSummary]:
        """Namespace `ns`'s checkpoints by id."""
        if ns not in self._by_id:
            self._by_id[ns] = {c.checkpoint_id: c for c in self.by_ns[ns]}
        return self._by_id[ns]

    def keep(self, ns: str, required: Iterable[str] = ()) -> set[str] | None:
        """Ids `ns` keeps: its policy's, `required`, and what they need; None: all of them."""
        policy = self.policy_of[ns]
        if policy is None or not _trims(policy) or ns in self.undecodable:
            return None
        cps = self.by_ns[ns]
        keep = _base_keep(cps, policy, self.now, self.idle)
        keep.update(required)
        if len(keep) == len(cps):
            return None
        try:
            return close_keep(self.by_id(ns), keep, self.delta_channels)
        except UndecodableHistory:
            self.undecodable.add(ns)
            return None

    def deletions(self, ns: str, keep: set[str] | None) -> list[Deletion]:
        """The trimming of `ns` that keeps `keep` (None: nothing goes)."""
        policy = self.policy_of[ns]
        if keep is None or policy is None:
            return []
        return [
            Deletion(ns, c.checkpoint_id, policy.name, Reason.TRIMMED)
            for c in self.by_ns[ns]
            if c.checkpoint_id not in keep
        ]


def _replay_keeps(
    trimmer: _Trimmer, by_ns: Mapping[str, Sequence[CheckpointSummary]]
) -> dict[str, set[str] | None]:
    """What the root namespace and the persistent subgraph namespaces keep, decided together.

    A kept root checkpoint keeps what replaying it reads: in each persistent
    namespace the newest checkpoint below its `replay_bound`, with what that
    one needs (its delta ancestors; its writes stay with it).
    A kept "update"/"fork" checkpoint whose parent would go also keeps that
    parent when a kept checkpoint of a persistent namespace lies between the
    two: deleting the parent nulls the fork's `parent_checkpoint_id`, which
    moves its replay bound from the parent to the fork itself, and the
    subgraph would then read that newer checkpoint. With none in between the
    newest kept checkpoint below either bound is the same one, so the parent
    may go. Keeping a parent only ever adds, so the loop ends.
    """
    persistent = sorted(
        ns for ns, cps in by_ns.items() if ns != "" and is_persistent_subgraph(ns, cps[0].parents)
    )
    if not persistent or "" not in by_ns:
        return {ns: trimmer.keep(ns) for ns in ("", *persistent) if ns in by_ns}
    roots = trimmer.by_id("")
    sub_ids = {ns: sorted(c.checkpoint_id for c in by_ns[ns]) for ns in persistent}
    root_keep = trimmer.keep("")
    while True:
        bounds = {replay_bound(roots[r]) for r in (roots if root_keep is None else root_keep)}
        subs = {ns: trimmer.keep(ns, _newest_below(sub_ids[ns], bounds)) for ns in persistent}
        if root_keep is None:
            break
        kept_subs = [sub_ids[ns] if keep is None else sorted(keep) for ns, keep in subs.items()]
        moved = {
            p
            for r in root_keep
            if roots[r].source in FORK_SOURCES
            and (p := roots[r].parent_id) is not None
            and p in roots
            and p not in root_keep
            and any(_any_between(ids, p, r) for ids in kept_subs)
        }
        if not moved:
            break
        root_keep = trimmer.keep("", root_keep | moved)
    return {"": root_keep, **subs}


def _newest_below(ids: Sequence[str], bounds: Iterable[str]) -> set[str]:
    """For each bound, the greatest of the sorted `ids` below it (as `list(before=...)`)."""
    out = set()
    for b in bounds:
        i = bisect_left(ids, b)
        if i:
            out.add(ids[i - 1])
    return out


def _any_between(ids: Sequence[str], low: str, high: str) -> bool:
    """Whether the sorted `ids` hold one in [low, high)."""
    i = bisect_left(ids, low)
    return i < len(ids) and ids[i] < high


def is_delta_thread(checkpoints: Iterable[CheckpointSummary]) -> bool:
    """Whether engines must decode the thread's checkpoints before trimming it."""
    return any(c.delta_marked for c in checkpoints)


def quota_verdict(
    view: ThreadView, rules: Ruleset, held: bool = False
) -> tuple[Policy | None, bool]:
    """Whether a size cap may expire this thread: (the policy it goes under, or None when it
    may not; whether that still depends on `view.waiting`, not yet read).

    Size caps take what retention allows and nothing more: never a thread no
    policy governs, one a policy protects (in any namespace), a held one
    (`held`: the holds feature's flag), one undated (never old), or one that
    waits for input unless its policy says `interrupted: expire`.
    """
    tid = view.thread_id
    meta = view.head_metadata
    root = rules.first_match(tid, "", meta)
    if held or root is None or root.protect or last_activity(view) is None:
        return None, False
    namespaces = {c.namespace for c in view.checkpoints}
    if any((p := rules.first_match(tid, ns, meta)) is not None and p.protect for ns in namespaces):
        return None, False
    if root.interrupted == "keep":
        if view.head_undecodable or view.waiting:
            return None, False
        if view.waiting is None:
            return root, True
    return root, False


def quota_group(policy: Policy, metadata: Mapping[str, Any]) -> str | None:
    """The group of `policy`'s quota a thread with this head metadata counts in; None: none.

    A group is named by the value as text (`u-1`; a number or boolean as JSON:
    `7`, `true`); `""` is the one group of a quota without `per`.
    """
    quota = policy.quota
    if quota is None:
        return None
    if quota.per is None:
        return ""
    value = metadata.get(quota.per)
    if value is None or isinstance(value, dict | list):
        return None
    return value if isinstance(value, str) else json.dumps(value)
