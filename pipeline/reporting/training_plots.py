"""Plots of the training stages (SFT loss curves, expert load per layer, reward-model accuracy, per-round
online DPO figures), read from the stages' ``metrics.jsonl`` rows and manifest metrics."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pipeline.reporting.plots import COLORS, Section, figure, png_bytes
from pipeline.reporting.run_stats import (
    read_manifest,
    read_metrics,
)
from stages.dpo.metrics import ROUND, ROUND_FIGURES, ROUNDS

DPO_FIGURES = tuple(name for name in ROUND_FIGURES if name != "reward_std")
"""The per-round DPO figures the report plots and tabulates (``reward_std`` draws the reward's error bars)."""

_EXPERT_KEY = re.compile(r"^expert_load/layer_(\d+)/expert_(\d+)$")


def _loss_keys(rows: list[dict]) -> list[str]:
    keys = Counter(k for r in rows for k, v in r.items() if isinstance(v, int | float))
    return [k for k in keys if k.endswith("loss") and not k.startswith("expert_load") and "aux" not in k]


def _global_steps(rows: list[dict]) -> list[float]:
    """x positions for the rows: each coarse-to-fine phase may restart its trainer's step count, so a
    phase whose steps start over is shifted to continue after the previous one."""
    xs, offset, last, phase = [], 0.0, 0.0, None
    for r in rows:
        step = float(r["step"])
        if r.get("phase") != phase and phase is not None and step + offset <= last:
            offset = last
        phase = r.get("phase")
        last = max(last, step + offset)
        xs.append(step + offset)
    return xs


def plot_sft_loss(run_dir: Path, manifest_metrics: dict | None = None) -> Section:
    sec = Section("sft_loss", "SFT loss curves", "Training loss of the SFT stage per step (and evaluation "
                  "loss where logged); dashed lines mark coarse-to-fine phase changes. The table gives the "
                  "held-out loss before and after SFT from the stage manifest.")
    rows = [r for r in read_metrics(run_dir, "sft") if isinstance(r.get("step"), int | float)]
    keys = _loss_keys(rows)
    if not keys:
        sec.empty = "No loss logged: `stages/sft/metrics.jsonl` has no rows with a step and a loss."
        return sec
    xs_all = _global_steps(rows)
    fig, axes = figure(7.5, 3.6)
    ax = axes[0]
    for i, key in enumerate(sorted(keys, key=lambda k: (k != "loss", k))):
        pts = [(x, r[key]) for x, r in zip(xs_all, rows, strict=True)
               if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if len(pts) < 15 else None, ms=3, label=key, color=COLORS[i % 7])
    for j in range(1, len(rows)):
        if "phase" in rows[j] and rows[j].get("phase") != rows[j - 1].get("phase"):
            ax.axvline(xs_all[j], color="grey", ls="--", lw=1)
    ax.set_xlabel("step")
    ax.legend(frameon=False)
    sec.png = png_bytes(fig)
    heldout = {k: v for k, v in (manifest_metrics or {}).items()
               if ("heldout" in k or "held_out" in k) and isinstance(v, int | float) and not isinstance(v, bool)}
    if heldout:
        sec.table = [["figure", "value"]] + [[k, f"{v:.4g}"] for k, v in heldout.items()]
    return sec


def expert_load_matrix(rows: list[dict]) -> tuple[list[list[float]], int | float | None]:
    """[layer][expert] load fractions from the last metrics row that has them, and its step."""
    for row in reversed(rows):
        cells: dict[tuple[int, int], float] = {}
        for key, value in row.items():
            m = _EXPERT_KEY.match(key)
            if m and isinstance(value, int | float):
                cells[(int(m.group(1)), int(m.group(2)))] = float(value)
        nested = row.get("expert_load")
        if not cells and isinstance(nested, dict):
            for layer, loads in nested.items():
                for e, value in enumerate(loads or []):
                    cells[(int(layer), e)] = float(value)
        if cells:
            layers = sorted({li for li, _ in cells})
            experts = sorted({e for _, e in cells})
            return [[cells.get((li, e), 0.0) for e in experts] for li in layers], row.get("step")
    return [], None


def plot_expert_load(run_dir: Path) -> Section:
    sec = Section("expert_load", "Expert load per layer", "Fraction of tokens routed to each expert in each "
                  "MoE layer during SFT (last logged step). Balanced top-1 routing over N experts gives 1/N "
                  "everywhere; the router aux loss pushes towards it.")
    matrix, step = expert_load_matrix(read_metrics(run_dir, "sft"))
    if not matrix:
        sec.empty = ("No expert load logged: `stages/sft/metrics.jsonl` has no `expert_load/layer_LL/expert_EE` "
                     "values (dense model, or the SFT stage has not run).")
        return sec
    fig, axes = figure(7.5, 0.9 + 0.35 * len(matrix))
    ax = axes[0]
    ax.grid(False)
    im = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(len(matrix[0])))
    ax.set_yticks(range(len(matrix)))
    fig.colorbar(im, ax=ax, label="fraction of tokens")
    # loads sum to top_k per layer, so the balanced load of one expert is sum / num_experts
    worst = max(max(r) / (sum(r) / len(r)) for r in matrix if sum(r) > 0)
    ax.set_title(f"step {step}: max load = {worst:.2f}x balanced")
    sec.png = png_bytes(fig)
    return sec


def plot_reward_accuracy(run_dir: Path) -> Section:
    sec = Section("reward_accuracy", "Reward model accuracy", "Pairwise accuracy of the reward model "
                  "(share of pairs where the chosen response scores higher): per logged step, and the final "
                  "figures from the stage manifest (held-out pairs).")
    rows = [r for r in read_metrics(run_dir, "reward") if isinstance(r.get("step"), int | float)]
    series = sorted({k for r in rows for k, v in r.items() if "accura" in k and isinstance(v, int | float)})
    final = {k: float(v) for k, v in ((read_manifest(run_dir, "reward") or {}).get("metrics") or {}).items()
             if "accura" in k and isinstance(v, int | float) and math.isfinite(v)}
    if not series and not final:
        sec.empty = "No reward-model accuracy: the reward stage has not run (or logged no accuracy)."
        return sec
    fig, axes = figure(7.5, 3.4)
    ax = axes[0]
    for i, key in enumerate(series):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", ms=3, label=key, color=COLORS[i % 7])
    for i, (key, value) in enumerate(final.items()):
        ax.axhline(value, ls="--", color=COLORS[(i + 3) % 7], label=f"{key} (final) = {value:.3f}")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.legend(frameon=False, fontsize=8)
    sec.png = png_bytes(fig)
    sec.table = [["figure", "value"]] + [[k, f"{v:.3f}"] for k, v in final.items()] if final else None
    return sec


def dpo_round_values(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Everything the dpo stage recorded per round (``metrics.jsonl`` rows, then the manifest's ``rounds``), the
    last value of each key."""
    merged: dict[int, dict[str, Any]] = defaultdict(dict)
    for row in read_metrics(run_dir, "dpo"):
        r = row.get(ROUND)
        if isinstance(r, int | float) and not isinstance(r, bool):
            merged[int(r)].update({k: v for k, v in row.items() if v is not None})
    rounds = ((read_manifest(run_dir, "dpo") or {}).get("metrics") or {}).get(ROUNDS)
    if isinstance(rounds, list):
        for i, entry in enumerate(rounds, start=1):
            if isinstance(entry, dict):
                merged[int(entry.get(ROUND, i))].update(entry)
    return dict(sorted(merged.items()))


def dpo_rounds(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per online-DPO round, the figures of ``stages.dpo.metrics.ROUND_FIGURES`` (the last value logged in each
    round), read under the keys the stage declares."""
    out: dict[int, dict[str, float]] = {}
    for r, values in dpo_round_values(run_dir).items():
        out[r] = {name: float(values[key]) for name, (key, _) in ROUND_FIGURES.items()
                  if isinstance(values.get(key), int | float) and not isinstance(values.get(key), bool)}
    return out


def plot_dpo_rounds(run_dir: Path) -> Section:
    sec = Section("dpo_rounds", "Online DPO rounds", "Per round: mean reward of the policy's samples "
                  "(± std), the chosen-rejected reward margin of the round's pairs, DPO accuracy, the KL "
                  "estimate to the reference (SFT) policy, and the win rate against the SFT policy on held-out "
                  "prompts judged by the reward model.")
    rounds = dpo_rounds(run_dir)
    if not any(rounds.values()):
        sec.empty = "No online DPO rounds logged: `stages/dpo/metrics.jsonl` has no rows with a `round`."
        return sec
    fig, axes = figure(13, 3.0, len(DPO_FIGURES))
    rs = list(rounds)
    for ax, name in zip(axes, DPO_FIGURES, strict=True):
        title = ROUND_FIGURES[name][1]
        pts = [(r, rounds[r][name]) for r in rs if name in rounds[r]]
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        if not pts:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        xs, ys = zip(*pts, strict=True)
        if name == "reward" and all("reward_std" in rounds[r] for r in xs):
            ax.errorbar(xs, ys, yerr=[rounds[r]["reward_std"] for r in xs], marker="o", capsize=3, color=COLORS[0])
        else:
            ax.plot(xs, ys, marker="o", color=COLORS[0])
        ax.set_xticks(rs)
    sec.png = png_bytes(fig)
    sec.table = [["round", *DPO_FIGURES]] + [[r, *[f"{rounds[r][n]:.4g}" if n in rounds[r] else "-"
                                                   for n in DPO_FIGURES]] for r in rs]
    return sec
