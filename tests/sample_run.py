"""A small finished run directory for the publish and report tests, built without any engine.

The layout and record formats are ARCHITECTURE.md's. All text comes from CPython's own
documentation (``pydoc_data.topics``, shipped with every Python) and standard-library source, never
from a model and never hand-written; the numbers (losses, scores, per-round DPO figures) come from a
seeded random generator, shaped like what the stages log.
"""

from __future__ import annotations

import hashlib
import inspect
import random
import re
import shutil
import textwrap
from pathlib import Path

import yaml

from pipeline.run.artifacts import ArtifactStore, library_versions

DOMAINS = ("programming", "documentation", "reasoning")
CRITERIA = ("accuracy", "relevance", "completeness", "usefulness", "clarity")
OPERATORS = ("clarity", "expand", "harder")
MODELS = {"policy": "smollm2-moe", "instruct": "smollm2-135m-instruct"}
STAGES = ("seeds", "generate", "evolve", "answer", "filter", "sft", "reward", "dpo", "eval")


def _id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def _sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat) if 6 <= len(s.split()) <= 60]


def _topics(n: int) -> list[tuple[str, list[str]]]:
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        sentences = _sentences(topics[name])
        if len(sentences) >= 6:
            out.append((name, sentences))
        if len(out) == n:
            break
    return out


def write_dataset(run_dir: Path, name: str, records: list[dict], shard_size: int = 64) -> None:
    """Sharded Parquet under datasets/<name>/, written by the run's own artifact store."""
    ArtifactStore(run_dir).write_dataset(name, records, shard_size=shard_size)


def write_stage(run_dir: Path, stage: str, *, seconds: float, outputs=(), metrics: dict | None = None,
                series: list[dict] | None = None, inputs=(), pools: dict | None = None) -> None:
    """A finished stage's manifest (the fields the runner writes) and its metrics.jsonl."""
    store = ArtifactStore(run_dir)
    manifest = {"stage": stage, "state": "done", "fingerprint": _id(stage, str(seconds)),
                "declared_inputs": list(inputs), "declared_outputs": list(outputs),
                "outputs": {o: store.describe(o) for o in outputs}, "metrics": metrics or {},
                "pools_used": pools or {}, "duration_s": seconds, "elapsed_s": seconds, "attempts": 1,
                "versions": library_versions()}
    store.write_manifest(stage, manifest)
    for row in series or []:
        store.append_metrics(stage, row)


def build_sample_run(run_dir: Path, *, n_topics: int = 12, model_dir: Path | None = None,
                     config_extra: dict | None = None, seed: int = 0) -> Path:
    """Write a complete small run (every stage done) into ``run_dir`` and return it."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    topics = _topics(n_topics)

    config = {"run_dir": str(run_dir), "seed": seed, "graph": list(STAGES),
              "models": {role: {"model": name, "num_workers": 1} for role, name in MODELS.items()},
              "stages": {"generate": {"model": MODELS["instruct"], "per_seed": 2},
                         "evolve": {"model": MODELS["instruct"], "rounds": 1, "operators": list(OPERATORS)},
                         "answer": {"models": {"programming": MODELS["policy"],
                                               "documentation": MODELS["instruct"]}},
                         "filter": {"critique_model": MODELS["instruct"], "min_tier": 2},
                         "sft": {"epochs": 3, "lr": 2e-5, "attention_dropout": 0.1, "hidden_dropout": 0.2},
                         "dpo": {"rounds": 2, "beta": 0.1, "reward_model": "reward_model"}}}
    config.update(config_extra or {})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    seeds = []
    for name, sentences in topics:
        text = " ".join(sentences[:8])
        seeds.append({"id": _id("seed", name), "text": text, "source_kind": "book",
                      "source": f"pydoc_data.topics:{name}", "license": "PSF-2.0", "n_tokens": len(text.split())})
    for fn in (textwrap.dedent, textwrap.indent, inspect.cleandoc):
        code = inspect.getsource(fn)
        seeds.append({"id": _id("seed", fn.__qualname__), "text": code, "source_kind": "code",
                      "source": f"{Path(inspect.getsourcefile(fn)).name}:{inspect.getsourcelines(fn)[1]}",
                      "license": "PSF-2.0", "n_tokens": len(code.split())})
    write_dataset(run_dir, "seeds", seeds)
    by_seed = {s["id"]: _sentences(s["text"]) or [s["text"].splitlines()[0]] for s in seeds}

    instructions = []
    for i, seed_rec in enumerate(seeds):
        sents = by_seed[seed_rec["id"]]
        for j in range(2):
            text = sents[j % len(sents)]
            instructions.append({"id": _id("ins", seed_rec["id"], str(j)), "instruction": text,
                                 "domain": DOMAINS[(i + j) % len(DOMAINS)], "task_type": ("explain", "rewrite")[j],
                                 "seed_id": seed_rec["id"], "source_kind": seed_rec["source_kind"],
                                 "parent_id": None, "operator": None, "round": 0, "model": MODELS["instruct"]})
    write_dataset(run_dir, "instructions", instructions)

    evolved = list(instructions)
    for k, parent in enumerate(instructions[::2]):
        sents = by_seed[parent["seed_id"]]
        evolved.append({**parent, "id": _id("evo", parent["id"]), "instruction": sents[(k + 2) % len(sents)],
                        "parent_id": parent["id"], "operator": OPERATORS[k % 3], "round": 1})
    write_dataset(run_dir, "evolved", evolved)

    answers = []
    for k, ins in enumerate(evolved):
        sents = by_seed[ins["seed_id"]]
        responses = []
        for m, model in enumerate(MODELS.values()):
            text = " ".join(sents[(k + m) % len(sents):(k + m) % len(sents) + 3])
            responses.append({"text": text, "model": model, "finish_reason": "length" if (k + m) % 7 == 0 else "stop",
                              "n_tokens": int(len(text.split()) * 1.3)})
        answers.append({**ins, "responses": responses, "answer_model": responses[0]["model"]})
    write_dataset(run_dir, "answers", answers, shard_size=20)

    sft, prefs = [], []
    for k, ans in enumerate(answers):
        sents = by_seed[ans["seed_id"]]
        tier = 1 + (k * 7 + 3) % 4
        scores = {c: min(10, max(1, tier * 2 + rng.randint(-1, 2))) for c in CRITERIA}
        lineage = {key: ans[key] for key in ("seed_id", "source_kind", "parent_id", "operator", "round",
                                             "model", "domain", "task_type", "answer_model")}
        if ans["responses"][0]["finish_reason"] == "stop" and tier >= 2:
            sft.append({"id": _id("sft", ans["id"]), "messages": [
                {"role": "user", "content": ans["instruction"]},
                {"role": "assistant", "content": ans["responses"][0]["text"]}],
                "instruction_id": ans["id"], "tier": tier, "scores": scores, "critique_reason": sents[-1],
                "agreement": None if ans["task_type"] == "rewrite" else round(rng.uniform(0.5, 1.0), 3), **lineage})
        chosen, rejected = ans["responses"][0], ans["responses"][1]
        prefs.append({"id": _id("pref", ans["id"]), "prompt": [{"role": "user", "content": ans["instruction"]}],
                      "chosen": [{"role": "assistant", "content": chosen["text"]}],
                      "rejected": [{"role": "assistant", "content": rejected["text"]}],
                      "source": "critique", "chosen_score": float(tier * 2),
                      "rejected_score": float(max(1, tier * 2 - rng.randint(1, 4))), "instruction_id": ans["id"],
                      **lineage})
    write_dataset(run_dir, "sft", sft)
    write_dataset(run_dir, "preferences", prefs)

    online = []
    for r in (1, 2):
        for k, ins in enumerate(evolved[r::6][:5]):
            sents = by_seed[ins["seed_id"]]
            online.append({"id": _id("online", str(r), ins["id"]),
                           "prompt": [{"role": "user", "content": ins["instruction"]}],
                           "chosen": [{"role": "assistant", "content": " ".join(sents[k % len(sents):][:2])}],
                           "rejected": [{"role": "assistant", "content": sents[-1]}],
                           "source": f"online_round_{r}", "chosen_score": round(rng.uniform(0.5, 2.0), 3),
                           "rejected_score": round(rng.uniform(-1.5, 0.4), 3), "instruction_id": ins["id"],
                           "seed_id": ins["seed_id"], "domain": ins["domain"], "operator": ins["operator"],
                           "model": MODELS["policy"]})
    write_dataset(run_dir, "online_pairs", online)

    n_drop = len(answers) - len(sft)
    write_stage(run_dir, "seeds", seconds=0.4, outputs=["seeds"])
    write_stage(run_dir, "generate", seconds=31.0, metrics={"dropped_malformed": 1}, inputs=["seeds"],
                outputs=["instructions"], pools={"instruct": MODELS["instruct"]})
    write_stage(run_dir, "evolve", seconds=44.5, metrics={"attempted": {op: 5 for op in OPERATORS}},
                inputs=["instructions"], outputs=["evolved"], pools={"instruct": MODELS["instruct"]})
    write_stage(run_dir, "answer", seconds=120.2, inputs=["evolved"], outputs=["answers"],
                pools={"instruct": MODELS["instruct"], "policy": MODELS["policy"]})
    write_stage(run_dir, "filter", seconds=80.0,
                metrics={"dropped": n_drop, "dropped_by_reason": {
                    "truncated": sum(a["responses"][0]["finish_reason"] == "length" for a in answers),
                    "duplicate": 1, "garbled": 0, "format": 2, "low_tier": max(0, n_drop - 3)},
                    # the shapes critique.calibration.calibration_figures and critique.verify write
                    "critic_calibration": {"answers": 80, "ungraded": 2, "auc": 0.8125,
                                           "mean_tier": {"reference": 3.6, "truncated": 2.1}},
                    "verification": {"responses_checked": 30, "responses_passed": 12, "pass_rate": 0.4,
                                     "by_kind": {"lowercase": {"checked": 10, "passed": 7, "pass_rate": 0.7}}},
                    "code_tests": {"records_with_tests": 3, "responses_run": 9, "responses_passed": 4}},
                inputs=["answers"], outputs=["sft", "preferences"], pools={"critic": MODELS["instruct"]})
    steps = 30
    loss0 = 2.4
    sft_series = []
    for step in range(1, steps + 1):
        # each coarse-to-fine phase is its own trainer run: its step count starts over
        row = {"step": step if step <= 20 else step - 20,
               "loss": round(loss0 * (0.93 ** step) + rng.uniform(0, 0.08), 4),
               "learning_rate": 2e-5 - (2e-5 - 2e-6) * step / steps, "phase": 0 if step <= 20 else 1,
               "aux_loss": round(0.02 + rng.uniform(0, 0.01), 4)}
        if step % 10 == 0:
            row["eval_loss"] = round(row["loss"] + 0.15, 4)
            # the keys pipeline.training.moe_trainer.ExpertLoadCallback logs
            for layer in range(4):
                w = [rng.random() + 0.2 for _ in range(8)]
                for e, x in enumerate(w):
                    row[f"expert_load/layer_{layer:02d}/expert_{e:02d}"] = round(x / sum(w), 4)
            row["expert_load/max_load_ratio"] = 1.6
        sft_series.append(row)
    write_stage(run_dir, "sft", seconds=900.0, series=sft_series,
                metrics={"heldout_nll_before": 2.5, "heldout_nll_after": 1.1}, inputs=["sft"])
    reward_series = [{"step": s, "loss": round(0.69 - 0.01 * s, 4), "eval_accuracy": round(0.5 + 0.02 * s, 4)}
                     for s in range(1, 11)]
    write_stage(run_dir, "reward", seconds=200.0, series=reward_series, metrics={"eval_accuracy": 0.7, "eval_accuracy_filter_pairs": 0.625, "eval_pairs_filter": 8},
                inputs=["preferences"])
    # The key strings a dpo stage writes (stages/dpo/metrics.py), spelled out: a run directory written by an
    # earlier version must still be reported.
    dpo_series = [{"round": r, "reward_mean": round(0.2 * r + rng.uniform(0, 0.1), 4),
                   "reward_std": round(0.5 + rng.uniform(0, 0.1), 4), "reward_margin": round(1.0 + 0.3 * r, 4),
                   "rewards_accuracies": round(0.6 + 0.1 * r, 4), "kl": round(0.01 * r, 5),
                   "eval_win_rate": round(0.5 + 0.08 * r, 4), "pairs_online": 5, "ties": 1,
                   "eval_reward_gain": round(0.3 * r, 4), "eval_reward_gain_se": 0.1,
                   "eval_reward_gain_untruncated": round(0.25 * r, 4), "eval_reward_gain_untruncated_se": 0.12,
                   "eval_untruncated_pairs": 20 + r, "eval_reward_gain_length_adjusted": round(0.1 * r, 4),
                   "eval_reward_per_token": 0.01, "eval_tokens_mean": 50.0 - 5 * r, "eval_sft_tokens_mean": 55.0,
                   "eval_truncated": 0.5 - 0.1 * r, "eval_sft_truncated": 0.5, "eval_judge_gain": round(0.05 * r, 4),
                   "eval_judge_gain_se": 0.2, "eval_judge_win_rate": 0.55, "eval_judge_pairs": 40}
                  for r in (1, 2)]
    if model_dir is not None:
        shutil.copytree(model_dir, run_dir / "models" / "dpo_model")
    write_stage(run_dir, "dpo", seconds=600.0, series=dpo_series, metrics={"rounds": 2},
                inputs=["sft_model", "reward_model", "sft", "preferences", "evolved"],
                outputs=["online_pairs", *(["dpo_model"] if model_dir is not None else [])],
                pools={"policy": MODELS["policy"]})
    # The eval stage's manifest keys (stages/eval/metrics.py), spelled out like the dpo ones.
    eval_metrics = {"benchmark": "ifeval", "prompts": 24, "confidence": 0.95}
    for k, model in enumerate(("start", "sft", "final")):
        eval_metrics.update({f"{model}_prompt_strict": 0.1 + 0.05 * k, f"{model}_prompt_loose": 0.15 + 0.05 * k,
                             f"{model}_instruction_strict": 0.2 + 0.05 * k, f"{model}_instruction_loose": 0.25 + 0.05 * k,
                             f"{model}_truncated_fraction": 0.4 - 0.1 * k, f"{model}_mean_tokens": 150.0 - 10 * k})
    for comparison, k in (("sft_vs_start", 1), ("final_vs_start", 2)):
        for acc in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
            base = f"{comparison}_{acc}_gain"
            eval_metrics.update({base: 0.05 * k, f"{base}_ci_low": 0.05 * k - 0.1, f"{base}_ci_high": 0.05 * k + 0.1})
    write_stage(run_dir, "eval", seconds=300.0, metrics=eval_metrics, inputs=["sft_model", "dpo_model"])
    return run_dir
