"""Read a finished (or partial) run directory and compute the figures that the dataset card and the
HTML report both show: funnel counts, domain / tier distributions, seed sources and licences, models.

Read-only: nothing here writes to the run directory. Every function copes with a stage that has not
run (it returns an empty result), because the report and the card are also made for partial runs.
The layout is the one fixed in ARCHITECTURE.md (``datasets/<name>/*.parquet``,
``stages/<stage>/manifest.json``, ``stages/<stage>/metrics.jsonl``, ``models/<name>/``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Pipeline order of the datasets (ARCHITECTURE.md, "Dataset names and record formats"); anything
# else a run holds is shown after these, alphabetically.
DATASET_ORDER = ("seeds", "instructions", "evolved", "answers", "sft", "preferences", "online_pairs")
STAGE_ORDER = ("seeds", "generate", "evolve", "answer", "filter", "sft", "reward", "dpo", "report")
MODEL_ORDER = ("sft_model", "reward_model", "dpo_model")


class RunDirError(RuntimeError):
    """The folder is not a readable run directory; the message names the path and the fix."""


def check_run_dir(run_dir: str | Path) -> Path:
    """Path of an existing run directory, or RunDirError naming the path and what it should hold."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise RunDirError(f"run directory {path} does not exist; fix: pass the folder that `posttrain run` wrote")
    if not any((path / sub).exists() for sub in ("config.yaml", "stages", "datasets")):
        raise RunDirError(
            f"{path} holds no config.yaml, stages/ or datasets/, so it is not a posttrain run directory; "
            "fix: pass the folder that `posttrain run` wrote (the `run_dir` of the run config)"
        )
    return path


def read_config(run_dir: Path) -> dict:
    """The resolved run config (``config.yaml``) as a dict, {} when absent."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RunDirError(f"{path} is not valid YAML ({exc}); fix: rerun `posttrain run` to rewrite it") from exc
    return data if isinstance(data, dict) else {}


def read_manifest(run_dir: Path, stage: str) -> dict | None:
    """``stages/<stage>/manifest.json`` as a dict, None when the stage has no (readable) manifest."""
    from pipeline.run.artifacts import ArtifactStore

    return ArtifactStore(run_dir).read_manifest(stage)


def read_metrics(run_dir: Path, stage: str) -> list[dict]:
    """Rows of ``stages/<stage>/metrics.jsonl`` ([] when absent). A torn last line (a run killed while
    appending) is skipped rather than failing the whole report."""
    path = run_dir / "stages" / stage / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def stage_names(run_dir: Path) -> list[str]:
    """Stages that have a folder under ``stages/``, in pipeline order."""
    root = run_dir / "stages"
    found = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    return _ordered(found, STAGE_ORDER)


def dataset_names(run_dir: Path) -> list[str]:
    """Datasets with at least one Parquet shard, in pipeline order."""
    root = run_dir / "datasets"
    found = [p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.parquet"))] if root.is_dir() else []
    return _ordered(found, DATASET_ORDER)


def dataset_files(run_dir: Path, name: str) -> list[Path]:
    return sorted((run_dir / "datasets" / name).glob("*.parquet"))


def read_dataset(run_dir: Path, name: str):
    """A run dataset as an in-memory ``datasets.Dataset`` (None when the stage has not written it),
    read by the run's artifact store (which also reconciles shard schemas)."""
    from pipeline.run.artifacts import ArtifactStore

    if not dataset_files(run_dir, name):
        return None
    try:
        return ArtifactStore(run_dir).read_dataset(name)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise RunDirError(
            f"cannot read dataset {name!r} from {run_dir / 'datasets' / name} ({type(exc).__name__}: {exc}); "
            f"fix: rerun the stage that writes `{name}`"
        ) from exc


def _ordered(names: Iterable[str], order: tuple[str, ...]) -> list[str]:
    names = list(names)
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)


# ---------------------------------------------------------------------------------------------- figures


@dataclass
class FunnelStep:
    """Records in one dataset of the run, in pipeline order."""

    dataset: str
    count: int
    stage: str | None = None


@dataclass
class RunSummary:
    """What the card and the report show about a run (all fields empty for stages not run yet)."""

    run_dir: Path
    config: dict
    stages: dict[str, dict] = field(default_factory=dict)
    funnel: list[FunnelStep] = field(default_factory=list)
    drops: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per stage: records dropped per rule / reason (the filter's QC rules, generate's parse failures...)."""
    domains: dict[str, Counter] = field(default_factory=dict)
    tiers: Counter = field(default_factory=Counter)
    operators: dict[str, dict[str, int]] = field(default_factory=dict)
    seed_sources: list[dict] = field(default_factory=list)
    models: dict[str, list[str]] = field(default_factory=dict)
    online_rounds: dict[str, int] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    """The datasets read for the figures (name -> ``datasets.Dataset``), kept for the report."""


def stage_seconds(manifest: dict | None) -> float | None:
    """Wall time of a stage from its manifest (``duration_s`` as the runner writes it, else
    ``elapsed_s`` of a running / failed stage, else a ``timings`` dict)."""
    if not manifest:
        return None
    for key in ("duration_s", "elapsed_s"):
        if isinstance(manifest.get(key), int | float):
            return float(manifest[key])
    timings = manifest.get("timings") or {}
    if isinstance(timings, int | float):
        return float(timings)
    if isinstance(timings, dict):
        for key in ("total_s", "wall_s", "seconds", "duration_s"):
            if isinstance(timings.get(key), int | float):
                return float(timings[key])
    return None


def _recorded_counts(manifest: dict | None) -> dict[str, int]:
    """Output record counts a manifest recorded (``outputs.<name>.records``, or a ``counts`` dict)."""
    out: dict[str, int] = {}
    outputs = (manifest or {}).get("outputs") or {}
    if isinstance(outputs, dict):
        out.update({k: int(v["records"]) for k, v in outputs.items()
                    if isinstance(v, dict) and isinstance(v.get("records"), int | float)})
    counts = (manifest or {}).get("counts") or {}
    if isinstance(counts, dict):
        out.update({k: int(v) for k, v in counts.items() if isinstance(v, int | float) and k not in out})
    return out


_PRODUCERS = {"seeds": "seeds", "instructions": "generate", "evolved": "evolve", "answers": "answer",
              "sft": "filter", "preferences": "filter", "online_pairs": "dpo"}


def producers(run_dir: Path) -> dict[str, str]:
    """Dataset name -> stage that wrote it: from the manifests' outputs, else ARCHITECTURE.md's table."""
    found = dict(_PRODUCERS)
    for stage in stage_names(run_dir):
        manifest = read_manifest(run_dir, stage) or {}
        outputs = manifest.get("outputs") or manifest.get("declared_outputs") or {}
        for name in outputs:
            found[str(name)] = stage
    return found


def funnel(run_dir: Path) -> list[FunnelStep]:
    """Records per dataset in pipeline order: the row count of the dataset on disk, else the count
    the producing stage recorded in its manifest."""
    import pyarrow.parquet as pq

    made_by = producers(run_dir)
    recorded: dict[str, int] = {}
    for stage in stage_names(run_dir):
        recorded.update(_recorded_counts(read_manifest(run_dir, stage)))
    names = _ordered(set(dataset_names(run_dir)) | {n for n in DATASET_ORDER if n in recorded}, DATASET_ORDER)
    steps = []
    for name in names:
        files = dataset_files(run_dir, name)
        count = sum(pq.read_metadata(f).num_rows for f in files) if files else recorded.get(name, 0)
        steps.append(FunnelStep(dataset=name, count=count, stage=made_by.get(name)))
    return steps


# Manifest metrics that count records a stage dropped: dicts ``<x>_by_reason`` (reason -> count, as
# the seeds and generate stages write them) or named dropped / drops / rejected / rule_drops, and
# plain numbers named dropped_* / rejected_* / removed_* (one reason each).
_DROP_PREFIXES = ("dropped_", "rejected_", "removed_", "skipped_")
_DROP_DICTS = ("dropped", "drops", "rejected", "rejections", "rule_drops", "removed", "skipped")


def stage_drops(metrics: dict) -> dict[str, int]:
    """Records dropped per rule / reason, from one stage manifest's ``metrics``."""
    drops: dict[str, int] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, dict) and (key.endswith("_by_reason") or key in _DROP_DICTS):
            verb = key.removesuffix("_by_reason")
            for reason, n in value.items():
                if isinstance(n, int | float) and not isinstance(n, bool):
                    name = str(reason) if verb in ("dropped", "drops", "rule_drops") else f"{verb}: {reason}"
                    drops[name] = drops.get(name, 0) + int(n)
        elif isinstance(value, int | float) and not isinstance(value, bool) and key.startswith(_DROP_PREFIXES):
            verb, reason = key.split("_", 1)
            if reason != "by_reason":
                drops[reason if verb == "dropped" else f"{verb}: {reason}"] = int(value)
    return drops


def all_drops(run_dir: Path) -> dict[str, dict[str, int]]:
    """Per stage (pipeline order), records dropped per rule / reason; stages that dropped nothing are left out."""
    out = {}
    for stage in stage_names(run_dir):
        drops = stage_drops((read_manifest(run_dir, stage) or {}).get("metrics") or {})
        if drops:
            out[stage] = drops
    return out


def column_counter(ds, column: str) -> Counter:
    """Value counts of a column (empty when the dataset or column is missing)."""
    if ds is None or column not in ds.column_names:
        return Counter()
    return Counter("none" if v is None else str(v) for v in ds[column])


def operator_yields(evolved, sft) -> dict[str, dict[str, int]]:
    """Per evolution operator: instructions in ``evolved`` and SFT rows that came from them (SFT rows
    keep the ``operator`` lineage field). Generated originals (operator None) are ``original``."""
    out: dict[str, dict[str, int]] = {}
    if evolved is None or "operator" not in evolved.column_names:
        return out
    for op, n in Counter(evolved["operator"]).items():
        out[op or "original"] = {"evolved": n, "in_sft": 0}
    if sft is not None and "operator" in sft.column_names:
        for op, n in Counter(sft["operator"]).items():
            out.setdefault(op or "original", {"evolved": 0, "in_sft": 0})["in_sft"] = n
    return out


def seed_sources(seeds) -> list[dict]:
    """Seed corpora grouped by (source kind, origin, licence): records and tokens. The origin is the
    part of ``source`` before the location (``file.py:120`` -> ``file.py``)."""
    if seeds is None:
        return []
    groups: dict[tuple, dict] = {}
    cols = seeds.column_names
    kinds = seeds["source_kind"] if "source_kind" in cols else ["unknown"] * len(seeds)
    sources = seeds["source"] if "source" in cols else ["unknown"] * len(seeds)
    licences = seeds["license"] if "license" in cols else ["unknown"] * len(seeds)
    tokens = seeds["n_tokens"] if "n_tokens" in cols else [0] * len(seeds)
    for kind, source, lic, n in zip(kinds, sources, licences, tokens, strict=True):
        origin = str(source).split("#")[0].rsplit(":", 1)[0] if source else "unknown"
        key = (str(kind), origin, str(lic or "unknown"))
        row = groups.setdefault(key, {"source_kind": key[0], "origin": key[1], "license": key[2],
                                      "records": 0, "tokens": 0})
        row["records"] += 1
        row["tokens"] += int(n or 0)
    return sorted(groups.values(), key=lambda r: (r["source_kind"], -r["records"], r["origin"]))


def models_used(config: dict, datasets_by_name: dict[str, Any],
                manifests: dict[str, dict] | None = None) -> dict[str, list[str]]:
    """Model names by role: from the run config (any key named ``model`` or ending in ``_model``;
    the role is the path to it), the pools the stages used, and the lineage fields of the records."""
    roles: dict[str, set[str]] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                key = str(key)
                if isinstance(value, str) and (key in ("model", "name_or_path") or key.endswith("_model")):
                    roles.setdefault(".".join((*path, key)) if key != "model" else ".".join(path) or "model",
                                     set()).add(value)
                elif key == "models" and isinstance(value, dict):
                    for role, name in value.items():
                        if isinstance(name, str):
                            roles.setdefault(".".join((*path, "models", str(role))), set()).add(name)
                        else:
                            walk(name, (*path, "models", str(role)))
                else:
                    walk(value, (*path, key))
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    walk(config, ())
    for manifest in (manifests or {}).values():  # roles the stages really served (runner records them)
        for role, name in ((manifest or {}).get("pools_used") or {}).items():
            if isinstance(name, str):
                roles.setdefault(f"models.{role}", set()).add(name)
    lineage = (("instructions", "model", "wrote instructions"), ("evolved", "model", "evolved instructions"),
               ("answers", "answer_model", "answered"), ("sft", "answer_model", "answered (kept in SFT)"))
    for name, column, role in lineage:
        ds = datasets_by_name.get(name)
        if ds is not None and column in ds.column_names:
            roles.setdefault(role, set()).update(str(v) for v in set(ds[column]) if v)
    answers = datasets_by_name.get("answers")
    if answers is not None and "responses" in answers.column_names:
        names = {r.get("model") for rs in answers["responses"] for r in (rs or []) if isinstance(r, dict)}
        roles.setdefault("answered", set()).update(n for n in names if n)
    return {role: sorted(names) for role, names in roles.items() if names}


def summarize(run_dir: str | Path) -> RunSummary:
    """Everything the card and the report show, read once from the run directory."""
    run_dir = check_run_dir(run_dir)
    config = read_config(run_dir)
    names = dataset_names(run_dir)
    data = {name: read_dataset(run_dir, name) for name in names
            if name in ("seeds", "instructions", "evolved", "answers", "sft", "preferences", "online_pairs")}
    summary = RunSummary(run_dir=run_dir, config=config, data=data)
    # the report stage is the one writing this: it does not describe the run's data
    summary.stages = {s: read_manifest(run_dir, s) or {} for s in stage_names(run_dir) if s != "report"}
    summary.funnel = funnel(run_dir)
    summary.drops = all_drops(run_dir)
    for name in ("evolved", "sft"):
        if (c := column_counter(data.get(name), "domain")):
            summary.domains[name] = c
    summary.tiers = column_counter(data.get("sft"), "tier")
    summary.operators = operator_yields(data.get("evolved"), data.get("sft"))
    summary.seed_sources = seed_sources(data.get("seeds"))
    summary.models = models_used(config, data, summary.stages)
    summary.online_rounds = dict(sorted(column_counter(data.get("online_pairs"), "source").items()))
    return summary
