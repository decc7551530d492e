"""LangSmith Deployment's `checkpointer.ttl` (in `langgraph.json`) as checkpoint-janitor policy.

`langgraph.json`'s `checkpointer.ttl` (langgraph-cli's `ThreadTTLConfig`):

- `strategy`: `delete` (default) removes a thread idle for `default_ttl`;
  `keep_latest` keeps the thread and only its latest checkpoint;
- `default_ttl`: minutes (a number; fractions allowed);
- `sweep_interval_minutes`: how often the sweep runs;
- `sweep_limit`: threads acted on per sweep (LangSmith's default: 1000).

The translation: `delete` is `expire_after: <default_ttl>`; `keep_latest` is
`when_idle: {after: <default_ttl>, keep_last: 1}`; the interval is
`schedule: {every: <n>m}` (absent: `defaults.schedule`); the limit is
`max_threads_per_sweep`. Pure: the worker reads the file and hands its text
here (`parse_langgraph_ttl`), then replaces the policy naming it
(`apply_langgraph_ttl`); `translate` prints the same policy as YAML.
"""

from __future__ import annotations

import json
import math
import re
from datetime import timedelta
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.config import Policy
from policies.durations import format_duration
from policies.loader import ConfigError

__all__ = [
    "DEFAULT_SWEEP_LIMIT",
    "LangGraphTTL",
    "apply_langgraph_ttl",
    "parse_langgraph_ttl",
    "translate",
    "ttl_policy_fields",
]

DEFAULT_SWEEP_LIMIT = 1000
"""LangSmith's `sweep_limit` when `langgraph.json` gives none."""

_TTL_PATH = ("checkpointer", "ttl")


class LangGraphTTL(BaseModel):
    """`checkpointer.ttl` of a `langgraph.json`; unknown keys are errors, as in our config."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    strategy: Literal["delete", "keep_latest"] = "delete"
    default_ttl: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    sweep_interval_minutes: Annotated[int, Field(gt=0)] | None = None
    sweep_limit: Annotated[int, Field(gt=0)] | None = None


def parse_langgraph_ttl(text: str, source: str) -> LangGraphTTL:
    """The `checkpointer.ttl` of `langgraph.json` text; `source` names the file in errors.

    Raises ConfigError (file, line, key) for JSON that does not parse, a
    missing `checkpointer.ttl` or `default_ttl` (a self-hosted store has no
    per-thread TTLs of LangSmith's to fall back on, so nothing would expire),
    and a value LangSmith would not accept either.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(source, exc.lineno, None, f"invalid JSON: {exc.msg}") from None
    ttl: Any = data
    for depth, key in enumerate(_TTL_PATH):
        if not isinstance(ttl, dict) or ttl.get(key) is None:
            where = ".".join(_TTL_PATH[: depth + 1])
            raise ConfigError(
                source,
                _json_line(text, _TTL_PATH[:depth]),
                where,
                f"no {where}: the file sets no thread TTL for a policy to apply",
            )
        ttl = ttl[key]
    try:
        parsed = LangGraphTTL.model_validate(ttl)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = (*_TTL_PATH, *(str(p) for p in err["loc"]))
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = f"unknown key (known: {', '.join(LangGraphTTL.model_fields)})"
        elif "input" in err and not isinstance(err["input"], dict):
            message = f"{message}, got {err['input']!r}"
        raise ConfigError(source, _json_line(text, path), ".".join(path), message) from None
    if parsed.default_ttl is None:
        path = (*_TTL_PATH, "default_ttl")
        raise ConfigError(
            source,
            _json_line(text, _TTL_PATH),
            ".".join(path),
            "default_ttl is missing: without it nothing expires (minutes, e.g. 43200 for 30 days)",
        )
    seconds = parsed.default_ttl * 60
    if not math.isclose(seconds, round(seconds), abs_tol=1e-6) or round(seconds) < 1:
        path = (*_TTL_PATH, "default_ttl")
        raise ConfigError(
            source,
            _json_line(text, path),
            ".".join(path),
            f"default_ttl {parsed.default_ttl} minutes is not a whole number of seconds",
        )
    return parsed


def ttl_policy_fields(ttl: LangGraphTTL) -> dict[str, Any]:
    """The policy keys, as a config writes them, that `ttl` stands for."""
    assert ttl.default_ttl is not None  # `parse_langgraph_ttl` refuses a file without it
    after = format_duration(_minutes(ttl.default_ttl))
    fields: dict[str, Any] = (
        {"expire_after": after}
        if ttl.strategy == "delete"
        else {"when_idle": {"after": after, "keep_last": 1}}
    )
    if ttl.sweep_interval_minutes is not None:
        fields["schedule"] = {"every": f"{ttl.sweep_interval_minutes}m"}
    fields["max_threads_per_sweep"] = ttl.sweep_limit or DEFAULT_SWEEP_LIMIT
    return fields


def apply_langgraph_ttl(policy: Policy, ttl: LangGraphTTL) -> Policy:
    """`policy` (which names a `langgraph_json`) with the rules `ttl` stands for.

    Its name, store, match, `interrupted` and description stay. Raises
    ValueError when the result is not a valid policy (say, `interrupted:
    expire` with `keep_latest`, which expires nothing).
    """
    own = policy.model_dump(
        mode="python", include={"name", "store", "match", "interrupted", "description"}
    )
    own["match"] = policy.match
    try:
        return Policy.model_validate({**own, **ttl_policy_fields(ttl)})
    except ValidationError as exc:
        messages = "; ".join(str(e.get("ctx", {}).get("error") or e["msg"]) for e in exc.errors())
        raise ValueError(messages) from None


def translate(
    ttl: LangGraphTTL, name: str = "langgraph-ttl", source: str = "langgraph.json"
) -> str:
    """YAML `policies:` equivalent to `ttl`, for a config file (or to read what will run)."""
    fields = ttl_policy_fields(ttl)
    given = ", ".join(
        f"{k}: {int(v) if isinstance(v, float) and v.is_integer() else v}"
        for k, v in ttl.model_dump(exclude_none=True).items()
    )
    policy = {"name": name, **fields}
    body = yaml.safe_dump({"policies": [policy]}, sort_keys=False, default_flow_style=None)
    return (
        f"# {source} checkpointer.ttl ({given}) as checkpoint-janitor policies.\n"
        "# Unlike LangSmith's TTL, this also covers the threads that exist already:\n"
        "# check `checkpoint-janitor plan --threads` before the first real sweep.\n"
        f"{body}"
    )


def _minutes(minutes: float) -> timedelta:
    return timedelta(seconds=round(minutes * 60))


def _json_line(text: str, path: tuple[str, ...]) -> int:
    """The line of the deepest key of `path` found, in order, in JSON `text` (1 if none)."""
    pos, line = 0, 1
    for key in path:
        m = re.compile(r'"' + re.escape(json.dumps(key)[1:-1]) + r'"\s*:').search(text, pos)
        if m is None:
            break
        pos = m.end()
        line = text.count("\n", 0, m.start()) + 1
    return line
