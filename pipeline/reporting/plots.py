"""Plots of the data a run made (funnel, domains and tiers, critique scores, response lengths, evolution
operators), as report ``Section``s: matplotlib PNGs, or a note saying why a plot is missing."""

from __future__ import annotations

import base64
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pipeline.reporting.run_stats import (
    RunSummary,
)

COLORS = ("#3b6ea5", "#e07b39", "#5a9e5a", "#b94a48", "#8064a2", "#c9a227", "#4aa3b9")


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




def figure(width: float = 7.5, height: float = 3.6, ncols: int = 1):
    # Figure objects directly (not pyplot): no global state, no GUI backend, safe in threads.
    from matplotlib.figure import Figure

    # "tight" rather than "constrained": as good for these plots and cheaper to lay out.
    fig = Figure(figsize=(width, height), dpi=100, layout="tight")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, axes


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def bar_chart(ax, labels: list[str], values: list[float], color: str = COLORS[0], horizontal: bool = False,
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
    fig, axes = figure(11 if ncols == 2 else 7.5, 3.8, ncols)
    labels = [f"{f.dataset}\n({f.stage})" if f.stage else f.dataset for f in s.funnel]
    bar_chart(axes[0], labels, [f.count for f in s.funnel], horizontal=True)
    axes[0].set_xlabel("records")
    axes[0].set_title("records per dataset")
    if s.drops:
        drops = [(f"{stage}: {reason}", n, i) for i, (stage, per) in enumerate(s.drops.items())
                 for reason, n in sorted(per.items(), key=lambda kv: -kv[1])]
        drop_bars = axes[1].barh([d[0] for d in drops], [d[1] for d in drops],
                                 color=[COLORS[(3 + d[2]) % len(COLORS)] for d in drops])
        axes[1].bar_label(drop_bars, padding=2, fontsize=8)
        axes[1].invert_yaxis()
        axes[1].tick_params(axis="y", labelsize=8)
        axes[1].set_xlabel("records dropped")
        axes[1].set_title("dropped per stage and rule / reason")
    sec.png = png_bytes(fig)
    sec.table = [["dataset", "stage", "records"]] + [[f.dataset, f.stage or "-", f.count] for f in s.funnel]
    return sec


def plot_domains_tiers(s: RunSummary) -> Section:
    sec = Section("domains_tiers", "Domains and quality tiers", "Domain labels before filtering (evolved) "
                  "and after (SFT set), and the critique model's quality tiers of the SFT set (4 best).")
    if not s.domains and not s.tiers:
        sec.empty = "No domain labels or tiers: the evolve and filter stages have not written their datasets."
        return sec
    fig, axes = figure(11, 3.8, 2)
    if s.domains:
        names = sorted(set().union(*[set(c) for c in s.domains.values()]))
        width = 0.8 / len(s.domains)
        for i, (ds, counts) in enumerate(s.domains.items()):
            xs = [j + (i - (len(s.domains) - 1) / 2) * width for j in range(len(names))]
            bars = axes[0].bar(xs, [counts.get(n, 0) for n in names], width, label=ds, color=COLORS[i])
            axes[0].bar_label(bars, fontsize=7, padding=1)
        axes[0].set_xticks(range(len(names)), names, rotation=30, ha="right")
        axes[0].legend(frameon=False)
        axes[0].set_title("records per domain")
    else:
        axes[0].text(0.5, 0.5, "no domain labels", ha="center", va="center", transform=axes[0].transAxes)
    if s.tiers:
        tiers = sorted(s.tiers, key=lambda t: (len(t), t))
        bar_chart(axes[1], [f"tier {t}" for t in tiers], [s.tiers[t] for t in tiers], color=COLORS[2])
        axes[1].set_title("SFT records per quality tier")
    else:
        axes[1].text(0.5, 0.5, "no tiers (filter stage not run)", ha="center", va="center",
                     transform=axes[1].transAxes)
    sec.png = png_bytes(fig)
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
    fig, axes = figure(11, 3.8, 2)
    if per_criterion:
        names = list(per_criterion)
        axes[0].boxplot([per_criterion[n] for n in names], tick_labels=names, patch_artist=True,
                        boxprops={"facecolor": "#c6d9ee"}, medianprops={"color": COLORS[1]})
        axes[0].tick_params(axis="x", rotation=20)
        axes[0].set_title(f"grades of the {len(sft)} SFT answers")
    else:
        axes[0].text(0.5, 0.5, "no per-criterion scores", ha="center", va="center", transform=axes[0].transAxes)
    if pairs:
        chosen, rejected = zip(*pairs, strict=True)
        lo, hi = min(min(chosen), min(rejected)), max(max(chosen), max(rejected))
        bins = [lo + (hi - lo) * i / 15 for i in range(16)] if hi > lo else 5
        axes[1].hist(chosen, bins=bins, alpha=0.6, label="chosen", color=COLORS[2])
        axes[1].hist(rejected, bins=bins, alpha=0.6, label="rejected", color=COLORS[3])
        axes[1].legend(frameon=False)
        axes[1].set_title(f"preference pairs ({len(pairs)}): scores")
    else:
        axes[1].text(0.5, 0.5, "no preference pairs", ha="center", va="center", transform=axes[1].transAxes)
    sec.png = png_bytes(fig)
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
    fig, axes = figure(11, 3.6, 2)
    if by_reason:
        axes[0].hist(list(by_reason.values()), bins=20, stacked=True, label=list(by_reason),
                     color=list(COLORS[: len(by_reason)]))
        axes[0].legend(frameon=False, title="finish reason")
        axes[0].set_xlabel("tokens")
        axes[0].set_title(f"candidate answers ({sum(map(len, by_reason.values()))})")
    else:
        axes[0].text(0.5, 0.5, "no answers dataset", ha="center", va="center", transform=axes[0].transAxes)
    if kept:
        axes[1].hist(kept, bins=20, color=COLORS[2])
        axes[1].set_xlabel("words")
        axes[1].set_title(f"answers kept for SFT ({len(kept)})")
    else:
        axes[1].text(0.5, 0.5, "no SFT set", ha="center", va="center", transform=axes[1].transAxes)
    sec.png = png_bytes(fig)
    return sec


def plot_operators(s: RunSummary) -> Section:
    sec = Section("operators", "Evolution operators", "Instructions each evolution operator produced "
                  "(`original` = generated, not evolved), how many of them reached the SFT set, and the yield.")
    if not s.operators:
        sec.empty = "No evolved instructions: the evolve stage has not written `evolved`."
        return sec
    fig, axes = figure(7.5, 3.6)
    ax = axes[0]
    ops = list(s.operators)
    made = [s.operators[o]["evolved"] for o in ops]
    kept = [s.operators[o]["in_sft"] for o in ops]
    xs = range(len(ops))
    ax.bar([x - 0.2 for x in xs], made, 0.4, label="in evolved", color=COLORS[0])
    bars = ax.bar([x + 0.2 for x in xs], kept, 0.4, label="in SFT", color=COLORS[2])
    ax.bar_label(bars, labels=[f"{100 * k / m:.0f}%" if m else "-" for k, m in zip(kept, made, strict=True)],
                 padding=2, fontsize=8)
    ax.set_xticks(list(xs), ops)
    ax.legend(frameon=False)
    ax.set_title("instructions per operator and their yield into SFT")
    sec.png = png_bytes(fig)
    sec.table = [["operator", "instructions", "in SFT", "yield"]] + [
        [o, m, k, f"{100 * k / m:.1f}%" if m else "-"] for o, m, k in zip(ops, made, kept, strict=True)]
    return sec
