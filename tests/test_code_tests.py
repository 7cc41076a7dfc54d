"""Unit tests written for code instructions: what is kept from a model's output, the record field, and the
filter's self-consistency running responses against them in the sandbox (no model: the tests and responses are
given here; the answer stage's model-written tests are checked in test_answer's engine test)."""

from __future__ import annotations

import json

import pytest

from critique.consistency import ConsistencyConfig, apply_consistency, record_tests
from critique.verify import code_test_metrics
from stages.code_tests import parse_tests

OUTPUT = """Here are the tests:
```python
assert add(1, 2) == 3
assert add(0, 0) == 0
print("not a test")
assert add(1, 2) == 3
assert add(1,  == 2
assert add(-1, 1) == 0; import os
assert add(2, 2) == 4
assert 1 + 2 == 3
```"""


def test_only_distinct_parsing_assert_statements_are_kept():
    assert parse_tests(OUTPUT, max_tests=5) == ["assert add(1, 2) == 3", "assert add(0, 0) == 0",
                                                "assert add(2, 2) == 4"]
    assert parse_tests(OUTPUT, max_tests=1) == ["assert add(1, 2) == 3"]
    assert parse_tests("assert f(3) == 9\nsome prose", 5) == ["assert f(3) == 9"]  # no code block: the text
    assert parse_tests("I cannot write tests.", 5) == []


def test_the_record_field_reads_json_lists_and_names_bad_values():
    assert record_tests({"tests": '["assert f() == 1"]'}) == ["assert f() == 1"]
    assert record_tests({"tests": ["assert f() == 1"]}) == ["assert f() == 1"]
    assert record_tests({}) == []
    with pytest.raises(ValueError, match="record 'r'.*JSON list of assert"):
        record_tests({"id": "r", "tests": '{"a": 1}'})


def test_consistency_runs_each_response_against_the_record_tests():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    loops = "```python\ndef add(a, b):\n    while True:\n        pass\n```\n"
    tests = json.dumps(["assert add(1, 2) == 3", "assert add(2, 2) == 4"])
    rec = {"id": "c", "domain": "code", "task_type": "code_write", "tests": tests,
           "responses": [{"text": t, "rejected_by": None} for t in (good, wrong, good, "no code at all")]}
    cfg = ConsistencyConfig(code_timeout_s=3)
    (out,), counts = apply_consistency([rec], cfg)
    assert [r["answer"] for r in out["responses"]] == ["pass", "fail", "pass", None]
    assert [r["rejected_by"] for r in out["responses"]] == [None, "consistency", None, "consistency"]
    assert out["agreement"] == 0.5 and counts["rejected"] == 2
    assert code_test_metrics([out]) == {"records_with_tests": 1, "responses_run": 3, "responses_passed": 2}
    slow = {**rec, "responses": [{"text": loops, "rejected_by": None}, {"text": good, "rejected_by": None}]}
    (out,), _ = apply_consistency([slow], cfg)
    assert [r["answer"] for r in out["responses"]] == ["fail", "pass"]  # the loop is stopped, not waited for
