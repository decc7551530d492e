"""The plan from aggregates: what one thread loses, decided from per-namespace summaries.

A sweep reads, per (thread, namespace), the checkpoint count and the oldest and
newest ids from the primary-key index, never the rows. For the common thread —
one root namespace, UUIDv6 ids, no DeltaChannel, nothing old-format — that is
enough to decide: since a UUIDv6 id sorts by time, `keep_last` and
`keep_within` become "delete every checkpoint with an id below X" for one id X,
and an expiry needs only the newest id. `plan_thread` says so, or asks for the
few facts it lacks (`Detail`), or hands the thread to the row-level `decide`
(`ThreadPlan.rows`), which stays the reference: for every thread it does not
hand over, `plan_thread` deletes exactly what `decide` would.

Residue — writes a crashed run left without a checkpoint and (Postgres)
blobs no checkpoint references — is looked for on quiet threads. Reading it
costs a join over every quiet thread's rows, so a pass may look only on the
threads it must (`residue`): expiry candidates (orphan writes date a thread)
and those governed by the policies whose periodic residue check is due. On
threads the tool itself deleted from (`ThreadAggregate.dated`) it looks at
the unreferenced blobs alone (`Detail.BLOBS`): its own trims' leftovers, due
one grace period after the trim. With `residue=None` (every check due) the
plan is `decide`'s exactly.

An `orphaned` policy is planned too: whether the application's registry still
lists a thread comes in the `Ruleset` (`Ruleset.for_page`, the page's answers),
which `first_match` and `unreconciled` read here exactly as `decide` reads them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any

from policies.config import Policy, ThreadTTL
from policies.ids import checkpoint_time
from policies.matching import Ruleset
from policies.model import Expiry, Reason, Skip, SkipReason, WritesDeletion

_GREGORIAN_TO_UNIX = 0x01B21DD213814000
_TICKS_LIMIT = 1 << 60
_REGULAR_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-6[0-9a-f]{3}-.{17}\Z", re.DOTALL)


def is_regular_id(checkpoint_id: str) -> bool:
    """A canonical lowercase UUIDv6: its text order is its time order.

    Engines count the ids of a namespace that are not (`NamespaceAggregate.irregular`)
    with the same rule in SQL: length 36, lowercase hex, `6` at offset 14.
    """
    return _REGULAR_ID.match(checkpoint_id) is not None


def id_bound(horizon: float) -> str:
    """The id X with: a regular id is below X exactly when it is dated at or before `horizon`.

    Found as the smallest 60-bit tick count that `checkpoint_time` dates after
    `horizon` (the same float arithmetic, so no rounding can split them),
    written as the id's first 18 characters.
    """
    ticks = math.floor(horizon * 10_000_000) + _GREGORIAN_TO_UNIX

    def dated(t: int) -> float:
        return (t - _GREGORIAN_TO_UNIX) / 10_000_000

    while ticks > 0 and dated(ticks) > horizon:
        ticks -= 1
    while dated(ticks) <= horizon:
        ticks += 1
    if ticks <= 0:
        return ""
    if ticks >= _TICKS_LIMIT:
        return "g"  # above every lowercase hex id
    high, low = ticks >> 12, ticks & 0xFFF
    return f"{high >> 16:08x}-{high & 0xFFFF:04x}-6{low:03x}"


class Detail(StrEnum):
    """A fact `plan_thread` needs before it can decide a thread; the engine reads it."""

    ORPHANS = "orphans"
    """Writes whose checkpoint is not in the store (only asked for quiet or idle threads);
    (Postgres) with them, the thread's unreferenced blobs."""
    BLOBS = "blobs"
    """(Postgres) Only the unreferenced blobs of a quiet thread the tool deleted from
    (`ThreadAggregate.dated`), when no residue look is due on it: collecting them is
    the tool's own unfinished work, orphan writes wait for the next look."""
    WAITING = "waiting"
    """Whether the newest root checkpoint waits for input (expiry candidates only)."""
    MARKERS = "markers"
    """Whether any checkpoint carries a DeltaChannel marker (or, on Postgres, format v < 4)."""
    COUNT = "count"
    """How many checkpoints of a namespace lie below an id (`ThreadPlan.count_below`)."""
    REGULAR = "regular"
    """How many ids are not regular UUIDv6 (`NamespaceAggregate.irregular`): asked only
    when the plan would delete, so a sweep with nothing due reads no id but the
    oldest and newest."""


@dataclass(frozen=True, slots=True)
class NamespaceAggregate:
    """One (thread, namespace) as the primary-key index gives it."""

    namespace: str
    count: int
    oldest_id: str
    newest_id: str
    irregular: int | None = None
    """Ids that are not canonical lowercase UUIDv6 (`is_regular_id`); None: not counted."""


# `ThreadAggregate` and `ThreadPlan` are declared field by field, each its own
# documented record: alike in shape, no logic between them to share.
@dataclass(frozen=True, slots=True)
class ThreadAggregate:
    """A thread's namespaces' aggregates, and the details read for it so far."""

    thread_id: str
    namespaces: tuple[NamespaceAggregate, ...]
    head_metadata: Mapping[str, Any] = field(default_factory=dict)
    """Metadata of the newest root checkpoint (needed only when a policy matches on metadata)."""
    orphan_writes: tuple[tuple[str, str], ...] | None = None
    """(namespace, checkpoint_id) of writes without a checkpoint; None: not read."""
    markers: bool | None = None
    """Some checkpoint is marked as DeltaChannel (or v < 4 on Postgres); None: not read."""
    below: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """(namespace, id) -> checkpoints of the namespace with an id below that id."""
    waiting: bool | None = None
    head_undecodable: bool = False
    garbage_blobs: int | None = None
    """(Postgres) How many blobs of the thread no checkpoint references (read with the
    orphans, or alone: `Detail.BLOBS`); None: not read."""
    dated: bool = False
    """(Postgres) the tool deleted from the thread over the grace period ago and has not
    collected its blobs since: its unreferenced blobs are looked for on every pass."""
    rows: bool = False
    """The engine found something only the row-level path decides (a v < 4 head)."""


@dataclass(frozen=True, slots=True)
class Trim:
    """Delete the checkpoints of `namespace` below `before`, except the `keep` newest."""

    namespace: str
    policy: str
    keep: int
    before: str
    deletes: int
    """How many go (the ids below min(`before`, the `keep`-th newest))."""
    oldest_age: float | None = None


# Declared field by field as `ThreadAggregate` is (see there).
@dataclass(frozen=True, slots=True)
class ThreadPlan:
    """What one thread loses, or what is missing to tell."""

    thread_id: str
    rows: bool = False
    """Decide this thread from its rows (`policies.decide`)."""
    needs: frozenset[Detail] = frozenset()
    count_below: tuple[tuple[str, str], ...] = ()
    """With `Detail.COUNT`: the (namespace, id) pairs to count below."""
    expiry: Expiry | None = None
    trims: tuple[Trim, ...] = ()
    writes: tuple[WritesDeletion, ...] = ()
    skips: tuple[Skip, ...] = ()
    last_activity: float | None = None
    gc_blobs: str | None = None
    """(Postgres) the policy that collects the thread's unreferenced blobs, when nothing
    else of it goes (a batch collects a quiet thread's blobs with any of its deletes)."""

    @property
    def is_empty(self) -> bool:
        """Nothing to delete and nothing missing."""
        return not (
            self.rows or self.needs or self.expiry or self.trims or self.writes or self.gc_blobs
        )


def plannable(policy: Policy) -> bool:
    """Whether `plan_thread` decides this policy's rules; else its threads go to rows.

    Size caps, idle-gated trims and per-thread TTLs read what aggregates do
    not hold (sizes, head metadata). An `orphaned` policy is plannable: its
    registry's answer is part of the `Ruleset` the plan is given.
    """
    return (
        policy.quota is None
        and policy.when_idle is None
        and not isinstance(policy.expire_after, ThreadTTL)
    )


def _ttl_seconds(policy: Policy | None) -> float | None:
    """A plannable policy's idle TTL in seconds (None: it does not expire threads)."""
    if policy is None or not isinstance(policy.expire_after, timedelta):
        return None
    return policy.expire_after.total_seconds()


def plan_thread(
    agg: ThreadAggregate,
    rules: Ruleset,
    now: float,
    grace_seconds: float,
    residue: frozenset[str] | None = None,
) -> ThreadPlan:
    """What `agg`'s thread loses under `rules` at `now`, as `decide` would say from its rows.

    Threads with a namespace besides the root one (subgraph calls, persistent
    subgraphs, old root namespaces), ids that are not regular UUIDv6 (`ts`
    dating, no time order), or DeltaChannel / v < 4 markers are handed to the
    row-level path. With `orphaned` policies, `rules` must carry the registries'
    answers for the thread (`Ruleset.for_page`), as for `decide`.

    `residue`: the policies whose quiet threads this pass looks at for residue
    (orphan writes, unreferenced blobs); None: every policy's. A quiet thread
    outside it, neither dated nor due to expire, keeps its residue until a
    pass that looks.
    """
    return _Planner(agg, rules, now, grace_seconds, residue).plan()


class _Planner:
    """`plan_thread` in steps: shape, activity, expiry, trim, orphan writes."""

    # Field by field, like the other planners' constructors: each class's
    # own settings, so their alike shape is not logic to share.
    def __init__(
        self,
        agg: ThreadAggregate,
        rules: Ruleset,
        now: float,
        grace: float,
        residue: frozenset[str] | None,
    ) -> None:
        self.agg = agg
        self.rules = rules
        self.now = now
        self.grace = grace
        self.residue = residue
        self.tid = agg.thread_id

    def plan(self) -> ThreadPlan:
        ns = self._root_only()
        if ns is None or self.agg.rows:
            return ThreadPlan(self.tid, rows=True)
        meta = self.agg.head_metadata
        policy = self.rules.first_match(self.tid, "", meta)
        if policy is not None and not plannable(policy):
            return ThreadPlan(self.tid, rows=True)
        skips: list[Skip] = []
        if self.rules.has_orphan_policies and (gone := self.rules.unreconciled(self.tid, meta)):
            # As `decide`: the policy whose registry failed counts the thread it let fall through.
            skips.append(Skip(gone.name, SkipReason.REGISTRY_UNAVAILABLE))
        newest = checkpoint_time(ns.newest_id)
        assert newest is not None  # a regular id is dated
        if self.agg.orphan_writes is None and self._orphans_matter(policy, newest):
            asked = {Detail.ORPHANS, *self._expiry_needs(policy, ns, newest)}
            return ThreadPlan(self.tid, needs=frozenset(asked))
        if self.agg.garbage_blobs is None and self._blobs_matter(newest):
            return ThreadPlan(self.tid, needs=frozenset({Detail.BLOBS}))
        orphan_times = [
            t for _, cid in self.agg.orphan_writes or () if (t := checkpoint_time(cid)) is not None
        ]
        active = max([newest, *orphan_times])
        idle = self.now - active
        ttl = _ttl_seconds(policy)
        if policy is not None and ttl is not None and idle > ttl:
            # Irregular ids are dated otherwise: they may make the thread younger.
            if ns.irregular is None:
                return ThreadPlan(self.tid, needs=frozenset({Detail.REGULAR}))
            outcome = self._expiry(policy, idle, tuple(skips))
            if not isinstance(outcome, Skip):
                return outcome
            skips.append(outcome)
        trims, needs, count_below = self._trim(policy, ns)
        if trims is None:
            return ThreadPlan(self.tid, rows=True)
        if needs:
            return ThreadPlan(self.tid, needs=needs, count_below=count_below)
        writes = self._orphan_writes(policy, idle)
        if writes and ns.irregular is None:
            return ThreadPlan(self.tid, needs=frozenset({Detail.REGULAR}))
        gc = None
        if self.agg.garbage_blobs and not trims and not writes:
            # As the row-level sweep: the root namespace's policy collects them.
            gc = policy.name if policy is not None and not policy.protect else None
        return ThreadPlan(
            self.tid,
            trims=trims,
            writes=writes,
            skips=tuple(skips),
            last_activity=active,
            gc_blobs=gc,
        )

    def _root_only(self) -> NamespaceAggregate | None:
        """The root namespace when it is the thread's only one, with regular ids; else None."""
        spaces = self.agg.namespaces
        if len(spaces) != 1 or spaces[0].namespace != "":
            return None
        ns = spaces[0]
        if ns.irregular or not (is_regular_id(ns.oldest_id) and is_regular_id(ns.newest_id)):
            return None
        return ns

    def _orphans_matter(self, policy: Policy | None, newest: float) -> bool:
        """Whether orphan writes matter: on a quiet thread they go, on an idle one they date it.

        A quiet thread's residue is looked for only when this pass looks at its
        policies' (`residue`); any policy that might govern one of its
        namespaces counts, as orphan writes of a namespace without checkpoints
        belong to that namespace's policy. (A thread the tool deleted from gets
        only its blobs looked at: `_blobs_matter`.)
        """
        idle = self.now - newest
        ttl = _ttl_seconds(policy)
        if ttl is not None and idle > ttl:
            return True
        if idle <= self.grace:
            return False
        return self.residue is None or self.rules.could_match_thread(self.tid, self.residue)

    def _blobs_matter(self, newest: float) -> bool:
        """Whether to look at a quiet thread's unreferenced blobs between residue looks:
        when the tool deleted from it (`dated`), so that its own trims' leftovers go one
        grace period after the trim, whatever the residue cadence."""
        return self.agg.dated and self.now - newest > self.grace

    def _expiry_needs(
        self, policy: Policy | None, ns: NamespaceAggregate, newest: float
    ) -> set[Detail]:
        """What an expiry candidate (idle past its TTL by its newest id) will ask once its
        orphan writes are in: asked with them, so the engine reads all three in one round.

        Orphan writes only rarely make such a thread younger; then the id count
        and waiting check were read in vain, and the plan is still `decide`'s.
        """
        ttl = _ttl_seconds(policy)
        if policy is None or ttl is None or self.now - newest <= ttl:
            return set()
        needs = set()
        if ns.irregular is None:
            needs.add(Detail.REGULAR)
        if policy.interrupted == "keep" and self.agg.waiting is None:
            needs.add(Detail.WAITING)
        return needs

    def _expiry(self, policy: Policy, idle: float, skips: tuple[Skip, ...]) -> ThreadPlan | Skip:
        """As `decide`: a root-only thread has no protected namespace besides its own.

        `skips`: what the thread's plan already skipped (kept with the expiry, as `decide` does).
        """
        agg = self.agg
        if policy.interrupted == "keep" and agg.head_undecodable:
            return Skip(policy.name, SkipReason.UNDECODABLE)
        if policy.interrupted == "keep" and agg.waiting is None:
            return ThreadPlan(self.tid, needs=frozenset({Detail.WAITING}))
        if policy.interrupted == "keep" and agg.waiting:
            return Skip(policy.name, SkipReason.INTERRUPTED)
        reason = Reason.ORPHANED if policy.orphaned is not None else Reason.EXPIRED
        return ThreadPlan(
            self.tid,
            expiry=Expiry(policy.name, idle, reason),
            skips=skips,
            last_activity=self.now - idle,
        )

    def _trim(
        self, policy: Policy | None, ns: NamespaceAggregate
    ) -> tuple[tuple[Trim, ...] | None, frozenset[Detail], tuple[tuple[str, str], ...]]:
        """The root namespace's trim: (trims or None for "use rows", needs, counts to read)."""
        none: tuple[Trim, ...] = ()
        if policy is None or policy.protect:
            return none, frozenset(), ()
        if policy.keep_last is None and policy.keep_within is None:
            return none, frozenset(), ()
        keep = max(policy.keep_last or 1, 1)
        if ns.count <= keep:
            return none, frozenset(), ()
        # From here on ids are compared with a time bound: they must sort by time.
        if ns.irregular is None:
            return none, frozenset({Detail.REGULAR}), ()
        horizon = self.now - (policy.keep_within.total_seconds() if policy.keep_within else 0.0)
        before = id_bound(horizon)
        if ns.oldest_id >= before:
            return none, frozenset(), ()
        if ns.newest_id < before:
            deletes = ns.count - keep
        elif ("", before) in self.agg.below:
            deletes = min(self.agg.below[("", before)], ns.count - keep)
        else:
            return none, frozenset({Detail.COUNT}), (("", before),)
        if deletes <= 0:
            return none, frozenset(), ()
        if self.agg.markers is None:
            return none, frozenset({Detail.MARKERS}), ()
        if self.agg.markers:
            return None, frozenset(), ()
        oldest = checkpoint_time(ns.oldest_id)
        age = self.now - oldest if oldest is not None else None
        return (Trim("", policy.name, keep, before, deletes, age),), frozenset(), ()

    def _orphan_writes(self, policy: Policy | None, idle: float) -> tuple[WritesDeletion, ...]:
        """As `decide`: on a quiet thread, orphan writes older than the grace period go."""
        if idle <= self.grace:
            return ()
        out = []
        for ns, cid in self.agg.orphan_writes or ():
            t = checkpoint_time(cid)
            if t is not None and self.now - t <= self.grace:
                continue
            owner = policy if ns == "" else None
            owner = owner or self.rules.first_match(self.tid, ns, self.agg.head_metadata)
            if owner is not None and not owner.protect:
                out.append(WritesDeletion(ns, cid, owner.name))
        return tuple(out)
