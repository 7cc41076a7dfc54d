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
