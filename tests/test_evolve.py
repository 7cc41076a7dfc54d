"""evolve: operator mix, expansion aimed at under-represented domains, lineage, failed evolutions.

Planning and failure rules are checked directly on instructions built from real seed text; the
generation runs on the session engines (`instruct_pool`: real output; `tiny_pool`: noise).
"""

from __future__ import annotations

from collections import Counter

import pytest

from stages.evolve import EvolveConfig, evolve_all, evolve_jobs, plan_round, select_round
from stages.generate import INSTRUCTION_FIELDS, instruction_id
from stages.instruction_parsing import parse_instruction
from stages.taxonomy import domain_counts, expansion_targets, load_taxonomy, underrepresented


def _instruction(text: str, domain: str, task_type: str = "qa", seed: str = "seed-0") -> dict:
    return {"id": instruction_id(text), "instruction": text, "domain": domain, "task_type": task_type,
            "seed_id": seed, "source_kind": "book", "parent_id": None, "operator": None, "round": 0,
            "model": "test", "template": "text_question", "constraints": "[]"}


@pytest.fixture(scope="module")
def instructions() -> list[dict]:
    """Skewed instructions (many knowledge questions, few code, no math/writing) whose text is the
    titles of CPython's documentation topics."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    qa = [_instruction(f"What does the Python reference say about {n.replace('-', ' ')}?", "knowledge_qa",
                       seed=f"seed-{i}") for i, n in enumerate(names[:16])]
    code = [_instruction(f"Write a Python function that demonstrates {n.replace('-', ' ')}.", "code", "code_write",
                         seed=f"seed-c{i}") for i, n in enumerate(names[16:19])]
    return qa + code


def test_operator_mix_and_fraction_are_respected(instructions):
    tax = load_taxonomy()
    cfg = EvolveConfig(mix={"clarity": 1, "harder": 1, "expand": 0})
    jobs, skipped = plan_round(instructions, instructions, cfg, tax, run_seed=0, round_no=1)
    assert len(jobs) == len(instructions) and not skipped
    ops = Counter(j["operator"] for j in jobs)
    assert set(ops) == {"clarity", "harder"} and min(ops.values()) >= 3
    assert plan_round(instructions, instructions, cfg, tax, 0, 1)[0] == jobs  # deterministic
    half, skipped = plan_round(instructions, instructions, cfg.model_copy(update={"fraction": 0.5}), tax, 0, 1)
    assert 0 < len(half) < len(instructions) and skipped["not_selected"] == len(instructions) - len(half)
    long = [_instruction("Explain " + "this very long instruction " * 30, "code")]
    jobs, skipped = plan_round(long, long, cfg, tax, 0, 1)
    assert not jobs and skipped == {"too_long_to_evolve": 1}


def test_expand_aims_at_underrepresented_domains(instructions):
    tax = load_taxonomy()
    counts = domain_counts((r["domain"] for r in instructions), tax)
    lacking = underrepresented(counts, tax)
    assert lacking[:2] in (["math", "writing"], ["writing", "math"]) or set(lacking[:3]) >= {"math", "writing"}
    cfg = EvolveConfig(mix={"expand": 1})
    jobs, _ = plan_round(instructions, instructions, cfg, tax, run_seed=0, round_no=1)
    targets = Counter(j["target_domain"] for j in jobs)
    assert targets == Counter({d: n for d, n in expansion_targets(counts, tax, len(jobs)).items() if n})
    assert "knowledge_qa" not in targets  # already over its share
    assert targets["math"] > 0 and targets["writing"] > 0
    for job in jobs:
        same_domain = {r["instruction"] for r in instructions if r["domain"] == job["target_domain"]}
        assert set(job["examples"]) <= same_domain and len(job["examples"]) == min(3, len(same_domain))


@pytest.mark.parametrize("raw,reason", [
    ("", "empty"),
    ("I'm sorry, I can't rewrite that.", "refusal"),
    ("What does the Python reference say about assert?", "copy"),
    ("what does the python reference say about assert", "copy"),
    ("The answer is that assert raises AssertionError when the test fails.", "answer_not_instruction"),
    ("Assert statements raise AssertionError when the condition is false.", "answer_not_instruction"),
])
def test_failed_evolutions_are_recognized(raw, reason):
    parent = "What does the Python reference say about assert?"
    assert parse_instruction(raw, "any", copy_of=parent) == (None, reason)


def test_select_round_counts_failures_and_duplicates():
    good = "Explain, with an example, when Python's assert statement is skipped."
    cands = [
        {**_instruction(good, "knowledge_qa"), "operator": "clarity", "round": 1, "reject_reason": None},
        {**_instruction(good, "knowledge_qa"), "operator": "harder", "round": 1, "reject_reason": None},
        {**_instruction("", "math"), "id": "rejected-1", "operator": "expand", "round": 1, "reject_reason": "empty"},
    ]
    kept, reasons = select_round(cands, existing=set())
    assert [k["instruction"] for k in kept] == [good]
    assert reasons == Counter({"harder:duplicate": 1, "expand:empty": 1})


@pytest.mark.slow
def test_evolve_with_the_instruct_model_keeps_lineage(instruct_pool, instructions):
    cfg = EvolveConfig(rounds=2, mix={"clarity": 1, "harder": 1, "expand": 1}, max_tokens=64)
    evolved, metrics = evolve_all(instructions, cfg, instruct_pool, run_seed=0)
    assert evolved[: len(instructions)] == instructions  # originals survive unchanged, first
    new = evolved[len(instructions):]
    assert metrics["evolved"] == len(new)
    by_id = {r["id"]: r for r in evolved}
    assert len(by_id) == len(evolved)
    tax = load_taxonomy()
    for r in new:
        assert set(r) == set(INSTRUCTION_FIELDS)
        assert r["operator"] in ("clarity", "harder", "expand") and r["round"] in (1, 2)
        assert r["parent_id"] in by_id and r["instruction"].strip() and r["domain"] in tax.domains
        parent = by_id[r["parent_id"]]
        if r["operator"] == "expand":
            assert parent["domain"] == r["domain"] or parent["round"] == r["round"] - 1
        else:
            assert parent["round"] == r["round"] - 1 and parent["domain"] == r["domain"]
            assert parse_instruction(r["instruction"], "any", copy_of=parent["instruction"])[1] != "copy"
    rounds = metrics["rounds"]
    assert rounds[0]["jobs"] == len(instructions)
    if len(rounds) > 1:
        assert rounds[1]["jobs"] <= rounds[0]["kept"]  # round 2 evolves what round 1 produced
    attempted = sum(v["attempted"] for v in metrics["by_operator"].values())
    kept = sum(v["kept"] for v in metrics["by_operator"].values())
    assert kept == len(new) and attempted == kept + metrics["failed"]
    assert sum(metrics["failed_by_reason"].values()) == metrics["failed"]


@pytest.mark.slow
def test_noise_evolutions_are_eliminated(tiny_pool, instructions):
    cfg = EvolveConfig(rounds=1, max_tokens=24)
    jobs, _ = plan_round(instructions, instructions, cfg, load_taxonomy(), 0, 1)
    cands = evolve_jobs(jobs, cfg, tiny_pool, run_seed=0)
    assert len(cands) == len(jobs)
    assert [c["operator"] for c in cands] == [j["operator"] for j in jobs]
    failed = [c for c in cands if c["reject_reason"]]
    assert len(failed) >= 0.8 * len(cands)
    assert all(not c["instruction"] for c in failed)


def test_constrain_adds_verifiable_constraints_without_the_model(instructions):
    """The constrain operator needs no engine (``pool=None``): each instruction gets 1-3 compatible constraints,
    phrased after it and listed on the record; a constrained instruction is not evolved again."""
    from critique.constraints import compatible, record_constraints
    from stages.eval.benchmark import benchmark_overlap

    cfg = EvolveConfig(rounds=2, mix={"constrain": 1})
    evolved, metrics = evolve_all(instructions, cfg, pool=None, run_seed=0)
    new = evolved[len(instructions):]
    assert len(new) == len(instructions) and metrics["rounds"][1]["not_evolved"] == {"constrained": len(new)}
    by_id = {r["id"]: r for r in instructions}
    for r in new:
        assert set(r) == set(INSTRUCTION_FIELDS) and r["operator"] == "constrain" and r["model"] is None
        constraints = record_constraints(r)
        assert 1 <= len(constraints) <= 3 and compatible([c["kind"] for c in constraints])
        parent = by_id[r["parent_id"]]["instruction"]
        assert r["instruction"] == " ".join([parent, *(c["text"] for c in constraints)])
    assert sum(metrics["constraints_by_kind"].values()) == sum(len(record_constraints(r)) for r in new)
    again, _ = evolve_all(instructions, cfg, pool=None, run_seed=0)
    assert again == evolved  # seeded per record
    assert benchmark_overlap([r["instruction"] for r in new])["texts_overlapping"] == 0
