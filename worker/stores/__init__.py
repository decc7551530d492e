"""Opening the store engine a config names."""

from __future__ import annotations

from policies.config import BatchSettings, StoreConfig
from worker.engine import StoreEngine, StoreError


def make_engine(
    store: StoreConfig, settings: BatchSettings, *, read_only: bool = False
) -> StoreEngine:
    """An unopened engine for `store`; `open()` it before use.

    `read_only`: the caller only reads (a dry run, `stats`); a SQLite file is
    then opened read-only, so it may belong to another user.
    """
    # Imported here, not at the top: the engines import `worker.stores.archive`,
    # and a package that imported them back at load time would be circular.
    from worker.postgres_store import PostgresStore
    from worker.sqlite_store import SqliteStore

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
