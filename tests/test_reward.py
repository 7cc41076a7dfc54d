"""Reward model: TRL RewardTrainer on real preference pairs (CPython docstrings), batched scoring on Ray
actors, pair files and held-out splits, configured existing reward models."""

from __future__ import annotations

import json

import pytest

from pipeline.models.catalog import ModelError
from reward.score import RewardPool, RewardPoolConfig, RewardScorer, conversation
from reward.train import check_reward_model, load_pairs_file, pairwise_accuracy, split_pairs


@pytest.mark.slow
def test_trained_reward_model_ranks_held_out_pairs(tiny_reward_model, ray_session):
    rm = tiny_reward_model
    assert rm["metrics"]["train_steps"] > 0 and rm["metrics"]["train_pairs"] == len(rm["train"])
    held = rm["held"]
    assert len(held) >= 40
    truncated = [p for p in held if p["rejected_kind"] == "truncated"]
    with RewardPool(rm["path"], RewardPoolConfig(num_workers=2, chunk_size=16, batch_size=8)) as pool:
        acc = pairwise_accuracy(pool.score, held)
        acc_truncated = pairwise_accuracy(pool.score, truncated)
        convs = [conversation(p["prompt"], p["chosen"][0]["content"]) for p in held[:40]]
        remote = pool.score(convs)
        pids = {pid for pid in __import__("ray").get([a.pid.remote() for a in pool.actors])}
    # Chance is 0.5; a trainer that ignored or flipped the preference would land at or below it. The random
    # tiny base learns completeness (complete answer over one cut short: ~0.97 measured) but not relevance
    # (another function's docstring: ~0.4-0.5); the embedded 135M default learns both (0.96 overall measured).
    assert acc_truncated["accuracy"] >= 0.85 and acc_truncated["pairs"] >= 20, acc_truncated
    assert acc["accuracy"] > 0.55 and acc["margin"] > 0, acc
    # Chunks spread over two actors (two processes) come back in input order, equal to in-process scoring.
    assert len(pids) == 2
    local = RewardScorer(rm["path"]).score(convs)
    assert remote == pytest.approx(local, abs=1e-4)
    assert len(set(round(s, 4) for s in local)) > 10  # not a constant head


def test_pair_files_are_normalized_and_errors_name_file_row_and_field(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps({"prompt": "What does `len` do?", "chosen": "Return the number of items.",
                                "rejected": "It sorts."}) + "\n")
    [pair] = load_pairs_file(good)
    assert pair["prompt"] == [{"role": "user", "content": "What does `len` do?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "Return the number of items."}]
    assert pair["source"] == "user" and pair["id"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl row 0: missing field\(s\) rejected"):
        load_pairs_file(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl does not exist; fix: correct reward\.extra_pairs"):
        load_pairs_file(tmp_path / "missing.jsonl")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"prompt": "p", "chosen": 3, "rejected": "r"}]))
    with pytest.raises(ValueError, match=r"wrong\.json row 0: field 'chosen' must be a string or a list"):
        load_pairs_file(wrong)


def test_held_out_split_is_stable_when_pairs_are_added():
    pairs = [{"id": f"p{i}"} for i in range(200)]
    train, held = split_pairs(pairs, 0.2)
    assert 20 <= len(held) <= 60 and len(train) + len(held) == 200
    more_train, more_held = split_pairs(pairs + [{"id": f"q{i}"} for i in range(100)], 0.2)
    assert {p["id"] for p in held} <= {p["id"] for p in more_held}
    assert {p["id"] for p in train} <= {p["id"] for p in more_train}
    # A tiny set still holds one pair out, so the accuracy is measured on something.
    assert len(split_pairs(pairs[:3], 0.01)[1]) == 1


def test_held_out_pairs_come_from_items_the_training_pairs_never_use():
    """Pairs of one seed chunk (several instructions and responses of one item) land on one side of the split."""
    pairs = [{"id": f"p{i}-{j}", "seed_id": f"seed{i}"} for i in range(60) for j in range(3)]
    train, held = split_pairs(pairs, 0.3)
    assert held and train
    assert not {p["seed_id"] for p in train} & {p["seed_id"] for p in held}
    assert len(held) % 3 == 0


@pytest.mark.slow
def test_configured_reward_model_is_checked(tiny_reward_model, embedded_models):
    assert check_reward_model(tiny_reward_model["path"]) == tiny_reward_model["path"]
    causal = embedded_models["tiny-moe"]
    with pytest.raises(ModelError, match=rf"{causal} is not a reward model .*num_labels"):
        check_reward_model(causal)


def _pair(chosen: str, rejected: str, source: str = "critique") -> dict:
    return {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "source": source}


def test_trivially_separable_pairs_and_accuracy_per_group():
    from reward.train import trivially_separable
    from stages.reward import BUILTIN_SOURCE, held_out_accuracies

    assert trivially_separable(_pair("the whole answer here", "the whole")) == "prefix"
    assert trivially_separable(_pair("an answer", "  ")) == "empty"
    assert trivially_separable(_pair("one answer", "another answer")) is None
    assert trivially_separable(_pair("short", "short and longer")) is None  # the chosen is the prefix: not trivial

    def longer_is_better(convs):  # a "reward model" that only prefers length: it wins every truncation pair
        return [float(len(c[-1]["content"])) for c in convs]

    held = [_pair("a complete answer", "a complete", BUILTIN_SOURCE),  # trivial, won
            _pair("right", "wrong but long", BUILTIN_SOURCE),          # not trivial, lost
            _pair("the filter's good answer", "bad")]                   # the filter's own pair, not trivial, won
    acc = held_out_accuracies(longer_is_better, held)
    assert acc["eval_accuracy"] == pytest.approx(2 / 3)
    assert (acc["eval_accuracy_builtin"], acc["eval_pairs_builtin"]) == (0.5, 2)
    assert (acc["eval_accuracy_filter_pairs"], acc["eval_pairs_filter"]) == (1.0, 1)
    assert (acc["eval_accuracy_nontrivial"], acc["eval_pairs_nontrivial"]) == (0.5, 2)


# -- GPU settings (checked on CPU: only the options built and the devices of the tensors) --------------------------

def test_gpu_and_dtype_settings_validate():
    from pydantic import ValidationError

    from reward.train import RewardModelConfig

    pool = RewardPoolConfig()
    assert (pool.num_gpus_per_worker, pool.dtype) == (0, "auto")  # CPU stays the default
    assert RewardPoolConfig(num_gpus_per_worker=0.5, dtype="bfloat16").num_gpus_per_worker == 0.5
    for bad in ({"num_gpus_per_worker": -1}, {"dtype": "float16"}):
        with pytest.raises(ValidationError):
            RewardPoolConfig(**bad)
    assert RewardModelConfig().num_gpus == "auto" and RewardModelConfig(num_gpus=0.5).num_gpus == 0.5
    for bad in ({"num_gpus": 2}, {"num_gpus": -1}, {"num_gpus": "all"}, {"dtype": "fp16"}):
        with pytest.raises(ValidationError):
            RewardModelConfig(**bad)


def test_dtype_follows_the_device():
    import torch

    from reward.score import torch_dtype
    from reward.train import uses_bf16

    assert torch_dtype("auto", "cpu") == torch.float32 and torch_dtype("auto", "cuda") == torch.bfloat16
    assert torch_dtype("auto", torch.device("cuda", 1)) == torch.bfloat16
    assert torch_dtype("float32", "cuda") == torch.float32 and torch_dtype("bfloat16", "cpu") == torch.bfloat16
    assert uses_bf16("auto", cuda=True) and uses_bf16("bfloat16", cuda=True)
    assert not uses_bf16("float32", cuda=True) and not uses_bf16("auto", cuda=False)  # CPU trains in float32


def test_scoring_actors_request_their_gpus():
    """The options ``RewardPool`` gives its actors; Ray validates them (no GPU needed to build them)."""
    import ray

    from reward.score import _ScorerActor, actor_options, scorer_device

    cpu = RewardPoolConfig(num_cpus_per_worker=2)
    assert actor_options(cpu)["num_gpus"] == 0 and scorer_device(cpu) == "cpu"
    assert actor_options(cpu)["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    gpu = RewardPoolConfig(num_gpus_per_worker=0.5, dtype="bfloat16")
    opts = actor_options(gpu, {"EXTRA": "1"})
    assert (opts["num_cpus"], opts["num_gpus"], scorer_device(gpu)) == (1.0, 0.5, "cuda")
    assert opts["runtime_env"]["env_vars"]["EXTRA"] == "1"
    ray.remote(_ScorerActor).options(**opts)  # accepted by Ray as actor options


def test_reward_training_task_requests_the_gpu_it_trains_on():
    import ray

    from reward.train import RewardModelConfig
    from stages.reward import train_task_options

    auto = RewardModelConfig()
    assert train_task_options(auto, cluster_gpus=True, env={})["num_gpus"] == 1
    assert train_task_options(auto, cluster_gpus=False, env={})["num_gpus"] == 0
    assert train_task_options(RewardModelConfig(num_gpus=0), cluster_gpus=True, env={})["num_gpus"] == 0
    opts = train_task_options(RewardModelConfig(num_gpus=0.5), cluster_gpus=False, env={"EXTRA": "1"})
    assert (opts["num_cpus"], opts["num_gpus"], opts["max_calls"]) == (1, 0.5, 1)
    assert opts["runtime_env"]["env_vars"]["EXTRA"] == "1"
    ray.remote(**opts)(lambda: None)  # accepted by Ray as task options


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_batches_are_built_on_the_given_device(device):
    from reward.score import batch_tensors

    ids, mask = batch_tensors([[5, 6, 7], [8]], pad_id=0, device=device)
    assert ids.device.type == device and mask.device.type == device
    if device == "cpu":
        assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.fixture(scope="module")
def random_head_reward_model(embedded_models, tmp_path_factory):
    """The tiny dense model with a random scalar head (no training: only shapes and devices matter here)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm") / "random_head"
    AutoModelForSequenceClassification.from_pretrained(embedded_models["tiny-dense"], num_labels=1).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_models["tiny-dense"]).save_pretrained(path)
    return path


def test_scorer_sends_inputs_to_the_models_device(random_head_reward_model):
    """The model is moved to ``meta`` (standing in for a GPU): every input of its forward must be there too."""
    import torch

    convs = [conversation([{"role": "user", "content": "q" * n}], "answer") for n in (1, 30, 5)]
    scorer = RewardScorer(random_head_reward_model, batch_size=2)
    assert scorer.model.dtype == torch.float32 and scorer.model.device.type == "cpu"
    scores = scorer.score(convs)
    assert scores == pytest.approx(RewardScorer(random_head_reward_model, batch_size=1).score(convs), abs=1e-4)
    assert RewardScorer(random_head_reward_model, dtype="bfloat16").model.dtype == torch.bfloat16

    seen = []

    class Reached(Exception):
        pass

    def record(module, args, kwargs):
        seen.extend(t.device.type for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        raise Reached

    scorer.model.to("meta")
    scorer.model.register_forward_pre_hook(record, with_kwargs=True)
    with pytest.raises(Reached):
        scorer.score(convs)
    assert seen and set(seen) == {"meta"}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_scorer_on_cuda_without_a_gpu_says_what_to_fix(random_head_reward_model):
    with pytest.raises(RuntimeError, match="torch sees no CUDA device.*num_gpus_per_worker to 0"):
        RewardScorer(random_head_reward_model, device="cuda")
