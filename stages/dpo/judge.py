"""A second judge of the held-out samples, independent of the reward model the policy trained against: the
critique model's grades (the filter stage's 4-tier rubric, ``critique.grade``), through its worker pool."""

from __future__ import annotations

from collections.abc import Sequence

from critique.grade import CritiqueConfig, grade_pairs
from critique.rubric import mean_score
from pipeline.run.stage import record_seed

JUDGE_SALT = "dpo-judge"
"""Request-seed salt of the judge's critiques: sample j of a prompt gets the same seed in the baseline and in every
round, so both sides of a pair are graded alike."""


def critic_judge(pool, cfg: CritiqueConfig, seed: int):
    """``judge(prompts, results) -> grades`` for ``online_dpo``: one grade per sample, flat and prompt-major, the
    mean of the critic's dimension scores (1-4; its tier when it scored no dimension), None when the critique
    could not be parsed."""

    def judge(prompts: Sequence[dict], results: Sequence) -> list[float | None]:
        pairs, seeds = [], []
        for p, r in zip(prompts, results, strict=True):
            instruction = next(m["content"] for m in reversed(p["messages"]) if m["role"] == "user")
            for j, c in enumerate(r.completions):
                pairs.append((instruction, c.text))
                seeds.append(record_seed(seed, f"{p['id']}:{j}", JUDGE_SALT))
        grades, _ = grade_pairs(pairs, seeds, cfg, pool)
        out: list[float | None] = []
        for g in grades:
            score = mean_score(g.scores) if g.scores else None
            out.append(float(score) if score is not None else float(g.tier) if g.tier is not None else None)
        return out

    return judge
