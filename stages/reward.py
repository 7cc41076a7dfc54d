"""Stage `reward`: the reward model the online DPO rounds score with.

Trains a Bradley-Terry reward model with TRL's RewardTrainer on the filter stage's `preferences`
(plus any user-given pair files), or takes a configured existing reward model. Pairwise accuracy on
held-out pairs (a stable hash split) goes into the manifest, measured on Ray scoring actors the way
the DPO stage scores: over all held-out pairs, and apart for the filter stage's own pairs, the built-in
docstring pairs and the pairs that are not trivially separable (``reward.train.trivially_separable``).

The source items the model trained on (``pipeline.records.pair_items``) are written next to it
(``TRAINING_ITEMS`` in the model folder): the DPO stage keeps its prompts apart from them.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

from pipeline.files import atomic_write_json
from pipeline.records import pair_items
from reward.train import TRAINING_ITEMS, RewardModelConfig

BUILTIN_SOURCE = "stdlib_docstrings"


def run(ctx) -> None:
    from reward.score import RewardPool
    from reward.train import (
        check_reward_model,
        load_pairs_file,
        normalize_pair,
        split_pairs,
        trivially_separable,
    )

    cfg: RewardModelConfig = ctx.config
    pairs = [normalize_pair(r, f"preferences record {r.get('id', i)!r}")
             for i, r in enumerate(ctx.read("preferences").to_list())]
    for path in cfg.extra_pairs:
        pairs.extend(load_pairs_file(path))
    if cfg.stdlib_pairs:
        from reward.stdlib_pairs import preference_records, stdlib_docs

        docs = stdlib_docs()[: cfg.stdlib_pairs]
        pairs.extend({**r, "source": BUILTIN_SOURCE} for r in preference_records(docs, seed=cfg.seed))
    out = ctx.output_path("reward_model")
    train, held = split_pairs(pairs, cfg.eval_fraction, ctx.seed + cfg.seed)
    trivial = Counter(kind for p in pairs if (kind := trivially_separable(p)))
    metrics: dict = {"pairs": len(pairs), "eval_pairs": len(held),
                     "pairs_by_source": dict(Counter(str(p.get("source", "preferences")) for p in pairs)),
                     "trivial_pairs": dict(trivial)}
    if cfg.pretrained:
        src = check_reward_model(cfg.pretrained)
        shutil.rmtree(out)
        shutil.copytree(src, out)
        metrics["pretrained"] = str(src)
        atomic_write_json(out / TRAINING_ITEMS, {"items": [], "known": False})
    else:
        ctx.release_pools()  # training needs the memory the vLLM engines hold
        ctx.ensure_ray()
        ctx.used_ray = True
        trained, rows = _train_in_own_process(train, cfg, out)
        for row, step in rows:
            ctx.log_metrics(row, step)
        metrics.update(trained)
        atomic_write_json(out / TRAINING_ITEMS, {"items": sorted({i for p in train for i in pair_items(p)}),
                                                 "known": True})
    if held:
        ctx.ensure_ray()
        ctx.used_ray = True
        with RewardPool(Path(out), cfg.scoring) as pool:
            metrics.update(held_out_accuracies(pool.score, held))
        ctx.log.info("reward model: held-out pairwise accuracy %.3f on %d pairs (filter's own pairs: %s on %d; "
                     "not trivially separable: %s on %d)", metrics["eval_accuracy"], len(held),
                     _fmt(metrics.get("eval_accuracy_filter_pairs")), metrics["eval_pairs_filter"],
                     _fmt(metrics.get("eval_accuracy_nontrivial")), metrics["eval_pairs_nontrivial"])
    ctx.metrics.update(metrics)


def held_out_accuracies(score, held: list[dict]) -> dict:
    """Pairwise accuracy on all held-out pairs, and apart on the filter stage's own pairs, the built-in docstring
    pairs and the pairs that are not trivially separable (with each group's size; None for an empty group)."""
    from reward.train import pairwise_accuracy, trivially_separable

    acc = pairwise_accuracy(score, held)
    out = {"eval_accuracy": acc["accuracy"], "eval_margin": acc["margin"]}
    groups = {"filter": [p for p in held if p.get("source") != BUILTIN_SOURCE],
              "builtin": [p for p in held if p.get("source") == BUILTIN_SOURCE],
              "nontrivial": [p for p in held if trivially_separable(p) is None]}
    for name, group in groups.items():
        key = "eval_accuracy_filter_pairs" if name == "filter" else f"eval_accuracy_{name}"
        out[key] = pairwise_accuracy(score, group)["accuracy"] if group else None
        out[f"eval_pairs_{name}"] = len(group)
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _train_in_own_process(train: list[dict], cfg: RewardModelConfig, out: Path) -> tuple[dict, list]:
    """Train in a Ray worker process that exits afterwards (``max_calls=1``), on the GPU the task requests
    (``train_task_options``; none on a CPU cluster).

    Trained in the driver, the freed optimizer and activation memory stays in the driver's heap (glibc does not
    hand it back), and the online DPO stage that follows, which trains the policy in the driver next to its
    engines, ran out of memory on a 24 GiB machine.
    """
    import ray

    from pipeline.executor import cluster_has_gpus, worker_log_env
    from pipeline.tracking import tracking_env

    def train_task(train, cfg, out):
        import torch

        from pipeline.executor import log_worker_output
        from reward.train import train_reward_model

        log_worker_output("reward-train")
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        rows: list = []
        trained = train_reward_model(train, cfg, out, log_metrics=lambda row, step: rows.append((row, step)))
        return trained, rows

    gpus = cluster_has_gpus() if cfg.num_gpus == "auto" else False
    options = train_task_options(cfg, gpus, {**worker_log_env(), **tracking_env()})
    task = ray.remote(**options)(train_task)
    return ray.get(task.remote(train, cfg, str(Path(out).resolve())))


def train_task_options(cfg: RewardModelConfig, cluster_gpus: bool, env: dict[str, str]) -> dict:
    """Ray options of the training task: 1 CPU, ``cfg.num_gpus`` GPUs (auto: 1 when ``cluster_gpus``, the Ray
    cluster has GPUs, else 0), a process of its own (``max_calls=1``), no retry, and ``env``."""
    num_gpus = (1.0 if cluster_gpus else 0.0) if cfg.num_gpus == "auto" else float(cfg.num_gpus)
    threads = str(len(os.sched_getaffinity(0)))  # Ray would pin torch to the task's 1 reserved CPU
    return {"num_cpus": 1, "num_gpus": num_gpus, "max_calls": 1, "max_retries": 0,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false", **env}}}


def _make_stage():
    from pipeline.run.stage import Stage

    return Stage(name="reward", inputs=("preferences",), outputs=("reward_model",), config_cls=RewardModelConfig,
                 run=run)


STAGE = _make_stage()
