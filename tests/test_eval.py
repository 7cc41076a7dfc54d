"""The eval stage's pieces without an engine: IFEval's prompts from the installed wheel, the IFEval checkers on
hand-written responses (cases in the style of Google's own ``instructions_test.py``: a response that follows an
instruction and one that does not), the strict/loose rules, the figures of a model and the paired bootstrap.

The engine-backed parts (greedy answers through the pool, `posttrain eval --json`, the stage through the runner)
are in test_eval_engine.py.
"""

from __future__ import annotations

import json

import pytest

from critique.ifeval import check_response, count_sentences, score_prompt, unknown_instructions
from stages.eval import final_model, load_prompts, paired_gains, summarize
from stages.eval.benchmark import IFEVAL_PROMPTS, BenchmarkError
from stages.eval.metrics import ACCURACIES, SUMMARY_KEYS, gain_keys
from stages.eval.stats import paired_bootstrap

END = "Is there anything else I can help with?"


def test_ifeval_prompts_come_from_the_installed_wheel():
    rows = load_prompts("ifeval")
    assert len(rows) == IFEVAL_PROMPTS == 541
    assert len({r["key"] for r in rows}) == 541
    assert all(len(r["instruction_id_list"]) == len(r["kwargs"]) >= 1 for r in rows)
    assert unknown_instructions({i for r in rows for i in r["instruction_id_list"]}) == []
    assert [r["key"] for r in load_prompts("ifeval", limit=7)] == [r["key"] for r in rows[:7]]
    with pytest.raises(BenchmarkError, match="unknown benchmark 'mmlu'"):
        load_prompts("mmlu")


@pytest.mark.parametrize(("instruction", "kwargs", "follows", "breaks"), [
    ("punctuation:no_comma", {}, "no commas here at all", "one, two"),
    ("change_case:english_lowercase", {}, "all of this is lower case", "This starts with a capital"),
    ("change_case:english_capital", {}, "ALL OF THIS IS UPPER CASE", "NOT ALL of it"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "just three words",
     "this answer has far more than five words in it"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "this answer has at least five words", "too short"),
    ("detectable_format:json_format", {}, '{"answer": 42}', "answer: 42"),
    ("detectable_format:json_format", {}, '```json\n{"answer": [1, 2]}\n```', "{answer: 42"),
    ("startend:end_checker", {"end_phrase": END}, f"Here you go. {END}", f"{END} Here you go."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\n\nP.S. see you", "Hello, see you"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Send [name] to [address].",
     "Send [name] to the office."),
    ("detectable_format:title", {}, "<<A Poem>>\nRoses are red", "A Poem\nRoses are red"),
    ("keywords:existence", {"keywords": ["banana", "kiwi"]}, "A kiwi and a banana.", "A kiwi and an apple."),
    ("keywords:forbidden_words", {"forbidden_words": ["red"]}, "The sky is blue.", "The rose is red."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one\n* two\n* three"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.",
     "Only one part."),
    ("startend:quotation", {}, '"All of it quoted."', "Not quoted at all."),
])
def test_checkers_tell_a_response_that_follows_from_one_that_does_not(instruction, kwargs, follows, breaks):
    ok = check_response(follows, [instruction], [kwargs])
    bad = check_response(breaks, [instruction], [kwargs])
    assert ok == {"strict": [True], "loose": [True]}, (instruction, follows)
    assert bad["strict"] == [False], (instruction, breaks)


def test_loose_accepts_a_response_whose_first_line_or_markup_breaks_the_rule():
    # A chatty first line breaks "all lower case" strictly; the loose rules drop it.
    verdict = check_response("Sure! Here it is:\nall lower case after the first line", ["change_case:english_lowercase"],
                             [{}])
    assert verdict == {"strict": [False], "loose": [True]}
    # A bold marker around the end phrase breaks the strict end check; the loose rules remove '*'.
    verdict = check_response(f"Done. **{END}**", ["startend:end_checker"], [{"end_phrase": END}])
    assert verdict == {"strict": [False], "loose": [True]}


def test_a_prompt_counts_only_when_every_instruction_is_followed():
    row = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"],
           "kwargs": [{}, {}]}
    assert score_prompt(row, "no commas and lower case") == {
        "strict": [True, True], "loose": [True, True], "prompt_strict": True, "prompt_loose": True}
    half = score_prompt(row, "no commas But A Capital")
    assert half["strict"] == [True, False] and half["prompt_strict"] is False and half["prompt_loose"] is False


def test_an_empty_response_follows_nothing():
    # "no comma" is trivially true of an empty string; IFEval counts an empty response as not following.
    assert check_response("", ["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}]) == {
        "strict": [False, False], "loose": [False, False]}


def test_sentences_are_split_without_punkt_data():
    assert count_sentences("The first one. The second one! And a third?") == 3
    assert check_response("One sentence. Two sentences.", ["length_constraints:number_sentences"],
                          [{"num_sentences": 3, "relation": "less than"}])["strict"] == [True]
    assert check_response("One. Two. Three. Four.", ["length_constraints:number_sentences"],
                          [{"num_sentences": 3, "relation": "less than"}])["strict"] == [False]


def test_checker_inputs_are_checked():
    with pytest.raises(ValueError, match="no checker for instruction"):
        check_response("x", ["made_up:rule"], [{}])
    with pytest.raises(ValueError, match="kwargs"):
        check_response("x", ["punctuation:no_comma"], [])


def _scored(verdicts: list[tuple[list[bool], list[bool]]], finish: list[str], tokens: list[int]) -> list[dict]:
    return [{"key": k, "strict": s, "loose": lo, "prompt_strict": all(s), "prompt_loose": all(lo),
             "finish_reason": f, "n_tokens": n}
            for k, ((s, lo), f, n) in enumerate(zip(verdicts, finish, tokens, strict=True))]


def test_summary_figures_of_a_model():
    scored = _scored([([True, True], [True, True]), ([True, False], [True, True]), ([False], [False])],
                     ["stop", "length", "stop"], [10, 40, 30])
    s = summarize(scored, "ifeval", "m")
    assert list(s) == list(SUMMARY_KEYS)
    assert s["n"] == 3 and s["model"] == "m" and s["benchmark"] == "ifeval"
    assert s["prompt_strict"] == round(1 / 3, 4) and s["prompt_loose"] == round(2 / 3, 4)
    assert s["instruction_strict"] == 0.6 and s["instruction_loose"] == 0.8  # 3/5 and 4/5 instructions
    assert s["truncated_fraction"] == round(1 / 3, 4) and s["mean_tokens"] == round(80 / 3, 4)


def test_paired_bootstrap_intervals():
    same = paired_bootstrap([1, 0, 1, 0], [1, 0, 1, 0], seed=3)
    assert same == {"gain": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    always = paired_bootstrap([1] * 20, [0] * 20, seed=3)
    assert always == {"gain": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    mixed = [1, 1, 1, 0, 1, 0, 1, 1, 0, 1] * 3
    base = [0, 1, 0, 0, 1, 0, 0, 1, 0, 1] * 3
    g = paired_bootstrap(mixed, base, seed=0)
    assert g["gain"] == pytest.approx(0.3)
    assert 0.0 < g["ci_low"] < 0.3 < g["ci_high"] <= 0.6
    assert paired_bootstrap(mixed, base, seed=0) == g  # same seed, same interval
    # Instruction level: hits over a per-prompt count (2 of 4 vs 1 of 4 -> +0.25).
    assert paired_bootstrap([2, 0], [1, 0], counts=[2, 2], seed=0)["gain"] == pytest.approx(0.25)
    assert paired_bootstrap([1], [0])["ci_low"] is None
    with pytest.raises(ValueError, match="one value per prompt"):
        paired_bootstrap([1, 0], [1])


def test_paired_gains_keys_and_mismatched_prompts():
    a = _scored([([True], [True])] * 4, ["stop"] * 4, [5] * 4)
    b = _scored([([False], [True])] * 4, ["stop"] * 4, [5] * 4)
    gains = paired_gains({"start": b, "sft": a, "final": b}, samples=200)
    for accuracy in ACCURACIES:
        assert {*gain_keys("sft_vs_start", accuracy), *gain_keys("final_vs_start", accuracy)} <= set(gains)
    assert gains["sft_vs_start_prompt_strict_gain"] == 1.0 and gains["sft_vs_start_prompt_loose_gain"] == 0.0
    assert gains["final_vs_start_prompt_strict_gain"] == 0.0
    with pytest.raises(ValueError, match="same prompts"):
        paired_gains({"start": b, "final": b[:3]}, samples=200)


def test_final_model_of_a_run_directory(tmp_path):
    run = tmp_path / "run"
    (run / "models" / "sft_model").mkdir(parents=True)
    (run / "config.yaml").write_text("run_dir: x\n")
    with pytest.raises(ValueError, match="without a finished model"):
        final_model(run)
    (run / "models" / "sft_model" / "config.json").write_text(json.dumps({}))
    assert final_model(run) == str(run / "models" / "sft_model")
    (run / "models" / "dpo_model").mkdir()
    (run / "models" / "dpo_model" / "config.json").write_text(json.dumps({}))
    assert final_model(run) == str(run / "models" / "dpo_model")
    assert final_model("tiny-moe") == "tiny-moe"
