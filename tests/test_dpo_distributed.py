"""Online DPO at cluster scale, proven on CPU: the step the Ray Train workers run (``stages.dpo.step``) against
TRL's DPOTrainer, two FSDP2 workers (gloo) against one process with twice the accumulation, a frozen reference
across rounds (and LoRA's adapter-disabled reference), sharded checkpoints, and device placement of the helpers.

Real components on the embedded random tiny MoE (transformers, TRL, torch.distributed FSDP2 over gloo, Ray
Train CPU workers). The GPU and NCCL cannot exist here: the device tests use the ``meta`` device and a forward
hook to see where the helpers build their tensors.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from reward.stdlib_pairs import preference_records, sft_records, stdlib_docs
from stages.dpo import OnlineDPOConfig, make_trainer, tokenize_replay
from stages.dpo import metrics as M
from stages.dpo.cluster import shard
from stages.dpo.cluster.worker import RoundWorker
from stages.dpo.step import collate_pairs, micro_batch_loss, reference_logps, replay_rows, tokenize_pairs
from stages.dpo.trainer import collate_replay, unpatch_forward

STEP = dict(batch_size=2, learning_rate=5e-3, max_length=256, chosen_loss_coef=0.3, sft_replay_coef=0.2,
            replay_batch_size=2)


@pytest.fixture(scope="module")
def docs():
    return stdlib_docs()


@pytest.fixture(scope="module")
def tiny(embedded_models):
    return str(embedded_models["tiny-moe"])


def _perturbed(path: str, scale: float = 0.02, seed: int = 0):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def test_step_loss_is_trls_loss_on_the_same_batch(tiny, docs, tmp_path):
    """The workers' loss (stages.dpo.step) equals TRL's DPOTrainer + our replay term on the same pairs: the same
    tokenization, and the same total and terms, so moving the training to Ray Train did not change the loss."""
    tok = AutoTokenizer.from_pretrained(tiny)
    policy, ref = _perturbed(tiny), AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    pairs = preference_records(docs[:2], seed=3)
    replay = tokenize_replay(tok, sft_records(docs[10:12]), 256)  # exactly one replay batch: both draw it whole
    cfg = OnlineDPOConfig(**STEP)
    trainer = make_trainer(policy, ref, tok, pairs, replay, cfg, 0, str(tmp_path))
    try:
        rows = tokenize_pairs(tok, pairs, cfg.max_length)
        trl_rows = [trainer.train_dataset[i] for i in range(len(pairs))]
        assert [[r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")] for r in trl_rows] == \
               [[r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")] for r in rows]
        trainer.model.train()
        with torch.no_grad():
            trl_loss = float(trainer.compute_loss(trainer.model, trainer.data_collator(trl_rows)))
        trl_terms = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("loss/")}
    finally:
        unpatch_forward(policy, ref)
    refs = reference_logps(ref, rows, tok.pad_token_id, cfg.max_length, 4, torch.device("cpu"))
    batch = collate_pairs(rows, tok.pad_token_id, cfg.max_length, torch.device("cpu"))
    rc, rr = (torch.tensor(x) for x in zip(*refs, strict=True))
    replay_batch = collate_replay(replay_rows(replay, 2, 0, 0, 0), tok.pad_token_id)
    policy.train()
    with torch.no_grad():
        loss, terms = micro_batch_loss(policy, batch, rc, rr, replay_batch, cfg, cfg.moe.router_aux_loss_coef)
    assert trl_terms[M.LOSS_REPLAY_NLL] > 0 and trl_terms[M.LOSS_ROUTER_AUX] > 0  # every term is in the comparison
    assert float(loss) == pytest.approx(trl_loss, rel=1e-5)
    for key in (M.LOSS_DPO, M.LOSS_CHOSEN_NLL, M.LOSS_ROUTER_AUX, M.LOSS_REPLAY_NLL):
        assert terms[key] == pytest.approx(trl_terms[key], rel=1e-5), key


def test_reference_logprobs_stay_those_of_the_sft_policy_across_rounds(tiny, docs):
    """The reference of round 2 is the SFT policy, not the policy after round 1: same pairs, same reference
    log-probabilities, while the policy's own log-probabilities moved."""
    pairs = preference_records(docs[:4], seed=3)
    worker = RoundWorker({"config": {**STEP, "sft_replay_coef": 0}, "sft_path": tiny, "seed": 0})
    rows = tokenize_pairs(worker.tokenizer, pairs, 256)
    round1 = worker.pair_ref_logps(rows)
    before = reference_logps(worker.policy, rows, worker.pad_id, 256, 4, worker.device)
    worker.train(pairs, seed=0, round_index=1)
    round2 = worker.pair_ref_logps(rows)
    after = reference_logps(worker.policy, rows, worker.pad_id, 256, 4, worker.device)
    assert round2 == round1
    assert max(abs(a[0] - b[0]) for a, b in zip(after, before, strict=True)) > 1e-3


def test_lora_reference_is_the_policy_with_its_adapters_disabled(tiny, docs, tmp_path):
    """With LoRA there is no second model: the reference is the adapter-disabled policy (the SFT weights), it
    does not move when the adapters train, and the exported folder holds the merged weights under plain names."""
    pairs = preference_records(docs[:4], seed=3)
    cfg = {**STEP, "sft_replay_coef": 0, "learning_rate": 5e-2, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    worker = RoundWorker({"config": cfg, "sft_path": tiny, "seed": 0})
    assert worker.ref is None
    rows = tokenize_pairs(worker.tokenizer, pairs, 256)
    sft = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    expected = _flat(reference_logps(sft, rows, worker.pad_id, 256, 4, worker.device))
    assert _flat(worker.pair_ref_logps(rows)) == pytest.approx(expected, abs=1e-4)
    worker.train(pairs, seed=0, round_index=1)
    assert _flat(worker.pair_ref_logps(rows)) == pytest.approx(expected, abs=1e-4)
    worker.export(str(tmp_path / "merged"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not [k for k in merged if "lora" in k or "base_layer" in k]
    assert set(merged) == set(load_file(str(Path(tiny) / "model.safetensors")))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    moved = _flat(reference_logps(exported, rows, worker.pad_id, 256, 4, worker.device))
    assert max(abs(a - b) for a, b in zip(moved, expected, strict=True)) > 1e-3  # the adapters trained


def _flat(pairs: list[tuple[float, float]]) -> list[float]:
    return [x for pair in pairs for x in pair]


class _Stop(Exception):
    pass


def _input_device_of(model) -> list[torch.device]:
    """Record the device of the input ids of the model's next forward, then stop it."""
    seen: list[torch.device] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["input_ids"].device)
        raise _Stop

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_helpers_build_their_tensors_on_the_model_device(tiny, docs):
    """Every tensor the DPO helpers build goes to the model's device (here ``meta``, a device that is not the
    default one): reference log-probs, the KL's sequence log-probs, pair and replay batches, and the EMA update
    brings each weight to the EMA's device."""
    from stages.dpo.ema import ema_callback
    from stages.dpo.rollout import sequence_logprobs

    tok = AutoTokenizer.from_pretrained(tiny)
    meta = torch.device("meta")
    config = AutoConfig.from_pretrained(tiny)
    with meta:
        model = AutoModelForCausalLM.from_config(config)
    rows = tokenize_pairs(tok, preference_records(docs[:2], seed=3), 256)
    assert {t.device for t in collate_pairs(rows, 0, 256, meta).values()} == {meta}
    replay = tokenize_replay(tok, sft_records(docs[:2]), 256)
    assert {t.device for t in collate_replay(replay, 0, meta).values()} == {meta}
    for run in (lambda: reference_logps(model, rows, 0, 256, 4, meta),
                lambda: sequence_logprobs(model, [([1, 2], [3, 4])])):
        seen = _input_device_of(model)
        with pytest.raises(_Stop):
            run()
        assert seen == [meta]
        model._forward_pre_hooks.clear()
    # EMA in another place than the weights (host memory vs the model's device): updates are device-correct.
    cpu_model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    ema = {n: torch.empty(p.shape, device=meta) for n, p in cpu_model.named_parameters()}
    shard.ema_update(cpu_model, ema, 0.9)
    ema_callback(ema, 0.9).on_step_end(None, None, None, model=cpu_model)
    assert {t.device for t in ema.values()} == {meta}


def test_sharded_checkpoint_round_trip_with_the_ema(tiny, docs, tmp_path):
    """A round's sharded checkpoint brings back the trained weights and the EMA exactly."""
    pairs = preference_records(docs[:4], seed=3)
    spec = {"config": {**STEP, "sft_replay_coef": 0, "ema_decay": 0.5}, "sft_path": tiny, "seed": 0}
    worker = RoundWorker(spec)
    worker.train(pairs, seed=0, round_index=1)
    worker.checkpoint(str(tmp_path / "policy_dcp"))
    again = RoundWorker({**spec, "start_checkpoint": str(tmp_path / "policy_dcp")})
    a, b = dict(worker.policy.named_parameters()), dict(again.policy.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(worker.ema[n], again.ema[n]) for n in worker.ema)
    assert any(not torch.equal(worker.ema[n], a[n]) for n in a)  # the EMA is not the raw weights


# -- two Ray Train workers ------------------------------------------------------------------------------------


def _cluster(tiny, work: Path, cfg: dict):
    from stages.dpo.cluster.job import ClusterRoundTrainer

    return ClusterRoundTrainer(OnlineDPOConfig(**cfg), tiny, sft_records(stdlib_docs()[10:30]), work, 0,
                               lambda: None)


@pytest.mark.slow
def test_two_fsdp2_workers_step_as_one_process_with_twice_the_accumulation(ray_session, tiny, docs, tmp_path):
    """Two Ray Train CPU workers (gloo, FSDP2, float32) run one DPO + chosen NLL + replay step on 2 micro-batches,
    one each; one process runs the same step with gradient accumulation 2: the loss, the grad norm and every
    parameter after the step agree to 1e-5.

    The step is SGD, so the parameters compare the gradients element by element. (AdamW's first step moves each
    weight by lr * g / (|g| + eps): a gradient element that is float32 rounding noise around 0, summed in another
    order by the reduce-scatter, moves its weight by up to lr either way, so parameters after an AdamW step
    compare rounding noise, not the distributed logic.)"""
    pairs = preference_records(docs[:4], seed=3)
    base = {**STEP, "sft_replay_coef": 0.2, "optim": "sgd", "learning_rate": 0.05}
    dist_cfg = {**base, "distributed": {"backend": "ray", "num_workers": 2, "strategy": "fsdp2"}}
    trainer = _cluster(tiny, tmp_path / "w2", dist_cfg)
    try:
        assert trainer.info["world_size"] == 2
        two = trainer.train(1, pairs, seed=5)
        trainer.export(tmp_path / "two")
    finally:
        trainer.close()
    single = RoundWorker({"config": {**base, "gradient_accumulation_steps": 2}, "sft_path": tiny, "seed": 0,
                          "sft_rows": sft_records(stdlib_docs()[10:30])})
    one = single.train(pairs, seed=5, round_index=1)
    single.export(str(tmp_path / "one"))
    assert two[M.TRAIN_STEPS] == one[M.TRAIN_STEPS] == 1
    a = load_file(str(tmp_path / "two" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model.safetensors"))
    for key in (M.LOSS_TOTAL, M.LOSS_DPO, M.LOSS_CHOSEN_NLL, M.LOSS_REPLAY_NLL, M.GRAD_NORM):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    start = load_file(str(Path(tiny) / "model.safetensors"))
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4  # the step did change the weights
    assert not math.isnan(two[M.GRAD_NORM])


@pytest.mark.slow
def test_rounds_on_ray_train_survive_a_killed_worker(tiny_sync_pool, tiny_reward_model, tiny, docs, tmp_path,
                                                     monkeypatch):
    """Two rounds trained by 2 FSDP2 workers and synced through the collective transport into both engines. Rank 1
    is SIGKILLed at its second ``train`` request (round 2): the job starts again from round 1's sharded checkpoint,
    round 2 runs again from the pairs it saved before the kill, the sync group is rebuilt, and the engines end up
    serving the exported policy (the EMA)."""
    from pipeline.engines.sync.collective import CollectiveTransport
    from reward.score import RewardPool
    from reward.stdlib_pairs import prompt_records
    from stages.dpo import manifest_metrics, online_dpo, prompt_rows, split_prompts
    from stages.dpo import state as dpo_state
    from stages.dpo.rollout import sequence_logprobs

    cfg = OnlineDPOConfig(rounds=2, prompts_per_round=6, samples_per_prompt=4, max_tokens=16, eval_prompts=4,
                          eval_samples=2, learning_rate=5e-3, batch_size=2, min_reward_gap=0.05, offline_ratio=0.5,
                          ema_decay=0.5, kl_samples=8,
                          distributed={"backend": "ray", "num_workers": 2, "strategy": "fsdp2", "max_restarts": 1})
    split = split_prompts(prompt_rows(prompt_records([n for n, _ in docs])), cfg, 7)
    offline, sft = preference_records(docs[:60], seed=1), sft_records(docs[:60])
    saved, groups = [], []
    real_save, real_sync = dpo_state.save_pairs, CollectiveTransport.sync_remote
    monkeypatch.setattr(dpo_state, "save_pairs", lambda rdir, *a: saved.append(rdir.name) or real_save(rdir, *a))

    def spy(self, *args, **kwargs):
        result = real_sync(self, *args, **kwargs)
        groups.append(result.extras["group_id"])
        return result
    monkeypatch.setattr(CollectiveTransport, "sync_remote", spy)
    with RewardPool(tiny_reward_model["path"]) as scorer:
        result = online_dpo(tiny, tiny_sync_pool, scorer, split.train, split.held_out, offline, sft, cfg,
                            tmp_path / "work", seed=7, export_dir=tmp_path / "out", test_kill=(1, "train", 2))
    assert result.restarts == 1 and manifest_metrics(result, cfg)[M.TRAINER_RESTARTS] == 1
    assert [m[M.ROUND] for m in result.rounds] == [1, 2]
    assert saved == ["round_001", "round_002"]  # round 2 ran again on its saved pairs, not a new rollout
    assert len(set(groups)) == 2 and groups[0] != groups[-1]  # the restarted job synced through a new group
    assert (tmp_path / "work" / "round_002" / "policy_dcp" / ".metadata").is_file()
    assert not (tmp_path / "work" / "round_001" / "policy_dcp").exists()  # only the latest checkpoint is kept
    assert all(m[M.TRAIN_STEPS] > 0 and not math.isnan(m[M.KL]) for m in result.rounds)
    tok = AutoTokenizer.from_pretrained(tiny)
    texts = [(p["messages"], d) for p, (_, d) in zip(split.held_out[:3], docs[100:103], strict=True)]
    served = [sum(x) for x in tiny_sync_pool.completion_logprobs(texts)]
    items = [(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"],
              tok(t, add_special_tokens=False)["input_ids"]) for m, t in texts]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    assert served == pytest.approx(sequence_logprobs(exported, items), abs=1e-3)
    assert max(abs(a - b) for a, b in zip(served, sequence_logprobs(original, items), strict=True)) > 1e-2


# -- engines asleep while a round trains (GPU colocation) -----------------------------------------------------


class _RecordingPool:
    """Records sleep and wake calls. vLLM's sleep mode is GPU-only, so no real pool here can sleep."""

    def __init__(self):
        self.calls: list[str] = []

    def sleep(self):
        self.calls.append("sleep")

    def wake_up(self):
        self.calls.append("wake_up")


def test_engines_sleep_while_a_round_trains_and_wake_after_an_error():
    from stages.dpo.loop import engines_asleep

    pool = _RecordingPool()
    with engines_asleep(pool, True):
        pool.calls.append("train")
    with pytest.raises(RuntimeError), engines_asleep(pool, True):
        pool.calls.append("train")
        raise RuntimeError("worker died")
    with engines_asleep(pool, False):
        pool.calls.append("train")
    assert pool.calls == ["sleep", "train", "wake_up", "sleep", "train", "wake_up", "train"]


@pytest.mark.slow
def test_sleep_mode_on_cpu_engines_is_refused_before_anything_runs(tiny_pool, tiny, tmp_path):
    from stages.dpo import online_dpo

    cfg = OnlineDPOConfig(sleep_engines_while_training=True)
    with pytest.raises(ValueError, match="sleep_engines_while_training: .* GPU-only"):
        online_dpo(tiny, tiny_pool, None, [], [], [], [], cfg, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_adafactor_with_fsdp2_is_refused_before_anything_runs():
    """transformers' Adafactor fails on FSDP2's DTensor parameters at the first step (found by
    ``benchmarks.dpo --workers 2 --optim adafactor``): the config refuses the combination and names the fix."""
    with pytest.raises(ValueError, match="Adafactor.*fix: optim: adamw_torch"):
        OnlineDPOConfig(optim="adafactor", distributed={"backend": "ray", "num_workers": 2, "strategy": "fsdp2"})
    OnlineDPOConfig(optim="adafactor", distributed={"backend": "ray", "num_workers": 2, "strategy": "none"})
    OnlineDPOConfig(optim="adafactor")  # the local trainer (the embedded default) is unaffected
