"""The 4-tier rubric: the graded dimensions, the tier scale, and how graded responses are ranked.

The wording the critique model sees (what each score and tier means) lives in
``configs/prompts/critique.yaml``; this module holds only what code depends on: the names of the
dimensions, the valid range, and the ordering used to pick the best of several graded copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DIMENSIONS: tuple[str, ...] = ("accuracy", "relevance", "completeness", "usefulness", "clarity")
"""What every (instruction, response) pair is graded on (Hunyuan-Large's SFT quality control)."""
MIN_TIER = 1
MAX_TIER = 4
TIERS: tuple[int, ...] = (1, 2, 3, 4)
"""Tier 4 is best. Scores of every dimension use the same 1-4 scale."""


@dataclass
class Critique:
    """One graded (instruction, response) pair."""

    tier: int | None
    """Overall tier 1-4 (4 best); None when the pair was dropped (status "dropped")."""
    scores: dict[str, int | None] = field(default_factory=dict)
    """Dimension -> score 1-4 (None when the critique model gave none for it)."""
    reason: str = ""
    """The critique model's short reason ("" when it gave none)."""
    status: str = "ok"
    """How it was obtained: ok (every field parsed), partial (tier parsed or derived, some fields
    missing), lowest_tier (unparseable, given the lowest tier by policy), dropped (unparseable,
    dropped by policy), default (critique disabled: the configured default tier)."""
    attempts: int = 1
    """Critique-model calls spent on this pair (retries included)."""
    raw: str = ""
    """The critique model's last output, kept for inspection and for training a critique model."""
    prompt_fit: str = ""
    """What the prompt gave up to fit the critic's context: "" (nothing), fewer_examples, clipped."""

    def as_record(self) -> dict:
        """Plain, schema-stable dict (every dimension key present) for datasets."""
        return {"tier": self.tier, "scores": {d: self.scores.get(d) for d in DIMENSIONS},
                "reason": self.reason, "status": self.status, "attempts": self.attempts, "raw": self.raw,
                "prompt_fit": self.prompt_fit}


def mean_score(scores: dict[str, int | None]) -> float | None:
    """Mean of the dimension scores that are present (None when there are none)."""
    vals = [v for v in (scores or {}).values() if v is not None]
    return sum(vals) / len(vals) if vals else None


def tier_from_scores(scores: dict[str, int | None]) -> int | None:
    """Tier implied by the dimension scores when the model gave scores but no tier: the rounded
    mean, but never above the accuracy score (an inaccurate answer is not a good one)."""
    mean = mean_score(scores)
    if mean is None:
        return None
    tier = int(mean + 0.5)
    if scores.get("accuracy") is not None:
        tier = min(tier, int(scores["accuracy"]))
    return max(MIN_TIER, min(MAX_TIER, tier))


def rank_key(tier: int | None, scores: dict[str, int | None] | None = None,
             agreement: float | None = None) -> tuple[float, float, float]:
    """Sort key, higher is better: tier, then mean dimension score, then self-consistency agreement.
    Used to keep the best-scored copy among duplicates and to pick the SFT response."""
    mean = mean_score(scores or {})
    return (float(tier or 0), float(mean or 0.0), float(agreement if agreement is not None else 0.0))
