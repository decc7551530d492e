"""`RetentionSaver` around every seed saver: retention, invariants, explicit deletions, passthrough.

Graphs are real (tests/helpers/scenarios.py, worker/service/demo.py); every store is written
by LangGraph through the real saver. A control graph on an unwrapped
`InMemorySaver` runs the same turns, and the wrapped graph's state must equal
it after every turn. Postgres tests run on the throwaway server (`pg_dsn`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from helpers.scenarios import (
    DAY,
    Gate,
    build_mixed_store,
    build_replay_store,
    delta_graph,
    persistent_subgraph_graph,
    race_graph,
    read_all,
    replay,
    resume,
    root_ids,
    states,
)
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.types import Command
from prometheus_client import CollectorRegistry

from policies.ids import checkpoint_time
from worker.saver import RetentionSaver, SaverMetrics
from worker.service.demo import aged, approval_graph, chat_graph, subgraph_graph
from worker.service.demo import thread as _thread

# ------------------------------------------------------------------ fixtures


def thread(thread_id: str, **configurable: Any) -> RunnableConfig:
    """`worker.service.demo.thread`, typed as the savers take it."""
    return cast(RunnableConfig, _thread(thread_id, **configurable))


SAVERS = ["memory", "sqlite", "postgres"]
WITH_PIPELINE = [*SAVERS, "postgres-pipeline"]


@contextlib.asynccontextmanager
async def open_saver(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A fresh async-capable saver of `kind` (Postgres on a fresh database)."""
    if kind == "memory":
        yield InMemorySaver()
    elif kind == "sqlite":
        async with AsyncSqliteSaver.from_conn_string(":memory:") as saver:
            await saver.setup()
            yield saver
    else:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

        dsn = request.getfixturevalue("pg_dsn")
        async with AsyncPostgresSaver.from_conn_string(dsn) as setup:
            await setup.setup()
        # "postgres-pipeline": the saver on a connection in pipeline mode.
        pipeline = kind == "postgres-pipeline"
        async with AsyncPostgresSaver.from_conn_string(dsn, pipeline=pipeline) as saver:
            yield saver


def wrap(inner: Any, **kwargs: Any) -> tuple[RetentionSaver, CollectorRegistry]:
    registry = CollectorRegistry()
    return RetentionSaver(inner, registry=registry, **kwargs), registry


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def ns_sizes(inner: Any) -> Counter[tuple[str, str]]:
    """Checkpoints per (thread, namespace) as the unwrapped saver lists them."""
    sizes: Counter[tuple[str, str]] = Counter()
    async for t in inner.alist(None):
        c = t.config["configurable"]
        sizes[(c["thread_id"], c["checkpoint_ns"])] += 1
    return sizes


async def all_keys(inner: Any) -> list[tuple[str, str, str]]:
    keys = []
    async for t in inner.alist(None):
        c = t.config["configurable"]
        keys.append((c["thread_id"], c["checkpoint_ns"], c["checkpoint_id"]))
    return keys


async def write_keys(inner: Any) -> set[tuple[str, str, str]]:
    """(thread, ns, checkpoint id) of every stored write, straight from the storage."""
    if isinstance(inner, InMemorySaver):
        return {k for k, v in inner.writes.items() if v}
    if isinstance(inner, AsyncSqliteSaver):
        async with inner.conn.execute(
            "SELECT DISTINCT thread_id, checkpoint_ns, checkpoint_id FROM writes"
        ) as cur:
            return {(r[0], r[1], r[2]) for r in await cur.fetchall()}
    async with inner._cursor() as cur:
        await cur.execute(
            "SELECT DISTINCT thread_id, checkpoint_ns, checkpoint_id FROM checkpoint_writes"
        )
        return {
            (r["thread_id"], r["checkpoint_ns"], r["checkpoint_id"]) for r in await cur.fetchall()
        }


PG_GARBAGE_BLOBS_SQL = """
SELECT count(*) AS n FROM checkpoint_blobs b
WHERE NOT EXISTS (
    SELECT 1 FROM checkpoints c
    WHERE c.thread_id = b.thread_id AND c.checkpoint_ns = b.checkpoint_ns
      AND c.checkpoint -> 'channel_versions' ->> b.channel = b.version
)
"""


async def garbage_blobs(inner: Any) -> int:
    """Blob versions no checkpoint references (Postgres and memory; SQLite has none)."""
    if isinstance(inner, InMemorySaver):
        refs = set()
        for tid, namespaces in inner.storage.items():
            for ns, cps in namespaces.items():
                for entry in cps.values():
                    ck = inner.serde.loads_typed(entry[0])
                    refs |= {(tid, ns, ch, v) for ch, v in ck["channel_versions"].items()}
        return sum(1 for k in inner.blobs if k not in refs)
    if isinstance(inner, AsyncSqliteSaver):
        return 0
    async with inner._cursor() as cur:
        await cur.execute(PG_GARBAGE_BLOBS_SQL)
        row = await cur.fetchone()
        return int(row["n"])


def turn_input(app_kind: str, i: int) -> dict[str, Any]:
    return {"items": [f"in {i}"]} if app_kind == "delta" else {"messages": [f"turn {i}"]}


# ------------------------------------------------------------------ trimming on put


@pytest.mark.parametrize("kind", SAVERS)
async def test_chat_100_turns_keeps_last_5_and_equals_control(
    kind: str, request: pytest.FixtureRequest
) -> None:
    async with open_saver(kind, request) as inner:
        saver, registry = wrap(inner, keep_last=5)
        assert saver.slack == 2
        app, control = chat_graph(saver), chat_graph(InMemorySaver())
        cfg = thread("chat-1", user_id="u1")
        for i in range(100):
            out = await app.ainvoke({"messages": [f"turn {i}"]}, cfg)
            assert out == await control.ainvoke({"messages": [f"turn {i}"]}, cfg)
            mine, theirs = await app.aget_state(cfg), await control.aget_state(cfg)
            assert (mine.values, mine.next) == (theirs.values, theirs.next)
            sizes = await ns_sizes(inner)
            assert max(sizes.values()) <= 5 + saver.slack, (i, sizes)
        assert len(mine.values["messages"]) == 200
        assert (await ns_sizes(inner))[("chat-1", "")] >= 5
        # Writes exist only for checkpoints that exist, and no blob is left unreferenced.
        keys = set(await all_keys(inner))
        assert await write_keys(inner) <= keys
        assert await garbage_blobs(inner) == 0
        assert metric(registry, "checkpoint_janitor_saver_trims_total", saver=saver.name) > 20
        deleted = metric(
            registry,
            "checkpoint_janitor_saver_deleted_total",
            saver=saver.name,
            kind="checkpoints",
            reason="trimmed",
        )
        assert deleted == 300 - len(keys)
        assert (
            metric(
                registry,
                "checkpoint_janitor_saver_failures_total",
                saver=saver.name,
                operation="trim",
            )
            == 0
        )


@pytest.mark.parametrize("kind", SAVERS)
async def test_delta_channel_graph_keeps_its_values(
    kind: str, request: pytest.FixtureRequest
) -> None:
    async with open_saver(kind, request) as inner:
        saver, _ = wrap(inner, keep_last=2)
        app, control = delta_graph(saver), delta_graph(InMemorySaver())
        cfg = thread("delta-1")
        for i in range(40):
            out = await app.ainvoke({"items": [f"in {i}"]}, cfg)
            assert out == await control.ainvoke({"items": [f"in {i}"]}, cfg), i
            assert (await app.aget_state(cfg)).values == (await control.aget_state(cfg)).values
        assert len(out["items"]) == 80
        # History is trimmed all the same: far fewer than the 120 checkpoints written,
        # more than keep_last (the ancestors back to the last snapshot stay).
        size = (await ns_sizes(inner))[("delta-1", "")]
        assert 2 < size < 20
        assert await garbage_blobs(inner) == 0


@pytest.mark.parametrize("kind", WITH_PIPELINE)
async def test_subgraph_calls_go_with_their_root_checkpoint(
    kind: str, request: pytest.FixtureRequest
) -> None:
    async with open_saver(kind, request) as inner:
        saver, _ = wrap(inner, keep_last=2, slack=0)
        app, control = subgraph_graph(saver), subgraph_graph(InMemorySaver())
        papp, pcontrol = (
            persistent_subgraph_graph(saver),
            persistent_subgraph_graph(InMemorySaver()),
        )
        for i in range(6):
            await app.ainvoke({"messages": [f"turn {i}"]}, thread("sub"))
            await control.ainvoke({"messages": [f"turn {i}"]}, thread("sub"))
            await papp.ainvoke({"messages": [f"turn {i}"]}, thread("subp"))
            await pcontrol.ainvoke({"messages": [f"turn {i}"]}, thread("subp"))
            for a, c, tid in ((app, control, "sub"), (papp, pcontrol, "subp")):
                mine = await a.aget_state(thread(tid), subgraphs=True)
                theirs = await c.aget_state(thread(tid), subgraphs=True)
                assert (mine.values, mine.next) == (theirs.values, theirs.next)
        roots = {cid for tid, ns, cid in await all_keys(inner) if tid == "sub" and ns == ""}
        calls: dict[str, str] = {}
        async for t in inner.alist(thread("sub")):
            ns = t.config["configurable"]["checkpoint_ns"]
            if ns:
                calls[ns] = t.metadata["parents"][""]
        assert calls, "the kept root checkpoints' calls stay"
        assert set(calls.values()) <= roots, "no call outlives its root checkpoint"
        sizes = await ns_sizes(inner)
        # The persistent `checkpointer=True` namespace is trimmed to its 2 newest, and
        # the checkpoint replaying the kept step-0 root checkpoint loads.
        assert sizes[("subp", "memory")] <= 3
        assert await garbage_blobs(inner) == 0


async def test_trim_keeps_what_replaying_each_kept_root_checkpoint_reads(tmp_path: Path) -> None:
    """The wrapper's trim honours the persistent-subgraph rule: time travel from every root
    checkpoint it kept returns what it returns on an untrimmed copy (each replay on its own
    copy of the file, since replaying writes)."""
    path, control = tmp_path / "store.db", tmp_path / "control.db"
    async with AsyncSqliteSaver.from_conn_string(str(path)) as inner:
        shapes = await build_replay_store(inner)
    shutil.copy(path, control)
    async with AsyncSqliteSaver.from_conn_string(str(path)) as inner:
        saver, _ = wrap(inner, keep_last=2)
        for tid in shapes:
            await saver._arun(saver._trim(tid))
        kept = root_ids(await all_keys(inner))
    assert all(len(ids) < 12 for ids in kept.values()), "nothing was trimmed"
    for i in range(max(len(ids) for ids in kept.values())):
        results = []
        for source in (control, path):
            copy = tmp_path / f"replay-{i}-{source.stem}.db"
            shutil.copy(source, copy)
            async with AsyncSqliteSaver.from_conn_string(str(copy)) as inner:
                results.append(
                    {
                        (tid, ids[i]): await replay(inner, shapes[tid], tid, ids[i])
                        for tid, ids in kept.items()
                        if i < len(ids)
                    }
                )
        assert results[1] == results[0]


@pytest.mark.parametrize("kind", SAVERS)
async def test_trim_keeps_every_kept_checkpoint_intact_on_a_mixed_store(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Invariants 1-4, 6: what trimming keeps reads back exactly as before, graphs resume."""
    async with open_saver(kind, request) as inner:
        shapes = await build_mixed_store(inner)
        keys = await all_keys(inner)
        before = await read_all(inner, keys)
        states_before = await states(inner, shapes)
        garbage_before = await garbage_blobs(inner)
        saver, _ = wrap(inner, keep_last=1)
        for tid in shapes:
            await saver._arun(saver._trim(tid))
        after = await read_all(inner, keys)
        assert len(after) < len(before)
        for key, (ck, meta, writes) in after.items():
            b_ck, b_meta, b_writes = before[key]
            assert (ck, meta, writes) == (b_ck, b_meta, b_writes), key
        assert await states(inner, shapes) == states_before
        assert await garbage_blobs(inner) == garbage_before
        assert await write_keys(inner) <= set(after)
        # A kept checkpoint whose parent went has none (as the official prune).
        async for t in inner.alist(None):
            if t.parent_config is not None:
                p = t.parent_config["configurable"]
                assert (p["thread_id"], p["checkpoint_ns"], p["checkpoint_id"]) in after
        for tid, shape in shapes.items():
            if shape in ("interrupt", "breakpoint", "error"):
                await resume(saver, tid, shape)


@pytest.mark.parametrize("kind", ["postgres", "memory"])
async def test_v3_checkpoint_keeps_the_parent_holding_its_sends(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Invariant 2: Postgres v < 4 checkpoints read pending sends from their parent's writes."""
    from langgraph.checkpoint.base import empty_checkpoint

    async with open_saver(kind, request) as inner:
        saver, _ = wrap(inner, keep_last=1, slack=0)
        parent: RunnableConfig | None = None
        configs: list[RunnableConfig] = []
        for step in range(4):
            ck = empty_checkpoint()
            ck["v"] = 3  # written by an older LangGraph
            cfg: dict[str, Any] = {"configurable": {"thread_id": "old", "checkpoint_ns": ""}}
            if parent is not None:
                cfg["configurable"]["checkpoint_id"] = parent["configurable"]["checkpoint_id"]
            meta: Any = {"source": "loop", "step": step, "parents": {}}
            parent = await saver.aput(cast(RunnableConfig, cfg), ck, meta, {})
            configs.append(parent)
            if step == 2:
                await saver.aput_writes(parent, [("__pregel_tasks", "a send")], "task-1")
        head = await saver.aget_tuple(thread("old"))
        assert head is not None
        keys = {k[2] for k in await all_keys(inner)}
        held = configs[2]["configurable"]["checkpoint_id"]
        if kind == "memory":
            # Memory (like SQLite) keeps sends inline: nothing to keep for them.
            assert keys == {configs[3]["configurable"]["checkpoint_id"]}
        else:
            assert keys == {configs[3]["configurable"]["checkpoint_id"], held}
            # The kept head still reads its pending sends from the kept parent.
            assert head.checkpoint["channel_values"].get("__pregel_tasks") == ["a send"]


async def test_concurrent_graphs_share_one_connection() -> None:
    """Several compiled graphs on one AsyncSqliteSaver connection: trims hold its lock."""
    async with AsyncSqliteSaver.from_conn_string(":memory:") as inner:
        saver, registry = wrap(inner, keep_last=3)
        apps = [chat_graph(saver) for _ in range(4)]

        async def talk(n: int) -> None:
            for i in range(15):
                await apps[n].ainvoke({"messages": [f"{n}-{i}"]}, thread(f"t{n}"))

        await asyncio.gather(*(talk(n) for n in range(4)))
        sizes = await ns_sizes(inner)
        assert set(sizes) == {(f"t{n}", "") for n in range(4)}
        assert max(sizes.values()) <= 3 + saver.slack
        for n in range(4):
            state = await apps[n].aget_state(thread(f"t{n}"))
            assert len(state.values["messages"]) == 30
        assert (
            metric(
                registry,
                "checkpoint_janitor_saver_failures_total",
                saver=saver.name,
                operation="trim",
            )
            == 0
        )


async def test_keep_within_keeps_young_checkpoints() -> None:
    inner = InMemorySaver()
    saver, _ = wrap(inner, keep_last=1, keep_within="7d", slack=0)
    app = chat_graph(saver)
    with aged(20):
        for i in range(3):
            await app.ainvoke({"messages": [f"old {i}"]}, thread("t"))
    for i in range(3):
        await app.ainvoke({"messages": [f"new {i}"]}, thread("t"))
    now = time.time()
    ages = [now - (checkpoint_time(cid) or 0) for _, _, cid in await all_keys(inner)]
    assert len(ages) == 9, "the 9 young checkpoints stay, the 9 old ones went"
    assert all(a < 7 * DAY for a in ages)


# ------------------------------------------------------------------ write path never breaks


async def test_failed_trim_is_logged_and_counted_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = InMemorySaver()
    saver, registry = wrap(inner, keep_last=1, slack=0, expire_after="30d")

    async def boom(*args: Any) -> Any:
        raise RuntimeError("disk on fire")

    saver._backend.atrim = boom  # type: ignore[method-assign,assignment]
    saver._backend.ascan = boom  # type: ignore[method-assign,assignment]
    app = chat_graph(saver)
    with caplog.at_level(logging.WARNING, logger="checkpoint_janitor.saver"):
        for i in range(3):
            out = await app.ainvoke({"messages": [f"turn {i}"]}, thread("t"))
    assert len(out["messages"]) == 6
    assert (
        metric(
            registry,
            "checkpoint_janitor_saver_failures_total",
            saver="InMemorySaver",
            operation="trim",
        )
        == 8
    )  # every put but the first, which starts the thread's history
    assert (
        metric(
            registry,
            "checkpoint_janitor_saver_failures_total",
            saver="InMemorySaver",
            operation="expire",
        )
        == 1
    )
    assert "retention trim failed" in caplog.text and "disk on fire" in caplog.text
    assert len(await all_keys(inner)) == 9, "nothing trimmed, nothing lost"


# ------------------------------------------------------------------ expire_after


class Clock:
    """An injectable clock: real time shifted by `offset` seconds.

    It must run: a checkpoint dated after a frozen "now" is never old.
    """

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.mark.parametrize("kind", WITH_PIPELINE)
async def test_expired_thread_reads_empty_and_restarts_fresh(
    kind: str, request: pytest.FixtureRequest
) -> None:
    async with open_saver(kind, request) as inner:
        clock = Clock(-2 * DAY)
        saver, registry = wrap(inner, expire_after="30d", clock=clock)
        app = chat_graph(saver)
        with aged(31):
            for i in range(3):
                await app.ainvoke({"messages": [f"old {i}"]}, thread("idle"))
            await subgraph_graph(saver).ainvoke({"messages": ["old sub"]}, thread("idle-sub"))
        await app.ainvoke({"messages": ["hi"]}, thread("fresh"))
        old_keys = {k for k in await all_keys(inner) if k[0] == "idle"}

        # 29 days idle by the injected clock: not expired yet.
        state = await app.aget_state(thread("idle"))
        assert len(state.values["messages"]) == 6

        clock.offset += 2 * DAY  # now 31 days idle
        assert await saver.aget_tuple(thread("idle")) is None
        assert [t async for t in saver.alist(thread("idle"))] == []
        assert (await app.aget_state(thread("idle"))).values == {}
        assert (await app.aget_state(thread("fresh"))).values["messages"] == ["hi", "reply to hi"]
        assert await saver.aget_tuple(thread("idle-sub")) is None
        # Reads delete nothing.
        assert old_keys <= set(await all_keys(inner))

        out = await app.ainvoke({"messages": ["hello again"]}, thread("idle"))
        assert out["messages"] == ["hello again", "reply to hello again"]
        keys = {k for k in await all_keys(inner) if k[0] == "idle"}
        assert keys and not keys & old_keys, "the expired rows went before the new turn"
        assert await write_keys(inner) <= set(await all_keys(inner))
        assert (
            metric(
                registry,
                "checkpoint_janitor_saver_deleted_total",
                saver=saver.name,
                kind="threads",
                reason="expired",
            )
            == 1
        )
        assert (
            metric(registry, "checkpoint_janitor_saver_expired_reads_total", saver=saver.name) >= 3
        )
        # The untouched expired thread is still stored (a sweep will take it), still unreadable.
        assert any(k[0] == "idle-sub" for k in await all_keys(inner))
        assert await saver.aget_tuple(thread("idle-sub")) is None


@pytest.mark.parametrize("interrupted", ["keep", "expire"])
async def test_waiting_thread_expires_only_when_told(interrupted: str) -> None:
    inner = InMemorySaver()
    saver, registry = wrap(inner, expire_after="30d", interrupted=interrupted)
    app = approval_graph(saver)
    with aged(40):
        await app.ainvoke({"messages": ["refund?"]}, thread("waiting"))
    state = await app.aget_state(thread("waiting"))
    if interrupted == "keep":
        assert state.next == ("ask",)
        out = await app.ainvoke(Command(resume="yes"), thread("waiting"))
        assert out["messages"][-1] == "human said yes"
        assert (
            metric(
                registry,
                "checkpoint_janitor_saver_skipped_total",
                saver=saver.name,
                reason="interrupted",
            )
            >= 1
        )
    else:
        assert state.values == {} and state.next == ()


async def test_expiry_rechecks_the_thread_before_deleting() -> None:
    """A run that saves between the decision and the delete wins: nothing is deleted."""
    for inner in (InMemorySaver(),):
        saver, _ = wrap(inner, expire_after="30d")
        with aged(40):
            await chat_graph(inner).ainvoke({"messages": ["x"]}, thread("t"))
        scanned = await saver._backend.ascan("t")
        await chat_graph(inner).ainvoke({"messages": ["resumed"]}, thread("t"))
        assert await saver._backend.aexpire("t", scanned.stamp) is None
        assert len(await all_keys(inner)) == 6


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_sql_expiry_rechecks_the_thread_before_deleting(
    kind: str, request: pytest.FixtureRequest
) -> None:
    async with open_saver(kind, request) as inner:
        saver, _ = wrap(inner, expire_after="30d")
        with aged(40):
            await chat_graph(inner).ainvoke({"messages": ["x"]}, thread("t"))
        scanned = await saver._backend.ascan("t")
        await chat_graph(inner).ainvoke({"messages": ["resumed"]}, thread("t"))
        assert await saver._backend.aexpire("t", scanned.stamp) is None
        assert len(await all_keys(inner)) == 6
        scanned = await saver._backend.ascan("t")
        counts = await saver._backend.aexpire("t", scanned.stamp)
        assert counts is not None and counts.checkpoints == 6 and counts.threads == 1
        assert await all_keys(inner) == [] and await write_keys(inner) == set()


# ------------------------------------------------------------------ delete_checkpoints


async def _dated_store(saver: Any) -> None:
    app = chat_graph(saver)
    with aged(10):
        for i in range(2):
            await app.ainvoke({"messages": [f"old {i}"]}, thread("mixed"))
        for i in range(2):
            await app.ainvoke({"messages": [f"old {i}"]}, thread("old-only"))
        await subgraph_graph(saver).ainvoke({"messages": ["old"]}, thread("old-sub"))
    for i in range(2):
        await app.ainvoke({"messages": [f"new {i}"]}, thread("mixed"))


@pytest.mark.parametrize("kind", SAVERS)
async def test_delete_checkpoints_before(kind: str, request: pytest.FixtureRequest) -> None:
    async with open_saver(kind, request) as inner:
        await _dated_store(inner)
        saver, registry = wrap(inner)
        keys = await all_keys(inner)
        cutoff = time.time() - 5 * DAY
        old = {k for k in keys if (checkpoint_time(k[2]) or 0) < cutoff}
        newest: dict[tuple[str, str], str] = {}
        for tid, ns, cid in keys:
            newest[(tid, ns)] = max(newest.get((tid, ns), ""), cid)
        expected_gone = {k for k in old if newest[(k[0], k[1])] != k[2]}
        state_before = (await chat_graph(inner).aget_state(thread("mixed"))).values

        # A naive datetime is local time, as datetime.now() in the seed's example.
        n = await saver.adelete_checkpoints(before=datetime.now() - timedelta(days=5))
        left = set(await all_keys(inner))
        assert n == len(expected_gone) > 0
        assert left == set(keys) - expected_gone
        assert await write_keys(inner) <= left
        assert await garbage_blobs(inner) == 0
        assert (await chat_graph(inner).aget_state(thread("mixed"))).values == state_before
        # Each namespace's newest stays, however old.
        assert {k[0] for k in left} == {"mixed", "old-only", "old-sub"}
        assert (
            metric(
                registry,
                "checkpoint_janitor_saver_deleted_total",
                saver=saver.name,
                kind="checkpoints",
                reason="delete_checkpoints",
            )
            == n
        )

        # Asked to, the newest go too; only the named thread (an aware datetime works).
        aware = datetime.now(UTC) - timedelta(days=5)
        n = await saver.adelete_checkpoints(before=aware, thread_id="old-only", keep_newest=False)
        assert n == 1
        left = set(await all_keys(inner))
        assert {k[0] for k in left} == {"mixed", "old-sub"}
        await saver.adelete_checkpoints(before=aware, keep_newest=False)
        assert {k[0] for k in await all_keys(inner)} == {"mixed"}
        assert all((checkpoint_time(k[2]) or 0) >= cutoff for k in await all_keys(inner))
        assert await garbage_blobs(inner) == 0


async def test_delete_checkpoints_keeps_delta_ancestors() -> None:
    inner = InMemorySaver()
    saver, _ = wrap(inner)
    app, control = delta_graph(inner), delta_graph(InMemorySaver())
    with aged(10):
        for i in range(4):
            await app.ainvoke({"items": [f"in {i}"]}, thread("d"))
            await control.ainvoke({"items": [f"in {i}"]}, thread("d"))
    for i in range(2):
        await app.ainvoke({"items": [f"new {i}"]}, thread("d"))
        await control.ainvoke({"items": [f"new {i}"]}, thread("d"))
    total = len(await all_keys(inner))
    n = await saver.adelete_checkpoints(before=datetime.now(UTC) - timedelta(days=5))
    assert 0 < n < 12 and len(await all_keys(inner)) == total - n
    assert (await app.aget_state(thread("d"))).values == (
        await control.aget_state(thread("d"))
    ).values


# ------------------------------------------------------------------ prune, delete_for_runs


@pytest.mark.parametrize("kind", WITH_PIPELINE)
async def test_prune_keep_latest_and_delete(kind: str, request: pytest.FixtureRequest) -> None:
    async with open_saver(kind, request) as inner:
        saver, _ = wrap(inner)
        chat = chat_graph(saver)
        for i in range(3):
            await chat.ainvoke({"messages": [f"t{i}"]}, thread("a"))
            await chat.ainvoke({"messages": [f"t{i}"]}, thread("b"))
            await subgraph_graph(saver).ainvoke({"messages": ["s"]}, thread(f"sub{i}"))
        state = (await chat.aget_state(thread("a"))).values
        sub_state = (await subgraph_graph(saver).aget_state(thread("sub0"))).values
        await saver.aprune(["a", "sub0"])
        sizes = await ns_sizes(inner)
        assert sizes[("a", "")] == 1 and sizes[("b", "")] == 9
        # The call namespace went with the root checkpoint it started from.
        assert [k for k in sizes if k[0] == "sub0"] == [("sub0", "")]
        assert (await chat.aget_state(thread("a"))).values == state
        assert (await subgraph_graph(saver).aget_state(thread("sub0"))).values == sub_state
        assert await garbage_blobs(inner) == 0
        await saver.aprune(["b", "sub1"], strategy="delete")
        assert {k[0] for k in await all_keys(inner)} == {"a", "sub0", "sub2"}
        with pytest.raises(TypeError):
            await saver.aprune("a")
        with pytest.raises(ValueError, match="Unknown prune strategy"):
            await saver.aprune(["a"], strategy="keep_some")


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_prune_keep_latest_of_a_delta_thread_keeps_its_values(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Where the wrapper adds `prune`, a DeltaChannel thread keeps its ancestors back to a snapshot.

    (The official Postgres `prune`, used as is, refuses such threads.)
    """
    async with open_saver(kind, request) as inner:
        saver, _ = wrap(inner)
        app = delta_graph(saver)
        for i in range(7):
            await app.ainvoke({"items": [f"in {i}"]}, thread("d"))
        values = (await app.aget_state(thread("d"))).values
        before = len(await all_keys(inner))
        await saver.aprune(["d"])
        assert 1 < len(await all_keys(inner)) < before
        assert (await app.aget_state(thread("d"))).values == values


@pytest.mark.parametrize("kind", WITH_PIPELINE)
async def test_delete_for_runs(kind: str, request: pytest.FixtureRequest) -> None:
    async with open_saver(kind, request) as inner:
        saver, registry = wrap(inner)
        app = chat_graph(saver)

        def run(run_id: str) -> dict[str, Any]:
            return {**thread("t"), "metadata": {"run_id": run_id}}

        await app.ainvoke({"messages": ["one"]}, run("run-1"))
        await app.ainvoke({"messages": ["two"]}, run("run-2"))
        await app.ainvoke({"messages": ["three"]}, run("run-3"))
        state = await app.aget_state(thread("t"))
        await saver.adelete_for_runs(["run-1", "run-2"])
        runs = [t.metadata["run_id"] async for t in inner.alist(thread("t"))]
        assert runs == ["run-3"] * 3
        oldest = [t async for t in inner.alist(thread("t"))][-1]
        assert oldest.parent_config is None
        assert (await app.aget_state(thread("t"))).values == state.values
        assert await write_keys(inner) <= set(await all_keys(inner))
        assert await garbage_blobs(inner) == 0
        assert (
            metric(
                registry,
                "checkpoint_janitor_saver_deleted_total",
                saver=saver.name,
                kind="checkpoints",
                reason="delete_for_runs",
            )
            == 6
        )
        await saver.adelete_for_runs([])
        with pytest.raises(TypeError):
            await saver.adelete_for_runs("run-3")


# ------------------------------------------------------------------ sync savers


@contextlib.contextmanager
def open_sync_saver(kind: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    if kind == "sqlite":
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            yield SqliteSaver(conn)
        finally:
            conn.close()
    else:
        from langgraph.checkpoint.postgres import PostgresSaver

        with PostgresSaver.from_conn_string(request.getfixturevalue("pg_dsn")) as saver:
            saver.setup()
            yield saver


def sync_keys(inner: Any) -> list[tuple[str, str, str]]:
    return [
        (
            t.config["configurable"]["thread_id"],
            t.config["configurable"]["checkpoint_ns"],
            t.config["configurable"]["checkpoint_id"],
        )
        for t in inner.list(None)
    ]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_sync_saver_retention(kind: str, request: pytest.FixtureRequest) -> None:
    with open_sync_saver(kind, request) as inner:
        clock = Clock()
        saver, registry = wrap(inner, keep_last=3, expire_after="30d", clock=clock)
        app, control = chat_graph(saver), chat_graph(InMemorySaver())
        for i in range(30):
            cfg = {**thread("t"), "metadata": {"run_id": f"run-{i % 3}"}}
            assert app.invoke({"messages": [f"turn {i}"]}, cfg) == control.invoke(
                {"messages": [f"turn {i}"]}, thread("t")
            )
            assert app.get_state(thread("t")).values == control.get_state(thread("t")).values
            sizes = Counter((k[0], k[1]) for k in sync_keys(inner))
            assert max(sizes.values()) <= 3 + saver.slack
        assert metric(registry, "checkpoint_janitor_saver_trims_total", saver=saver.name) > 5

        with aged(10):
            for i in range(3):
                app.invoke({"messages": [f"old {i}"]}, thread("old"))
        old = [k for k in sync_keys(inner) if k[0] == "old"]
        assert 3 <= len(old) <= 3 + saver.slack
        n = saver.delete_checkpoints(before=datetime.now() - timedelta(days=5))
        assert n == len(old) - 1
        assert [k for k in sync_keys(inner) if k[0] == "old"] == old[:1]

        saver.prune(["t"])
        assert len([k for k in sync_keys(inner) if k[0] == "t"]) == 1
        app.invoke({"messages": ["more"]}, {**thread("t"), "metadata": {"run_id": "run-x"}})
        others = [t.config for t in inner.list(thread("t")) if t.metadata["run_id"] != "run-x"]
        saver.delete_for_runs(["run-x"])
        assert [t.config for t in inner.list(thread("t"))] == others

        clock.offset += 40 * DAY
        assert saver.get_tuple(thread("t")) is None
        assert list(saver.list(thread("t"))) == []
        assert app.invoke({"messages": ["fresh"]}, thread("t"))["messages"] == [
            "fresh",
            "reply to fresh",
        ]
        saver.prune(["old"], strategy="delete")
        assert {k[0] for k in sync_keys(inner)} == {"t"}
        assert (
            metric(
                registry,
                "checkpoint_janitor_saver_failures_total",
                saver=saver.name,
                operation="trim",
            )
            == 0
        )


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_sync_saver_has_no_async_api(kind: str, request: pytest.FixtureRequest) -> None:
    with open_sync_saver(kind, request) as inner:
        saver, _ = wrap(inner, keep_last=2)
        with pytest.raises(NotImplementedError):
            await saver.aget_tuple(thread("t"))
        if kind == "sqlite":
            # The wrapper's own async twins refuse a sync saver as the saver does.
            with pytest.raises(NotImplementedError):
                await saver.aprune(["t"])
            with pytest.raises(NotImplementedError):
                await saver.adelete_checkpoints(before=datetime.now())


async def test_async_saver_sync_api_from_another_thread() -> None:
    """The sync methods of a wrapped async saver run on its loop, from a worker thread."""
    async with AsyncSqliteSaver.from_conn_string(":memory:") as inner:
        saver, _ = wrap(inner, keep_last=2, slack=0)
        app = chat_graph(saver)

        def work() -> tuple[int, int, int]:
            for i in range(4):
                app.invoke({"messages": [f"turn {i}"]}, thread("t"))
            n = len(list(saver.list(thread("t"))))
            saver.prune(["t"])
            return n, len(list(saver.list(thread("t")))), saver.delete_checkpoints(datetime.now())

        assert await asyncio.to_thread(work) == (2, 1, 0)
        with pytest.raises(asyncio.InvalidStateError):
            saver.prune(["t"])


# ------------------------------------------------------------------ passthrough, metrics


def test_passthrough_of_everything_else() -> None:
    inner = InMemorySaver()
    saver, _ = wrap(inner, keep_last=3)
    assert saver.serde is inner.serde
    assert saver.config_specs == inner.config_specs
    assert saver.storage is inner.storage  # attribute passthrough
    v = saver.get_next_version(None, None)
    assert isinstance(v, str) and v.startswith("0" * 31 + "1.")
    allow = saver.with_allowlist([("my_module", "MyType")])
    assert isinstance(allow, RetentionSaver) and allow.metrics is saver.metrics
    assert allow._state is saver._state
    with pytest.raises(NotImplementedError):
        saver.copy_thread("a", "b")
    with pytest.raises(AttributeError):
        saver.no_such_attribute  # noqa: B018
    app = chat_graph(saver)
    app.invoke({"messages": ["hi"]}, thread("t"))
    assert [t.checkpoint["id"] for t in saver.list(thread("t"))] == [
        t.checkpoint["id"] for t in inner.list(thread("t"))
    ]
    saver.delete_thread("t")
    assert saver.get_tuple(thread("t")) is None


def test_copy_thread_is_offered_only_when_the_saver_has_it() -> None:
    calls: list[tuple[str, str]] = []

    class Copying(InMemorySaver):
        def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
            calls.append((source_thread_id, target_thread_id))

    saver, _ = wrap(Copying())
    assert type(saver).copy_thread is not BaseCheckpointSaver.copy_thread
    assert type(RetentionSaver(InMemorySaver(), registry=CollectorRegistry())).copy_thread is (
        BaseCheckpointSaver.copy_thread
    )
    saver.copy_thread("a", "b")
    assert calls == [("a", "b")] and isinstance(saver, RetentionSaver)


def test_unknown_saver_is_refused_with_rules_and_passed_through_without() -> None:
    class Custom(BaseCheckpointSaver[int]):
        pass

    with pytest.raises(TypeError, match="cannot enforce retention on Custom"):
        RetentionSaver(Custom(), keep_last=3, registry=CollectorRegistry())
    saver = RetentionSaver(Custom(), registry=CollectorRegistry())
    with pytest.raises(NotImplementedError):
        saver.delete_for_runs(["r"])
    with pytest.raises(TypeError):
        RetentionSaver("not a saver")  # type: ignore[arg-type]


def test_invalid_rules_are_errors() -> None:
    from pydantic import ValidationError

    for kwargs in ({"keep_last": 0}, {"keep_within": "0d"}, {"expire_after": "soon"}):
        with pytest.raises(ValidationError):
            RetentionSaver(InMemorySaver(), registry=CollectorRegistry(), **kwargs)
    with pytest.raises(ValueError, match="slack"):
        RetentionSaver(InMemorySaver(), keep_last=2, slack=-1, registry=CollectorRegistry())


def test_metrics_are_created_once_per_registry() -> None:
    registry = CollectorRegistry()
    a = RetentionSaver(InMemorySaver(), keep_last=1, registry=registry, name="a")
    b = RetentionSaver(InMemorySaver(), keep_last=1, registry=registry, name="b")
    assert a.metrics is b.metrics is SaverMetrics.for_registry(registry)
    # The default registry too, however many wrappers use it.
    RetentionSaver(InMemorySaver(), keep_last=1)
    RetentionSaver(InMemorySaver(), keep_last=1)
    for saver in (a, b):
        app = chat_graph(saver)
        for i in range(3):
            app.invoke({"messages": [f"t{i}"]}, thread("t"))
    for name in ("a", "b"):
        assert (
            metric(
                registry,
                "checkpoint_janitor_saver_deleted_total",
                saver=name,
                kind="checkpoints",
                reason="trimmed",
            )
            == 8
        )


def test_threaded_sync_use_of_one_wrapper() -> None:
    """A sync saver shared by threads (a threaded web server): the caches are locked."""
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    inner = SqliteSaver(conn)
    saver, registry = wrap(inner, keep_last=2, expire_after="30d")
    app = chat_graph(saver)
    errors: list[BaseException] = []

    def talk(n: int) -> None:
        try:
            for i in range(10):
                app.invoke({"messages": [f"{n}-{i}"]}, thread(f"t{n}"))
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=talk, args=(n,)) for n in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    sizes = Counter((k[0], k[1]) for k in sync_keys(inner))
    assert len(sizes) == 4 and max(sizes.values()) <= 2 + saver.slack
    assert (
        metric(
            registry, "checkpoint_janitor_saver_failures_total", saver=saver.name, operation="trim"
        )
        == 0
    )
    conn.close()


# ------------------------------------------------------------------ expiry racing a run


async def race_run(
    saver: BaseCheckpointSaver[Any], case: str, during: Callable[[], None] | None
) -> None:
    """Run `case` on thread "t" of `saver`; `during` runs while the racing node is blocked.

    "resume": a thread paused at `interrupt()` resumed with `Command(resume=...)`;
    "exit": a second turn with `durability="exit"` (nothing is saved before it ends).
    """
    mode = "ask" if case == "resume" else "plain"
    await race_graph(saver, Gate(open_=True), mode).ainvoke(
        {"messages": ["refund?"], "topic": {"name": "billing"}}, thread("t")
    )
    gate = Gate()
    app = race_graph(saver, gate, mode)
    if mode == "ask":
        run = app.ainvoke(Command(resume="yes"), thread("t"))
    else:
        run = app.ainvoke({"messages": ["again"]}, thread("t"), durability="exit")
    task = asyncio.create_task(run)
    await gate.entered.wait()
    if during is not None:
        during()
    gate.go.set()
    await task


async def race_state(saver: BaseCheckpointSaver[Any]) -> tuple[Any, Any]:
    """Thread "t"'s values and next tasks as the graph reads them through `saver`."""
    state = await race_graph(saver, Gate(), "plain").aget_state(thread("t"))
    return state.values, state.next


@pytest.mark.parametrize("case", ["resume", "exit"])
@pytest.mark.parametrize("kind", SAVERS)
async def test_expiry_never_hits_a_run_in_flight(
    kind: str, case: str, request: pytest.FixtureRequest
) -> None:
    """The thread's idle time crosses `expire_after` while a node runs: the put that ends
    the node continues the thread it read (named by its parent checkpoint), so it never
    expires it; the state equals the same run on an untouched saver, `topic` included."""
    untouched = InMemorySaver()
    await race_run(untouched, case, None)
    control = await race_state(untouched)
    assert control[0]["topic"] == {"name": "billing"} and len(control[0]["messages"]) >= 2
    async with open_saver(kind, request) as inner:
        clock = Clock()
        saver, registry = wrap(inner, expire_after="30d", interrupted="expire", clock=clock)

        def idle_31_days() -> None:
            clock.offset += 31 * DAY

        await race_run(saver, case, idle_31_days)
        assert await race_state(inner) == control
        # The wrapper's clock runs 31 days ahead of the ids minted meanwhile: back to real
        # time, the thread reads as the control does.
        clock.offset = 0.0
        assert await race_state(saver) == control
        assert (
            metric(
                registry,
                "checkpoint_janitor_saver_deleted_total",
                saver=saver.name,
                kind="threads",
                reason="expired",
            )
            == 0
        )
