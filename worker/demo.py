"""`checkpoint-janitor demo`: a store of real LangGraph threads to sweep.

The graphs are small but real: each turn goes through LangGraph's own
checkpointing into an `AsyncSqliteSaver`, so the rows look exactly like an
application's (a multi-step chat, a subgraph call, a thread paused at
`interrupt()`).
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

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


def thread(thread_id: str, **configurable: Any) -> dict[str, Any]:
    """A run config for `thread_id`."""
    return {"configurable": {"thread_id": thread_id, **configurable}}


async def run_demo(path: str, threads: int = 12, turns: int = 8) -> None:
    """Add demo threads to the SQLite store at `path` (created if missing)."""
    async with AsyncSqliteSaver.from_conn_string(path) as saver:
        chat = chat_graph(saver)
        for i in range(threads):
            for turn in range(turns):
                await chat.ainvoke(
                    {"messages": [f"turn {turn}"]},
                    thread(f"user-{i}", assistant_id="support-bot", user_id=f"u{i}"),
                )
        for turn in range(turns):
            await chat.ainvoke({"messages": [f"turn {turn}"]}, thread("vip-1"))
        sub = subgraph_graph(saver)
        for turn in range(turns):
            await sub.ainvoke({"messages": [f"turn {turn}"]}, thread("org-1:user-2:session-3"))
        approval = approval_graph(saver)
        await approval.ainvoke({"messages": ["please refund"]}, thread("conv-waiting"))
