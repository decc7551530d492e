"""Config files and what their `${...}` references stand for: the shell side of `policies.loader`.

`policies.loader` parses text and recognises references; this module reads
the file, and resolves `${NAME}` from the process environment and
`${file:/path}` from a file's content (trailing newlines stripped; a relative
path is taken from the config file's folder). Errors are `ConfigError`s
naming file, line and key, as the loader's are.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from policies.config import Config
from policies.loader import (
    ConfigError,
    Reference,
    UnresolvedReference,
    check_config_text,
    parse_config,
)

__all__ = ["EnvironmentResolver", "check_config", "load_config", "load_config_text"]


class EnvironmentResolver:
    """A `policies.loader.Resolver` over this process: its environment and its files.

    A relative `${file:...}` path is taken from `base_dir` (the config file's
    folder), or from the current directory when `base_dir` is None.
    """

    def __init__(self, base_dir: Path | None, environ: Mapping[str, str] = os.environ) -> None:
        self.base_dir = base_dir
        self.environ = environ

    def __call__(self, reference: Reference, /) -> str:
        """The variable's value, or the file's text without trailing newlines."""
        if reference.kind == "env":
            value = self.environ.get(reference.name)
            if value is None:
                raise UnresolvedReference(f"environment variable {reference.name} is not set")
            return value
        file = Path(reference.name)
        if self.base_dir is not None and not file.is_absolute():
            file = self.base_dir / file
        try:
            # A secret file written by `echo` or an editor ends in a newline that is no part of it.
            return file.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise UnresolvedReference(
                f"cannot read {file} for `${{file:{reference.name}}}`: {reason}"
            ) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, substitute and validate the config file at `path`.

    Raises ConfigError for anything wrong with it, including a file that
    cannot be read.
    """
    source = os.fspath(path)
    return parse_config(_read(source), source, EnvironmentResolver(Path(source).parent))


def check_config(path: str | os.PathLike[str], *, offline: bool = False) -> list[str]:
    """Check the config file at `path` without using it; raises ConfigError listing every issue.

    With `offline`, `${NAME}` and `${file:...}` are not looked up (a config
    written for another machine or a pod can be checked anywhere): the keys
    holding them are returned, and only their own checks are skipped.
    Returns [] when everything was checked.
    """
    source = os.fspath(path)
    resolver = None if offline else EnvironmentResolver(Path(source).parent)
    return check_config_text(_read(source), source, resolver)


def load_config_text(text: str, source: str = "<string>") -> Config:
    """Substitute and validate config text; `source` names it in errors.

    Relative `${file:...}` paths are taken from the current directory.
    """
    return parse_config(text, source, EnvironmentResolver(None))


def _read(source: str) -> str:
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(source, None, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            source, line, None, f"cannot read: not UTF-8 text (byte 0x{raw[exc.start]:02x})"
        ) from None
