"""Real LangGraph threads of every shape the worker must handle, and ways to compare them.

Every store here is written by running real graphs through a real saver.
Old threads are written under a shifted id clock (`worker.service.demo.aged`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import operator
import os
import pty
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, Send, interrupt

from worker.service.demo import ChatState, aged, approval_graph, chat_graph, subgraph_graph, thread

DAY = 86400.0


# ------------------------------------------------------------------ graphs


def breakpoint_graph(checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """A chat graph with a static `interrupt_before` breakpoint (no `__interrupt__` write)."""
    g = StateGraph(ChatState)
    g.add_node("reply", lambda s: {"messages": ["reply"]})
    g.add_node("review", lambda s: {"messages": ["reviewed"]})
    g.add_edge(START, "reply")
    g.add_edge("reply", "review")
    g.add_edge("review", END)
    return g.compile(checkpointer=checkpointer, interrupt_before=["review"])


def deferred_graph(checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """Two branches joined by a deferred node `d`, with a static breakpoint before it.

    `d` becomes due when the last branch ends, by a channel version bump
    without any write naming it: the paused head has no writes, and its
    parent's writes name no trigger, exactly as a finished run's. Only the
    checkpoint blob shows the pending task.
    """
    g = StateGraph(ChatState)
    for node in ("a", "b", "c", "c2"):
        g.add_node(node, lambda s, node=node: {"messages": [node]})
    g.add_node("d", lambda s: {"messages": ["joined"]}, defer=True)
    g.add_edge(START, "a")
    g.add_edge("a", "b")
    g.add_edge("a", "c")
    g.add_edge("c", "c2")
    g.add_edge("b", "d")
    g.add_edge("c2", END)
    g.add_edge("d", END)
    return g.compile(checkpointer=checkpointer, interrupt_before=["d"])


def persistent_subgraph_graph(checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """A `checkpointer=True` subgraph: its namespace `memory` outlives each call."""
    inner = StateGraph(ChatState)
    inner.add_node("note", lambda s: {"messages": [f"noted {len(s['messages'])}"]})
    inner.add_edge(START, "note")
    g = StateGraph(ChatState)
    g.add_node("memory", inner.compile(checkpointer=True))
    g.add_edge(START, "memory")
    return g.compile(checkpointer=checkpointer)


def _fan_out(state: ChatState) -> list[Send]:
    return [Send("worker", {"messages": [f"job {i}"]}) for i in range(3)]


def send_graph(checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """`Send` fan-out: pending sends live in `__pregel_tasks`."""
    g = StateGraph(ChatState)
    g.add_node("worker", lambda s: {"messages": [f"done {s['messages'][-1]}"]})
    g.add_conditional_edges(START, _fan_out)
    return g.compile(checkpointer=checkpointer)


def _concat(state: list[str], batches: Sequence[Any]) -> list[str]:
    out = list(state)
    for b in batches:
        out.extend(b if isinstance(b, list) else [b])
    return out


class DeltaState(TypedDict):
    """A history kept as a DeltaChannel: checkpoints hold deltas, snapshots every 3 updates."""

    items: Annotated[list[str], DeltaChannel(_concat, snapshot_frequency=3)]


def delta_graph(checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """One node appending to a DeltaChannel each turn."""
    g = StateGraph(DeltaState)
    g.add_node("step", lambda s: {"items": [f"item {len(s['items'])}"]})
    g.add_edge(START, "step")
    return g.compile(checkpointer=checkpointer)


class MemoState(TypedDict, total=False):
    """A `checkpointer=True` subgraph's state: notes kept as a DeltaChannel across calls."""

    messages: list[str]
    notes: Annotated[list[str], DeltaChannel(_concat, snapshot_frequency=3)]
    reply: str


class MemoOutput(TypedDict):
    """What the memo subgraph hands back: a reply, not its notes."""

    reply: str


class MemoParent(TypedDict, total=False):
    """The root graph around the memo subgraph."""

    messages: Annotated[list[str], operator.add]
    reply: str


def _note(state: MemoState) -> dict[str, Any]:
    notes = state.get("notes") or []
    last = state["messages"][-1]
    return {"notes": [f"note {len(notes)}: {last}"], "reply": f"{len(notes) + 1} notes, {last}"}


def delta_memory_graph(checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """A `checkpointer=True` subgraph `memo` whose notes are a DeltaChannel.

    Its checkpoints hold deltas between snapshots, so the one a replay loads
    needs its ancestors; its reply (the notes count) shows which one it loaded.
    """
    inner = StateGraph(MemoState, output_schema=MemoOutput)
    inner.add_node("note", _note)
    inner.add_edge(START, "note")
    g = StateGraph(MemoParent)
    g.add_node("memo", inner.compile(checkpointer=True))
    g.add_edge(START, "memo")
    return g.compile(checkpointer=checkpointer)


class Flaky:
    """A node that fails until told to succeed (a thread stopped by an error)."""

    fail = True

    def __call__(self, state: ChatState) -> dict[str, Any]:
        if Flaky.fail:
            raise RuntimeError("tool crashed")
        return {"messages": ["recovered"]}


def error_graph(checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """A reply, then a node that raises."""
    g = StateGraph(ChatState)
    g.add_node("reply", lambda s: {"messages": ["reply"]})
    g.add_node("tool", Flaky())
    g.add_edge(START, "reply")
    g.add_edge("reply", "tool")
    return g.compile(checkpointer=checkpointer)


class RaceState(TypedDict):
    """A chat and a channel only the first input sets: a step racing expiry must keep it."""

    messages: Annotated[list[str], operator.add]
    topic: dict[str, str]
    """Not a primitive: Postgres keeps it in a versioned blob, not inline in the checkpoint."""


class Gate:
    """What a racing node waits on: `entered` is set when it runs, then it waits for `go`.

    `fail`: the node raises instead (a thread stopped by an error, retried later).
    """

    def __init__(self, open_: bool = False, fail: bool = False) -> None:
        self.entered = asyncio.Event()
        self.go = asyncio.Event()
        self.fail = fail
        if open_:
            self.go.set()

    async def wait(self) -> None:
        self.entered.set()
        if self.fail:
            raise RuntimeError("tool crashed")
        await self.go.wait()


def race_graph(checkpointer: BaseCheckpointSaver[Any], gate: Gate, mode: str = "plain") -> Any:
    """START -> slow -> END; `slow` (an LLM call) blocks on `gate`, then appends to `messages`.

    `mode` "ask": `slow` first pauses at `interrupt()` (resumed with
    `Command(resume=...)`); "plain": it does not. The checkpoint `slow` ends
    with carries no new version of `topic`, so it needs the old one's blob.
    """

    async def slow(state: RaceState) -> dict[str, Any]:
        answer = interrupt("approve?") if mode == "ask" else None
        await gate.wait()
        return {"messages": [f"slow reply ({answer}) to {state['messages'][-1]}"]}

    g = StateGraph(RaceState)
    g.add_node("slow", slow)
    g.add_edge(START, "slow")
    return g.compile(checkpointer=checkpointer)


# ------------------------------------------------------------------ stores


async def turns(app: Any, thread_id: str, n: int, **configurable: Any) -> None:
    """Run `n` chat turns on `thread_id`."""
    for i in range(n):
        await app.ainvoke({"messages": [f"turn {i}"]}, thread(thread_id, **configurable))


OLD_DAYS = 60.0
"""How old the idle threads of `build_mixed_store` are."""


async def build_mixed_store(saver: BaseCheckpointSaver[Any]) -> dict[str, str]:
    """Every shape, some idle for `OLD_DAYS`, some fresh. Returns thread id -> shape."""
    shapes: dict[str, str] = {}
    chat = chat_graph(saver)
    with aged(OLD_DAYS):
        await turns(chat, "user-old-1", 4, assistant_id="support-bot")
        await turns(chat, "user-old-2", 3, assistant_id="sales-bot")
        await turns(chat, "vip-old", 3)
        await turns(chat, "org-1:user-2:session-3", 3)
        await turns(subgraph_graph(saver), "sub-old", 2)
        await approval_graph(saver).ainvoke({"messages": ["refund?"]}, thread("int-old"))
        await breakpoint_graph(saver).ainvoke({"messages": ["hi"]}, thread("brk-old"))
        await turns(delta_graph(saver), "delta-old", 4)
        Flaky.fail = True
        with contextlib.suppress(RuntimeError):
            await error_graph(saver).ainvoke({"messages": ["go"]}, thread("err-old"))
    shapes.update(
        {
            "user-old-1": "chat",
            "user-old-2": "chat",
            "vip-old": "chat",
            "org-1:user-2:session-3": "chat",
            "sub-old": "subgraph",
            "int-old": "interrupt",
            "brk-old": "breakpoint",
            "delta-old": "delta",
            "err-old": "error",
        }
    )
    await turns(chat, "user-new-1", 6, assistant_id="support-bot")
    await turns(chat, "org-1:user-2:session-4", 4)
    await turns(chat, "org-1:user-20:session-1", 2)
    await turns(subgraph_graph(saver), "sub-new", 3)
    await turns(persistent_subgraph_graph(saver), "subp-new", 3)
    await turns(send_graph(saver), "send-new", 2)
    await turns(delta_graph(saver), "delta-new", 8)
    await approval_graph(saver).ainvoke({"messages": ["refund?"]}, thread("int-new"))
    await breakpoint_graph(saver).ainvoke({"messages": ["hi"]}, thread("brk-new"))
    shapes.update(
        {
            "user-new-1": "chat",
            "org-1:user-2:session-4": "chat",
            "org-1:user-20:session-1": "chat",
            "sub-new": "subgraph",
            "subp-new": "persistent-subgraph",
            "send-new": "send",
            "delta-new": "delta",
            "int-new": "interrupt",
            "brk-new": "breakpoint",
        }
    )
    return shapes


async def time_travel(app: Any, thread_id: str) -> None:
    """Branch a thread twice: replay the turn before the last from its step 0 (LangGraph
    saves a "fork" checkpoint), then `update_state` the first turn's step 0 (an "update")."""
    history = [h async for h in app.aget_state_history(thread(thread_id))]
    # Step-0 checkpoints of each turn (the subgraph still to run), newest first.
    starts = [h for h in history if h.metadata["source"] == "loop" and h.next]
    await app.ainvoke(None, starts[1].config)
    await app.aupdate_state(starts[-1].config, {"messages": ["edited"]}, as_node="__start__")


async def build_replay_store(saver: BaseCheckpointSaver[Any]) -> dict[str, str]:
    """Persistent (`checkpointer=True`) subgraphs, plain and DeltaChannel, with and without
    forks. Returns thread id -> shape."""
    await turns(persistent_subgraph_graph(saver), "subp", 3)
    await turns(persistent_subgraph_graph(saver), "subp-fork", 3)
    await time_travel(persistent_subgraph_graph(saver), "subp-fork")
    await turns(delta_memory_graph(saver), "subd", 5)
    await turns(delta_memory_graph(saver), "subd-fork", 5)
    await time_travel(delta_memory_graph(saver), "subd-fork")
    return {
        "subp": "persistent-subgraph",
        "subp-fork": "persistent-subgraph",
        "subd": "persistent-delta",
        "subd-fork": "persistent-delta",
    }


async def replay(
    saver: BaseCheckpointSaver[Any], shape: str, thread_id: str, checkpoint_id: str
) -> tuple[Any, Any]:
    """Time travel to a root checkpoint: `invoke(None)` from it. Returns the run's output
    and the thread's state after it (values and next)."""
    app = app_for(saver, shape)
    out = await app.ainvoke(None, thread(thread_id, checkpoint_id=checkpoint_id))
    s = await app.aget_state(thread(thread_id), subgraphs=True)
    return out, (s.values, s.next)


def root_ids(keys: Sequence[tuple[str, str, str]]) -> dict[str, list[str]]:
    """Thread -> its root checkpoint ids, oldest first, from (thread, namespace, id) keys."""
    out: dict[str, list[str]] = {}
    for tid, ns, cid in sorted(keys):
        if ns == "":
            out.setdefault(tid, []).append(cid)
    return out


async def resume(saver: BaseCheckpointSaver[Any], thread_id: str, shape: str) -> Any:
    """Finish a waiting thread; returns its final state values."""
    if shape == "interrupt":
        app = approval_graph(saver)
        out = await app.ainvoke(Command(resume="yes"), thread(thread_id))
    elif shape == "breakpoint":
        app = breakpoint_graph(saver)
        out = await app.ainvoke(None, thread(thread_id))
    elif shape == "error":
        Flaky.fail = False
        app = error_graph(saver)
        out = await app.ainvoke(None, thread(thread_id))
    elif shape == "deferred":
        out = await deferred_graph(saver).ainvoke(None, thread(thread_id))
    else:
        raise ValueError(shape)
    return out


def app_for(saver: BaseCheckpointSaver[Any], shape: str) -> Any:
    """A compiled graph of `shape`, for reading state (`aget_state`)."""
    return {
        "chat": chat_graph,
        "subgraph": subgraph_graph,
        "persistent-subgraph": persistent_subgraph_graph,
        "persistent-delta": delta_memory_graph,
        "send": send_graph,
        "delta": delta_graph,
        "interrupt": approval_graph,
        "breakpoint": breakpoint_graph,
        "error": error_graph,
        "deferred": deferred_graph,
    }[shape](saver)


# ------------------------------------------------------------------ comparing


async def read_all(
    saver: BaseCheckpointSaver[Any], keys: Sequence[tuple[str, str, str]]
) -> dict[tuple[str, str, str], Any]:
    """(checkpoint, metadata, pending writes) of each (thread, namespace, id) that exists."""
    out: dict[tuple[str, str, str], Any] = {}
    for tid, ns, cid in keys:
        t = await saver.aget_tuple(
            {"configurable": {"thread_id": tid, "checkpoint_ns": ns, "checkpoint_id": cid}}
        )
        if t is not None:
            out[(tid, ns, cid)] = (t.checkpoint, t.metadata, t.pending_writes)
    return out


async def states(saver: BaseCheckpointSaver[Any], shapes: dict[str, str]) -> dict[str, Any]:
    """Each thread head's graph state: values, next, tasks' interrupts."""
    out = {}
    for tid, shape in shapes.items():
        s = await app_for(saver, shape).aget_state(thread(tid), subgraphs=True)
        out[tid] = (s.values, s.next, [t.interrupts for t in s.tasks])
    return out


# ------------------------------------------------------------------ bulk


REPLICATE_CHECKPOINTS_SQL = """
INSERT INTO checkpoints
SELECT ? || thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, type,
       checkpoint, metadata
FROM checkpoints WHERE thread_id = ?
"""
REPLICATE_WRITES_SQL = """
INSERT INTO writes
SELECT ? || thread_id, checkpoint_ns, checkpoint_id, task_id, task_path, idx, channel, type, value
FROM writes WHERE thread_id = ?
"""


def replicate(path: str, template: str, prefixes: Sequence[str]) -> None:
    """Copy thread `template`'s real rows under `prefix + template` for each prefix.

    A fast way to a large store whose every row was written by the real saver.
    """
    import sqlite3

    with sqlite3.connect(path) as con:
        for prefix in prefixes:
            con.execute(REPLICATE_CHECKPOINTS_SQL, (prefix, template))
            con.execute(REPLICATE_WRITES_SQL, (prefix, template))


# ------------------------------------------------------------------ command line


def cli(
    *args: str,
    config: Path | None = None,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    runner: Sequence[str] = (),
    terminal: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`python -m worker [--config X] ARGS`, run to completion from the repo root.

    `runner` prefixes the command, e.g. `setpriv` to run it as another user.
    `terminal`: stdin is a pseudo-terminal holding `input` (a person at the
    keyboard), not a pipe.
    """
    cmd = [*runner, sys.executable, "-m", "worker"]
    if config is not None:
        cmd += ["--config", str(config)]
    run = functools.partial(
        subprocess.run,
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).parents[2],
    )
    if not terminal:
        return run(input=input)
    leader, follower = pty.openpty()
    try:
        # The line discipline holds what is typed until the command reads it.
        os.write(leader, (input or "").encode())
        return run(stdin=follower)
    finally:
        os.close(follower)
        os.close(leader)


# A `once` whose batches wait, after a step of their archive, until a file exists:
# the test kills it there. The wait is in the test's own wrapper, not in the tool.
# argv: the `Segment` step (`seal`: before the COMMIT; `complete`: after it, before the
# rename), the gate file, the config.
PAUSED_ONCE = """
import os, sys, time
from worker.stores import archive
step, gate = sys.argv[1], sys.argv[2]
original = getattr(archive.Segment, step)
def paused(self):
    if step == "complete":
        while not os.path.exists(gate):
            time.sleep(0.01)
    original(self)
    if step == "seal":
        while not os.path.exists(gate):
            time.sleep(0.01)
setattr(archive.Segment, step, paused)
from worker.service.cli import main
main(["--config", sys.argv[3], "once"])
"""
