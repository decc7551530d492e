"""The official checkpointer spec (`langgraph-checkpoint-conformance`) against `RetentionSaver`.

Run around `InMemorySaver`, `AsyncSqliteSaver` and `AsyncPostgresSaver` (on
the test server) with `keep_last=4`: the suite stores up to four checkpoints a
thread and drives the async API, so a trimming wrapper must still behave as a
plain saver there (retention itself is proven in tests/test_saver.py). Every
capability the wrapper offers must be detected and pass, `prune` and
`delete_for_runs` included; the report is printed into the test output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.report import CapabilityReport, ProgressCallbacks
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from prometheus_client import CollectorRegistry

from worker.saver import RetentionSaver

KEEP_LAST = 4
EXPECTED = {"put", "put_writes", "get_tuple", "list", "delete_thread", "prune", "delete_for_runs"}


def _wrap(inner: Any) -> RetentionSaver:
    # expire_after is set (far off) so the read and write expiry paths run too.
    return RetentionSaver(
        inner, keep_last=KEEP_LAST, expire_after="30d", registry=CollectorRegistry()
    )


async def _check(registered: Any, capsys: pytest.CaptureFixture[str]) -> CapabilityReport:
    report = await validate(registered, progress=ProgressCallbacks.verbose())
    with capsys.disabled():
        print()
        report.print_report()
    detected = {name for name, r in report.results.items() if r.detected}
    assert detected == EXPECTED, report.to_dict()
    assert report.passed_all(), report.to_dict()
    return report


async def test_conformance_in_memory(capsys: pytest.CaptureFixture[str]) -> None:
    @checkpointer_test(name="RetentionSaver(InMemorySaver)")
    async def factory() -> AsyncGenerator[RetentionSaver, None]:
        yield _wrap(InMemorySaver())

    await _check(factory, capsys)


async def test_conformance_async_sqlite(capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:

        @checkpointer_test(name="RetentionSaver(AsyncSqliteSaver)")
        async def factory() -> AsyncGenerator[RetentionSaver, None]:
            # A file per capability suite: a fresh store, as the suite expects.
            fd, path = tempfile.mkstemp(suffix=".db", dir=tmp)
            os.close(fd)
            async with AsyncSqliteSaver.from_conn_string(path) as saver:
                await saver.setup()
                yield _wrap(saver)

        await _check(factory, capsys)


async def test_conformance_async_postgres(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    async with AsyncPostgresSaver.from_conn_string(pg_dsn) as setup:
        await setup.setup()

    @checkpointer_test(name="RetentionSaver(AsyncPostgresSaver)")
    async def factory() -> AsyncGenerator[RetentionSaver, None]:
        async with AsyncPostgresSaver.from_conn_string(pg_dsn) as saver:
            yield _wrap(saver)
            # Fresh tables for the next capability suite.
            with contextlib.suppress(Exception):
                async with saver._cursor() as cur:
                    await cur.execute("TRUNCATE checkpoints, checkpoint_blobs, checkpoint_writes")

    await _check(factory, capsys)
