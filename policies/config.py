"""The configuration schema: stores, defaults, ordered policies, metrics and logging.

Every model is strict (YAML types are taken as written: `"5"` is not a count
and `yes` in a quoted string is not a boolean), frozen, and forbids unknown
keys, because a misspelt retention key that was silently ignored would change
what gets deleted. Durations go through `policies.durations.parse_duration`.

Validators that know a more precise location than the model they run on raise
`LocatedValueError`; `policies.loader` appends its `loc` to pydantic's so the
error names the exact key and line.
"""

from __future__ import annotations

import math
import re
import zoneinfo
from collections.abc import Mapping
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    SecretStr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from policies.crontab import crontab_fields
from policies.durations import parse_duration
from policies.model import TtlFallbackReason

__all__ = [
    "BatchOverrides",
    "BatchSettings",
    "Config",
    "Defaults",
    "Duration",
    "ExpireAfter",
    "IdleTrim",
    "LocatedValueError",
    "LoggingConfig",
    "Match",
    "MetricsConfig",
    "OrphanSource",
    "Orphaned",
    "Policy",
    "PoolConfig",
    "Quota",
    "ReclaimOverrides",
    "ReclaimSettings",
    "Schedule",
    "StoreConfig",
    "ThreadTTL",
    "parse_bytes",
    "redact_dsn",
]


class LocatedValueError(ValueError):
    """A validation error that knows which key below the validated object is wrong.

    `loc` is relative to the object whose validator raised it, in pydantic's
    `loc` vocabulary (field names or aliases, list indexes, dict keys).
    """

    def __init__(self, message: str, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.loc = loc


# --------------------------------------------------------------------------- secrets


_URL_PASSWORD = re.compile(
    # scheme://user:PASSWORD@host... ; greedy up to the last '@' so an unencoded
    # '@' inside the password is still covered (over-redacting a host is harmless).
    r"(?P<head>^[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*:)(?P<secret>.*)(?P<tail>@)",
    re.DOTALL,
)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:ssl)?password=)(?P<secret>[^&#]*)", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(
    r"(?P<head>\b(?:ssl)?password\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'?|\S+)",
    re.IGNORECASE,
)


def redact_dsn(dsn: str) -> str:
    """`dsn` with every password replaced by `***`, for logs and error messages.

    Handles the URL form (`postgresql://user:pw@host/db`, also a `password=`
    query parameter) and the libpq keyword form (`host=h password=pw`, quoted
    values included). `sslpassword` is redacted too. Text that is neither is
    returned unchanged, so callers may pass any connection string.
    """
    if "://" in dsn:
        dsn = _URL_PASSWORD.sub(r"\g<head>***\g<tail>", dsn, count=1)
        return _QUERY_PASSWORD.sub(r"\g<head>***", dsn)
    return _KEYWORD_PASSWORD.sub(r"\g<head>***", dsn)


# libpq keyword/value form: at least one `key=value`, keys are lower-case words.
_KEYWORD_DSN = re.compile(r"\s*[a-z_]+\s*=")


# libpq's own vocabularies (PostgreSQL docs, "Parameter Key Words"): libpq checks
# these only when it connects, so a typo would surface as a failing store, not a bad config.
_DSN_CHOICES: dict[str, tuple[str, ...]] = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
    "load_balance_hosts": ("disable", "random"),
}
_DSN_INTEGERS = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval")
# libpq's parse errors that name an option, never a value (a value may be the password).
_DSN_BAD_OPTION = re.compile(r'^invalid (?:URI query parameter|connection option): "([^"]*)"')


POSTGRES_EXTRA_MISSING = (
    "a postgres dsn needs the Postgres drivers, which this install lacks: "
    "install checkpoint-janitor[postgres]"
)
"""The error of a config naming Postgres on an install without the `postgres` extra."""


def _dsn_options(dsn: str) -> dict[str, str]:
    """The DSN's options as libpq reads them; errors never quote the DSN."""
    # Imported here: psycopg loads libpq, and only configs with a postgres store need it
    # (a SQLite-only install has none).
    try:
        from psycopg import Error as PsycopgError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ValueError(POSTGRES_EXTRA_MISSING) from None

    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except PsycopgError as exc:
        named = _DSN_BAD_OPTION.match(str(exc))
        if named:
            raise ValueError(f"dsn has an unknown option {named[1]!r}") from None
        raise ValueError(
            "dsn cannot be parsed as a postgresql:// URL or libpq keywords (check quoting, "
            "percent-encoding of special characters in the URL, and key=value pairs)"
        ) from None


def _check_dsn_options(options: dict[str, str]) -> None:
    for key, allowed in _DSN_CHOICES.items():
        if key in options and options[key] not in allowed:
            raise ValueError(f"dsn has {key}={options[key]!r}; libpq accepts {', '.join(allowed)}")
    if "port" in options:
        # A multi-host DSN lists one port per host; an empty one means the default.
        for port in options["port"].split(","):
            if port and not (port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
                raise ValueError(f"dsn has port {port!r}, expected a number 1-65535")
    for key in _DSN_INTEGERS:
        value = options.get(key)
        if value and not re.fullmatch(r"-?[0-9]+", value):
            raise ValueError(f"dsn has {key}={value!r}, expected a whole number")


def _check_dsn(value: SecretStr | None) -> SecretStr | None:
    # Messages never echo the DSN: it carries the password.
    if value is None:
        return None
    dsn = value.get_secret_value()
    if not dsn.strip():
        raise ValueError("dsn is empty (is the ${...} it comes from empty?)")
    if "://" in dsn:
        scheme = dsn.split("://", 1)[0].lower()
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(
                f"dsn has scheme {scheme!r}: a postgres store takes a postgresql:// URL "
                "or a libpq keyword string (host=... dbname=...)"
            )
    elif not _KEYWORD_DSN.match(dsn):
        raise ValueError(
            "dsn is neither a postgresql:// URL nor a libpq keyword string (host=... dbname=...)"
        )
    _check_dsn_options(_dsn_options(dsn))
    return value


# --------------------------------------------------------------------------- value types


def _to_duration(value: object) -> object:
    if isinstance(value, timedelta):
        if value <= timedelta(0):
            raise ValueError(f"duration {value} is not positive: a duration must be positive")
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        # A bare number is ambiguous (seconds? days?); for retention, guessing wrong deletes data.
        return parse_duration(f"{value}")
    if not isinstance(value, str):
        raise ValueError(f"a duration must be a string such as 7d, not {type(value).__name__}")
    return parse_duration(value)


Duration = Annotated[timedelta, BeforeValidator(_to_duration)]
"""A positive duration written `30s`, `15m`, `12h`, `7d` or `2w` (bare numbers are errors)."""


def _to_seconds(value: object) -> object:
    # Tuning knobs are plain seconds, but `2s`/`5m` read better and mean the same.
    if isinstance(value, str):
        return parse_duration(value).total_seconds()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


_ZERO_DURATION = re.compile(r"0+[smhdw]", re.ASCII)


def _to_seconds_or_zero(value: object) -> object:
    # A knob that may be off (`jitter: 0s`, `pause: 0s`): zero is a setting here, not the
    # "everything is old" reading that `parse_duration` refuses for retention rules.
    if isinstance(value, str) and _ZERO_DURATION.fullmatch(value):
        return 0.0
    return _to_seconds(value)


PositiveSeconds = Annotated[float, BeforeValidator(_to_seconds), Field(gt=0, allow_inf_nan=False)]
"""Seconds > 0, as a number (`0.5`) or a duration string (`2s`)."""

NonNegativeSeconds = Annotated[
    float, BeforeValidator(_to_seconds_or_zero), Field(ge=0, allow_inf_nan=False)
]
"""Seconds >= 0, as a number (`0.5`) or a duration string (`2s`, and `0s`)."""

_BYTE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_BYTE_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]+)", re.ASCII | re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """`20GB` (decimal units), `512MiB` (binary units) or `100B` as a whole number of bytes > 0."""
    m = _BYTE_SIZE.fullmatch(text.strip())
    unit = m[2].lower() if m else ""
    if m is None or unit not in _BYTE_UNITS:
        raise ValueError(
            f"size {text!r} is not a number with a unit: B, KB, MB, GB, TB (powers of 1000) "
            "or KiB, MiB, GiB, TiB (powers of 1024), e.g. 20GB"
        )
    size = int(float(m[1]) * _BYTE_UNITS[unit])
    if size <= 0:
        # A cap of nothing would evict every thread a policy allows: never what was meant.
        raise ValueError(f"size {text!r} is not positive")
    return size


def _to_bytes(value: object) -> object:
    # A bare number is bytes (no unit to guess); text needs its unit.
    if isinstance(value, str):
        return parse_bytes(value)
    return value


ByteSize = Annotated[int, BeforeValidator(_to_bytes), Field(gt=0)]
"""A size > 0: `20GB`, `50MB`, `512MiB`, or a whole number of bytes."""

PositiveInt = Annotated[int, Field(gt=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
MetadataValue = str | int | float | bool | None


class _Model(BaseModel):
    """Shared settings: strict types, frozen instances, unknown keys are errors."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        validate_by_name=True,
        validate_by_alias=True,
        validate_default=False,
    )


# --------------------------------------------------------------------------- schedules


class Schedule(_Model):
    """When a policy runs: exactly one of `every` (a duration) or `cron` (5-field crontab).

    `cron` has crontab semantics (weekday 0 and 7 are Sunday) and runs in
    `timezone` (an IANA name; UTC when absent). `timezone` is meaningless for
    `every` and rejected there. The cron text is checked by `policies.crontab`;
    the shell builds the trigger (worker/service/schedule.py).
    """

    every: Duration | None = None
    cron: str | None = None
    timezone: str | None = None

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}: use an IANA name such as UTC or Europe/Berlin"
            ) from None
        return value

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            crontab_fields(value)
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Schedule:
        if (self.every is None) == (self.cron is None):
            raise ValueError(
                "a schedule needs exactly one of `every` (e.g. {every: 10m}) "
                'or `cron` (e.g. {cron: "0 3 * * *"})'
            )
        if self.every is not None and self.timezone is not None:
            raise LocatedValueError(
                "timezone applies to cron schedules only (an `every` interval has no time of day)",
                ("timezone",),
            )
        return self


# --------------------------------------------------------------------------- batches


class BatchSettings(_Model):
    """How a sweep sizes, paces and bounds its work on one store.

    Seconds fields take a number (`0.5`) or a duration string (`2s`).
    """

    target_batch_seconds: PositiveSeconds = 0.2
    """Batches are sized so that one takes about this long, so the application never waits long."""
    max_batch_threads: PositiveInt = 500
    """At most this many threads in one batch (one transaction)."""
    max_batch_rows: PositiveInt = 20000
    """Hard cap on rows deleted in one transaction, whatever the sizing says."""
    pause: NonNegativeSeconds = 0.0
    """Fixed pause between batches."""
    pause_factor: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.5
    """The pause is at least this multiple of the last batch's duration (SQLite: while
    the application is seen writing; see `worker.stores.throttle.Pacer`)."""
    busy_timeout: PositiveSeconds = 5.0
    """SQLite: how long a statement waits for the application's write lock."""
    grace_period: Duration = timedelta(hours=1)
    """A thread must be quiet this long before its orphan writes and blobs are collected."""
    lock_timeout: PositiveSeconds = 2.0
    """Postgres `lock_timeout` per batch (0 would disable the limit, so it is not allowed)."""
    statement_timeout: PositiveSeconds = 30.0
    """Postgres `statement_timeout` per statement (0 would disable the limit)."""
    page_threads: PositiveInt = 1000
    """Keyset page size: threads read per scan query."""


class BatchOverrides(_Model):
    """A store's overrides of `defaults.batch`: any subset of the `BatchSettings` keys."""

    target_batch_seconds: PositiveSeconds | None = None
    max_batch_threads: PositiveInt | None = None
    max_batch_rows: PositiveInt | None = None
    pause: NonNegativeSeconds | None = None
    pause_factor: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    busy_timeout: PositiveSeconds | None = None
    grace_period: Duration | None = None
    lock_timeout: PositiveSeconds | None = None
    statement_timeout: PositiveSeconds | None = None
    page_threads: PositiveInt | None = None

    def apply(self, base: BatchSettings) -> BatchSettings:
        """`base` with every key given here replacing its value."""
        given = {k: v for k, v in self.model_dump().items() if v is not None}
        return base.model_copy(update=given)


# --------------------------------------------------------------------------- reclaim

Fraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class ReclaimSettings(_Model):
    """Giving disk space back after sweeps (`reclaim`).

    SQLite: incremental auto-vacuum in steps sized and paced like delete
    batches (`defaults.batch`), on files in that mode; `reclaim --convert`
    switches a file once. Postgres: `VACUUM (ANALYZE)` on a table a sweep
    thinned out.
    """

    after_sweep: bool = False
    """Reclaim after each sweep that deleted something (`once` and `run`)."""
    min_free_fraction: Fraction = 0.25
    """SQLite `--convert` refuses a file whose free pages are below this share of it."""
    min_disk_margin: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.1
    """SQLite `--convert`: disk that must stay free after the copies, as a share of the file."""
    wal_truncate_mb: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 64.0
    """SQLite: after reclaiming, checkpoint and truncate a WAL larger than this (MiB)."""
    min_deleted_fraction: Fraction = 0.1
    """Postgres: VACUUM a table after a sweep deleted at least this share of its rows."""


class ReclaimOverrides(_Model):
    """A store's overrides of `defaults.reclaim`: any subset of the `ReclaimSettings` keys."""

    after_sweep: bool | None = None
    min_free_fraction: Fraction | None = None
    min_disk_margin: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    wal_truncate_mb: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    min_deleted_fraction: Fraction | None = None

    def apply(self, base: ReclaimSettings) -> ReclaimSettings:
        """`base` with every key given here replacing its value."""
        given = {k: v for k, v in self.model_dump().items() if v is not None}
        return base.model_copy(update=given)


# --------------------------------------------------------------------------- stores


_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class ArchiveConfig(_Model):
    """`archive: {path: /var/lib/checkpoint-janitor/archive, max_bytes: 50GB}`.

    Every row a sweep deletes from the store is first written under `path`
    (a directory, or an fsspec URL such as `s3://bucket/prefix`), and the
    delete commits only once that is safe (README "Getting data back").
    `max_bytes` caps the store's archive directory: a batch that would pass
    it deletes nothing and fails the sweep.
    """

    path: NonEmptyStr
    max_bytes: ByteSize | None = None

    @field_validator("path")
    @classmethod
    def _path_or_url(cls, value: str) -> str:
        if "://" in value and not _URL_SCHEME.match(value):
            raise ValueError(
                f"archive path {value!r} is neither a directory nor a URL such as s3://bucket/prefix"
            )
        if _URL_SCHEME.match(value) and not value.split("://", 1)[1].strip("/"):
            raise ValueError(f"archive URL {value!r} names no bucket or directory")
        return value


class PoolConfig(_Model):
    """Postgres connection pool size (one pool per store, shared by its policies)."""

    min_size: Annotated[int, Field(ge=0)] = 1
    max_size: PositiveInt = 4

    @model_validator(mode="after")
    def _ordered(self) -> PoolConfig:
        if self.min_size > self.max_size:
            raise LocatedValueError(
                f"min_size {self.min_size} is larger than max_size {self.max_size}", ("min_size",)
            )
        return self


class StoreConfig(_Model):
    """A checkpoint store: a SQLite file (`path`) or a Postgres database (`dsn`).

    `batch` overrides `defaults.batch` for this store only. `schema` (attribute
    `schema_`) names a non-default Postgres schema. `encryption_key` is the
    `EncryptedSerializer` AES key the application uses (16, 24 or 32 bytes).
    `max_bytes` caps the store's data (as `stats` counts it): see `worker.sweep.quota`.
    """

    name: NonEmptyStr
    kind: Literal["sqlite", "postgres"]
    path: NonEmptyStr | None = None
    dsn: SecretStr | None = None
    schema_: str = Field(default="public", alias="schema")
    pool: PoolConfig = PoolConfig(min_size=1, max_size=4)
    encryption_key: SecretStr | None = None
    batch: BatchOverrides | None = None
    reclaim: ReclaimOverrides | None = None
    max_bytes: ByteSize | None = None
    """Size cap: past it, sweeps expire the least recently active threads the policies allow."""
    archive: ArchiveConfig | None = None
    """Where sweeps archive what they delete; replaces `defaults.archive` for this store."""

    # Each model binds its own validator (as `StoreConfig` and `OrphanSource` both do);
    # the rule itself is `_check_dsn`, written once.
    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_dsn(value)

    @field_validator("schema_")
    @classmethod
    def _plain_schema(cls, value: str) -> str:
        # Restricted to plain identifiers so it can never smuggle SQL into a query.
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]{0,62}", value):
            raise ValueError(
                f"schema {value!r} is not a plain Postgres identifier "
                "(letters, digits, _ and $, not starting with a digit, at most 63 characters)"
            )
        return value

    @field_validator("encryption_key")
    @classmethod
    def _aes_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) not in (16, 24, 32):
            # The application's EncryptedSerializer refuses other lengths, so this key
            # cannot be the one that wrote the store.
            raise ValueError(
                "encryption_key must be 16, 24 or 32 bytes (an AES key, as LANGGRAPH_AES_KEY)"
            )
        return value

    @model_validator(mode="after")
    def _kind_keys(self) -> StoreConfig:
        given = self.model_fields_set
        if self.kind == "sqlite":
            if self.path is None:
                raise LocatedValueError(
                    "a sqlite store needs `path` (its database file)", ("path",)
                )
            for field, key in (("dsn", "dsn"), ("schema_", "schema"), ("pool", "pool")):
                if field in given:
                    raise LocatedValueError(
                        f"`{key}` is for postgres stores; a sqlite store has only `path`", (key,)
                    )
        else:
            if self.dsn is None:
                raise LocatedValueError(
                    "a postgres store needs `dsn` (a postgresql:// URL or libpq keywords, "
                    "usually ${ENV} or ${file:/path})",
                    ("dsn",),
                )
            if "path" in given:
                raise LocatedValueError(
                    "`path` is for sqlite stores; a postgres store is named by `dsn`", ("path",)
                )
        return self


# --------------------------------------------------------------------------- policies


def _to_globs(value: object) -> object:
    if value is None or isinstance(value, tuple):
        return value
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        if not value:
            raise ValueError("thread_id is an empty list, which would match nothing")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise LocatedValueError(
                    f"thread_id globs must be strings, not {type(item).__name__} (quote it)", (i,)
                )
        return tuple(value)
    raise ValueError(
        f"thread_id must be a glob string or a list of glob strings, not {type(value).__name__}"
    )


def _scalar_metadata(value: object) -> object:
    if isinstance(value, dict):
        for key, item in value.items():
            if item is not None and not isinstance(item, str | int | float | bool):
                raise LocatedValueError(
                    "metadata values must be scalars (string, number, boolean or null) "
                    f"compared for equality, not {type(item).__name__}",
                    (key,),
                )
    return value


class Match(_Model):
    """Which (thread, namespace) pairs a policy selects; an absent key matches everything.

    `thread_id` globs (fnmatch, case-sensitive) match the whole thread id;
    `checkpoint_ns` matches the whole namespace (`""` is the root graph,
    `"agent:*"` the calls of subgraph node `agent`); `metadata` compares keys
    of the thread's newest root checkpoint for equality.
    """

    thread_id: Annotated[tuple[str, ...] | None, BeforeValidator(_to_globs)] = None
    checkpoint_ns: str | None = None
    metadata: Annotated[dict[str, MetadataValue] | None, BeforeValidator(_scalar_metadata)] = None

    def __hash__(self) -> int:
        # Frozen models hash their fields, and a dict has no hash; policies are
        # used as dict keys and set members, so hash the metadata's items instead.
        items = tuple(sorted(self.metadata.items())) if self.metadata is not None else None
        return hash((self.thread_id, self.checkpoint_ns, items))


class OrphanSource(_Model):
    """Where an orphan policy's registry query runs: a SQLite file or a Postgres database.

    The DSN follows the stores' rules (validated, redacted, `${ENV}` or `${file:}`).
    """

    kind: Literal["sqlite", "postgres"]
    path: NonEmptyStr | None = None
    dsn: SecretStr | None = None

    # Each model binds its own validator (as `StoreConfig` and `OrphanSource` both do);
    # the rule itself is `_check_dsn`, written once.
    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_dsn(value)

    @model_validator(mode="after")
    def _kind_keys(self) -> OrphanSource:
        if self.kind == "sqlite" and (self.path is None or self.dsn is not None):
            raise LocatedValueError(
                "a sqlite source takes `path` (the registry's database file) and no `dsn`",
                ("path",) if self.path is None else ("dsn",),
            )
        if self.kind == "postgres" and (self.dsn is None or self.path is not None):
            raise LocatedValueError(
                "a postgres source takes `dsn` (usually ${ENV} or ${file:/path}) and no `path`",
                ("dsn",) if self.dsn is None else ("path",),
            )
        return self


def _strip_statement(value: object) -> object:
    # `SELECT id FROM threads;` is how people write SQL; the query is wrapped in a subquery.
    return value.strip().rstrip(";").rstrip() if isinstance(value, str) else value


class Orphaned(_Model):
    """`orphaned: {query, source}`: the policy matches only threads the application no longer lists.

    `query` returns one column, the thread ids the application still knows
    (text; cast other types, e.g. `SELECT id::text FROM chats`). It runs in
    `source`, or without one in the store's own database, read-only.
    """

    query: Annotated[NonEmptyStr, BeforeValidator(_strip_statement)]
    source: OrphanSource | None = None


class Quota(_Model):
    """`quota: {max_bytes: 50MB, per: user_id}`: a size cap per group of the policy's threads.

    Threads the policy governs are grouped by `per`, a key of their newest root
    checkpoint's metadata; a group over `max_bytes` loses its least recently
    active threads. Without `per` all of them form one group; a thread
    without the key belongs to no group.
    """

    max_bytes: ByteSize
    per: NonEmptyStr | None = None


_TTL_UNITS: dict[str, int] = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}
# A bare number, as an application's `configurable` may carry it (also as a string).
_TTL_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)
# A duration written with a sign or a zero: not positive, whatever `parse_duration` says.
_TTL_NOT_POSITIVE = re.compile(r"-[0-9]+[smhdw]|0+[smhdw]", re.ASCII)


class ThreadTTL(_Model):
    """`expire_after: {metadata_key: ttl_minutes, default: 30d}`: a TTL each thread carries.

    The thread's idle TTL is read from `metadata_key` in its newest root
    checkpoint's metadata, where a run's scalar `configurable` values land. It
    may be a positive number (in `unit`, minutes by default, as LangSmith's
    TTLs), the same number as a string (`"60"`), or a duration string
    (`"45m"`, `"10d"`). Anything else (absent, null, a boolean, text, NaN,
    zero or negative) falls back to `default` and is counted: zero never
    means "expire now".
    """

    metadata_key: NonEmptyStr
    default: Duration
    unit: Literal["seconds", "minutes", "hours", "days"] = "minutes"

    def seconds_for(self, metadata: Mapping[str, Any]) -> float | TtlFallbackReason:
        """The TTL in seconds that `metadata` gives, or why the default applies instead."""
        if metadata.get(self.metadata_key) is None:
            return TtlFallbackReason.MISSING
        value = metadata[self.metadata_key]
        if isinstance(value, str):
            text = value.strip()
            if _TTL_NOT_POSITIVE.fullmatch(text):
                return TtlFallbackReason.NOT_POSITIVE
            if not _TTL_NUMBER.fullmatch(text):
                try:
                    return parse_duration(text).total_seconds()
                except ValueError:
                    return TtlFallbackReason.INVALID
            value = float(text)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return TtlFallbackReason.INVALID
        if math.isnan(value):
            return TtlFallbackReason.INVALID
        if value <= 0:
            return TtlFallbackReason.NOT_POSITIVE
        seconds = float(value) * _TTL_UNITS[self.unit]
        # Out of float range is no TTL anyone meant; the default is.
        return seconds if math.isfinite(seconds) else TtlFallbackReason.INVALID


def _expire_after_kind(value: object) -> str:
    return "per_thread" if isinstance(value, dict | ThreadTTL) else "duration"


ExpireAfter = Annotated[
    Annotated[timedelta, BeforeValidator(_to_duration), Tag("duration")]
    | Annotated[ThreadTTL, Tag("per_thread")],
    Discriminator(_expire_after_kind),
]
"""`expire_after`: a duration (`30d`) or a per-thread TTL read from metadata (`ThreadTTL`)."""


class IdleTrim(_Model):
    """`when_idle: {after: 30m, keep_last: 1}`: trim only threads idle longer than `after`.

    Each namespace of such a thread keeps its `keep_last` newest checkpoints
    (and what those need); the policy's own `keep_last`/`keep_within` govern
    threads not idle yet. LangSmith's `keep_latest` TTL strategy is
    `when_idle: {after: <default_ttl>, keep_last: 1}`.
    """

    after: Duration
    keep_last: Annotated[int, Field(ge=1)]


_RULES = ("expire_after", "keep_last", "keep_within", "when_idle", "quota")
# What a `langgraph_json` file supplies; the policy may not say them itself.
_LANGGRAPH_SUPPLIES = (
    "protect",
    "expire_after",
    "keep_last",
    "keep_within",
    "when_idle",
    "schedule",
    "max_threads_per_sweep",
)


class Policy(_Model):
    """One retention rule set; the first policy (file order) whose `match` selects a
    (thread, namespace) governs it.

    `protect` keeps what it matches; `expire_after` deletes a whole thread idle
    that long (a duration, or a per-thread TTL from metadata); `keep_last`/
    `keep_within` trim a namespace's history (the newest checkpoint always
    survives); `when_idle` trims only idle threads. `interrupted: expire` lets
    expiry take threads waiting for input. `schedule` overrides
    `defaults.schedule`. `max_threads_per_sweep` caps the threads one sweep
    acts on under this policy. `langgraph_json` names a LangSmith
    `langgraph.json` (relative to the config file's folder) whose
    `checkpointer.ttl` supplies the rules, schedule and cap; the worker reads
    it and replaces this policy with its translation. `orphaned` narrows the
    match to threads an application registry no longer lists (`expire_after`
    is then the grace period); `quota` caps the bytes of groups of its threads.
    """

    name: NonEmptyStr
    store: NonEmptyStr | None = None
    match: Match = Match()
    protect: bool = False
    expire_after: ExpireAfter | None = None
    keep_last: Annotated[int, Field(ge=1)] | None = None
    keep_within: Duration | None = None
    when_idle: IdleTrim | None = None
    interrupted: Literal["keep", "expire"] = "keep"
    schedule: Schedule | None = None
    max_threads_per_sweep: PositiveInt | None = None
    langgraph_json: NonEmptyStr | None = None
    orphaned: Orphaned | None = None
    quota: Quota | None = None
    description: str | None = None

    @property
    def head_metadata_keys(self) -> frozenset[str]:
        """The keys of a thread's head metadata this policy reads (match and per-thread TTL).

        An engine that parses head metadata only where needed must parse it
        for these.
        """
        keys = set(self.match.metadata or ())
        if isinstance(self.expire_after, ThreadTTL):
            keys.add(self.expire_after.metadata_key)
        if self.quota is not None and self.quota.per is not None:
            keys.add(self.quota.per)
        return frozenset(keys)

    @model_validator(mode="after")
    def _rules(self) -> Policy:
        if self.langgraph_json is not None:
            for key in ("orphaned", "quota"):
                if key in self.model_fields_set:
                    # The translation keeps only name, store, match and interrupted.
                    raise LocatedValueError(
                        f"{key} cannot be combined with langgraph_json; write the policy out "
                        "(`checkpoint-janitor translate` prints it) and add it there",
                        (key,),
                    )
            for key in _LANGGRAPH_SUPPLIES:
                if key in self.model_fields_set:
                    raise LocatedValueError(
                        f"{key} comes from langgraph_json's checkpointer.ttl here; drop it, or "
                        "write the policy out (`checkpoint-janitor translate` prints it)",
                        (key,),
                    )
            return self
        given = [rule for rule in _RULES if getattr(self, rule) is not None]
        if self.protect and given:
            raise LocatedValueError(
                f"protect: true keeps everything this policy matches, so {given[0]} would never "
                "delete anything; drop the rule, or split this into a protect policy with a "
                "narrower match followed by a policy carrying the rule",
                ("protect",),
            )
        if not self.protect and not given:
            # A rule-less policy would still win first match and silently shield what it selects.
            raise ValueError(
                f"policy {self.name!r} has no rule: give it protect: true, expire_after, "
                "keep_last, keep_within, when_idle or langgraph_json (a policy without one "
                "would still win first match and silently keep everything it selects)"
            )
        if self.orphaned is not None and self.expire_after is None:
            raise LocatedValueError(
                "orphaned needs expire_after, the grace period an orphaned thread must be idle "
                "before it goes (e.g. expire_after: 1d)",
                ("orphaned",),
            )
        if self.interrupted == "expire" and self.expire_after is None and self.quota is None:
            raise LocatedValueError(
                "interrupted: expire only has an effect together with expire_after or quota",
                ("interrupted",),
            )
        return self


# --------------------------------------------------------------------------- the rest


class Defaults(_Model):
    """Settings every store and policy uses unless it overrides them."""

    schedule: Schedule = Schedule(every=timedelta(minutes=10))
    dry_run: bool = False
    max_delete_fraction: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.5
    """One sweep may expire at most this fraction of a store's threads (the safety limit)."""
    allow_mass_expiry: bool = False
    """Lift the safety limit for every sweep (`run`'s only way past it; `once` has a flag)."""
    batch: BatchSettings = BatchSettings()
    reclaim: ReclaimSettings = ReclaimSettings()
    """Giving disk space back after sweeps; stores may override any key."""
    archive: ArchiveConfig | None = None
    """Archive before delete for every store without an `archive` of its own."""
    shutdown_grace: PositiveSeconds = 20.0
    """`run`: on SIGTERM, how long the current batch may take to commit before it is rolled back."""
    jitter: NonNegativeSeconds = 10.0
    """`run`: each scheduled sweep starts up to this many seconds late, so replicas spread out."""
    misfire_grace: PositiveSeconds = 300.0
    """`run`: a sweep missed by less than this (a busy or paused process) still runs, once."""
    retry_max: PositiveSeconds = 300.0
    """`run`: the longest wait between reconnection attempts to a store that is down."""
    residue_check_every: NonNegativeSeconds = 86400.0
    """How often a sweep looks at every quiet thread for residue (orphan writes, unreferenced
    blobs); between, it looks only where the tool deleted and at expiry candidates. 0: every
    sweep looks everywhere."""


def _host_port(listen: str) -> tuple[str, int]:
    if listen.startswith("["):
        host, sep, port = listen[1:].partition("]:")
        if not sep:
            raise ValueError(f"listen {listen!r} is not [ipv6-address]:port")
    else:
        host, sep, port = listen.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(
                f"listen {listen!r} is not host:port (write IPv6 addresses as [::]:9464)"
            )
    if not host:
        raise ValueError(f"listen {listen!r} has no host (use 0.0.0.0 for every interface)")
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError(f"listen {listen!r} has port {port!r}, expected 0-65535")
    return host, int(port)


class MetricsConfig(_Model):
    """Where metrics go: `/metrics` on `listen`; for `once`, a Pushgateway and/or a textfile."""

    listen: str = "0.0.0.0:9464"
    pushgateway: NonEmptyStr | None = None
    textfile: NonEmptyStr | None = None
    job: NonEmptyStr = "checkpoint-janitor"

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        _host_port(value)
        return value

    @field_validator("pushgateway")
    @classmethod
    def _pushgateway(cls, value: str | None) -> str | None:
        if value is not None and "://" in value:
            scheme = value.split("://", 1)[0].lower()
            if scheme not in ("http", "https"):
                raise ValueError(f"pushgateway URL scheme {scheme!r} is not http or https")
        return value

    @field_validator("textfile")
    @classmethod
    def _textfile(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith(".prom"):
            # node_exporter's textfile collector reads only *.prom files.
            raise ValueError(f"textfile {value!r} must end in .prom (node_exporter ignores others)")
        return value

    @property
    def listen_host(self) -> str:
        """The host part of `listen` (IPv6 brackets removed)."""
        return _host_port(self.listen)[0]

    @property
    def listen_port(self) -> int:
        """The port part of `listen`."""
        return _host_port(self.listen)[1]


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


class LoggingConfig(_Model):
    """Log format (`auto`: console on a terminal, JSON otherwise) and level."""

    format: Annotated[Literal["json", "console", "auto"], BeforeValidator(_lower)] = "auto"
    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"


class Config(_Model):
    """A whole configuration file."""

    stores: list[StoreConfig]
    defaults: Defaults = Defaults()
    policies: list[Policy]
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    _key_lines: dict[tuple[str | int, ...], int] = PrivateAttr(default_factory=dict)

    def line_of(self, key: tuple[str | int, ...]) -> int | None:
        """The line of the config file that `key` (e.g. `("policies", 0, "name")`) is on.

        Known when the config came from `policies.loader`; a key not in the
        file gives its nearest parent's line.
        """
        for n in range(len(key), -1, -1):
            if key[:n] in self._key_lines:
                return self._key_lines[key[:n]]
        return None

    @field_validator("stores")
    @classmethod
    def _stores(cls, value: list[StoreConfig]) -> list[StoreConfig]:
        if not value:
            raise ValueError("no stores: name at least one store for the policies to apply to")
        _unique_names([s.name for s in value], "store", "stores")
        return value

    @field_validator("policies")
    @classmethod
    def _policies(cls, value: list[Policy], info: ValidationInfo) -> list[Policy]:
        if not value:
            raise ValueError("no policies: an empty list would do nothing; add at least one policy")
        _unique_names([p.name for p in value], "policy", "policies")
        stores: list[StoreConfig] | None = info.data.get("stores")
        if stores is not None:  # absent when the stores themselves failed validation
            known = [s.name for s in stores]
            for i, policy in enumerate(value):
                if policy.store is not None and policy.store not in known:
                    raise LocatedValueError(
                        f"unknown store {policy.store!r}; defined stores: {', '.join(known)}",
                        (i, "store"),
                    )
        return value

    def store(self, name: str) -> StoreConfig:
        """The store called `name` (KeyError if there is none)."""
        for store in self.stores:
            if store.name == name:
                return store
        raise KeyError(f"no store named {name!r}")

    def store_settings(self, store_name: str) -> BatchSettings:
        """`defaults.batch` with the store's `batch` overrides applied."""
        store = self.store(store_name)
        if store.batch is None:
            return self.defaults.batch
        return store.batch.apply(self.defaults.batch)

    def reclaim_settings(self, store_name: str) -> ReclaimSettings:
        """`defaults.reclaim` with the store's `reclaim` overrides applied."""
        store = self.store(store_name)
        if store.reclaim is None:
            return self.defaults.reclaim
        return store.reclaim.apply(self.defaults.reclaim)

    def archive_for(self, store_name: str) -> ArchiveConfig | None:
        """The store's `archive`, else `defaults.archive` (None: sweeps do not archive)."""
        store = self.store(store_name)
        return store.archive if store.archive is not None else self.defaults.archive

    def policies_for(self, store_name: str) -> list[Policy]:
        """The policies that apply to a store, in file order (first match wins among them)."""
        self.store(store_name)  # an unknown store is a caller bug, not "no policies"
        return [p for p in self.policies if p.store is None or p.store == store_name]

    def schedule_for(self, policy: Policy) -> Schedule:
        """The policy's own schedule, else `defaults.schedule`."""
        return policy.schedule if policy.schedule is not None else self.defaults.schedule


def _unique_names(names: list[str], what: str, key: str) -> None:
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            raise LocatedValueError(
                f"duplicate {what} name {name!r} (already used by {key}[{first[name]}]); "
                f"{what} names must be unique",
                (i, "name"),
            )
        first[name] = i
