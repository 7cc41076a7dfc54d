"""Publish a run to the Hugging Face Hub: its datasets as one dataset repo with one config per
dataset (``sft``, ``preferences``, ``online_dpo_round_k`` ...) and, optionally, the final model.

Two steps, so that a dry run writes exactly what an upload sends:

1. **Bundle**: the repo's files in a local folder. Each config's rows are re-written with
   ``datasets`` as ``data/<config>/train-XXXXX-of-YYYYY.parquet`` (the layout ``push_to_hub`` uses),
   the dataset card (``README.md``, see ``pipeline/card.py``) next to them. ``--dry-run DIR`` stops
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.card import CardConfig, redact, render_card
from pipeline.run_stats import (
    RunDirError,
    check_run_dir,
    final_model_dir,
    quiet_datasets,
    read_dataset,
    summarize,
)

log = logging.getLogger("posttrain.publish")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ROUND = re.compile(r"^online_round_(\d+)$")
CARD_MARKER = "posttrain"  # a tag every generated card carries: marks a folder as a bundle we may rewrite


class PublishError(RuntimeError):
    """Publication failed or was refused; the message says what was uploaded and how to continue."""


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


@dataclass
class Bundle:
    """Files of one repo: ``path_in_repo -> local file``, uploaded in ``groups`` (one commit each)."""

    root: Path
    repo_type: str
    files: dict[str, Path] = field(default_factory=dict)
    groups: list[tuple[str, list[str]]] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    stale_prefix: str | None = None
    """Remote files under this prefix that the bundle lacks are deleted with the last commit."""


@dataclass
class PublishResult:
    """What ``publish`` did."""

    dataset_bundle: Bundle
    model_bundle: Bundle | None = None
    uploaded: list[str] = field(default_factory=list)
    """Groups (configs, card, model) committed by this call."""
    skipped: list[str] = field(default_factory=list)
    """Groups already on the Hub with the same content."""
    urls: list[str] = field(default_factory=list)


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

    from pipeline.run_stats import read_manifest

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


# ---------------------------------------------------------------------------------------- upload


def _same_content(local: Path, remote) -> bool:
    """True when the remote file (a ``RepoFile`` from the tree listing) has the local file's content:
    LFS files compare sha256, regular files their git blob id."""
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    if remote.size != local.stat().st_size:
        return False
    if remote.lfs is not None:
        with local.open("rb") as f:
            return remote.lfs.sha256 == sha_fileobj(f).hex()
    return remote.blob_id == git_hash(local.read_bytes())


def _describe(exc: BaseException, endpoint: str, secrets: tuple[str, ...]) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        server = exc.server_message or str(exc).splitlines()[0]
        text = f"HTTP {status} from {endpoint}: {server}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return redact(text, secrets)


class _Uploader:
    """Checks access, then commits a bundle's groups, skipping content already on the Hub."""

    def __init__(self, token: str, endpoint: str | None, echo: Callable[[str], None]):
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=endpoint, token=token, library_name="posttrain")
        self.endpoint = self.api.endpoint
        self.secrets = (token,)
        self.echo = echo

    def fail(self, what: str, exc: BaseException, fix: str) -> PublishError:
        return PublishError(f"{what}: {_describe(exc, self.endpoint, self.secrets)}; {fix}")

    def check_access(self) -> str:
        """The user name; PublishError (nothing uploaded) when the token or network does not work."""
        from huggingface_hub.errors import HfHubHTTPError

        try:
            info = self.api.whoami()
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise self.fail(f"the Hub at {self.endpoint} refused the token, nothing was uploaded", exc,
                                "fix: make a new write token at https://huggingface.co/settings/tokens and set "
                                "HF_TOKEN (or run `hf auth login`)") from None
            raise self.fail(f"the Hub at {self.endpoint} answered the token check with an error, nothing was "
                            "uploaded", exc, "fix: retry later (or check HF_ENDPOINT)") from None
        except Exception as exc:  # connection refused, DNS, TLS, timeouts: the transport's own types
            raise self.fail(f"cannot reach the Hub at {self.endpoint}, nothing was uploaded", exc,
                            "fix: check the network (or HF_ENDPOINT) and rerun") from None
        role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise PublishError(f"the token for {info.get('name')} at {self.endpoint} is read-only, nothing was "
                               "uploaded; fix: use a token with write access (https://huggingface.co/settings/tokens)")
        return str(info.get("name"))

    def ensure_repo(self, repo_id: str, repo_type: str, private: bool) -> str:
        try:
            url = self.api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        except Exception as exc:
            raise self.fail(f"the Hub refused to create or open the {repo_type} repo {repo_id}, nothing was "
                            "uploaded to it", exc,
                            f"fix: check that your token can write to the namespace '{repo_id.split('/')[0]}'"
                            ) from None
        return str(url)

    def remote_files(self, repo_id: str, repo_type: str) -> dict[str, Any]:
        from huggingface_hub.hf_api import RepoFile

        try:
            return {f.path: f for f in self.api.list_repo_tree(repo_id, repo_type=repo_type, recursive=True)
                    if isinstance(f, RepoFile)}
        except Exception as exc:
            raise self.fail(f"cannot list the files of {repo_id}, nothing was uploaded to it", exc,
                            "fix: check the network and rerun") from None

    def upload(self, bundle: Bundle, repo_id: str, result: PublishResult, private: bool) -> None:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        result.urls.append(self.ensure_repo(repo_id, bundle.repo_type, private))
        remote = self.remote_files(repo_id, bundle.repo_type)
        done: list[str] = [*result.skipped, *result.uploaded]  # incl. an earlier repo of this call
        for i, (group, paths) in enumerate(bundle.groups):
            changed = [p for p in paths if p not in remote or not _same_content(bundle.files[p], remote[p])]
            deletes = []
            if bundle.repo_type == "dataset" and group != "card" and paths:
                prefix = paths[0].rsplit("/", 1)[0] + "/" if "/" in paths[0] else None
                if prefix:  # an older upload of this config with another shard count
                    deletes = [p for p in remote if p.startswith(prefix) and p not in paths]
            if i == len(bundle.groups) - 1 and bundle.stale_prefix:  # configs this run no longer has
                deletes += [p for p in remote if p.startswith(bundle.stale_prefix) and p not in bundle.files
                            and p not in deletes]
            if not changed and not deletes:
                self.echo(f"  {group}: already on the Hub, skipped")
                result.skipped.append(group)
                done.append(group)
                continue
            ops: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(bundle.files[p]))
                              for p in changed]
            ops += [CommitOperationDelete(path_in_repo=p) for p in deletes]
            rows = f", {bundle.rows[group]} rows" if group in bundle.rows else ""
            size = sum(bundle.files[p].stat().st_size for p in changed)
            self.echo(f"  {group}: uploading {len(changed)} file(s), {size / 2**20:.2f} MB{rows}"
                      + (f", deleting {len(deletes)} stale file(s)" if deletes else ""))
            try:
                self.api.create_commit(repo_id, ops, repo_type=bundle.repo_type,
                                       commit_message=f"posttrain: upload {group}{rows}")
            except Exception as exc:
                left = [g for g, _ in bundle.groups[i:]]
                raise PublishError(
                    f"upload to {repo_id} stopped at '{group}': {_describe(exc, self.endpoint, self.secrets)}. "
                    f"Already on the Hub: {', '.join(done) or 'nothing'}. Not uploaded: {', '.join(left)}. "
                    "Fix the cause and rerun the same command: what is already on the Hub is skipped."
                ) from None
            for p in deletes:  # so the last commit does not delete them again
                remote.pop(p, None)
            result.uploaded.append(group)
            done.append(group)


# ---------------------------------------------------------------------------------------- entry point


def publish(run_dir: str | Path, cfg: PublishConfig, *, token: str | None = None,
            echo: Callable[[str], None] = print) -> PublishResult:
    """Bundle the run and upload it (or only bundle it, with ``cfg.dry_run``). See the module docstring."""
    with quiet_datasets():
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

    up = _Uploader(token, cfg.endpoint, say)
    user = up.check_access()
    say(f"publishing to {up.endpoint} as {user}")
    say(f"dataset repo {cfg.repo_id}:")
    up.upload(bundle, cfg.repo_id, result, cfg.private)
    if model_bundle is not None:
        say(f"model repo {cfg.model_repo_id}:")
        up.upload(model_bundle, cfg.model_repo_id, result, cfg.private)
    say(f"done: {len(result.uploaded)} commit(s), {len(result.skipped)} part(s) already up to date")
    return result
