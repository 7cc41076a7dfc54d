"""Stage `reward`: the reward model the online DPO rounds score with.

Trains a Bradley-Terry reward model with TRL's RewardTrainer on the filter stage's `preferences`
(plus any user-given pair files), or takes a configured existing reward model. Pairwise accuracy on
held-out pairs (a stable hash split) goes into the manifest, measured on Ray scoring actors the way
the DPO stage scores.
"""

from __future__ import annotations

import shutil
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
        train_reward_model,
    )

    cfg: RewardModelConfig = ctx.config
    pairs = [normalize_pair(r, f"preferences record {r.get('id', i)!r}")
             for i, r in enumerate(ctx.read("preferences").to_list())]
    for path in cfg.extra_pairs:
        pairs.extend(load_pairs_file(path))
    out = ctx.output_path("reward_model")
    train, held = split_pairs(pairs, cfg.eval_fraction, ctx.seed + cfg.seed)
    metrics: dict = {"pairs": len(pairs), "eval_pairs": len(held)}
    if cfg.pretrained:
        src = check_reward_model(cfg.pretrained)
        shutil.rmtree(out)
        shutil.copytree(src, out)
        metrics["pretrained"] = str(src)
    else:
        ctx.release_pools()  # training needs the memory the vLLM engines hold
        metrics.update(train_reward_model(train, cfg, out, log_metrics=lambda row, step: ctx.log_metrics(row, step)))
    if held:
        ctx.ensure_ray()
        ctx.used_ray = True
        with RewardPool(Path(out), cfg.scoring) as pool:
            acc = pairwise_accuracy(pool.score, held)
        metrics.update({"eval_accuracy": acc["accuracy"], "eval_margin": acc["margin"]})
        ctx.log.info("reward model: held-out pairwise accuracy %.3f on %d pairs", acc["accuracy"], len(held))
    ctx.metrics.update(metrics)


def _make_stage():
    from pipeline.stage import Stage

    return Stage(name="reward", inputs=("preferences",), outputs=("reward_model",), config_cls=RewardModelConfig,
                 run=run)


STAGE = _make_stage()
