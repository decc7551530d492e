"""A sweep's planning side: pages of threads turned into plans, ahead of the deletes.

An engine that offers aggregates (`AggregateStore`) is planned from them
(`policies.plan`): per page, one GROUP BY over the primary key, then only the
details the plans ask for, and the row-level `decide` only for the threads
handed over. Other engines are decided from their rows, page by page. Either
way the pages come out of `prefetched`, so page N+1 is read and planned while
the batches of page N commit.

With `orphaned` policies, each page's thread ids are looked up in the
registries (`answers`) before it is planned, and the page is planned and
decided under the rules that carry those answers (`PlannedPage.rules`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field

from policies.decide import decide
from policies.matching import Ruleset
from policies.model import ThreadDecision
from policies.plan import ThreadAggregate, ThreadPlan, plan_thread
from worker.stores.engine import AggregateStore, ScannedThread, StoreEngine
from worker.sweep.tasks import cancel_and_wait

MAX_DETAIL_ROUNDS = 5
"""Orphans, waiting, markers, counts: a plan asks at most this many times."""

PLAN_AHEAD = 4
"""Pages planned at once. A page's plan alternates between the engine's reads
(on SQLite, on reader connections' threads) and `plan_thread` (on the event
loop); with several pages in flight one page's reads run while another's plans
are computed, so the planning costs about the larger of the two, not their sum.
Four: SQLite reads two pages' details at once (`DETAIL_READERS`) while the next
page's aggregates are read on a connection of their own."""

RegistryAnswers = Callable[[Sequence[str]], Awaitable[Mapping[str, Set[str]]]]
"""Per answering `orphaned` policy, which of these thread ids its registry lists
(`worker.sweep.orphans.OrphanLookup.answers`)."""


@dataclass(slots=True)
class PlannedPage:
    """One page's threads, each either planned from aggregates or decided from rows."""

    threads: int
    """Threads the page held (`threads_scanned`)."""
    rules: Ruleset
    """The rules the page was decided under: with its registries' answers, if any."""
    plans: list[tuple[ThreadAggregate, ThreadPlan]] = field(default_factory=list)
    decided: list[tuple[ScannedThread, ThreadDecision]] = field(default_factory=list)


class PagePlanner:
    """Reads and plans the store's threads page by page."""

    # Field by field, like the other planners' and engines' constructors: each class's
    # own settings, so their alike shape is not logic to share.
    def __init__(
        self,
        engine: StoreEngine,
        rules: Ruleset,
        now: float,
        grace: float,
        *,
        aggregates: bool = True,
        residue: frozenset[str] | None = None,
        answers: RegistryAnswers | None = None,
    ) -> None:
        self.engine = engine
        self.answers = answers
        """Asked once per page for its candidates' registry membership (`orphaned` policies)."""
        self.aggregates = aggregates
        self.residue = residue
        """The policies whose quiet threads' residue the plans look for (None: all)."""
        self.rules = rules
        self.now = now
        self.grace = grace
        self.head_metadata = any(p.match.metadata for p in rules.policies)
        """Policies match on metadata: read the heads' metadata with the aggregates."""

    def pages(self, page_size: int) -> AsyncIterator[PlannedPage]:
        """Every thread, planned, one page ahead of the caller."""
        if self.aggregates and isinstance(self.engine, AggregateStore):
            return prefetched(self._aggregate_pages(self.engine, page_size))
        return self._row_pages(page_size)

    async def _aggregate_pages(
        self, engine: AggregateStore, page_size: int
    ) -> AsyncIterator[PlannedPage]:
        """The planned pages in the store's order, up to `PLAN_AHEAD` of them being planned.

        One at a time with registries to ask (`answers`): a registry is asked
        for one page at a time.
        """
        ahead = PLAN_AHEAD if self.answers is None else 1
        planning: deque[asyncio.Future[PlannedPage]] = deque()
        try:
            async for aggs in engine.aggregate_pages(page_size, self.head_metadata):
                planning.append(asyncio.ensure_future(self._plan(engine, aggs)))
                if len(planning) >= ahead:
                    yield await planning.popleft()
            while planning:
                yield await planning.popleft()
        finally:
            await cancel_and_wait(planning)

    async def _row_pages(self, page_size: int) -> AsyncIterator[PlannedPage]:
        async for ids in self.engine.thread_pages(page_size):
            candidates = [t for t in ids if self.rules.could_match_thread(t)]
            rules = await self._page_rules(candidates)
            page = PlannedPage(len(ids), rules)
            page.decided = await self.decide_rows(candidates, rules)
            yield page

    async def _page_rules(self, candidates: Sequence[str]) -> Ruleset:
        """The rules with the registries' answers for `candidates` (unchanged without any)."""
        if self.answers is None or not candidates:
            return self.rules
        return self.rules.for_page(await self.answers(candidates))

    async def _plan(self, engine: AggregateStore, aggs: list[ThreadAggregate]) -> PlannedPage:
        """Plan a page: ask for details until every plan is complete or handed to rows."""
        todo = [a for a in aggs if self.rules.could_match_thread(a.thread_id)]
        rules = await self._page_rules([a.thread_id for a in todo])
        page = PlannedPage(len(aggs), rules)
        rows: list[str] = []
        for _ in range(MAX_DETAIL_ROUNDS):
            asked: list[tuple[ThreadAggregate, ThreadPlan]] = []
            for agg in todo:
                plan = plan_thread(agg, rules, self.now, self.grace, self.residue)
                if plan.rows:
                    rows.append(agg.thread_id)
                elif plan.needs:
                    asked.append((agg, plan))
                elif not plan.is_empty or plan.skips:
                    page.plans.append((agg, plan))
            if not asked:
                todo = []
                break
            todo = await engine.details(asked)
        rows.extend(a.thread_id for a in todo)  # still asking: the rows decide
        if rows:
            page.decided = await self.decide_rows(sorted(rows), rules)
        return page

    async def decide_rows(
        self, thread_ids: Sequence[str], rules: Ruleset | None = None
    ) -> list[tuple[ScannedThread, ThreadDecision]]:
        """The row-level path: scan, decide, and read waiting for the expiry candidates.

        `rules`: the page's (with its registries' answers); None: the planner's own.
        """
        rules = self.rules if rules is None else rules
        candidates = [t for t in thread_ids if rules.could_match_thread(t)]
        scanned = await self.engine.scan(candidates) if candidates else []
        return await decide_scanned(self.engine, scanned, rules, self.now, self.grace)


async def decide_scanned(
    engine: StoreEngine, scanned: Sequence[ScannedThread], rules: Ruleset, now: float, grace: float
) -> list[tuple[ScannedThread, ThreadDecision]]:
    """`decide` each scanned thread; the expiry candidates again once their waiting is read.

    Waiting is read from the heads of expiry candidates only, in one go.
    """
    decided = [(t, decide(t.view, rules, now, grace)) for t in scanned]
    if asking := [t for t, d in decided if d.needs_waiting]:
        resolved = {t.view.thread_id: t for t in await engine.resolve_waiting(asking)}
        decided = [
            (r, decide(r.view, rules, now, grace))
            if (r := resolved.get(t.view.thread_id)) is not None
            else (t, d)
            for t, d in decided
        ]
    return decided


async def prefetched(pages: AsyncIterator[PlannedPage]) -> AsyncIterator[PlannedPage]:
    """`pages`, with the next one already being produced while the caller works on this one."""
    it = aiter(pages)
    nxt: asyncio.Future[PlannedPage] = asyncio.ensure_future(anext(it))
    try:
        while True:
            try:
                page = await nxt
            except StopAsyncIteration:
                return
            nxt = asyncio.ensure_future(anext(it))
            yield page
    finally:
        if not nxt.done():
            nxt.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await nxt
        close = getattr(it, "aclose", None)
        if close is not None:
            await close()
