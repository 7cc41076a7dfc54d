"""Benchmark: does a short SFT with `thinking` teach the policy the mode switch?

Trains a policy (default: the embedded smollm2-moe) with ``stages.sft.train_sft`` and ``thinking`` (half the rows
slow, half fast, through the switch its template takes: ours for SmolLM2), then asks the first IFEval prompts (held
out: nothing trains on them) with ``/think`` and with ``/no_think`` through vLLM and reports the switch-following
rates (``stages.eval.modes``): the fraction of ``/think`` answers with reasoning and of ``/no_think`` answers without.

Data: CPython's documentation topics (``benchmarks.sft.python_doc_sft_records``); a slow row's reasoning is the
passage's first half and its final answer the second half (the format is what is learned here, not reasoning).

    python -m benchmarks.thinking [--model smollm2-moe] [--records 64] [--steps 30] [--prompts 32]
                                  [--max-tokens 48] [--learning-rate 2e-4]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.sft import python_doc_sft_records


def thinking_records(n: int) -> list[dict]:
    """SFT records with `reasoning` (the passage's first half) and `final` (its second half)."""
    out = []
    for rec in python_doc_sft_records(n, max_chars=600):
        passage = rec["messages"][-1]["content"]
        cut = passage.rfind(". ", 0, len(passage) // 2) + 1 or len(passage) // 2
        out.append({**rec, "tier": 4, "reasoning": passage[:cut].strip(), "final": passage[cut:].strip() or passage})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-moe")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    ns = parser.parse_args()

    from pipeline.engines.pool import PoolConfig, WorkerPool
    from stages.eval.benchmark import load_prompts
    from stages.eval.modes import switch_answers, switch_rates
    from stages.sft import SFTPhase, SFTStageConfig, train_sft
    from stages.sft.modes import SFTThinking

    cfg = SFTStageConfig(model=ns.model, phases=[SFTPhase(tiers=[4], epochs=100)], max_steps_per_phase=ns.steps,
                         learning_rate=ns.learning_rate, min_learning_rate=ns.learning_rate / 10,
                         per_device_train_batch_size=4, max_length=384, heldout_fraction=0.0,
                         thinking=SFTThinking(think_ratio=0.5), distributed={"backend": "local"})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        metrics = train_sft(thinking_records(ns.records), cfg, Path(tmp) / "model", Path(tmp) / "work")
        train_s = time.perf_counter() - t0
        rows = load_prompts("ifeval", ns.prompts)
        with WorkerPool(PoolConfig(model=str(Path(tmp) / "model"), kv_cache_gib=1, max_model_len=1024)) as pool:
            answers = switch_answers(pool, rows, ns.max_tokens)
    result = {"model": ns.model, "records": ns.records, "steps": ns.steps, "prompts": len(rows),
              "thinking": metrics["thinking"], "train_loss": metrics["phases"][-1].get("train_loss"),
              "train_s": round(train_s, 1), "switch_rates": switch_rates(answers),
              "examples": {a["mode"]: a["text"][:160] for a in answers[::len(rows)]}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
