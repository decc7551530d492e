"""Shared fixtures.  Server plumbing lives in tests/helpers/pgserver.py; this file only wires it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from helpers.pgserver import COLLATIONS, PgServer, unique_db_name


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One throwaway PostgreSQL cluster per test session (see tests/helpers/pgserver.py).

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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that asks for a Postgres database runs on each of `COLLATIONS`.

    Production clusters rarely use C; ordering and prefix bugs show only on
    ICU. Session scope, so module-scoped templates are built once per collation.
    """
    if "pg_collation" in metafunc.fixturenames:
        metafunc.parametrize("pg_collation", sorted(COLLATIONS), indirect=True, scope="session")


@pytest.fixture(scope="session")
def pg_collation(request: pytest.FixtureRequest) -> str:
    """The default collation of a test's databases (a key of `pgserver.COLLATIONS`).

    A test that asks for `pg_dsn` only at run time (`request.getfixturevalue`)
    cannot be parametrized: it gets ICU, the kind production clusters have.
    """
    return str(getattr(request, "param", "icu"))


@pytest.fixture
def pg_dsn(pg_server: PgServer, pg_collation: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """URL DSN of a fresh database (collation `pg_collation`), dropped after the test."""
    name = unique_db_name(request.node.name)
    pg_server.ensure_running()  # a previous test may have stopped it
    yield pg_server.create_database(name, pg_collation)
    pg_server.ensure_running()
    pg_server.drop_database(name)
