"""Decontamination: how much of the pipeline's generated text shares word n-grams with a benchmark's prompts.

The same word shingles as the near-duplicate check (``dedup.shingles`` on ``dedup.normalize``d text); an n-gram
found in both is an overlap. Reported, not filtered: the figure says whether generated prompts copy benchmark
text (expected ~0; the constraint phrasings are this project's own).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from critique.dedup import shingles

DEFAULT_NGRAM = 8
"""Words per n-gram: long enough that shared generic phrasing ("in fewer than 100 words") does not count."""


def ngram_overlap(texts: Sequence[str], references: Sequence[str], n: int = DEFAULT_NGRAM) -> dict[str, Any]:
    """Share of ``texts`` with at least one ``n``-word n-gram of ``references``, the largest share of one text's
    n-grams found there, and the counts."""
    ref = set().union(*(shingles(r, n) for r in references)) if references else set()
    hit, worst = 0, 0.0
    for text in texts:
        grams = shingles(text, n)
        shared = len(grams & ref)
        hit += shared > 0
        worst = max(worst, shared / len(grams) if grams else 0.0)
    return {"ngram": n, "texts": len(texts), "texts_overlapping": hit,
            "share_overlapping": hit / len(texts) if texts else 0.0, "max_overlap_fraction": worst}
