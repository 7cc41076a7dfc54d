"""Benchmark: our SFT stage's training tokens/s vs a plain TRL SFTTrainer, same model, data and settings.

Both sides train the same model on the same records with the same SFTConfig values (batch, length,
LR, assistant-only loss, router aux-loss coefficient, attention dropout): ours through the stage's
core (``stages.sft.train_sft``: Ray Train worker, MoE dropout hooks, MoE optimizer groups,
expert-load logging, global LR window), the plain one as a bare ``trl.SFTTrainer``.

Both sides get the same allocator settings, so ``ratio`` measures the stage's overhead, not allocator
tuning: plain TRL's process starts with the environment our CPU worker gets (``MALLOC_ARENA_MAX=1``,
``pipeline.training.ray_train.cpu_worker_env``) and trains inside ``pipeline.memory.large_buffers_on_heap``,
as our worker does. ``--plain-untuned`` adds a third side, ``plain_trl_untuned``: the bare trainer with
glibc's defaults (no arena setting, no heap block), reported next to the others but not used in ``ratio``.

Tokens/s is
TRL's own count of trained (non-padding) tokens over the time of the optimizer steps after the
first (the first includes one-off set-up), measured by the same callback on both sides, so start-up
(Ray, model loading, tokenization) is not counted; whole-run figures (``train_runtime``) are printed
too. Runs alternate (plain, ours, plain, ours) to spread machine noise, and each run starts in a fresh
process (ours: the Ray Train worker; plain: a spawned process; not ``--backend local``, which trains in
this one), so no run inherits the heap an earlier one left behind. The last line printed is one JSON object; ``ratio`` is
ours / plain (target >= 0.95).

Hidden dropout (``--hidden-dropout``) is ours only: plain TRL has no such setting. The default, 0.0, is
what ``configs/default.yaml`` trains the embedded policy with, so both sides do the same work; pass
0.2 (the recipe's value) to see what the extra dropout costs.

Data: SFT records built from CPython's documentation topics (``pydoc_data.topics``, shipped with
Python): the user asks about a topic, the assistant answers with a passage of its text.

    python -m benchmarks.sft [--model smollm2-moe] [--steps 8] [--batch 4] [--max-length 256] [--repeats 2]
                             [--backend ray|local|both] [--hidden-dropout 0.0] [--plain-untuned]

The smallest run it accepts (a check that it works, not a measurement):
``--model tiny-moe --steps 2 --batch 1 --max-length 64 --repeats 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def python_doc_sft_records(n: int = 64, max_chars: int = 1200) -> list[dict]:
    """SFT records (the filter stage's format) from CPython's documentation topics, tiers 1-4 by id hash.

    Each record is one documentation passage: user asks for the topic (and part), the assistant turn
    is the passage. Deterministic; no hand-written text.
    """
    from pydoc_data.topics import topics

    out: list[dict] = []
    for name in sorted(topics):
        passages = [p.strip() for p in topics[name].split("\n\n") if len(p.strip()) > 120]
        for j, passage in enumerate(passages):
            rid = hashlib.sha256(f"{name}:{j}".encode()).hexdigest()[:16]
            out.append({
                "id": rid,
                "messages": [
                    {"role": "user", "content": f"What does the Python reference say about '{name}' (part {j + 1})?"},
                    {"role": "assistant", "content": passage[:max_chars]},
                ],
                "tier": 1 + int(rid, 16) % 4,
                "scores": None,
                "seed_id": f"pydoc_data.topics:{name}",
            })
            if len(out) >= n:
                return out
    return out


def _plain_trl(model_path: str, records: list[dict], cfg, out_dir: str, tuned: bool) -> dict:
    """A bare TRL SFTTrainer with the same settings (attention dropout through the model config); ``tuned``:
    training inside ``large_buffers_on_heap``, as our worker trains."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from pipeline.memory import large_buffers_on_heap
    from stages.sft import Throughput, training_chat_template

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(cfg.seed or 0)
    tok = AutoTokenizer.from_pretrained(model_path)
    template = training_chat_template(tok)
    if template:
        tok.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attention_dropout=cfg.moe.attention_dropout)
    args = SFTConfig(
        output_dir=out_dir, max_steps=cfg.max_steps_per_phase, per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": cfg.min_learning_rate / cfg.learning_rate},
        warmup_steps=cfg.warmup_ratio, max_length=cfg.max_length, packing=cfg.packing,
        assistant_only_loss=True, gradient_checkpointing=cfg.gradient_checkpointing, bf16=False, use_cpu=True,
        logging_steps=cfg.logging_steps, save_strategy="no", report_to=[], seed=cfg.seed or 0,
        router_aux_loss_coef=cfg.moe.router_aux_loss_coef, disable_tqdm=True, dataloader_num_workers=0,
    )
    ds = Dataset.from_list([{"messages": r["messages"]} for r in records])
    clock = Throughput()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock.callback])
    clock.trainer = trainer
    with large_buffers_on_heap() if tuned else contextlib.nullcontext():
        result = trainer.train()
    tokens = int(trainer._total_train_tokens)
    runtime = float(result.metrics["train_runtime"])
    out = {"train_tokens": tokens, "train_runtime_s": runtime, "train_tokens_per_s": tokens / runtime,
           "steady_tokens": clock.tokens, "steady_s": clock.seconds, "steps": trainer.state.global_step,
           "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX")}
    del trainer, model
    gc.collect()
    return out


def _plain_trl_fresh_process(model_path: str, records: list[dict], cfg, out_dir: str, tuned: bool) -> dict:
    """``_plain_trl`` in a spawned process: a fresh heap for each run, like our side's Ray Train worker. Tuned:
    the process starts with our CPU worker's environment (one malloc arena); untuned: with no arena setting."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.executor import environment
    from pipeline.training.ray_train import cpu_worker_env

    env = cpu_worker_env(use_gpu=False) if tuned else {"MALLOC_ARENA_MAX": None}
    with environment(env), ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_plain_trl, model_path, records, cfg, out_dir, tuned).result()


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-moe")
    parser.add_argument("--steps", type=_at_least(2), default=8,
                        help="optimizer steps per run (at least 2: the first step is not measured)")
    parser.add_argument("--batch", type=_at_least(1), default=4)
    parser.add_argument("--max-length", type=_at_least(64), default=256,
                        help="at least 64: shorter rows cut off the assistant turn of every record")
    parser.add_argument("--repeats", type=_at_least(1), default=2, help="runs per side (alternating)")
    parser.add_argument("--backend", default="ray", choices=["ray", "local", "both"],
                        help="how our stage runs its trainer (ray: the stage's default Ray Train job)")
    parser.add_argument("--hidden-dropout", type=float, default=0.0,
                        help="our side's hidden dropout (plain TRL has none); 0.0 as configs/default.yaml trains")
    parser.add_argument("--plain-untuned", action="store_true",
                        help="also run plain TRL with glibc's default allocator settings (not part of the ratio)")
    ns = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import torch

    from pipeline.models.catalog import resolve_model
    from pipeline.training.moe_config import MoETrainingConfig
    from stages.sft import SFTPhase, SFTStageConfig, train_sft

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model_path = str(resolve_model(ns.model))
    # Enough records that each run takes `steps` full batches of fresh data, no held-out split.
    records = python_doc_sft_records(ns.steps * ns.batch)
    for r in records:
        r["tier"] = 4  # one phase over everything: the same data as the plain trainer
    cfg = SFTStageConfig(
        model=model_path, phases=[SFTPhase(tiers=[4], epochs=1)], max_steps_per_phase=ns.steps,
        per_device_train_batch_size=ns.batch, max_length=ns.max_length, heldout_fraction=0.0,
        logging_steps=max(1, ns.steps // 2), warmup_ratio=0.0, seed=0,
        moe=MoETrainingConfig(hidden_dropout=ns.hidden_dropout),
        distributed={"backend": "ray" if ns.backend == "both" else ns.backend},
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    ours = ["ours_ray", "ours_local"] if ns.backend == "both" else [f"ours_{ns.backend}"]
    sides = ["plain_trl", *ours] + (["plain_trl_untuned"] if ns.plain_untuned else [])
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    try:
        if "ours_ray" in sides:
            # In a pipeline run Ray is up long before SFT starts; here the first job would also pay for
            # starting the cluster (raylet, dashboard, prestarted workers) while it trains. Warm it with
            # one short job on the tiny model, not measured.
            t0 = time.time()
            warm = cfg.model_copy(update={"model": str(resolve_model("tiny-moe")), "max_steps_per_phase": 1})
            train_sft(records[:8], warm, tmp / "warm" / "model", tmp / "warm" / "work")
            print(f"Ray warm-up job: {time.time() - t0:.0f}s", flush=True)
        for i in range(ns.repeats):
            for side in sides:  # alternate the sides, so slow phases of a shared machine hit both
                t0 = time.time()
                if side.startswith("plain_trl"):
                    r = _plain_trl_fresh_process(model_path, records, cfg, str(tmp / f"{side}{i}"),
                                                 tuned=side == "plain_trl")
                else:
                    run_cfg = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(
                        update={"backend": side.removeprefix("ours_")})})
                    m = train_sft(records, run_cfg, tmp / f"{side}{i}" / "model", tmp / f"{side}{i}" / "work")
                    r = {"train_tokens": m["train_tokens"], "train_runtime_s": m["train_runtime_s"],
                         "steady_tokens": sum(p["steady_tokens"] for p in m["phases"]),
                         "steady_s": sum(p["steady_s"] for p in m["phases"])}
                runs[side].append(r)
                print(f"{side} run {i}: {r['train_tokens']} tokens in {r['train_runtime_s']:.1f}s "
                      f"({r['train_tokens'] / r['train_runtime_s']:.1f} tok/s); after the first step "
                      f"{r['steady_tokens']} tokens in {r['steady_s']:.1f}s "
                      f"({r['steady_tokens'] / r['steady_s']:.1f} tok/s); wall {time.time() - t0:.0f}s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(json.dumps(_result(ns, cfg, runs, ours)))


def _result(ns: argparse.Namespace, cfg, runs: dict[str, list[dict]], ours: list[str]) -> dict:
    """The benchmark's JSON line: tokens/s of every side and each side's ratio to (tuned) plain TRL."""
    import torch

    def rate(side: str, steady: bool = True) -> float:
        tok, sec = ("steady_tokens", "steady_s") if steady else ("train_tokens", "train_runtime_s")
        return sum(r[tok] for r in runs[side]) / sum(r[sec] for r in runs[side])

    result = {"benchmark": "sft_train_tokens_per_s", "model": ns.model, "steps_per_run": ns.steps,
              "batch": ns.batch, "max_length": ns.max_length, "repeats": ns.repeats,
              "ours_hidden_dropout": ns.hidden_dropout, "attention_dropout": cfg.moe.attention_dropout,
              "plain_trl_allocator": "MALLOC_ARENA_MAX=1 + large_buffers_on_heap (as our worker)",
              "plain_trl_malloc_arena_max": runs["plain_trl"][0]["malloc_arena_max"],
              "plain_trl_tokens_per_s": round(rate("plain_trl"), 2)}
    for side in [s for s in runs if s != "plain_trl"]:
        result[f"{side}_tokens_per_s"] = round(rate(side), 2)
        result[f"{side}_ratio"] = round(rate(side) / rate("plain_trl"), 4)
        result[f"{side}_ratio_whole_run"] = round(rate(side, False) / rate("plain_trl", False), 4)
    if "plain_trl_untuned" in runs:
        result["plain_trl_untuned_allocator"] = "glibc defaults (no MALLOC_ARENA_MAX, no large_buffers_on_heap)"
    result["ratio"] = result[f"{ours[0]}_ratio"]
    result.update({"target": 0.95, "meets_target": result["ratio"] >= 0.95, "threads": torch.get_num_threads(),
                   "machine": platform.machine(), "device": "cpu", "load_avg_1m_at_end": os.getloadavg()[0]})
    return result

if __name__ == "__main__":
    main()
