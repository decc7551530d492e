"""Config text into a `Config`, with errors that name file, line and key.

The YAML is composed (not constructed) so every key and list item keeps the
line it came from; the node tree is walked into plain data and a map from key
paths to lines, and pydantic's error locations are mapped back onto it. The
lines stay on the `Config` (`Config.line_of`) for the shell to locate what it
finds later.

`${NAME}` and `${file:/path}` references are substituted inside string values
after parsing, so a secret full of YAML punctuation is never parsed as YAML.
`$${` stands for a literal `${`. This module only recognises a reference
(`Reference`); what it stands for comes from a `Resolver` the caller passes:
the shell's reads the environment and files (worker/service/config_files.py).
Without a resolver (`check_config_text(..., resolve=None)`) a value holding a
reference is taken as written and only errors that cannot be caused by what
the reference would supply are reported.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, Tag, ValidationError
from pydantic_core import ErrorDetails

from policies.config import Config, LocatedValueError, redact_dsn

__all__ = [
    "ConfigError",
    "Reference",
    "Resolver",
    "UnresolvedReference",
    "check_config_text",
    "parse_config",
]

KeyPath = tuple[str | int, ...]

_SECRET_KEYS = frozenset({"dsn", "encryption_key"})
# A bound on walked nodes: aliases can make a small file expand exponentially.
_MAX_NODES = 100_000
_TAG = "tag:yaml.org,2002:"
# `$${` escapes a literal `${`; `${...}` is a reference; a lone `${` is unterminated.
_REFERENCE = re.compile(r"\$(\$?)\{([^}]*)\}|\$\{")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConfigError(Exception):
    """A configuration that cannot be used, located as precisely as possible.

    `source` is the file (or whatever the caller named the text), `line`
    is 1-based (None only when the file cannot be read at all), `key` is the
    dotted key path such as `policies[1].keep_last` (None when the problem has
    no key, e.g. a YAML syntax error). `issues` holds every problem found, in
    file order; this error is the first of them.
    """

    def __init__(
        self,
        source: str,
        line: int | None,
        key: str | None,
        message: str,
        issues: Iterable[ConfigError] = (),
    ) -> None:
        super().__init__(source, line, key, message)
        self.source = source
        self.line = line
        self.key = key
        self.message = message
        self.issues: tuple[ConfigError, ...] = tuple(issues) or (self,)

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"

    def format_all(self) -> str:
        """Every issue, one per line, in file order."""
        return "\n".join(str(issue) for issue in self.issues)


@dataclass(frozen=True)
class Reference:
    """A `${...}` in a config value: `${NAME}` (`kind` "env") or `${file:path}` (`kind` "file").

    `name` is the variable's name or the path as written; placing a relative
    path is the resolver's business.
    """

    kind: Literal["env", "file"]
    name: str


class UnresolvedReference(Exception):
    """Raised by a `Resolver` that has no value for a reference; the message says why.

    The loader reports the message as written, at the value's line and key,
    so it must not quote what the value would have been.
    """


class Resolver(Protocol):
    """Supplies the text a `Reference` stands for, or raises `UnresolvedReference`.

    Called once per reference in a string value, after the YAML is parsed:
    the text returned is substituted as it is, never parsed as YAML.
    """

    def __call__(self, reference: Reference, /) -> str:
        """The text `reference` stands for."""
        ...


def parse_config(text: str, source: str, resolve: Resolver) -> Config:
    """Parse, substitute and validate config text; `source` names it in errors.

    Raises ConfigError listing every issue. The Config returned knows the
    line of each key (`Config.line_of`).
    """
    config, _ = _load(text, source, resolve)
    assert config is not None  # with a resolver every reference is resolved or raises
    return config


def check_config_text(text: str, source: str, resolve: Resolver | None) -> list[str]:
    """Check config text without using it; raises ConfigError listing every issue.

    With `resolve` None, references are not looked up (a config written for
    another machine or a pod can be checked anywhere): the keys holding them
    are returned, and only their own checks are skipped. Returns [] when
    everything was checked.
    """
    _, unresolved = _load(text, source, resolve)
    return unresolved


# --------------------------------------------------------------------------- loading


def _load(text: str, source: str, resolve: Resolver | None) -> tuple[Config | None, list[str]]:
    """The validated config (None when unresolved references kept it invalid) and those keys."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc, source) from None
    except yaml.reader.ReaderError as exc:  # a control character: a position, no mark
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError(
            source, line, None, f"invalid YAML: character U+{char:04X} is not allowed: {exc.reason}"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, 1, None, f"invalid YAML: {exc}") from None
    if root is None:
        raise ConfigError(
            source, 1, None, "the file is empty: a config needs at least `stores` and `policies`"
        )

    walker = _Walker(source, resolve)
    data = walker.walk(root, ())
    # A truncated tree (an alias bomb) would only add errors about what is missing.
    if not isinstance(data, dict) or (walker.errors and walker.truncated):
        if walker.errors:
            _raise_all(walker.errors)
        raise ConfigError(
            source,
            walker.lines[()],
            None,
            f"the top level must be a mapping (stores:, policies:, ...), not {_kind(data)}",
        )
    try:
        config: Config | None = Config.model_validate(data)
    except ValidationError as exc:
        config = None
        # A value already reported by the walker (or, without a resolver, one holding
        # a reference) fails validation only because of that: skip it.
        settled = walker.error_paths | walker.unresolved
        located = [
            (err, path)
            for err in exc.errors()
            if not _under(path := _issue_path(err, data), settled)
        ]
        issues = [
            _issue(err, path, walker, source) for err, path in _drop_misspelt_missing(located)
        ]
    else:
        issues = []
        # Kept so the shell can locate errors in what it reads for a key (langgraph_json).
        config._key_lines = dict(walker.lines)  # type: ignore[union-attr]
    if walker.errors or issues:
        _raise_all([*walker.errors, *issues])
    return config, sorted(k for k in map(_format_key, walker.unresolved) if k)


def _under(path: KeyPath, roots: set[KeyPath]) -> bool:
    return any(path[: len(root)] == root for root in roots)


def _drop_misspelt_missing(
    located: list[tuple[ErrorDetails, KeyPath]],
) -> list[tuple[ErrorDetails, KeyPath]]:
    """Without the "required key is missing" errors a misspelt sibling already explains.

    `polices:` is reported as an unknown key with a did-you-mean at its own
    line; "required key `policies` is missing" at line 1 would only mislead.
    """
    unknown: dict[KeyPath, list[str]] = {}
    for err, path in located:
        if err["type"] == "extra_forbidden" and path:
            unknown.setdefault(path[:-1], []).append(str(path[-1]))
    kept = []
    for err, path in located:
        if err["type"] == "missing" and path:
            siblings = unknown.get(path[:-1], [])
            if any(difflib.get_close_matches(str(path[-1]), [u], n=1) for u in siblings):
                continue
        kept.append((err, path))
    return kept


def _raise_all(issues: list[ConfigError]) -> typing.NoReturn:
    unique: dict[tuple[int | None, str | None, str], ConfigError] = {}
    for issue in issues:
        unique.setdefault((issue.line, issue.key, issue.message), issue)
    ordered = sorted(unique.values(), key=lambda i: (i.line or 0, i.key or ""))
    first = ordered[0]
    raise ConfigError(first.source, first.line, first.key, first.message, ordered)


def _yaml_error(exc: yaml.MarkedYAMLError, source: str) -> ConfigError:
    # Only `problem`/`context`: str(exc) would quote the offending line, which may hold a DSN.
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    parts = [p for p in (exc.context, exc.problem) if p]
    if (
        exc.context
        and exc.context_mark is not None
        and exc.problem_mark is not None
        and exc.context_mark.line != exc.problem_mark.line
    ):
        parts[0] = f"{exc.context} (line {exc.context_mark.line + 1})"
    message = "invalid YAML: " + ", ".join(parts)
    hint = _yaml_hint(exc)
    return ConfigError(source, line, None, message + hint if hint else message)


def _yaml_hint(exc: yaml.MarkedYAMLError) -> str:
    problem = exc.problem or ""
    if exc.context == "while scanning an alias":
        return ' (a value starting with * is read as an alias: quote it, e.g. "*/15 * * * *")'
    if "found character '\\t'" in problem:
        return " (YAML indents with spaces, not tabs)"
    if "expected <block end>" in problem:
        return " (check the indentation of this line)"
    return ""


class _Walker:
    """Turns a composed node tree into plain data, recording each key's line."""

    def __init__(self, source: str, resolve: Resolver | None) -> None:
        self.source = source
        self.resolve = resolve
        self.lines: dict[KeyPath, int] = {}
        self.errors: list[ConfigError] = []
        self.error_paths: set[KeyPath] = set()
        self.unresolved: set[KeyPath] = set()
        """Without a resolver: the values holding a reference that was not looked up."""
        self.secrets: set[str] = set()
        self._constructor = yaml.SafeLoader("")
        self._active: set[int] = set()
        self._count = 0

    @property
    def truncated(self) -> bool:
        """The walk stopped at the node limit: the data is incomplete."""
        return self._count > _MAX_NODES

    def error(self, line: int, path: KeyPath, message: str) -> None:
        self.errors.append(ConfigError(self.source, line, _format_key(path), message))
        self.error_paths.add(path)

    def walk(self, node: yaml.Node, path: KeyPath) -> Any:
        if not path:
            self.lines[()] = node.start_mark.line + 1
        self._count += 1
        if self._count > _MAX_NODES:
            if self._count == _MAX_NODES + 1:
                self.error(node.start_mark.line + 1, path, "too many values (an alias bomb?)")
            return None
        if id(node) in self._active:
            self.error(node.start_mark.line + 1, path, "an alias refers to its own anchor")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, path)
            return self._scalar(node, path)
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any] | None:
        if node.tag != _TAG + "map":
            self.error(node.start_mark.line + 1, path, f"unsupported YAML tag {node.tag!r}")
            return None
        result: dict[str, Any] = {}
        # `<<: *anchor` merges first so explicit keys override them (and their lines).
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                self._merge(value_node, path, result)
        explicit: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                continue
            line = key_node.start_mark.line + 1
            key = self._key(key_node, path)
            if key is None:
                continue
            where = (*path, key)
            if key in explicit:
                self.error(line, where, f"duplicate key {key!r} (first on line {explicit[key]})")
                continue
            explicit[key] = line
            self.lines[where] = line
            result[key] = self.walk(value_node, where)
        return result

    def _merge(self, value_node: yaml.Node, path: KeyPath, into: dict[str, Any]) -> None:
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        # In a merge list, earlier mappings win over later ones.
        for source_node in reversed(sources):
            if not isinstance(source_node, yaml.MappingNode):
                self.error(
                    source_node.start_mark.line + 1, path, "`<<` merges only mappings (*anchors)"
                )
                continue
            merged = self._mapping(source_node, path)
            if merged:
                into.update(merged)

    def _key(self, node: yaml.Node, path: KeyPath) -> str | None:
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.ScalarNode):
            self.error(line, path, "a key must be a plain string, not a list or mapping")
            return None
        try:
            key = self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError) as exc:
            self.error(line, path, f"invalid key: {exc}")
            return None
        if not isinstance(key, str):
            self.error(
                line,
                path,
                f"key {node.value!r} is read as {_kind(key)}; keys are strings (quote it)",
            )
            return None
        return key

    def _sequence(self, node: yaml.SequenceNode, path: KeyPath) -> list[Any] | None:
        if node.tag != _TAG + "seq":
            self.error(node.start_mark.line + 1, path, f"unsupported YAML tag {node.tag!r}")
            return None
        items = []
        for i, item in enumerate(node.value):
            self.lines[(*path, i)] = item.start_mark.line + 1
            items.append(self.walk(item, (*path, i)))
        return items

    def _scalar(self, node: yaml.Node, path: KeyPath) -> Any:
        line = self.lines.get(path, node.start_mark.line + 1)
        try:
            value = self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError) as exc:
            self.error(node.start_mark.line + 1, path, f"invalid value: {exc}")
            return None
        if isinstance(value, str):
            value = self._substitute(value, line, path)
            if path and path[-1] in _SECRET_KEYS and value:
                self.secrets.add(value)
        return value

    def _substitute(self, text: str, line: int, path: KeyPath) -> str:
        if "${" not in text:
            return text
        out: list[str] = []
        end = 0
        for m in _REFERENCE.finditer(text):
            out.append(text[end : m.start()])
            end = m.end()
            escaped, ref = m.group(1), m.group(2)
            if ref is None:
                self.error(line, path, "unterminated `${` (write `$${` for a literal `${`)")
                return text
            if escaped:
                out.append("${" + ref + "}")
                continue
            resolved = self._resolve(ref, line, path)
            if resolved is None:
                return text
            out.append(resolved)
        out.append(text[end:])
        return "".join(out)

    def _resolve(self, ref: str, line: int, path: KeyPath) -> str | None:
        if ref.startswith("file:"):
            name = ref[len("file:") :]
            if not name:
                self.error(line, path, "`${file:}` names no file")
                return None
            reference = Reference("file", name)
        elif _ENV_NAME.fullmatch(ref):
            reference = Reference("env", ref)
        else:
            self.error(
                line,
                path,
                f"`${{{ref}}}` is not a reference: write ${{NAME}} for an environment variable "
                "or ${file:/path} for a file (and $${ for a literal ${)",
            )
            return None
        if self.resolve is None:
            self.unresolved.add(path)
            return None
        try:
            return self.resolve(reference)
        except UnresolvedReference as exc:
            self.error(line, path, str(exc))
            return None


# --------------------------------------------------------------------------- pydantic errors


def _issue_path(err: ErrorDetails, data: Any) -> KeyPath:
    """Where in the data a pydantic error is, as precisely as the error allows."""
    loc: KeyPath = tuple(err["loc"])
    cause = err.get("ctx", {}).get("error")
    located = isinstance(cause, LocatedValueError)
    if isinstance(cause, LocatedValueError):
        loc = loc + cause.loc
    return _data_path(loc, data, keep_missing_tail=located or err["type"] == "missing")


def _issue(err: ErrorDetails, path: KeyPath, walker: _Walker, source: str) -> ConfigError:
    loc: KeyPath = tuple(err["loc"])
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, LocatedValueError):
        loc = loc + cause.loc
    line = _nearest_line(path, walker.lines)
    message = _message(err, cause, path, loc)
    return ConfigError(source, line, _format_key(path), _scrub(message, walker.secrets))


def _data_path(loc: KeyPath, data: Any, keep_missing_tail: bool) -> KeyPath:
    """The part of pydantic's `loc` that names places in the data.

    pydantic adds union-member tags (`str`, `function-after[...]`) to a loc;
    those name nothing in the file and are dropped. A missing key is kept as
    the last step when the error is about it being absent.
    """
    path: list[str | int] = []
    here: Any = data
    for i, part in enumerate(loc):
        in_dict = isinstance(here, dict) and isinstance(part, str) and part in here
        in_list = isinstance(here, list) and isinstance(part, int) and 0 <= part < len(here)
        if in_dict or in_list:
            here = here[part]
        elif i == len(loc) - 1 and keep_missing_tail:
            path.append(part)
            break
        else:
            # A union member's tag (`str`, `per_thread`) names no place: the next
            # part is looked up where this one was.
            continue
        path.append(part)
    return tuple(path)


def _nearest_line(path: KeyPath, lines: Mapping[KeyPath, int]) -> int:
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return 1


def _message(err: ErrorDetails, cause: object, path: KeyPath, loc: KeyPath) -> str:
    kind = err["type"]
    if isinstance(cause, Exception):
        return str(cause)
    if kind == "missing":
        return f"required key `{path[-1]}` is missing" if path else "a required key is missing"
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    got = err.get("input")
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping (key: value), got {_kind(got)}"
    if kind == "list_type":
        return f"expected a list (items starting with `- `), got {_kind(got)}"
    message = err["msg"]
    secret = any(part in _SECRET_KEYS for part in path if isinstance(part, str))
    if not secret and (got is None or isinstance(got, str | int | float | bool)):
        return f"{message}, got {_kind(got)} {got!r}"
    return f"{message}, got {_kind(got)}"


def _unknown_key(loc: KeyPath) -> str:
    key = loc[-1]
    model = _model_at(loc[:-1])
    if model is None:
        return f"unknown key {key!r}"
    allowed = [field.alias or name for name, field in model.model_fields.items()]
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (allowed here: {', '.join(allowed)})"


def _model_at(loc: KeyPath) -> type[BaseModel] | None:
    """The model class validating the data at `loc`, found by walking Config's annotations."""
    current: Any = Config
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            fields = current.model_fields
            match = [f for n, f in fields.items() if (f.alias or n) == part or n == part]
            if not match:
                return None
            current = match[0].annotation
        elif _tagged(current, part) is not None:
            current = _tagged(current, part)
        elif typing.get_origin(current) in (list, tuple) and isinstance(part, int):
            current = typing.get_args(current)[0]
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _tagged(union: Any, tag: str | int) -> Any:
    """The member of a discriminated union that pydantic's `tag` names, else None."""
    if typing.get_origin(union) not in (typing.Union, types.UnionType):
        return None
    for member in typing.get_args(union):
        if typing.get_origin(member) is typing.Annotated and any(
            isinstance(m, Tag) and m.tag == tag for m in member.__metadata__
        ):
            return member
    return None


def _unwrap(annotation: Any) -> Any:
    """Strip `Annotated[...]` and `X | None` down to the one meaningful type."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _scrub(message: str, secrets: set[str]) -> str:
    # Longest first, so a DSN goes whole before any shorter secret inside it.
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            message = message.replace(secret, "***")
    return redact_dsn(message)


def _kind(value: object) -> str:
    """A value's type in YAML words."""
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _format_key(path: KeyPath) -> str | None:
    """`policies[1].match.thread_id`; keys that are not plain words are quoted."""
    if not path:
        return None
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out
