"""The layering that ``pipeline/__init__.py`` describes holds: a module imports only from its own layer or lower
ones, imports inside functions included. (A cycle between the stage contract and the runner, or a helper of the
critique importing a stage, fails here.)"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# longest prefix wins; layers as pipeline/__init__.py numbers them
LAYERS: dict[str, int] = {
    "pipeline.files": 0, "pipeline.executor": 0, "pipeline.memory": 0, "pipeline.records": 0,
    "pipeline.templates": 0, "pipeline.thinking": 0, "pipeline.tracking": 0,
    "pipeline.models": 1, "pipeline.training": 1,
    "pipeline.engines": 2,
    "critique": 3, "reward": 3,
    "pipeline.run": 4,
    "stages": 5,
    # the report stage only renders the report: it sits with the reporting code it calls
    "stages.report": 6, "pipeline.reporting": 6, "pipeline.cli": 6, "pipeline.demo": 6, "benchmarks": 6,
}


def layer(module: str) -> int | None:
    if module == "pipeline":  # the package's own __init__ (its docstring describes the layers)
        return 0
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return LAYERS[best] if best is not None else None


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def project_modules() -> dict[str, Path]:
    out = {}
    for top in ("pipeline", "stages", "critique", "reward", "benchmarks"):
        for path in (REPO / top).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def test_every_module_has_a_layer():
    assert [m for m in project_modules() if layer(m) is None] == []


def test_no_module_imports_a_higher_layer():
    bad = []
    for module, path in sorted(project_modules().items()):
        own = layer(module)
        for line, name in imports(path):
            other = layer(name)
            if other is not None and other > own:
                bad.append(f"{path.relative_to(REPO)}:{line} (layer {own}) imports {name} (layer {other})")
    assert bad == []
