"""Stage name -> Stage object, imported lazily.

The default graph is the recipe's stages, one module each under ``stages/`` ending with a
``STAGE`` object. Users (and tests) add stages with ``plugins:`` in the run config: each entry is
``"package.module:ATTR"`` or ``"path/to/file.py:ATTR"`` where ATTR is a Stage, or a list / dict
of Stages. A plugin stage with the name of a default stage replaces it.

Only the stages enabled in the run config's ``graph`` are imported, so a stage module that does
not exist yet (or fails to import) breaks only the configs that enable it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.run.stage import Stage

DEFAULT_GRAPH: tuple[str, ...] = ("seeds", "generate", "evolve", "answer", "filter", "sft", "reward", "dpo",
                                  "eval", "report")
DEFAULT_STAGES: dict[str, str] = {name: f"stages.{name}:STAGE" for name in DEFAULT_GRAPH}


class RegistryError(ValueError):
    """A stage or plugin could not be found or imported. ``problems`` holds (field path, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in problems))


def _import_module(ref: str):
    if ref.endswith(".py") or os.sep in ref:
        path = Path(ref).expanduser().resolve()
        if not path.is_file():
            raise ImportError(f"file {path} does not exist")
        name = "posttrain_plugin_" + "".join(c if c.isalnum() else "_" for c in str(path.with_suffix("")))
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        # Ray workers cannot import a module loaded from a file path: ship its functions by value.
        import cloudpickle

        cloudpickle.register_pickle_by_value(module)
        return module
    # Like `python -m`: a module in the current folder is importable (e.g. tests.runner_stages).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(ref)


def load_object(spec: str) -> Any:
    """Import ``"module:attr"`` (or ``"file.py:attr"``); raises ImportError/AttributeError with the spec."""
    if ":" not in spec:
        raise ImportError(f"{spec!r} is not of the form 'module:ATTR' (or 'path/file.py:ATTR')")
    ref, attr = spec.rsplit(":", 1)
    module = _import_module(ref)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"{ref} has no attribute {attr!r}") from None
    return obj


def _stages_of(obj: Any) -> list[Stage] | None:
    if isinstance(obj, Stage):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else None
    if values is None:
        return None
    values = list(values)
    return values if values and all(isinstance(v, Stage) for v in values) else None


def plugin_stages(plugins: list[str]) -> dict[str, Stage]:
    """Stages provided by plugin specs, by name. Raises RegistryError naming ``plugins[i]``."""
    found: dict[str, Stage] = {}
    problems: list[tuple[str, str]] = []
    for i, spec in enumerate(plugins):
        try:
            obj = load_object(spec)
        except Exception as exc:
            problems.append((f"plugins[{i}]", f"cannot import {spec!r}: {type(exc).__name__}: {exc}"))
            continue
        stages = _stages_of(obj)
        if stages is None:
            problems.append((f"plugins[{i}]", f"{spec!r} is a {type(obj).__name__}, not a Stage "
                                              "(or a list/dict of Stages)"))
            continue
        for st in stages:
            found[st.name] = st
    if problems:
        raise RegistryError(problems)
    return found


def known_stage_names(plugins: dict[str, Stage]) -> list[str]:
    return list(DEFAULT_GRAPH) + [n for n in plugins if n not in DEFAULT_STAGES]


def resolve_stages(graph: list[str], plugins: list[str]) -> dict[str, Stage]:
    """Import the stages enabled in ``graph`` (plugins first). Raises RegistryError listing every
    unknown or unimportable stage with its ``graph[i]`` path and the fix."""
    from_plugins = plugin_stages(plugins)
    stages: dict[str, Stage] = {}
    problems: list[tuple[str, str]] = []
    for i, name in enumerate(graph):
        if name in from_plugins:
            stages[name] = from_plugins[name]
            continue
        ref = DEFAULT_STAGES.get(name)
        if ref is None:
            problems.append((f"graph[{i}]", f"unknown stage {name!r}; known stages: "
                                            f"{', '.join(known_stage_names(from_plugins))} "
                                            "(add others with plugins: ['module:STAGE'])"))
            continue
        try:
            obj = load_object(ref)
        except Exception as exc:
            problems.append((f"graph[{i}]", f"stage {name!r} ({ref}) cannot be imported: {type(exc).__name__}: "
                                            f"{exc}; fix: remove {name!r} from graph, or provide it with a plugin"))
            continue
        if not isinstance(obj, Stage) or obj.name != name:
            problems.append((f"graph[{i}]", f"{ref} is not a Stage named {name!r}"))
            continue
        stages[name] = obj
    if problems:
        raise RegistryError(problems)
    return stages
