"""answer: routing domains to specialized models (two real engines), k samples for objective domains,
finish reasons and token counts."""

from __future__ import annotations

import pytest

from stages.answer import AnswerConfig, answer_instructions, answer_metrics, check_routes, route, wants_k
from stages.generate import instruction_id


def _rec(text: str, domain: str) -> dict:
    return {"id": instruction_id(text), "instruction": text, "domain": domain, "task_type": "qa",
            "seed_id": "seed-x", "source_kind": "book", "parent_id": None, "operator": None, "round": 0,
            "model": "test", "template": "text_question"}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """Instructions about real CPython documentation topics, spread over domains."""
    from pydoc_data.topics import topics

    names = sorted(topics)[:6]
    return [
        _rec(f"Write a Python function that uses {names[0]}.", "code"),
        _rec(f"What is the {names[1]} topic of the Python reference about?", "knowledge_qa"),
        _rec("A list holds 3 items and 4 more are appended. How many items does it hold?", "math"),
        _rec(f"Write a short poem about Python's {names[2]}.", "writing"),
        _rec(f"Why does Python have {names[3]}?", "reasoning"),
        _rec(f"Explain {names[4]} in Python to a beginner.", "knowledge_qa"),
    ]


def test_routes_are_checked_against_taxonomy_and_roles():
    check_routes(AnswerConfig(routes={"math": "policy"}), roles={"policy"})
    with pytest.raises(ValueError, match="unknown domain.*poetry"):
        check_routes(AnswerConfig(routes={"poetry": "policy"}))
    with pytest.raises(ValueError, match=r"model role\(s\) \['math_model'\] are not defined"):
        check_routes(AnswerConfig(routes={"math": "math_model"}), roles={"policy"})
    cfg = AnswerConfig(model="general", routes={"code": "coder"})
    assert route("code", cfg) == "coder" and route("math", cfg) == "general"


def test_constrained_instructions_get_k_responses_like_objective_domains(records):
    """A writing instruction with a checkable constraint gets k responses (the verifiers pair them); without one,
    or with `constrained_k` off, it gets one; a math instruction gets k either way."""
    from critique.constraints import dump

    writing = records[3]
    constrained = {**writing, "constraints": dump([{"kind": "lowercase", "params": {}, "text": "Use lowercase."}])}
    objective = {"math", "code", "reasoning"}
    assert wants_k(constrained, objective, AnswerConfig())
    assert not wants_k({**writing, "constraints": "[]"}, objective, AnswerConfig())
    assert not wants_k(constrained, objective, AnswerConfig(constrained_k=False))
    assert wants_k(records[2], objective, AnswerConfig(constrained_k=False))


@pytest.mark.slow
def test_domains_go_to_their_models_with_k_samples_for_objective(tiny_pool, instruct_pool, records):
    pools = {"general": instruct_pool, "tiny": tiny_pool}
    asked: list[str] = []

    def get_pool(role):
        asked.append(role)
        return pools[role]

    cfg = AnswerConfig(model="general", routes={"math": "tiny", "code": "tiny"}, k=3, max_tokens=48)
    answers = answer_instructions(records, cfg, get_pool, run_seed=0)
    assert sorted(asked) == ["general", "tiny"]  # one batch per role
    assert [a["id"] for a in answers] == [r["id"] for r in records]  # input order kept
    for rec, ans in zip(records, answers, strict=True):
        role = "tiny" if rec["domain"] in ("math", "code") else "general"
        model = pools[role].config.model
        assert ans["answer_role"] == role and ans["answer_model"] == model
        objective = rec["domain"] in ("math", "code", "reasoning")
        assert ans["objective"] is objective
        assert len(ans["responses"]) == (3 if objective else 1)
        for resp in ans["responses"]:
            assert resp["model"] == model and resp["finish_reason"] in ("stop", "length")
            assert 0 < resp["n_tokens"] <= 48
            assert resp["finish_reason"] != "length" or resp["n_tokens"] == 48
        assert {k: ans[k] for k in rec} == rec  # lineage carried over
    # the k samples of an objective instruction differ (independent samples, not copies)
    reasoning = next(a for a in answers if a["domain"] == "reasoning")
    assert len({r["text"] for r in reasoning["responses"]}) > 1
    metrics = answer_metrics(answers)
    assert metrics["by_role"] == {"tiny": 2, "general": 4}
    assert metrics["responses"] == 3 * 3 + 3
    assert metrics["response_tokens"] == sum(r["n_tokens"] for a in answers for r in a["responses"])
    # reproducible: same run seed, same responses
    again = answer_instructions(records[:2], cfg, get_pool, run_seed=0)
    assert [a["responses"] for a in again] == [a["responses"] for a in answers[:2]]


@pytest.mark.slow
def test_seeds_to_answers_through_the_runner(tmp_path, instruct_pool, tiny_pool):
    """seeds -> generate -> evolve -> answer as the runner runs them (StageContext, resumable shards,
    manifests), on the session engines handed to the runner as already running pools: math and
    code go to the `small` role (tiny MoE), the rest to `policy` (the instruct model)."""
    import json
    import sysconfig
    import textwrap

    from pipeline.run.artifacts import ArtifactStore
    from pipeline.run.config import load_config
    from pipeline.run.runner import Runner

    stdlib = sysconfig.get_paths()["stdlib"]
    policy = json.dumps(instruct_pool.config.model_dump(mode="json"))
    small = json.dumps(tiny_pool.config.model_dump(mode="json"))
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        run_dir: {tmp_path / 'run'}
        seed: 3
        graph: [seeds, generate, evolve, answer]
        shard_size: 8
        models:
          policy: {policy}
          small: {small}
        stages:
          seeds:
            sources:
              - {{kind: web, paths: ["{stdlib}/idlelib/help.html"], license: PSF-2.0, max_chunks: 2}}
              - {{kind: web_qa, paths: ["/usr/share/doc/xz-utils/faq.txt.gz"], license: public-domain, max_chunks: 2}}
              - {{kind: code, paths: ["{stdlib}/bisect.py"], license: PSF-2.0, max_chunks: 2}}
              - {{kind: book, module: "pydoc_data.topics:topics", license: PSF-2.0, max_chunks: 2}}
          generate: {{n_per_seed: 2, max_tokens: 64}}
          evolve: {{rounds: 1, max_tokens: 48}}
          answer: {{routes: {{math: small, code: small}}, k: 2, max_tokens: 32}}
    """))
    cfg = load_config(path)
    Runner(cfg, quiet=True, pools=[instruct_pool, tiny_pool]).run()
    store = ArtifactStore(tmp_path / "run")
    seeds = store.read_dataset("seeds").to_list()
    instructions = store.read_dataset("instructions").to_list()
    evolved = store.read_dataset("evolved").to_list()
    answers = store.read_dataset("answers").to_list()
    assert len(seeds) == 8 and {s["source_kind"] for s in seeds} == {"web", "web_qa", "code", "book"}
    gen = store.read_manifest("generate")["metrics"]
    assert gen["candidates"] == 16 and gen["instructions"] + gen["dropped"] == 16 == len(
        store.read_dataset("generate_candidates", stage="generate"))
    assert len(instructions) == gen["instructions"] > 0
    assert {i["seed_id"] for i in instructions} <= {s["id"] for s in seeds}
    assert evolved[: len(instructions)] == instructions
    ids = {r["id"] for r in evolved}
    assert all(r["parent_id"] in ids and r["round"] == 1 for r in evolved[len(instructions):])
    assert store.read_manifest("evolve")["metrics"]["evolved"] == len(evolved) - len(instructions)
    assert [a["id"] for a in answers] == [r["id"] for r in evolved]
    for a in answers:
        assert a["answer_role"] == ("small" if a["domain"] in ("math", "code") else "policy")
        assert len(a["responses"]) == (2 if a["objective"] else 1)
    assert store.read_manifest("answer")["metrics"]["answered"] == len(answers)
    # a second run finds every stage up to date
    assert {i.action for i in Runner(cfg).plan()} == {"skip"}


@pytest.mark.slow
def test_code_instructions_get_unit_tests_from_the_model(instruct_pool):
    """The real 135M instruct model is asked for assert statements for a code-writing instruction (greedy); what is
    kept parses and calls something (this model wrote ``assert a + b == 3``, which calls nothing and is dropped);
    other task types are not asked. The filter runs every response against kept tests (test_code_tests)."""
    import ast
    import json

    code = {**_rec("Write a Python function add(a, b) that returns the sum of a and b.", "code"),
            "task_type": "code_write"}
    asked: list[str] = []

    class Recording:  # the real pool; records the user messages it is sent
        config = instruct_pool.config

        def generate(self, requests, **kw):
            asked.extend(r.messages[-1]["content"] for r in requests)
            return instruct_pool.generate(requests, **kw)

    answers = answer_instructions([code, _rec("Why is the sky blue?", "reasoning")],
                                  AnswerConfig(k=2, max_tokens=64), lambda role: Recording(), run_seed=0)
    test_requests = [m for m in asked if "assert statements" in m]
    assert len(test_requests) == 1 and code["instruction"] in test_requests[0]  # only the code instruction
    tests = json.loads(answers[0]["tests"])
    print("model-written tests:", tests)
    assert isinstance(tests, list)
    for t in tests:
        node = ast.parse(t).body[0]
        assert isinstance(node, ast.Assert) and any(isinstance(n, ast.Call) for n in ast.walk(node.test))
    assert answers[1]["tests"] == "[]"
    assert answer_metrics(answers)["code_tests_written"] == int(bool(tests))
