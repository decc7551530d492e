"""Per-thread TTLs from metadata and LangSmith's `langgraph.json` TTL, on SQLite and Postgres.

Every store is written by real graphs through the real savers; TTLs reach the
metadata through the run's `configurable`, as an application sets them. What
a sweep leaves is read back through the real saver and compared with what was
there before (or with an identical copy swept under the translated policies).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.pg_scenarios import Databases, pg_saver
from helpers.pgserver import PgServer
from helpers.scenarios import DAY, cli, turns
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from prometheus_client import CollectorRegistry

from policies.config import Config, Policy
from policies.decide import expiry_seconds
from policies.langgraph import apply_langgraph_ttl, parse_langgraph_ttl
from policies.model import SkipReason, TtlFallbackReason
from worker import RetentionSaver
from worker.service.config_files import load_config, load_config_text
from worker.service.demo import aged, chat_graph, subgraph_graph, thread
from worker.service.langgraph_json import load_worker_config
from worker.service.metrics import Metrics
from worker.stores import make_engine
from worker.sweep import Outcome, SweepOptions, SweepReport, sweep

Row = tuple[Any, Any, Any]
PER_THREAD = """
  - name: per-thread
    match: {checkpoint_ns: ""}
    expire_after: {metadata_key: ttl_minutes, default: 30d}
"""


# ------------------------------------------------------------------ one store, either backend


class Store:
    """A store of one backend: a SQLite file or a Postgres database, and copies of it."""

    def __init__(
        self, backend: str, tmp: Path, request: pytest.FixtureRequest, collation: str = "c"
    ) -> None:
        self.backend = backend
        self.tmp = tmp
        self.dbs: Databases | None = None
        if backend == "sqlite":
            self.where = str(tmp / "store.db")
        else:
            server: PgServer = request.getfixturevalue("pg_server")
            self.dbs = Databases(server, request.node.name, collation)
            self.where = self.dbs.create()

    @contextlib.asynccontextmanager
    async def saver(self, where: str | None = None) -> AsyncIterator[BaseCheckpointSaver[Any]]:
        """The real saver on this store (or a copy of it)."""
        where = where or self.where
        if self.backend == "sqlite":
            async with AsyncSqliteSaver.from_conn_string(where) as s:
                yield s
        else:
            async with pg_saver(where) as s:
                yield s

    def copy(self) -> str:
        """An identical copy of the store, as it is now (no saver open on it)."""
        if self.dbs is not None:
            return self.dbs.clone(self.where)
        with sqlite3.connect(self.where) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        path = self.tmp / f"copy-{len(list(self.tmp.glob('copy-*')))}.db"
        shutil.copy(self.where, path)
        return str(path)

    def store_yaml(self, where: str | None = None) -> str:
        where = where or self.where
        if self.backend == "sqlite":
            return f"stores:\n  - name: s\n    kind: sqlite\n    path: {where}\n"
        return f"stores:\n  - name: s\n    kind: postgres\n    dsn: '{where}'\n"

    async def rows(self, where: str | None = None) -> dict[tuple[str, str, str], Row]:
        """Every checkpoint as the real saver reads it: checkpoint, metadata, pending writes."""
        async with self.saver(where) as s:
            return {
                (
                    t.config["configurable"]["thread_id"],
                    t.config["configurable"]["checkpoint_ns"],
                    t.config["configurable"]["checkpoint_id"],
                ): (t.checkpoint, t.metadata, t.pending_writes)
                for t in [tup async for tup in s.alist(None)]
            }

    def close(self) -> None:
        if self.dbs is not None:
            self.dbs.drop_all()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = Store(request.param, tmp_path, request)
    yield s
    s.close()


async def run(cfg: Config, now: float) -> SweepReport:
    """One sweep of store `s`, as `once` runs it."""
    settings = cfg.store_settings("s")
    engine = make_engine(cfg.store("s"), settings)
    await engine.open()
    try:
        options = SweepOptions(
            settings,
            max_delete_fraction=cfg.defaults.max_delete_fraction,
            max_bytes=cfg.store("s").max_bytes,
        )
        return await sweep(engine, cfg.policies_for("s"), options, now=now)
    finally:
        await engine.close()


def threads_of(rows: dict[tuple[str, str, str], Row]) -> set[str]:
    return {t for t, _, _ in rows}


# ------------------------------------------------------------------ per-thread TTL


TTL_THREADS: dict[str, tuple[float, Any]] = {
    # thread id: (days idle, ttl_minutes as the application passes it; None: not passed)
    "missing-old": (40, None),  # the 30d default applies: due
    "ttl-10d-old": (12, 14400),  # 10 days: due
    "ttl-60": (5, 60),  # an hour: due
    "ttl-10d": (5, "10d"),  # a duration string: not due
    "ttl-10d-str": (5, "14400"),  # minutes as a string: not due
    "missing": (5, None),  # default 30d: not due
    "invalid": (5, "soon"),  # default: not due, counted
    "zero": (5, 0),  # never "now": default, counted
    "negative": (5, -30),  # default, counted
}
DUE = {"missing-old", "ttl-10d-old", "ttl-60"}


async def build_ttl_store(store: Store) -> None:
    async with store.saver() as saver:
        app = chat_graph(saver)
        # Oldest first: LangGraph keeps checkpoint ids monotonic within a process.
        for tid, (days, ttl) in sorted(TTL_THREADS.items(), key=lambda kv: -kv[1][0]):
            configurable = {} if ttl is None else {"ttl_minutes": ttl}
            with aged(days):
                await turns(app, tid, 2, **configurable)


async def test_per_thread_ttl_from_configurable(store: Store) -> None:
    await build_ttl_store(store)
    before = await store.rows()
    # The run's configurable landed in the head's metadata, as the policy reads it.
    heads = {t: m for (t, ns, _), (_, m, _) in before.items() if ns == ""}
    assert heads["ttl-60"]["ttl_minutes"] == 60 and "ttl_minutes" not in heads["missing"]

    cfg = load_config_text(store.store_yaml() + "policies:" + PER_THREAD)
    report = await run(cfg, time.time())

    assert report.outcome is Outcome.SUCCESS
    after = await store.rows()
    assert threads_of(after) == set(TTL_THREADS) - DUE
    assert after == {k: v for k, v in before.items() if k[0] not in DUE}
    p = report.policies["per-thread"]
    assert p.deleted.threads == len(DUE)
    assert p.ttl_fallbacks == {
        TtlFallbackReason.MISSING: 2,
        TtlFallbackReason.INVALID: 1,
        TtlFallbackReason.NOT_POSITIVE: 2,
    }


async def test_per_thread_ttl_fallbacks_reach_metrics(store: Store, tmp_path: Path) -> None:
    await build_ttl_store(store)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(store.store_yaml() + "policies:" + PER_THREAD)
    done = cli("plan", "--format", "jsonl", config=cfg_path)
    assert done.returncode == 0, done.stderr
    (plan,) = [
        line for line in map(json.loads, done.stdout.splitlines()) if line["type"] == "store"
    ]
    (policy,) = plan["policies"]
    assert policy["ttl_fallbacks"] == {"missing": 2, "invalid": 1, "not-positive": 2}
    assert policy["threads"] == len(DUE)  # would go

    metrics = Metrics()
    cfg = load_config(cfg_path)
    metrics.record(await run(cfg, time.time()), ["per-thread"])
    for reason, n in (("missing", 2), ("invalid", 1), ("not-positive", 2)):
        labels = {"store": "s", "policy": "per-thread", "reason": reason}
        assert (
            metrics.registry.get_sample_value("checkpoint_janitor_ttl_fallbacks_total", labels) == n
        )


def test_expiry_seconds_reads_the_head_and_falls_back() -> None:
    policy = Policy.model_validate(
        {
            "name": "p",
            "expire_after": {"metadata_key": "ttl", "default": "2h", "unit": "hours"},
        }
    )
    assert expiry_seconds(policy, {"ttl": 3}) == (3 * 3600, None)
    assert expiry_seconds(policy, {"ttl": "90m"}) == (5400, None)
    assert expiry_seconds(policy, {"ttl": 0.5}) == (1800, None)
    for value, reason in [
        (None, TtlFallbackReason.MISSING),
        (True, TtlFallbackReason.INVALID),
        ("1.5x", TtlFallbackReason.INVALID),
        (float("nan"), TtlFallbackReason.INVALID),
        (["1"], TtlFallbackReason.INVALID),
        (0, TtlFallbackReason.NOT_POSITIVE),
        ("-1h", TtlFallbackReason.NOT_POSITIVE),
        ("0m", TtlFallbackReason.NOT_POSITIVE),
    ]:
        assert expiry_seconds(policy, {"ttl": value}) == (7200, reason), value
    assert expiry_seconds(policy, {}) == (7200, TtlFallbackReason.MISSING)
    assert policy.head_metadata_keys == {"ttl"}


async def test_saver_wrapper_honours_per_thread_ttl(tmp_path: Path) -> None:
    now = [time.time()]
    registry = CollectorRegistry()
    async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "app.db")) as inner:
        saver = RetentionSaver(
            inner,
            expire_after={"metadata_key": "ttl_minutes", "default": "1d"},
            registry=registry,
            clock=lambda: now[0],
        )
        app = chat_graph(saver)
        await turns(app, "short", 1, ttl_minutes=60)
        await turns(app, "long", 1, ttl_minutes="3d")
        await turns(app, "zero", 1, ttl_minutes=0)
        now[0] += 2 * 3600  # two hours on: only "short" (an hour) has expired
        assert await saver.aget_tuple(thread("short")) is None
        for tid in ("long", "zero"):
            assert await saver.aget_tuple(thread(tid)) is not None, tid
        now[0] += 2 * DAY  # two days on: "zero" fell back to the 1d default
        assert await saver.aget_tuple(thread("zero")) is None
        assert await saver.aget_tuple(thread("long")) is not None
        fallbacks = registry.get_sample_value(
            "checkpoint_janitor_saver_ttl_fallbacks_total",
            {"saver": "AsyncSqliteSaver", "reason": "not-positive"},
        )
        assert fallbacks is not None and fallbacks >= 1


# ------------------------------------------------------------------ langgraph.json


OLD = ("old-a", "old-b", "old-c")
FRESH = ("new-a", "new-b", "new-c", "new-d")  # so the safety limit lets 3 idle go


async def build_lg_store(store: Store) -> None:
    async with store.saver() as saver:
        chat, sub = chat_graph(saver), subgraph_graph(saver)
        with aged(40):
            for tid in OLD[:2]:
                await turns(chat, tid, 3)
            await turns(sub, OLD[2], 3)  # subgraph call namespaces too
        for tid in FRESH:
            await turns(chat, tid, 3)


def langgraph_json(path: Path, strategy: str, **extra: Any) -> Path:
    ttl = {"strategy": strategy, "default_ttl": 30 * 24 * 60, "sweep_interval_minutes": 60}
    app = {"graphs": {"agent": "./agent.py:graph"}, "checkpointer": {"ttl": {**ttl, **extra}}}
    path.write_text(json.dumps(app, indent=2))
    return path


@pytest.mark.parametrize("strategy", ["delete", "keep_latest"])
async def test_langgraph_json_equals_its_translation(
    store: Store, tmp_path: Path, strategy: str
) -> None:
    await build_lg_store(store)
    before = await store.rows()
    copy = store.copy()
    lg = langgraph_json(tmp_path / "langgraph.json", strategy, sweep_limit=2)
    cfg_path = tmp_path / "config.yaml"
    policy = "  - name: langgraph-ttl\n    langgraph_json: ./langgraph.json\n"
    cfg_path.write_text(store.store_yaml() + "policies:\n" + policy)
    from_json = load_worker_config(cfg_path)

    done = cli("translate", str(lg))
    assert done.returncode == 0, done.stderr
    translated = load_config_text(store.store_yaml(copy) + done.stdout)
    assert translated.policies == from_json.policies
    assert translated.schedule_for(translated.policies[0]).every == timedelta(minutes=60)

    now = time.time()
    report = await run(from_json, now)
    report_copy = await run(translated, now)
    after, after_copy = await store.rows(), await store.rows(copy)
    assert after == after_copy

    # sweep_limit 2: two of the three idle threads are acted on, the third waits.
    for r in (report, report_copy):
        assert r.policies["langgraph-ttl"].skipped[SkipReason.SWEEP_LIMIT] == 1
    acted = changed(before, after)
    assert len(acted) == 2 and acted <= set(OLD)
    assert {k: v for k, v in before.items() if k[0] not in acted} == {
        k: v for k, v in after.items() if k[0] not in acted
    }
    if strategy == "delete":
        assert not threads_of(after) & acted
    else:
        # keep_latest: the thread stays with its latest checkpoint, read back
        # unchanged; a subgraph call's namespace goes with its root checkpoint.
        for t in acted:
            newest = max(k for k in before if k[0] == t and k[1] == "")
            kept = sorted(k for k in after if k[0] == t)
            assert [k for k in kept if k[1] == ""] == [newest]
            for k in kept:
                assert after[k] == before[k]
                if k[1]:
                    assert after[k][1]["parents"][""] == newest[2]
            assert len({k[1] for k in kept}) == len(kept)  # one per namespace

    # The next sweep takes the thread the limit held back.
    await run(from_json, now)
    assert changed(before, await store.rows()) == set(OLD)


def changed(
    before: dict[tuple[str, str, str], Row], after: dict[tuple[str, str, str], Row]
) -> set[str]:
    """Threads that lost rows."""
    return {t for t, ns, c in before if (t, ns, c) not in after}


# ------------------------------------------------------------------ config errors


def test_config_errors_exit_2_with_file_line_key(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(
        '{\n  "checkpointer": {\n    "ttl": {\n      "strategy": "keep_oldest",\n'
        '      "default_ttl": 60\n    }\n  }\n}\n'
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"stores:\n  - name: s\n    kind: sqlite\n    path: {tmp_path / 'x.db'}\n"
        "policies:\n"
        "  - name: bad-ttl\n"
        "    expire_after: {metadata_key: ttl_minutes, default: 0d}\n"
        "  - name: missing\n"
        "    langgraph_json: ./nowhere.json\n"
        "  - name: bad-strategy\n"
        "    langgraph_json: ./bad.json\n"
    )
    done = cli("validate", config=cfg)
    assert done.returncode == 2
    assert f"{cfg}:7: policies[0].expire_after.default: duration '0d' is zero" in done.stderr

    cfg.write_text(cfg.read_text().replace("default: 0d", "default: 30d"))
    done = cli("validate", config=cfg)
    assert done.returncode == 2
    missing = tmp_path / "nowhere.json"
    assert f"{cfg}:9: policies[1].langgraph_json: cannot read {missing}" in done.stderr
    assert f"{tmp_path / 'bad.json'}:4: checkpointer.ttl.strategy: " in done.stderr

    done = cli("translate", str(tmp_path / "bad.json"))
    assert done.returncode == 2
    assert f"{tmp_path / 'bad.json'}:4: checkpointer.ttl.strategy: " in done.stderr
    done = cli("translate", str(tmp_path / "nowhere.json"))
    assert done.returncode == 2 and "nowhere.json: cannot read" in done.stderr


def test_langgraph_json_rules_cannot_be_given_twice() -> None:
    with pytest.raises(Exception, match="comes from langgraph_json"):
        Policy.model_validate({"name": "p", "langgraph_json": "x.json", "expire_after": "1d"})
    text = '{"checkpointer": {"ttl": {"strategy": "keep_latest", "default_ttl": 5}}}'
    ttl = parse_langgraph_ttl(text, "x")
    policy = Policy.model_validate({"name": "p", "langgraph_json": "x", "interrupted": "expire"})
    with pytest.raises(ValueError, match="interrupted: expire"):
        apply_langgraph_ttl(policy, ttl)


def test_config_example_loads_with_new_keys() -> None:
    cfg = load_config(Path(__file__).parent.parent / "config.example.yaml")
    names = {p.name for p in cfg.policies}
    assert {"app-ttl", "tickets"} <= names
