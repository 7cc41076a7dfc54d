"""Generation and weight-sync throughput, side by side in one run.

    python -m benchmarks.generation [--model smollm2-moe] [--prompts 32] [--max-tokens 128]

All three generators get the same prompts, the same count and the same warm-up (the first ``WARMUP`` prompts,
generated once before the timed run).

Figures (last line, JSON):
- pool_vs_raw: tokens/s of our WorkerPool (a vLLM engine in a Ray actor) / tokens/s of a raw
  ``vllm.LLM`` on the same prompts, sampling params and per-request seeds (so both produce the
  same tokens). Target >= 0.90.
- vllm_vs_hf: raw vLLM tokens/s / transformers ``generate`` tokens/s: one batch of all prompts, the same
  sampling parameters (transformers has no per-request seed, so its samples, and their lengths, differ).
- sync_vs_copy: seconds to push the model's weights into the running engine (the pool's default
  transport: shared memory on a CPU engine) / seconds for a plain in-memory copy of the same bytes.
  Target <= 5. object_store_vs_copy: the same through Ray's object store and vLLM's reload_weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

WARMUP = 2
"""Prompts each generator runs once before it is timed (compilation, allocator, caches)."""


def _prompts(k: int) -> list[list[dict]]:
    from pydoc_data.topics import topics

    names = sorted(topics)[:: max(1, len(topics) // k)][:k]
    return [[{"role": "user", "content": f"Explain the Python topic '{n}' with an example."}] for n in names]


def bench_raw_vllm(path: str, prompts, max_tokens: int, temperature: float, top_p: float) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # same engine layout as the pool's actors
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=64,
              seed=0, disable_log_stats=True)
    params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=i)
              for i in range(len(prompts))]
    llm.chat(prompts[:WARMUP], params[:WARMUP], use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.chat(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return {"tokens": tokens, "seconds": dt, "tok_s": tokens / dt}


def bench_pool(path: str, prompts, max_tokens: int, temperature: float, top_p: float):
    from pipeline.engines.pool import ChatRequest, PoolConfig, WorkerPool

    pool = WorkerPool(PoolConfig(model=path, dtype="float32", max_model_len=2048, max_num_seqs=64, kv_cache_gib=2))
    reqs = [ChatRequest(messages=m, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=i)
            for i, m in enumerate(prompts)]
    pool.generate(reqs[:WARMUP])
    t0 = time.perf_counter()
    res = pool.generate(reqs)
    dt = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for r in res for c in r.completions)
    return pool, {"tokens": tokens, "seconds": dt, "tok_s": tokens / dt}


def bench_hf(path: str, prompts, max_tokens: int, temperature: float, top_p: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]

    def generate(batch_texts: list[str]):
        batch = tok(batch_texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id)
        return out[:, batch["input_ids"].shape[1]:]

    torch.manual_seed(0)
    generate(texts[:WARMUP])
    t0 = time.perf_counter()
    gen = generate(texts)
    dt = time.perf_counter() - t0
    # count tokens up to and including the first EOS, as vLLM does
    eos = tok.eos_token_id
    tokens = 0
    for row in gen.tolist():
        tokens += (row.index(eos) + 1) if eos in row else len(row)
    gc.collect()
    return {"tokens": tokens, "seconds": dt, "tok_s": tokens / dt}


def plain_copy_seconds(tensors: list, repeats: int = 3) -> float:
    """Median seconds to copy ``tensors`` into buffers allocated and touched beforehand: the plain in-memory
    copy a weight sync is compared with. Pre-touched, so the figure is the copy alone: a copy into fresh
    memory also pays its page faults, whose cost varies with what the heap held (the stricter baseline makes
    the ratio larger, not smaller)."""
    import torch

    dst = [torch.empty_like(t) for t in tensors]
    for d in dst:
        d.zero_()
    copies = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for d, t in zip(dst, tensors, strict=True):
            d.copy_(t)
        copies.append(time.perf_counter() - t0)
    return statistics.median(copies)


def bench_sync(pool, path: str, repeats: int = 3) -> dict:
    """Sync seconds through the pool's default transport and through Ray's object store, side by side."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.engines.sync.tensors import checkpoint_format_tensors

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {}
    for key, transport in (("default", None), ("object_store", "object_store")):
        # warm-up; through shared memory the pool's first sync also checks itself against vLLM's reload
        pool.sync_weights(model, transport=transport)
        runs = [pool.sync_weights(model, transport=transport) for _ in range(repeats)]
        parts = {k: round(statistics.median(r[k] for r in runs), 3) for k in ("export_s", "put_s", "load_s", "engine_load_s")}
        out[key] = {"sync_s": statistics.median(r["total_s"] for r in runs), "transport": runs[0]["transport"],
                    "bytes": runs[0]["bytes"], **parts}
    out["copy_s"] = plain_copy_seconds([t for _, t in checkpoint_format_tensors(model, torch.float32)], repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-moe")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    args = ap.parse_args()

    from pipeline.executor import ensure_ray
    from pipeline.models.catalog import resolve_model

    path = str(resolve_model(args.model))
    prompts = _prompts(args.prompts)
    sampling = (args.max_tokens, args.temperature, args.top_p)
    raw = bench_raw_vllm(path, prompts, *sampling)
    print("raw vLLM:", raw, flush=True)
    hf = bench_hf(path, prompts, *sampling)
    print("transformers generate:", hf, flush=True)
    ensure_ray()
    pool, pooled = bench_pool(path, prompts, *sampling)
    print("pool:", pooled, flush=True)
    try:
        sync = bench_sync(pool, path)
        print("sync:", sync, flush=True)
    finally:
        pool.shutdown()
    result = {
        "benchmark": "generation",
        "model": args.model,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "prompts": len(prompts),
        "warmup_prompts": WARMUP,
        "max_tokens": args.max_tokens,
        "raw_vllm_tok_s": round(raw["tok_s"], 1),
        "pool_tok_s": round(pooled["tok_s"], 1),
        "hf_tok_s": round(hf["tok_s"], 1),
        "same_tokens": raw["tokens"] == pooled["tokens"],
        "pool_vs_raw": round(pooled["tok_s"] / raw["tok_s"], 3),
        "vllm_vs_hf": round(raw["tok_s"] / hf["tok_s"], 2),
        "sync_transport": sync["default"]["transport"],
        "sync_s": round(sync["default"]["sync_s"], 3),
        "copy_s": round(sync["copy_s"], 3),
        "sync_bytes": sync["default"]["bytes"],
        "sync_parts_s": {k: sync["default"][k] for k in ("export_s", "put_s", "load_s", "engine_load_s")},
        "sync_vs_copy": round(sync["default"]["sync_s"] / sync["copy_s"], 2),
        "object_store_sync_s": round(sync["object_store"]["sync_s"], 3),
        "object_store_vs_copy": round(sync["object_store"]["sync_s"] / sync["copy_s"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
