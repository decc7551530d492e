"""Orphan reconciliation: which threads of a page an application's registry still lists.

An `orphaned` policy names a query returning the thread ids the application
still knows. Loading them all would not fit a 10M-thread registry, and
comparing two sorted streams from two databases breaks on collations that
order ids differently. So, per keyset page of the store's thread ids, the
registry is asked which of THESE ids its query returns: the user's query
wrapped in a lookup by the page's ids, which the registry's own index
answers, in its own collation. Memory stays one page.

The registry is checked once per sweep before any page: a query that fails
or returns no rows at all leaves its policy without an answer, and the policy
matches nothing that sweep (`policies.matching.Ruleset`): an empty registry
never means "every thread is orphaned". A registry that fails mid-sweep loses
its answer from then on, and the sweep drops the policy's expiries
(`OrphanLookup.failed`).

Queries run read-only: SQLite on a `mode=ro` connection, Postgres in a READ
ONLY transaction, and both drivers refuse more than one statement.
(docs/architecture.md "Layers": `worker/sweep/orphans.py` once the sweep is a package.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

import aiosqlite
import structlog

from policies.config import BatchSettings, OrphanSource, Policy, redact_dsn
from worker.stores import as_postgres
from worker.stores.engine import StoreEngine
from worker.stores.sqlite import READ_ONLY, SqliteStore, store_uri

if TYPE_CHECKING:
    # At run time imported where used: a SQLite-only install has no Postgres driver.
    import asyncpg

log = structlog.get_logger("checkpoint_janitor.orphans")

# The user's query is a subquery: `WITH q(id)` names its one column `id` whatever
# it is called (SQLite refuses a query of more columns: one column is the contract),
# and the page's ids come as one JSON array, past SQLite's bound-parameter limit.
SQLITE_KNOWN_SQL = (
    "WITH q(id) AS ({query}) SELECT id FROM q WHERE id IN (SELECT value FROM json_each(?))"
)
# EXISTS stops at the first row: a 10M-row registry answers at once.
SQLITE_NONEMPTY_SQL = "SELECT EXISTS (SELECT 1 FROM ({query}))"
# `q(id)` renames the first column whatever its name; a non-text column fails at
# once (uuid = text), which the sweep's check reports, instead of matching nothing.
POSTGRES_KNOWN_SQL = "SELECT q.id FROM ({query}) AS q(id) WHERE q.id = ANY($1::text[])"
POSTGRES_NONEMPTY_SQL = "SELECT EXISTS (SELECT 1 FROM ({query}) AS q)"


class RegistryError(StrEnum):
    """Why an orphan policy had no registry answer (`orphan_registry_errors_total{reason}`)."""

    UNREACHABLE = "unreachable"
    """The registry's database could not be opened."""
    QUERY_FAILED = "query-failed"
    """The query (or its lookup by thread ids) raised an error."""
    EMPTY = "empty"
    """The query returned no rows at all: read as a broken query, never as "all orphaned"."""


class Registry(Protocol):
    """One orphan policy's registry, open for one sweep."""

    async def nonempty(self) -> bool:
        """Whether the query returns at least one row."""

    async def known(self, thread_ids: Sequence[str]) -> set[str]:
        """The ones of `thread_ids` the query returns."""

    async def close(self) -> None:
        """Release what `open_registry` opened."""


class SqliteRegistry:
    """A registry query on a SQLite file, on its own read-only connection."""

    def __init__(self, conn: aiosqlite.Connection, query: str) -> None:
        self.conn = conn
        self.known_sql = SQLITE_KNOWN_SQL.format(query=query)
        self.nonempty_sql = SQLITE_NONEMPTY_SQL.format(query=query)

    async def nonempty(self) -> bool:
        """Whether the query returns at least one row."""
        async with self.conn.execute(self.nonempty_sql) as cur:
            row = await cur.fetchone()
        return bool(row and row[0])

    async def known(self, thread_ids: Sequence[str]) -> set[str]:
        """The ones of `thread_ids` the query returns."""
        async with self.conn.execute(self.known_sql, (json.dumps(list(thread_ids)),)) as cur:
            return {str(r[0]) for r in await cur.fetchall()}

    async def close(self) -> None:
        """Close the connection."""
        await self.conn.close()


class PostgresRegistry:
    """A registry query on a Postgres database: the store's pool, or a connection of its own."""

    def __init__(
        self,
        conn: asyncpg.Pool | asyncpg.Connection,
        query: str,
        timeout: float,
        owned: bool,
    ) -> None:
        self.conn = conn
        self.known_sql = POSTGRES_KNOWN_SQL.format(query=query)
        self.nonempty_sql = POSTGRES_NONEMPTY_SQL.format(query=query)
        self.timeout = timeout
        self.owned = owned

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        import asyncpg

        if isinstance(self.conn, asyncpg.Pool):
            async with self.conn.acquire() as conn, conn.transaction(readonly=True):
                return list(await conn.fetch(sql, *args, timeout=self.timeout))
        async with self.conn.transaction(readonly=True):
            return list(await self.conn.fetch(sql, *args, timeout=self.timeout))

    async def nonempty(self) -> bool:
        """Whether the query returns at least one row."""
        rows = await self._fetch(self.nonempty_sql)
        return bool(rows and rows[0][0])

    async def known(self, thread_ids: Sequence[str]) -> set[str]:
        """The ones of `thread_ids` the query returns."""
        return {str(r[0]) for r in await self._fetch(self.known_sql, list(thread_ids))}

    async def close(self) -> None:
        """Close the connection this registry opened (never the store's pool)."""
        import asyncpg

        if self.owned and isinstance(self.conn, asyncpg.Connection):
            await self.conn.close()


async def open_registry(engine: StoreEngine, policy: Policy, settings: BatchSettings) -> Registry:
    """The registry of `policy`: its `source`, or the store's own database."""
    assert policy.orphaned is not None
    query = policy.orphaned.query
    source = policy.orphaned.source
    if source is None:
        if isinstance(engine, SqliteStore):
            return SqliteRegistry(await _sqlite_read_only(engine.path), query)
        if (pg := as_postgres(engine)) is not None:
            return PostgresRegistry(pg.pool, query, pg.statement_timeout, owned=False)
        raise TypeError(f"no registry for a {type(engine).__name__} store")
    if source.kind == "sqlite":
        assert source.path is not None
        return SqliteRegistry(await _sqlite_read_only(source.path), query)
    return PostgresRegistry(
        await _postgres_connect(source), query, settings.statement_timeout, owned=True
    )


async def _sqlite_read_only(path: str) -> aiosqlite.Connection:
    # `mode=ro` never creates the file: a misspelt path fails instead of reading as empty.
    return await aiosqlite.connect(store_uri(path, READ_ONLY), uri=True, isolation_level=None)


async def _postgres_connect(source: OrphanSource) -> asyncpg.Connection:
    import asyncpg

    from worker.stores.postgres import connect_kwargs

    assert source.dsn is not None
    return await asyncpg.connect(
        **connect_kwargs(source.dsn.get_secret_value()),
        server_settings={
            "application_name": "checkpoint-janitor",
            "default_transaction_read_only": "on",
        },
    )


def _safe_message(e: BaseException, source: OrphanSource | None) -> str:
    """The error, with the source's password (if any) never in it."""
    message = f"{type(e).__name__}: {e}"
    if source is not None and source.dsn is not None:
        from worker.stores.postgres import connect_kwargs_safe

        dsn = source.dsn.get_secret_value()
        password = connect_kwargs_safe(dsn).get("password")
        if password:
            message = message.replace(str(password), "***")
        message = message.replace(dsn, redact_dsn(dsn))
    return message


@dataclass(frozen=True, slots=True)
class RegistryFailure:
    """Why one policy's registry gave no answer this sweep."""

    reason: RegistryError
    message: str


class OrphanLookup:
    """A sweep's registries: checked once, then asked per page (`answers`)."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.registries: dict[str, Registry] = {}
        self.sources: dict[str, OrphanSource | None] = {}
        self.failed: dict[str, RegistryFailure] = {}
        """Policies whose registry gave no answer (at the check or on some page)."""

    @classmethod
    async def open(
        cls, engine: StoreEngine, policies: Sequence[Policy], settings: BatchSettings
    ) -> OrphanLookup:
        """Open and check the registry of every `orphaned` policy among `policies`."""
        lookup = cls(engine.name)
        for policy in policies:
            if policy.orphaned is None:
                continue
            lookup.sources[policy.name] = policy.orphaned.source
            try:
                registry = await open_registry(engine, policy, settings)
            except Exception as e:
                lookup._fail(policy.name, RegistryError.UNREACHABLE, e)
                continue
            lookup.registries[policy.name] = registry
            try:
                # The lookup is prepared here too, so a type mismatch fails now, not
                # on a page after others were decided.
                if not await registry.nonempty():
                    lookup._fail(policy.name, RegistryError.EMPTY, None)
                else:
                    await registry.known([])
            except Exception as e:
                lookup._fail(policy.name, RegistryError.QUERY_FAILED, e)
        return lookup

    def _fail(self, policy: str, reason: RegistryError, e: BaseException | None) -> None:
        source = self.sources.get(policy)
        message = (
            "the query returned no rows: an empty registry is never read as every thread orphaned"
            if e is None
            else _safe_message(e, source)
        )
        self.failed[policy] = RegistryFailure(reason, message)
        log.warning(
            "orphan_registry_unavailable",
            store=self.store,
            policy=policy,
            reason=reason.value,
            error=message,
            message=f"policy {policy!r} matches no thread in this sweep: its registry has no "
            "answer; fix the query or its source (`checkpoint-janitor plan` shows it)",
        )

    async def answers(self, thread_ids: Sequence[str]) -> dict[str, set[str]]:
        """Per answering policy, which of `thread_ids` its registry still lists."""
        out: dict[str, set[str]] = {}
        for name, registry in self.registries.items():
            if name in self.failed:
                continue
            try:
                out[name] = await registry.known(thread_ids)
            except Exception as e:
                self._fail(name, RegistryError.QUERY_FAILED, e)
        return out

    async def close(self) -> None:
        """Close every registry connection this sweep opened."""
        for registry in self.registries.values():
            try:
                await registry.close()
            except Exception as e:  # closing must not turn a sweep into a failure
                log.debug("orphan_registry_close_failed", store=self.store, error=str(e))
        self.registries.clear()
