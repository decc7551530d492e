"""The command line, run as a user runs it: a subprocess on a real store."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from daemon_helpers import ChatThreads, build_sqlite
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from scenarios import cli, read_all, turns

from policies.ids import checkpoint_time
from worker.demo import chat_graph

PASSWORD = "s3cr3t-pw"


@pytest.fixture
async def store(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoints.db"
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
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
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def write_config(
    tmp_path: Path, store: Path, policies: str = "  - {name: trim, keep_last: 2}", extra: str = ""
) -> Path:
    cfg = tmp_path / "janitor.yaml"
    cfg.write_text(
        f"stores:\n  - name: app\n    kind: sqlite\n    path: {store}\n{extra}"
        f"policies:\n{policies}\nlogging: {{format: json}}\n"
    )
    return cfg


def counts(store: Path) -> dict[str, int]:
    with sqlite3.connect(store) as con:
        return dict(con.execute("SELECT thread_id, COUNT(*) FROM checkpoints GROUP BY 1"))


def test_validate_accepts_the_example_config(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "config.example.yaml"
    r = cli("validate", config=example)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_once_trims_and_logs_one_summary(tmp_path: Path, store: Path) -> None:
    cfg = write_config(tmp_path, store)
    r = cli("once", config=cfg)
    assert r.returncode == 0, r.stderr
    assert set(counts(store).values()) == {2}
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    sweeps = [e for e in events if e["event"] == "sweep"]
    assert len(sweeps) == 1 and sweeps[0]["outcome"] == "success"
    assert sweeps[0]["checkpoints"] == 7 * (9 - 2)


def test_once_dry_run_and_plan_json_delete_nothing(tmp_path: Path, store: Path) -> None:
    cfg = write_config(tmp_path, store)
    raw = store.read_bytes()
    r = cli("once", "--dry-run", config=cfg)
    assert r.returncode == 0, r.stderr
    p = cli("plan", "--format", "json", config=cfg)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)["stores"][0]
    assert plan["total"]["checkpoints"] == 7 * 7
    assert plan["policies"][0]["by_reason"]["trimmed"]["checkpoints"] == 7 * 7
    t = cli("plan", config=cfg)
    assert "trimmed" in t.stdout and "would delete" in t.stdout
    assert store.read_bytes() == raw


IDLE = [f"idle-{i}" for i in range(5)]
FRESH = ["user-1", "user-2"]
CHATS = "  - {name: chats, expire_after: 30d, keep_last: 2}"
"""Expires the 5 idle threads of `aged_store` (more than half of its 7) and trims the rest."""


@pytest.fixture
def aged_store(tmp_path: Path) -> Path:
    """7 real chat threads: 5 idle for 60 days, 2 fresh with 4 turns each."""
    path = tmp_path / "aged.db"
    threads = ChatThreads(fresh=dict.fromkeys(FRESH, 4), aged={60.0: dict.fromkeys(IDLE, 2)})
    asyncio.run(build_sqlite(path, threads))
    return path


def thread_facts(store: Path) -> dict[str, tuple[int, int, float]]:
    """Per thread: checkpoints, writes, and the time of its newest checkpoint (from its id)."""
    with sqlite3.connect(store) as con:
        ids = con.execute("SELECT thread_id, checkpoint_id FROM checkpoints").fetchall()
        writes = dict(con.execute("SELECT thread_id, COUNT(*) FROM writes GROUP BY 1"))
    newest: dict[str, float] = {}
    n: dict[str, int] = {}
    for tid, cid in ids:
        t = checkpoint_time(cid)
        assert t is not None
        newest[tid] = max(newest.get(tid, t), t)
        n[tid] = n.get(tid, 0) + 1
    return {tid: (n[tid], writes.get(tid, 0), newest[tid]) for tid in n}


async def read_store(store: Path) -> dict[tuple[str, str, str], object]:
    """Every checkpoint as the real saver reads it back."""
    with sqlite3.connect(store) as con:
        keys = con.execute("SELECT thread_id, checkpoint_ns, checkpoint_id FROM checkpoints")
        all_keys = [tuple(k) for k in keys.fetchall()]
    async with AsyncSqliteSaver.from_conn_string(str(store)) as saver:
        return await read_all(saver, all_keys)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def test_safety_limit_expires_none_however_often_once_runs(
    tmp_path: Path, aged_store: Path
) -> None:
    """All or nothing: 5 of 7 threads due, at most 3 allowed; run after run none goes.

    Trimming still runs. `--allow-mass-expiry` then expires the 5, and each
    audit event says when the thread was last active.
    """
    cfg = write_config(tmp_path, aged_store, CHATS)
    facts = thread_facts(aged_store)
    before = asyncio.run(read_store(aged_store))
    for run in range(3):
        r = cli("once", config=cfg)
        assert r.returncode == 3, (run, r.stderr)
        assert set(counts(aged_store)) == set(IDLE + FRESH), run
        assert "--allow-mass-expiry" in r.stderr
        summary = json.loads(r.stdout)["stores"][0]
        assert summary["outcome"] == "safety_stop"
        assert summary["safety_limit"]["would_stop"] is True
        assert summary["safety_limit"]["threads_to_expire"] == 5
        assert summary["safety_limit"]["max_threads_expired"] == 3
        assert summary["total"]["threads"] == 0
        events = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
        assert [e["threads_to_expire"] for e in events if e["event"] == "safety_stop"] == [5]
        assert not [e for e in events if e["event"] == "thread_expired"]
    # Trimming ran; the idle threads read back as they were.
    assert counts(aged_store) == {**{t: 2 for t in FRESH}, **{t: facts[t][0] for t in IDLE}}
    after = asyncio.run(read_store(aged_store))
    assert {k: v for k, v in after.items() if k[0] in IDLE} == {
        k: v for k, v in before.items() if k[0] in IDLE
    }

    r = cli("once", "--allow-mass-expiry", config=cfg)
    assert r.returncode == 0, r.stderr
    assert set(counts(aged_store)) == set(FRESH)
    assert json.loads(r.stdout)["stores"][0]["total"]["threads"] == 5
    events = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    expired = {e["thread_id"]: e for e in events if e["event"] == "thread_expired"}
    assert set(expired) == set(IDLE)
    for tid, e in expired.items():
        assert e["last_activity"] == iso(facts[tid][2])
        assert 59 * 86400 < e["idle_seconds"] < 61 * 86400
        assert (e["checkpoints"], e["writes"]) == facts[tid][:2]


def test_plan_lists_every_thread_that_would_go(tmp_path: Path, aged_store: Path) -> None:
    """json, jsonl and the --threads table name each thread, and `once` then does just that."""
    cfg = write_config(tmp_path, aged_store, CHATS, extra="defaults: {max_delete_fraction: 1.0}\n")
    facts = thread_facts(aged_store)
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    raw = aged_store.read_bytes()

    p = cli("plan", "--format", "json", "--at", at.isoformat(), config=cfg)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["at"] == iso(at.timestamp())
    threads = {e["thread_id"]: e for e in doc["stores"][0]["threads"]}
    assert set(threads) == set(IDLE + FRESH)
    for tid, e in threads.items():
        n, writes, newest = facts[tid]
        assert e["last_activity"] == iso(newest)
        assert abs(e["idle_seconds"] - (at.timestamp() - newest)) <= 1
        assert e["policy"] == "chats" and e["held_by_safety_limit"] is False
        if tid in IDLE:
            assert (e["action"], e["reason"]) == ("expire", "expired")
            assert (e["checkpoints"], e["writes"]) == (n, writes)
        else:
            assert (e["action"], e["reason"]) == ("trim", "trimmed")
            assert e["checkpoints"] == n - 2
        assert e["bytes"] > 0

    j = cli("plan", "--format", "jsonl", "--at", at.isoformat(), config=cfg)
    assert j.returncode == 0, j.stderr
    lines = [json.loads(x) for x in j.stdout.splitlines()]
    assert lines[0] == {"type": "plan", "at": iso(at.timestamp())}
    streamed = [{k: v for k, v in x.items() if k != "type"} for x in lines[1:-1]]
    assert {x["type"] for x in lines[1:-1]} == {"thread"}
    assert sorted(streamed, key=lambda x: x["thread_id"]) == sorted(
        doc["stores"][0]["threads"], key=lambda x: x["thread_id"]
    )
    assert lines[-1]["type"] == "store" and lines[-1]["total"] == doc["stores"][0]["total"]

    t = cli("plan", "--threads", "--at", at.isoformat(), config=cfg)
    assert t.returncode == 0, t.stderr
    assert f"plan at {iso(at.timestamp())}" in t.stdout
    for tid in IDLE + FRESH:
        row = next(x for x in t.stdout.splitlines() if x.startswith(tid + " "))
        assert ("expire" if tid in IDLE else "trim") in row and iso(facts[tid][2]) in row
    assert aged_store.read_bytes() == raw

    r = cli("once", config=cfg)
    assert r.returncode == 0, r.stderr
    left = thread_facts(aged_store)
    for tid, e in threads.items():
        n, writes, _ = facts[tid]
        now_n, now_writes, _ = left.get(tid, (0, 0, 0.0))
        assert (n - now_n, writes - now_writes) == (e["checkpoints"], e["writes"]), tid


def test_plan_shows_what_the_safety_limit_holds_back(tmp_path: Path, aged_store: Path) -> None:
    """Past the limit, plan lists the held expiries but counts none in its totals."""
    cfg = write_config(tmp_path, aged_store, CHATS)
    p = cli("plan", "--format", "json", config=cfg)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)["stores"][0]
    assert plan["safety_limit"]["would_stop"] is True
    assert plan["total"]["threads"] == 0
    held = {e["thread_id"] for e in plan["threads"] if e["held_by_safety_limit"]}
    assert held == set(IDLE)
    assert {e["thread_id"] for e in plan["threads"] if e["action"] == "trim"} == set(FRESH)
    t = cli("plan", config=cfg)
    assert "none of them" in t.stdout and "--allow-mass-expiry" in t.stdout


def test_a_batch_that_never_gets_the_write_lock_is_skipped_as_locked(
    tmp_path: Path, store: Path
) -> None:
    """The application holds SQLite's write lock for the whole run: nothing goes, reason locked."""
    cfg = write_config(tmp_path, store, extra="defaults:\n  batch: {busy_timeout: 0.2}\n")
    before = counts(store)
    app = sqlite3.connect(store, isolation_level=None)
    try:
        app.execute("BEGIN IMMEDIATE")
        r = cli("once", config=cfg)
        assert r.returncode == 0, r.stderr
        assert counts(store) == before
    finally:
        app.execute("ROLLBACK")
        app.close()
    summary = json.loads(r.stdout)["stores"][0]
    assert summary["locked_threads"] == 7 and summary["changed_threads"] == 0
    assert summary["policies"][0]["skipped"] == {"locked": 7}
    events = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    sweep = next(e for e in events if e["event"] == "sweep")
    assert sweep["locked_threads"] == 7 and sweep["changed_threads"] == 0
    r = cli("once", config=cfg)
    assert r.returncode == 0, r.stderr
    assert set(counts(store).values()) == {2}


def test_purge_prefix_is_a_range_not_like(tmp_path: Path, store: Path) -> None:
    cfg = write_config(tmp_path, store, "  - {name: vip, match: {thread_id: '*'}, protect: true}")
    r = cli("purge", "--thread-prefix", "org-42:user-7:", config=cfg, input="n\n")
    assert r.returncode == 0, r.stderr
    assert "2 threads" in r.stdout and "nothing deleted" in r.stdout
    r = cli("purge", "--thread-prefix", "org-42:user-7:", "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    left = set(counts(store))
    # Protect does not stop a purge; `_` and case are not wildcards.
    assert left == {"user-1", "user-2", "org-42:user-70:a", "org-42_user-7:c", "ORG-42:user-7:d"}
    r = cli("purge", "--thread", "user-1", "--yes", config=cfg)
    assert r.returncode == 0 and "user-1" not in counts(store)
    audit = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    purged = [e for e in audit if e["event"] == "thread_purged" and e["thread_id"] == "user-1"]
    assert len(purged) == 1
    assert purged[0]["last_activity"].endswith("Z") and 0 <= purged[0]["idle_seconds"] < 3600


def test_stats_reports_tables_and_ages(tmp_path: Path, store: Path) -> None:
    cfg = write_config(tmp_path, store)
    r = cli("stats", "--format", "json", config=cfg)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["stores"][0]
    assert s["threads"] == 7
    assert s["tables"]["checkpoints"]["rows"] == 63
    assert s["ages"]['""'] == {"<1h": 63}
    assert s["largest_threads"][0]["checkpoints"] == 9


def test_missing_store_file_fails_with_exit_1(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, tmp_path / "nope.db")
    r = cli("once", config=cfg)
    assert r.returncode == 1
    assert "does not exist" in r.stderr
    assert not (tmp_path / "nope.db").exists()


BAD_CONFIGS = [
    # (name, config text, line, key fragment)
    ("broken yaml", "stores:\n  - name: app\n    kind: [sqlite\npolicies: []\n", 4, None),
    ("unknown key", "{stores}policies:\n  - name: p\n    keep_lats: 3\n", 8, "keep_lats"),
    ("zero duration", "{stores}policies:\n  - name: p\n    expire_after: 0d\n", 8, "expire_after"),
    ("negative keep_last", "{stores}policies:\n  - name: p\n    keep_last: -1\n", 8, "keep_last"),
    ("missing stores", "policies:\n  - name: p\n    keep_last: 1\n", 1, "stores"),
    (
        "unknown store",
        "{stores}policies:\n  - name: p\n    store: nope\n    keep_last: 1\n",
        8,
        "store",
    ),
    ("wrong type", "{stores}policies:\n  - name: p\n    keep_last: five\n", 8, "keep_last"),
    ("empty policies", "{stores}policies: []\n", 6, "policies"),
    (
        "no rule",
        "{stores}policies:\n  - name: p\n    match: {{thread_id: 'a-*'}}\n",
        7,
        "policies[0]",
    ),
    (
        "unset env",
        "{stores}policies:\n  - name: p\n    keep_last: ${{NOPE_NOT_SET}}\n",
        8,
        "keep_last",
    ),
    (
        "bad cron",
        "{stores}policies:\n  - name: p\n    keep_last: 1\n    schedule: {{cron: '61 * * * *'}}\n",
        9,
        "cron",
    ),
    (
        "password in bad dsn",
        "{stores}  - name: pg\n    kind: postgres\n"
        f"    dsn: postgresql://u:{PASSWORD}@h/db\n    pool: {{min_size: 9, max_size: 2}}\n"
        "policies:\n  - name: p\n    keep_last: 1\n",
        9,
        "pool",
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "line", "key"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_exits_2_naming_the_line_and_touches_nothing(
    tmp_path: Path, store: Path, name: str, text: str, line: int, key: str | None
) -> None:
    stores = f"# a config\nstores:\n  - name: app\n    kind: sqlite\n    path: {store}\n"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text.replace("{stores}", stores).replace("{{", "{").replace("}}", "}"))
    raw = store.read_bytes()
    for command in ("once", "validate", "plan"):
        r = cli(command, config=cfg)
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        assert f"{cfg}:{line}:" in r.stderr, r.stderr
        if key is not None:
            assert key in r.stderr
        assert PASSWORD not in r.stderr + r.stdout
    assert store.read_bytes() == raw


def test_unreadable_config_exits_2(tmp_path: Path) -> None:
    r = cli("once", config=tmp_path / "missing.yaml")
    assert r.returncode == 2
    assert "missing.yaml" in r.stderr and "cannot read" in r.stderr
    r = cli("once")
    assert r.returncode == 2 and "--config" in r.stderr
