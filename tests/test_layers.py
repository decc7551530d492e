"""`worker/` is layered by folder, and imports point only down (docs/architecture.md "Layers").

service -> sweep | saver -> stores -> policies. The sweep and the saver sit
side by side and share only the stores below them. Checked on the AST of every
module, so lazy imports inside functions and `TYPE_CHECKING` imports count too:
an upward import there is still a knot a newcomer has to untie.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "worker"

MAY_IMPORT = {
    "stores": frozenset({"stores"}),
    "sweep": frozenset({"sweep", "stores"}),
    "saver": frozenset({"saver", "stores"}),
    "service": frozenset({"service", "sweep", "saver", "stores"}),
}
"""Layer folder -> the layer folders of `worker` its modules may import from."""
ENTRY_POINTS = frozenset({"__init__.py", "__main__.py"})
"""The only modules directly in worker/: `from worker import RetentionSaver`, `python -m worker`."""


def _layer_of(module: str) -> str | None:
    """The layer folder of a `worker.<layer>...` module name; None for anything else in worker."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else None


def _worker_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every `worker...` module the file imports, relative imports resolved.

    `from worker.x import y` counts as importing `worker.x.y` when `y` is a
    submodule, so `from worker import service` names the layer it reaches.
    """
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [(line, m) for line, m in found if m.split(".")[0] == "worker"]


def test_every_worker_module_is_in_a_layer_folder() -> None:
    stray = [
        str(p.relative_to(ROOT))
        for p in sorted(WORKER.rglob("*.py"))
        if (p.parent == WORKER and p.name not in ENTRY_POINTS)
        or (p.parent != WORKER and p.relative_to(WORKER).parts[0] not in MAY_IMPORT)
    ]
    assert stray == [], f"modules outside worker/{{{', '.join(MAY_IMPORT)}}}/: {stray}"


def test_imports_point_only_down() -> None:
    upward = []
    for path in sorted(WORKER.rglob("*.py")):
        if path.parent == WORKER:
            continue
        layer = path.relative_to(WORKER).parts[0]
        for line, module in _worker_imports(path):
            target = _layer_of(module)
            if target not in MAY_IMPORT.get(layer, frozenset()):
                where = f"worker/{target}/" if target else "no layer"
                upward.append(f"{path.relative_to(ROOT)}:{line}: imports {module} ({where})")
    assert upward == [], "imports that do not point down:\n" + "\n".join(upward)
