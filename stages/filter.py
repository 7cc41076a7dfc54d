"""Stage `filter`: rule QC, self-consistency, 4-tier critique and deduplication of the answers.

Per shard (resumable, through ``ctx.map`` into the intermediate ``filter_graded``):
  0. a thinking-mode response (the answer stage's ``thinking``) is judged on its final answer;
  1. rules (critique/rules.py): truncation, garbled text, format errors, repetition;
  1b. a slow response's reasoning (critique/reasoning.py): present, not cut off, not looping, and in agreement
      with the final answer where the question is objective;
  2. self-consistency (critique/consistency.py) on the k responses of objective questions;
  2b. verification (critique/verify.py): responses to instructions with verifiable constraints
      (the evolve stage's constrain operator) must follow every one;
  3. the critique model (critique/grade.py) grades every response still standing, 4 tiers.
Then over the whole dataset:
  4. responses below `min_tier` go;
  5. duplicate instructions, then duplicate responses (critique/dedup.py), keeping the
     best-scored copy;
  6. output: `sft` (the best `responses_per_instruction` per instruction, chat `messages`, with
     tier, scores, critique reason, agreement and lineage) and `preferences` (pairs of one
     instruction's responses, higher vs lower tier, TRL conversational form).

Every response carries why it was dropped, and the stage manifest gets the funnel: responses and
instructions in and out of every filter.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from critique.calibration import CalibrationConfig, calibration_figures, grade_known, known_quality_set
from critique.consistency import ConsistencyConfig, apply_consistency
from critique.dedup import DedupConfig, duplicate_groups, duplicate_groups_within, keep_best
from critique.grade import CritiqueConfig, grade_pairs, parse_rate
from critique.prompts import load_prompts
from critique.reasoning import STEP as REASONING_STEP
from critique.reasoning import apply_reasoning_checks, judged_finals, reasoning_metrics, shown
from critique.rubric import DIMENSIONS, TIERS, rank_key
from critique.rules import RULES, RulesConfig, apply_rules
from critique.verify import STEP as VERIFY_STEP
from critique.verify import apply_constraints, code_test_metrics, verification_metrics
from pipeline.records import LINEAGE_FIELDS
from pipeline.run.stage import ModelRole, Stage, StageContext, StageError, record_seed
from pipeline.thinking import FINAL_FIELD, MODE_FIELD, REASONING_FIELD


class PreferenceConfig(BaseModel):
    """Preference pairs from the graded responses (for the reward model and offline DPO)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enabled: bool = True
    """Write pairs (False: an empty `preferences` dataset)."""
    min_tier_gap: int = Field(1, ge=1, le=3)
    """Chosen and rejected tiers must differ by at least this much."""
    min_chosen_tier: int = Field(2, ge=1, le=4)
    """Lowest tier a chosen response may have."""
    max_pairs_per_instruction: int = Field(2, ge=1)
    """Pairs per instruction: best vs worst, second best vs second worst, ..."""
    include_rejected: bool = True
    """Responses rejected by the rules, self-consistency or constraint verification can be the rejected side of a pair
    (score 0, the rule's reason as their reason): truncated, garbled, looping or wrong answers are
    exactly what a reward model must rank low."""


class FilterConfig(BaseModel):
    """Rule QC, self-consistency and 4-tier critique of the answers; writes `sft` and `preferences`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    critic: ModelRole = "critic"
    """Model role (a `models.<role>` entry of the run config) that grades the responses."""
    rules: RulesConfig = Field(default_factory=RulesConfig)
    """Rule QC: truncation, garbled text, format errors, repetition."""
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)
    """Self-consistency of objective questions' k responses."""
    critique: CritiqueConfig = Field(default_factory=CritiqueConfig)
    """The 4-tier critique model: prompts, sampling, policy for unparseable critiques."""
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    """The critic's calibration on answers of known quality (figures in the manifest's `critic_calibration`)."""
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    """Exact and near-duplicate instructions and responses across the dataset."""
    min_tier: int = Field(2, ge=1, le=4)
    """Lowest tier kept for SFT (tiers drive coarse-to-fine SFT: see the sft stage's `phases`)."""
    responses_per_instruction: int = Field(1, ge=1)
    """SFT rows per instruction (its best kept responses)."""
    preferences: PreferenceConfig = Field(default_factory=PreferenceConfig)
    """Preference pairs."""


# -- per shard: rules, self-consistency, critique -------------------------------------------------
def check_answers(records: list[dict], where: str = "answers") -> None:
    """Fail early, naming the record and field, on records the filter cannot read."""
    for i, rec in enumerate(records):
        rid = rec.get("id", f"#{i}")
        for fld in ("id", "instruction", "responses"):
            if rec.get(fld) is None:
                raise StageError(f"{where} record {i} (id={rid}): missing field {fld!r}; fix: the answer stage "
                                 "must write id, instruction and responses (see ARCHITECTURE.md)")
        if not isinstance(rec["responses"], list):
            raise StageError(f"{where} record {i} (id={rid}): field 'responses' is a {type(rec['responses']).__name__}, "
                             "expected a list of {text, model, finish_reason, n_tokens}")
        for j, resp in enumerate(rec["responses"]):
            if not isinstance(resp, dict) or not isinstance(resp.get("text"), str):
                raise StageError(f"{where} record {i} (id={rid}): responses[{j}] has no 'text' string; fix: each "
                                 "response must be {text, model, finish_reason, n_tokens}")


def grade_records(records: list[dict], cfg: FilterConfig, get_pool: Callable[[], Any], run_seed: int,
                  progress=None) -> list[dict]:
    """Rules, self-consistency and critique for a batch of answer records (one shard).

    Every response gets ``rule_reasons``, ``rejected_by`` (first filter that rejected it: a rule
    name, "consistency", "critique_unparseable", or None), ``answer``/``agrees`` (objective
    questions) and ``critique`` (tier, scores, reason, status, attempts, raw; None when it was not
    graded). Every record gets ``agreement``, ``majority_answer`` and ``answer_kind``.
    Deterministic given the records and ``run_seed``.
    """
    check_answers(records)
    out, _ = apply_rules(judged_finals(records), cfg.rules)
    out = apply_reasoning_checks(out, cfg.rules)
    out, _ = apply_consistency(out, cfg.consistency)
    out = apply_constraints(out)
    todo = [(i, j) for i, rec in enumerate(out) for j, r in enumerate(rec["responses"]) if not r.get("rejected_by")]
    for rec in out:
        for r in rec["responses"]:
            r.setdefault("answer", None)
            r.setdefault("agrees", None)
            r["critique"] = None
    if todo:
        pairs = [(out[i]["instruction"], out[i]["responses"][j]["text"]) for i, j in todo]
        seeds = [record_seed(run_seed, str(out[i]["id"]), salt=f"critique:{j}") for i, j in todo]
        critiques, _ = grade_pairs(pairs, seeds, cfg.critique, get_pool() if cfg.critique.enabled else None,
                                   progress=progress)
        for (i, j), crit in zip(todo, critiques, strict=True):
            resp = out[i]["responses"][j]
            resp["critique"] = crit.as_record()
            if crit.status == "dropped":
                resp["rejected_by"] = "critique_unparseable"
                resp["rule_reasons"] = [*resp["rule_reasons"], "critique: unparseable after retries"]
    return out


# -- whole dataset: tiers, dedup, outputs, funnel -------------------------------------------------
def _kept(r: dict) -> bool:
    return not r.get("rejected_by")


def _resp_key(rec: dict, r: dict) -> tuple:
    crit = r.get("critique") or {}
    agree = rec.get("agreement") if r.get("agrees") else (0.0 if rec.get("agreement") is not None else None)
    return rank_key(crit.get("tier"), crit.get("scores"), agree)


def funnel_rows(records: list[dict], steps: list[str]) -> list[dict]:
    """Responses and instructions in and out of each filter, in order, from the final annotations
    (a response rejected by step k counts as kept before k). ``top_reasons`` names the commonest."""
    rows = []

    def counts(applied: set[str]) -> tuple[int, int]:
        kept = [sum(r.get("rejected_by") not in applied for r in rec["responses"]) for rec in records]
        return sum(kept), sum(k > 0 for k in kept)

    applied: set[str] = set()
    before = counts(applied)
    for step in steps:
        applied.add(step)
        after = counts(applied)
        row = {"filter": step, "responses_in": before[0], "responses_out": after[0],
               "instructions_in": before[1], "instructions_out": after[1]}
        reasons = Counter(_reason_head(_step_reason(r, step)) for rec in records for r in rec["responses"]
                          if r.get("rejected_by") == step)
        if reasons:
            row["top_reasons"] = dict(reasons.most_common(5))
        rows.append(row)
        before = after
    return rows


def _step_reason(r: dict, step: str) -> str:
    prefix = "critique" if step == "critique_unparseable" else step.split("_")[0]
    return next((x for x in r.get("rule_reasons") or [] if x.startswith(prefix)), (r.get("rule_reasons") or [step])[-1])


def _reason_head(text: str) -> str:
    """A reason without its specifics (for counting): 'truncation: finish_reason=length (...)' ->
    'truncation: finish_reason=length'."""
    head = text.split(":", 2)
    base = ":".join(head[:2]) if len(head) > 1 else text
    return re.sub(r"\d+(\.\d+)?", "N", base.split(" (")[0].split("...")[0].strip())[:80]


def _row_id(*parts: str) -> str:
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=10).hexdigest()


def _lineage(rec: dict) -> dict:
    out = {k: rec.get(k) for k in LINEAGE_FIELDS if k in rec}
    out["instruction_id"] = rec["id"]
    out["answer_model"] = rec.get("answer_model")
    return out


def select_outputs(graded: list[dict], cfg: FilterConfig) -> tuple[list[dict], list[dict], dict]:
    """From the graded records: tier threshold, dedup, then the `sft` rows, the `preferences`
    pairs and the metrics (funnel, rule counts, critique parse figures, tiers, agreement)."""
    records = [{**rec, "responses": [dict(r) for r in rec["responses"]]} for rec in graded]
    steps = [*[r for r in RULES if r in cfg.rules.enabled], REASONING_STEP, "consistency", VERIFY_STEP,
             "critique_unparseable", "tier"]
    # 4. tier threshold
    for rec in records:
        for r in rec["responses"]:
            crit = r.get("critique")
            if _kept(r) and crit and crit.get("tier") is not None and crit["tier"] < cfg.min_tier:
                r["rejected_by"] = "tier"
                r["rule_reasons"] = [*r.get("rule_reasons", []), f"tier {crit['tier']} < min_tier {cfg.min_tier}"]
    # 5a. duplicate instructions: keep the record whose best kept response ranks highest (within one thinking mode:
    # an instruction's slow and fast answer records are not duplicates of each other)
    if cfg.dedup.instructions:
        live = [i for i, rec in enumerate(records) if any(_kept(r) for r in rec["responses"])]
        groups = duplicate_groups_within([records[i]["instruction"] for i in live],
                                         [records[i].get(MODE_FIELD) for i in live], cfg.dedup)

        def best_of(k: int) -> tuple:
            rec = records[live[k]]
            return max(_resp_key(rec, r) for r in rec["responses"] if _kept(r))

        for k, kept_k in keep_best(groups, best_of).items():
            rec = records[live[k]]
            for r in rec["responses"]:
                if _kept(r):
                    r["rejected_by"] = "duplicate_instruction"
                    r["rule_reasons"] = [*r.get("rule_reasons", []),
                                         f"duplicate instruction (kept: {records[live[kept_k]]['id']})"]
        steps.append("duplicate_instruction")
    # 5b. duplicate responses anywhere in the dataset
    if cfg.dedup.responses:
        live_r = [(i, j) for i, rec in enumerate(records) for j, r in enumerate(rec["responses"]) if _kept(r)]
        groups = duplicate_groups([shown(records[i]["responses"][j]) for i, j in live_r], cfg.dedup)
        for k, kept_k in keep_best(groups, lambda k: _resp_key(records[live_r[k][0]],
                                                               records[live_r[k][0]]["responses"][live_r[k][1]])).items():
            i, j = live_r[k]
            r = records[i]["responses"][j]
            r["rejected_by"] = "duplicate_response"
            r["rule_reasons"] = [*r.get("rule_reasons", []), f"duplicate response (kept: a response to {records[live_r[kept_k][0]]['id']})"]
        steps.append("duplicate_response")
    # 6. outputs: each instruction's best kept responses
    sft = []
    for rec in records:
        kept = sorted((r for r in rec["responses"] if _kept(r)), key=lambda r: _resp_key(rec, r), reverse=True)
        sft += [_sft_row(rec, r) for r in kept[:cfg.responses_per_instruction]]
        for r in kept[cfg.responses_per_instruction:]:
            r["rejected_by"] = "not_selected"
            r["rule_reasons"] = [*r.get("rule_reasons", []), "not_selected: a better response to the same instruction"]
    steps.append("not_selected")
    funnel = funnel_rows(records, steps)
    prefs = preference_pairs(records, cfg) if cfg.preferences.enabled else []
    metrics = _metrics(records, funnel, cfg, len(sft), len(prefs))
    return sft, prefs, metrics


def _sft_row(rec: dict, r: dict) -> dict:
    crit = r.get("critique") or {}
    return {
        "id": _row_id(str(rec["id"]), r["text"]),
        "messages": [{"role": "user", "content": rec["instruction"]}, {"role": "assistant", "content": shown(r)}],
        "tier": crit.get("tier"),
        "scores": {d: (crit.get("scores") or {}).get(d) for d in DIMENSIONS},
        "critique_reason": crit.get("reason", ""),
        "critique_status": crit.get("status"),
        "agreement": rec.get("agreement"),
        "answer": r.get("answer"),
        "response_model": r.get("model"),
        "finish_reason": r.get("finish_reason"),
        "n_tokens": r.get("n_tokens"),
        **({MODE_FIELD: rec[MODE_FIELD], REASONING_FIELD: r.get(REASONING_FIELD), FINAL_FIELD: r.get(FINAL_FIELD)}
           if rec.get(MODE_FIELD) else {}),
        **_lineage(rec),
    }


def preference_pairs(records: list[dict], cfg: FilterConfig) -> list[dict]:
    """Pairs of responses to one instruction, higher vs lower tier (TRL conversational form)."""
    pc = cfg.preferences
    pairs = []
    for rec in records:
        if any(r.get("rejected_by") == "duplicate_instruction" for r in rec["responses"]):
            continue
        cands = []  # (score, rank key, response, reason)
        for r in rec["responses"]:
            crit = r.get("critique") or {}
            if crit.get("tier") is not None and r.get("rejected_by") not in ("duplicate_response",):
                cands.append((crit["tier"], _resp_key(rec, r), r, crit.get("reason", "")))
            elif pc.include_rejected and r.get("rejected_by") in (*RULES, REASONING_STEP, "consistency", VERIFY_STEP):
                cands.append((0, (0.0, 0.0, 0.0), r, (r.get("rule_reasons") or [""])[0]))
        cands.sort(key=lambda c: c[1], reverse=True)
        used = set()
        for hi in range(len(cands)):
            if len(used) // 2 >= pc.max_pairs_per_instruction:
                break
            c = cands[hi]
            if id(c[2]) in used or c[0] < pc.min_chosen_tier:
                continue
            for lo in range(len(cands) - 1, hi, -1):
                d = cands[lo]
                if id(d[2]) in used or c[0] - d[0] < pc.min_tier_gap or shown(c[2]).strip() == shown(d[2]).strip():
                    continue
                used.update((id(c[2]), id(d[2])))
                pairs.append({
                    "id": _row_id(str(rec["id"]), c[2]["text"], d[2]["text"]),
                    "prompt": [{"role": "user", "content": rec["instruction"]}],
                    "chosen": [{"role": "assistant", "content": shown(c[2])}],
                    "rejected": [{"role": "assistant", "content": shown(d[2])}],
                    "source": "critique",
                    "chosen_score": float(c[0]),
                    "rejected_score": float(d[0]),
                    "chosen_reason": c[3],
                    "rejected_reason": d[3],
                    "chosen_model": c[2].get("model"),
                    "rejected_model": d[2].get("model"),
                    "agreement": rec.get("agreement"),
                    **({MODE_FIELD: rec[MODE_FIELD]} if rec.get(MODE_FIELD) else {}),
                    **_lineage(rec),
                })
                break
    return pairs


def _metrics(records: list[dict], funnel: list[dict], cfg: FilterConfig, n_sft: int, n_prefs: int) -> dict:
    responses = [r for rec in records for r in rec["responses"]]
    rule_counts = {name: {"flagged": 0, "rejected": 0} for name in RULES if name in cfg.rules.enabled}
    for r in responses:
        names = []
        for reason in r.get("rule_reasons") or []:
            name = reason.split(":", 1)[0]
            if name in rule_counts and name not in names:
                names.append(name)
        for name in names:
            rule_counts[name]["flagged"] += 1
        if r.get("rejected_by") in rule_counts:
            rule_counts[r["rejected_by"]]["rejected"] += 1
    crits = [r["critique"] for r in responses if r.get("critique")]
    graded = [c for c in crits if c["status"] != "default"]
    stats = {"pairs": len(graded), "requests": sum(c["attempts"] for c in graded),
             # the first attempt parsed iff the pair needed one attempt and got a parsed status
             "unparseable_first": sum(not (c["attempts"] == 1 and c["status"] in ("ok", "partial")) for c in graded),
             "ok": sum(c["status"] == "ok" for c in graded), "partial": sum(c["status"] == "partial" for c in graded),
             "recovered": sum(c["attempts"] > 1 and c["status"] in ("ok", "partial") for c in graded),
             "dropped": sum(c["status"] == "dropped" for c in graded),
             "lowest_tier": sum(c["status"] == "lowest_tier" for c in graded),
             "fewer_examples": sum(c.get("prompt_fit") == "fewer_examples" for c in graded),
             "clipped": sum(c.get("prompt_fit") == "clipped" for c in graded)}
    tiers = Counter(c["tier"] for c in crits if c.get("tier") is not None)
    checked = [rec["agreement"] for rec in records if rec.get("agreement") is not None]
    kinds = Counter(rec.get("answer_kind") for rec in records if rec.get("answer_kind"))
    return {
        "funnel": funnel,
        "records_in": len(records), "responses_in": len(responses),
        "sft_rows": n_sft, "preference_pairs": n_prefs,
        "rules": rule_counts,
        "critique": {**stats, "parse_rate": parse_rate(stats), "policy": cfg.critique.on_unparseable},
        "tiers": {str(t): tiers.get(t, 0) for t in TIERS},
        "verification": verification_metrics(records), "code_tests": code_test_metrics(records),
        **({"reasoning": reasoning_metrics(records)} if any(rec.get(MODE_FIELD) for rec in records) else {}),
        "consistency": {"records_checked": len(checked), "by_kind": dict(kinds),
                        "mean_agreement": round(sum(checked) / len(checked), 4) if checked else None,
                        "below_threshold": sum(a < cfg.consistency.min_agreement for a in checked)},
    }


def format_funnel(rows: list[dict]) -> str:
    """The funnel as a text table (for the log)."""
    lines = [f"{'filter':24s} {'responses':>17s} {'instructions':>17s}"]
    for row in rows:
        lines.append(f"{row['filter']:24s} {row['responses_in']:>8d} -> {row['responses_out']:<6d} "
                     f"{row['instructions_in']:>8d} -> {row['instructions_out']:<6d}")
    return "\n".join(lines)


# -- the stage ------------------------------------------------------------------------------------
def run(ctx: StageContext) -> None:
    cfg: FilterConfig = ctx.config
    if cfg.critique.enabled:
        load_prompts(cfg.critique.prompts)  # a bad prompt file fails before any engine starts
    answers = ctx.read("answers").to_list()
    check_answers(answers)
    pool_holder: list = []

    def get_pool():  # started only if a shard still needs grading (a resumed run may need none)
        if not pool_holder:
            pool_holder.append(ctx.pool(cfg.critic))
        return pool_holder[0]

    graded = ctx.map("filter_graded", answers, lambda shard: grade_records(shard, cfg, get_pool, ctx.seed),
                     desc="filter: rules + critique")
    sft, prefs, metrics = select_outputs(graded, cfg)
    if cfg.critique.enabled and cfg.calibration.enabled:
        known = ctx.map("critic_calibration", known_quality_set(cfg.calibration.items, cfg.calibration.seed),
                        lambda shard: grade_known(shard, get_pool(), cfg.critique, cfg.calibration.seed),
                        desc="filter: critic calibration")
        metrics["critic_calibration"] = {**calibration_figures(known), "items": cfg.calibration.items}
        ctx.log.info("filter: critic calibration AUC %s (reference vs corrupted answers), mean tier by kind %s",
                     metrics["critic_calibration"]["auc"], metrics["critic_calibration"]["mean_tier"])
    ctx.write("sft", sft)
    ctx.write("preferences", prefs)
    ctx.metrics.update(metrics)
    ctx.log.info("filter funnel:\n%s", format_funnel(metrics["funnel"]))
    ctx.log.info("filter: %d sft rows, %d preference pairs, critique parse rate %s", len(sft), len(prefs),
                 metrics["critique"]["parse_rate"])


STAGE = Stage(name="filter", inputs=("answers",), outputs=("sft", "preferences"), config_cls=FilterConfig, run=run)
