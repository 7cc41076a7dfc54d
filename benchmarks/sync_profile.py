"""Where the engine side of a weight sync goes, through each transport.

    python -m benchmarks.sync_profile [--model smollm2-moe] [--repeats 2]

Loads the model into a raw in-process ``vllm.LLM`` with our worker extension (the layout of the pool's
engine actors) and exports the transformers model's weights once. Then:

- object store path: profiles ``posttrain_load_weights`` (vLLM's in-place reload plus our CPU MoE repack)
  with cProfile and takes the time of the kernels that *prepare* weights for vLLM's CPU GEMMs
  (``create_onednn_mm_handler``: one oneDNN handle per linear layer; ``prepack_moe_weight``: the CPU MoE
  kernel's layout) and of tensor copies; the rest is vLLM's layerwise reload machinery.
- shared-memory path: writes the weights into a segment laid out by the engine and times
  ``posttrain_load_shared`` (no profiler: it reports seconds per slot kind itself).

Both are compared with a plain copy of the same bytes into pre-touched buffers (``benchmarks.generation``'s
``copy_s``). On a GPU engine there is no prepack step. The last line printed is one JSON object.
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
    from pipeline.engines.engine import WORKER_EXTENSION
    from pipeline.engines.sync.tensors import checkpoint_format_tensors, payload_bytes
    from pipeline.models.catalog import resolve_model

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
    shared = _shared_loads(llm, model, args.repeats)
    for k, v in {**med, **shared}.items():
        print(f"{k}: {v:.3f}s", flush=True)
    print(json.dumps({
        "benchmark": "weight_sync_profile", "model": args.model, "bytes": n_bytes,
        "reload": {**med, "prepack_s": round(prepack_s, 3)}, "shared": shared, "copy_s": round(copy_s, 3),
        "reload_load_vs_copy": round(med["load_s_profiled"] / copy_s, 2),
        "shared_load_vs_copy": round(shared["load_s"] / copy_s, 2),
        "threads": torch.get_num_threads(), "machine": platform.machine(), "device": "cpu",
    }))


def _shared_loads(llm, model, repeats: int) -> dict:
    """Median engine-side seconds of the shared-memory path (after two warm-up loads, the first of which
    checks itself against vLLM's reload), total and per slot kind."""
    import torch

    from pipeline.engines.sync.shared_memory import SharedSegment
    from pipeline.engines.sync.tensors import checkpoint_views

    with checkpoint_views(model) as views:
        plan = llm.collective_rpc("posttrain_shared_plan", args=({n: tuple(t.shape) for n, t in views},))[0]
        segment = SharedSegment(plan["nbytes"])
        segment.write(views, plan["layout"], getattr(torch, plan["dtype"]))
    try:
        runs = [llm.collective_rpc("posttrain_load_shared", args=(segment.path, segment.nbytes, i == 0))[0]
                for i in range(2 + repeats)][2:]
    finally:
        segment.close()
    out = {"load_s": round(statistics.median(r["seconds"] for r in runs), 3)}
    for kind in runs[0]["parts_s"]:
        out[f"{kind}_slots_s"] = round(statistics.median(r["parts_s"][kind] for r in runs), 3)
    return out


if __name__ == "__main__":
    main()
