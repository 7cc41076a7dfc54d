"""Online DPO's training on a Ray Train job against the in-process trainer, on the same work in one run.

    python -m benchmarks.dpo_distributed [--policy smollm2-moe] [--workers 2] [--engines 2] [--pairs 16]
                                         [--repeats 2]

Parts, each measured side by side here:

- train: one round on the same ``--pairs`` preference pairs (about CPython's docstrings, ``reward.stdlib_pairs``)
  with the same settings: TRL's DPOTrainer in this process (``distributed.backend: local``, gradient accumulation
  N) and the cluster step on N FSDP2 Ray Train CPU workers (gloo, accumulation 1): the same micro-batches, the
  same optimizer steps. ``train_local_s`` / ``train_ray_s`` (median of ``--repeats`` rounds each; round 1 of
  each side is also its warm-up of allocator and threads, so the median of 2 is the slower) and
  ``ray_vs_local`` = local seconds / Ray seconds (above 1: the job is faster). On this machine the N workers
  share its cores: the figure is the job's overhead, not a scaling result.
- step_equality: one SGD step of N workers against one process with N x accumulation from the same weights:
  ``distributed_step_max_param_diff`` (float32 rounding when the distributed logic is right; the step moved the
  weights by ``step_max_param_change``).
- sync: the job's weights into a pool of ``--engines`` vLLM CPU engines through the collective transport
  (rank 0 of the job sends over gloo, every worker gathers its shards first: ``collective_from_job_sync_s``),
  and the same weights from this process through each transport (``collective_sync_s``,
  ``shared_memory_sync_s``, ``object_store_sync_s``); each against a plain copy of the same bytes
  (``*_vs_copy``), median of ``--repeats``.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def _ray_cfg(base: dict, workers: int, **extra) -> dict:
    return {**base, **extra, "distributed": {"backend": "ray", "num_workers": workers, "strategy": "fsdp2"}}


def train_comparison(policy: str, pairs: list[dict], sft: list[dict], base: dict, workers: int, repeats: int,
                     work: Path) -> dict:
    """Seconds of one round in this process (TRL) and on the job, the same micro-batches and optimizer steps."""
    from stages.dpo import OnlineDPOConfig
    from stages.dpo.cluster.job import ClusterRoundTrainer
    from stages.dpo.local import LocalRoundTrainer

    out: dict = {"local": [], "ray": []}
    for side in ("local", "ray"):
        (work / side).mkdir(parents=True, exist_ok=True)
    local = LocalRoundTrainer(policy, work / "local", 0, sft,
                              OnlineDPOConfig(**base, gradient_accumulation_steps=workers))
    for r in range(1, repeats + 1):
        t0 = time.perf_counter()
        m = local.train(r, pairs, seed=r)
        out["local"].append(time.perf_counter() - t0)
        out.setdefault("local_steps", m["train_steps"])
    del local
    ray_trainer = ClusterRoundTrainer(OnlineDPOConfig(**_ray_cfg(base, workers)), policy, sft, work / "ray", 0,
                                      lambda: None)
    try:
        for r in range(1, repeats + 1):
            t0 = time.perf_counter()
            m = ray_trainer.train(r, pairs, seed=r)
            out["ray"].append(time.perf_counter() - t0)
            out.setdefault("ray_steps", m["train_steps"])
    except BaseException:
        ray_trainer.close()
        raise
    local_s, ray_s = statistics.median(out["local"]), statistics.median(out["ray"])
    return {"trainer": ray_trainer, "train_local_s": local_s, "train_ray_s": ray_s, "ray_vs_local": local_s / ray_s,
            "train_local_rounds_s": out["local"], "train_ray_rounds_s": out["ray"],
            "train_steps_local": out["local_steps"], "train_steps_ray": out["ray_steps"]}


def step_equality(policy: str, pairs: list[dict], sft: list[dict], base: dict, workers: int, work: Path) -> dict:
    """Max parameter difference after one SGD step: N workers vs one process with N x accumulation."""
    from safetensors.torch import load_file

    from stages.dpo import OnlineDPOConfig
    from stages.dpo.cluster.job import ClusterRoundTrainer
    from stages.dpo.cluster.worker import RoundWorker

    sgd = {**base, "optim": "sgd", "learning_rate": 0.05, "epochs_per_round": 1}
    few = pairs[: workers * base["batch_size"]]  # exactly one optimizer step on both sides
    job = ClusterRoundTrainer(OnlineDPOConfig(**_ray_cfg(sgd, workers)), policy, sft, work / "eq", 0, lambda: None)
    try:
        job.train(1, few, seed=5)
        job.export(work / "eq_ray")
    finally:
        job.close()
    single = RoundWorker({"config": {**sgd, "gradient_accumulation_steps": workers}, "sft_path": policy, "seed": 0,
                         "sft_rows": sft})
    single.train(few, seed=5, round_index=1)
    single.export(str(work / "eq_one"))
    del single
    a = load_file(str(work / "eq_ray" / "model.safetensors"))
    b = load_file(str(work / "eq_one" / "model.safetensors"))
    start = load_file(str(Path(policy) / "model.safetensors"))
    return {"distributed_step_max_param_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
            "step_max_param_change": max(float((a[k] - start[k]).abs().max()) for k in a)}


def sync_comparison(pool, model, repeats: int, trainer=None) -> dict:
    """Seconds to sync ``model``'s weights into ``pool`` through each transport from this process (and, with a
    ``ClusterRoundTrainer``, through the collective from its job's rank 0), each also / a plain copy of the same
    bytes. Median of ``repeats`` after a first sync per transport (it builds the group or segment, or runs the
    first-sync check): ``<name>_sync_s``, ``<name>_sync_first_s``, ``<name>_vs_copy``."""
    import torch

    from benchmarks.generation import plain_copy_seconds
    from pipeline.engines.sync.tensors import checkpoint_format_tensors

    tensors = [t for _, t in checkpoint_format_tensors(model, torch.float32)]
    copy_s = plain_copy_seconds(tensors)
    times: dict[str, list[float]] = {}
    first: dict[str, float] = {}

    def measure(names: tuple[str, ...]) -> None:
        for i in range(repeats + 1):
            for name in names:
                t0 = time.perf_counter()
                if name == "collective_from_job":
                    trainer.sync(pool)
                else:
                    pool.sync_weights(model, transport=name)
                seconds = time.perf_counter() - t0
                if i:
                    times.setdefault(name, []).append(seconds)
                else:
                    first[name] = seconds

    if trainer is not None:  # a collective group has one sender: the job's rank 0 first, then this process
        measure(("collective_from_job",))
        pool.reset_sync()
    measure(("collective", "shared_memory", "object_store"))
    out = {"sync_bytes": sum(t.numel() * t.element_size() for t in tensors), "copy_s": copy_s}
    for name, xs in times.items():
        out[f"{name}_sync_s"] = statistics.median(xs)
        out[f"{name}_sync_first_s"] = first[name]
        out[f"{name}_vs_copy"] = statistics.median(xs) / copy_s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="smollm2-moe")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.engines.pool import PoolConfig, WorkerPool
    from pipeline.executor import ensure_ray
    from pipeline.models.catalog import resolve_model
    from reward.stdlib_pairs import preference_records, sft_records, stdlib_docs

    policy = str(resolve_model(args.policy))
    docs = stdlib_docs()
    pairs = preference_records(docs[: args.pairs], seed=3)[: args.pairs]
    sft = sft_records(docs[200:240])
    base = dict(batch_size=2, learning_rate=1e-5, max_length=384, epochs_per_round=1, chosen_loss_coef=0.2,
                sft_replay_coef=0.1, replay_batch_size=2)
    # Logical CPUs above the cores: the training job's workers, the engines and the scoring actor are up at once
    # and each reserves 1 CPU (they take turns computing).
    ensure_ray(num_cpus=max(8, os.cpu_count() or 1))
    out: dict = {"benchmark": "dpo_distributed", "policy": args.policy, "workers": args.workers,
                 "engines": args.engines, "pairs": len(pairs), "machine": platform.processor() or platform.machine(),
                 "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-dist-") as scratch:
        work = Path(scratch)
        out.update(step_equality(policy, pairs, sft, base, args.workers, work))
        print(f"step equality: {json.dumps(out)}", flush=True)
        train = train_comparison(policy, pairs, sft, base, args.workers, args.repeats, work)
        trainer = train.pop("trainer")
        print(f"train: {json.dumps(train)}", flush=True)
        out.update(train)
        try:
            trainer.export(work / "synced")
            model = AutoModelForCausalLM.from_pretrained(work / "synced", dtype=torch.float32)
            with WorkerPool(PoolConfig(model=policy, dtype="float32", max_model_len=1024, kv_cache_gib=1,
                                       num_workers=args.engines)) as pool:
                out.update(sync_comparison(pool, model, args.repeats, trainer))
        finally:
            trainer.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
