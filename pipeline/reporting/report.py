"""``posttrain report RUN_DIR``: one self-contained HTML page about a run, plus a short terminal summary.

The page has no external resources: plots are matplotlib PNGs embedded as base64 ``data:`` URIs, CSS
is inline, and it needs no JavaScript. Sections: data funnel per stage and filter rule, domains and
quality tiers, critique scores, response lengths, evolution operators' yields, SFT loss curves, expert
load per layer, reward-model accuracy, and per online-DPO round: reward, margin, DPO accuracy, KL and
win rate. A section whose data the run does not have (a stage not run yet, a figure not logged) says
so instead of failing, so the report also works on partial runs.

Where the figures come from (``stages/<stage>/metrics.jsonl`` rows and manifest ``metrics``):

- ``sft``: every key ending in ``loss`` per ``step`` (``expert_load/*`` and aux losses aside) for the
  loss curves; ``expert_load/layer_LL/expert_EE`` (``pipeline.training.moe_trainer.ExpertLoadCallback``) for the
  expert-load heatmap, from the last row that has them.
- ``reward``: keys containing ``accuracy`` (series and manifest) for the reward model's accuracy.
- ``dpo``: rows with a ``round``; per round the last value of each key in ``stages.dpo.metrics.ROUND_FIGURES``
  (the keys the stage writes), also read from a manifest ``metrics.rounds`` list of per-round dicts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.reporting.eval_plots import plot_dpo_held_out, plot_eval
from pipeline.reporting.plots import (
    Section,
    plot_critique_scores,
    plot_domains_tiers,
    plot_funnel,
    plot_operators,
    plot_response_lengths,
)
from pipeline.reporting.run_stats import (
    RunSummary,
    stage_seconds,
    summarize,
)
from pipeline.reporting.training_plots import (
    plot_dpo_rounds,
    plot_expert_load,
    plot_reward_accuracy,
    plot_sft_loss,
)
from pipeline.reporting.verification import verification_section
from pipeline.run.console import library_bars_off


@dataclass
class Report:
    """What ``write_report`` produced."""

    path: Path
    sections: list[Section]
    summary_lines: list[str] = field(default_factory=list)



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
{% elif s.empty %}<p class="empty" data-empty="{{ s.key }}">{{ s.empty }}</p>{% endif %}
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
    held = by_key.get("dpo_held_out")
    if held is not None and held.table:
        head, last = held.table[0], held.table[-1]
        lines.append(f"DPO held-out, round {last[0]}: " + ", ".join(f"{h} {v}" for h, v in zip(head[1:], last[1:],
                                                                                               strict=True)))
    ev = by_key.get("eval")
    if ev is not None and ev.table:
        for row in ev.table[1:]:
            lines.append(f"eval {row[0]}: " + ", ".join(f"{h} {v}" for h, v in zip(ev.table[0][1:], row[1:],
                                                                                  strict=True)))
    checks = by_key.get("verification")
    if checks is not None and checks.table and not checks.empty:
        lines.append("checks: " + ", ".join(f"{row[0]} {row[1]}" for row in checks.table[1:]
                                            if not str(row[0]).startswith(("critic mean tier", "constraint followed:"))))
    empty = [sec.title for sec in sections if sec.png is None and (sec.empty or not sec.table)]
    lines.append(f"report: {path} ({len(sections) - len(empty)} sections with data"
                 + (f"; no data yet for: {', '.join(empty)}" if empty else "") + ")")
    return lines


def write_report(run_dir: str | Path, out: str | Path | None = None,
                 echo: Callable[[str], None] | None = None, examples: int = 3) -> Report:
    """Write the HTML report (default ``RUN_DIR/report/report.html``) and return it with its summary."""
    import jinja2

    with library_bars_off():
        s = summarize(run_dir)
    run_dir = s.run_dir
    data = {name: s.data.get(name) for name in ("answers", "sft", "preferences")}
    sections = [
        plot_funnel(s),
        plot_domains_tiers(s),
        plot_critique_scores(data["sft"], data["preferences"]),
        plot_response_lengths(data["answers"], data["sft"]),
        plot_operators(s),
        verification_section(s),
        plot_sft_loss(run_dir, (s.stages.get("sft") or {}).get("metrics")),
        plot_expert_load(run_dir),
        plot_reward_accuracy(run_dir),
        plot_dpo_rounds(run_dir),
        plot_dpo_held_out(run_dir),
        plot_eval(run_dir),
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
