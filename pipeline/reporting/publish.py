"""Publish a run to the Hugging Face Hub: its datasets as one dataset repo with one config per
dataset (``sft``, ``preferences``, ``online_dpo_round_k`` ...) and, optionally, the final model.

Two steps, so that a dry run writes exactly what an upload sends:

1. **Bundle**: the repo's files in a local folder. Each config's rows are re-written with
   ``datasets`` as ``data/<config>/train-XXXXX-of-YYYYY.parquet`` (the layout ``push_to_hub`` uses),
   the dataset card (``README.md``, see ``pipeline/reporting/card.py``) next to them. ``--dry-run DIR`` stops
   here; ``load_dataset(DIR, name=...)`` reads the result like the Hub repo.
2. **Upload** with ``huggingface_hub``: token, network and write access are checked before any file
   is sent; then one commit per config (README last, so the card appears once the data is there).
   Files already on the Hub with the same content are skipped, so a rerun after a failure continues
   where it stopped. We commit per config ourselves instead of calling ``Dataset.push_to_hub`` so a
   failure leaves whole configs behind and the message can say which ones are on the Hub.

Tokens never leave ``huggingface_hub``'s request headers: messages and the card are redacted.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.reporting.card import CardConfig, redact, render_card
from pipeline.reporting.hub_upload import Bundle, HubUploader, PublishError, PublishResult
from pipeline.reporting.run_stats import RunDirError, check_run_dir, read_dataset, summarize
from pipeline.run.artifacts import final_model_dir
from pipeline.run.console import library_bars_off

log = logging.getLogger("posttrain.publish")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ROUND = re.compile(r"^online_round_(\d+)$")
CARD_MARKER = "posttrain"  # a tag every generated card carries: marks a folder as a bundle we may rewrite


class PublishConfig(BaseModel):
    """What ``posttrain publish`` uploads, and where."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    repo_id: str
    """Dataset repo on the Hub, ``ORG/NAME`` (created if missing)."""
    private: bool = False
    """Create the repos as private (ignored for repos that already exist)."""
    dry_run: Path | None = None
    """Write the dataset repo's files into this folder instead of uploading (the model repo, if any,
    goes to the sibling folder ``<DIR>-model``)."""
    model_repo_id: str | None = None
    """Also upload the run's final model (``dpo_model``, else ``sft_model``) to this model repo."""
    include_intermediate: bool = False
    """Also publish the intermediate datasets (``seeds``, ``instructions``, ``evolved``, ``answers``)
    as configs; by default only ``sft``, ``preferences`` and the online DPO rounds."""
    max_shard_mb: int = Field(500, ge=1)
    """Largest Parquet shard of a config, in MB of Arrow data (``push_to_hub``'s default)."""
    endpoint: str | None = None
    """Hub endpoint; None: ``HF_ENDPOINT`` or https://huggingface.co."""


# ---------------------------------------------------------------------------------------- bundle


def plan_configs(run_dir: Path, include_intermediate: bool = False) -> list[tuple[str, Any]]:
    """(config name, ``datasets.Dataset``) for each config to publish, the default (``sft``) first.
    ``online_pairs`` is split into one config per round by its ``source`` field."""
    names = ["sft", "preferences"]
    if include_intermediate:
        names = ["seeds", "instructions", "evolved", "answers", *names]
    plan = [(name, ds) for name in names if (ds := read_dataset(run_dir, name)) is not None]
    plan.sort(key=lambda item: item[0] != "sft")
    online = read_dataset(run_dir, "online_pairs")
    if online is not None and len(online):
        if "source" in online.column_names:
            rounds = sorted(set(online["source"]), key=lambda s: (int(m.group(1)) if (m := _ROUND.match(str(s)))
                                                                 else math.inf, str(s)))
            for src in rounds:
                m = _ROUND.match(str(src))
                name = f"online_dpo_round_{m.group(1)}" if m else f"online_dpo_{re.sub(r'[^A-Za-z0-9_]', '_', str(src))}"
                plan.append((name, online.filter(lambda s, src=src: s == src, input_columns="source",
                                                 keep_in_memory=True).flatten_indices(keep_in_memory=True)))
        else:
            plan.append(("online_dpo", online))
    if not plan:
        raise PublishError(f"{run_dir} holds none of the datasets to publish (sft, preferences, online_pairs "
                           "under datasets/); fix: run the pipeline at least through the filter stage")
    return plan


def _check_out_dir(out_dir: Path) -> None:
    """A bundle folder may be new, empty, or an earlier bundle (rewritten); anything else is refused."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise PublishError(f"{out_dir} is a file; fix: give a folder path for the bundle")
        if any(out_dir.iterdir()):
            readme = out_dir / "README.md"
            if not (readme.is_file() and CARD_MARKER in readme.read_text(errors="replace")[:4000]):
                raise PublishError(f"{out_dir} is not empty and holds no posttrain bundle; fix: give an empty "
                                   "or new folder (it will be overwritten)")


def _partial_dir(out_dir: Path) -> Path:
    """Bundles are written aside and renamed into place, so a killed build never leaves half a bundle."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _move_into_place(partial: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)


def _score_ranges(ds) -> dict[str, tuple[float, float]]:
    if ds is None or "scores" not in ds.column_names:
        return {}
    ranges: dict[str, tuple[float, float]] = {}
    for row in ds["scores"]:
        for key, value in (row or {}).items():
            if isinstance(value, int | float):
                lo, hi = ranges.get(key, (value, value))
                ranges[key] = (min(lo, value), max(hi, value))
    return ranges


def build_dataset_bundle(run_dir: str | Path, out_dir: str | Path, cfg: PublishConfig, *,
                         secrets: tuple[str, ...] = ()) -> Bundle:
    """Write the dataset repo (Parquet shards per config + README.md card) into ``out_dir``."""
    run_dir = check_run_dir(run_dir)
    out_dir = Path(out_dir).expanduser().absolute()
    _check_out_dir(out_dir)
    plan = plan_configs(run_dir, cfg.include_intermediate)
    summary = summarize(run_dir)
    work = _partial_dir(out_dir)
    rows, groups, card_configs = {}, [], []
    for i, (name, ds) in enumerate(plan):
        data_dir = f"data/{name}"
        num_bytes = ds.data.nbytes
        n_shards = max(1, math.ceil(num_bytes / (cfg.max_shard_mb * 2**20)))
        paths, download = [], 0
        for k in range(n_shards):
            rel = f"{data_dir}/train-{k:05d}-of-{n_shards:05d}.parquet"
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            ds.shard(n_shards, k, contiguous=True).to_parquet(str(work / rel))
            download += (work / rel).stat().st_size
            paths.append(rel)
        groups.append((name, paths))
        rows[name] = len(ds)
        card_configs.append(CardConfig(name=name, rows=len(ds), features=ds.features, num_bytes=num_bytes,
                                       download_bytes=download, data_dir=data_dir, default=i == 0))
    card = render_card(card_configs, summary, cfg.repo_id, secrets=secrets,
                       score_ranges=_score_ranges(next((ds for n, ds in plan if n == "sft"), None)))
    (work / "README.md").write_text(card)
    groups.append(("card", ["README.md"]))
    _move_into_place(work, out_dir)
    files = {rel: out_dir / rel for _, paths in groups for rel in paths}
    return Bundle(root=out_dir, repo_type="dataset", files=files, groups=groups, rows=rows, stale_prefix="data/")


def _model_card(model_dir: Path, cfg: PublishConfig, run_dir: Path, secrets: tuple[str, ...]) -> str:
    from huggingface_hub import ModelCardData

    from pipeline.reporting.run_stats import read_manifest

    arch = json.loads((model_dir / "config.json").read_text())
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", datasets=[cfg.repo_id],
                         tags=["posttrain", "mixture-of-experts", "dpo", "sft", "synthetic-data"])
    facts = [("architecture", ", ".join(arch.get("architectures") or ["?"]))]
    for key, label in (("num_experts", "routed experts"), ("num_experts_per_tok", "experts per token"),
                       ("shared_expert_intermediate_size", "shared expert size"),
                       ("num_hidden_layers", "layers"), ("hidden_size", "hidden size")):
        if key in arch:
            facts.append((label, arch[key]))
    stages = []
    for stage in ("sft", "reward", "dpo"):
        metrics = (read_manifest(run_dir, stage) or {}).get("metrics") or {}
        shown = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
        if shown:
            stages.append(f"- `{stage}`: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    lines = [f"---\n{data.to_yaml()}\n---", f"# {cfg.model_repo_id}", "",
             f"The final policy of a `posttrain` run ({model_dir.name}): a chat model post-trained with the "
             "Hunyuan-Large recipe (tiered SFT with MoE dropout and expert-specific learning rates"
             + (", then iterative online DPO)" if model_dir.name == "dpo_model" else "; this run has no DPO model)")
             + f". Training data: `{cfg.repo_id}`.", "",
             "| property | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], ""]
    if stages:
        lines += ["## Training figures (from the run's stage manifests)", "", *stages, ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tok = AutoTokenizer.from_pretrained("{cfg.model_repo_id}")',
              f'model = AutoModelForCausalLM.from_pretrained("{cfg.model_repo_id}")', "```", "",
              f"vLLM serves it too: `vllm serve {cfg.model_repo_id}`.", ""]
    return redact("\n".join(lines), secrets)


def build_model_bundle(run_dir: str | Path, out_dir: str | Path, cfg: PublishConfig, *, copy: bool,
                       secrets: tuple[str, ...] = ()) -> Bundle:
    """The model repo: the final model's files and a generated README.md. With ``copy`` (dry run) the
    files are copied into ``out_dir``; otherwise they are uploaded from the run's model folder and only
    the card is written to ``out_dir``."""
    run_dir = check_run_dir(run_dir)
    model_dir = final_model_dir(run_dir)
    if model_dir is None:
        raise PublishError(f"{run_dir / 'models'} holds no dpo_model or sft_model with a config.json, so there is "
                           "no model to publish; fix: run the sft/dpo stages, or drop --model-repo-id")
    out_dir = Path(out_dir).expanduser().absolute()
    _check_out_dir(out_dir)
    work = _partial_dir(out_dir)
    sources, weights, rest = {}, [], []
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir).as_posix()
        if not path.is_file() or rel.startswith((".", "checkpoint-")) or rel == "README.md":
            continue
        if copy:
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, work / rel)
        sources[rel] = path
        (weights if rel.endswith((".safetensors", ".bin", ".pt")) else rest).append(rel)
    (work / "README.md").write_text(_model_card(model_dir, cfg, run_dir, secrets))
    _move_into_place(work, out_dir)
    files = {rel: (out_dir / rel if copy else src) for rel, src in sources.items()}
    files["README.md"] = out_dir / "README.md"
    return Bundle(root=out_dir, repo_type="model", files=files,
                  groups=[("model", rest + weights), ("model card", ["README.md"])])


# ---------------------------------------------------------------------------------------- entry point


def publish(run_dir: str | Path, cfg: PublishConfig, *, token: str | None = None,
            echo: Callable[[str], None] = print) -> PublishResult:
    """Bundle the run and upload it (or only bundle it, with ``cfg.dry_run``). See the module docstring."""
    with library_bars_off():
        return _publish(run_dir, cfg, token=token, echo=echo)


def _publish(run_dir: str | Path, cfg: PublishConfig, *, token: str | None,
             echo: Callable[[str], None]) -> PublishResult:
    from huggingface_hub import get_token

    def say(message: str) -> None:
        message = redact(message, secrets)
        log.info("%s", message)
        echo(message)

    if not _REPO_ID.match(cfg.repo_id):
        raise PublishError(f"--repo-id {cfg.repo_id!r} is not ORG/NAME; fix: e.g. --repo-id my-org/posttrain-data")
    if cfg.model_repo_id is not None and not _REPO_ID.match(cfg.model_repo_id):
        raise PublishError(f"--model-repo-id {cfg.model_repo_id!r} is not ORG/NAME; fix: e.g. my-org/posttrain-moe")
    try:
        run_dir = check_run_dir(run_dir)
    except RunDirError as exc:
        raise PublishError(str(exc)) from None
    token = None if cfg.dry_run else (token or get_token())
    secrets = tuple(s for s in (token, get_token()) if s)

    if cfg.model_repo_id and final_model_dir(run_dir) is None:  # fail before building anything
        raise PublishError(f"{run_dir / 'models'} holds no dpo_model or sft_model, so there is no model to "
                           "publish; fix: run the sft/dpo stages, or drop --model-repo-id")

    if cfg.dry_run:
        out = Path(cfg.dry_run).expanduser()
        bundle = build_dataset_bundle(run_dir, out, cfg, secrets=secrets)
        result = PublishResult(dataset_bundle=bundle)
        say(f"dry run: dataset repo {cfg.repo_id} written to {out}")
        for name, rows in bundle.rows.items():
            say(f"  config {name}: {rows} rows, {len([p for p in bundle.files if p.startswith(f'data/{name}/')])} "
                "shard(s)")
        if cfg.model_repo_id:
            model_out = out.with_name(out.name + "-model")
            result.model_bundle = build_model_bundle(run_dir, model_out, cfg, copy=True, secrets=secrets)
            say(f"dry run: model repo {cfg.model_repo_id} written to {model_out}")
        say("nothing was uploaded; load it with datasets.load_dataset(DIR, name=CONFIG)")
        return result

    if not token:
        raise PublishError("no Hugging Face token found, nothing was uploaded; fix: set HF_TOKEN to a write token "
                           "(https://huggingface.co/settings/tokens) or run `hf auth login`; "
                           "or use --dry-run DIR to write the files locally")
    staging = run_dir / "publish" / cfg.repo_id.replace("/", "__")
    bundle = build_dataset_bundle(run_dir, staging / "dataset", cfg, secrets=secrets)
    model_bundle = (build_model_bundle(run_dir, staging / "model", cfg, copy=False, secrets=secrets)
                    if cfg.model_repo_id else None)
    result = PublishResult(dataset_bundle=bundle, model_bundle=model_bundle)

    up = HubUploader(token, cfg.endpoint, say)
    user = up.check_access()
    say(f"publishing to {up.endpoint} as {user}")
    say(f"dataset repo {cfg.repo_id}:")
    up.upload(bundle, cfg.repo_id, result, cfg.private)
    if model_bundle is not None:
        say(f"model repo {cfg.model_repo_id}:")
        up.upload(model_bundle, cfg.model_repo_id, result, cfg.private)
    say(f"done: {len(result.uploaded)} commit(s), {len(result.skipped)} part(s) already up to date")
    return result
