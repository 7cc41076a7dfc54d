"""Iterative online DPO: loss decomposition, rounds on the real tiny MoE engines (sample -> score -> pair ->
train -> in-memory sync), resume after a kill mid-round, and the stage through the runner.

The data is real text that ships with Python (reward/stdlib_pairs.py: questions about stdlib functions,
their docstrings as answers). The policy is the random tiny MoE served by the session's `tiny_pool`; the
reward model is the session's `tiny_reward_model`. Whether two rounds raise the mean reward of the
*embedded default* (413M MoE policy, 135M reward model) is tested in tests/test_dpo_embedded.py and measured
on a larger budget by `python -m benchmarks.dpo`.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import textwrap
import typing
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pipeline.records import check_disjoint
from reward.score import RewardPool
from reward.stdlib_pairs import preference_records, prompt_records, sft_records, stdlib_docs
from stages import dpo
from stages.dpo import (
    DpoLossType,
    OnlineDPOConfig,
    best_worst_pairs,
    dpo_loss,
    kl_estimate,
    make_trainer,
    online_dpo,
    prompt_rows,
    sequence_logprobs,
    split_prompts,
    tokenize_replay,
)
from stages.dpo import local as dpo_local
from stages.dpo import rollout as dpo_rollout
from stages.dpo.evaluation import held_out_metrics, length_adjusted_gain
from stages.dpo.trainer import unpatch_forward
from tests.tensorboard_events import scalars

# Small enough for the test budget; a learning rate that moves a random tiny model in a few steps.
LOOP = dict(rounds=2, prompts_per_round=6, samples_per_prompt=4, max_tokens=16, eval_prompts=8, eval_samples=2,
            learning_rate=5e-3, batch_size=4, min_reward_gap=0.05, offline_ratio=0.5)


@pytest.fixture(scope="module")
def docs():
    return stdlib_docs()


@pytest.fixture(scope="module")
def prompts(docs):
    return prompt_rows(prompt_records([n for n, _ in docs]))


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@contextlib.contextmanager
def restored(pool, path):
    """Inside the block a test may sync other weights into the shared session engines and wrap their
    ``sync_weights``; whatever happens, they leave it with their own ``sync_weights`` and the weights of ``path``
    (the model they were started with), so no other test depends on what this one did."""
    try:
        yield pool
    finally:
        pool.__dict__.pop("sync_weights", None)
        pool.sync_weights(_load(path))


@pytest.fixture
def policy_pool(tiny_pool, embedded_models):
    """The session's `tiny_pool`, given back with its starting weights after the test (``restored``)."""
    with restored(tiny_pool, embedded_models["tiny-moe"]):
        yield tiny_pool


# -- prompts -----------------------------------------------------------------------------------------------

def test_prompt_budget_is_checked_before_any_work(prompts):
    cfg = OnlineDPOConfig(rounds=3, prompts_per_round=100, eval_prompts=20)
    with pytest.raises(ValueError, match=r"dpo needs 300 fresh prompts \(rounds=3 x prompts_per_round=100\) but "
                                         r"has \d+ training prompts.*set dpo.reuse_prompts: true"):
        split_prompts(prompts, cfg, seed=0)
    split = split_prompts(prompts, cfg.model_copy(update={"reuse_prompts": True}), seed=0)
    train, held = split.train, split.held_out
    assert len(held) == 20 and not {p["id"] for p in held} & {p["id"] for p in train}
    # Rounds take consecutive, disjoint batches; with reuse they wrap around.
    r1, r2 = dpo.round_prompts(train, 1, 100), dpo.round_prompts(train, 2, 100)
    assert not {p["id"] for p in r1} & {p["id"] for p in r2}
    with pytest.raises(ValueError, match="field 'instruction' is missing or empty"):
        prompt_rows([{"id": "x", "instruction": ""}])
    with pytest.raises(ValueError, match="dpo_weight and chosen_loss_coef are both 0"):
        OnlineDPOConfig(dpo_weight=0, chosen_loss_coef=0)


def test_paired_gain_standard_error_is_over_prompts_not_samples():
    # 3 prompts x 2 samples, prompt-major. Per-prompt mean differences: 1.0, 0.0, 2.0 -> gain 1.0, SE = stdev/sqrt(3).
    base = [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    new = [1.0, 1.0, 1.0, 1.0, 3.0, 1.0]
    m = dpo.paired_gain(new, base, samples_per_prompt=2)
    assert m["eval_reward_gain"] == pytest.approx(1.0)
    assert m["eval_reward_gain_se"] == pytest.approx(1.0 / math.sqrt(3))
    assert m["eval_win_rate"] == pytest.approx((1 + 1 + 0.5 + 0.5 + 1 + 1) / 6)
    assert m["eval_reward_sft_mean"] == pytest.approx(2 / 6) and m["eval_reward_mean"] == pytest.approx(8 / 6)
    # One prompt: no spread to estimate, reported as nan rather than a misleading 0.
    assert math.isnan(dpo.paired_gain([1.0, 2.0], [0.0, 0.0], samples_per_prompt=2)["eval_reward_gain_se"])


def test_held_out_figures_are_split_by_prompt_source():
    # Prompts e1, s1, e2 (2 samples each): the stdlib prompt gains 2.0, the evolved ones 0.0 and -1.0.
    prompts = [{"id": "e1", "source": "evolved"}, {"id": "s1", "source": "stdlib"}, {"id": "e2", "source": "evolved"}]
    base = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    new = [0.0, 0.0, 2.0, 2.0, 0.0, 0.0]
    m = dpo.held_out_metrics(prompts, {"rewards": new}, {"rewards": base}, samples_per_prompt=2)
    assert m["eval_reward_gain"] == pytest.approx(1 / 3)
    assert m["eval_reward_gain_stdlib"] == pytest.approx(2.0) and m["eval_win_rate_stdlib"] == 1.0
    assert m["eval_reward_gain_evolved"] == pytest.approx(-0.5) and m["eval_win_rate_evolved"] == 0.25
    assert m["eval_prompts_stdlib"] == 1 and m["eval_prompts_evolved"] == 2
    # One source: no per-source keys.
    assert set(dpo.held_out_metrics(prompts[:1], {"rewards": new[:2]}, {"rewards": base[:2]}, 2)) == set(
        dpo.paired_gain(new[:2], base[:2], 2))


def test_held_out_confounders_length_truncation_and_the_second_judge():
    # Two prompts x 2 samples. The policy's samples are 10 tokens longer and score 1.0 more: the whole gain is
    # explained by length (reward per token 0.1, gain at equal length 0). One pair has a truncated side.
    prompts = [{"id": "a"}, {"id": "b"}]
    sft = {"rewards": [0.0, 1.0, 2.0, 0.5], "tokens": [10, 20, 30, 5], "finish_reasons": ["stop", "stop", "length", "stop"],
           "grades": [2.0, 3.0, None, 1.0]}
    pol = {"rewards": [1.0, 2.0, 3.0, 1.5], "tokens": [20, 30, 40, 15], "finish_reasons": ["stop", "length", "stop", "stop"],
           "grades": [3.0, 3.0, 4.0, 4.0]}
    m = held_out_metrics(prompts, pol, sft, samples_per_prompt=2)
    assert m["eval_reward_gain"] == pytest.approx(1.0) and m["eval_win_rate"] == 1.0
    assert m["eval_tokens_mean"] == pytest.approx(26.25) and m["eval_sft_tokens_mean"] == pytest.approx(16.25)
    assert m["eval_truncated"] == 0.25 and m["eval_sft_truncated"] == 0.25
    assert m["eval_untruncated_pairs"] == 2 and m["eval_reward_gain_untruncated"] == pytest.approx(1.0)
    # Every pair differs by 10 tokens: no spread, so the slope is undefined and the gain is the mean difference.
    assert m["eval_reward_gain_length_adjusted"] == pytest.approx(1.0) and math.isnan(m["eval_reward_per_token"])
    # The judge graded 3 pairs on both sides: +1, 0, +3.
    assert m["eval_judge_pairs"] == 3 and m["eval_judge_gain"] == pytest.approx(4 / 3)
    assert m["eval_judge_win_rate"] == pytest.approx(2.5 / 3)
    # Rewards that follow length exactly (0.1 per token): the gain at equal length is 0.
    gain, slope = length_adjusted_gain([1.0, 2.0, -0.5, 0.0], [10, 20, -5, 0])
    assert gain == pytest.approx(0.0, abs=1e-12) and slope == pytest.approx(0.1)
    # A baseline written before lengths were recorded (rewards only): the reward figures alone.
    old = held_out_metrics(prompts, pol, {"rewards": sft["rewards"]}, samples_per_prompt=2)
    assert "eval_reward_gain" in old and "eval_tokens_mean" not in old and "eval_judge_gain" not in old


def test_stdlib_prompts_are_the_functions_the_reward_stage_does_not_use():
    docs = stdlib_docs()
    rows = dpo.stdlib_prompt_rows(5)
    assert [r["messages"][0]["content"] for r in rows] == [f"What does the Python function `{n}` do?"
                                                           for n, _ in docs[-5:]]
    assert {r["source"] for r in rows} == {"stdlib"} and dpo.stdlib_prompt_rows(0) == []
    with pytest.raises(ValueError, match=r"dpo.stdlib_prompts=100000 .* fix: set dpo.stdlib_prompts <= "):
        dpo.stdlib_prompt_rows(100_000)


def test_split_keeps_source_items_apart():
    """Prompts of one seed are one item: they go to training or to the held-out set together; items the reward
    model trained on are dropped; items the policy trains on in the rounds (offline pairs, SFT replay) are never
    held out."""
    evolved = [{"id": f"i{k}", "instruction": f"instruction {k}", "seed_id": f"s{k // 2}"} for k in range(40)]
    rows = prompt_rows(evolved)
    assert rows[0]["item"] == rows[1]["item"] == "seed:s0" != rows[2]["item"]
    cfg = OnlineDPOConfig(rounds=2, prompts_per_round=4, eval_prompts=6)
    split = split_prompts(rows, cfg, 7, reward_items={"seed:s0", "seed:s1"}, trained_items={"seed:s2", "seed:s3"})
    train_items, held_items = {p["item"] for p in split.train}, {p["item"] for p in split.held_out}
    assert split.excluded == 4 and len(split.train) + len(split.held_out) == 36
    assert len(split.held_out) == 6 and len(held_items) == 3  # three whole seeds of two prompts each
    assert not held_items & train_items and not held_items & {"seed:s2", "seed:s3"}
    assert {"seed:s2", "seed:s3"} <= train_items and not train_items & {"seed:s0", "seed:s1"}
    # Without seed ids every instruction is its own item.
    assert prompt_rows([{"id": "x", "instruction": "y"}])[0]["item"] == "id:x"
    with pytest.raises(ValueError, match="reward model and held-out share 1 source item"):
        check_disjoint({"reward model": {"seed:a", "seed:b"}, "held-out": {"seed:b"}})


# -- pairing and KL ----------------------------------------------------------------------------------------

def _result(texts, prompt_ids=(), token_ids=None, logprobs=None):
    """A stand-in for the pool's ChatResult (only the fields the rollout reads)."""
    return SimpleNamespace(prompt_token_ids=list(prompt_ids), completions=[
        SimpleNamespace(text=t, finish_reason="stop" if i % 2 == 0 else "length",
                        token_ids=token_ids[i] if token_ids else [], logprobs=logprobs[i] if logprobs else None)
        for i, t in enumerate(texts)])


def test_best_worst_pairs_pick_extremes_count_ties_and_break_score_ties_by_order():
    prompts = [{"id": "p1", "messages": [{"role": "user", "content": "q1"}]},
               {"id": "p2", "messages": [{"role": "user", "content": "q2"}]},
               {"id": "p3", "messages": [{"role": "user", "content": "q3"}]}]
    results = [_result(["a", "b", "c", "d"]), _result(["e", "f"]), _result(["g", "h"])]
    # p1: samples 1 and 2 share the best score (the earlier one is chosen); p2's gap is under min_gap; p3 is flat.
    scores = [[0.1, 0.5, 0.5, -0.2], [0.3, 0.32], [1.0, 1.0]]
    pairs, ties = best_worst_pairs(prompts, results, scores, min_gap=0.05, round_index=3)
    assert ties == 2 and len(pairs) == 1
    (p,) = pairs
    assert p["chosen"] == [{"role": "assistant", "content": "b"}]
    assert p["rejected"] == [{"role": "assistant", "content": "d"}]
    assert (p["chosen_score"], p["rejected_score"]) == (0.5, -0.2)
    assert (p["chosen_finish_reason"], p["rejected_finish_reason"]) == ("length", "length")
    assert p["prompt"] == prompts[0]["messages"] and p["instruction_id"] == "p1" and p["n_samples"] == 4
    assert p["source"] == "online_round_3" and p["round"] == 3
    # The id is stable for a prompt and round, and differs between rounds.
    again, _ = best_worst_pairs(prompts, results, scores, 0.05, 3)
    other, _ = best_worst_pairs(prompts, results, scores, 0.05, 4)
    assert again[0]["id"] == p["id"] != other[0]["id"]


def test_verifier_verdicts_outrank_reward_scores_when_pairing():
    """A prompt with constraints: the sample that follows them is chosen over higher-scored ones that do not, and
    the pair stands even where the scores tie; a prompt without constraints pairs by score alone."""
    from critique.constraints import dump
    from stages.dpo.rollout import constraint_verdicts

    no_commas = dump([{"kind": "no_commas", "params": {}, "text": "Do not use any commas."}])
    prompts = [{"id": "c1", "messages": [{"role": "user", "content": "q"}], "constraints": no_commas},
               {"id": "c2", "messages": [{"role": "user", "content": "q"}], "constraints": no_commas},
               {"id": "c3", "messages": [{"role": "user", "content": "q"}], "constraints": "[]"}]
    results = [_result(["a, b", "a b", "c, d"]), _result(["x y", "x, y"]), _result(["e, f", "g h"])]
    verdicts = constraint_verdicts(prompts, results)
    assert verdicts == [[False, True, False], [True, False], None]
    scores = [[2.0, -1.0, 0.5], [0.3, 0.3], [0.0, 1.0]]
    pairs, ties = best_worst_pairs(prompts, results, scores, min_gap=0.05, round_index=1, verdicts=verdicts)
    assert ties == 0
    got = {p["instruction_id"]: (p["chosen"][0]["content"], p["rejected"][0]["content"], p["verified"]) for p in pairs}
    # c1: the worst is the lower-scored violating sample; c2: a score tie, kept for the verdicts
    assert got == {"c1": ("a b", "c, d", True), "c2": ("x y", "x, y", True), "c3": ("g h", "e, f", False)}
    unverified, ties = best_worst_pairs(prompts, results, scores, 0.05, 1)
    assert ties == 1 and unverified[0]["chosen"][0]["content"] == "a, b"  # without verdicts: by score


def _tiny_lm():
    """A random two-layer Llama built from a config (no download): a real transformers causal LM."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _token_logprobs(model, prompt, completion):
    """log p of each completion token, one unpadded sequence at a time."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(completion)]


KL_ITEMS = [([5, 9, 2], [7, 7, 3, 1]), ([4], [8]), ([3, 3, 3, 3, 3], [2, 6]), ([11, 12], [13, 14, 15, 16, 17])]


def test_sequence_logprobs_batched_and_padded_equal_one_sequence_at_a_time():
    model = _tiny_lm()
    got = sequence_logprobs(model, KL_ITEMS + [([6, 1], [])], batch_size=2)
    expected = [sum(_token_logprobs(model, p, c)) for p, c in KL_ITEMS]
    assert got[:-1] == pytest.approx(expected, abs=1e-4) and got[-1] == 0.0
    assert not model.training


def test_kl_estimate_is_the_mean_log_ratio_of_the_sampled_tokens():
    # The "policy" logprobs are the reference's own plus 0.25 per token: KL per token 0.25, per sample 0.25 x length.
    model = _tiny_lm()
    results = [_result(["x"], p, [c], [[lp + 0.25 for lp in _token_logprobs(model, p, c)]]) for p, c in KL_ITEMS]
    kl = kl_estimate(results, model)
    lengths = [len(c) for _, c in KL_ITEMS]
    assert kl["kl_per_token"] == pytest.approx(0.25, abs=1e-4)
    assert kl["kl"] == pytest.approx(0.25 * sum(lengths) / len(lengths), abs=1e-4)
    with pytest.raises(ValueError, match="sample with logprobs=True"):
        kl_estimate([_result(["x"], [1], [[2]])], model)
    assert all(math.isnan(v) for v in kl_estimate([], model).values())


# -- loss terms -----------------------------------------------------------------------------------------------

def test_dpo_loss_formulas_on_hand_computed_values():
    # beta 0.5; log-ratios chosen [1, 0], rejected [-1, 1]; beta * (chosen - rejected) = [1, -0.5].
    t = torch.tensor
    args = (t([-1.0, -2.0]), t([-3.0, -1.0]), t([-2.0, -2.0]), t([-2.0, -2.0]), t([2.0, 4.0]), t([1.0, 2.0]))

    def softplus(x):
        return math.log1p(math.exp(x))

    expected = {
        "sigmoid": (softplus(-1.0) + softplus(0.5)) / 2,
        "hinge": (0.0 + 1.5) / 2,
        # (chosen/len - rejected/len - 1/(2 beta))^2 with lengths [2, 4] and [1, 2]: [0.5^2, (-1.5)^2]
        "ipo": (0.25 + 2.25) / 2,
        "sppo_hard": ((1 - 1) ** 2 + (-1 + 1) ** 2 + (0 - 1) ** 2 + (1 + 1) ** 2) / 2,
        "bco_pair": (2 * softplus(-0.5) + softplus(0.0) + softplus(0.5)) / 2,
    }
    for loss_type, value in expected.items():
        assert float(dpo_loss(loss_type, 0.5, *args)) == pytest.approx(value, rel=1e-6), loss_type
    with pytest.raises(ValueError, match="is not one of"):
        dpo_loss("exo_pair", 0.5, *args)


@pytest.fixture(scope="module")
def decomposition_models(embedded_models):
    path = embedded_models["tiny-moe"]
    tok = AutoTokenizer.from_pretrained(path)
    ref = _load(path).eval()
    policy = _load(path)
    torch.manual_seed(0)
    with torch.no_grad():  # policy != reference, so the DPO term is not the constant log 2
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return path, tok, policy, ref


def _loss_and_terms(models, pairs, replay, tmp_path, **cfg):
    path, tok, policy, ref = models
    c = OnlineDPOConfig(**cfg)
    trainer = make_trainer(policy, ref, tok, pairs, replay, c, 0, str(tmp_path))
    try:
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
        trainer.model.train()
        with torch.no_grad():
            loss = float(trainer.compute_loss(trainer.model, batch))
        terms = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("loss/")}
        return loss, terms, list(trainer.loss_types), trainer.router_aux_loss_coef
    finally:
        unpatch_forward(policy, ref)


@pytest.mark.slow
def test_loss_decomposition_each_term_moves_the_loss_and_is_off_at_zero(decomposition_models, docs, tmp_path):
    pairs = preference_records(docs[:4], seed=3)
    replay = tokenize_replay(decomposition_models[1], sft_records(docs[10:30]), 256)
    w, alpha, gamma = 1.0, 0.3, 0.2
    base, t, types_, coef = _loss_and_terms(decomposition_models, pairs, replay, tmp_path,
                                            dpo_weight=w, chosen_loss_coef=alpha, sft_replay_coef=gamma)
    assert types_ == ["sigmoid", "sft"] and coef > 0
    assert abs(t["loss/dpo"] - math.log(2)) > 1e-3  # a real preference signal
    # The total is exactly the documented sum of the terms TRL and we computed.
    expected = (w * t["loss/dpo"] + alpha * t["loss/chosen_nll"] + coef * t["loss/router_aux"]
                + gamma * (t["loss/replay_nll"] + coef * t["loss/replay_router_aux"]))
    assert base == pytest.approx(expected, rel=1e-5)
    assert t["loss/total"] == pytest.approx(base, rel=1e-6)

    def run(**over):
        return _loss_and_terms(decomposition_models, pairs, replay, tmp_path, **{
            "dpo_weight": w, "chosen_loss_coef": alpha, "sft_replay_coef": gamma, **over})

    # DPO term: doubling its weight adds one DPO term; weight 0 removes it from TRL's loss types.
    loss, _, _, _ = run(dpo_weight=2 * w)
    assert loss - base == pytest.approx(w * t["loss/dpo"], rel=1e-4)
    loss, t0, types0, _ = run(dpo_weight=0.0)
    assert "sigmoid" not in types0 and base - loss == pytest.approx(w * t["loss/dpo"], rel=1e-4)
    # Chosen NLL (TRL's "sft" loss type) with alpha.
    loss, _, _, _ = run(chosen_loss_coef=2 * alpha)
    assert loss - base == pytest.approx(alpha * t["loss/chosen_nll"], rel=1e-4)
    loss, _, types0, _ = run(chosen_loss_coef=0.0)
    assert types0 == ["sigmoid"] and base - loss == pytest.approx(alpha * t["loss/chosen_nll"], rel=1e-4)
    # SFT replay (ours) with gamma; at 0 no replay forward runs at all.
    replay_term = t["loss/replay_nll"] + coef * t["loss/replay_router_aux"]
    loss, _, _, _ = run(sft_replay_coef=2 * gamma)
    assert loss - base == pytest.approx(gamma * replay_term, rel=1e-4)
    loss, t0, _, _ = run(sft_replay_coef=0.0)
    assert "loss/replay_nll" not in t0 and base - loss == pytest.approx(gamma * replay_term, rel=1e-4)
    assert min(w * t["loss/dpo"], alpha * t["loss/chosen_nll"], gamma * replay_term) > 1e-2  # each one matters


LOSS_TYPE_BETA = 1.0
"""A beta at which the loss types are far from their linear range, so each one's value differs from sigmoid's."""


@pytest.fixture(scope="module")
def sigmoid_terms(decomposition_models, docs, tmp_path_factory):
    pairs = preference_records(docs[:4], seed=3)
    return _loss_and_terms(decomposition_models, pairs, [], tmp_path_factory.mktemp("sigmoid"), beta=LOSS_TYPE_BETA,
                           chosen_loss_coef=0.3, sft_replay_coef=0.0)[1]


EQUAL_TO_SIGMOID_HERE = {"aot"}
"""Loss types whose value on the test batch is sigmoid DPO's: "aot" differs from sigmoid only by pairing the
policy's and the reference's log-ratio differences in rank order, and the slightly perturbed policy ranks the
four pairs as the reference does."""


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", [t for t in typing.get_args(DpoLossType) if t != "sigmoid"])
def test_logged_dpo_term_is_the_configured_loss_type(decomposition_models, sigmoid_terms, docs, tmp_path, loss_type):
    """TRL trains on ``dpo_loss_type`` and ``loss/dpo`` logs that loss: TRL's own loss of the batch is the sum of
    the logged terms, and the logged DPO term is not sigmoid DPO's on the same batch (except where the two
    losses agree on it, ``EQUAL_TO_SIGMOID_HERE``)."""
    pairs = preference_records(docs[:4], seed=3)
    alpha = 0.3
    loss, t, types_, coef = _loss_and_terms(decomposition_models, pairs, [], tmp_path, beta=LOSS_TYPE_BETA,
                                            dpo_loss_type=loss_type, chosen_loss_coef=alpha, sft_replay_coef=0.0)
    assert types_ == [loss_type, "sft"]
    assert loss == pytest.approx(t["loss/dpo"] + alpha * t["loss/chosen_nll"] + coef * t["loss/router_aux"], abs=1e-5)
    differs = abs(t["loss/dpo"] - sigmoid_terms["loss/dpo"]) > 1e-3
    assert differs == (loss_type not in EQUAL_TO_SIGMOID_HERE), (t["loss/dpo"], sigmoid_terms["loss/dpo"])
    # The other terms do not depend on the loss type.
    assert t["loss/chosen_nll"] == pytest.approx(sigmoid_terms["loss/chosen_nll"], rel=1e-6)


# -- the rounds on the real engines ------------------------------------------------------------------------

def _inputs(docs, prompts, cfg, seed):
    split = split_prompts(prompts, cfg, seed)
    return split.train, split.held_out, preference_records(docs[:60], seed=1), sft_records(docs[:60])


@pytest.fixture(scope="module")
def two_rounds(tiny_pool, tiny_reward_model, embedded_models, docs, prompts, tmp_path_factory):
    """Two online rounds on the tiny MoE engines; what the tests check about the engines is read right
    after the run, before the engines get their starting weights back."""
    path = embedded_models["tiny-moe"]
    cfg = OnlineDPOConfig(**LOOP)
    train, held, offline, sft = _inputs(docs, prompts, cfg, seed=7)
    work = tmp_path_factory.mktemp("dpo") / "work"
    syncs = []
    with restored(tiny_pool, path):
        real_sync = tiny_pool.sync_weights
        tiny_pool.sync_weights = lambda model: syncs.append(real_sync(model)) or syncs[-1]
        with RewardPool(tiny_reward_model["path"]) as scorer:
            result = online_dpo(path, tiny_pool, scorer, train, held, offline, sft, cfg, work, seed=7)
        # The engines now serve the trained policy: compare their teacher-forced logprobs of fixed texts with
        # the trained model's and the SFT model's, computed by transformers.
        tok = AutoTokenizer.from_pretrained(path)
        texts = [(p["messages"], d) for p, (_, d) in zip(held[:4], docs[100:104], strict=True)]
        served = [sum(x) for x in tiny_pool.completion_logprobs(texts)]
        items = []
        for messages, text in texts:
            prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
            items.append((prompt_ids, tok(text, add_special_tokens=False)["input_ids"]))
        trained = sequence_logprobs(result.policy, items)
        original = sequence_logprobs(_load(path), items)
    return {"result": result, "work": work, "cfg": cfg, "syncs": syncs, "served": served, "trained": trained,
            "original": original, "inputs": (train, held, offline, sft)}


@pytest.mark.slow
def test_rounds_sample_fresh_prompts_pair_and_report_every_figure(two_rounds):
    res, cfg = two_rounds["result"], two_rounds["cfg"]
    assert [m["round"] for m in res.rounds] == [1, 2]
    held_ids = {p["id"] for p in two_rounds["inputs"][1]}
    seen = set()
    for m in res.rounds:
        assert m["pairs_online"] + m["ties"] == m["prompts"] == cfg.prompts_per_round
        assert m["samples"] == cfg.prompts_per_round * cfg.samples_per_prompt
        assert m["pairs_offline"] == round(cfg.offline_ratio * m["pairs_online"])
        ids = {p["instruction_id"] for p in res.pairs if p["round"] == m["round"]}
        assert not ids & seen and not ids & held_ids  # fresh each round, never a held-out prompt
        seen |= ids
        for key in ("reward_mean", "reward_std", "reward_margin", "kl", "rewards_accuracies", "rewards_margins",
                    "loss_total", "loss_dpo", "loss_chosen_nll", "loss_replay_nll", "loss_router_aux",
                    "eval_reward_mean", "eval_win_rate", "time_sample", "time_score", "time_train", "time_sync"):
            assert isinstance(m[key], float) and math.isfinite(m[key]), key
        assert 0 <= m["eval_win_rate"] <= 1 and m["reward_margin"] >= cfg.min_reward_gap
    for p in res.pairs:
        assert p["chosen_score"] - p["rejected_score"] >= cfg.min_reward_gap
        assert p["source"] == f"online_round_{p['round']}"
        assert p["chosen"][0]["role"] == "assistant" and p["chosen"][0]["content"] != p["rejected"][0]["content"]
    # KL to the reference: round 1 samples the SFT policy itself (KL ~ 0, up to vLLM vs transformers
    # numerics); round 2 samples the trained policy.
    kl1, kl2 = res.rounds[0]["kl_per_token"], res.rounds[1]["kl_per_token"]
    assert abs(kl1) < 2e-3, kl1
    assert kl2 > 10 * max(abs(kl1), 1e-4), (kl1, kl2)


@pytest.mark.slow
def test_pool_serves_the_trained_policy_after_the_in_memory_sync(two_rounds):
    # One sync to the starting policy, then one per round; no engine restarts (the same two engines).
    assert len(two_rounds["syncs"]) == 3 and all(s["workers"] == 2 for s in two_rounds["syncs"])
    served, trained, original = two_rounds["served"], two_rounds["trained"], two_rounds["original"]
    for s, t, o in zip(served, trained, original, strict=True):
        assert s == pytest.approx(t, abs=0.05 + 1e-3 * abs(t)), (s, t)
        assert abs(s - o) > 10 * abs(s - t) + 0.5, (s, t, o)


@pytest.mark.slow
def test_resume_after_a_kill_mid_round_continues_that_round(two_rounds, policy_pool, tiny_reward_model,
                                                           embedded_models, tmp_path, monkeypatch):
    """Kill (an exception) during round 2's training, after its pairs were saved; the rerun loads round 1's
    checkpoint, syncs it, reuses round 2's pairs (no resampling) and ends with the same weights as the
    uninterrupted run."""
    path = embedded_models["tiny-moe"]
    cfg, (train, held, offline, sft) = two_rounds["cfg"], two_rounds["inputs"]
    work = tmp_path / "work"
    real_train = dpo_local.train_round
    calls = []

    def killed_in_round_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(dpo_local, "train_round", killed_in_round_two)
    with RewardPool(tiny_reward_model["path"]) as scorer:
        with pytest.raises(KeyboardInterrupt):
            online_dpo(path, policy_pool, scorer, train, held, offline, sft, cfg, work, seed=7)
        assert (work / "round_001" / "metrics.json").is_file() and (work / "round_001" / "policy").is_dir()
        assert (work / "round_002" / "pairs.jsonl").is_file() and not (work / "round_002" / "metrics.json").exists()
        monkeypatch.setattr(dpo_local, "train_round", real_train)
        sampled = []
        real_sample = dpo_rollout.sample
        monkeypatch.setattr(dpo_rollout, "sample", lambda *a, **k: sampled.append(a[5]) or real_sample(*a, **k))
        result = online_dpo(path, policy_pool, scorer, train, held, offline, sft, cfg, work, seed=7)
    assert sampled == ["dpo-eval"]  # neither round 1, nor round 2's samples, nor the SFT baseline again
    assert [m["round"] for m in result.rounds] == [1, 2]
    assert "time_sample" not in result.rounds[1] and "time_train" in result.rounds[1]
    uninterrupted = two_rounds["result"]
    assert [p["id"] for p in result.pairs] == [p["id"] for p in uninterrupted.pairs]
    for key in ("loss_total", "rewards_accuracies", "eval_reward_mean"):
        assert result.rounds[1][key] == pytest.approx(uninterrupted.rounds[1][key], rel=1e-4, abs=1e-5), key
    a, b = dict(result.policy.named_parameters()), dict(uninterrupted.policy.named_parameters())
    assert all(torch.allclose(a[n], b[n], atol=1e-5) for n in a)
    assert not (work / "round_001" / "policy").exists()  # only the latest round's weights are kept


# -- through the runner ------------------------------------------------------------------------------------

class _InputsConfig(__import__("pydantic").BaseModel):
    model_config = __import__("pydantic").ConfigDict(extra="forbid", use_attribute_docstrings=True)

    docs: int = 60
    """Stdlib functions whose docstrings make the pairs and SFT rows."""


def _run_inputs(ctx) -> None:
    """Test-only upstream stage: the SFT policy (a copy of the tiny MoE), `sft`, `preferences`, `evolved`."""
    from pipeline.models.catalog import resolve_model

    docs = stdlib_docs()
    out = ctx.output_path("sft_model")
    shutil.rmtree(out)
    shutil.copytree(resolve_model("tiny-moe"), out)
    ctx.write("sft", sft_records(docs[: ctx.config.docs]))
    ctx.write("preferences", preference_records(docs[: ctx.config.docs], seed=0))
    ctx.write("evolved", prompt_records([n for n, _ in docs]))


def _inputs_stage():
    from pipeline.run.stage import Stage

    return Stage(name="dpo_inputs", inputs=(), outputs=("sft_model", "sft", "preferences", "evolved"),
                 config_cls=_InputsConfig, run=_run_inputs)


INPUTS_STAGE = _inputs_stage()


@pytest.mark.slow
def test_reward_and_dpo_stages_through_the_runner(policy_pool, tmp_path):
    """The reward stage trains on `preferences`; the dpo stage runs on the role's running engines (the
    session's tiny MoE pool, its weights replaced by sft_model's) and records per-round figures."""
    from pipeline.run.artifacts import ArtifactStore
    from pipeline.run.config import load_config
    from pipeline.run.runner import Runner

    pool_yaml = json.dumps(policy_pool.config.model_dump(mode="json"))
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        run_dir: {tmp_path / 'run'}
        seed: 3
        plugins: ["tests.test_dpo:INPUTS_STAGE"]
        graph: [dpo_inputs, reward, dpo]
        models:
          policy: {pool_yaml}
        stages:
          reward: {{base_model: tiny-dense, learning_rate: 0.003, num_epochs: 2, max_length: 256, eval_fraction: 0.25}}
          dpo: {{rounds: 2, prompts_per_round: 4, samples_per_prompt: 3, max_tokens: 12, eval_prompts: 4,
                 learning_rate: 0.005, min_reward_gap: 0.0}}
    """))
    Runner(load_config(path), quiet=True, pools=[policy_pool]).run()
    store = ArtifactStore(tmp_path / "run")
    reward = store.read_manifest("reward")
    assert reward["state"] == "done" and reward["metrics"]["eval_pairs"] >= 5
    assert reward["metrics"]["eval_accuracy"] > 0.5
    manifest = store.read_manifest("dpo")
    assert manifest["state"] == "done"
    rounds = manifest["metrics"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and manifest["metrics"]["online_pairs"] == len(
        store.read_dataset("online_pairs"))
    for r in rounds:
        for key in ("reward_mean", "reward_std", "reward_margin", "kl", "rewards_accuracies", "rewards_margins",
                    "loss_dpo", "loss_chosen_nll", "loss_replay_nll", "loss_router_aux", "eval_win_rate"):
            assert key in r, key
    series = [json.loads(line) for line in (tmp_path / "run" / "stages" / "dpo" / "metrics.jsonl").read_text()
              .splitlines()]
    assert [row["step"] for row in series] == [1, 2] and all("eval_win_rate" in row for row in series)
    pairs = store.read_dataset("online_pairs").to_list()
    assert {p["source"] for p in pairs} <= {"online_round_1", "online_round_2"} and pairs
    # TensorBoard got the trainers' curves (reward model; each DPO round) and the per-round stage figures.
    tracking = tmp_path / "run" / "tracking"
    assert scalars(tracking / "reward")["train/loss"]
    for r in (1, 2):
        assert scalars(tracking / "dpo" / f"round_{r:03d}")["train/loss"], r
    stage = scalars(tracking / "dpo")
    for key in ("eval_win_rate", "reward_mean", "kl", "eval_reward_gain_length_adjusted", "eval_truncated"):
        assert [step for step, _ in stage[f"dpo/{key}"]] == [1, 2], key
    assert [v for _, v in stage["dpo/eval_win_rate"]] == pytest.approx([r["eval_win_rate"] for r in rounds], rel=1e-6)
    # The published policy is a plain transformers folder whose weights moved away from the SFT policy.
    published = _load(store.artifact_path("dpo_model"))
    sft = _load(store.artifact_path("sft_model"))
    assert any(not torch.equal(a, b) for a, b in zip(published.parameters(), sft.parameters(), strict=True))
