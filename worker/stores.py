"""Opening the store engine a config names."""

from __future__ import annotations

from policies.config import BatchSettings, StoreConfig
from worker.engine import StoreEngine, StoreError
from worker.sqlite_store import SqliteStore


def make_engine(store: StoreConfig, settings: BatchSettings) -> StoreEngine:
    """An unopened engine for `store`; `open()` it before use."""
    key = store.encryption_key.get_secret_value() if store.encryption_key else None
    if store.kind == "sqlite":
        assert store.path is not None  # the schema requires it for sqlite
        return SqliteStore(
            store.name, store.path, busy_timeout=settings.busy_timeout, encryption_key=key
        )
    raise StoreError(store.name, f"store kind {store.kind!r} is not supported yet")
