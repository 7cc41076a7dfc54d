"""Held-out figures of a round against the SFT policy, and the confounders that could fake a gain.

Both sides answer the same held-out prompts with the same request seeds, so sample j of prompt i of a round is
paired with sample j of prompt i of the SFT policy. Per round:

- the reward model's verdict: mean reward, the paired gain with its standard error over prompts, the win rate,
  overall and per prompt source;
- length and truncation: mean response tokens and the share cut at ``max_tokens`` (finish reason "length") on
  each side; the gain among the pairs where neither sample was cut; and a length-adjusted gain: the intercept of
  the least-squares line of the paired reward difference on the paired token difference (the gain two samples of
  equal length would show; its slope, the reward per extra token, is reported beside it);
- a second judge that did not train the policy (the critic's 4-tier grades, ``OnlineDPOConfig.judge_role``):
  mean tier of each side, paired gain with its standard error, win rate, over the pairs both sides got a grade.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from stages.dpo import metrics as M

TRUNCATED = "length"
"""vLLM's finish reason of a sample cut at ``max_tokens``."""


def _per_prompt_se(diffs: Sequence[float], prompt_of: Sequence[int]) -> float:
    """Standard error of the mean difference, with prompts as the independent units."""
    by_prompt: dict[int, list[float]] = {}
    for d, p in zip(diffs, prompt_of, strict=True):
        by_prompt.setdefault(p, []).append(d)
    means = [statistics.fmean(v) for v in by_prompt.values()]
    return statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else float("nan")


def paired_gain(rewards: Sequence[float], baseline: Sequence[float], samples_per_prompt: int) -> dict[str, float]:
    """The reward model's figures: both lists are flat, prompt-major, same request seeds.

    The gain's standard error treats prompts as the independent units (the samples of one prompt share it), so
    ``eval_reward_gain / eval_reward_gain_se`` says whether the gain stands out of the sampling noise.
    """
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline, strict=True)]
    diffs = [a - b for a, b in zip(rewards, baseline, strict=True)]
    prompt_of = [i // samples_per_prompt for i in range(len(diffs))]
    return {M.EVAL_REWARD_MEAN: statistics.fmean(rewards), M.EVAL_REWARD_SFT_MEAN: statistics.fmean(baseline),
            M.EVAL_REWARD_GAIN: statistics.fmean(diffs), M.EVAL_REWARD_GAIN_SE: _per_prompt_se(diffs, prompt_of),
            M.EVAL_WIN_RATE: statistics.fmean(wins)}


def length_adjusted_gain(reward_diffs: Sequence[float], token_diffs: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line ``reward_diff = gain + slope * token_diff``: the gain at equal
    length and the reward per extra token. With no spread in the token differences the slope is undefined (nan)
    and the gain is the mean difference."""
    n = len(reward_diffs)
    mean_t, mean_r = statistics.fmean(token_diffs), statistics.fmean(reward_diffs)
    var_t = sum((t - mean_t) ** 2 for t in token_diffs)
    if n < 2 or var_t == 0:
        return mean_r, float("nan")
    slope = sum((t - mean_t) * (r - mean_r) for t, r in zip(token_diffs, reward_diffs, strict=True)) / var_t
    return mean_r - slope * mean_t, slope


def confounders(policy: dict[str, list], sft: dict[str, list], samples_per_prompt: int) -> dict[str, float]:
    """Length and truncation of both sides, the gain without truncated pairs and the length-adjusted gain.
    ``policy`` / ``sft``: the held-out samples' ``rewards``, ``tokens`` and ``finish_reasons`` (flat, paired)."""
    rewards, base = policy["rewards"], sft["rewards"]
    tokens, base_tokens = policy["tokens"], sft["tokens"]
    cut = [f == TRUNCATED for f in policy["finish_reasons"]]
    base_cut = [f == TRUNCATED for f in sft["finish_reasons"]]
    keep = [i for i in range(len(rewards)) if not cut[i] and not base_cut[i]]
    out = {M.EVAL_TOKENS_MEAN: statistics.fmean(tokens), M.EVAL_SFT_TOKENS_MEAN: statistics.fmean(base_tokens),
           M.EVAL_TRUNCATED: statistics.fmean(cut), M.EVAL_SFT_TRUNCATED: statistics.fmean(base_cut),
           M.EVAL_UNTRUNCATED_PAIRS: len(keep),
           M.EVAL_REWARD_GAIN_UNTRUNCATED: statistics.fmean(rewards[i] - base[i] for i in keep) if keep else math.nan,
           M.EVAL_REWARD_GAIN_UNTRUNCATED_SE: _per_prompt_se([rewards[i] - base[i] for i in keep],
                                                             [i // samples_per_prompt for i in keep])
           if keep else math.nan}
    gain, slope = length_adjusted_gain([a - b for a, b in zip(rewards, base, strict=True)],
                                       [a - b for a, b in zip(tokens, base_tokens, strict=True)])
    out.update({M.EVAL_REWARD_GAIN_LENGTH_ADJUSTED: gain, M.EVAL_REWARD_PER_TOKEN: slope})
    return out


def judge_gain(grades: Sequence[float | None], baseline: Sequence[float | None],
               samples_per_prompt: int) -> dict[str, float]:
    """The second judge's figures over the pairs where both samples got a grade (None: the judge gave none)."""
    both = [i for i, (a, b) in enumerate(zip(grades, baseline, strict=True)) if a is not None and b is not None]
    if not both:
        return {M.EVAL_JUDGE_PAIRS: 0}
    diffs = [grades[i] - baseline[i] for i in both]
    return {M.EVAL_JUDGE_PAIRS: len(both), M.EVAL_JUDGE_MEAN: statistics.fmean(grades[i] for i in both),
            M.EVAL_JUDGE_SFT_MEAN: statistics.fmean(baseline[i] for i in both),
            M.EVAL_JUDGE_GAIN: statistics.fmean(diffs),
            M.EVAL_JUDGE_GAIN_SE: _per_prompt_se(diffs, [i // samples_per_prompt for i in both]),
            M.EVAL_JUDGE_WIN_RATE: statistics.fmean(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs)}


def held_out_metrics(prompts: Sequence[dict], policy: dict[str, list], sft: dict[str, list],
                     samples_per_prompt: int) -> dict[str, float]:
    """Every held-out figure of a round. ``policy`` / ``sft`` hold the flat, paired samples' ``rewards`` and, when
    recorded, ``tokens``, ``finish_reasons`` and the judge's ``grades`` (a baseline written by an earlier version
    holds rewards only: then only the reward figures are computed)."""
    rewards, baseline = policy["rewards"], sft["rewards"]
    out = paired_gain(rewards, baseline, samples_per_prompt)
    if sft.get("tokens") is not None and policy.get("tokens") is not None:
        out.update(confounders(policy, sft, samples_per_prompt))
    if sft.get("grades") is not None and policy.get("grades") is not None:
        out.update(judge_gain(policy["grades"], sft["grades"], samples_per_prompt))
    sources = sorted({p.get("source", "evolved") for p in prompts})
    if len(sources) > 1:
        for src in sources:
            idx = [i * samples_per_prompt + j for i, p in enumerate(prompts) if p.get("source", "evolved") == src
                   for j in range(samples_per_prompt)]
            part = paired_gain([rewards[i] for i in idx], [baseline[i] for i in idx], samples_per_prompt)
            out.update({M.per_source(k, src): v for k, v in part.items() if k != M.EVAL_REWARD_SFT_MEAN})
            out[M.per_source(M.EVAL_PROMPTS, src)] = len(idx) // samples_per_prompt
    return out
