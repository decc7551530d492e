"""Proof that the test plumbing gives a real, authenticated, restartable PostgreSQL."""

from __future__ import annotations

import operator
from typing import Annotated, TypedDict

import asyncpg
import pytest
from helpers.pgserver import PgServer
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph


async def test_select_one(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval("select current_database()") == pg_dsn.rsplit("/", 1)[1]
    finally:
        await conn.close()


def test_listens_only_on_loopback_with_scram(pg_server: PgServer) -> None:
    assert pg_server.host == "127.0.0.1"
    assert pg_server.psql("show listen_addresses").strip() == "127.0.0.1"
    assert pg_server.psql("show port").strip() == str(pg_server.port)
    assert pg_server.psql("show fsync").strip() == "off"
    rules = pg_server.psql("select type, auth_method from pg_hba_file_rules").split()
    assert "host|scram-sha-256" in rules
    assert not any(r.startswith("host|") and not r.endswith("scram-sha-256") for r in rules)


class _State(TypedDict):
    steps: Annotated[list[str], operator.add]


def _graph() -> StateGraph[_State]:
    builder: StateGraph[_State] = StateGraph(_State)
    builder.add_node("a", lambda s: {"steps": ["a"]})
    builder.add_node("b", lambda s: {"steps": ["b"]})
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", END)
    return builder


async def test_real_async_postgres_saver_roundtrip(pg_dsn: str) -> None:
    config: RunnableConfig = {"configurable": {"thread_id": "thread-1"}}
    async with AsyncPostgresSaver.from_conn_string(pg_dsn) as saver:
        await saver.setup()
        app = _graph().compile(checkpointer=saver)
        result = await app.ainvoke({"steps": ["start"]}, config)
        assert result == {"steps": ["start", "a", "b"]}
        state = await app.aget_state(config)
        assert state.values == {"steps": ["start", "a", "b"]}
        assert state.next == ()

    # A new saver on a new connection reads the same checkpoint back from the server.
    async with AsyncPostgresSaver.from_conn_string(pg_dsn) as saver:
        saved = await saver.aget_tuple(config)
        assert saved is not None
        assert saved.checkpoint["channel_values"]["steps"] == ["start", "a", "b"]
        history = [c async for c in saver.alist(config)]
        assert len(history) == 4  # input, a, b, plus the initial empty checkpoint

    conn = await asyncpg.connect(pg_dsn)
    try:
        count = await conn.fetchval(
            "select count(*) from checkpoints where thread_id = $1", "thread-1"
        )
        assert count == 4
    finally:
        await conn.close()


async def test_wrong_password_is_rejected(pg_server: PgServer, pg_dsn: str) -> None:
    dbname = pg_dsn.rsplit("/", 1)[1]
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(
            host=pg_server.host,
            port=pg_server.port,
            user="postgres",
            password="definitely-not-" + pg_server.password,
            database=dbname,
        )
    conn = await asyncpg.connect(
        host=pg_server.host,
        port=pg_server.port,
        user="postgres",
        password=pg_server.password,
        database=dbname,
    )
    await conn.close()


async def test_stop_and_start_keep_data_and_port(pg_server: PgServer, pg_dsn: str) -> None:
    port, data_dir = pg_server.port, pg_server.data_dir
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("create table kept (v text); insert into kept values ('still here')")
    await conn.close()

    pg_server.stop()
    assert not pg_server.is_running()
    with pytest.raises(OSError):
        await asyncpg.connect(pg_dsn, timeout=5)

    pg_server.start()
    assert pg_server.is_running()
    assert (pg_server.port, pg_server.data_dir) == (port, data_dir)
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("select v from kept") == "still here"
    finally:
        await conn.close()

    pg_server.restart()
    assert pg_server.is_running()
    assert pg_server.port == port
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("select count(*) from kept") == 1
    finally:
        await conn.close()


async def test_databases_have_the_collation_asked_for(pg_dsn: str, pg_collation: str) -> None:
    """ICU folds case at the first level ('a' < 'B'); C compares bytes ('B' < 'a')."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT 'a' < 'B'") is (pg_collation == "icu")
    finally:
        await conn.close()
