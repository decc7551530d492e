"""Size caps: `stores[].max_bytes` and `policies[].quota: {max_bytes, per}`.

Over a cap, a sweep expires the least recently active threads that retention
allows (`policies.decide.quota_verdict`: never unmatched, protected, held,
undated or waiting threads, unless `interrupted: expire`) until the store or
group is under it. Evictions are expiries with reason `quota`: they join the
sweep's deferred expiries, so the all-or-nothing safety limit weighs them.

Bytes are counted per thread as `stats` counts them (`StoreEngine.thread_bytes`):
rows, not disk, which only reclamation shrinks.

Memory, for a store of 10M threads:

- pass 1 (the sweep's own pass) keeps totals only: the store's bytes, each
  quota group's bytes, and a histogram of the store cap's candidates' bytes by
  hour of last activity;
- per-group caps: a second walk keeps (thread, last activity, bytes) for the
  candidates of groups over their cap only, and evicts each group's oldest;
- the store cap: the histogram gives the hour before which every candidate
  goes (their bytes add up to less than the excess); a walk evicts those as it
  meets them and keeps only the candidates of that boundary hour, which it
  sorts to take just enough. A candidate found waiting (or held) there comes
  off the histogram, and, still over, the next walk starts after that hour
  (at most `MAX_STORE_WALKS` walks). A store still over its cap after that,
  or after every allowed thread, is reported (`SweepReport.over_quota`),
  never brought under by breaking a rule.

(docs/architecture.md "Layers": `worker/sweep/quota.py` once the sweep is a package.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from policies.config import Policy
from policies.decide import last_activity, quota_group, quota_verdict
from policies.matching import Ruleset
from policies.model import ThreadDecision
from worker.stores.engine import Fingerprint, ScannedThread, StoreEngine

log = structlog.get_logger("checkpoint_janitor.quota")

BUCKET_SECONDS = 3600
"""Width of the store cap's last-activity histogram: the boundary walk holds one hour's threads."""
MAX_STORE_WALKS = 3
"""Walks the store cap may take (each past a boundary hour whose candidates turned out waiting)."""

STORE = ("", "")
"""`over_quota` key of the store cap (policy, group)."""

Decided = list[tuple[ScannedThread, ThreadDecision]]


@dataclass(frozen=True, slots=True)
class Eviction:
    """A thread a cap expires."""

    thread_id: str
    fingerprint: Fingerprint
    policy: str
    last_activity: float
    bytes: int
    """Everything the thread holds: what the cap weighs."""
    checkpoints: int
    size: int
    """Its checkpoints' bytes: what reports count, as for every expiry."""


class PassHooks(Protocol):
    """What the quota walks need from the sweep's pass."""

    async def decide_page(
        self, page: list[str], count_held: bool = True
    ) -> tuple[Ruleset, Decided]:
        """Scan and decide a page as the pass does (held threads dropped), without counting it."""

    def evict(self, eviction: Eviction) -> None:
        """Add an eviction to the sweep's deferred expiries."""


def _bucket(t: float) -> int:
    return int(t // BUCKET_SECONDS)


def _trimmed_bytes(thread: ScannedThread, decision: ThreadDecision) -> int:
    gone = {(d.namespace, d.checkpoint_id) for d in decision.deletions}
    return sum(c.size for c in thread.view.checkpoints if (c.namespace, c.checkpoint_id) in gone)


class QuotaPass:
    """One sweep's size caps: totals from pass 1 (`observe`), then evictions (`evict`)."""

    def __init__(
        self,
        store: str,
        store_cap: int | None,
        policies: Sequence[Policy],
        due: frozenset[str] | None,
        page_threads: int,
    ) -> None:
        self.store = store
        self.store_cap = store_cap
        self.caps = {p.name: p.quota.max_bytes for p in policies if p.quota is not None}
        self.due = due
        self.page_threads = page_threads
        self.store_bytes = 0
        """The store's bytes, less what the sweep's own expiries and trims take."""
        self.group_bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.histogram: dict[int, int] = defaultdict(int)
        """Store cap candidates' bytes by hour of last activity."""
        self.over: dict[tuple[str, str], int] = {}
        """(policy, group) -> bytes still over its cap after the evictions; STORE: the store."""

    @property
    def active(self) -> bool:
        """Whether any cap applies to this sweep."""
        return self.store_cap is not None or bool(self.caps)

    def _due(self, policy: Policy) -> bool:
        return self.due is None or policy.name in self.due

    async def observe(
        self, engine: StoreEngine, page: list[str], rules: Ruleset, decided: Decided
    ) -> None:
        """Pass 1: add a page's bytes to the totals (`decided`: its scanned threads)."""
        sizes = await engine.thread_bytes(page)
        self.store_bytes += sum(sizes.values())
        for thread, decision in decided:
            view = thread.view
            size = sizes.get(view.thread_id, 0)
            if decision.expiry is not None:
                self.store_bytes -= size
                continue
            trimmed = _trimmed_bytes(thread, decision)
            self.store_bytes -= trimmed
            size -= trimmed
            root = rules.first_match(view.thread_id, "", view.head_metadata)
            if root is not None and root.name in self.caps and self._due(root):
                group = quota_group(root, view.head_metadata)
                if group is not None:
                    self.group_bytes[root.name, group] += size
            if self.store_cap is not None:
                owner, _ = quota_verdict(view, rules, held=False)
                active = last_activity(view)
                if owner is not None and self._due(owner) and active is not None:
                    self.histogram[_bucket(active)] += size

    async def evict(self, engine: StoreEngine, hooks: PassHooks) -> None:
        """After pass 1: evict what the caps need, oldest activity first; note what stays over."""
        excess = self.store_bytes - self.store_cap if self.store_cap is not None else 0
        evicted: set[str] = set()
        for e in await self._group_evictions(engine, hooks):
            excess -= self._take(hooks, e, evicted)
        lo: int | None = None
        for _ in range(MAX_STORE_WALKS):
            if excess <= 0:
                break
            hi = self._cutoff(lo, excess)
            if hi is None:
                break
            excess = await self._store_walk(engine, hooks, lo, hi, excess, evicted)
            lo = hi
        if self.store_cap is not None:
            self.over[STORE] = max(excess, 0)
        self._warn_over()

    def _take(self, hooks: PassHooks, e: Eviction, evicted: set[str]) -> int:
        """Evict `e` and take it off the histogram; the bytes it frees toward the store cap."""
        hooks.evict(e)
        evicted.add(e.thread_id)
        self.histogram[_bucket(e.last_activity)] -= e.bytes
        return e.bytes

    async def _group_evictions(self, engine: StoreEngine, hooks: PassHooks) -> list[Eviction]:
        """Each group over its cap loses its oldest candidates until under; the rest stays over."""
        over_groups = {
            key: total - self.caps[key[0]]
            for key, total in self.group_bytes.items()
            if total > self.caps[key[0]]
        }
        if not over_groups:
            return []
        candidates: dict[tuple[str, str], list[Eviction]] = defaultdict(list)

        def in_over_group(thread: ScannedThread, owner: Policy) -> bool:
            group = quota_group(owner, thread.view.head_metadata)
            return owner.name in self.caps and (owner.name, group) in over_groups

        async for member, ok in self._walk(engine, hooks, in_over_group):
            if ok:
                candidates[member.policy, member.group].append(member.eviction)
        chosen: list[Eviction] = []
        for key, members in candidates.items():
            members.sort(key=lambda c: c.last_activity)
            for c in members:
                if over_groups[key] <= 0:
                    break
                chosen.append(c)
                over_groups[key] -= c.bytes
        self.over.update({k: v for k, v in over_groups.items() if v > 0})
        return chosen

    async def _store_walk(
        self,
        engine: StoreEngine,
        hooks: PassHooks,
        low: int | None,
        hi: int,
        excess: int,
        evicted: set[str],
    ) -> int:
        """One store cap walk over the hours (`low`, `hi`]; the excess left after it.

        Candidates before hour `hi` all go as the walk meets them; those of the
        boundary hour `hi` are kept and the oldest go until the excess is gone.
        """
        boundary: list[Eviction] = []

        def in_range(thread: ScannedThread, owner: Policy) -> bool:
            active = last_activity(thread.view)
            if thread.view.thread_id in evicted or active is None:
                return False
            b = _bucket(active)
            return (low is None or b > low) and b <= hi

        async for found, ok in self._walk(engine, hooks, in_range):
            e = found.eviction
            if not ok:
                # Waiting (or held): not a candidate after all.
                self.histogram[_bucket(e.last_activity)] -= e.bytes
            elif _bucket(e.last_activity) < hi:
                excess -= self._take(hooks, e, evicted)
            else:
                boundary.append(e)
        boundary.sort(key=lambda c: c.last_activity)
        for c in boundary:
            if excess <= 0:
                break
            excess -= self._take(hooks, c, evicted)
        return excess

    def _warn_over(self) -> None:
        for (policy, group), bytes_over in self.over.items():
            if bytes_over > 0:
                log.warning(
                    "over_quota",
                    store=self.store,
                    policy=policy or None,
                    group=group or None,
                    bytes_over=bytes_over,
                    message="still over its size cap after every thread the policies allow "
                    "to go: protected, waiting, held or recently active threads hold the rest",
                )

    def _cutoff(self, lo: int | None, excess: int) -> int | None:
        """The first hour after `lo` by which candidates' bytes reach `excess` (else the last)."""
        total = 0
        last = None
        for b in sorted(k for k, v in self.histogram.items() if v > 0 and (lo is None or k > lo)):
            total += self.histogram[b]
            last = b
            if total >= excess:
                return b
        return last

    async def _walk(
        self,
        engine: StoreEngine,
        hooks: PassHooks,
        want: Callable[[ScannedThread, Policy], bool],
    ) -> AsyncIterator[tuple[_Found, bool]]:
        """Every thread a cap could take that `want` picks, with whether it may (waiting read)."""
        async for page in engine.thread_pages(self.page_threads):
            rules, decided = await hooks.decide_page(page, count_held=False)
            picked: list[tuple[ScannedThread, Policy, bool]] = []
            for thread, decision in decided:
                if decision.expiry is not None:
                    continue  # the sweep expires it anyway
                owner, ask = quota_verdict(thread.view, rules, held=False)
                if owner is not None and self._due(owner) and want(thread, owner):
                    picked.append((thread, owner, ask))
            if not picked:
                continue
            sizes = await engine.thread_bytes([t.view.thread_id for t, _, _ in picked])
            asking = [t for t, _, ask in picked if ask]
            resolved = (
                {t.view.thread_id: t for t in await engine.resolve_waiting(asking)}
                if asking
                else {}
            )
            for thread, owner, ask in picked:
                ok = True
                if ask:
                    thread = resolved.get(thread.view.thread_id, thread)
                    verdict, _ = quota_verdict(thread.view, rules, held=False)
                    ok = verdict is not None
                yield _found(thread, owner, sizes.get(thread.view.thread_id, 0)), ok


@dataclass(frozen=True, slots=True)
class _Found:
    eviction: Eviction
    policy: str
    group: str


def _found(thread: ScannedThread, owner: Policy, size: int) -> _Found:
    view = thread.view
    active = last_activity(view)
    assert active is not None  # quota_verdict refuses undated threads
    eviction = Eviction(
        view.thread_id,
        thread.fingerprint,
        owner.name,
        active,
        size,
        len(view.checkpoints),
        sum(c.size for c in view.checkpoints),
    )
    return _Found(eviction, owner.name, quota_group(owner, view.head_metadata) or "")
