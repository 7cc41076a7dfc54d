"""The run config: one YAML file (``configs/*.yaml``) validated by pydantic before any work starts.

```yaml
run_dir: runs/default
seed: 0
graph: [seeds, generate, ...]        # enabled stages (the runner orders them by inputs/outputs)
plugins: ["tests.runner_stages:DOCS_STAGE"]   # extra stages ("module:ATTR" or "file.py:ATTR")
ray: {address: null, num_cpus: null, num_gpus: null}
models:                               # model roles -> vLLM worker pools (pipeline.engines.pool.PoolConfig)
  policy: {model: smollm2-moe}
resources:                            # per stage: Ray resources of its remote shards
  filter: {remote: true, num_cpus: 1, num_workers: 2}
stages:                               # per stage: that stage's own config class
  generate: {...}
```

Each stage section is validated with the stage's own ``config_cls`` (a dynamic pydantic model is
built from the enabled stages), so every error carries its full field path. Errors are collected
and reformatted into one line per problem naming the file (or the ``--set`` that caused it), the
field path, and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model

from pipeline.engines.pool import PoolConfig
from pipeline.run.config_errors import format_errors, source_of
from pipeline.run.registry import DEFAULT_GRAPH, DEFAULT_STAGES, RegistryError, plugin_stages, resolve_stages
from pipeline.run.stage import ModelRole, Stage, roles_named

__all__ = ["ConfigError", "ModelRole", "RayConfig", "RunConfig", "StageResources", "build_config", "load_config"]


class ConfigError(ValueError):
    """The run config is invalid. ``problems`` holds one readable line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        head = "invalid run config" if len(problems) == 1 else f"invalid run config ({len(problems)} problems)"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))


class RayConfig(BaseModel):
    """Where stages run: an embedded local Ray, or a cluster."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    address: str | None = None
    """Cluster to join (e.g. "127.0.0.1:6379" or "auto"). None: $RAY_ADDRESS when set (as under
    `ray job submit`), else an embedded local Ray started on loopback when a stage first needs it."""
    num_cpus: int | None = Field(None, ge=1)
    """Embedded Ray only: logical CPUs it offers (None: the machine's cores)."""
    num_gpus: int | None = Field(None, ge=0)
    """Embedded Ray only: logical GPUs it offers (None: the GPUs Ray detects)."""


class TrackingConfig(BaseModel):
    """Experiment tracking of the run's trainers and stage figures (``pipeline/tracking.py``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"])
    """Trackers, as transformers' ``report_to`` names them: the SFT, reward and DPO trainers report to all of
    them (W&B and MLflow read their usual environment variables: project, tracking URI); the stages' own figures
    (per-round DPO and eval figures) go to TensorBoard. A tracker that is not installed is skipped with a
    warning. [] turns tracking off; the run directory's metrics.jsonl files are written either way."""
    dir: Path | None = None
    """Folder of the TensorBoard event files (one subfolder per trainer and per stage). None: RUN_DIR/tracking."""


class StageResources(BaseModel):
    """How one stage's shard work is placed on Ray (``resources.<stage>``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    remote: bool = False
    """Run the stage's `ctx.map` shards (and `ctx.call`) as Ray tasks with the resources below.
    False: run them in the driver process, the right choice when the shard work is sent to a
    worker pool (the pool's engines are already Ray actors with their own resources)."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs each Ray task of this stage reserves."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs each Ray task of this stage reserves (Ray sets CUDA_VISIBLE_DEVICES for it)."""
    num_workers: int = Field(2, ge=1)
    """Ray tasks of this stage in flight at once."""
    max_retries: int = Field(2, ge=0)
    """Times a shard whose Ray worker died (killed, crashed, node lost) is re-run before the stage
    fails. An exception raised by the shard function itself is not retried: the stage fails with it."""
    shard_size: int | None = Field(None, ge=1)
    """Records per shard for this stage (None: the run's `shard_size`)."""


class RunConfig(BaseModel):
    """A whole run. Stage sections are typed by the enabled stages' config classes (see
    ``build_config``); use ``stage_config(name)`` and ``resources_for(name)``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    run_dir: Path = Path("runs/default")
    """Run directory (relative paths are relative to the current folder; on a cluster use a path
    every node sees, since `ray job submit --working-dir` runs the job in a temporary copy)."""
    seed: int = 0
    """Run seed: every sampled request derives its seed from it and its record id."""
    graph: list[str] = Field(default_factory=lambda: list(DEFAULT_GRAPH))
    """Enabled stages. Their order here only breaks ties: the runner orders them by inputs/outputs."""
    plugins: list[str] = Field(default_factory=list)
    """Extra stages: "module:ATTR" or "path/file.py:ATTR" (a Stage, or a list/dict of Stages). A
    plugin stage named like a default stage replaces it."""
    shard_size: int = Field(64, ge=1)
    """Records per shard of `ctx.map` / `ctx.write`: the unit of resume after a kill."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """Ray cluster settings."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Experiment tracking (TensorBoard by default)."""
    models: dict[str, PoolConfig] = Field(default_factory=dict)
    """Model roles (e.g. policy, instruct, critic) -> vLLM worker pool settings. Roles with identical
    settings share one pool."""
    resources: Any = Field(default_factory=dict)
    """Per stage: Ray resources of its shard tasks (StageResources)."""
    stages: Any = Field(default_factory=dict)
    """Per stage: that stage's config (validated by the stage's own config class)."""

    _stages: dict[str, Stage] = PrivateAttr(default_factory=dict)

    @property
    def enabled(self) -> dict[str, Stage]:
        """Enabled stages by name (in graph order)."""
        return dict(self._stages)

    def stage_config(self, name: str) -> Any:
        section = self.stages.get(name) if isinstance(self.stages, dict) else getattr(self.stages, name, None)
        if section is None and name in self._stages:
            section = self._stages[name].config_cls()
        return section

    def resources_for(self, name: str) -> StageResources:
        res = self.resources.get(name) if isinstance(self.resources, dict) else getattr(self.resources, name, None)
        if isinstance(res, dict):
            res = StageResources.model_validate(res)
        return res or StageResources()


# -- loading -------------------------------------------------------------------------------------

def load_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file; ConfigError naming the file (and line) otherwise."""
    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a config file" if p.is_dir() else "config file not found"
        raise ConfigError([f"{p}: {what}; fix: give the path of a YAML run config, e.g. configs/default.yaml"])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{p}:{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: the top level must be a mapping of fields (run_dir, graph, stages, ...), "
                           f"not a {type(data).__name__}"])
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict[tuple, str]:
    """Apply ``a.b.c=value`` overrides in place (value parsed as YAML: ``2`` is an int, ``[a, b]``
    a list, ``null`` None). Returns path -> original text, to name the ``--set`` in errors."""
    origins: dict[tuple, str] = {}
    problems = []
    for expr in overrides:
        key, sep, raw = expr.partition("=")
        parts = [p for p in key.strip().split(".")]
        if not sep or not key.strip() or any(not p for p in parts):
            problems.append(f"--set {expr}: expected a dotted field path and a value, e.g. --set stages.evolve.rounds=2")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            # one line (PyYAML's own text spans several); quote a value meant as a plain string
            problems.append(f"--set {expr}: the value is not valid YAML ({getattr(exc, 'problem', None) or exc}); "
                            f"fix: quote it for a string (--set '{key.strip()}=\"...\"') or close its brackets")
            continue
        node: Any = data
        path: list = []
        ok = True
        for part in parts[:-1]:
            path.append(part)
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                problems.append(f"--set {expr}: {'.'.join(path[:-1])} is a {type(node).__name__}, not a mapping")
                ok = False
                break
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if not ok:
            continue
        last = parts[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            problems.append(f"--set {expr}: {'.'.join(parts[:-1])} is a {type(node).__name__}, not a mapping")
            continue
        origins[tuple(parts)] = f"--set {expr}"
    if problems:
        raise ConfigError(problems)
    return origins


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a run config file, apply ``--set`` overrides, import the enabled stages and validate
    everything. Raises ConfigError (one line per problem) before any work starts."""
    data = load_yaml(path)
    origins = apply_overrides(data, list(overrides))
    return build_config(data, source=str(path), origins=origins, base_dir=Path(path).parent)


class _Head(BaseModel):
    model_config = ConfigDict(extra="ignore")
    graph: list[str] = Field(default_factory=lambda: list(DEFAULT_GRAPH))
    plugins: list[str] = Field(default_factory=list)


def build_config(data: dict, source: str = "<config>", origins: dict[tuple, str] | None = None,
                 base_dir: Path | None = None) -> RunConfig:
    """Validate a config mapping (see ``load_config``)."""
    origins = origins or {}
    try:
        head = _Head.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, _Head, source, origins)) from None
    plugins = [_resolve_plugin_path(p, base_dir) for p in head.plugins]
    problems = [f"{source_of(('graph',), source, origins)}: graph: stage {n!r} is listed twice"
                for i, n in enumerate(head.graph) if n in head.graph[:i]]
    try:
        stages = resolve_stages(head.graph, plugins)
    except RegistryError as exc:
        raise ConfigError(problems + [f"{source_of((p.split('[')[0],), source, origins)}: {p}: {m}{_plugin_fix(p, m)}"
                                      for p, m in exc.problems]) from None
    if problems:
        raise ConfigError(problems)
    model = _run_config_model(stages, plugin_stages(plugins) if plugins else {})
    data = dict(data)
    if "plugins" in data:
        data["plugins"] = plugins
    try:
        cfg = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, model, source, origins)) from None
    cfg._stages = stages
    problems = _check_roles(cfg, source, origins)
    if problems:
        raise ConfigError(problems)
    return cfg


def _plugin_fix(path: str, message: str) -> str:
    """The fix for a plugins[i] problem (the registry's graph[i] problems carry their own)."""
    if not path.startswith("plugins") or "fix:" in message:
        return ""
    return ("; fix: give 'package.module:ATTR' of an importable module or 'path/file.py:ATTR' "
            "(relative to the config's folder) naming a Stage, or remove it from plugins")


def _resolve_plugin_path(spec: str, base_dir: Path | None) -> str:
    ref, sep, attr = spec.rpartition(":")
    if sep and ref.endswith(".py") and not Path(ref).is_absolute() and base_dir is not None:
        if not Path(ref).exists() and (base_dir / ref).exists():
            return f"{(base_dir / ref).resolve()}:{attr}"
    return spec


class _Sections(BaseModel):
    """Per-stage sections: attribute access (``cfg.stages.generate``) and mapping access
    (``cfg.stages["generate"]``, ``.get(name)``, iteration over the set sections)."""

    model_config = ConfigDict(extra="forbid")

    def __getitem__(self, name: str) -> Any:
        if name not in type(self).model_fields:
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        value = getattr(self, name, None) if name in type(self).model_fields else None
        return default if value is None else value

    def keys(self) -> list[str]:
        return [n for n in type(self).model_fields if getattr(self, n) is not None]


def _run_config_model(stages: dict[str, Stage], plugins: dict[str, Stage]) -> type[RunConfig]:
    """RunConfig with ``stages`` and ``resources`` typed for exactly these stages. Known but disabled
    stages keep a free-form section (their module is not imported); unknown names are errors."""
    known = list(DEFAULT_STAGES) + [n for n in plugins if n not in DEFAULT_STAGES] + \
        [n for n in stages if n not in DEFAULT_STAGES and n not in plugins]
    stage_fields: dict[str, Any] = {}
    res_fields: dict[str, Any] = {}
    for name in known:
        if name in stages:
            cls = stages[name].config_cls
            stage_fields[name] = (cls, Field(default_factory=cls, description=f"Config of stage {name}."))
        else:
            stage_fields[name] = (dict[str, Any] | None, Field(None, description=f"Stage {name} (not enabled)."))
        res_fields[name] = (StageResources | None, Field(None, description=f"Ray resources of stage {name}."))
    stages_model = create_model("StagesConfig", __base__=_Sections, **stage_fields)
    res_model = create_model("ResourcesConfig", __base__=_Sections, **res_fields)
    return create_model("RunConfig", __base__=RunConfig,
                        stages=(stages_model, Field(default_factory=stages_model)),
                        resources=(res_model, Field(default_factory=res_model)))


def _check_roles(cfg: RunConfig, source: str, origins: dict) -> list[str]:
    """Stage config fields typed ModelRole must name a role of ``models``."""
    problems = []
    for name in cfg.enabled:
        for field_path, role in roles_named(cfg.stage_config(name)):
            if role not in cfg.models:
                path = ("stages", name, *field_path.split("."))
                problems.append(f"{source_of(path, source, origins)}: {'.'.join(path)}: model role {role!r} is not "
                                f"defined; defined roles: {', '.join(cfg.models) or '(none)'}; "
                                f"fix: add models.{role} or use a defined role")
    return problems


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (every default filled in; sections of disabled stages only when
    the file has them)."""
    return yaml.safe_dump(config_dict(cfg), sort_keys=False, allow_unicode=True, width=100)


def config_dict(cfg: RunConfig) -> dict:
    data = cfg.model_dump(mode="json")
    for key in ("stages", "resources"):
        data[key] = {k: v for k, v in (data.get(key) or {}).items() if v is not None}
    return data
