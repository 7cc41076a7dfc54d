"""Where the engine side of a weight sync goes, and the least a sync can cost on this machine.

    python -m benchmarks.sync_profile [--model smollm2-moe] [--repeats 2]

Loads the model into a raw in-process ``vllm.LLM`` with our worker extension (the layout of the pool's
engine actors), exports the transformers model's weights once, and profiles ``posttrain_load_weights``
(vLLM's in-place reload plus our CPU MoE repack) with cProfile. From the profile it takes the time of the
kernels that *prepare* weights for vLLM's CPU GEMMs (``create_onednn_mm_handler``: one oneDNN handle per
linear layer; ``prepack_moe_weight``: the CPU MoE kernel's layout) and of tensor copies, and compares them
with a plain in-memory copy of the same bytes (``benchmarks.generation``'s ``copy_s``).

``floor_vs_copy`` = (prepack seconds + one copy of the bytes) / copy seconds: what any sync into these
engines must spend at least (the engine has to receive the bytes once and prepack them), i.e. the best
``sync_vs_copy`` that bypassing vLLM's reload machinery and Ray's object store could reach. On a GPU engine
there is no prepack step. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import time


def _builtin_seconds(stats: pstats.Stats, fragment: str) -> float:
    """Total own time of the profiled functions whose name contains ``fragment``."""
    return sum(row[2] for (_, _, name), row in stats.stats.items() if fragment in name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-moe")
    ap.add_argument("--repeats", type=int, default=2, help="profiled loads (after one warm-up)")
    args = ap.parse_args()
    # the pool's engine layout on CPU: engine core in this process, float32, eager
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM

    from benchmarks.generation import plain_copy_seconds
    from pipeline.models import resolve_model
    from pipeline.pool import WORKER_EXTENSION
    from pipeline.weight_sync import checkpoint_format_tensors, payload_bytes

    path = str(resolve_model(args.model))
    llm = LLM(model=path, worker_extension_cls=WORKER_EXTENSION, dtype="float32", max_model_len=512,
              enforce_eager=True, enable_chunked_prefill=False, disable_log_stats=True, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    named = checkpoint_format_tensors(model, torch.float32)
    n_bytes = payload_bytes(named)
    llm.collective_rpc("posttrain_load_weights", args=(named,))  # warm-up

    runs = []
    for _ in range(args.repeats):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        llm.collective_rpc("posttrain_load_weights", args=(named,))
        prof.disable()
        wall = time.perf_counter() - t0
        stats = pstats.Stats(prof)
        runs.append({
            "load_s_profiled": wall,
            "onednn_handles_s": _builtin_seconds(stats, "create_onednn_mm_handler"),
            "moe_prepack_s": _builtin_seconds(stats, "prepack_moe_weight"),
            "tensor_copies_s": _builtin_seconds(stats, "'copy_'"),
        })
    copy_s = plain_copy_seconds([t for _, t in named])
    med = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    prepack_s = med["onednn_handles_s"] + med["moe_prepack_s"]
    for k, v in med.items():
        print(f"{k}: {v:.3f}s", flush=True)
    print(json.dumps({
        "benchmark": "weight_sync_profile", "model": args.model, "bytes": n_bytes, **med,
        "prepack_s": round(prepack_s, 3), "copy_s": round(copy_s, 3),
        "prepack_vs_copy": round(prepack_s / copy_s, 2),
        "floor_vs_copy": round((prepack_s + copy_s) / copy_s, 2), "target_sync_vs_copy": 5,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "device": "cpu",
    }))


if __name__ == "__main__":
    main()
