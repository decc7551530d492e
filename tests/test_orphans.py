"""Orphan reconciliation (`orphaned: {query, source}`) on SQLite and Postgres, through real graphs.

The application's registry (a table of the thread ids it still knows) lives
in another SQLite file, in the store's own database, or in another Postgres
database; Postgres runs on C and ICU collations. What a sweep keeps is read
back through the real saver and compared with what was there before.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.pg_scenarios import connect
from helpers.scenarios import cli, turns
from test_ttl import Store, run, threads_of

from policies.matching import Ruleset
from policies.model import Reason, SkipReason
from worker.service.config_files import load_config_text
from worker.service.demo import aged, chat_graph
from worker.service.metrics import Metrics
from worker.sweep import Outcome
from worker.sweep.orphans import RegistryError

THREADS = {"chat-a": 10, "chat-B": 10, "chat-c": 10, "chat-d": 10, "chat-new": 0, "other-1": 10}
"""Thread id -> days idle."""
KNOWN = ["chat-a", "chat-b", "chat-c", "gone-elsewhere"]
"""What the application still lists: `chat-b` is not `chat-B` (ids compare exactly)."""
ORPHANS_DUE = {"chat-B", "chat-d"}
REGISTRY_QUERY = "SELECT thread_id FROM app_threads;"

POLICIES = """
policies:
  - name: orphans
    match: {{thread_id: "chat-*"}}
    orphaned:
      query: "{query}"{source}
    expire_after: 1d
  - name: rest
    keep_last: 1
"""


@pytest.fixture(params=["sqlite", "postgres-c", "postgres-icu"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    backend, _, collation = request.param.partition("-")
    s = Store(backend, tmp_path, request, collation or "c")
    yield s
    s.close()


async def build(store: Store) -> None:
    async with store.saver() as saver:
        app = chat_graph(saver)
        for tid, days in sorted(THREADS.items(), key=lambda kv: -kv[1]):
            with aged(days):
                await turns(app, tid, 2)


def sqlite_registry(path: Path, ids: list[str]) -> None:
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE IF NOT EXISTS app_threads (thread_id TEXT PRIMARY KEY)")
        con.executemany("INSERT INTO app_threads VALUES (?)", [(i,) for i in ids])
    con.close()


async def postgres_registry(dsn: str, ids: list[str]) -> None:
    async with connect(dsn) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS app_threads (thread_id text PRIMARY KEY)")
        await conn.executemany("INSERT INTO app_threads VALUES ($1)", [(i,) for i in ids])


async def registry_source(store: Store, where: str, ids: list[str]) -> str:
    """Create the registry (`own`: the store's database; `other`: another one); its YAML."""
    if where == "own":
        if store.backend == "sqlite":
            sqlite_registry(Path(store.where), ids)
        else:
            await postgres_registry(store.where, ids)
        return ""
    if store.backend == "sqlite":
        path = store.tmp / "app.db"
        sqlite_registry(path, ids)
        return f"\n      source: {{kind: sqlite, path: {path}}}"
    assert store.dbs is not None
    dsn = store.dbs.create()
    await postgres_registry(dsn, ids)
    return f"\n      source: {{kind: postgres, dsn: '{dsn}'}}"


@pytest.mark.parametrize("where", ["own", "other"])
async def test_orphans_go_known_threads_fall_through(store: Store, where: str) -> None:
    await build(store)
    source = await registry_source(store, where, KNOWN)
    before = await store.rows()
    cfg = load_config_text(
        store.store_yaml() + POLICIES.format(query=REGISTRY_QUERY, source=source)
    )
    report = await run(cfg, time.time())

    assert report.outcome is Outcome.SUCCESS, report.error
    after = await store.rows()
    assert threads_of(after) == set(THREADS) - ORPHANS_DUE
    # Every kept checkpoint reads back as it was.
    assert all(after[k] == before[k] for k in after)
    # Orphaned but active within the grace period: kept whole, by the orphan policy.
    assert {k for k in after if k[0] == "chat-new"} == {k for k in before if k[0] == "chat-new"}
    # Listed (and unmatched) threads fell through to `rest`, which trimmed them.
    for tid in ("chat-a", "chat-c", "other-1"):
        assert len([k for k in after if k[0] == tid]) == 1, tid
    p = report.policies["orphans"]
    assert p.registry_error is None
    assert p.by_reason[Reason.ORPHANED].threads == len(ORPHANS_DUE)
    assert Reason.EXPIRED not in p.by_reason


@pytest.mark.parametrize(
    ("query", "ids", "reason"),
    [
        (REGISTRY_QUERY, [], RegistryError.EMPTY),
        ("SELECT thread_id FROM no_such_table", KNOWN, RegistryError.QUERY_FAILED),
        ("SELECT thread_id, 1 FROM app_threads", KNOWN, RegistryError.QUERY_FAILED),
    ],
    ids=["empty", "missing-table", "two-columns"],
)
async def test_empty_or_failing_registry_deletes_nothing(
    store: Store, query: str, ids: list[str], reason: RegistryError
) -> None:
    if store.backend == "postgres" and query.endswith("1 FROM app_threads"):
        # Postgres takes the first column of a wider query; a column that is not
        # text is its malformed registry (integer = text has no operator).
        query = "SELECT length(thread_id) FROM app_threads"
    await build(store)
    source = await registry_source(store, "other", ids)
    before = await store.rows()
    text = store.store_yaml() + POLICIES.format(query=query, source=source)
    # Only the orphan policy: anything deleted would be its doing.
    text = text.split("  - name: rest")[0]
    report = await run(load_config_text(text), time.time())

    assert report.outcome is Outcome.SUCCESS, report.error
    assert await store.rows() == before
    p = report.policies["orphans"]
    assert p.registry_error is not None and p.registry_error.reason is reason
    # Each chat-* thread the policy would have reconciled is counted as skipped.
    assert p.skipped[SkipReason.REGISTRY_UNAVAILABLE] == 5
    metrics = Metrics()
    metrics.record(report, ["orphans"])
    labels = {"store": "s", "policy": "orphans", "reason": reason.value}
    sample = "checkpoint_janitor_orphan_registry_errors_total"
    assert metrics.registry.get_sample_value(sample, labels) == 1


async def test_unreachable_registry_deletes_nothing(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = Store("sqlite", tmp_path, request)
    await build(store)
    before = await store.rows()
    source = f"\n      source: {{kind: sqlite, path: {tmp_path / 'missing.db'}}}"
    text = store.store_yaml() + POLICIES.format(query=REGISTRY_QUERY, source=source)
    report = await run(load_config_text(text), time.time())
    p = report.policies["orphans"]
    assert p.registry_error is not None and p.registry_error.reason is RegistryError.UNREACHABLE
    # The chat-* threads fell through to `rest` (trimmed), none expired.
    assert threads_of(await store.rows()) == set(THREADS)
    assert not (tmp_path / "missing.db").exists()  # read-only: never created
    assert before


async def test_plan_lists_orphans_and_registry_errors(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = Store("sqlite", tmp_path, request)
    await build(store)
    source = await registry_source(store, "other", KNOWN)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(store.store_yaml() + POLICIES.format(query=REGISTRY_QUERY, source=source))
    done = cli("plan", "--format", "jsonl", config=cfg)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in done.stdout.splitlines()]
    orphaned = {
        x["thread_id"] for x in lines if x["type"] == "thread" and x["reason"] == "orphaned"
    }
    assert orphaned == ORPHANS_DUE
    assert all(x["action"] == "expire" for x in lines if x.get("reason") == "orphaned")

    cfg.write_text(store.store_yaml() + POLICIES.format(query="SELECT nope", source=source))
    done = cli("plan", "--threads", config=cfg)
    assert done.returncode == 0, done.stderr
    assert "registry: query-failed" in done.stdout
    assert "orphaned" not in done.stdout.split("threads that would lose rows")[1]


def test_matching_without_an_answer_matches_nothing() -> None:
    cfg = load_config_text(
        "stores: [{name: s, kind: sqlite, path: x.db}]\n"
        + POLICIES.format(query=REGISTRY_QUERY, source="")
    )
    rules = Ruleset(cfg.policies)
    # No registry answer: the orphan policy governs nothing; `rest` does.
    assert rules.first_match("chat-x", "", {}) is cfg.policies[1]
    assert rules.unreconciled("chat-x", {}) is cfg.policies[0]
    page = rules.for_page({"orphans": {"chat-a"}})
    assert page.first_match("chat-a", "", {}) is cfg.policies[1]
    assert page.first_match("chat-x", "", {}) is cfg.policies[0]
    assert page.first_match("other", "", {}) is cfg.policies[1]
    assert page.unreconciled("chat-x", {}) is None
