"""Online DPO rounds on the embedded default: where each round's wall time goes, and whether the rounds
raise the policy's reward on held-out prompts.

    python -m benchmarks.dpo [--rounds 2] [--prompts-per-round 16] [--max-tokens 64] [--learning-rate 2e-5]
                             [--epochs-per-round 2] [--eval-prompts 32] [--eval-samples 4] [--no-head-comparison]
                             [--workers N]

Setup (not timed in the rounds): the embedded MoE policy (smollm2-moe, 413M, float32) on one vLLM engine
in a Ray actor; a reward model trained with TRL's RewardTrainer from SmolLM2-135M-Instruct on preference
pairs derived from CPython's docstrings (reward/stdlib_pairs.py; cached under $POSTTRAIN_HOME/bench, so
only the first run trains it), scoring on a Ray actor. Prompts are questions about stdlib functions, SFT replay
rows their docstrings. The data is disjoint by function (``stages.dpo.split_prompts`` checks it): the reward model
trains on pairs about the first ``REWARD_FUNCTIONS`` functions (their rejected texts come from the same ones), the
offline pairs and SFT replay rows are about the next ``OFFLINE_FUNCTIONS``, and the training and held-out prompts
come from the rest, apart from each other.

Figures (last line, JSON):
- rounds[i]: seconds per phase: sample (policy sampling, training prompts and held-out prompts), score
  (reward model on every sample, plus the reference model's logprobs for the KL estimate), train
  (DPOTrainer: DPO + chosen NLL + SFT replay), sync (in-memory weight push into the running engine), other
  (everything else: pairing, checkpoint of the round for resume, bookkeeping); and the round's figures.
- overhead_fraction: other / total over all rounds. Target < 0.10.
- With ``--workers N`` the rounds train on a Ray Train job of N FSDP2 CPU workers (gloo) and sync through the
  collective transport (the cluster path; without it, TRL in this process and shared memory). Then also
  (``benchmarks.dpo_distributed``): ``distributed_step_max_param_diff``, N workers vs one process with N x
  accumulation after one SGD step on the same batches; and the final weights synced into the benchmark's engine
  through each transport from this process, side by side: ``collective_sync_s``, ``shared_memory_sync_s``,
  ``object_store_sync_s`` and each ``*_vs_copy`` (seconds / a plain copy of the same bytes).
- eval_reward_sft / eval_reward_final / eval_reward_gain / eval_win_rate: held-out mean reward of the SFT
  policy and of the final policy (paired: same prompts, same request seeds), the gain, and the share of
  paired samples where the final policy scores higher (ties 0.5). `eval_reward_gain_se`: the gain's standard
  error over held-out prompts (stages/dpo.py ``paired_gain``); `reward_raised` is gain > 2 standard errors.
  32 prompts x 4 samples: the earlier 16 x 2 default measured a gain of -0.14 whose standard error (not
  computed then; ~0.3 from the per-sample reward std of 1.7) was larger than the gain.
- eval_tokens_final / eval_tokens_sft, eval_truncated_final / eval_truncated_sft: held-out response length and
  share cut at max_tokens on both sides; eval_reward_gain_untruncated (pairs where neither side was cut) and
  eval_reward_gain_length_adjusted (the gain at equal length): whether the gain is only "shorter answers".
- plain_head_speedup: seconds of one DPO training round with TRL's fused LM head (its CPU fallback) /
  seconds with our plain-logits head (stages/dpo.py ``_plain_head_forward``), same pairs, same start weights;
  both runs alternate twice. Also `plain_head_loss_rel_diff`: they compute the same loss.
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

REWARD_FUNCTIONS = 120
"""Functions whose docstring pairs train the reward model (the first ones of ``stdlib_docs()``)."""
OFFLINE_FUNCTIONS = 40
"""Functions after those whose pairs and docstrings are the offline pairs and SFT replay rows."""

PHASES = {"sample": ("time_sample", "time_eval_sample"), "score": ("time_score", "time_eval_score", "time_kl"),
          "train": ("time_train",), "sync": ("time_sync",)}


def reward_model(cache: Path, seed: int = 0) -> tuple[Path, dict]:
    """The benchmark's reward model (trained once, then reused from ``cache``) and its held-out accuracy."""
    from pipeline.records import pair_items
    from reward.score import RewardScorer
    from reward.stdlib_pairs import preference_records, stdlib_docs
    from reward.train import RewardModelConfig, pairwise_accuracy, split_pairs, train_reward_model

    cfg = RewardModelConfig(base_model="smollm2-135m-instruct", learning_rate=2e-5, num_epochs=1, batch_size=8,
                            max_length=256, seed=seed)
    key = f"v2-{seed}-{REWARD_FUNCTIONS}"
    info = cache / "info.json"
    train, held = split_pairs(preference_records(stdlib_docs()[:REWARD_FUNCTIONS], seed=0), 0.2)
    items = sorted({i for p in train for i in pair_items(p)})
    if info.is_file() and json.loads(info.read_text()).get("key") == key:
        return cache, {**json.loads(info.read_text()), "items": items}
    t0 = time.perf_counter()
    cache.parent.mkdir(parents=True, exist_ok=True)
    train_reward_model(train, cfg, cache)
    acc = pairwise_accuracy(RewardScorer(cache).score, held)
    out = {"key": key, "train_s": time.perf_counter() - t0, "eval_accuracy": acc["accuracy"], "eval_pairs": len(held)}
    info.write_text(json.dumps(out))
    return cache, {**out, "items": items}


def head_comparison(policy_path: str, pairs: list[dict], replay_rows: list[dict], cfg, repeats: int = 2) -> dict:
    """One training round with TRL's fused LM head vs our plain-logits head, from the same start weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.dpo import tokenize_replay, train_round

    tok = AutoTokenizer.from_pretrained(policy_path)
    ref = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).eval()
    replay = tokenize_replay(tok, replay_rows, cfg.max_length)
    times: dict[str, list[float]] = {"fused": [], "plain": []}
    losses: dict[str, float] = {}
    for _ in range(repeats):
        for side in ("fused", "plain"):
            policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
            with tempfile.TemporaryDirectory() as scratch:
                t0 = time.perf_counter()
                m = train_round(policy, ref, tok, pairs, replay, cfg, 0, scratch, plain_head=side == "plain")
                times[side].append(time.perf_counter() - t0)
            losses[side] = m["loss/total"]
            del policy
    fused, plain = statistics.median(times["fused"]), statistics.median(times["plain"])
    return {"fused_s": fused, "plain_s": plain, "plain_head_speedup": fused / plain,
            "plain_head_loss_rel_diff": abs(losses["fused"] - losses["plain"]) / abs(losses["fused"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="smollm2-moe")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts-per-round", type=int, default=16)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--epochs-per-round", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0,
                        help="train on a Ray Train job of this many FSDP2 workers (0: in this process)")
    parser.add_argument("--optim", default=None, help="optimizer of the rounds (default: OnlineDPOConfig's); "
                        "adafactor keeps 2 workers inside 24 GiB with the engine and the scorer up")
    parser.add_argument("--no-head-comparison", action="store_true", help="skip the fused vs plain LM head runs")
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.dpo_distributed import step_equality, sync_comparison
    from pipeline.engines.pool import PoolConfig, WorkerPool
    from pipeline.executor import ensure_ray
    from pipeline.models.catalog import posttrain_home, resolve_model
    from pipeline.records import pair_items, source_item
    from reward.score import RewardPool
    from reward.stdlib_pairs import preference_records, prompt_records, sft_records, stdlib_docs
    from stages.dpo import OnlineDPOConfig, online_dpo, prompt_rows, split_prompts

    policy_path = str(resolve_model(args.policy))
    rm_path, rm_info = reward_model(posttrain_home() / "bench" / "dpo_reward_model", seed=args.seed)
    print(f"reward model: held-out accuracy {rm_info['eval_accuracy']:.3f} on {rm_info['eval_pairs']} pairs",
          flush=True)
    docs = stdlib_docs()
    cfg = OnlineDPOConfig(rounds=args.rounds, prompts_per_round=args.prompts_per_round,
                          samples_per_prompt=args.samples_per_prompt, max_tokens=args.max_tokens,
                          eval_prompts=args.eval_prompts, eval_samples=args.eval_samples,
                          learning_rate=args.learning_rate, epochs_per_round=args.epochs_per_round, max_length=384,
                          **({"optim": args.optim} if args.optim else {}),
                          distributed={"backend": "ray" if args.workers else "local",
                                       "num_workers": max(1, args.workers), "strategy": "fsdp2"})
    prompts = prompt_rows(prompt_records([n for n, _ in docs]))
    offline_docs = docs[REWARD_FUNCTIONS:REWARD_FUNCTIONS + OFFLINE_FUNCTIONS]
    offline, sft = preference_records(offline_docs, seed=1), sft_records(offline_docs)
    trained = {i for p in offline for i in pair_items(p)} | {source_item(r) for r in sft}
    split = split_prompts(prompts, cfg, args.seed, set(rm_info.pop("items")), trained)
    train, held = split.train, split.held_out
    # Logical CPUs above the cores: the training job's workers, the engines and the scoring actor are up at once
    # and each reserves 1 CPU (they take turns computing).
    ensure_ray(num_cpus=max(8, os.cpu_count() or 1))
    t0 = time.perf_counter()
    with WorkerPool(PoolConfig(model=policy_path, dtype="float32", max_model_len=2048, kv_cache_gib=2)) as pool, \
            RewardPool(rm_path) as scorer, tempfile.TemporaryDirectory(prefix="bench-dpo-") as work:
        setup_s = time.perf_counter() - t0
        print(f"engines ready in {setup_s:.0f}s", flush=True)
        result = online_dpo(policy_path, pool, scorer, train, held, offline, sft, cfg, work, seed=args.seed,
                            on_round=lambda r, m: print(f"round {r}: {json.dumps(_round_line(m))}", flush=True),
                            export_dir=Path(work) / "final" if args.workers else None)
        if args.workers:
            sync = sync_comparison(pool, AutoModelForCausalLM.from_pretrained(Path(work) / "final", dtype=torch.float32),
                                   repeats=2)
    rounds = [_round_line(m) for m in result.rounds]
    total = sum(r["total_s"] for r in rounds)
    other = sum(r["other_s"] for r in rounds)
    last = result.rounds[-1]
    out = {
        "benchmark": "dpo", "policy": args.policy, "backend": cfg.distributed.backend,
        "workers": args.workers, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "rounds": rounds, "overhead_fraction": other / total,
        "setup_s": {"engines": setup_s, **result.timings}, "reward_model": rm_info,
        "eval_reward_sft": last["eval_reward_sft_mean"], "eval_reward_final": last["eval_reward_mean"],
        "eval_reward_gain": last["eval_reward_gain"], "eval_reward_gain_se": last["eval_reward_gain_se"],
        "eval_win_rate": last["eval_win_rate"],
        "eval_pairs": len(result.baseline["rewards"]), "reward_raised": last["eval_reward_gain"] > 2 * last["eval_reward_gain_se"],
        "eval_tokens_sft": last["eval_sft_tokens_mean"], "eval_tokens_final": last["eval_tokens_mean"],
        "eval_truncated_sft": last["eval_sft_truncated"], "eval_truncated_final": last["eval_truncated"],
        "eval_reward_gain_untruncated": last["eval_reward_gain_untruncated"],
        "eval_untruncated_pairs": last["eval_untruncated_pairs"],
        "eval_reward_gain_length_adjusted": last["eval_reward_gain_length_adjusted"],
        "prompts_train": len(train), "prompts_held_out": len(held), "prompts_excluded": split.excluded,
    }
    if args.workers:
        out.update(sync)
        with tempfile.TemporaryDirectory(prefix="bench-dpo-step-") as scratch:
            step_cfg = {k: getattr(cfg, k) for k in ("batch_size", "max_length", "chosen_loss_coef",
                                                      "sft_replay_coef", "replay_batch_size")}
            out.update(step_equality(policy_path, preference_records(offline_docs, seed=2), sft, step_cfg,
                                     args.workers, Path(scratch)))
    if not args.no_head_comparison:
        pairs = preference_records(offline_docs[:8], seed=2)
        out.update(head_comparison(policy_path, pairs, sft, cfg))
    print(json.dumps(out))


def _round_line(m: dict) -> dict:
    line = {phase: sum(m.get(k, 0.0) for k in keys) for phase, keys in PHASES.items()}
    line = {f"{k}_s": v for k, v in line.items()}
    line["total_s"] = m["time_total"]
    line["other_s"] = m["time_total"] - sum(line[f"{p}_s"] for p in PHASES)
    for key in ("round", "pairs_online", "ties", "reward_mean", "reward_std", "reward_margin", "kl",
                "rewards_accuracies", "rewards_margins", "loss_total", "loss_dpo", "loss_chosen_nll", "loss_replay_nll",
                "eval_reward_mean", "eval_reward_gain", "eval_reward_gain_se", "eval_win_rate", "sample_tokens", "train_steps",
                "eval_reward_gain_untruncated", "eval_reward_gain_length_adjusted", "eval_tokens_mean",
                "eval_sft_tokens_mean", "eval_truncated", "eval_sft_truncated"):
        if key in m:
            line[key] = m[key]
    return line


if __name__ == "__main__":
    main()
