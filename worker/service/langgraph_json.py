"""Reading the `langgraph.json` files that policies name (`langgraph_json:`).

`policies` parses text; this module reads the files. A policy's
`langgraph_json` path is taken from the config file's folder (as
`${file:...}` is), and the policy is replaced by what the file's
`checkpointer.ttl` stands for (`policies.langgraph`). Every error is a
`ConfigError` naming the file, line and key: the config's for a file that
cannot be read, the `langgraph.json`'s for what is wrong inside it.
"""

from __future__ import annotations

import os
from pathlib import Path

from policies.config import Config
from policies.langgraph import apply_langgraph_ttl, parse_langgraph_ttl, translate
from policies.loader import ConfigError
from worker.service.config_files import load_config

__all__ = ["load_worker_config", "resolve_langgraph_json", "translate_file"]


def load_worker_config(path: str | os.PathLike[str]) -> Config:
    """`load_config(path)` with every `langgraph_json` policy replaced by its translation."""
    return resolve_langgraph_json(load_config(path), path)


def resolve_langgraph_json(config: Config, config_path: str | os.PathLike[str]) -> Config:
    """`config` with each policy naming a `langgraph_json` replaced by what the file says."""
    source = os.fspath(config_path)
    base = Path(source).parent
    policies = list(config.policies)
    issues: list[ConfigError] = []
    for i, policy in enumerate(policies):
        if policy.langgraph_json is None:
            continue
        key = ("policies", i, "langgraph_json")
        where = f"policies[{i}].langgraph_json"
        file = base / policy.langgraph_json
        try:
            text = _read(file)
            policies[i] = apply_langgraph_ttl(policy, parse_langgraph_ttl(text, str(file)))
        except ConfigError as exc:
            issues.extend(exc.issues)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            issues.append(
                ConfigError(source, config.line_of(key), where, f"cannot read {file}: {reason}")
            )
        except ValueError as exc:
            message = f"{file}'s checkpointer.ttl does not make a valid policy here: {exc}"
            issues.append(ConfigError(source, config.line_of(key), where, message))
    if issues:
        first = issues[0]
        raise ConfigError(first.source, first.line, first.key, first.message, issues)
    return config.model_copy(update={"policies": policies})


def translate_file(path: str | os.PathLike[str], name: str = "langgraph-ttl") -> str:
    """The YAML policies equivalent to the `checkpointer.ttl` of the `langgraph.json` at `path`."""
    source = os.fspath(path)
    try:
        text = _read(Path(source))
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(source, None, None, f"cannot read: {reason}") from None
    return translate(parse_langgraph_ttl(text, source), name=name, source=Path(source).name)


def _read(file: Path) -> str:
    return file.read_text(encoding="utf-8")
