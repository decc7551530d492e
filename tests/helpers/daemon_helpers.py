"""The real `checkpoint-janitor run` daemon as a subprocess, and what it exports.

`Daemon` starts `python -m worker --config X run`, keeps its stderr (JSON log
lines) in a file, and reads `/metrics`, `/healthz` and `/readyz` over HTTP.
`Scrape` is one parsed `/metrics` answer (parsed with `prometheus_client`'s own
text parser). `wait_until` polls with a deadline instead of sleeping blindly.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from helpers.scenarios import turns
from worker.service.demo import aged, approval_graph, chat_graph, thread

PREFIX = "checkpoint_janitor_"
DAY = 86400.0


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    interval: float = 0.2,
    detail: Callable[[], str] | None = None,
) -> float:
    """Poll `check` until it is true; returns the seconds waited, fails after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)
    return time.monotonic() - start


# ------------------------------------------------------------------ HTTP and metrics


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; error statuses are answers too, not exceptions."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@dataclass(frozen=True)
class Scrape:
    """One parsed exposition (a `/metrics` answer, a pushed body or a textfile)."""

    text: str
    families: dict[str, Metric]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        """Parse the text format with `prometheus_client.parser`."""
        return cls(text, {f.name: f for f in text_string_to_metric_families(text)})

    def samples(self, name: str, **labels: str) -> list[Sample]:
        """Samples named `PREFIX + name` (e.g. `deleted_total`) whose labels include `labels`."""
        full = PREFIX + name
        return [
            s
            for f in self.families.values()
            for s in f.samples
            if s.name == full and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """Sum of the matching samples; None when there is none."""
        found = self.samples(name, **labels)
        return sum(s.value for s in found) if found else None

    def total(self, name: str, **labels: str) -> float:
        """Sum of the matching samples; 0 when there is none."""
        return self.value(name, **labels) or 0.0


# ------------------------------------------------------------------ the daemon


class Daemon:
    """`checkpoint-janitor --config CONFIG run` in a subprocess, logging JSON to a file."""

    def __init__(
        self,
        config: Path,
        port: int,
        workdir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        options: Sequence[str] = (),
    ) -> None:
        """Start `checkpoint-janitor --config CONFIG [OPTIONS] run [ARGS]` in `workdir`."""
        self.config = config
        self.port = port
        self.stderr_path = workdir / f"daemon-{port}.stderr"
        self._stderr = open(self.stderr_path, "w")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--config", str(config), *options, "run", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            cwd=workdir,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    @property
    def base(self) -> str:
        """The HTTP root of the daemon's listen address."""
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        """Everything the daemon logged so far."""
        return self.stderr_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events so far (those named `name`, if given)."""
        out = []
        for line in self.stderr().splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:  # a line still being written
                continue
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def events_after(self, name: str) -> list[dict[str, Any]]:
        """The events logged after the first event named `name` (none if it has not come)."""
        events = self.events()
        names = [e.get("event") for e in events]
        return events[names.index(name) + 1 :] if name in names else []

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def diagnose(self) -> str:
        """The exit code and the log's tail, for failure messages."""
        tail = "\n".join(self.stderr().splitlines()[-30:])
        return f"daemon returncode={self.proc.poll()}; stderr tail:\n{tail}"

    def get(self, path: str) -> tuple[int, str]:
        """GET `path` on the daemon's HTTP server."""
        return http_get(self.base + path)

    def scrape(self) -> Scrape:
        """GET /metrics and parse it."""
        status, body = self.get("/metrics")
        assert status == 200, (status, body)
        return Scrape.parse(body)

    def wait(self, check: Callable[[], bool], timeout: float, what: str) -> float:
        """`wait_until` that fails at once, with the log, if the daemon dies."""

        def alive_and(check: Callable[[], bool] = check) -> bool:
            assert self.alive(), f"daemon died while waiting for {what}\n{self.diagnose()}"
            return check()

        return wait_until(alive_and, timeout, what, detail=self.diagnose)

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Until the HTTP server answers /healthz."""

        def serving() -> bool:
            try:
                return self.get("/healthz")[0] in (200, 503)
            except OSError:
                return False

        self.wait(serving, timeout, "the HTTP server to answer")

    def wait_metric(
        self, name: str, predicate: Callable[[float | None], bool], timeout: float, **labels: str
    ) -> Scrape:
        """Scrape until the sum of `name{labels}` satisfies `predicate`; returns that scrape."""
        last: list[Scrape] = []

        def check() -> bool:
            last[:] = [self.scrape()]
            return predicate(last[0].value(name, **labels))

        self.wait(check, timeout, f"{name}{labels} to satisfy the condition")
        return last[0]

    def send(self, sig: signal.Signals) -> None:
        """Send `sig` to the daemon."""
        self.proc.send_signal(sig)

    def stop(
        self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0
    ) -> tuple[int, float]:
        """Send `sig` and wait for the exit: (returncode, seconds it took)."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self._stderr.close()
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        """Teardown: make sure the process is gone."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._stderr.close()


# ------------------------------------------------------------------ stores


@dataclass(frozen=True)
class ChatThreads:
    """Chat threads to write: id -> turns, fresh, or aged by `days`."""

    fresh: dict[str, int]
    aged: dict[float, dict[str, int]]
    waiting_aged: dict[float, Sequence[str]] | None = None
    """Threads paused at `interrupt()` (approval graph), written `days` ago."""


async def write_chats(saver: Any, threads: ChatThreads) -> None:
    """Run real chat graphs through `saver`: aged threads first, then fresh ones.

    (`aged` resets LangGraph's monotonic id guard, so old ids go first.)
    """
    chat = chat_graph(saver)
    for days, ids in sorted(threads.aged.items(), reverse=True):
        with aged(days):
            for tid, n in ids.items():
                await turns(chat, tid, n)
    for days, waiting in sorted((threads.waiting_aged or {}).items(), reverse=True):
        with aged(days):
            for tid in waiting:
                await approval_graph(saver).ainvoke({"messages": ["refund?"]}, thread(tid))
    for tid, n in threads.fresh.items():
        await turns(chat, tid, n)


async def build_sqlite(path: Path, threads: ChatThreads) -> None:
    """A SQLite store at `path` written by the real `AsyncSqliteSaver`."""
    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        await write_chats(saver, threads)
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")


async def build_postgres(dsn: str, threads: ChatThreads) -> None:
    """A Postgres store written by the real `AsyncPostgresSaver` (tables made by `setup()`)."""
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    async with AsyncPostgresSaver.from_conn_string(dsn) as saver:
        await saver.setup()
        await write_chats(saver, threads)


def sqlite_rows(path: Path) -> dict[str, int]:
    """Rows per kind in a SQLite store (threads: distinct thread ids with a checkpoint)."""
    with sqlite3.connect(path, timeout=10) as con:

        def one(sql: str) -> int:
            return int(con.execute(sql).fetchone()[0])

        return {
            "checkpoints": one("SELECT COUNT(*) FROM checkpoints"),
            "writes": one("SELECT COUNT(*) FROM writes"),
            "blobs": 0,
            "threads": one("SELECT COUNT(DISTINCT thread_id) FROM checkpoints"),
        }


async def pg_rows(dsn: str) -> dict[str, int]:
    """Rows per kind in a Postgres store."""
    import asyncpg

    con = await asyncpg.connect(dsn)
    try:
        one = con.fetchval
        return {
            "checkpoints": int(await one("SELECT COUNT(*) FROM checkpoints")),
            "writes": int(await one("SELECT COUNT(*) FROM checkpoint_writes")),
            "blobs": int(await one("SELECT COUNT(*) FROM checkpoint_blobs")),
            "threads": int(await one("SELECT COUNT(DISTINCT thread_id) FROM checkpoints")),
        }
    finally:
        await con.close()


def gone(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Rows per kind that went between two counts."""
    return {k: before[k] - after[k] for k in before}


def exported_deleted(scrape: Scrape, store: str, kinds: Iterable[str]) -> dict[str, int]:
    """`deleted_total` per kind, summed over the store's policies."""
    return {k: int(scrape.total("deleted_total", store=store, kind=k)) for k in kinds}
