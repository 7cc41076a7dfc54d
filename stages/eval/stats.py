"""Paired bootstrap of an accuracy difference between two models answering the same prompts.

SciPy's ``stats.bootstrap`` does the resampling (``paired=True``: one draw of prompts, applied to both models), with
the percentile interval: it stays defined when the two models agree on every prompt (a zero-width interval at 0),
where the BCa interval is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict


class Gain(TypedDict):
    gain: float
    """Accuracy of the model minus accuracy of the baseline, on the same prompts."""
    ci_low: float | None
    """Lower end of the confidence interval (None with fewer than two prompts)."""
    ci_high: float | None
    """Upper end of the confidence interval (None with fewer than two prompts)."""


def paired_bootstrap(model_hits: Sequence[float], base_hits: Sequence[float], counts: Sequence[float] | None = None,
                     *, samples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> Gain:
    """Difference of ``sum(hits) / sum(counts)`` between a model and a baseline over the same prompts, with a
    percentile bootstrap interval that resamples prompts (the same draw for both).

    ``model_hits[i]`` and ``base_hits[i]`` are what each got right on prompt ``i`` (1/0 for a prompt-level verdict,
    the number of instructions followed for an instruction-level one); ``counts[i]`` is what there was to get right
    (default 1 per prompt). The same ``seed`` gives the same interval."""
    import numpy as np
    from scipy.stats import bootstrap

    a, b = np.asarray(model_hits, dtype=float), np.asarray(base_hits, dtype=float)
    c = np.ones_like(a) if counts is None else np.asarray(counts, dtype=float)
    if not (a.shape == b.shape == c.shape) or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs one value per prompt for both models (and counts): got shapes "
                         f"{a.shape}, {b.shape}, {c.shape}")
    if not len(a) or c.sum() <= 0:
        raise ValueError("paired_bootstrap needs at least one prompt with something to get right")

    def difference(x, y, n, axis=-1):
        total = n.sum(axis=axis)
        return x.sum(axis=axis) / total - y.sum(axis=axis) / total

    gain = float(difference(a, b, c))
    if len(a) < 2:
        return Gain(gain=gain, ci_low=None, ci_high=None)
    res = bootstrap((a, b, c), difference, paired=True, vectorized=True, method="percentile", n_resamples=samples,
                    confidence_level=confidence, rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return Gain(gain=gain, ci_low=float(low), ci_high=float(high))
