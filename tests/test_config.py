"""The config schema, its loader and durations: defaults, the documented examples,
and errors that name file, line and key without leaking a password."""

from __future__ import annotations

import os
import re
import textwrap
import types
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from policies.config import (
    BatchOverrides,
    BatchSettings,
    Config,
    Match,
    MetricsConfig,
    Policy,
    ReclaimOverrides,
    ReclaimSettings,
    Schedule,
    StoreConfig,
    parse_bytes,
    redact_dsn,
)
from policies.durations import UNITS, format_duration, parse_duration
from policies.loader import ConfigError
from worker.service.config_files import load_config, load_config_text
from worker.service.schedule import trigger_for

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "hunter2-Pa55"
PG_DSN = f"postgresql://janitor:{PASSWORD}@db.internal:5432/app"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHECKPOINT_PG_DSN", PG_DSN)
    monkeypatch.setenv("TEST_PG_DSN", PG_DSN)
    monkeypatch.delenv("JANITOR_UNSET_VARIABLE", raising=False)


def load_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "test.yaml")
    return info.value


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("90m", timedelta(minutes=90)),
        ("007d", timedelta(days=7)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0s", "zero"),
        ("0d", "zero"),
        ("-5m", "negative"),
        ("-0d", "negative"),
        ("30", "no unit"),
        ("1.5h", "whole number"),
        (".5h", "whole number"),
        ("7 d", "space"),
        (" 7d", "whitespace"),
        ("7d ", "whitespace"),
        ("7d\n", "whitespace"),
        ("7D", "unknown unit"),
        ("7y", "unknown unit"),
        ("7days", "unknown unit"),
        ("1h30m", "cannot parse"),
        ("", "empty"),
        ("d", "cannot parse"),
        ("+7d", "cannot parse"),
        ("٣d", "cannot parse"),  # a non-ASCII digit
        ("99999999999999999w", "too large"),
    ],
)
def test_parse_duration_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_duration(text)


def test_parse_duration_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_duration(30)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("td", "text"),
    [
        (timedelta(seconds=30), "30s"),
        (timedelta(seconds=90), "90s"),
        (timedelta(minutes=90), "90m"),
        (timedelta(hours=24), "1d"),
        (timedelta(days=14), "2w"),
        (timedelta(days=10), "10d"),
    ],
)
def test_format_duration(td: timedelta, text: str) -> None:
    assert format_duration(td) == text


@pytest.mark.parametrize(
    "td", [timedelta(0), timedelta(seconds=-1), timedelta(seconds=1.5), timedelta(microseconds=1)]
)
def test_format_duration_rejects_what_has_no_spelling(td: timedelta) -> None:
    with pytest.raises(ValueError):
        format_duration(td)


@given(st.integers(min_value=1, max_value=10**12))
def test_format_then_parse_round_trips(seconds: int) -> None:
    td = timedelta(seconds=seconds)
    assert parse_duration(format_duration(td)) == td


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(sorted(UNITS)))
def test_parse_then_format_is_canonical(count: int, unit: str) -> None:
    text = f"{count}{unit}"
    canonical = format_duration(parse_duration(text))
    assert parse_duration(canonical) == parse_duration(text)
    assert len(canonical) <= len(text)
    assert format_duration(parse_duration(canonical)) == canonical


@given(st.integers(max_value=0), st.sampled_from(sorted(UNITS)))
def test_zero_and_negative_durations_are_errors(count: int, unit: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(f"{count}{unit}")


@given(st.text())
def test_garbage_is_an_error_never_a_duration(text: str) -> None:
    if re.fullmatch(r"0*[1-9][0-9]*[smhdw]", text, re.ASCII):
        try:
            assert parse_duration(text) > timedelta(0)
        except ValueError as exc:
            assert "too large" in str(exc)
    else:
        with pytest.raises(ValueError):
            parse_duration(text)


# --------------------------------------------------------------------------- examples

DESIGN_EXAMPLE = """\
stores:
  - name: app                    # unique
    kind: sqlite                 # sqlite | postgres
    path: ./checkpoints.db
  - name: main
    kind: postgres
    dsn: ${CHECKPOINT_PG_DSN}    # ${ENV} or ${file:/run/secrets/dsn}
    pool: {min_size: 1, max_size: 4}
defaults:
  schedule: {every: 10m}         # or {cron: "0 3 * * *"}
  dry_run: false
  max_delete_fraction: 0.5
policies:                        # ordered: first match wins
  - name: vip                    # unique
    match: {thread_id: "vip-*"}
    protect: true
  - name: chats
    store: app                   # optional: default every store
    match: {thread_id: ["user-*", "conv-*"], metadata: {assistant_id: support-bot}}
    expire_after: 30d
    keep_last: 20
    keep_within: 7d
    interrupted: keep
    schedule: {cron: "*/15 * * * *"}
metrics:
  listen: 0.0.0.0:9464           # /metrics, /healthz, /readyz
  pushgateway: http://pushgateway:9091   # `once` only, optional
  textfile: /var/lib/node_exporter/checkpoint_janitor.prom   # optional
logging: {format: json, level: info}
"""


def test_design_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(DESIGN_EXAMPLE)
    config = load_config(path)

    app, main = config.stores
    assert (app.name, app.kind, app.path, app.dsn) == ("app", "sqlite", "./checkpoints.db", None)
    assert (main.name, main.kind, main.path) == ("main", "postgres", None)
    assert main.dsn is not None and main.dsn.get_secret_value() == PG_DSN
    assert (main.pool.min_size, main.pool.max_size, main.schema_) == (1, 4, "public")

    assert config.defaults.schedule == Schedule(every=timedelta(minutes=10))
    assert config.defaults.dry_run is False
    assert config.defaults.max_delete_fraction == 0.5

    vip, chats = config.policies
    assert vip.protect and vip.match.thread_id == ("vip-*",)
    assert chats.store == "app"
    assert chats.match == Match(
        thread_id=("user-*", "conv-*"), metadata={"assistant_id": "support-bot"}
    )
    assert chats.expire_after == timedelta(days=30)
    assert chats.keep_last == 20
    assert chats.keep_within == timedelta(days=7)
    assert chats.interrupted == "keep"
    assert chats.schedule == Schedule(cron="*/15 * * * *")

    assert config.metrics.listen == "0.0.0.0:9464"
    assert (config.metrics.listen_host, config.metrics.listen_port) == ("0.0.0.0", 9464)
    assert config.metrics.pushgateway == "http://pushgateway:9091"
    assert config.metrics.textfile == "/var/lib/node_exporter/checkpoint_janitor.prom"
    assert (config.logging.format, config.logging.level) == ("json", "info")

    assert [p.name for p in config.policies_for("app")] == ["vip", "chats"]
    assert [p.name for p in config.policies_for("main")] == ["vip"]
    assert config.schedule_for(vip) == config.defaults.schedule
    assert config.schedule_for(chats) == chats.schedule


def test_secrets_never_show_in_repr_or_str() -> None:
    config = load_config_text(DESIGN_EXAMPLE)
    for text in (repr(config), str(config), repr(config.stores[1]), str(config.stores[1].dsn)):
        assert PASSWORD not in text


def test_config_example_yaml_loads() -> None:
    config = load_config(REPO / "config.example.yaml")
    assert [s.name for s in config.stores] == ["app"]
    assert config.stores[0].path == "./checkpoints.db"
    names = [p.name for p in config.policies]
    # The subgraph-call rule must come before any root-namespace rule to win first match.
    inner = next(p for p in config.policies if p.match.checkpoint_ns == "inner:*")
    first_root = next(p for p in config.policies if p.match.checkpoint_ns == "")
    assert names.index(inner.name) < names.index(first_root.name)
    assert inner.keep_last == 1
    assert any(p.protect and p.match.thread_id == ("vip-*",) for p in config.policies)
    assert any(p.match.thread_id == ("org-*:user-*:*",) for p in config.policies)
    assert any(p.expire_after == timedelta(days=30) for p in config.policies)
    assert any(p.keep_last and p.keep_within for p in config.policies)


def test_config_example_postgres_block_is_valid_when_uncommented(tmp_path: Path) -> None:
    text = (REPO / "config.example.yaml").read_text()
    lines, out, inside = text.splitlines(), [], False
    for line in lines:
        inside = line.startswith("  # - name: main") or (inside and line.startswith("  #"))
        out.append("  " + line[4:] if inside else line)
    key = tmp_path / "aes-key"
    key.write_text("k" * 32 + "\n")
    uncommented = "\n".join(out).replace("/run/secrets/langgraph-aes-key", str(key))
    config = load_config_text(uncommented)
    main = config.store("main")
    assert main.kind == "postgres" and main.dsn is not None
    assert main.encryption_key is not None and main.encryption_key.get_secret_value() == "k" * 32
    assert config.store_settings("main").lock_timeout == 1.0
    assert config.store_settings("main").statement_timeout == 60.0
    assert config.store_settings("app") == config.defaults.batch


def _schema_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every key path of the schema, list items transparent (`stores.name`)."""
    paths: set[tuple[str, ...]] = set()
    for name, field in model.model_fields.items():
        path = (*prefix, field.alias or name)
        paths.add(path)
        for inner in _models_in(field.annotation):
            # A store's `batch` and `reclaim` take the keys of defaults.batch and
            # defaults.reclaim, documented there once.
            if inner not in (BatchOverrides, ReclaimOverrides):
                paths |= _schema_keys(inner, path)
    return paths


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models a field's value may be: every model member of a union too
    (`expire_after` is a duration or a per-thread TTL mapping)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated or origin is list:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<dash>- )?(?P<key>[A-Za-z_]+):(?:\s+(?P<value>.*))?$")


def _example_keys(text: str) -> set[tuple[str, ...]]:
    """Key paths of a YAML file as an operator reads it: commented-out keys included.

    `# key: value` is read as `key: value` at the column of the `#` (the
    example's style for optional keys); flow mappings (`{every: 10m}`) add
    their keys one level down. Paths have no list indexes.
    """
    paths: set[tuple[str, ...]] = set()
    stack: list[tuple[int, tuple[str, ...]]] = []
    for raw in text.splitlines():
        stripped = raw.lstrip(" ")
        line = raw
        if stripped.startswith("# "):
            line = raw[: len(raw) - len(stripped)] + stripped[2:]
        m = _KEY_LINE.match(line)
        if m is None:
            continue
        column = len(m["indent"]) + (2 if m["dash"] else 0)
        parent_column = len(m["indent"]) if m["dash"] else column
        while stack and stack[-1][0] >= parent_column:
            stack.pop()
        path = (*(stack[-1][1] if stack else ()), m["key"])
        paths.add(path)
        stack.append((column, path))
        value = (m["value"] or "").split(" # ")[0].strip()
        if value.startswith("{"):
            try:
                flow = yaml.safe_load(value)
            except yaml.YAMLError:
                continue

            def add(mapping: Any, at: tuple[str, ...]) -> None:
                if isinstance(mapping, dict):
                    for key, item in mapping.items():
                        paths.add((*at, str(key)))
                        add(item, (*at, str(key)))

            add(flow, path)
    return paths


def test_config_example_shows_every_key_at_its_place() -> None:
    """Each key of the schema appears in config.example.yaml under its parent key.

    Optional keys may be commented out (`# dsn: ...`); a store's `batch` and
    `reclaim` overrides take the keys of `defaults.batch` and
    `defaults.reclaim`, which show them all.
    """
    assert BatchOverrides.model_fields.keys() == BatchSettings.model_fields.keys()
    assert ReclaimOverrides.model_fields.keys() == ReclaimSettings.model_fields.keys()
    shown = _example_keys((REPO / "config.example.yaml").read_text())
    missing = sorted(".".join(p) for p in _schema_keys(Config) - shown)
    assert not missing, f"config.example.yaml does not show: {missing}"


def test_example_keys_reads_commented_and_flow_keys() -> None:
    text = textwrap.dedent(
        """\
        stores:
          - name: app
            # batch:
            #   busy_timeout: 10s
          # - name: main
          #   pool: {min_size: 1, max_size: 4}
        defaults:
          schedule: {every: 10m}
        """
    )
    assert _example_keys(text) == {
        ("stores",),
        ("stores", "name"),
        ("stores", "batch"),
        ("stores", "batch", "busy_timeout"),
        ("stores", "pool"),
        ("stores", "pool", "min_size"),
        ("stores", "pool", "max_size"),
        ("defaults",),
        ("defaults", "schedule"),
        ("defaults", "schedule", "every"),
    }


# --------------------------------------------------------------------------- defaults

MINIMAL = """\
stores:
  - {name: app, kind: sqlite, path: ./checkpoints.db}
policies:
  - {name: trim, keep_last: 5}
"""


def test_every_default() -> None:
    config = load_config_text(MINIMAL)
    store = config.stores[0]
    assert store.schema_ == "public"
    assert (store.pool.min_size, store.pool.max_size) == (1, 4)
    assert store.encryption_key is None and store.batch is None

    defaults = config.defaults
    assert defaults.schedule.every == timedelta(minutes=10)
    assert defaults.schedule.cron is None and defaults.schedule.timezone is None
    assert defaults.dry_run is False
    assert defaults.max_delete_fraction == 0.5

    batch = defaults.batch
    assert batch == BatchSettings()
    assert batch.target_batch_seconds == 0.2
    assert batch.max_batch_threads == 500
    assert batch.max_batch_rows == 20000
    assert batch.pause == 0
    assert batch.pause_factor == 0.5
    assert batch.busy_timeout == 5.0
    assert batch.grace_period == timedelta(hours=1)
    assert batch.lock_timeout == 2.0
    assert batch.statement_timeout == 30.0
    assert batch.page_threads == 1000

    policy = config.policies[0]
    assert policy.store is None
    assert policy.match == Match() and policy.match.thread_id is None
    assert policy.match.checkpoint_ns is None and policy.match.metadata is None
    assert policy.protect is False
    assert policy.expire_after is None and policy.keep_within is None
    assert policy.interrupted == "keep"
    assert policy.schedule is None and policy.description is None

    assert config.metrics == MetricsConfig()
    assert config.metrics.listen == "0.0.0.0:9464"
    assert config.metrics.pushgateway is None and config.metrics.textfile is None
    assert config.metrics.job == "checkpoint-janitor"
    assert (config.logging.format, config.logging.level) == ("auto", "info")


def test_store_batch_overrides_merge_over_defaults() -> None:
    config = load_config_text(
        textwrap.dedent("""\
            stores:
              - name: app
                kind: sqlite
                path: a.db
                batch: {busy_timeout: 10s, pause: 0.5, grace_period: 2h}
              - {name: other, kind: sqlite, path: b.db}
            defaults:
              batch: {max_batch_rows: 100, pause: 1}
            policies:
              - {name: trim, keep_last: 5}
            """)
    )
    app = config.store_settings("app")
    assert app.busy_timeout == 10.0
    assert app.pause == 0.5
    assert app.grace_period == timedelta(hours=2)
    assert app.max_batch_rows == 100  # from defaults
    assert app.page_threads == 1000  # built-in default
    other = config.store_settings("other")
    assert (other.pause, other.busy_timeout, other.max_batch_rows) == (1.0, 5.0, 100)
    with pytest.raises(KeyError):
        config.store_settings("nope")


def test_policies_for_keeps_file_order_and_store_scoping() -> None:
    config = load_config_text(
        textwrap.dedent("""\
            stores:
              - {name: a, kind: sqlite, path: a.db}
              - {name: b, kind: sqlite, path: b.db}
            policies:
              - {name: one, store: b, keep_last: 1}
              - {name: two, keep_last: 2}
              - {name: three, store: a, keep_last: 3}
            """)
    )
    assert [p.name for p in config.policies_for("a")] == ["two", "three"]
    assert [p.name for p in config.policies_for("b")] == ["one", "two"]
    with pytest.raises(KeyError):
        config.policies_for("c")


def test_thread_id_glob_or_list_normalises_to_tuple() -> None:
    assert Match.model_validate({"thread_id": "user-*"}).thread_id == ("user-*",)
    assert Match.model_validate({"thread_id": ["a-*", "b-*"]}).thread_id == ("a-*", "b-*")


def test_programmatic_construction() -> None:
    policy = Policy(name="p", keep_within=timedelta(days=7), match=Match(checkpoint_ns=""))
    store = StoreConfig(name="main", kind="postgres", dsn=PG_DSN, schema="janitor")  # type: ignore[arg-type]
    assert store.schema_ == "janitor"
    config = Config(stores=[store], policies=[policy])
    assert config.policies_for("main") == [policy]
    with pytest.raises(ValidationError):
        Policy(name="p")


def test_policies_are_hashable_even_with_metadata() -> None:
    config = load_config_text(DESIGN_EXAMPLE)
    assert len({*config.policies, *config.policies}) == 2
    same = Policy.model_validate(config.policies[1].model_dump())
    assert same == config.policies[1] and hash(same) == hash(config.policies[1])


def test_models_are_frozen() -> None:
    config = load_config_text(MINIMAL)
    with pytest.raises(ValidationError):
        config.policies[0].keep_last = 1


def test_durations_and_seconds_spellings() -> None:
    config = load_config_text(
        MINIMAL
        + textwrap.dedent("""\
            defaults:
              batch: {pause: 2s, busy_timeout: 1, lock_timeout: 0.5, grace_period: 2w}
            """)
    )
    batch = config.defaults.batch
    assert (batch.pause, batch.busy_timeout, batch.lock_timeout) == (2.0, 1.0, 0.5)
    assert batch.grace_period == timedelta(weeks=2)


def test_cron_weekdays_follow_crontab_not_apscheduler() -> None:
    # APScheduler 3 numbers weekdays from Monday; crontab's 0 is Sunday.
    start = datetime(2025, 1, 1, tzinfo=UTC)  # a Wednesday
    for expression in ("0 3 * * 0", "0 3 * * 7", "0 3 * * sun", "@weekly"):
        fire = trigger_for(Schedule(cron=expression)).get_next_fire_time(None, start)
        assert fire.strftime("%A") == "Sunday", expression
    weekdays = trigger_for(Schedule(cron="0 3 * * 1-5"))
    fire = weekdays.get_next_fire_time(None, datetime(2025, 1, 4, tzinfo=UTC))  # Saturday
    assert fire.strftime("%A") == "Monday"


def test_cron_timezone() -> None:
    schedule = Schedule(cron="0 3 * * *", timezone="Europe/Berlin")
    fire = trigger_for(schedule).get_next_fire_time(None, datetime(2025, 1, 1, tzinfo=UTC))
    assert fire.utcoffset() == timedelta(hours=1) and fire.hour == 3


def test_every_schedule_trigger() -> None:
    trigger = trigger_for(Schedule(every=timedelta(minutes=10)))
    assert trigger.interval == timedelta(minutes=10)


# --------------------------------------------------------------------------- substitution


def test_env_and_file_substitution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secrets" / "aes"
    secret.parent.mkdir()
    secret.write_text("0123456789abcdef\n")
    # YAML punctuation in a value must come through as text, not be parsed.
    monkeypatch.setenv("DB_DIR", "/data/a: b # not a comment")
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent("""\
            stores:
              - name: app
                kind: sqlite
                path: ${DB_DIR}/checkpoints.db
                encryption_key: ${file:secrets/aes}
              - {name: main, kind: postgres, dsn: "${TEST_PG_DSN}"}
            policies:
              - {name: p, keep_last: 1, description: "costs $${HOME} and $5"}
            """)
    )
    config = load_config(path)
    app = config.store("app")
    assert app.path == "/data/a: b # not a comment/checkpoints.db"
    assert app.encryption_key is not None
    assert app.encryption_key.get_secret_value() == "0123456789abcdef"
    main_dsn = config.store("main").dsn
    assert main_dsn is not None and main_dsn.get_secret_value() == PG_DSN
    assert config.policies[0].description == "costs ${HOME} and $5"


def test_yaml_merge_keys_are_supported() -> None:
    config = load_config_text(
        textwrap.dedent("""\
            stores:
              - &app {name: app, kind: sqlite, path: a.db}
              - {<<: *app, name: copy}
            policies:
              - {name: p, keep_last: 1}
            """)
    )
    assert [(s.name, s.path) for s in config.stores] == [("app", "a.db"), ("copy", "a.db")]


# --------------------------------------------------------------------------- errors

HEADER = """\
stores:
  - name: app
    kind: sqlite
    path: ./checkpoints.db
  - name: main
    kind: postgres
    dsn: ${TEST_PG_DSN}
policies:
"""  # lines 1-8; a case's own lines start at 9

OK_POLICY = "  - name: ok\n    keep_last: 1\n"

MALFORMED: list[tuple[str, str, int, str, str]] = [
    # (id, yaml, expected line, expected key path (substring), message fragment)
    ("broken-yaml-indent", HEADER + "  - name: p\n   keep_last: 1\n", 10, "", "indentation"),
    ("broken-yaml-flow", HEADER + "  - name: p\n    keep_last: [1\n  - name: q\n", 11, "", "flow"),
    ("broken-yaml-tab", HEADER + "  - name: p\n\tkeep_last: 1\n", 10, "", "tabs"),
    (
        "unquoted-cron-star",
        HEADER + "  - name: p\n    keep_last: 1\n    schedule: {cron: */5 * * * *}\n",
        11,
        "",
        "alias",
    ),
    ("unknown-top-level-key", HEADER + OK_POLICY + "metrcs: {}\n", 11, "metrcs", "did you mean"),
    (
        "unknown-policy-key",
        HEADER + "  - name: p\n    keep_lsat: 3\n",
        10,
        "policies[0].keep_lsat",
        "unknown key",
    ),
    (
        "unknown-match-key",
        HEADER + "  - name: p\n    keep_last: 3\n    match:\n      thread: x\n",
        12,
        "policies[0].match.thread",
        "allowed here: thread_id",
    ),
    (
        "zero-duration",
        HEADER + "  - name: p\n    expire_after: 0d\n",
        10,
        "policies[0].expire_after",
        "zero",
    ),
    (
        "negative-duration",
        HEADER + "  - name: p\n    keep_within: -7d\n",
        10,
        "policies[0].keep_within",
        "negative",
    ),
    (
        "duration-without-unit",
        HEADER + "  - name: p\n    expire_after: 30\n",
        10,
        "policies[0].expire_after",
        "no unit",
    ),
    (
        "negative-keep-last",
        HEADER + OK_POLICY + "  - name: p\n    keep_last: -1\n",
        12,
        "policies[1].keep_last",
        "greater than or equal to 1",
    ),
    ("missing-stores", "# comment\n\npolicies:\n" + OK_POLICY, 3, "stores", "required"),
    ("empty-stores", "stores: []\npolicies:\n" + OK_POLICY, 1, "stores", "no stores"),
    (
        "unknown-store-in-policy",
        HEADER + "  - name: p\n    keep_last: 1\n    store: mian\n",
        11,
        "policies[0].store",
        "unknown store 'mian'",
    ),
    (
        "keep-last-not-a-number",
        HEADER + OK_POLICY + "  - name: p\n    keep_last: five\n",
        12,
        "policies[1].keep_last",
        "valid integer",
    ),
    (
        "thread-id-not-a-glob",
        HEADER + "  - name: p\n    keep_last: 1\n    match:\n      thread_id: 5\n",
        12,
        "policies[0].match.thread_id",
        "glob string",
    ),
    (
        "thread-id-list-item-not-a-glob",
        HEADER + "  - name: p\n    keep_last: 1\n    match:\n      thread_id:\n        - a-*\n"
        "        - 7\n",
        14,
        "policies[0].match.thread_id[1]",
        "strings",
    ),
    ("empty-policy-list", HEADER + "  []\n", 8, "policies", "no policies"),
    ("missing-policies", HEADER.replace("policies:\n", ""), 1, "policies", "required"),
    (
        "policy-without-rule",
        HEADER + OK_POLICY + "  - name: nothing\n    match: {thread_id: x-*}\n",
        11,
        "policies[1]",
        "has no rule",
    ),
    (
        "protect-with-rule",
        HEADER + "  - name: p\n    expire_after: 3d\n    protect: true\n",
        11,
        "policies[0].protect",
        "would never delete",
    ),
    (
        "duplicate-policy-names",
        HEADER + OK_POLICY + "  - name: ok\n    keep_last: 2\n",
        11,
        "policies[1].name",
        "duplicate policy name 'ok'",
    ),
    (
        "duplicate-store-names",
        HEADER.replace("name: main", "name: app") + OK_POLICY,
        5,
        "stores[1].name",
        "duplicate store name",
    ),
    (
        "duplicate-key",
        HEADER + "  - name: p\n    keep_last: 1\n    keep_last: 2\n",
        11,
        "policies[0].keep_last",
        "first on line 10",
    ),
    (
        "missing-policy-name",
        HEADER + OK_POLICY + "  - keep_last: 2\n",
        11,
        "policies[1].name",
        "required",
    ),
    (
        "unset-env",
        HEADER.replace("TEST_PG_DSN", "JANITOR_UNSET_VARIABLE") + OK_POLICY,
        7,
        "stores[1].dsn",
        "JANITOR_UNSET_VARIABLE is not set",
    ),
    (
        "missing-secret-file",
        HEADER.replace("${TEST_PG_DSN}", "${file:/nonexistent/dsn}") + OK_POLICY,
        7,
        "stores[1].dsn",
        "cannot read /nonexistent/dsn",
    ),
    (
        "bad-reference",
        HEADER.replace("${TEST_PG_DSN}", "${not a name}") + OK_POLICY,
        7,
        "stores[1].dsn",
        "not a reference",
    ),
    (
        "bad-cron",
        HEADER + "  - name: p\n    keep_last: 1\n    schedule:\n      cron: '0 3 * *'\n",
        12,
        "policies[0].schedule.cron",
        "4 fields, expected 5",
    ),
    (
        "cron-day-of-month-and-week",
        HEADER + "  - name: p\n    keep_last: 1\n    schedule: {cron: '0 3 1 * mon'}\n",
        11,
        "policies[0].schedule.cron",
        "restrict only one",
    ),
    (
        "cron-out-of-range",
        HEADER + "  - name: p\n    keep_last: 1\n    schedule: {cron: '61 * * * *'}\n",
        11,
        "policies[0].schedule.cron",
        "59",
    ),
    (
        "bad-timezone",
        HEADER + "  - name: p\n    keep_last: 1\n    schedule:\n      cron: '0 3 * * *'\n"
        "      timezone: Mars/Olympus\n",
        13,
        "policies[0].schedule.timezone",
        "unknown time zone",
    ),
    (
        "schedule-every-and-cron",
        HEADER + OK_POLICY + "defaults:\n  schedule: {every: 1h, cron: '0 * * * *'}\n",
        12,
        "defaults.schedule",
        "exactly one",
    ),
    (
        "sqlite-with-dsn",
        "stores:\n  - name: app\n    kind: sqlite\n    path: a.db\n"
        f"    dsn: {PG_DSN}\npolicies:\n" + OK_POLICY,
        5,
        "stores[0].dsn",
        "for postgres stores",
    ),
    (
        "postgres-with-path",
        HEADER.replace("policies:\n", "    path: x.db\npolicies:\n") + OK_POLICY,
        8,
        "stores[1].path",
        "for sqlite stores",
    ),
    (
        "postgres-without-dsn",
        "stores:\n  - name: main\n    kind: postgres\npolicies:\n" + OK_POLICY,
        2,
        "stores[0].dsn",
        "needs `dsn`",
    ),
    (
        "postgres-keyword-dsn-wrong-key-type",
        "stores:\n  - name: main\n    kind: postgres\n"
        f"    dsn: host=db password={PASSWORD} dbname=app\n    pool: {{min_size: 9}}\n"
        "policies:\n" + OK_POLICY,
        5,
        "stores[0].pool.min_size",
        "larger than max_size",
    ),
    (
        "dsn-bad-scheme",
        f"stores:\n  - name: main\n    kind: postgres\n    dsn: mysql://u:{PASSWORD}@h/db\n"
        "policies:\n" + OK_POLICY,
        4,
        "stores[0].dsn",
        "scheme 'mysql'",
    ),
    (
        "unknown-kind",
        "stores:\n  - name: main\n    kind: mongo\n    path: x\npolicies:\n" + OK_POLICY,
        3,
        "stores[0].kind",
        "'sqlite' or 'postgres'",
    ),
    (
        "metadata-not-scalar",
        HEADER + "  - name: p\n    keep_last: 1\n    match:\n      metadata:\n"
        "        tags: [a, b]\n",
        13,
        "policies[0].match.metadata.tags",
        "scalars",
    ),
    (
        "interrupted-expire-without-expiry",
        HEADER + "  - name: p\n    keep_last: 1\n    interrupted: expire\n",
        11,
        "policies[0].interrupted",
        "expire_after",
    ),
    (
        "max-delete-fraction-zero",
        HEADER + OK_POLICY + "defaults:\n  max_delete_fraction: 0\n",
        12,
        "defaults.max_delete_fraction",
        "greater than 0",
    ),
    (
        "bad-listen",
        HEADER + OK_POLICY + "metrics:\n  listen: localhost\n",
        12,
        "metrics.listen",
        "host:port",
    ),
    (
        "string-for-bool",
        HEADER + "  - name: p\n    protect: 'yes'\n",
        10,
        "policies[0].protect",
        "valid boolean",
    ),
    (
        "non-string-key",
        HEADER + "  - name: p\n    keep_last: 1\n    match: {metadata: {1: a}}\n",
        11,
        "policies[0].match.metadata",
        "keys are strings",
    ),
    (
        "orphaned-without-grace",
        HEADER + "  - name: p\n    orphaned: {query: SELECT id FROM t}\n    keep_last: 1\n",
        10,
        "policies[0].orphaned",
        "needs expire_after",
    ),
    (
        "orphaned-unknown-key",
        HEADER + "  - name: p\n    expire_after: 1d\n    orphaned:\n      query: SELECT 1\n"
        "      sql: SELECT 2\n",
        13,
        "policies[0].orphaned.sql",
        "unknown key",
    ),
    (
        "orphan-source-sqlite-without-path",
        HEADER + "  - name: p\n    expire_after: 1d\n    orphaned:\n      query: SELECT 1\n"
        "      source: {kind: sqlite}\n",
        13,
        "policies[0].orphaned.source",
        "takes `path`",
    ),
    (
        "orphan-source-bad-dsn",
        HEADER + "  - name: p\n    expire_after: 1d\n    orphaned:\n      query: SELECT 1\n"
        f"      source: {{kind: postgres, dsn: 'mysql://u:{PASSWORD}@h/db'}}\n",
        13,
        "policies[0].orphaned.source.dsn",
        "scheme",
    ),
    (
        "quota-unitless-text",
        HEADER + "  - name: p\n    quota: {max_bytes: 50 megs}\n",
        10,
        "policies[0].quota.max_bytes",
        "number with a unit",
    ),
    (
        "quota-with-protect",
        HEADER + "  - name: p\n    protect: true\n    quota: {max_bytes: 50MB}\n",
        10,
        "policies[0].protect",
        "quota would never",
    ),
    (
        "store-max-bytes-zero",
        HEADER.replace("path: ./checkpoints.db", "path: ./checkpoints.db\n    max_bytes: 0GB")
        + OK_POLICY,
        5,
        "stores[0].max_bytes",
        "not positive",
    ),
    ("control-character", HEADER + "  - name: p\x00\n", 9, "", "U+0000 is not allowed"),
    ("top-level-list", "- stores\n- policies\n", 1, "", "top level must be a mapping"),
    ("empty-file", "", 1, "", "empty"),
]


@pytest.mark.parametrize(
    ("text", "line", "key", "fragment"),
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED],
)
def test_malformed_config_names_line_and_key(text: str, line: int, key: str, fragment: str) -> None:
    err = load_error(text)
    assert err.source == "test.yaml"
    assert err.line == line, str(err)
    if key:
        assert err.key is not None and key in err.key, str(err)
    else:
        assert err.key is None, str(err)
    assert fragment in err.message, str(err)
    prefix = f"test.yaml:{line}: {err.key}: " if err.key else f"test.yaml:{line}: "
    assert str(err) == prefix + err.message
    for shown in (str(err), err.format_all(), repr(err), *(i.message for i in err.issues)):
        assert PASSWORD not in shown


def test_all_problems_are_reported_in_file_order() -> None:
    err = load_error(
        HEADER
        + "  - name: a\n    keep_last: 0\n"  # 9-10
        + "  - name: b\n    expire_after: 1x\n"  # 11-12
        + "  - name: c\n    bogus: 1\n    keep_last: 1\n"  # 13-15
    )
    assert [(i.line, i.key) for i in err.issues] == [
        (10, "policies[0].keep_last"),
        (12, "policies[1].expire_after"),
        (14, "policies[2].bogus"),
    ]
    assert err.issues[0] is err or (err.issues[0].line, err.issues[0].key) == (err.line, err.key)
    assert len(err.format_all().splitlines()) == 3


def test_password_never_in_errors_about_the_dsn_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PG_DSN", f"host=db password={PASSWORD}")
    err = load_error(HEADER.replace("kind: postgres", "kind: sqlite") + OK_POLICY)
    assert (err.line, err.key) == (5, "stores[1].path")  # sqlite without path
    # The dsn line is wrong too (dsn on a sqlite store); neither error may leak it.
    for text in (str(err), err.format_all()):
        assert PASSWORD not in text


def test_missing_file_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.source, err.line, err.key) == (str(path), None, None)
    assert "cannot read" in err.message
    assert str(err) == f"{path}: {err.message}"


def test_directory_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(tmp_path)
    assert info.value.line is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(MINIMAL)
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path)


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(path)
    assert info.value.line == 5


def test_errors_name_the_file_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(HEADER + "  - name: p\n    keep_last: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:10: policies[0].keep_last: ")


def test_relative_secret_file_is_read_from_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text(PG_DSN + "\n")
    path = tmp_path / "config.yaml"
    path.write_text(HEADER.replace("${TEST_PG_DSN}", "${file:dsn}") + OK_POLICY)
    dsn = load_config(path).store("main").dsn
    assert dsn is not None and dsn.get_secret_value() == PG_DSN


def test_alias_loop_is_an_error_not_a_hang() -> None:
    err = load_error("stores: &s [*s]\npolicies: []\n")
    assert err.line is not None


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://u:p@h/db", "postgresql://u:***@h/db"),
        ("postgres://user:s3cr:et@host:5432/app", "postgres://user:***@host:5432/app"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        (
            "postgresql://h/db?user=u&password=pw&sslmode=require",
            "postgresql://h/db?user=u&password=***&sslmode=require",
        ),
        ("postgresql://u:p@h1:5432,h2:5432/db", "postgresql://u:***@h1:5432,h2:5432/db"),
        ("host=h password=p dbname=x", "host=h password=*** dbname=x"),
        ("host=h password = p dbname=x", "host=h password = *** dbname=x"),
        ("host=h password='a b\\' c' dbname=x", "host=h password=*** dbname=x"),
        ("host=h sslpassword=k user=u", "host=h sslpassword=*** user=u"),
        ("host=h user=u", "host=h user=u"),
    ],
)
def test_redact_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


def test_alias_bomb_is_an_error_not_a_hang() -> None:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev, name = chr(96 + i), chr(97 + i)
        levels.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    err = load_error("\n".join(levels) + "\n")
    assert "alias bomb" in err.message and len(err.issues) == 1


# --------------------------------------------------------------------------- reclaim


def test_reclaim_defaults_and_store_overrides() -> None:
    config = load_config_text(
        """\
stores:
  - {name: app, kind: sqlite, path: ./a.db, reclaim: {min_free_fraction: 0.5}}
  - {name: other, kind: sqlite, path: ./b.db}
defaults:
  reclaim: {after_sweep: true, wal_truncate_mb: 8}
policies:
  - {name: trim, keep_last: 5}
"""
    )
    app, other = config.reclaim_settings("app"), config.reclaim_settings("other")
    assert app.after_sweep and app.min_free_fraction == 0.5 and app.wal_truncate_mb == 8
    assert other.after_sweep and other.min_free_fraction == 0.25
    assert load_config_text(MINIMAL).reclaim_settings("app").after_sweep is False


@pytest.mark.parametrize(
    ("reclaim", "fragment"),
    [
        ("{after_sweeps: true}", "after_sweeps"),
        ("{min_free_fraction: 0}", "min_free_fraction"),
        ("{min_deleted_fraction: 1.5}", "min_deleted_fraction"),
        ("{min_disk_margin: -1}", "min_disk_margin"),
        ("{after_sweep: 'yes'}", "after_sweep"),
    ],
)
def test_reclaim_rejects(reclaim: str, fragment: str) -> None:
    error = load_error(MINIMAL.replace("policies:", f"defaults:\n  reclaim: {reclaim}\npolicies:"))
    assert fragment in str(error)


def test_orphaned_and_quota_keys_parse() -> None:
    cfg = load_config_text(
        "stores:\n  - {name: app, kind: sqlite, path: ./c.db, max_bytes: 20GB}\n"
        "policies:\n"
        "  - name: gone\n    expire_after: 1d\n"
        "    orphaned: {query: 'SELECT id FROM chats;  ', source: {kind: sqlite, path: ./a.db}}\n"
        "  - name: per-user\n    quota: {max_bytes: 512MiB, per: user_id}\n"
    )
    assert cfg.store("app").max_bytes == 20 * 10**9
    gone, per_user = cfg.policies
    assert gone.orphaned is not None and gone.orphaned.query == "SELECT id FROM chats"
    assert per_user.quota is not None and per_user.quota.max_bytes == 512 * 2**20
    assert per_user.head_metadata_keys == {"user_id"}
    assert parse_bytes("1.5KB") == 1500 and parse_bytes("100 B") == 100
