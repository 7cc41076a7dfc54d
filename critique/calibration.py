"""Critic calibration: how well the critique model's tiers separate answers whose quality is known.

The known-quality set is built from CPython's docstrings (``reward.stdlib_pairs``: real text that installs with
Python): per item, the question "What does the Python function `f` do?" with
- ``reference``: the first paragraph of ``f``'s docstring (a correct answer);
- ``truncated``: its first third, cut mid-sentence;
- ``wrong_facts``: the paragraph of another function of the same module (on topic, but wrong about ``f``);
- ``off_topic``: the paragraph of a function of another module;
- ``constraint_violating``: the reference, to the question with a verifiable constraint the reference breaks
  (``critique.constraints``, checked).
Every answer is graded as the filter grades (``grade.grade_pairs``); the figures are the AUC of reference tiers
against corrupted tiers (the chance a reference gets the higher tier, ties half: Mann-Whitney U / n1 n2), the
AUC per corruption, and the tier counts per kind (the confusion by tier).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from critique.constraints import check, phrase
from critique.rubric import DIMENSIONS, TIERS

CORRUPTIONS = ("truncated", "wrong_facts", "off_topic", "constraint_violating")
"""The ways a known-quality answer is made worse (each is graded against the reference)."""
KINDS = ("reference", *CORRUPTIONS)
"""Every kind of answer in the known-quality set."""


class CalibrationConfig(BaseModel):
    """The critic's calibration check, run by the filter on a known-quality set before grading."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enabled: bool = True
    """Measure the critic on the known-quality set and put the figures in the filter's manifest."""
    items: int = Field(16, ge=2)
    """Docstring items; each gives one answer of every kind (so 5 x items graded answers)."""
    seed: int = 0
    """Which items and which corruptions (a fixed seed gives the same set on every run)."""


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _violated_constraint(answer: str, rng: random.Random) -> tuple[str, dict] | None:
    """A constraint phrasing (and the constraint) that ``answer`` breaks, or None if it follows every candidate."""
    words = len(answer.split())
    candidates = [("lowercase", {}), ("no_commas", {}), ("max_words", {"n": max(5, words // 3)}),
                  ("bullets", {"n": 3}), ("end_phrase", {"phrase": "End of answer."})]
    rng.shuffle(candidates)
    for kind, params in candidates:
        constraint = {"kind": kind, "params": params, "text": phrase(kind, params, rng)}
        if check(answer, [constraint]) == [False]:
            return constraint["text"], constraint
    return None


def _eligible_docs() -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    """Docstrings usable as items (their module has another documented function, for ``wrong_facts``; 12+ words),
    and every docstring by module."""
    from reward.stdlib_pairs import stdlib_docs

    docs = stdlib_docs()
    by_module: dict[str, list[tuple[str, str]]] = {}
    for name, text in docs:
        by_module.setdefault(_module(name), []).append((name, text))
    return [d for d in docs if len(by_module[_module(d[0])]) > 1 and len(d[1].split()) >= 12], by_module


def _answers(name: str, text: str, by_module: dict[str, list[tuple[str, str]]], rng: random.Random) -> list[dict]:
    """One answer of every kind for the item ``name`` (fewer when no constraint phrasing breaks the reference)."""
    from reward.stdlib_pairs import question

    q = question(name)
    words = text.split()
    same = [d for d in by_module[_module(name)] if d[0] != name]
    other = [d for m, ds in by_module.items() if m != _module(name) for d in ds]
    violated = _violated_constraint(text, rng)
    answers = {
        "reference": (q, text),
        "truncated": (q, " ".join(words[: max(4, len(words) // 3)])),
        "wrong_facts": (q, rng.choice(same)[1]),
        "off_topic": (q, rng.choice(other)[1]),
        "constraint_violating": (f"{q} {violated[0]}", text) if violated else None,
    }
    return [{"item": name, "kind": kind, "instruction": a[0], "response": a[1]}
            for kind, a in answers.items() if a is not None]


def known_quality_set(items: int, seed: int = 0) -> list[dict[str, Any]]:
    """``items`` x one answer per kind: ``{"item", "kind", "instruction", "response"}``. Items are drawn from
    functions whose module has at least two documented functions (for ``wrong_facts``)."""
    eligible, by_module = _eligible_docs()
    if len(eligible) < items:
        raise ValueError(f"calibration: {items} items asked, {len(eligible)} docstrings qualify; lower "
                         "filter.calibration.items")
    rng = random.Random(seed)
    return [a for name, text in rng.sample(eligible, items) for a in _answers(name, text, by_module, rng)]


LABELS: dict[str, tuple[dict[str, int], int, str]] = {
    "reference": (dict.fromkeys(DIMENSIONS, 4), 4, "It says correctly and completely what the function does."),
    "truncated": ({"accuracy": 3, "relevance": 4, "completeness": 1, "usefulness": 2, "clarity": 2}, 2,
                  "It stops mid-sentence, so the answer is incomplete."),
    "wrong_facts": ({"accuracy": 1, "relevance": 2, "completeness": 2, "usefulness": 1, "clarity": 3}, 1,
                    "It describes a different function, so it is wrong about this one."),
    "off_topic": ({"accuracy": 1, "relevance": 1, "completeness": 1, "usefulness": 1, "clarity": 3}, 1,
                  "It is about something else and does not answer the question."),
    "constraint_violating": ({"accuracy": 4, "relevance": 3, "completeness": 3, "usefulness": 2, "clarity": 3}, 2,
                             "The content is right, but it ignores the constraint the instruction sets."),
}
"""Kind -> (dimension scores, tier, reason) a fine-tuned critic learns for it (``critic_training_set``)."""


def critic_training_set(items: int | None, calibration: CalibrationConfig, seed: int = 1) -> list[dict[str, Any]]:
    """Graded examples for ``posttrain critic train`` (``instruction``, ``response``, ``scores``, ``tier``,
    ``reason``, plus ``item`` and ``kind``) from docstring items that ``calibration``'s known-quality set does not
    use, so the calibration figure of a critic trained on them is measured on functions it never saw (checked).
    ``items``: how many (None: every eligible one)."""
    from pipeline.records import check_disjoint

    held = {a["item"] for a in known_quality_set(calibration.items, calibration.seed)}
    eligible, by_module = _eligible_docs()
    pool = [d for d in eligible if d[0] not in held]
    if items is not None and items > len(pool):
        raise ValueError(f"critic training set: {items} items asked, {len(pool)} docstrings qualify outside the "
                         f"{len(held)} calibration items; ask for at most {len(pool)}")
    rng = random.Random(seed)
    chosen = rng.sample(pool, items if items is not None else len(pool))
    out = []
    for name, text in chosen:
        for a in _answers(name, text, by_module, rng):
            scores, tier, reason = LABELS[a["kind"]]
            out.append({**a, "scores": dict(scores), "tier": tier, "reason": reason})
    check_disjoint({"critic training items": {a["item"] for a in out}, "calibration items": held})
    return out


def auc(better: Sequence[float], worse: Sequence[float]) -> float | None:
    """Chance that a draw from ``better`` exceeds one from ``worse`` (ties count half): scipy's Mann-Whitney U
    over the product of the sizes. None when either side is empty."""
    from scipy.stats import mannwhitneyu

    if not better or not worse:
        return None
    return float(mannwhitneyu(better, worse, alternative="two-sided").statistic) / (len(better) * len(worse))


def calibration_figures(graded: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The figures of graded known-quality answers (each with ``kind`` and ``tier``; tier None: no grade, left
    out of the AUCs and counted as ungraded)."""
    tiers = {k: [g["tier"] for g in graded if g["kind"] == k and g["tier"] is not None] for k in KINDS}
    corrupted = [t for k in CORRUPTIONS for t in tiers[k]]
    figure = auc(tiers["reference"], corrupted)
    return {
        "answers": len(graded), "ungraded": sum(g["tier"] is None for g in graded),
        "auc": round(figure, 4) if figure is not None else None,
        "auc_by_corruption": {k: (round(a, 4) if (a := auc(tiers["reference"], tiers[k])) is not None else None)
                              for k in CORRUPTIONS},
        "mean_tier": {k: round(sum(v) / len(v), 3) if v else None for k, v in tiers.items()},
        "tiers_by_kind": {k: {str(t): Counter(v).get(t, 0) for t in TIERS} for k, v in tiers.items()},
    }


def grade_known(answers: Sequence[dict[str, Any]], pool, critique_cfg, seed: int = 0) -> list[dict[str, Any]]:
    """``answers`` (from ``known_quality_set``) with the critic's ``tier`` and critique ``status``, graded as
    ``grade.grade_pairs`` grades the filter's responses (same prompts and unparseable policy)."""
    import hashlib

    from critique.grade import grade_pairs

    seeds = [int.from_bytes(hashlib.blake2b(f"{seed}:{a['item']}:{a['kind']}".encode(), digest_size=4).digest(), "big")
             for a in answers]
    critiques, _ = grade_pairs([(a["instruction"], a["response"]) for a in answers], seeds, critique_cfg, pool)
    return [{**a, "tier": c.tier, "status": c.status} for a, c in zip(answers, critiques, strict=True)]


def calibrate(pool, critique_cfg, cfg: CalibrationConfig) -> dict[str, Any]:
    """The calibration figures of the critic in ``pool`` on the known-quality set of ``cfg``."""
    graded = grade_known(known_quality_set(cfg.items, cfg.seed), pool, critique_cfg, cfg.seed)
    return {**calibration_figures(graded), "items": cfg.items}
