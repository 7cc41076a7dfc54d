"""How well the critic's tiers separate answers of known quality, per critic setting, side by side.

    python -m benchmarks.critic [--model smollm2-135m-instruct] [--items 16] [--variants default,no_few_shot,...]

One vLLM engine serves the critic; every variant grades the same known-quality set (``critique.calibration``:
references, truncated, wrong-facts, off-topic and constraint-violating answers to CPython docstring questions).
Variants (``VARIANTS``) change only ``CritiqueConfig`` fields. Last line, JSON: per variant the AUC (reference vs
corrupted tiers), the AUC per corruption, the mean tier per kind, the ungraded count and the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time

VARIANTS: dict[str, dict] = {
    "default": {},
    "no_few_shot": {"few_shot": False},
    "median_of_5": {"samples": 5, "temperature": 0.8},
}
"""Variant name -> ``CritiqueConfig`` fields it sets."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from critique.calibration import calibration_figures, grade_known, known_quality_set
    from critique.grade import CritiqueConfig
    from pipeline.engines.pool import PoolConfig, WorkerPool

    answers = known_quality_set(args.items, args.seed)
    out = {"benchmark": "critic", "model": args.model, "items": args.items, "answers": len(answers), "variants": {}}
    with WorkerPool(PoolConfig(model=args.model, max_model_len=2048, kv_cache_gib=1)) as pool:
        for name in args.variants.split(","):
            t0 = time.perf_counter()
            graded = grade_known(answers, pool, CritiqueConfig(**VARIANTS[name]), args.seed)
            figures = calibration_figures(graded)
            out["variants"][name] = {**figures, "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{name}: auc {figures['auc']} mean tier {figures['mean_tier']}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
