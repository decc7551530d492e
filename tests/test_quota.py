"""Size caps (`stores[].max_bytes`, `policies[].quota`) on SQLite and Postgres, through real graphs.

Threads are written by real graphs at staggered ages; caps are set from the
threads' own byte counts so that exactly the oldest allowed ones must go.
What a sweep keeps is read back through the real saver and compared with what
was there before. Postgres runs on C and ICU collations.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.scenarios import breakpoint_graph, cli, turns
from test_ttl import Store, run, threads_of

from policies.config import Config
from policies.model import Reason
from worker.service.config_files import load_config_text
from worker.service.demo import aged, chat_graph, thread
from worker.service.metrics import Metrics
from worker.stores import make_engine
from worker.sweep import Outcome

STORE_THREADS = {"s-1": 9, "s-2": 8, "s-3": 7, "s-4": 6, "s-5": 5}
"""Thread id -> days idle; `vip-old` (protected) and `wait-old` (at a breakpoint) are older."""
STORE_POLICIES = """
defaults:
  max_delete_fraction: 0.9
policies:
  - name: vip
    match: {thread_id: "vip-*"}
    protect: true
  - name: rest
    keep_last: 100
"""


@pytest.fixture(params=["sqlite", "postgres-c", "postgres-icu"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    backend, _, collation = request.param.partition("-")
    s = Store(backend, tmp_path, request, collation or "c")
    yield s
    s.close()


async def thread_bytes(store: Store) -> dict[str, int]:
    """Each thread's bytes, as the worker counts them."""
    cfg = load_config_text(store.store_yaml() + "policies: [{name: p, keep_last: 1}]\n")
    engine = make_engine(cfg.store("s"), cfg.store_settings("s"), read_only=True)
    await engine.open()
    try:
        ids = [t async for page in engine.thread_pages(1000) for t in page]
        return await engine.thread_bytes(ids)
    finally:
        await engine.close()


async def build_store_cap(store: Store) -> None:
    async with store.saver() as saver:
        chat = chat_graph(saver)
        with aged(10):
            await turns(chat, "vip-old", 3)
            await breakpoint_graph(saver).ainvoke({"messages": ["hi"]}, thread("wait-old"))
        for tid, days in STORE_THREADS.items():
            with aged(days):
                await turns(chat, tid, 2)


def with_cap(store: Store, cap: int, policies: str) -> Config:
    yaml = store.store_yaml() + f"    max_bytes: {cap}\n" + policies
    return load_config_text(yaml)


async def test_store_cap_evicts_least_recently_active_allowed(store: Store) -> None:
    await build_store_cap(store)
    sizes = await thread_bytes(store)
    before = await store.rows()
    # Exactly s-1 and s-2 (the oldest the policies let go) must go to get under.
    cap = sum(sizes.values()) - sizes["s-1"] - sizes["s-2"]
    report = await run(with_cap(store, cap, STORE_POLICIES), time.time())

    assert report.outcome is Outcome.SUCCESS, report.error
    after = await store.rows()
    assert threads_of(after) == {"vip-old", "wait-old", "s-3", "s-4", "s-5"}
    assert after == {k: v for k, v in before.items() if k[0] in threads_of(after)}
    assert report.policies["rest"].by_reason[Reason.QUOTA].threads == 2
    assert report.over_quota == {("", ""): 0}
    # (Postgres: an expired thread's blobs wait out the grace period, then go too.)
    left = await thread_bytes(store)
    assert sum(n for t, n in left.items() if t in threads_of(after)) <= cap


async def test_store_cap_out_of_reach_is_reported_not_forced(store: Store) -> None:
    await build_store_cap(store)
    before = await store.rows()
    report = await run(with_cap(store, 1, STORE_POLICIES), time.time())

    assert report.outcome is Outcome.SUCCESS, report.error
    after = await store.rows()
    # Everything allowed went; the protected and the waiting thread stay.
    assert threads_of(after) == {"vip-old", "wait-old"}
    assert after == {k: v for k, v in before.items() if k[0] in {"vip-old", "wait-old"}}
    over = report.over_quota[("", "")]
    left = await thread_bytes(store)
    assert over == sum(n for t, n in left.items() if t in threads_of(after)) - 1
    metrics = Metrics()
    metrics.record(report, ["vip", "rest"])
    labels = {"store": "s", "policy": "", "group": ""}
    assert metrics.registry.get_sample_value("checkpoint_janitor_over_quota_bytes", labels) == over


async def test_quota_evictions_count_in_the_safety_limit(store: Store) -> None:
    await build_store_cap(store)
    before = await store.rows()
    policies = STORE_POLICIES.replace("max_delete_fraction: 0.9", "max_delete_fraction: 0.5")
    report = await run(with_cap(store, 1, policies), time.time())

    assert report.outcome is Outcome.SAFETY_STOP
    assert report.expiries_by_policy["rest"] == len(STORE_THREADS)
    assert await store.rows() == before


USERS = {
    # thread id: (user_id, days idle)
    "u1-a": ("u1", 9),
    "u1-b": ("u1", 8),
    "u1-c": ("u1", 7),
    "u1-d": ("u1", 1),
    "u2-a": ("u2", 9),
    "nouser": (None, 9),
}
PER_USER = """
defaults:
  max_delete_fraction: 0.9
policies:
  - name: per-user
    match: {{checkpoint_ns: ""}}
    quota: {{max_bytes: {cap}, per: user_id}}
"""


async def test_per_user_quota_evicts_oldest_of_the_user_over_it(store: Store) -> None:
    async with store.saver() as saver:
        chat = chat_graph(saver)
        with aged(10):
            # u1's oldest thread waits at a breakpoint: `interrupted: keep` holds it.
            await breakpoint_graph(saver).ainvoke(
                {"messages": ["hi"]}, thread("u1-wait", user_id="u1")
            )
        for tid, (user, days) in sorted(USERS.items(), key=lambda kv: -kv[1][1]):
            with aged(days):
                await turns(chat, tid, 2, **({"user_id": user} if user else {}))
    sizes = await thread_bytes(store)
    before = await store.rows()
    u1 = sum(n for t, n in sizes.items() if t.startswith("u1-"))
    # u1 must lose more than u1-a: u1-a and u1-b go (u1-wait, older, waits). u2 is under.
    cap = u1 - sizes["u1-a"] - sizes["u1-b"]
    assert sizes["u2-a"] < cap
    report = await run(load_config_text(store.store_yaml() + PER_USER.format(cap=cap)), time.time())

    assert report.outcome is Outcome.SUCCESS, report.error
    after = await store.rows()
    gone = {"u1-a", "u1-b"}
    assert threads_of(after) == {"u1-wait", *USERS} - gone
    assert after == {k: v for k, v in before.items() if k[0] not in gone}
    assert report.policies["per-user"].by_reason[Reason.QUOTA].threads == 2
    assert report.over_quota == {}


async def test_plan_shows_quota_evictions(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = Store("sqlite", tmp_path, request)
    await build_store_cap(store)
    sizes = await thread_bytes(store)
    before = await store.rows()
    cap = sum(sizes.values()) - sizes["s-1"] - sizes["s-2"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(store.store_yaml() + f"    max_bytes: {cap}\n" + STORE_POLICIES)
    done = cli("plan", "--format", "jsonl", config=cfg)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in done.stdout.splitlines()]
    evicted = {x["thread_id"]: x for x in lines if x["type"] == "thread"}
    assert set(evicted) == {"s-1", "s-2"}
    assert {(x["reason"], x["action"]) for x in evicted.values()} == {("quota", "expire")}
    (summary,) = [x for x in lines if x["type"] == "store"]
    assert summary["over_quota"] == [{"policy": None, "group": None, "bytes": 0}]
    assert await store.rows() == before  # a plan deletes nothing
