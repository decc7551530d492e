"""What loads without the `postgres` extra (issue 15 item 5), each case in a fresh interpreter.

- An application wrapping an `InMemorySaver` or a SQLite saver in `RetentionSaver`
  imports no Postgres driver, no HTTP server and no scheduler.
- With the extra's packages made unimportable (as on a SQLite-only install),
  `checkpoint-janitor demo` still fills, plans and sweeps its SQLite store, and a
  config naming a postgres store is refused as a config error (exit 2) that says
  which extra to install.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

NOT_FOR_AN_APP = (
    "asyncpg",
    "aiohttp",
    "apscheduler",
    "psycopg",
    "psycopg_pool",
    "langgraph.checkpoint.postgres",
    "worker.stores.postgres",
)
"""Modules an InMemorySaver or SQLite application must not load through the wrapper."""

# The same graph on a wrapped saver and on an untouched one: the wrapper must
# have trimmed (fewer checkpoints) and the state read back must be the same.
APP = """
import asyncio, json, sqlite3, sys
from typing import TypedDict

from langgraph.graph import END, START, StateGraph

from worker import RetentionSaver

class S(TypedDict):
    n: int

def step(s: S) -> S:
    return {"n": s["n"] + 1}

def graph(cp):
    g = StateGraph(S)
    g.add_node("step", step)
    g.add_edge(START, "step")
    g.add_edge("step", END)
    return g.compile(checkpointer=cp)

CONFIG = {"configurable": {"thread_id": "t"}}

def turns(saver):
    app = graph(saver)
    for i in range(6):
        app.invoke({"n": i}, CONFIG)
    return app.get_state(CONFIG).values, len(list(saver.list(CONFIG)))

async def aturns(saver):
    app = graph(saver)
    for i in range(6):
        await app.ainvoke({"n": i}, CONFIG)
    return (await app.aget_state(CONFIG)).values, len([c async for c in saver.alist(CONFIG)])

async def main(kind, tmp):
    if kind == "memory":
        from langgraph.checkpoint.memory import InMemorySaver
        wrapped = RetentionSaver(InMemorySaver(), keep_last=2, slack=0)
        out = turns(wrapped) + turns(InMemorySaver())
    elif kind == "sqlite":
        from langgraph.checkpoint.sqlite import SqliteSaver
        def saver(name):
            return SqliteSaver(sqlite3.connect(f"{tmp}/{name}.db", check_same_thread=False))
        out = turns(RetentionSaver(saver("a"), keep_last=2, slack=0)) + turns(saver("b"))
    else:
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
        async with AsyncSqliteSaver.from_conn_string(f"{tmp}/a.db") as a, \\
                AsyncSqliteSaver.from_conn_string(f"{tmp}/b.db") as b:
            out = await aturns(RetentionSaver(a, keep_last=2, slack=0)) + await aturns(b)
    forbidden = json.loads(sys.argv[3])
    loaded = sorted(
        m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden)
    )
    print(json.dumps({"loaded": loaded, "wrapped": out[:2], "untouched": out[2:]}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("kind", ["memory", "sqlite", "async_sqlite"])
def test_wrapper_loads_only_what_the_saver_needs(kind: str, tmp_path: Path) -> None:
    """A memory or SQLite application's wrapper trims, reads alike, and loads no Postgres."""
    done = subprocess.run(
        [sys.executable, "-c", APP, kind, str(tmp_path), json.dumps(NOT_FOR_AN_APP)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    (values, kept), (values_untouched, all_of_them) = out["wrapped"], out["untouched"]
    assert values == values_untouched == {"n": 6}
    assert kept < all_of_them


# As a SQLite-only install: the `postgres` extra's packages cannot be imported.
WITHOUT_POSTGRES = """
import sys

class Missing:
    EXTRA = ("asyncpg", "psycopg", "psycopg_pool", "langgraph.checkpoint.postgres")

    def find_spec(self, name, path=None, target=None):
        if any(name == e or name.startswith(e + ".") for e in self.EXTRA):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Missing())
sys.argv = ["checkpoint-janitor", *sys.argv[1:]]
from worker.service.cli import main
main()
"""


def _cli_without_postgres(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_POSTGRES, *args],
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=600,
    )


def test_demo_runs_without_the_postgres_extra(tmp_path: Path) -> None:
    """`demo` (fill, plan, sweep a SQLite store) needs no Postgres driver."""
    done = _cli_without_postgres(tmp_path, "--config", str(ROOT / "config.example.yaml"), "demo")
    assert done.returncode == 0, done.stderr
    assert "$ checkpoint-janitor once" in done.stdout
    assert (tmp_path / "checkpoints.db").exists()


def test_postgres_store_without_the_extra_is_a_config_error(tmp_path: Path) -> None:
    """A postgres store on a SQLite-only install: exit 2, the extra named, no password."""
    config = tmp_path / "pg.yaml"
    config.write_text(
        textwrap.dedent(
            """\
            stores:
              - name: pg
                kind: postgres
                dsn: postgresql://app:s3cret-pw@db.example/checkpoints
            policies:
              - name: recent
                keep_last: 5
            """
        )
    )
    done = _cli_without_postgres(tmp_path, "--config", str(config), "once")
    assert done.returncode == 2, done.stderr
    assert "install checkpoint-janitor[postgres]" in done.stderr
    assert "pg.yaml:4" in done.stderr
    assert "s3cret-pw" not in done.stderr + done.stdout
