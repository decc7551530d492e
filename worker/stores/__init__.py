"""Opening the store engine a config names."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from policies.config import POSTGRES_EXTRA_MISSING, BatchSettings, StoreConfig
from worker.stores.engine import StoreEngine, StoreError

if TYPE_CHECKING:
    from worker.stores.postgres import PostgresStore


def make_engine(
    store: StoreConfig, settings: BatchSettings, *, read_only: bool = False
) -> StoreEngine:
    """An unopened engine for `store`; `open()` it before use.

    `read_only`: the caller only reads (a dry run, `stats`); a SQLite file is
    then opened read-only, so it may belong to another user.

    Raises:
        StoreError: a postgres store on an install without the `postgres` extra.
    """
    # Imported here, not at the top: the engines import `worker.stores.archive`,
    # and a package that imported them back at load time would be circular.
    from worker.stores.sqlite import SqliteStore

    key = store.encryption_key.get_secret_value() if store.encryption_key else None
    if store.kind == "sqlite":
        assert store.path is not None  # the schema requires it for sqlite
        return SqliteStore(
            store.name,
            store.path,
            busy_timeout=settings.busy_timeout,
            encryption_key=key,
            read_only=read_only,
        )
    if store.kind == "postgres":
        assert store.dsn is not None  # the schema requires it for postgres
        try:
            # Imported here: the Postgres driver comes with the `postgres` extra only.
            from worker.stores.postgres import PostgresStore
        except ImportError as e:
            raise StoreError(store.name, f"{POSTGRES_EXTRA_MISSING} ({e})") from None
        return PostgresStore(
            store.name,
            store.dsn.get_secret_value(),
            schema=store.schema_,
            min_size=store.pool.min_size,
            max_size=store.pool.max_size,
            lock_timeout=settings.lock_timeout,
            statement_timeout=settings.statement_timeout,
            grace_period=settings.grace_period.total_seconds(),
        )
    raise StoreError(store.name, f"unknown store kind {store.kind!r}")


def as_postgres(engine: StoreEngine) -> PostgresStore | None:
    """`engine` if it is the Postgres engine, else None.

    An engine can only be a `PostgresStore` once `make_engine` has imported
    that module, so this never imports the Postgres driver itself (a
    SQLite-only install has none).
    """
    if "worker.stores.postgres" not in sys.modules:
        return None
    from worker.stores.postgres import PostgresStore

    return engine if isinstance(engine, PostgresStore) else None
