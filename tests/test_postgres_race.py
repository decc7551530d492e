"""The worker's expiry racing a run in flight on Postgres (issue 9, defect 4).

A run reads its thread, then saves nothing until its node ends; the worker's
`once` expires the thread meanwhile. The node blocks on an `asyncio.Event`
and the sweep runs exactly inside that window (the CLI in a worker thread, so
the run's connection stays served). Afterwards the thread must read through
the real `AsyncPostgresSaver` as the same run left an untouched copy of the
database (every channel: the step that ends the node writes blobs only for
the channels it changed), or be gone whole.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.pg_scenarios import (
    Databases,
    all_keys,
    blob_keys,
    cli,
    connect,
    fork_graph,
    orphans,
    pg_saver,
    run_pg_sweep,
    write_config,
)
from helpers.pgserver import PgServer
from helpers.scenarios import DAY, Gate, race_graph
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.types import Command

from worker.service.demo import aged, thread

pytestmark = pytest.mark.slow

EXPIRE = "  - {name: idle, expire_after: 30d, interrupted: expire}"
HOUR = 3600.0


@pytest.fixture
def dbs(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[Databases]:
    d = Databases(pg_server, request.node.name)
    yield d
    d.drop_all()


FIRST_INPUT = {"messages": ["refund?"], "topic": {"name": "billing"}}


async def stopped_thread(dsn: str, case: str) -> None:
    """Thread "t", 40 days old, waiting: at `interrupt()` ("resume") or after an error ("retry")."""
    with aged(40):
        async with pg_saver(dsn) as saver:
            if case == "resume":
                await race_graph(saver, Gate(open_=True), "ask").ainvoke(FIRST_INPUT, thread("t"))
            else:
                with pytest.raises(RuntimeError, match="tool crashed"):
                    await race_graph(saver, Gate(fail=True)).ainvoke(FIRST_INPUT, thread("t"))
            state = await race_graph(saver, Gate()).aget_state(thread("t"))
            assert state.next == ("slow",)


async def continue_thread(dsn: str, case: str, during: Any = None) -> None:
    """Resume ("resume": `Command(resume=...)`) or retry ("retry": `invoke(None)`) thread "t";
    `during()` is awaited while its node is blocked, before anything of the run is saved."""
    gate = Gate(open_=during is None)
    async with pg_saver(dsn) as saver:
        app = race_graph(saver, gate, "ask" if case == "resume" else "plain")
        run = asyncio.create_task(
            app.ainvoke(Command(resume="yes") if case == "resume" else None, thread("t"))
        )
        await gate.entered.wait()
        if during is not None:
            await during()
        gate.go.set()
        await run


async def state_of(dsn: str) -> tuple[Any, Any]:
    """Thread "t"'s values and next nodes, as the graph reads them through the real saver."""
    async with pg_saver(dsn) as saver:
        state = await race_graph(saver, Gate()).aget_state(thread("t"))
    return state.values, state.next


def expire_with_once(cfg: Path) -> Any:
    """`once` expiring "t" (the only thread, so the safety limit is lifted)."""

    async def run() -> None:
        r = await asyncio.to_thread(cli, "once", "--allow-mass-expiry", config=cfg)
        assert r.returncode == 0, r.stderr
        events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
        assert any(e["event"] == "thread_expired" and e["thread_id"] == "t" for e in events)

    return run


@pytest.mark.parametrize("case", ["resume", "retry"])
async def test_expiry_during_a_run_leaves_the_thread_whole(
    tmp_path: Path, dbs: Databases, case: str
) -> None:
    """`once` expires a waiting thread while a resume (or an error retry) runs its node: the
    run then saves onto the expired thread and recreates it whole (the blobs it references
    outlive the expiry); its state equals the same run on an untouched copy, `topic`
    included. Later sweeps collect the old history's blobs, and the state stays equal."""
    dsn = dbs.create()
    await stopped_thread(dsn, case)
    untouched = dbs.clone(dsn)
    await continue_thread(untouched, case)
    expected = await state_of(untouched)
    assert expected[0]["topic"] == {"name": "billing"} and expected[1] == ()

    cfg = write_config(tmp_path / "janitor.yaml", dsn, EXPIRE)
    await continue_thread(dsn, case, during=expire_with_once(cfg))
    assert await state_of(dsn) == expected

    # Sweeps past the grace period: the thread came back, so its tool row goes and the
    # old history's blobs are collected by the quiet-thread GC; the state stays whole.
    for later in (2 * HOUR, 29 * DAY):
        report = await run_pg_sweep(dsn, EXPIRE, now=time.time() + later)
        assert report.error is None
        assert await state_of(dsn) == expected
    assert await orphans(dsn) == {
        "unreferenced_blobs": [],
        "orphan_writes": [],
        "missing_parents": [],
    }
    async with connect(dsn) as conn:
        assert await conn.fetchval("SELECT count(*) FROM checkpoint_janitor_expired") == 0


async def test_expired_thread_blobs_go_after_the_grace_period(
    tmp_path: Path, dbs: Databases
) -> None:
    """An expiry deletes checkpoints and writes at once and dates the thread in
    `checkpoint_janitor_expired`; its blobs go with the first sweep past the grace period
    (planned as such), then nothing of the thread is left."""
    dsn = dbs.create()
    await stopped_thread(dsn, "resume")
    blobs = {k for k in await blob_keys(dsn) if k[0] == "t"}
    assert blobs
    now = time.time()
    report = await run_pg_sweep(dsn, EXPIRE, now=now, allow_mass_expiry=True)
    assert report.deleted.threads == 1 and report.deleted.blobs == 0
    assert await all_keys(dsn) == []
    assert {k for k in await blob_keys(dsn) if k[0] == "t"} == blobs
    async with connect(dsn) as conn:
        expired_at = await conn.fetchval(
            "SELECT extract(epoch FROM expired_at) FROM checkpoint_janitor_expired "
            "WHERE thread_id = 't'"
        )
    assert abs(float(expired_at) - now) < 1

    inside = await run_pg_sweep(dsn, EXPIRE, now=now + HOUR - 60)
    assert inside.deleted.blobs == 0 and await blob_keys(dsn) == blobs
    planned = await run_pg_sweep(dsn, EXPIRE, now=now + HOUR + 60, dry_run=True)
    assert planned.deleted.blobs == len(blobs) and await blob_keys(dsn) == blobs
    past = await run_pg_sweep(dsn, EXPIRE, now=now + HOUR + 60)
    assert past.deleted.blobs == len(blobs)
    assert await blob_keys(dsn) == set()
    async with connect(dsn) as conn:
        assert await conn.fetchval("SELECT count(*) FROM checkpoint_janitor_expired") == 0


@pytest.mark.parametrize("by", ["thread", "prefix"])
async def test_purge_reaches_an_expired_thread_whose_blobs_wait(
    tmp_path: Path, dbs: Databases, by: str
) -> None:
    """An erasure request must not wait out the grace period: `purge` names an
    expired thread that holds only blobs, counts them, and deletes them and its
    `checkpoint_janitor_expired` row at once."""
    dsn = dbs.create()
    await stopped_thread(dsn, "resume")
    await run_pg_sweep(dsn, EXPIRE, now=time.time(), allow_mass_expiry=True)
    assert await all_keys(dsn) == [] and {k[0] for k in await blob_keys(dsn)} == {"t"}
    cfg = write_config(tmp_path / "janitor.yaml", dsn, EXPIRE)
    named = ["--thread", "t"] if by == "thread" else ["--thread-prefix", "t"]
    r = await asyncio.to_thread(cli, "purge", *named, "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    assert "deleted 1 threads" in r.stdout, r.stdout
    assert await blob_keys(dsn) == set()
    async with connect(dsn) as conn:
        assert await conn.fetchval("SELECT count(*) FROM checkpoint_janitor_expired") == 0
    events = map(json.loads, r.stderr.splitlines())
    purged = [e for e in events if e.get("event") == "thread_purged"]
    assert [e["thread_id"] for e in purged] == ["t"]


# ------------------------------------------------------------------ a fork racing a trim

TRIMS = {
    "aggregate": "  - {name: trim, keep_last: 2}",
    "rows": "  - {name: trim, when_idle: {after: 1h, keep_last: 2}}",
}
"""The same trim decided from aggregates (set-based ranges) and from rows (by ids)."""


class PausedPutSaver(AsyncPostgresSaver):
    """The real saver whose `aput` first waits on `gate`: `aupdate_state` has read its base
    (`aget_tuple`) and built the fork when it blocks, and writes it when `gate.go` is set."""

    gate = Gate(open_=True)

    async def aput(self, *args: Any, **kwargs: Any) -> Any:
        await self.gate.wait()
        return await super().aput(*args, **kwargs)


async def fork_from_old(dsn: str, gate: Gate, during: Any = None) -> Any:
    """`aupdate_state` thread "t" from its oldest finished turn B with a note (so the fork
    names B's `messages` blob version); `during()` runs between its read of B and its write.
    Returns the fork's state read back through the real saver."""
    async with PausedPutSaver.from_conn_string(dsn) as saver:
        saver.gate = gate
        app = fork_graph(saver)
        history = [s async for s in app.aget_state_history(thread("t"))]
        base = [s for s in history if s.values.get("messages") and not s.next][-1]
        update = asyncio.create_task(
            app.aupdate_state(base.config, {"notes": ["fork of t"]}, as_node="reply")
        )
        await gate.entered.wait()
        if during is not None:
            await during()
        gate.go.set()
        state = await app.aget_state(await update)
    return state.values, state.next


@pytest.mark.parametrize("path", sorted(TRIMS))
async def test_fork_across_a_trim_keeps_its_base_blobs(dbs: Databases, path: str) -> None:
    """Issue 9's first promise: a fork that read its base B before a sweep trimmed B (and
    collected, in the same batch, the `messages` blob version only B referenced) and writes
    after that sweep commits must read back whole, as the same fork on an untouched copy.
    The trim dates the thread, so its unreferenced blobs wait out the grace period; the
    first sweep past it collects them, and the fork still reads back whole."""
    dsn = dbs.create()
    with aged(1):
        async with pg_saver(dsn) as saver:
            for i in range(4):
                await fork_graph(saver).ainvoke({"messages": [f"turn {i}"]}, thread("t"))
    untouched = dbs.clone(dsn)
    expected = await fork_from_old(untouched, Gate(open_=True))
    assert expected[0]["messages"] and expected[0]["notes"] == ["fork of t"]

    async def trim() -> None:
        report = await run_pg_sweep(dsn, TRIMS[path])
        assert report.error is None and report.deleted.checkpoints > 0

    assert await fork_from_old(dsn, Gate(), during=trim) == expected

    # Within the grace period after a trim nothing the fork names goes; past it, the
    # history's unreferenced blobs do (the fork's dangling parent is nulled too). The fork
    # makes three checkpoints, so one more trim (now, or idle after 1h) restarts the wait.
    for later in (0.0, 2 * HOUR, 4 * HOUR):
        report = await run_pg_sweep(dsn, TRIMS[path], now=time.time() + later)
        assert report.error is None
        async with pg_saver(dsn) as saver:
            state = await fork_graph(saver).aget_state(thread("t"))
        assert (state.values, state.next) == expected
    assert await orphans(dsn) == {
        "unreferenced_blobs": [],
        "orphan_writes": [],
        "missing_parents": [],
    }
