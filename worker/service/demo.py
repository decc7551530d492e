"""`checkpoint-janitor demo`: a store of real LangGraph threads to sweep.

The graphs are small but real: each turn goes through LangGraph's own
checkpointing into an `AsyncSqliteSaver`, so the rows look exactly like an
application's (a multi-step chat, a subgraph call, a thread paused at
`interrupt()`). Some threads are written as if weeks ago (`aged`), so that
the example policies have history to trim and idle threads to expire.
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import Iterator
from typing import Annotated, Any, TypedDict

import langgraph.checkpoint.base.id as lg_id
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt


class ChatState(TypedDict):
    """A conversation: every turn appends messages."""

    messages: Annotated[list[str], operator.add]


def _reply(state: ChatState) -> dict[str, Any]:
    return {"messages": [f"reply to {state['messages'][-1]}"]}


def _summarize(state: ChatState) -> dict[str, Any]:
    return {"messages": [f"summary of {len(state['messages'])} messages"]}


def _ask_human(state: ChatState) -> dict[str, Any]:
    answer = interrupt("approve?")
    return {"messages": [f"human said {answer}"]}


def chat_graph(checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """START -> reply -> END: three checkpoints a turn."""
    g = StateGraph(ChatState)
    g.add_node("reply", _reply)
    g.add_edge(START, "reply")
    g.add_edge("reply", END)
    return g.compile(checkpointer=checkpointer)


def subgraph_graph(checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """A root graph calling subgraph `inner` (namespace `inner:<task id>`) each turn."""
    inner = StateGraph(ChatState)
    inner.add_node("summarize", _summarize)
    inner.add_edge(START, "summarize")
    g = StateGraph(ChatState)
    g.add_node("inner", inner.compile())
    g.add_edge(START, "inner")
    return g.compile(checkpointer=checkpointer)


def approval_graph(checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """A reply, then a pause at `interrupt()` until a human answers."""
    g = StateGraph(ChatState)
    g.add_node("reply", _reply)
    g.add_node("ask", _ask_human)
    g.add_edge(START, "reply")
    g.add_edge("reply", "ask")
    return g.compile(checkpointer=checkpointer)


@contextlib.contextmanager
def aged(days: float) -> Iterator[None]:
    """Checkpoints LangGraph mints inside are dated `days` ago.

    A checkpoint's age is its UUIDv6 id's time, minted from `time.time_ns()`
    in `langgraph.checkpoint.base.id`; only that clock is shifted. LangGraph
    keeps ids monotonic within a process (`_last_v6_timestamp`), so the guard
    is reset on the way in and out: write old threads before new ones.
    """
    shift = int(days * 86400 * 1e9)

    class _Clock:
        @staticmethod
        def time_ns() -> int:
            return time.time_ns() - shift

    real = vars(lg_id)["time"]
    setattr(lg_id, "time", _Clock)  # noqa: B010 - the module re-exports no `time`
    lg_id._last_v6_timestamp = None
    try:
        yield
    finally:
        setattr(lg_id, "time", real)  # noqa: B010
        lg_id._last_v6_timestamp = None


def thread(thread_id: str, **configurable: Any) -> dict[str, Any]:
    """A run config for `thread_id`."""
    return {"configurable": {"thread_id": thread_id, **configurable}}


def _chat_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


DEMO_THREADS = (
    *_chat_ids("user-idle-", 4),
    "vip-1",
    "conv-waiting",
    *_chat_ids("user-busy-", 4),
    "org-1:user-2:session-3",
    *_chat_ids("user-new-", 4),
)
"""Every thread `run_demo` writes."""


async def run_demo(path: str) -> None:
    """Write the demo threads into the SQLite store at `path` (created if missing).

    Shaped for `config.example.yaml`: chats idle for 40 days (expired),
    10-day-old chats with long histories (trimmed), a VIP thread (protected),
    a conversation waiting for a human (kept), tenant sessions with subgraph
    calls, and fresh chats (untouched).

    The demo threads left by an earlier run are deleted first, so every run
    starts from the same store: new turns on a surviving thread would add to
    its state (the subgraph thread's messages double with every turn).
    """
    async with AsyncSqliteSaver.from_conn_string(path) as saver:
        await saver.setup()  # a new file has no tables to delete from yet
        for thread_id in DEMO_THREADS:
            await saver.adelete_thread(thread_id)
        chat = chat_graph(saver)
        sub = subgraph_graph(saver)

        async def chats(prefix: str, n: int, turns: int) -> None:
            for i in range(n):
                for turn in range(turns):
                    await chat.ainvoke(
                        {"messages": [f"turn {turn}"]},
                        thread(f"{prefix}{i}", assistant_id="support-bot", user_id=f"u{i}"),
                    )

        with aged(40):
            await chats("user-idle-", 4, 3)
            for turn in range(3):
                await chat.ainvoke({"messages": [f"turn {turn}"]}, thread("vip-1"))
            await approval_graph(saver).ainvoke(
                {"messages": ["please refund"]}, thread("conv-waiting")
            )
        with aged(10):
            await chats("user-busy-", 4, 12)
            for turn in range(6):
                await sub.ainvoke({"messages": [f"turn {turn}"]}, thread("org-1:user-2:session-3"))
        await chats("user-new-", 4, 2)
