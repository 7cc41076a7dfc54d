"""Checks of a slow (think-mode) response's reasoning: present, not cut off, not looping, and, where the question is
objective, in agreement with the final answer (the last number of the reasoning against the final answer's).

The filter judges a slow response's final answer with its other checks (rules, self-consistency, the critic); these
look at what only a slow response has.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from critique.rules import RulesConfig, check_repetition
from pipeline.thinking import FINAL_FIELD, MODE_FIELD, REASONING_FIELD, THINK

STEP = "reasoning"
"""The filter step (funnel row, ``rejected_by``) of these checks."""
KINDS = ("missing", "truncated", "repetition", "disagreement")
"""What a rejection is for (the reason's first word after ``reasoning:``)."""

_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def last_number(text: str) -> float | None:
    """The value of the last number in ``text`` (thousands commas, decimals and simple fractions read)."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    token = found[-1].replace(",", "")
    try:
        if "/" in token:
            num, den = token.split("/")
            return float(num) / float(den) if float(den) else None
        return float(token)
    except ValueError:
        return None


def reasoning_reasons(response: dict, objective: bool, cfg: RulesConfig) -> list[str]:
    """Why a slow response's reasoning fails ("reasoning: <kind> ..."), empty when it passes or is not slow."""
    if response.get(MODE_FIELD) != THINK:
        return []
    reasoning, final = response.get(REASONING_FIELD) or "", response.get(FINAL_FIELD) or ""
    if not reasoning.strip():
        return ["reasoning: missing (a slow answer without reasoning)"]
    if not final.strip() or response.get("finish_reason") == "length":
        return [f"reasoning: truncated (finish_reason={response.get('finish_reason')}, "
                f"{'no' if not final.strip() else 'a'} final answer)"]
    looping = check_repetition(reasoning, cfg)
    if looping:
        return [f"reasoning: repetition {looping[0]}"]
    if objective:
        said, answered = last_number(reasoning), last_number(final)
        if said is not None and answered is not None and abs(said - answered) > 1e-9 * max(1.0, abs(said)):
            return [f"reasoning: disagreement (reasoning ends on {said:g}, the final answer says {answered:g})"]
    return []


def judged_finals(records: list[dict]) -> list[dict]:
    """Responses of thinking-mode records (the answer stage's ``thinking``) are judged on their final answer: their
    ``text`` becomes the ``final`` answer and the rendered text moves to ``rendered`` (what SFT rows and pairs
    show)."""
    return [{**rec, "responses": [{**r, "rendered": r["text"], "text": r.get(FINAL_FIELD) or ""}
                                  for r in rec["responses"]]} if rec.get(MODE_FIELD) else rec for rec in records]


def shown(response: dict) -> str:
    """A response's text as an SFT row or a pair shows it (the rendered text of a thinking-mode response)."""
    return response.get("rendered", response["text"])


def apply_reasoning_checks(records: Iterable[dict], cfg: RulesConfig) -> list[dict]:
    """Reject (``rejected_by`` = ``STEP``) the slow responses still standing whose reasoning fails; a record is
    objective when the answer stage marked it so."""
    out = []
    for rec in records:
        responses = []
        for resp in rec["responses"]:
            reasons = [] if resp.get("rejected_by") else reasoning_reasons(resp, bool(rec.get("objective")), cfg)
            if reasons:
                resp = {**resp, "rejected_by": STEP, "rule_reasons": [*resp.get("rule_reasons", []), *reasons]}
            responses.append(resp)
        out.append({**rec, "responses": responses})
    return out


def reasoning_metrics(records: Iterable[dict]) -> dict[str, int]:
    """Slow responses checked and rejections per kind."""
    slow = [r for rec in records for r in rec["responses"] if r.get(MODE_FIELD) == THINK]
    kinds = Counter(reason.split(":", 1)[1].split()[0] for r in slow if r.get("rejected_by") == STEP
                    for reason in r.get("rule_reasons", []) if reason.startswith(f"{STEP}:"))
    return {"slow_responses": len(slow), **{k: kinds.get(k, 0) for k in KINDS}}
