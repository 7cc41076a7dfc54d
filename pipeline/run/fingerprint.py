"""The parts of a stage's fingerprint that the runner derives: its code, its model roles, and what changed.

A stage's code is every project module it uses, found by following its imports (including imports inside
functions) from the module of its ``run`` function and its stage package, plus every file its config names
(prompt templates, the taxonomy, a chat template). Editing any of them makes the stage stale, and the plan
names the files. Not followed: the framework that runs stages (``pipeline.run``) and the command line
(``pipeline.cli``).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.files import fingerprint
from pipeline.run.artifacts import library_versions
from pipeline.run.config import RunConfig
from pipeline.run.stage import Stage
from pipeline.templates import REPO_ROOT, TemplateError, resolve_config_file

PROJECT_PACKAGES = ("pipeline", "stages", "critique", "reward")
"""Top-level packages whose modules count as a stage's code when it imports them."""
NOT_FOLLOWED = ("pipeline.run", "pipeline.cli")
"""The framework that runs stages and the command line: a stage imports the stage contract, but what it computes
does not depend on them."""
CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".jinja", ".j2", ".json", ".txt")
"""A string in a stage's config that names an existing file with one of these endings is part of its code."""
POOL_OUTPUT_FIELDS = ("model", "device", "dtype", "max_model_len", "seed", "engine_kwargs")
"""PoolConfig fields that change what a pool generates (the others change only speed or placement)."""


def _module_file(name: str) -> Path | None:
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if file is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        file = spec.origin if spec is not None and spec.has_location else None
    return Path(file) if file and file.endswith(".py") else None


def _followed(name: str, roots: tuple[str, ...]) -> bool:
    top = name.split(".")[0]
    if top not in roots:
        return False
    return not any(name == n or name.startswith(n + ".") for n in NOT_FOLLOWED)


@functools.lru_cache(maxsize=512)
def _imports(path: Path, package: str, mtime_ns: int) -> tuple[str, ...]:
    """Absolute names of what ``path`` imports (``from a import b`` gives both ``a`` and ``a.b``), skipping
    ``if TYPE_CHECKING:`` blocks. ``mtime_ns`` keys the cache."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                names.extend(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                names.append(base)
                names.extend(f"{base}.{a.name}" for a in child.names)
            visit(child)

    visit(tree)
    return tuple(dict.fromkeys(names))


def code_modules(stage: Stage) -> dict[str, Path]:
    """Module name -> file of every project module ``stage`` uses (its own module and package included)."""
    start = getattr(stage.run, "__module__", "") or ""
    parts = start.split(".")
    roots = tuple(dict.fromkeys((*PROJECT_PACKAGES, parts[0])))
    todo = [start] + ([".".join(parts[:2])] if parts[0] == "stages" and len(parts) > 2 else [])
    found: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _module_file(name)
        if path is None:
            continue
        found[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for imported in _imports(path, package, path.stat().st_mtime_ns):
            if _followed(imported, roots) and imported not in found:
                todo.append(imported)
    return found


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def config_files(section: Any) -> dict[str, Path]:
    """Files named by the values of a stage's config section (prompt files, taxonomy, chat template)."""
    if section is None:
        return {}
    found: dict[str, Path] = {}
    for text in _strings(section.model_dump(mode="json")):
        if not text.endswith(CONFIG_FILE_SUFFIXES) or "\n" in text:
            continue
        try:
            path = resolve_config_file(text)
        except (TemplateError, OSError):
            continue
        found[_label(path)] = path
    return found


def _label(path: Path) -> str:
    path = path.resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def code_version(stage: Stage, section: Any = None) -> dict:
    """The code part of a stage's fingerprint: a hash per file it uses, ``Stage.version`` and posttrain's
    version. ``section`` is the stage's config (the files it names count too)."""
    files = {_label(p): _file_hash(p) for p in code_modules(stage).values()}
    files.update({label: _file_hash(p) for label, p in config_files(section).items()})
    return {"files": dict(sorted(files.items())), "version": stage.version,
            "posttrain": library_versions().get("posttrain")}


def pool_fingerprint(cfg: RunConfig, role: str) -> str | None:
    """Fingerprint of the settings of a model role that change what its engines generate."""
    pc = cfg.models.get(role)
    if pc is None:
        return None
    return fingerprint({k: v for k, v in pc.model_dump(mode="json").items() if k in POOL_OUTPUT_FIELDS})


def _code_change(old: Any, new: Any) -> str:
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return "code changed"
    old_f, new_f = old.get("files") or {}, new.get("files") or {}
    changed = sorted(f for f in set(old_f) | set(new_f) if old_f.get(f) != new_f.get(f))
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        return f"code changed ({shown})"
    if old.get("version") != new.get("version"):
        return "code changed (Stage.version)"
    return "code changed (posttrain version)"


def what_changed(old: dict | None, new: dict) -> str:
    """Why a fingerprint differs from the one a manifest was written with, in words."""
    if not old:
        return "fingerprint changed"
    changes = []
    if old.get("config") != new.get("config"):
        changes.append("config changed")
    if old.get("code") != new.get("code"):
        changes.append(_code_change(old.get("code"), new.get("code")))
    if old.get("seed") != new.get("seed"):
        changes.append("seed changed")
    old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
    for k in sorted(set(old_in) | set(new_in)):
        if old_in.get(k) != new_in.get(k):
            changes.append(f"input {k!r} changed")
    old_p, new_p = old.get("pools", {}), new.get("pools", {})
    for k in sorted(set(old_p) | set(new_p)):
        if old_p.get(k) != new_p.get(k):
            changes.append(f"model role {k!r} changed")
    return ", ".join(changes) or "fingerprint changed"
