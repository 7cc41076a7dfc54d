"""Self-consistency: final-answer extraction (math-verify for numbers and expressions, choice
letters, short answers), majority voting with an agreement threshold, code checked by running
tests (real code: the standard library's ``colorsys.rgb_to_hsv``, and a broken copy of it), and
what the check does to records. Arithmetic questions are drawn by the test with their true results."""

from __future__ import annotations

import colorsys
import inspect
import random

import pytest

from critique.consistency import (
    ConsistencyConfig,
    answer_kind,
    apply_consistency,
    extract_answer,
    extract_choice,
    extract_short,
    run_code_tests,
    vote,
)

CFG = ConsistencyConfig()


def _arith(seed: int) -> tuple[str, int, int]:
    rng = random.Random(seed)
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    return f"What is {a} * {b}?", a, b


def test_math_answers_in_many_forms_agree_and_wrong_ones_do_not():
    q, a, b = _arith(1)
    right = a * b
    responses = [
        f"{a} * {b} = {right}. The answer is {right}.",
        f"Multiplying, we get $\\boxed{{{right}}}$.",
        f"First {a} * 10 = {a * 10}, and so on; the final answer is {right:,}.",  # thousands separator
        f"{a} * {b} = {right + 10}",  # wrong
    ]
    result = vote(responses, "math", CFG)
    assert result["checked"] and result["agreement"] == 0.75
    assert result["agrees"] == [True, True, True, False]
    assert result["majority"] == str(right)
    # Equivalent forms of one value agree (math-verify), e.g. a fraction and a decimal.
    half = vote(["The answer is $\\frac{1}{2}$.", "It is 0.5.", "So 1/2 of it."], "math", CFG)
    assert half["agreement"] == 1.0


def test_threshold_and_no_majority_policy():
    q, a, b = _arith(2)
    answers = [a * b, a * b + 1, a * b + 2, a * b]
    record = {"id": "m1", "instruction": q, "domain": "math",
              "responses": [{"text": f"The answer is {x}.", "rejected_by": None, "rule_reasons": []} for x in answers]}
    out, counts = apply_consistency([record], CFG)
    rec = out[0]
    assert rec["agreement"] == 0.5 and rec["answer_kind"] == "math"
    assert [r["rejected_by"] for r in rec["responses"]] == [None, "consistency", "consistency", None]
    assert "disagrees with the majority" in rec["responses"][1]["rule_reasons"][0]
    # A cut-off response gives no answer, whatever number it stopped at.
    cut = {**record, "responses": [dict(r) for r in record["responses"]]}
    cut["responses"][3].update(rejected_by="truncation", rule_reasons=["truncation: finish_reason=length"])
    out, _ = apply_consistency([cut], CFG)
    assert out[0]["responses"][3]["answer"] is None and out[0]["agreement"] == 0.25
    strict = ConsistencyConfig(min_agreement=0.75)
    out, counts = apply_consistency([record], strict)
    assert counts["records_no_majority"] == 1
    assert all(r["rejected_by"] == "consistency" and "no majority" in r["rule_reasons"][0]
               for r in out[0]["responses"])
    out, _ = apply_consistency([record], ConsistencyConfig(min_agreement=0.75, on_no_majority="keep_all"))
    assert all(r["rejected_by"] is None for r in out[0]["responses"]) and out[0]["agreement"] == 0.5


def test_open_questions_and_other_domains_are_not_checked():
    record = {"id": "w", "instruction": "Why do we indent code?", "domain": "reasoning", "responses": [
        {"text": "Indentation shows the structure of the program to the reader."},
        {"text": "Because Python uses it to group statements into blocks."}]}
    out, counts = apply_consistency([record], CFG)
    assert out[0]["agreement"] is None and counts["records_unchecked"] == 1
    assert all(not r.get("rejected_by") for r in out[0]["responses"])
    assert answer_kind({"domain": "writing"}, CFG) is None
    assert answer_kind({"domain": "unknown", "task_type": "math"}, CFG) == "math"
    out, _ = apply_consistency([{**record, "domain": "math"}], ConsistencyConfig(enabled=False))
    assert out[0]["agreement"] is None
    one = {**record, "domain": "math", "responses": record["responses"][:1]}
    assert apply_consistency([one], CFG)[0][0]["agreement"] is None  # k=1: nothing to compare


def test_choice_and_short_answers():
    assert [extract_choice(t) for t in ["The answer is (B).", "I pick option c.", "C) because it halts", "none"]] == \
        ["B", "C", "C", None]
    assert extract_short("After checking each case, the answer is: The Eiffel Tower.", 6) == "eiffel tower"
    assert extract_short("Yes, because the loop ends.", 6) == "yes"
    assert extract_short("The answer is that it depends on a great many different things at once.", 6) is None
    result = vote(["Yes, it halts.", "yes", "No, it loops forever."], "short", CFG)
    assert (result["majority"], result["agreement"]) == ("yes", 2 / 3)
    with pytest.raises(ValueError, match="unknown answer kind"):
        extract_answer("x", "essay", CFG)  # type: ignore[arg-type]


def test_code_with_tests_runs_in_a_separate_interpreter():
    source = inspect.getsource(colorsys.rgb_to_hsv)
    broken = source.replace("maxc = max(r, g, b)", "maxc = min(r, g, b)")
    assert broken != source
    inputs = [(1.0, 0.0, 0.0), (0.2, 0.4, 0.4), (0.5, 0.5, 0.1)]
    tests = [f"assert rgb_to_hsv{x} == {colorsys.rgb_to_hsv(*x)!r}" for x in inputs]
    good_answer = f"Here it is:\n\n```python\n{source}```\n"
    bad_answer = f"Try this:\n\n```python\n{broken}```\n"
    assert run_code_tests(good_answer, tests, 10) == "pass"
    assert run_code_tests(bad_answer, tests, 10) == "fail"
    assert run_code_tests("No code here.", tests, 10) is None
    hang = "```python\nwhile True:\n    pass\n```"
    assert run_code_tests(hang, tests, 1) == "fail"  # the time limit holds
    record = {"id": "c", "instruction": "Convert RGB to HSV.", "domain": "code", "tests": tests,
              "responses": [{"text": good_answer}, {"text": bad_answer}, {"text": good_answer}]}
    out, _ = apply_consistency([record], CFG)
    assert out[0]["agreement"] == pytest.approx(2 / 3)
    assert [r.get("rejected_by") for r in out[0]["responses"]] == [None, "consistency", None]
    # Without tests, code answers are not compared.
    out, _ = apply_consistency([{**record, "tests": None}], CFG)
    assert out[0]["agreement"] is None
