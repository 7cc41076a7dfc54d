"""Plots of what the trained models are worth: the online DPO rounds' held-out comparison with the SFT policy
(reward gain with its confounders and the second judge) and the eval stage's benchmark figures of the starting
policy, the SFT model and the final model, read under the keys the stages declare."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.reporting.plots import COLORS, Section, figure, png_bytes
from pipeline.reporting.run_stats import read_manifest
from pipeline.reporting.training_plots import dpo_round_values
from stages.dpo import metrics as D
from stages.eval import metrics as E

GAINS = {D.EVAL_REWARD_GAIN: ("reward gain", D.EVAL_REWARD_GAIN_SE),
         D.EVAL_REWARD_GAIN_UNTRUNCATED: ("gain, untruncated pairs", D.EVAL_REWARD_GAIN_UNTRUNCATED_SE),
         D.EVAL_REWARD_GAIN_LENGTH_ADJUSTED: ("gain at equal length", None),
         D.EVAL_JUDGE_GAIN: ("second judge (critic tiers)", D.EVAL_JUDGE_GAIN_SE)}
"""Held-out gains over the SFT policy drawn per round: key -> (label, key of its standard error)."""


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}"
    return str(value)


def plot_dpo_held_out(run_dir: Path) -> Section:
    sec = Section("dpo_held_out", "Online DPO: held-out comparison with the SFT policy",
                  "Per round, on held-out prompts no training data used (same prompts and request seeds for both "
                  "policies): the reward model's gain (± standard error over prompts), the gain over pairs where "
                  "neither sample hit the token limit, the gain at equal length (intercept of the paired reward "
                  "difference regressed on the token difference), and a second judge that did not train the policy "
                  "(the critic's grades). The table adds lengths and truncation of both sides.")
    rounds = dpo_round_values(run_dir)
    rs = [r for r in rounds if D.EVAL_REWARD_GAIN in rounds[r]]
    if not rs:
        sec.empty = "No held-out figures: the dpo stage has not finished a round with held-out prompts."
        return sec
    fig, (ax,) = figure(9, 3.4)
    width = 0.8 / len(GAINS)
    for k, (key, (label, se_key)) in enumerate(GAINS.items()):
        pts = [(r, rounds[r][key], rounds[r].get(se_key) if se_key else None) for r in rs
               if isinstance(rounds[r].get(key), int | float) and not math.isnan(rounds[r][key])]
        if not pts:
            continue
        xs = [r + (k - (len(GAINS) - 1) / 2) * width for r, _, _ in pts]
        errs = [e if isinstance(e, int | float) and not math.isnan(e) else 0.0 for _, _, e in pts]
        ax.bar(xs, [v for _, v, _ in pts], width, yerr=errs if any(errs) else None, capsize=3,
               color=COLORS[k % len(COLORS)], label=label)
    ax.axhline(0, color="#444", linewidth=0.8)
    ax.set_xticks(rs)
    ax.set_xlabel("round")
    ax.set_ylabel("gain over the SFT policy")
    ax.legend(fontsize=8)
    sec.png = png_bytes(fig)
    keys = list(D.HELD_OUT_TABLE)
    sec.table = [["round", *D.HELD_OUT_TABLE.values()]] + [[r, *[_fmt(rounds[r].get(k)) for k in keys]] for r in rs]
    return sec


def plot_eval(run_dir: Path) -> Section:
    sec = Section("eval", "Benchmark: IFEval of the starting, SFT and final models",
                  "Greedy answers to the same IFEval prompts, scored by IFEval's instruction checkers: prompt- and "
                  "instruction-level accuracy, strict and loose. Bars: each model's accuracy; the table adds the "
                  "paired difference to the starting policy with its bootstrap interval, the share of answers cut "
                  "at the token limit and the mean answer length.")
    metrics = ((read_manifest(run_dir, "eval") or {}).get("metrics") or {})
    if E.figure_key(E.START, "prompt_loose") not in metrics:
        sec.empty = "No eval figures: the eval stage has not run (add `eval` to graph)."
        return sec
    fig, (ax,) = figure(9, 3.4)
    width = 0.8 / len(E.MODELS)
    for k, model in enumerate(E.MODELS):
        xs = [i + (k - (len(E.MODELS) - 1) / 2) * width for i in range(len(E.ACCURACIES))]
        ax.bar(xs, [metrics.get(E.figure_key(model, a)) or 0.0 for a in E.ACCURACIES], width,
               color=COLORS[k % len(COLORS)], label=model)
    ax.set_xticks(range(len(E.ACCURACIES)))
    ax.set_xticklabels([a.replace("_", " ") for a in E.ACCURACIES])
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    sec.png = png_bytes(fig)
    level = round(100 * float(metrics.get("confidence", 0.95)))
    head = ["model", *E.ACCURACIES, "truncated", "mean tokens", f"prompt loose vs start ({level}% interval)"]
    rows = []
    for model in E.MODELS:
        gain = "-"
        comparison = next((c for c, (m, _) in E.COMPARISONS.items() if m == model), None)
        if comparison:
            g, lo, hi = (metrics.get(k) for k in E.gain_keys(comparison, "prompt_loose"))
            gain = f"{_fmt(g)} ({_fmt(lo)} to {_fmt(hi)})"
        rows.append([model, *[_fmt(metrics.get(E.figure_key(model, a))) for a in E.ACCURACIES],
                     _fmt(metrics.get(E.figure_key(model, "truncated_fraction"))),
                     _fmt(metrics.get(E.figure_key(model, "mean_tokens"))), gain])
    sec.table = [head, *rows]
    return sec
