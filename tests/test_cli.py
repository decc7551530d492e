"""The command line, run as a user runs it: a subprocess on a real store."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers.daemon_helpers import ChatThreads, build_sqlite
from helpers.scenarios import cli, read_all, turns
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from policies.ids import checkpoint_time
from worker.service.demo import chat_graph

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
    r = cli("purge", "--thread-prefix", "org-42:user-7:", config=cfg, input="n\n", terminal=True)
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
    assert s["ages"][""] == {"<1h": 63}
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


# ------------------------------------------------------------------ issue 11: purge


def test_purge_takes_every_thread_option(tmp_path: Path, store: Path) -> None:
    """`--thread a --thread b` deletes both (click kept only the last one)."""
    cfg = write_config(tmp_path, store)
    r = cli("purge", "--thread", "user-1", "--thread", "org-42:user-7:a", "--yes", config=cfg)
    assert r.returncode == 0, r.stderr
    assert "2 threads" in r.stdout
    left = set(counts(store))
    assert left == {"user-2", "org-42:user-7:b", "org-42:user-70:a", "org-42_user-7:c"} | {
        "ORG-42:user-7:d"
    }


def test_purge_without_a_terminal_needs_yes(tmp_path: Path, store: Path) -> None:
    """No terminal and no --yes: exit 2 with a message before the store is opened."""
    cfg = write_config(tmp_path, store)
    raw = store.read_bytes()
    r = cli("purge", "--thread", "user-1", config=cfg)  # stdin is an empty pipe
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "--yes" in r.stderr and "Aborted" not in r.stderr + r.stdout
    assert r.stdout == ""
    assert store.read_bytes() == raw
    # At a terminal the question is asked; "y" deletes.
    r = cli("purge", "--thread", "user-1", config=cfg, input="y\n", terminal=True)
    assert r.returncode == 0, r.stderr
    assert "user-1" not in counts(store)


# ------------------------------------------------------------------ issue 11: bad DSNs


BAD_DSNS = [
    (
        "url sslmode",
        f"postgresql://janitor:{PASSWORD}@db.invalid:5432/app?sslmode=bogus",
        "sslmode",
    ),
    ("url port", f"postgresql://janitor:{PASSWORD}@db.invalid:notaport/app", "port"),
    ("keyword sslmode", f"host=db.invalid password={PASSWORD} sslmode=bogus", "sslmode"),
    ("keyword port", f"host=db.invalid port=notaport password={PASSWORD}", "port"),
    ("unknown option", f"postgresql://janitor:{PASSWORD}@db.invalid/app?sslmod=require", "sslmod"),
    ("unparsable", f"host=db.invalid password={PASSWORD} dbname", "cannot be parsed"),
]


@pytest.mark.parametrize(("name", "dsn", "fragment"), BAD_DSNS, ids=[d[0] for d in BAD_DSNS])
def test_bad_dsn_is_a_config_error_naming_its_line(
    tmp_path: Path, store: Path, name: str, dsn: str, fragment: str
) -> None:
    """A DSN with a bad option exits 2 from `validate`, before any store is opened.

    It used to pass validation and end in a traceback (or exit 1) on connect.
    The password is never printed.
    """
    cfg = write_config(
        tmp_path,
        store,
        extra="  - name: pg\n    kind: postgres\n    dsn: ${JANITOR_TEST_DSN}\n",
    )
    raw = store.read_bytes()
    for command in ("validate", "once", "plan"):
        r = cli(command, config=cfg, env={"JANITOR_TEST_DSN": dsn})
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        assert f"{cfg}:7: stores[1].dsn:" in r.stderr, r.stderr
        assert fragment in r.stderr and "Traceback" not in r.stderr
        assert PASSWORD not in r.stderr + r.stdout
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert store.read_bytes() == raw


# ------------------------------------------------------------------ issue 11: validate


def test_validate_offline_skips_lookups_and_checks_the_rest(tmp_path: Path) -> None:
    """`validate --offline` checks a config whose secrets exist only where it runs."""
    cfg = tmp_path / "pod.yaml"
    text = (
        "stores:\n"
        "  - name: pg\n    kind: postgres\n    dsn: ${file:/run/secrets/nowhere/dsn}\n"
        "    encryption_key: ${JANITOR_UNSET_KEY}\n"
        "policies:\n  - {name: trim, keep_last: 2}\n"
    )
    cfg.write_text(text)
    online = cli("validate", config=cfg)
    assert online.returncode == 2 and "nowhere/dsn" in online.stderr, online.stderr
    assert "JANITOR_UNSET_KEY" in online.stderr  # both lookups are reported
    r = cli("validate", "--offline", config=cfg)
    assert r.returncode == 0, r.stderr
    assert "stores[0].dsn" in r.stdout and "stores[0].encryption_key" in r.stdout
    # Everything else is still checked, and every problem is listed.
    cfg.write_text(
        text.replace("keep_last: 2", "keep_last: 0").replace("kind: postgres", "kind: pg")
    )
    r = cli("validate", "--offline", config=cfg)
    assert r.returncode == 2
    assert f"{cfg}:3: stores[0].kind" in r.stderr and f"{cfg}:7: policies[0].keep_last" in r.stderr


@pytest.mark.parametrize(
    "configmap",
    sorted((Path(__file__).parent.parent / "deploy" / "kubernetes").glob("*/configmap.yaml")),
    ids=lambda p: p.parent.name,
)
def test_the_deploy_docs_validate_step_works_on_the_shipped_configmaps(
    tmp_path: Path, configmap: Path
) -> None:
    """docs/deploying.md's "check an edited ConfigMap" commands, run as written.

    The DSN file is mounted only in the pod, so a plain `validate` cannot read it.
    """
    import sys

    docs = (Path(__file__).parent.parent / "docs" / "deploying.md").read_text()
    (block,) = [b for b in re.findall(r"```sh\n(.*?)```", docs, re.S) if "validate --offline" in b]
    script = (
        block.replace("deploy/kubernetes/postgres-deployment/configmap.yaml", str(configmap))
        .replace("python3 ", f"{sys.executable} ")
        .replace("checkpoint-janitor --config", f"{sys.executable} -m worker --config")
    )
    repo = str(Path(__file__).parent.parent)
    r = subprocess.run(
        ["sh", "-ec", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": repo},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok (offline" in r.stdout, r.stdout
    if "${file:" in configmap.read_text():
        assert "not looked up: stores[0].dsn" in r.stdout, r.stdout


def test_validate_reports_every_error(tmp_path: Path, store: Path) -> None:
    """One run lists them all, each with its line (it used to stop at the first)."""
    cfg = write_config(
        tmp_path,
        store,
        policies=(
            "  - {name: a, keep_last: 0}\n"
            "  - {name: b, keep_lats: 3}\n"
            "  - {name: c, expire_after: '${JANITOR_UNSET_VARIABLE}'}\n"
            "  - {name: d, keep_within: 0d}\n"
        ),
    )
    r = cli("validate", config=cfg)
    assert r.returncode == 2
    found = re.findall(
        rf"^(?:checkpoint-janitor: )?{re.escape(str(cfg))}:(\d+): (\S+):", r.stderr, re.M
    )
    assert found == [
        ("6", "policies[0].keep_last"),
        ("7", "policies[1].keep_lats"),
        ("8", "policies[2].expire_after"),
        ("9", "policies[3].keep_within"),
    ], r.stderr
    assert len(r.stderr.strip().splitlines()) == 4, r.stderr


def test_misspelt_top_level_key_is_reported_at_its_line(tmp_path: Path, store: Path) -> None:
    """`polices:` is an unknown key with a did-you-mean, not "`policies` is missing" at line 1."""
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(
        f"stores:\n  - {{name: app, kind: sqlite, path: {store}}}\n"
        "polices:\n  - {name: trim, keep_last: 2}\n"
    )
    r = cli("validate", config=cfg)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"checkpoint-janitor: {cfg}:3: polices: unknown key 'polices'; did you mean 'policies'? "
        "(allowed here: stores, defaults, policies, metrics, logging)"
    ], r.stderr


def test_jitter_may_be_zero(tmp_path: Path, store: Path) -> None:
    """`jitter: 0s` is "no jitter"; a zero retention duration is still an error."""
    cfg = write_config(tmp_path, store, extra="defaults: {jitter: 0s, batch: {pause: 0s}}\n")
    r = cli("validate", config=cfg)
    assert r.returncode == 0, r.stderr
    cfg = write_config(tmp_path, store, "  - {name: idle, expire_after: 0s}")
    r = cli("validate", config=cfg)
    assert r.returncode == 2 and "zero" in r.stderr


def test_version() -> None:
    import importlib.metadata

    r = cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        f"checkpoint-janitor, version {importlib.metadata.version('checkpoint-janitor')}"
    )


# ------------------------------------------------------------------ issue 11: output


async def test_stats_buckets_are_in_age_order(tmp_path: Path) -> None:
    """Buckets youngest first whatever order the rows come in; the root namespace is `""`.

    The store is read in thread-id order: `a-old` (40 days) comes before
    `b-new`, so "first seen" order would put `<90d` before `<1h`.
    """
    from helpers.daemon_helpers import ChatThreads, build_sqlite

    path = tmp_path / "ages.db"
    await build_sqlite(
        path, ChatThreads(fresh={"b-new": 1}, aged={40.0: {"a-old": 1}, 10.0: {"a-mid": 1}})
    )
    cfg = write_config(tmp_path, path)
    r = cli("stats", "--format", "json", config=cfg)
    assert r.returncode == 0, r.stderr
    ages = json.loads(r.stdout)["stores"][0]["ages"]
    assert list(ages) == [""]
    assert list(ages[""]) == ["<1h", "<30d", "<90d"]
    t = cli("stats", config=cfg)
    assert '    "": <1h 3, <30d 3, <90d 3' in t.stdout.splitlines(), t.stdout


def test_plan_table_has_no_blobs_column_for_sqlite(tmp_path: Path, store: Path) -> None:
    """SQLite keeps no blobs: a column of zeros would suggest otherwise."""
    cfg = write_config(tmp_path, store)
    r = cli("plan", config=cfg)
    assert r.returncode == 0, r.stderr
    # After the "plan at" line and the store's title line.
    header = r.stdout.splitlines()[3].split()
    assert header == ["policy", "reason", "threads", "checkpoints", "writes", "bytes"]


def test_demo_can_run_again_without_the_store_growing(tmp_path: Path) -> None:
    """Three demo runs leave a store of about the first run's size.

    It used to add turns to the surviving threads, and the subgraph thread's
    messages doubled every run: 0.35, 1.9, then 86 MB.
    """
    db = tmp_path / "checkpoints.db"
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(
        f"stores:\n  - {{name: app, kind: sqlite, path: {db}}}\n"
        "policies:\n  - {name: idle, expire_after: 30d}\n"
    )

    def size() -> int:
        return sum(p.stat().st_size for p in tmp_path.glob("checkpoints.db*"))

    sizes = []
    for _ in range(3):
        r = cli("demo", config=cfg, timeout=300)
        assert r.returncode == 0, r.stderr
        sizes.append(size())
    assert max(sizes) <= 1.2 * sizes[0], sizes
