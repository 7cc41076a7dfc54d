"""``posttrain report RUN_DIR``: one self-contained HTML page about a run, plus a short terminal summary.

The page has no external resources: plots are matplotlib PNGs embedded as base64 ``data:`` URIs, CSS
is inline, and it needs no JavaScript. Sections: data funnel per stage and filter rule, domains and
quality tiers, critique scores, response lengths, evolution operators' yields, SFT loss curves, expert
load per layer, reward-model accuracy, and per online-DPO round: reward, margin, DPO accuracy, KL and
win rate. A section whose data the run does not have (a stage not run yet, a figure not logged) says
so instead of failing, so the report also works on partial runs.

Where the figures come from (``stages/<stage>/metrics.jsonl`` rows and manifest ``metrics``):

- ``sft``: every key ending in ``loss`` per ``step`` (``expert_load/*`` and aux losses aside) for the
  loss curves; ``expert_load/layer_LL/expert_EE`` (``pipeline.moe_train.ExpertLoadCallback``) for the
  expert-load heatmap, from the last row that has them.
- ``reward``: keys containing ``accuracy`` (series and manifest) for the reward model's accuracy.
- ``dpo``: rows with a ``round``; per round the last value of ``reward_mean``, ``reward_margin``,
  ``dpo_accuracy``, ``kl`` and ``win_rate`` (aliases in ``DPO_FIGURES``), also read from a manifest
  ``metrics.rounds`` list of per-round dicts.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.run_stats import (
    RunSummary,
    quiet_datasets,
    read_manifest,
    read_metrics,
    stage_seconds,
    summarize,
)

# Per-round DPO figures: name -> (title, exact keys tried in order, substring fallback).
DPO_FIGURES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "reward": ("mean reward of the policy's samples", ("reward_mean", "mean_reward", "reward/mean",
                                                        "samples/reward_mean", "reward"), "reward_mean"),
    "margin": ("chosen - rejected reward margin", ("reward_margin", "margin", "chosen_rejected_margin",
                                                   "rewards/margins"), "margin"),
    "dpo_accuracy": ("DPO accuracy", ("dpo_accuracy", "rewards/accuracies", "accuracy"), "accurac"),
    "kl": ("KL to the reference (estimate)", ("kl", "kl_ref", "kl_to_ref", "kl_estimate"), "kl"),
    "win_rate": ("win rate vs the SFT policy", ("win_rate", "win_rate_vs_sft"), "win"),
}
_EXPERT_KEY = re.compile(r"^expert_load/layer_(\d+)/expert_(\d+)$")
_COLORS = ("#3b6ea5", "#e07b39", "#5a9e5a", "#b94a48", "#8064a2", "#c9a227", "#4aa3b9")


@dataclass
class Section:
    """One section of the report: a plot (PNG bytes) or a note saying why there is none."""

    key: str
    title: str
    about: str
    png: bytes | None = None
    empty: str | None = None
    table: list[list[Any]] | None = None

    @property
    def data_uri(self) -> str | None:
        return "data:image/png;base64," + base64.b64encode(self.png).decode() if self.png else None


@dataclass
class Report:
    """What ``write_report`` produced."""

    path: Path
    sections: list[Section]
    summary_lines: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- plotting


def _figure(width: float = 7.5, height: float = 3.6, ncols: int = 1):
    # Figure objects directly (not pyplot): no global state, no GUI backend, safe in threads.
    from matplotlib.figure import Figure

    # "tight" rather than "constrained": as good here and 2-3x cheaper to lay out.
    fig = Figure(figsize=(width, height), dpi=100, layout="tight")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def _bars(ax, labels: list[str], values: list[float], color: str = _COLORS[0], horizontal: bool = False,
          fmt: str = "{:g}") -> None:
    if horizontal:
        bars = ax.barh(labels, values, color=color)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
        ax.grid(False, axis="y")
    else:
        bars = ax.bar(labels, values, color=color)
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=2, fontsize=8)


def plot_funnel(s: RunSummary) -> Section:
    sec = Section("funnel", "Data funnel", "Records in each dataset of the run, in pipeline order "
                  "(generation multiplies records, filtering removes them), and what each stage dropped, per "
                  "rule or reason (the filter's rule QC and critique, generation's parse failures, ...).")
    if not s.funnel:
        sec.empty = "No dataset has been written yet (no stage has finished)."
        return sec
    ncols = 2 if s.drops else 1
    fig, axes = _figure(11 if ncols == 2 else 7.5, 3.8, ncols)
    labels = [f"{f.dataset}\n({f.stage})" if f.stage else f.dataset for f in s.funnel]
    _bars(axes[0], labels, [f.count for f in s.funnel], horizontal=True)
    axes[0].set_xlabel("records")
    axes[0].set_title("records per dataset")
    if s.drops:
        drops = [(f"{stage}: {reason}", n, i) for i, (stage, per) in enumerate(s.drops.items())
                 for reason, n in sorted(per.items(), key=lambda kv: -kv[1])]
        bars = axes[1].barh([d[0] for d in drops], [d[1] for d in drops],
                            color=[_COLORS[(3 + d[2]) % len(_COLORS)] for d in drops])
        axes[1].bar_label(bars, padding=2, fontsize=8)
        axes[1].invert_yaxis()
        axes[1].tick_params(axis="y", labelsize=8)
        axes[1].set_xlabel("records dropped")
        axes[1].set_title("dropped per stage and rule / reason")
    sec.png = _png(fig)
    sec.table = [["dataset", "stage", "records"]] + [[f.dataset, f.stage or "-", f.count] for f in s.funnel]
    return sec


def plot_domains_tiers(s: RunSummary) -> Section:
    sec = Section("domains_tiers", "Domains and quality tiers", "Domain labels before filtering (evolved) "
                  "and after (SFT set), and the critique model's quality tiers of the SFT set (4 best).")
    if not s.domains and not s.tiers:
        sec.empty = "No domain labels or tiers: the evolve and filter stages have not written their datasets."
        return sec
    fig, axes = _figure(11, 3.8, 2)
    if s.domains:
        names = sorted(set().union(*[set(c) for c in s.domains.values()]))
        width = 0.8 / len(s.domains)
        for i, (ds, counts) in enumerate(s.domains.items()):
            xs = [j + (i - (len(s.domains) - 1) / 2) * width for j in range(len(names))]
            bars = axes[0].bar(xs, [counts.get(n, 0) for n in names], width, label=ds, color=_COLORS[i])
            axes[0].bar_label(bars, fontsize=7, padding=1)
        axes[0].set_xticks(range(len(names)), names, rotation=30, ha="right")
        axes[0].legend(frameon=False)
        axes[0].set_title("records per domain")
    else:
        axes[0].text(0.5, 0.5, "no domain labels", ha="center", va="center", transform=axes[0].transAxes)
    if s.tiers:
        tiers = sorted(s.tiers, key=lambda t: (len(t), t))
        _bars(axes[1], [f"tier {t}" for t in tiers], [s.tiers[t] for t in tiers], color=_COLORS[2])
        axes[1].set_title("SFT records per quality tier")
    else:
        axes[1].text(0.5, 0.5, "no tiers (filter stage not run)", ha="center", va="center",
                     transform=axes[1].transAxes)
    sec.png = _png(fig)
    return sec


def plot_critique_scores(sft, preferences) -> Section:
    sec = Section("critique_scores", "Critique scores", "The critique model's grades of the kept answers "
                  "per criterion, and the scores of the chosen vs rejected responses of the preference pairs.")
    per_criterion: dict[str, list[float]] = defaultdict(list)
    if sft is not None and "scores" in sft.column_names:
        for row in sft["scores"]:
            for k, v in (row or {}).items():
                if isinstance(v, int | float) and not math.isnan(v):
                    per_criterion[k].append(float(v))
    pairs = []
    if preferences is not None and {"chosen_score", "rejected_score"} <= set(preferences.column_names):
        pairs = [(c, r) for c, r in zip(preferences["chosen_score"], preferences["rejected_score"], strict=True)
                 if c is not None and r is not None]
    if not per_criterion and not pairs:
        sec.empty = "No critique scores: the filter stage has not written `sft` / `preferences` with scores."
        return sec
    fig, axes = _figure(11, 3.8, 2)
    if per_criterion:
        names = list(per_criterion)
        axes[0].boxplot([per_criterion[n] for n in names], tick_labels=names, patch_artist=True,
                        boxprops={"facecolor": "#c6d9ee"}, medianprops={"color": _COLORS[1]})
        axes[0].tick_params(axis="x", rotation=20)
        axes[0].set_title(f"grades of the {len(sft)} SFT answers")
    else:
        axes[0].text(0.5, 0.5, "no per-criterion scores", ha="center", va="center", transform=axes[0].transAxes)
    if pairs:
        chosen, rejected = zip(*pairs, strict=True)
        lo, hi = min(min(chosen), min(rejected)), max(max(chosen), max(rejected))
        bins = [lo + (hi - lo) * i / 15 for i in range(16)] if hi > lo else 5
        axes[1].hist(chosen, bins=bins, alpha=0.6, label="chosen", color=_COLORS[2])
        axes[1].hist(rejected, bins=bins, alpha=0.6, label="rejected", color=_COLORS[3])
        axes[1].legend(frameon=False)
        axes[1].set_title(f"preference pairs ({len(pairs)}): scores")
    else:
        axes[1].text(0.5, 0.5, "no preference pairs", ha="center", va="center", transform=axes[1].transAxes)
    sec.png = _png(fig)
    return sec


def plot_response_lengths(answers, sft) -> Section:
    sec = Section("response_lengths", "Response lengths", "Tokens per candidate answer, by how generation "
                  "ended (`length` = cut at the token limit, which rule QC drops as truncated), and the length "
                  "of the answers kept for SFT.")
    by_reason: dict[str, list[int]] = defaultdict(list)
    if answers is not None and "responses" in answers.column_names:
        for responses in answers["responses"]:
            for r in responses or []:
                if isinstance(r, dict) and isinstance(r.get("n_tokens"), int | float):
                    by_reason[str(r.get("finish_reason") or "unknown")].append(int(r["n_tokens"]))
    kept = []
    if sft is not None and "messages" in sft.column_names:
        kept = [len(str(m[-1].get("content", "")).split()) for m in sft["messages"] if m]
    if not by_reason and not kept:
        sec.empty = "No responses: the answer stage has not written `answers` (and there is no `sft` set)."
        return sec
    fig, axes = _figure(11, 3.6, 2)
    if by_reason:
        axes[0].hist(list(by_reason.values()), bins=20, stacked=True, label=list(by_reason),
                     color=list(_COLORS[: len(by_reason)]))
        axes[0].legend(frameon=False, title="finish reason")
        axes[0].set_xlabel("tokens")
        axes[0].set_title(f"candidate answers ({sum(map(len, by_reason.values()))})")
    else:
        axes[0].text(0.5, 0.5, "no answers dataset", ha="center", va="center", transform=axes[0].transAxes)
    if kept:
        axes[1].hist(kept, bins=20, color=_COLORS[2])
        axes[1].set_xlabel("words")
        axes[1].set_title(f"answers kept for SFT ({len(kept)})")
    else:
        axes[1].text(0.5, 0.5, "no SFT set", ha="center", va="center", transform=axes[1].transAxes)
    sec.png = _png(fig)
    return sec


def plot_operators(s: RunSummary) -> Section:
    sec = Section("operators", "Evolution operators", "Instructions each evolution operator produced "
                  "(`original` = generated, not evolved), how many of them reached the SFT set, and the yield.")
    if not s.operators:
        sec.empty = "No evolved instructions: the evolve stage has not written `evolved`."
        return sec
    fig, axes = _figure(7.5, 3.6)
    ax = axes[0]
    ops = list(s.operators)
    made = [s.operators[o]["evolved"] for o in ops]
    kept = [s.operators[o]["in_sft"] for o in ops]
    xs = range(len(ops))
    ax.bar([x - 0.2 for x in xs], made, 0.4, label="in evolved", color=_COLORS[0])
    bars = ax.bar([x + 0.2 for x in xs], kept, 0.4, label="in SFT", color=_COLORS[2])
    ax.bar_label(bars, labels=[f"{100 * k / m:.0f}%" if m else "-" for k, m in zip(kept, made, strict=True)],
                 padding=2, fontsize=8)
    ax.set_xticks(list(xs), ops)
    ax.legend(frameon=False)
    ax.set_title("instructions per operator and their yield into SFT")
    sec.png = _png(fig)
    sec.table = [["operator", "instructions", "in SFT", "yield"]] + [
        [o, m, k, f"{100 * k / m:.1f}%" if m else "-"] for o, m, k in zip(ops, made, kept, strict=True)]
    return sec


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
    fig, axes = _figure(7.5, 3.6)
    ax = axes[0]
    for i, key in enumerate(sorted(keys, key=lambda k: (k != "loss", k))):
        pts = [(x, r[key]) for x, r in zip(xs_all, rows, strict=True)
               if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if len(pts) < 15 else None, ms=3, label=key, color=_COLORS[i % 7])
    for j in range(1, len(rows)):
        if "phase" in rows[j] and rows[j].get("phase") != rows[j - 1].get("phase"):
            ax.axvline(xs_all[j], color="grey", ls="--", lw=1)
    ax.set_xlabel("step")
    ax.legend(frameon=False)
    sec.png = _png(fig)
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
    fig, axes = _figure(7.5, 0.9 + 0.35 * len(matrix))
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
    sec.png = _png(fig)
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
    fig, axes = _figure(7.5, 3.4)
    ax = axes[0]
    for i, key in enumerate(series):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", ms=3, label=key, color=_COLORS[i % 7])
    for i, (key, value) in enumerate(final.items()):
        ax.axhline(value, ls="--", color=_COLORS[(i + 3) % 7], label=f"{key} (final) = {value:.3f}")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.legend(frameon=False, fontsize=8)
    sec.png = _png(fig)
    sec.table = [["figure", "value"]] + [[k, f"{v:.3f}"] for k, v in final.items()] if final else None
    return sec


def _pick(values: dict[str, Any], exact: tuple[str, ...], contains: str) -> float | None:
    for key in exact:
        if isinstance(values.get(key), int | float):
            return float(values[key])
    for key, value in values.items():
        if contains in key and isinstance(value, int | float) and not key.endswith(("_std", "/std")):
            return float(value)
    return None


def dpo_rounds(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per online-DPO round, the figures of ``DPO_FIGURES`` (the last value logged in each round)."""
    merged: dict[int, dict[str, Any]] = defaultdict(dict)
    for row in read_metrics(run_dir, "dpo"):
        r = row.get("round")
        if isinstance(r, int | float) and not isinstance(r, bool):
            merged[int(r)].update({k: v for k, v in row.items() if v is not None})
    rounds = ((read_manifest(run_dir, "dpo") or {}).get("metrics") or {}).get("rounds")
    if isinstance(rounds, list):
        for i, entry in enumerate(rounds, start=1):
            if isinstance(entry, dict):
                merged[int(entry.get("round", i))].update(entry)
    out: dict[int, dict[str, float]] = {}
    for r, values in sorted(merged.items()):
        figures = {name: v for name, (_, exact, contains) in DPO_FIGURES.items()
                   if (v := _pick(values, exact, contains)) is not None}
        std = _pick(values, ("reward_std", "reward/std"), "reward_std")
        if std is not None:
            figures["reward_std"] = std
        out[r] = figures
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
    fig, axes = _figure(13, 3.0, len(DPO_FIGURES))
    rs = list(rounds)
    for ax, (name, (title, _, _)) in zip(axes, DPO_FIGURES.items(), strict=True):
        pts = [(r, rounds[r][name]) for r in rs if name in rounds[r]]
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        if not pts:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        xs, ys = zip(*pts, strict=True)
        if name == "reward" and all("reward_std" in rounds[r] for r in xs):
            ax.errorbar(xs, ys, yerr=[rounds[r]["reward_std"] for r in xs], marker="o", capsize=3, color=_COLORS[0])
        else:
            ax.plot(xs, ys, marker="o", color=_COLORS[0])
        ax.set_xticks(rs)
    sec.png = _png(fig)
    sec.table = [["round", *DPO_FIGURES]] + [[r, *[f"{rounds[r][n]:.4g}" if n in rounds[r] else "-"
                                                   for n in DPO_FIGURES]] for r in rs]
    return sec


# ------------------------------------------------------------------------------------------- page

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>posttrain report: {{ name }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #f6f7f9; color: #222; }
header { background: #22303f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; } header p { margin: 0; opacity: .8; font-size: 13px; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 32px 48px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 16px 0; }
.card { background: #fff; border-radius: 8px; padding: 10px 16px; box-shadow: 0 1px 2px #0002; min-width: 120px; }
.card b { display: block; font-size: 22px; } .card span { font-size: 12px; color: #666; }
section { background: #fff; border-radius: 8px; padding: 14px 20px; margin: 14px 0; box-shadow: 0 1px 2px #0002; }
section h2 { margin: 0 0 6px; font-size: 17px; } section p.about { margin: 0 0 10px; color: #555; font-size: 13px; }
img.plot { max-width: 100%; height: auto; display: block; }
p.empty { background: #fff7e0; border-left: 4px solid #e0a800; padding: 8px 12px; color: #6b5200; }
table { border-collapse: collapse; font-size: 12px; margin-top: 8px; }
td, th { border-bottom: 1px solid #e3e3e3; padding: 3px 10px; text-align: left; }
th { background: #f0f2f5; } .state-done { color: #2d7d2d; } .state-failed { color: #b02a2a; }
pre { white-space: pre-wrap; background: #f6f7f9; padding: 6px 10px; border-radius: 4px; font-size: 12px; margin: 4px 0; }
</style></head>
<body>
<header><h1>posttrain run report: {{ name }}</h1><p>{{ run_dir }} &middot; generated {{ generated }}</p></header>
<main>
<div class="cards">{% for label, value in cards %}<div class="card"><b>{{ value }}</b><span>{{ label }}</span></div>{% endfor %}</div>
<section id="stages"><h2>Stages</h2>
{% if stages %}<table><tr><th>stage</th><th>state</th><th>wall time</th><th>outputs</th><th>models</th></tr>
{% for row in stages %}<tr><td>{{ row[0] }}</td><td class="state-{{ row[1] }}">{{ row[1] }}</td><td>{{ row[2] }}</td>
<td>{{ row[3] }}</td><td>{{ row[4] }}</td></tr>{% endfor %}</table>
{% else %}<p class="empty">No stage manifest yet: nothing has run in this directory.</p>{% endif %}
</section>
{% for s in sections %}<section id="{{ s.key }}"><h2>{{ s.title }}</h2><p class="about">{{ s.about }}</p>
{% if s.png %}<img class="plot" data-plot="{{ s.key }}" alt="{{ s.title }}" src="{{ s.data_uri }}">
{% else %}<p class="empty" data-empty="{{ s.key }}">{{ s.empty }}</p>{% endif %}
{% if s.table %}<table><tr>{% for h in s.table[0] %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in s.table[1:] %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
</section>{% endfor %}
<section id="examples"><h2>Example SFT records</h2>
{% if examples %}{% for ex in examples %}<p class="about">tier {{ ex.tier }} &middot; {{ ex.domain }} &middot;
operator {{ ex.operator }} &middot; answered by {{ ex.model }}</p><pre>{{ ex.user }}</pre><pre>{{ ex.assistant }}</pre>
{% endfor %}{% else %}<p class="empty">No SFT set yet.</p>{% endif %}
</section>
</main></body></html>
"""


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _stage_rows(s: RunSummary) -> list[list[str]]:
    rows = []
    for name, m in s.stages.items():
        outputs = m.get("outputs") or {}
        shown = ", ".join(f"{o}: {d['records']}" if isinstance(d, dict) and d.get("kind") == "dataset" else o
                          for o, d in outputs.items()) if isinstance(outputs, dict) else ""
        pools = ", ".join(f"{r}={n}" for r, n in (m.get("pools_used") or {}).items())
        rows.append([name, str(m.get("state", "?")), _fmt_seconds(stage_seconds(m)), shown, pools])
    return rows


def _examples(sft, k: int = 3) -> list[dict]:
    if sft is None or "messages" not in sft.column_names or not len(sft):
        return []
    tiers = sft["tier"] if "tier" in sft.column_names else [0] * len(sft)
    order = sorted(range(len(sft)), key=lambda i: -(tiers[i] or 0))[:k]
    out = []
    for i in order:
        row = sft[i]
        msgs = row["messages"] or []
        user = next((m["content"] for m in msgs if m.get("role") == "user"), "")
        assistant = next((m["content"] for m in reversed(msgs) if m.get("role") == "assistant"), "")
        out.append({"tier": row.get("tier", "-"), "domain": row.get("domain", "-"), "operator": row.get("operator"),
                    "model": row.get("answer_model") or row.get("model") or "-", "user": user[:1500],
                    "assistant": assistant[:2500]})
    return out


def summary_lines(s: RunSummary, sections: list[Section], path: Path) -> list[str]:
    """The short text summary printed in the terminal."""
    lines = [f"run {s.run_dir}"]
    done = sum(1 for m in s.stages.values() if m.get("state") == "done")
    total = sum(t for m in s.stages.values() if (t := stage_seconds(m)) is not None)
    lines.append(f"stages: {done}/{len(s.stages)} done, {_fmt_seconds(total)} in total")
    if s.funnel:
        lines.append("funnel: " + " -> ".join(f"{f.dataset} {f.count}" for f in s.funnel))
    for stage, drops in s.drops.items():
        lines.append(f"{stage} dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items(),
                                                                                   key=lambda kv: -kv[1])))
    if s.tiers:
        lines.append("SFT tiers: " + ", ".join(f"tier {t}: {s.tiers[t]}" for t in sorted(s.tiers)))
    by_key = {sec.key: sec for sec in sections}
    sft = by_key.get("sft_loss")
    if sft is not None and sft.table:
        lines.append("SFT: " + ", ".join(f"{k} {v}" for k, v in sft.table[1:]))
    rw = by_key.get("reward_accuracy")
    if rw is not None and rw.table:
        lines.append("reward model: " + ", ".join(f"{k} {v}" for k, v in rw.table[1:]))
    dpo = by_key.get("dpo_rounds")
    if dpo is not None and dpo.table:
        head, last = dpo.table[0], dpo.table[-1]
        lines.append(f"online DPO: {len(dpo.table) - 1} round(s); round {last[0]}: "
                     + ", ".join(f"{h} {v}" for h, v in zip(head[1:], last[1:], strict=True)))
    empty = [sec.title for sec in sections if sec.png is None]
    lines.append(f"report: {path} ({len(sections) - len(empty)} plots"
                 + (f"; no data yet for: {', '.join(empty)}" if empty else "") + ")")
    return lines


def write_report(run_dir: str | Path, out: str | Path | None = None,
                 echo: Callable[[str], None] | None = None, examples: int = 3) -> Report:
    """Write the HTML report (default ``RUN_DIR/report/report.html``) and return it with its summary."""
    import jinja2

    with quiet_datasets():
        s = summarize(run_dir)
    run_dir = s.run_dir
    data = {name: s.data.get(name) for name in ("answers", "sft", "preferences")}
    sections = [
        plot_funnel(s),
        plot_domains_tiers(s),
        plot_critique_scores(data["sft"], data["preferences"]),
        plot_response_lengths(data["answers"], data["sft"]),
        plot_operators(s),
        plot_sft_loss(run_dir, (s.stages.get("sft") or {}).get("metrics")),
        plot_expert_load(run_dir),
        plot_reward_accuracy(run_dir),
        plot_dpo_rounds(run_dir),
    ]
    sft_rows = next((f.count for f in s.funnel if f.dataset == "sft"), 0)
    pairs = sum(f.count for f in s.funnel if f.dataset in ("preferences", "online_pairs"))
    total = sum(t for m in s.stages.values() if (t := stage_seconds(m)) is not None)
    cards = [("stages done", f"{sum(m.get('state') == 'done' for m in s.stages.values())}/{len(s.stages)}"),
             ("seed records", next((f.count for f in s.funnel if f.dataset == "seeds"), 0)),
             ("SFT records", sft_rows), ("preference pairs", pairs), ("total stage time", _fmt_seconds(total))]
    path = Path(out) if out else run_dir / "report" / "report.html"
    env = jinja2.Environment(autoescape=True)
    html = env.from_string(_TEMPLATE).render(
        name=run_dir.name, run_dir=str(run_dir), generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        cards=cards, stages=_stage_rows(s), sections=sections, examples=_examples(data["sft"], examples))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)  # written aside then renamed: a reader never sees half a page
    report = Report(path=path, sections=sections)
    report.summary_lines = summary_lines(s, sections, path)
    if echo is not None:
        for line in report.summary_lines:
            echo(line)
    return report
