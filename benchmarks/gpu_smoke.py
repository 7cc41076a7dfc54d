"""GPU smoke run: two online DPO rounds on a ~1B-parameter random MoE, the vLLM engine and the trainer on one GPU,
the engine in vLLM's sleep mode while a round trains.

    make gpu-smoke            # = python -m benchmarks.gpu_smoke
    python -m benchmarks.gpu_smoke [--layers 22] [--rounds 2] [--prompts-per-round 32] [--max-tokens 128]

Needs one CUDA GPU and the ``cuda`` extra (vLLM's CUDA build); refuses to start without a GPU. What runs (every
part the project's own code, nothing mocked):
- the policy: a random Llama (hidden 1024, 16 heads / 4 KV heads, MLP 2816, ``--layers`` layers, SmolLM2's
  tokenizer) upcycled by ``pipeline.models.upcycle`` into a Qwen2-MoE of 8 experts, top-2 (~1.0B parameters at
  22 layers), written once to the work folder;
- one vLLM engine with ``gpus_per_engine: 0.5``, ``enable_sleep_mode`` and ``gpu_memory_utilization`` 0.3;
- the reward model of ``benchmarks.dpo`` (SmolLM2-135M, trained once on docstring pairs, cached) scoring on the
  same GPU (``num_gpus_per_worker: 0.1``, bf16);
- online DPO with ``distributed.backend: local`` (TRL in this process, bf16 on the GPU, float32 EMA),
  ``sleep_engines_while_training``, the weight sync through the pool's ``auto`` transport (the object store for a
  GPU engine). The collective transport is not used here: NCCL refuses two ranks on one GPU, and colocated
  engines would need vLLM's CUDA-IPC weight transfer, which this project has not wired.

Last line, JSON: per round sample tokens/s, train seconds, sync seconds; ``peak_gpu_used_gib`` (device-wide used
memory, polled every 0.2 s from this process, so the engine's and the scoring actor's memory count too) and
``gpu_total_gib``; the model's parameter count; the GPU's name.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path


class PeakGpuMemory:
    """Device-wide used memory (total - free, as ``nvidia-smi`` counts it) polled in a thread: the engine and
    scoring actors are other processes, which ``torch.cuda.max_memory_allocated`` does not see."""

    def __init__(self, interval_s: float = 0.2):
        import torch

        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self.total = torch.cuda.mem_get_info()[1]
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakGpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def build_policy(dest: Path, layers: int) -> int:
    """The random ~1B MoE in ``dest`` (kept across runs); returns its parameter count."""
    from pipeline.models.catalog import TinyConfig, random_models

    shape = TinyConfig(hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                       intermediate_size=2816, num_experts=8, top_k=2)
    marker = dest / "posttrain_smoke.json"
    if marker.is_file() and json.loads(marker.read_text()).get("layers") == layers:
        return json.loads(marker.read_text())["params"]
    _, moe, tok = random_models(shape)
    moe.save_pretrained(dest)
    tok.save_pretrained(dest)
    params = sum(p.numel() for p in moe.parameters())
    marker.write_text(json.dumps({"layers": layers, "params": params}))
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: ~1.0B parameters)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts-per-round", type=int, default=32)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_smoke needs a CUDA GPU (torch.cuda.is_available() is False); on a CPU "
                         "machine run `python -m benchmarks.dpo` instead")
    from benchmarks.dpo import OFFLINE_FUNCTIONS, REWARD_FUNCTIONS, reward_model
    from pipeline.engines.pool import PoolConfig, WorkerPool
    from pipeline.executor import ensure_ray
    from pipeline.models.catalog import posttrain_home
    from pipeline.records import pair_items, source_item
    from reward.score import RewardPool, RewardPoolConfig
    from reward.stdlib_pairs import preference_records, prompt_records, sft_records, stdlib_docs
    from stages.dpo import OnlineDPOConfig, online_dpo, prompt_rows, split_prompts

    home = posttrain_home() / "bench" / "gpu_smoke"
    policy = home / "policy"
    params = build_policy(policy, args.layers)
    rm_path, rm_info = reward_model(posttrain_home() / "bench" / "dpo_reward_model")
    docs = stdlib_docs()
    cfg = OnlineDPOConfig(rounds=args.rounds, prompts_per_round=args.prompts_per_round,
                          samples_per_prompt=args.samples_per_prompt, max_tokens=args.max_tokens, eval_prompts=16,
                          eval_samples=2, learning_rate=1e-5, max_length=512, sleep_engines_while_training=True,
                          distributed={"backend": "local"})
    offline_docs = docs[REWARD_FUNCTIONS:REWARD_FUNCTIONS + OFFLINE_FUNCTIONS]
    offline, sft = preference_records(offline_docs, seed=1), sft_records(offline_docs)
    trained = {i for p in offline for i in pair_items(p)} | {source_item(r) for r in sft}
    split = split_prompts(prompt_rows(prompt_records([n for n, _ in docs])), cfg, 0, set(rm_info.pop("items")),
                          trained)
    ensure_ray()
    pool_cfg = PoolConfig(model=str(policy), device="cuda", gpus_per_engine=0.5, gpu_memory_utilization=0.3,
                          max_model_len=1024, engine_kwargs={"enable_sleep_mode": True})
    rounds = []
    with PeakGpuMemory() as memory, tempfile.TemporaryDirectory(prefix="gpu-smoke-", dir=args.work) as work:
        t0 = time.perf_counter()
        with WorkerPool(pool_cfg) as pool, RewardPool(rm_path, RewardPoolConfig(num_gpus_per_worker=0.1)) as scorer:
            setup_s = time.perf_counter() - t0
            result = online_dpo(str(policy), pool, scorer, split.train, split.held_out, offline, sft, cfg, work,
                                on_round=lambda r, m: print(f"round {r}: {json.dumps(m)}", flush=True))
        for m in result.rounds:
            rounds.append({"round": m["round"], "sample_tokens": m.get("sample_tokens"),
                           "sample_tokens_per_s": m.get("sample_tokens", 0) / max(m.get("time_sample", 0), 1e-9),
                           "train_s": m.get("time_train"), "sync_s": m.get("time_sync"),
                           "total_s": m.get("time_total"), "pairs": m.get("pairs_online")})
    print(json.dumps({"benchmark": "gpu_smoke", "gpu": torch.cuda.get_device_name(0), "params": params,
                      "layers": args.layers, "setup_s": setup_s, "rounds": rounds,
                      "sync_s": [r["sync_s"] for r in rounds], "peak_gpu_used_gib": memory.peak / 2**30,
                      "gpu_total_gib": memory.total / 2**30, "reward_model": rm_info}))


if __name__ == "__main__":
    main()
