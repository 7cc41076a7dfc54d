"""Stage `filter` end to end through the graph runner, on real answers: SmolLM2-135M-Instruct (the
session's `instruct_pool`) answers questions about CPython's documentation topics and arithmetic
questions drawn by the test; the test adds defective records made from real text (a response cut
off by max_tokens, a re-encoded one, one with the chat template's next turn left in it, a duplicate
instruction). The same engine is the critique model, as in the embedded default."""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest
from pydantic import BaseModel, ConfigDict

from pipeline.run.stage import Stage, StageContext


class AnswersFileConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    path: str
    """JSON file of answer records prepared by the test."""


def _run_answers_file(ctx: StageContext) -> None:
    with open(ctx.config.path, encoding="utf-8") as f:
        ctx.write("answers", json.load(f))


ANSWERS_STAGE = Stage(name="answers_file", inputs=(), outputs=("answers",), config_cls=AnswersFileConfig,
                      run=_run_answers_file)
"""Test-only stage standing in for `answer`: it writes the records the test generated."""


def _id(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _record(instruction: str, responses: list[dict], domain: str, task_type: str, seed_id: str) -> dict:
    return {"id": _id(instruction + domain), "instruction": instruction, "domain": domain, "task_type": task_type,
            "seed_id": seed_id, "source_kind": "book", "parent_id": None, "operator": None, "round": 0,
            "model": "test", "answer_model": "smollm2-135m-instruct", "responses": responses}


def _responses(result) -> list[dict]:
    return [{"text": c.text, "model": "smollm2-135m-instruct", "finish_reason": c.finish_reason,
             "n_tokens": len(c.token_ids)} for c in result.completions]


@pytest.fixture(scope="module")
def answers(instruct_pool) -> dict:
    from pydoc_data.topics import topics

    from critique.rules import RulesConfig, check_response
    from pipeline.engines.pool import ChatRequest

    names = ["assert", "break", "continue", "del", "for", "global", "pass", "while"]
    questions = [f"In two sentences, explain the Python '{n}' statement." for n in names]
    rng = random.Random(3)
    sums = [(rng.randint(10, 60), rng.randint(10, 60)) for _ in range(2)]
    math_qs = [f"What is {a} + {b}? Reply in one sentence that ends with 'The answer is N.'" for a, b in sums]
    reqs = [ChatRequest(messages=[{"role": "user", "content": q}], n=2, max_tokens=96, temperature=0.7, seed=i)
            for i, q in enumerate(questions)]
    reqs += [ChatRequest(messages=[{"role": "user", "content": q}], n=3, max_tokens=48, temperature=0.7, seed=50 + i)
             for i, q in enumerate(math_qs)]
    cut_q = "Explain the Python 'return' statement."
    reqs.append(ChatRequest(messages=[{"role": "user", "content": cut_q}], n=1, max_tokens=12, seed=99))
    results = instruct_pool.generate(reqs)
    records = [_record(q, _responses(r), "knowledge_qa", "qa", f"pydoc:{n}")
               for q, r, n in zip(questions, results, names, strict=False)]
    records += [_record(q, _responses(r), "math", "math", "drawn")
                for q, r in zip(math_qs, results[len(questions):], strict=False)]
    truncated = _responses(results[-1])
    assert truncated[0]["finish_reason"] == "length"
    # Defects made from real text.
    source = next(" ".join(p.split()) for n in sorted(topics) for p in re.split(r"\n\s*\n", topics[n])
                  if re.search(r"[“”’—]", p) and len(p.split()) > 20)
    mojibake = source.encode("utf-8").decode("cp1252", errors="replace")
    clean = next(r["text"] for rec in records for r in rec["responses"]
                 if not check_response(r["text"], rec["instruction"], r["finish_reason"], RulesConfig()))
    leftover = clean + "<|im_end|>\n<|im_start|>user\nThanks! And the 'if' statement?"
    broken = _record("Explain the Python 'with' statement.", [
        {"text": mojibake, "model": "pydoc", "finish_reason": "stop", "n_tokens": 0},
        {"text": leftover, "model": "smollm2-135m-instruct", "finish_reason": "stop", "n_tokens": 0},
        truncated[0]], "knowledge_qa", "qa", "pydoc:with")
    dup = _record(questions[0].upper().replace(".", " !"), list(reversed(records[0]["responses"])), "knowledge_qa",
                  "qa", "pydoc:assert-copy")
    records += [broken, dup]
    return {"records": records, "broken_id": broken["id"], "dup_ids": (records[0]["id"], dup["id"]),
            "math_ids": [r["id"] for r in records if r["domain"] == "math"]}


def _config(tmp_path, answers, pool, extra: str = "") -> str:
    from pipeline.run.config import load_config

    data = tmp_path / "answers.json"
    data.write_text(json.dumps(answers["records"]))
    path = tmp_path / "run.yaml"
    path.write_text(f"""\
run_dir: {tmp_path / 'run'}
seed: 0
plugins: ["tests.test_filter:ANSWERS_STAGE"]
graph: [answers_file, filter]
shard_size: 4
models:
  critic: {json.dumps(pool.config.model_dump(mode="json"))}
stages:
  answers_file: {{path: {data}}}
  filter: {{min_tier: 2, calibration: {{items: 3}}}}
""" + extra)
    return load_config(path)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, answers, instruct_pool):
    from pipeline.run.artifacts import ArtifactStore
    from pipeline.run.runner import Runner

    tmp = tmp_path_factory.mktemp("filter")
    cfg = _config(tmp, answers, instruct_pool)
    Runner(cfg, quiet=True, pools=[instruct_pool]).run()
    store = ArtifactStore(tmp / "run")
    return {"cfg": cfg, "store": store, "manifest": store.read_manifest("filter"),
            "sft": store.read_dataset("sft").to_list(), "prefs": store.read_dataset("preferences").to_list(),
            "graded": store.read_dataset("filter_graded", stage="filter").to_list()}


@pytest.mark.slow
def test_every_response_is_accounted_for_and_defects_are_caught(filtered, answers):
    m = filtered["manifest"]
    assert m["state"] == "done"
    metrics = m["metrics"]
    funnel = metrics["funnel"]
    n_resp = sum(len(r["responses"]) for r in answers["records"])
    assert funnel[0]["responses_in"] == n_resp and funnel[0]["instructions_in"] == len(answers["records"])
    for a, b in zip(funnel, funnel[1:], strict=False):  # each filter takes what the previous left
        assert b["responses_in"] == a["responses_out"] and b["instructions_in"] == a["instructions_out"]
    assert all(row["responses_out"] <= row["responses_in"] for row in funnel)
    assert funnel[-1]["responses_out"] == len(filtered["sft"])  # one SFT row per surviving instruction
    assert [row["filter"] for row in funnel][:6] == ["truncation", "garbled", "format", "repetition", "reasoning",
                                                     "consistency"]

    by_id = {r["id"]: r for r in filtered["graded"]}
    broken = by_id[answers["broken_id"]]["responses"]
    assert [r["rejected_by"] for r in broken] == ["garbled", "format", "truncation"]
    assert any(r.startswith("garbled: mojibake") for r in broken[0]["rule_reasons"])
    assert "<|im_end|>" in broken[1]["rule_reasons"][0]
    assert "finish_reason=length" in broken[2]["rule_reasons"][0]
    # Every truncated generation is rejected, with the reason on the response.
    for rec in filtered["graded"]:
        for r in rec["responses"]:
            if r["finish_reason"] == "length":
                assert r["rejected_by"] == "truncation"
            if r["rejected_by"] is None:
                assert r["critique"] is not None and r["critique"]["tier"] is not None
    # The duplicated instruction: one copy survives, the other is dropped as a duplicate.
    first, copy = (by_id[i] for i in answers["dup_ids"])
    survivors = {row["instruction_id"] for row in filtered["sft"]}
    if first["id"] in survivors or copy["id"] in survivors:
        assert (first["id"] in survivors) != (copy["id"] in survivors)
    assert metrics["rules"]["truncation"]["rejected"] >= 2 and metrics["rules"]["garbled"]["rejected"] >= 1


@pytest.mark.slow
def test_critique_is_measured_and_outputs_have_the_contracted_form(filtered):
    metrics = filtered["manifest"]["metrics"]
    crit = metrics["critique"]
    print("critique figures:", json.dumps(crit), "tiers:", metrics["tiers"])
    assert crit["pairs"] > 0 and crit["requests"] >= crit["pairs"]
    # The prompt was designed for the 135M critic to answer in the format (few-shot turns).
    assert crit["parse_rate"] > 0.5
    assert sum(metrics["tiers"].values()) == crit["pairs"] - crit["dropped"]
    for row in filtered["sft"]:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][0]["content"] == row["instruction"]
        assert row["tier"] >= 2 and set(row["scores"]) == {"accuracy", "relevance", "completeness", "usefulness",
                                                           "clarity"}
        for field in ("id", "instruction_id", "seed_id", "domain", "task_type", "source_kind", "parent_id", "operator",
                      "round", "model", "answer_model", "critique_reason", "agreement"):
            assert field in row, field
    assert len({r["id"] for r in filtered["sft"]}) == len(filtered["sft"])
    for pair in filtered["prefs"]:
        assert pair["prompt"][0]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"
        assert pair["rejected"][0]["role"] == "assistant" and pair["source"] == "critique"
        assert pair["chosen_score"] - pair["rejected_score"] >= 1 and pair["chosen_score"] >= 2
        assert pair["chosen"][0]["content"] != pair["rejected"][0]["content"]
    # The cut-off and garbled responses to the 'with' question are ranked below a kept answer
    # when that question kept one; otherwise they are never the chosen side.
    assert not any(p["chosen"][0]["content"].startswith(("<", "Ã")) for p in filtered["prefs"])


@pytest.mark.slow
def test_the_critic_is_calibrated_on_answers_of_known_quality(filtered):
    """The filter grades the known-quality set with the same critic and reports how its tiers separate the
    references from their corruptions (3 items: 15 answers, graded once and kept as the run's shards)."""
    from critique.calibration import KINDS

    cal = filtered["manifest"]["metrics"]["critic_calibration"]
    print("critic calibration:", json.dumps(cal))
    assert cal["items"] == 3 and cal["answers"] == 15
    counted = sum(sum(t.values()) for t in cal["tiers_by_kind"].values())
    assert counted == cal["answers"] - cal["ungraded"] and set(cal["tiers_by_kind"]) == set(KINDS)
    assert 0.0 <= cal["auc"] <= 1.0
    shards = filtered["store"].read_dataset("critic_calibration", stage="filter").to_list()
    assert len(shards) == 15 and {r["kind"] for r in shards} == set(KINDS)


@pytest.mark.slow
def test_self_consistency_on_real_math_answers(filtered, answers):
    from critique.consistency import ConsistencyConfig, vote

    by_id = {r["id"]: r for r in filtered["graded"]}
    for rid in answers["math_ids"]:
        rec = by_id[rid]
        # Cut-off responses vote as "no answer".
        texts = [None if r["rejected_by"] == "truncation" else r["text"] for r in rec["responses"]]
        again = vote(texts, "math", ConsistencyConfig())
        assert rec["agreement"] == again["agreement"]  # recorded on the record
        assert [r["answer"] for r in rec["responses"]] == again["answers"]
        if rec["agreement"] is not None:
            assert rec["agreement"] == sum(again["agrees"]) / len(texts)
            for r, agrees in zip(rec["responses"], again["agrees"], strict=True):
                if not agrees and r["rejected_by"] != "truncation":
                    assert r["rejected_by"] in {"consistency", *("garbled", "format", "repetition")}
    rows = [r for r in filtered["sft"] if r["instruction_id"] in answers["math_ids"]]
    assert all(r["agreement"] is None or r["agreement"] >= 0.5 for r in rows)


@pytest.mark.slow
def test_rerun_skips_and_a_failed_run_resumes_without_regrading(filtered, instruct_pool):
    from pipeline.run.runner import Runner

    store, cfg = filtered["store"], filtered["cfg"]
    plan = {i.stage: i.action for i in Runner(cfg).plan()}
    assert plan == {"answers_file": "skip", "filter": "skip"}
    # As if the stage had been killed after grading: its graded shards are kept and reused.
    manifest = store.read_manifest("filter")
    store.write_manifest("filter", {**manifest, "state": "failed"})
    assert {i.stage: i.action for i in Runner(cfg).plan()}["filter"] == "resume"
    Runner(cfg, quiet=True, pools=[instruct_pool]).run()
    again = store.read_manifest("filter")
    assert again["state"] == "done"
    maps = again["maps"]["filter_graded"]
    assert maps["resumed"] == maps["shards"] > 1
    assert store.read_dataset("sft").to_list() == filtered["sft"]


def test_bad_input_names_the_record_and_field():
    from pipeline.run.stage import StageError
    from stages.filter import check_answers

    with pytest.raises(StageError, match=r"answers record 1 \(id=b\): missing field 'responses'"):
        check_answers([{"id": "a", "instruction": "q", "responses": []}, {"id": "b", "instruction": "q"}])
    with pytest.raises(StageError, match=r"record 0 \(id=a\): responses\[1\] has no 'text' string"):
        check_answers([{"id": "a", "instruction": "q", "responses": [{"text": "x"}, {"txt": "y"}]}])
