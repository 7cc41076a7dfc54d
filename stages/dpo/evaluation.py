"""Held-out figures of a round against the SFT policy: mean reward, paired gain with its standard error over
prompts, and win rate, overall and per prompt source."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from stages.dpo import metrics as M


def paired_gain(rewards: Sequence[float], baseline: Sequence[float], samples_per_prompt: int) -> dict[str, float]:
    """Held-out figures of a round against the SFT policy: both lists are flat, prompt-major, same request seeds.

    The gain's standard error treats prompts as the independent units (the samples of one prompt share it), so
    ``eval_reward_gain / eval_reward_gain_se`` says whether the gain stands out of the sampling noise.
    """
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline, strict=True)]
    diffs = [a - b for a, b in zip(rewards, baseline, strict=True)]
    per_prompt = [statistics.fmean(diffs[i:i + samples_per_prompt]) for i in range(0, len(diffs), samples_per_prompt)]
    se = statistics.stdev(per_prompt) / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else float("nan")
    return {M.EVAL_REWARD_MEAN: statistics.fmean(rewards), M.EVAL_REWARD_SFT_MEAN: statistics.fmean(baseline),
            M.EVAL_REWARD_GAIN: statistics.fmean(diffs), M.EVAL_REWARD_GAIN_SE: se,
            M.EVAL_WIN_RATE: statistics.fmean(wins)}


def held_out_metrics(prompts: Sequence[dict], rewards: Sequence[float], baseline: Sequence[float],
                     samples_per_prompt: int) -> dict[str, float]:
    """``paired_gain`` over all held-out prompts, and per prompt source (suffixed keys) when there are several."""
    out = paired_gain(rewards, baseline, samples_per_prompt)
    sources = sorted({p.get("source", "evolved") for p in prompts})
    if len(sources) > 1:
        for src in sources:
            idx = [i * samples_per_prompt + j for i, p in enumerate(prompts) if p.get("source", "evolved") == src
                   for j in range(samples_per_prompt)]
            part = paired_gain([rewards[i] for i in idx], [baseline[i] for i in idx], samples_per_prompt)
            out.update({M.per_source(k, src): v for k, v in part.items() if k != M.EVAL_REWARD_SFT_MEAN})
            out[M.per_source(M.EVAL_PROMPTS, src)] = len(idx) // samples_per_prompt
    return out
