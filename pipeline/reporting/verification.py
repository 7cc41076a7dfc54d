"""The report's table of what checks the data: the critic's calibration, the verifiers' pass rates per constraint
kind, code tests run and passed (the filter's manifest), and the reward model's held-out accuracy on in-domain
pairs (the reward stage's manifest). A table, not a plot: a handful of figures, each with its count."""

from __future__ import annotations

from pipeline.reporting.plots import Section
from pipeline.reporting.run_stats import RunSummary


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def verification_section(s: RunSummary) -> Section:
    """Rows (check, figure, on what) from the filter and reward manifests; an empty note before the filter ran."""
    sec = Section("verification", "Verifiers, the critic's calibration and the reward model",
                  "Figures that do not come from the critic's own opinion: answers checked against their instruction's "
                  "constraints (critique/constraints.py), code run against model-written tests in the sandbox, the "
                  "critic's tiers on answers of known quality (AUC 0.5: chance, 1.0: every reference above every "
                  "corrupted answer), and the reward model on held-out pairs of instructions it never saw.")
    filt = (s.stages.get("filter") or {}).get("metrics") or {}
    reward = (s.stages.get("reward") or {}).get("metrics") or {}
    if not filt and not reward:
        sec.empty = "the filter stage has not run yet"
        return sec
    rows: list[list] = [["check", "figure", "on"]]
    cal = filt.get("critic_calibration") or {}
    if cal:
        rows.append(["critic calibration AUC (reference vs corrupted tiers)", cal.get("auc"),
                     f"{cal.get('answers')} answers, {cal.get('ungraded')} ungraded"])
        for kind, tier in (cal.get("mean_tier") or {}).items():
            rows.append([f"critic mean tier: {kind}", tier, ""])
    ver = filt.get("verification") or {}
    if ver.get("responses_checked"):
        rows.append(["constraints followed (every constraint of the response)", _pct(ver.get("pass_rate")),
                     f"{ver['responses_checked']} responses"])
        for kind, k in (ver.get("by_kind") or {}).items():
            rows.append([f"constraint followed: {kind}", _pct(k["pass_rate"]), f"{k['checked']} responses"])
    code = filt.get("code_tests") or {}
    if code:
        rows.append(["code responses passing their tests", f"{code.get('responses_passed')}/{code.get('responses_run')}",
                     f"{code.get('records_with_tests')} instructions with tests"])
    if reward.get("eval_pairs_filter"):
        rows.append(["reward model accuracy, held-out in-domain pairs", reward.get("eval_accuracy_filter_pairs"),
                     f"{reward['eval_pairs_filter']} pairs of unseen instructions"])
    sec.table = rows
    if len(rows) == 1:
        sec.empty = "the filter's manifest has no verification or calibration figures (disabled in this run)"
    return sec
