"""Shared fixtures.  Server plumbing lives in tests/pgserver.py; this file only wires it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from pgserver import PgServer, unique_db_name


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One throwaway PostgreSQL cluster per test session (see tests/pgserver.py).

    If it cannot start: the test fails under CI=true, and is skipped otherwise.
    """
    server = PgServer()
    try:
        server.start()
    except Exception as exc:
        server.close()
        reason = f"throwaway PostgreSQL server could not be started: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    yield server
    server.close()


@pytest.fixture
def pg_dsn(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """URL DSN of a fresh database, dropped after the test."""
    name = unique_db_name(request.node.name)
    pg_server.ensure_running()  # a previous test may have stopped it
    yield pg_server.create_database(name)
    pg_server.ensure_running()
    pg_server.drop_database(name)
