"""Stage `reward`: the reward model the online DPO rounds score with.

Trains a Bradley-Terry reward model with TRL's RewardTrainer on the filter stage's `preferences`
(plus any user-given pair files), or takes a configured existing reward model. Pairwise accuracy on
held-out pairs (a stable hash split) goes into the manifest, measured on Ray scoring actors the way
the DPO stage scores.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from reward.train import RewardModelConfig


def run(ctx) -> None:
    from reward.score import RewardPool
    from reward.train import (
        check_reward_model,
        load_pairs_file,
        normalize_pair,
        pairwise_accuracy,
        split_pairs,
    )

    cfg: RewardModelConfig = ctx.config
    pairs = [normalize_pair(r, f"preferences record {r.get('id', i)!r}")
             for i, r in enumerate(ctx.read("preferences").to_list())]
    for path in cfg.extra_pairs:
        pairs.extend(load_pairs_file(path))
    if cfg.stdlib_pairs:
        from reward.stdlib_pairs import preference_records, stdlib_docs

        docs = stdlib_docs()[: cfg.stdlib_pairs]
        pairs.extend({**r, "source": "stdlib_docstrings"} for r in preference_records(docs, seed=cfg.seed))
    out = ctx.output_path("reward_model")
    train, held = split_pairs(pairs, cfg.eval_fraction, ctx.seed + cfg.seed)
    metrics: dict = {"pairs": len(pairs), "eval_pairs": len(held),
                     "pairs_by_source": dict(Counter(str(p.get("source", "preferences")) for p in pairs))}
    if cfg.pretrained:
        src = check_reward_model(cfg.pretrained)
        shutil.rmtree(out)
        shutil.copytree(src, out)
        metrics["pretrained"] = str(src)
    else:
        ctx.release_pools()  # training needs the memory the vLLM engines hold
        ctx.ensure_ray()
        ctx.used_ray = True
        trained, rows = _train_in_own_process(train, cfg, out)
        for row, step in rows:
            ctx.log_metrics(row, step)
        metrics.update(trained)
    if held:
        ctx.ensure_ray()
        ctx.used_ray = True
        with RewardPool(Path(out), cfg.scoring) as pool:
            acc = pairwise_accuracy(pool.score, held)
            own = [p for p in held if p.get("source") != "stdlib_docstrings"]
            if cfg.stdlib_pairs and own:  # the filter stage's own pairs, apart from the built-in ones
                metrics["eval_accuracy_filter_pairs"] = pairwise_accuracy(pool.score, own)["accuracy"]
        metrics.update({"eval_accuracy": acc["accuracy"], "eval_margin": acc["margin"]})
        ctx.log.info("reward model: held-out pairwise accuracy %.3f on %d pairs", acc["accuracy"], len(held))
    ctx.metrics.update(metrics)


def _train_in_own_process(train: list[dict], cfg: RewardModelConfig, out: Path) -> tuple[dict, list]:
    """Train in a Ray worker process that exits afterwards (``max_calls=1``).

    Trained in the driver, the freed optimizer and activation memory stays in the driver's heap (glibc does not
    hand it back), and the online DPO stage that follows, which trains the policy in the driver next to its
    engines, ran out of memory on a 24 GiB machine.
    """
    import os

    import ray

    def train_task(train, cfg, out):
        import torch

        from reward.train import train_reward_model

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        rows: list = []
        trained = train_reward_model(train, cfg, out, log_metrics=lambda row, step: rows.append((row, step)))
        return trained, rows

    threads = str(len(os.sched_getaffinity(0)))  # Ray would pin torch to the task's 1 reserved CPU
    task = ray.remote(num_cpus=1, max_calls=1, max_retries=0,
                      runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}})(
        train_task)
    return ray.get(task.remote(train, cfg, str(Path(out).resolve())))


def _make_stage():
    from pipeline.run.stage import Stage

    return Stage(name="reward", inputs=("preferences",), outputs=("reward_model",), config_cls=RewardModelConfig,
                 run=run)


STAGE = _make_stage()
