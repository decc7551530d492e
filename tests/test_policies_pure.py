"""`policies` is the pure core: it parses text and values, and the shell does the I/O.

Reading the config file, the environment and `${file:...}` files is
worker/service/config_files.py's; building APScheduler triggers is
worker/service/schedule.py's (docs/architecture.md "Layers").
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from policies.loader import ConfigError, Reference, UnresolvedReference, parse_config

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"

# Validates a cron schedule and a whole config in a fresh interpreter, then
# names any I/O-side package it loaded on the way.
FRESH = """
import importlib, json, pkgutil, sys
import policies
for module in pkgutil.iter_modules(policies.__path__):
    importlib.import_module(f"policies.{module.name}")
from policies.config import Config, Schedule
Schedule(cron="*/15 8-18 * * mon-fri", timezone="Europe/Berlin")
Config.model_validate({
    "stores": [{"name": "app", "kind": "sqlite", "path": "/data/a.db"}],
    "policies": [{"name": "p", "keep_last": 1, "schedule": {"cron": "@daily"}}],
})
forbidden = ("apscheduler", "worker", "aiohttp", "aiosqlite", "asyncpg")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in forbidden)))
"""

BANNED_MODULES = frozenset({"os", "pathlib", "io", "shutil", "apscheduler", "worker"})
"""Modules whose import in `policies` would mean I/O or the shell (at any depth, lazy ones too)."""
BANNED_CALLS = frozenset({"open"})
BANNED_ATTRIBUTES = frozenset(
    {"read_text", "read_bytes", "write_text", "write_bytes", "environ", "getenv", "open"}
)


def test_importing_policies_loads_no_scheduler() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FRESH],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    assert json.loads(done.stdout) == []


def _io_in(path: Path) -> list[str]:
    """`file:line: what` for every banned import, call or attribute in the module at `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        if any(name.split(".")[0] in BANNED_MODULES for name in names):
            found.append(f"{path.name}:{node.lineno}: imports {', '.join(names)}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in BANNED_CALLS
        ):
            found.append(f"{path.name}:{node.lineno}: calls {node.func.id}()")
        if isinstance(node, ast.Attribute) and node.attr in BANNED_ATTRIBUTES:
            found.append(f"{path.name}:{node.lineno}: uses .{node.attr}")
    return found


def test_policies_modules_read_no_files_and_no_environment() -> None:
    modules = sorted(POLICIES.glob("*.py"))
    assert len(modules) > 5
    assert [issue for module in modules for issue in _io_in(module)] == []


def test_the_guard_sees_what_it_bans(tmp_path: Path) -> None:
    """The AST check itself: each banned shape in a module is reported."""
    module = tmp_path / "leaky.py"
    module.write_text(
        "import os\n"
        "from pathlib import Path\n"
        "def f():\n"
        "    from apscheduler.triggers.cron import CronTrigger\n"
        "    return open('x'), Path('y').read_text(), os.environ['Z'], os.getenv('Z')\n"
    )
    assert [issue.split(": ", 1)[0] for issue in _io_in(module)] == [
        "leaky.py:1",
        "leaky.py:2",
        "leaky.py:4",
        "leaky.py:5",
        "leaky.py:5",
        "leaky.py:5",
        "leaky.py:5",
    ]


CONFIG = """\
stores:
  - name: app
    kind: sqlite
    path: ${DATA}/app.db
policies:
  - name: p
    keep_last: 1
    match: {metadata: {tenant: "${file:tenant}"}}
"""


def test_references_come_from_the_callers_resolver() -> None:
    """A dict stands in for the environment and files: `policies` asks, and only asks, it."""
    asked: list[Reference] = []
    values = {Reference("env", "DATA"): "/srv/data", Reference("file", "tenant"): "acme"}

    def resolve(reference: Reference) -> str:
        asked.append(reference)
        return values[reference]

    config = parse_config(CONFIG, "mem.yaml", resolve)
    assert config.stores[0].path == "/srv/data/app.db"
    assert config.policies[0].match.metadata == {"tenant": "acme"}
    assert asked == [Reference("env", "DATA"), Reference("file", "tenant")]
    assert config.line_of(("policies", 0, "match")) == 8


def test_a_resolver_refusal_is_located() -> None:
    def resolve(reference: Reference) -> str:
        raise UnresolvedReference(f"no {reference.kind} {reference.name} here")

    with pytest.raises(ConfigError) as info:
        parse_config(CONFIG, "mem.yaml", resolve)
    assert [str(issue) for issue in info.value.issues] == [
        "mem.yaml:4: stores[0].path: no env DATA here",
        "mem.yaml:8: policies[0].match.metadata.tenant: no file tenant here",
    ]
