"""The worker on Postgres beside a live application, as processes, and when things go wrong.

(The live-writer and SIGKILL scenarios run on every backend in test_live.py.)

The big stores hold hundreds of threads whose rows the real
`AsyncPostgresSaver` wrote (one real thread, replicated with `INSERT ...
SELECT` into all three tables), a day old, so every thread is quiet past the
grace period and blob collection runs while the application works.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers.backends import Backend, Stores, build_bulk
from helpers.pg_scenarios import (
    all_keys,
    app_process,
    cli,
    connect,
    dump,
    fork_graph,
    json_events,
    once,
    orphans,
    pg_saver,
    run_pg_sweep,
    table_counts,
    thread_counts,
    write_config,
)
from helpers.pgserver import PgServer, free_port
from helpers.scenarios import turns
from test_live import BULK_POLICY, KEEP, LOADS, TURNS, assert_no_orphans_past_grace, bulk

from worker.service.demo import chat_graph
from worker.sweep import Outcome

# Every test here runs on Postgres (C and ICU); the live-writer and SIGKILL scenarios
# every backend shares are in test_live.py.
pytestmark = [pytest.mark.slow, pytest.mark.backends("postgres-c", "postgres-icu")]

THREADS = LOADS["postgres"].threads
SLOW_BATCHES = f"defaults:\n  batch: {LOADS['postgres'].batch}\n"


@pytest.fixture(scope="module")
def big_template(backend: Backend) -> Iterator[str]:
    """THREADS chat threads of TURNS turns, a day old."""
    made = backend.stores("big_template")
    dsn = made.create()
    asyncio.run(build_bulk(backend, dsn, chat_graph, "bulk-", THREADS, TURNS, 1))
    yield dsn
    made.close()


@pytest.fixture
def big(big_template: str, stores: Stores) -> str:
    return stores.clone(big_template)


SMALL_THREADS = 200


@pytest.fixture(scope="module")
def small_template(backend: Backend) -> Iterator[str]:
    """SMALL_THREADS chat threads of TURNS turns, a day old."""
    made = backend.stores("small_template")
    dsn = made.create()
    asyncio.run(build_bulk(backend, dsn, chat_graph, "bulk-", SMALL_THREADS, TURNS, 1))
    yield dsn
    made.close()


async def test_cli_commands_on_a_postgres_store(tmp_path: Path, stores: Stores) -> None:
    """plan, once, stats and purge work on a postgres store named by `${ENV}`; the DSN's
    password appears in no output."""
    dsn = stores.create()
    password = dsn.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    async with pg_saver(dsn) as saver:
        app = chat_graph(saver)
        for tid in (
            "user-1",
            "user-2",
            "org-42:user-7:a",
            "org-42:user-7:b",
            "org-42:user-70:a",
            "org-42_user-7:c",
            "ORG-42:user-7:d",
        ):
            await turns(app, tid, 3)
    cfg = tmp_path / "janitor.yaml"
    cfg.write_text(
        "stores:\n  - {name: pg, kind: postgres, dsn: '${JANITOR_TEST_DSN}'}\n"
        "policies:\n  - {name: trim, keep_last: 2}\nlogging: {format: json}\n"
    )
    env = {"JANITOR_TEST_DSN": dsn}
    outputs: list[str] = []

    raw = await dump(dsn)
    p = cli("plan", "--format", "json", config=cfg, env=env)
    outputs += [p.stdout, p.stderr]
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)["stores"][0]
    assert plan["total"]["checkpoints"] == 7 * 7
    assert plan["policies"][0]["by_reason"]["trimmed"]["checkpoints"] == 7 * 7
    t = cli("plan", config=cfg, env=env)
    outputs += [t.stdout, t.stderr]
    assert t.returncode == 0, t.stderr
    # Below the "plan at" line and the store title: Postgres keeps channel values in blobs.
    assert "blobs" in t.stdout.splitlines()[3].split()
    assert await dump(dsn) == raw

    s = cli("stats", "--format", "json", config=cfg, env=env)
    outputs += [s.stdout, s.stderr]
    assert s.returncode == 0, s.stderr
    st = json.loads(s.stdout)["stores"][0]
    assert st["kind"] == "postgres" and st["threads"] == 7
    assert set(st["tables"]) >= {"checkpoints", "checkpoint_writes", "checkpoint_blobs"}
    assert st["ages"][""] == {"<1h": 63}
    assert st["largest_threads"][0]["checkpoints"] == 9

    r = cli("once", config=cfg, env=env)
    outputs += [r.stdout, r.stderr]
    assert r.returncode == 0, r.stderr
    assert set((await thread_counts(dsn)).values()) == {2}
    sweeps = [e for e in json_events(r.stderr) if e["event"] == "sweep"]
    assert len(sweeps) == 1 and sweeps[0]["outcome"] == "success"
    assert sweeps[0]["checkpoints"] == 7 * 7

    r = cli(
        "purge",
        "--thread-prefix",
        "org-42:user-7:",
        config=cfg,
        env=env,
        input="n\n",
        terminal=True,
    )
    outputs += [r.stdout, r.stderr]
    assert r.returncode == 0, r.stderr
    assert "2 threads" in r.stdout and "nothing deleted" in r.stdout
    r = cli("purge", "--thread-prefix", "org-42:user-7:", "--yes", config=cfg, env=env)
    outputs += [r.stdout, r.stderr]
    assert r.returncode == 0, r.stderr
    left = set(await thread_counts(dsn))
    # `_` and case are not wildcards: a range on the id, never LIKE.
    assert left == {"user-1", "user-2", "org-42:user-70:a", "org-42_user-7:c", "ORG-42:user-7:d"}
    async with connect(dsn) as conn:
        for table in ("checkpoint_writes", "checkpoint_blobs"):
            gone = await conn.fetchval(
                f"SELECT COUNT(*) FROM {table} WHERE thread_id LIKE 'org-42:user-7:%'"
            )
            assert gone == 0, table
    r = cli("purge", "--thread", "user-1", "--yes", config=cfg, env=env)
    outputs += [r.stdout, r.stderr]
    assert r.returncode == 0 and "user-1" not in await thread_counts(dsn)
    audit = json_events(r.stderr)
    assert any(e["event"] == "thread_purged" and e["thread_id"] == "user-1" for e in audit)
    assert not any(password in out for out in outputs)


BAD_PASSWORD = "wr0ng-s3cr3t-pw"
ODD_PASSWORD = "p@ss:w%rd/s3cr3t"
ODD_PASSWORD_URL = "p%40ss%3Aw%25rd%2Fs3cr3t"


def bad_store(case: str, pg_server: PgServer, dsn: str) -> tuple[str, str, tuple[str, ...]]:
    """(dsn, extra store yaml, words one of which the error must contain) for `case`."""
    db = dsn.rsplit("/", 1)[1]
    if case == "wrong password (URL)":
        return (
            f"postgresql://postgres:{BAD_PASSWORD}@127.0.0.1:{pg_server.port}/{db}",
            "",
            ("password", "authentication"),
        )
    if case == "wrong password (keyword DSN)":
        return (
            f"host=127.0.0.1 port={pg_server.port} user=postgres password={BAD_PASSWORD} "
            f"dbname={db}",
            "",
            ("password", "authentication"),
        )
    if case == "wrong password with special characters (URL-encoded)":
        return (
            f"postgresql://postgres:{ODD_PASSWORD_URL}@127.0.0.1:{pg_server.port}/{db}",
            "",
            ("password", "authentication"),
        )
    if case == "unreachable host":
        return (
            f"postgresql://postgres:{BAD_PASSWORD}@127.0.0.1:{free_port()}/{db}",
            "",
            ("connect", "refused", "unreachable"),
        )
    assert case == "missing schema"
    return dsn, "    schema: nope\n", ("nope",)


@pytest.mark.parametrize(
    "case",
    [
        "wrong password (URL)",
        "wrong password (keyword DSN)",
        "wrong password with special characters (URL-encoded)",
        "unreachable host",
        "missing schema",
    ],
)
async def test_store_errors_exit_1_without_the_password(
    tmp_path: Path, stores: Stores, pg_server: PgServer, case: str
) -> None:
    """A store the worker cannot use: `once`, `plan` and `stats` exit 1 with a clear error
    naming the store, never the password, and nothing is deleted."""
    dsn = stores.create()
    real_password = pg_server.password
    async with pg_saver(dsn) as saver:
        await turns(chat_graph(saver), "user-1", 3)
    raw = await dump(dsn)
    store_dsn, store_extra, words = bad_store(case, pg_server, dsn)
    cfg = tmp_path / "janitor.yaml"
    cfg.write_text(
        f"stores:\n  - name: pg\n    kind: postgres\n    dsn: '{store_dsn}'\n{store_extra}"
        "policies:\n  - {name: trim, keep_last: 1}\n"
    )
    secrets = (BAD_PASSWORD, ODD_PASSWORD, ODD_PASSWORD_URL, real_password)
    for command in ("once", "plan", "stats"):
        t0 = time.monotonic()
        r = cli(command, config=cfg)
        out = r.stdout + r.stderr
        assert r.returncode == 1, (command, r.returncode, out)
        assert time.monotonic() - t0 < 60
        assert not any(secret in out for secret in secrets), out
        assert "pg" in r.stderr
        assert any(w in r.stderr.lower() for w in words), (command, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
    assert await dump(dsn) == raw


# ------------------------------------------------------------------ beside an application


async def watch_lock_waits(dsn: str, stop: asyncio.Event) -> float:
    """The longest a statement of another session was seen waiting for a lock (seconds)."""
    longest = 0.0
    async with connect(dsn) as conn:
        while not stop.is_set():
            waited = await conn.fetchval(
                "SELECT EXTRACT(EPOCH FROM max(now() - query_start)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock' "
                "AND pid <> pg_backend_pid()"
            )
            longest = max(longest, float(waited or 0.0))
            await asyncio.sleep(0.05)
    return longest


@pytest.mark.parametrize("table", ["checkpoints", "checkpoint_writes", "checkpoint_blobs"])
async def test_application_lock_makes_the_sweep_back_off(
    backend: Backend, small_template: str, stores: Stores, table: str
) -> None:
    """A transaction of the application holding a thread's rows (`FOR UPDATE`) makes the sweep
    skip or retry that batch within lock_timeout: it finishes while the lock is held, no
    statement waits past lock_timeout, and the locked thread is untouched until released.
    Blobs go only past the grace period after a trim: for them, the threads are trimmed
    first and the lock meets the sweep that collects."""
    dsn = stores.clone(small_template)
    locked = bulk(SMALL_THREADS // 2)
    policy = BULK_POLICY
    extra = "defaults:\n  batch: {lock_timeout: 0.5, max_batch_threads: 20, pause_factor: 0}\n"
    now = None
    if table == "checkpoint_blobs":
        first = await run_pg_sweep(dsn, policy, extra=extra)
        assert first.outcome is Outcome.SUCCESS and first.deleted.blobs == 0, first.error
        now = time.time() + 2 * 3600
    before = await thread_counts(dsn)
    garbage = {r[0] for r in (await orphans(dsn))["unreferenced_blobs"]}
    app = await asyncpg.connect(dsn)
    try:
        tx = app.transaction()
        await tx.start()
        held = await app.fetch(f"SELECT 1 FROM {table} WHERE thread_id = $1 FOR UPDATE", locked)
        assert held
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_lock_waits(dsn, stop))
        t0 = time.monotonic()
        report = await asyncio.wait_for(
            run_pg_sweep(dsn, policy, extra=extra, now=now), timeout=120
        )
        elapsed = time.monotonic() - t0
        stop.set()
        longest_wait = await watcher
        assert report.outcome is Outcome.SUCCESS, report.error
        # A batch that gave up on the lock is contention, not a change (issue 11).
        assert report.changed_threads == 0
        assert report.locked_threads >= 1
        assert elapsed < 30, elapsed
        assert longest_wait < 0.5 + 0.5, f"a statement waited {longest_wait:.2f}s for the lock"
        assert longest_wait > 0.1, "the sweep never met the application's lock"
        during = await thread_counts(dsn)
        assert during[locked] == before[locked], "the locked thread was changed"
        trimmed = sum(1 for n in during.values() if n == KEEP)
        assert trimmed >= 0.9 * (SMALL_THREADS - 1), f"only {trimmed} threads trimmed"
        if table == "checkpoint_blobs":
            left = {r[0] for r in (await orphans(dsn))["unreferenced_blobs"]}
            assert locked in left and len(left) <= 0.1 * len(garbage), len(left)
        # The application's transaction was not disturbed.
        assert await app.fetchval("SELECT 1") == 1
    finally:
        await app.close()  # rolls the application's transaction back
    report = await run_pg_sweep(dsn, policy, extra=extra, now=now)
    assert report.outcome is Outcome.SUCCESS, report.error
    assert set((await thread_counts(dsn)).values()) == {KEEP}
    await assert_no_orphans_past_grace(backend, dsn, policy)


# ------------------------------------------------------------------ processes


async def test_two_once_processes_sweep_each_thread_once(
    backend: Backend, tmp_path: Path, big: str
) -> None:
    """Two `once` started together on one database: both exit 0, no deadlock, each thread
    trimmed once (deleted counts add up to the rows that went), no orphans."""
    total = (await table_counts(big))["checkpoints"]
    cfg = write_config(tmp_path / "janitor.yaml", big, BULK_POLICY, SLOW_BATCHES)
    procs = [once(cfg), once(cfg)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
        lowered = err.lower()
        assert "deadlock" not in lowered and "serializ" not in lowered, err[-3000:]
    assert set((await thread_counts(big)).values()) == {KEEP}
    assert len(await thread_counts(big)) == THREADS
    deleted = sum(
        e["checkpoints"] for _, err in results for e in json_events(err) if e["event"] == "sweep"
    )
    assert deleted == total - KEEP * THREADS
    await assert_no_orphans_past_grace(backend, big)


FORK_THREADS = 400
FORK_TURNS = 6


@pytest.fixture(scope="module")
def fork_template(backend: Backend) -> Iterator[str]:
    """FORK_THREADS threads of `fork_graph` (messages and notes), a day old."""
    made = backend.stores("fork_template")
    dsn = made.create()
    asyncio.run(build_bulk(backend, dsn, fork_graph, "fork-", FORK_THREADS, FORK_TURNS, 1))
    yield dsn
    made.close()


async def assert_forks_whole(dsn: str, forks: list[dict[str, Any]]) -> None:
    """Every fork reads back as the forking process saw it: all channel values, same state."""
    broken = []
    async with pg_saver(dsn) as saver:
        app = fork_graph(saver)
        for f in forks:
            tup = await saver.aget_tuple(f["config"])
            if tup is None:
                broken.append((f["thread_id"], "fork checkpoint gone"))
                continue
            values = repr(sorted(tup.checkpoint["channel_values"].items()))
            state = await app.aget_state(f["config"])
            if values != f["channel_values"] or state.values != f["values"]:
                broken.append((f["thread_id"], "values differ", state.values, f["values"]))
            elif list(state.next) != f["next"]:
                broken.append((f["thread_id"], "next differs", state.next, f["next"]))
    assert not broken, f"{len(broken)} of {len(forks)} forks broken: {broken[:3]}"


async def test_forks_during_a_sweep_read_back_whole(
    tmp_path: Path, fork_template: str, stores: Stores
) -> None:
    """While `once` trims quiet threads (blob collection on), another process forks them from
    old checkpoints; each fork references its base's `messages` blob. Every fork reads back
    whole after that sweep, after a second one, and after one past the grace period."""
    dsn = stores.clone(fork_template)
    threads = sorted(await thread_counts(dsn, "fork-"))
    total = len(await all_keys(dsn))
    cfg = write_config(
        tmp_path / "janitor.yaml",
        dsn,
        f'  - {{name: trim, match: {{thread_id: "fork-*"}}, keep_last: {KEEP}}}',
        "defaults:\n  batch: {target_batch_seconds: 0.01, max_batch_threads: 4, pause: 0.05}\n",
    )
    sweeper = once(cfg)
    async with connect(dsn) as conn:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sweeper.poll() is None:
            if await conn.fetchval("SELECT COUNT(*) FROM checkpoints") < total:
                break
            await asyncio.sleep(0.02)
    started = time.time()
    out = tmp_path / "forks.json"
    # In a shuffled order, so forks land before, during and after the sweep reaches a thread.
    random.Random(0).shuffle(threads)
    forker = app_process("fork", dsn, str(out), *threads)
    _, err = sweeper.communicate(timeout=300)
    ended = time.time()
    assert forker.wait(timeout=300) == 0
    assert sweeper.returncode == 0, err[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    forks = result["forks"]
    during = [f for f in forks if started <= f["at"] <= ended]
    assert len(during) >= 20, f"only {len(during)} forks during the sweep"
    # Each fork references its base's `messages` blob version, not a fresh one.
    assert all(
        f["channel_versions"]["messages"] == f["base_versions"]["messages"]
        for f in forks
        if not f["from_deleted"]
    )
    await assert_forks_whole(dsn, forks)

    report = await run_pg_sweep(dsn, f"  - {{name: trim, keep_last: {KEEP}}}")
    assert report.outcome is Outcome.SUCCESS, report.error
    await assert_forks_whole(dsn, forks)
    report = await run_pg_sweep(
        dsn, f"  - {{name: trim, keep_last: {KEEP}}}", now=time.time() + 86400
    )
    assert report.outcome is Outcome.SUCCESS, report.error
    await assert_forks_whole(dsn, forks)
    found = await orphans(dsn)
    assert found["unreferenced_blobs"] == [] and found["orphan_writes"] == []
    # A fork committed after the sweep deleted its base names a deleted parent; a later
    # sweep of the thread must null it (invariant 6), as the official prune does.
    by_id = {f["config"]["configurable"]["checkpoint_id"]: f for f in forks}
    dangling = [
        (tid, cid, by_id.get(cid, {}).get("from_deleted"), by_id.get(cid, {}).get("at", 0) - ended)
        for tid, _, cid in found["missing_parents"]
    ]
    assert dangling == [], f"(thread, checkpoint, from_deleted, s after sweep end): {dangling}"
