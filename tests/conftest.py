"""Shared fixtures.  Server plumbing lives in tests/helpers/pgserver.py; this file only wires it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from helpers.backends import (
    BACKENDS,
    Backend,
    Pair,
    PostgresBackend,
    SqliteBackend,
    Stores,
    Template,
    build_template,
)
from helpers.pgserver import COLLATIONS, PgServer, unique_db_name
from helpers.scenarios import build_mixed_store, build_replay_store


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
    """Every test that asks for a Postgres database runs on each of `COLLATIONS`;
    every test that asks for a `backend` runs on each of `BACKENDS`.

    Production clusters rarely use C; ordering and prefix bugs show only on
    ICU. Session scope, so module-scoped templates are built once per collation
    (per backend).
    """
    if "pg_collation" in metafunc.fixturenames:
        metafunc.parametrize("pg_collation", sorted(COLLATIONS), indirect=True, scope="session")
    elif "backend" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("backends")
        names = list(only.args) if only else BACKENDS
        metafunc.parametrize("backend", names, indirect=True, scope="session")


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


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> Backend:
    """The store backend a scenario runs on (`helpers.backends`); a name of `BACKENDS`.

    The Postgres server is asked for only here, so that SQLite runs never wait
    for it (and, outside CI, run where no PostgreSQL is installed).
    """
    name = str(request.param)
    if name == "sqlite":
        return SqliteBackend()
    server: PgServer = request.getfixturevalue("pg_server")
    return PostgresBackend(server, name.removeprefix("postgres-"))


@pytest.fixture
def stores(backend: Backend, request: pytest.FixtureRequest) -> Iterator[Stores]:
    """The test's own stores on `backend`, removed after it."""
    made = backend.stores(request.node.name)
    yield made
    made.close()


@pytest.fixture(scope="module")
def mixed_template(backend: Backend) -> Iterator[Template]:
    """One mixed store (`scenarios.build_mixed_store`), built once; tests sweep copies."""
    made = backend.stores("mixed_template")
    yield build_template(backend, made, build_mixed_store)
    made.close()


@pytest.fixture
def mixed(mixed_template: Template, stores: Stores) -> Template:
    """The test's own copy of the mixed store."""
    template, shapes = mixed_template
    return stores.clone(template), shapes


@pytest.fixture
def mixed_pair(mixed_template: Template, stores: Stores) -> Pair:
    """Two copies of the mixed store: one to act on (hold threads in), one untouched control."""
    template, shapes = mixed_template
    return stores.clone(template), stores.clone(template), shapes


@pytest.fixture(scope="module")
def replay_template(backend: Backend) -> Iterator[Template]:
    """Persistent subgraphs (plain and DeltaChannel, with forks), built once."""
    made = backend.stores("replay_template")
    yield build_template(backend, made, build_replay_store)
    made.close()
