"""The answer stage's generation throughput vs a raw ``vllm.LLM``, side by side in one run.

    python -m benchmarks.stages [--model smollm2-135m-instruct] [--instructions 32] [--k 2] [--max-tokens 128]
                                [--pool-cpus N]

Both sides answer the same instructions with the same messages (the answer stage's per-domain
suffixes included), the same sampling parameters, the same ``n`` (k for objective domains) and
the same per-request seeds, so they do the same work:

- ours: ``stages.answer.answer_instructions`` on a ``WorkerPool`` (a vLLM engine in a Ray actor):
  request building, routing, the Ray round trip and the answer records;
- raw: ``vllm.LLM.chat`` in this process with the pool's engine arguments.

Instructions are real questions from the XZ Utils FAQ plus requests about CPython's documentation
topics, labelled by the taxonomy. Each side runs ``--repeats`` times, alternating, and the best
run counts. Figures (last line, JSON): answer_vs_raw = our tokens/s / raw tokens/s (target >= 0.90);
answer_vs_pool and pool_vs_raw split it into the stage's own overhead and the worker pool's (the
same requests sent with ``WorkerPool.generate`` directly).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time


def _instructions(n: int) -> list[dict]:
    from pydoc_data.topics import topics

    from stages.generate import instruction_id
    from stages.seeds import SeedSource, SkipLog, default_sources, load_documents
    from stages.taxonomy import label_domain, load_taxonomy

    faq = next(s for s in default_sources() if s.kind == "web_qa")
    questions = [d.question for d in load_documents(SeedSource(**faq.model_dump()), SkipLog())]
    names = sorted(topics)
    questions += [f"Write a Python function that demonstrates {name.replace('-', ' ')}." for name in names]
    tax = load_taxonomy()
    out = []
    for text in questions[:n]:
        out.append({"id": instruction_id(text), "instruction": text, "domain": label_domain(text, tax, "qa"),
                    "task_type": "qa", "seed_id": "bench", "source_kind": "web_qa", "parent_id": None,
                    "operator": None, "round": 0, "model": "bench", "template": "bench"})
    return out


def _raw_requests(records, cfg):
    """The exact messages and sampling params the answer stage sends, as vLLM objects."""
    from vllm import SamplingParams

    from pipeline.run.stage import record_seed
    from pipeline.templates import chat_messages
    from stages.answer import load_answer_prompts
    from stages.taxonomy import load_taxonomy

    system, suffixes = load_answer_prompts(cfg.prompts)
    objective = load_taxonomy(cfg.taxonomy).objective_domains()
    convs, params = [], []
    for rec in records:
        suffix = suffixes.get(rec["domain"], "")
        convs.append(chat_messages(system, f"{rec['instruction']}\n\n{suffix}" if suffix else rec["instruction"]))
        params.append(SamplingParams(n=cfg.k if rec["domain"] in objective else 1, temperature=cfg.temperature,
                                     top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                     seed=record_seed(0, rec["id"], "answer")))
    return convs, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--instructions", type=int, default=32)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pool-cpus", type=float, default=float(os.cpu_count() or 1),
                    help="Ray CPUs of the pool's engine actor. Ray sets the actor's OMP_NUM_THREADS from it, "
                         "which caps the engine's compute threads; the default gives it the cores the raw engine "
                         "in this process uses (the machine's)")
    args = ap.parse_args()

    from pipeline.engines.pool import ChatRequest, PoolConfig, WorkerPool
    from pipeline.executor import ensure_ray
    from pipeline.models.catalog import resolve_model
    from stages.answer import AnswerConfig, answer_instructions

    path = str(resolve_model(args.model))
    records = _instructions(args.instructions)
    cfg = AnswerConfig(k=args.k, max_tokens=args.max_tokens)
    pool_cfg = PoolConfig(model=path, dtype="float32", max_model_len=2048, max_num_seqs=64, kv_cache_gib=2,
                          num_cpus_per_worker=args.pool_cpus)

    ensure_ray()
    pool = WorkerPool(pool_cfg)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # same engine layout as the pool's actors
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(pool_cfg.kv_cache_gib)
    from vllm import LLM

    llm = LLM(model=path, **pool._engine_args)  # the pool's own engine arguments
    convs, params = _raw_requests(records, cfg)
    answer_instructions(records[:2], cfg, lambda role: pool, run_seed=0)  # warm-up both
    llm.chat(convs[:2], params[:2], use_tqdm=False)

    ours, raw, pooled = [], [], []
    same_tokens = True
    pool_requests = [ChatRequest(messages=m, n=p.n, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                                 seed=p.seed) for m, p in zip(convs, params, strict=True)]
    for _ in range(args.repeats):
        # the pool alone (no stage code): splits the gap into stage overhead and pool overhead
        t0 = time.perf_counter()
        res = pool.generate(pool_requests)
        dt = time.perf_counter() - t0
        pool_tokens = sum(len(c.token_ids) for r in res for c in r.completions)
        pooled.append({"tokens": pool_tokens, "seconds": dt, "tok_s": pool_tokens / dt})
        print("pool.generate:", pooled[-1], flush=True)
        t0 = time.perf_counter()
        answers = answer_instructions(records, cfg, lambda role: pool, run_seed=0)
        dt = time.perf_counter() - t0
        ours_tokens = sum(r["n_tokens"] for a in answers for r in a["responses"])
        ours.append({"tokens": ours_tokens, "seconds": dt, "tok_s": ours_tokens / dt})
        print("answer stage:", ours[-1], flush=True)
        t0 = time.perf_counter()
        outs = llm.chat(convs, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        raw_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        raw.append({"tokens": raw_tokens, "seconds": dt, "tok_s": raw_tokens / dt})
        print("raw vLLM:", raw[-1], flush=True)
        same_tokens &= ours_tokens == raw_tokens == pool_tokens
    pool.shutdown()
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    best_pool = max(r["tok_s"] for r in pooled)
    best_ours = max(r["tok_s"] for r in ours)
    best_raw = max(r["tok_s"] for r in raw)
    result = {
        "benchmark": "stages.answer",
        "model": args.model,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "instructions": len(records),
        "responses": sum(p.n for p in params),
        "max_tokens": args.max_tokens,
        "pool_cpus": args.pool_cpus,
        "answer_tok_s": round(best_ours, 1),
        "raw_vllm_tok_s": round(best_raw, 1),
        "same_tokens": same_tokens,
        "pool_tok_s": round(best_pool, 1),
        "answer_vs_pool": round(best_ours / best_pool, 3),
        "pool_vs_raw": round(best_pool / best_raw, 3),
        "answer_vs_raw": round(best_ours / best_raw, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
