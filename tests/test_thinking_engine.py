"""Fast and slow thinking through real vLLM engines: SFT with `thinking` on the random tiny MoE saves our think
template, vLLM serves it, and the chat-template arguments of each request (``ChatRequest.chat_template_kwargs``)
reach the template, for generation, DPO sampling and the eval stage's per-mode and switch answers; the answer stage
answers per mode with the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pipeline.thinking import MODES, NO_THINK, THINK, THINK_CHATML_TEMPLATE, render_answer
from stages.answer_modes import RENDER_FORMAT

pytestmark = pytest.mark.slow

EMPTY = "<think>\n\n</think>\n\n"


def _records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "tier": 4, "messages": [{"role": "user", "content": f"What is {i} + 3?"},
                                                     {"role": "assistant", "content": f"It is {i + 3}."}],
             "reasoning": f"{i} plus 3 makes {i + 3}.", "final": f"It is {i + 3}."} for i in range(n)]


@pytest.fixture(scope="module")
def think_policy(embedded_models, tmp_path_factory):
    """tiny-moe after one short SFT phase with `thinking` (local backend); (folder, metrics)."""
    from stages.sft import SFTPhase, SFTStageConfig, train_sft
    from stages.sft.modes import SFTThinking

    cfg = SFTStageConfig(model=str(embedded_models["tiny-moe"]), phases=[SFTPhase(tiers=[4], epochs=1)],
                         max_steps_per_phase=2, per_device_train_batch_size=4, max_length=128,
                         heldout_fraction=0.0, thinking=SFTThinking(think_ratio=0.5),
                         distributed={"backend": "local"})
    out = tmp_path_factory.mktemp("think_sft")
    metrics = train_sft(_records(16), cfg, out / "model", out / "work", seed=0)
    return out / "model", metrics


@pytest.fixture(scope="module")
def think_pool(ray_session, think_policy):
    from pipeline.engines.pool import PoolConfig, WorkerPool

    pool = WorkerPool(PoolConfig(model=str(think_policy[0]), kv_cache_gib=1, max_model_len=512))
    yield pool
    pool.shutdown()


def test_sft_saves_the_think_template_and_mixes_modes(think_policy):
    folder, metrics = think_policy
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == THINK_CHATML_TEMPLATE.read_text()  # SmolLM2's template had no think markers
    assert metrics["thinking"]["think_rows"] > 0 and metrics["thinking"]["no_think_rows"] > 0
    assert metrics["thinking"]["switch"] == "template_arg"


def test_requests_carry_their_chat_template_arguments(think_pool, think_policy):
    from pipeline.engines.pool import ChatRequest
    from pipeline.thinking import text_switch

    tok = AutoTokenizer.from_pretrained(think_policy[0])
    user = [{"role": "user", "content": "What is 2 + 3?"}]
    args = [(user, {"enable_thinking": False}), (user, {"enable_thinking": True}), (user, None),
            (text_switch(user, NO_THINK), None)]
    requests = [ChatRequest(messages=m, max_tokens=2, temperature=0.0, chat_template_kwargs=kw) for m, kw in args]
    prompts = [tok.decode(r.prompt_token_ids) for r in think_pool.generate(requests)]
    assert [p.endswith(EMPTY) for p in prompts] == [True, False, False, True]  # in request order
    assert all(p.endswith("<|im_start|>assistant\n") for p in prompts[1:3])


def test_dpo_samples_each_prompt_in_its_mode(think_pool, think_policy):
    from pipeline.thinking import detect_format
    from stages.dpo.config import OnlineDPOConfig
    from stages.dpo.prompts import assign_modes
    from stages.dpo.rollout import sample

    tok = AutoTokenizer.from_pretrained(think_policy[0])
    prompts = assign_modes([{"id": f"p{i}", "messages": [{"role": "user", "content": f"Q{i}"}]} for i in range(8)],
                           0.5, detect_format(tok), seed=0)
    assert {p["mode"] for p in prompts} == set(MODES)
    results = sample(think_pool, prompts, 2, OnlineDPOConfig(max_tokens=4), seed=0, salt="t")
    for p, r in zip(prompts, results, strict=True):
        assert tok.decode(r.prompt_token_ids).endswith(EMPTY) == (p["mode"] == NO_THINK)


def test_eval_answers_per_mode_and_with_the_switch(think_pool):
    from pipeline.thinking import detect_format
    from stages.eval.benchmark import load_prompts
    from stages.eval.modes import mode_answers, switch_answers, switch_rates

    rows = load_prompts("ifeval", 3)
    fmt = detect_format(AutoTokenizer.from_pretrained(think_pool.model_path))
    for mode in MODES:
        answers = mode_answers(think_pool, rows, 8, mode, fmt)
        assert [a["key"] for a in answers] == [r["key"] for r in rows]
        assert all(isinstance(a["follows"], bool) and a["n_tokens"] <= 8 for a in answers)
    switched = switch_answers(think_pool, rows, 8)
    assert [a["mode"] for a in switched] == [THINK] * 3 + [NO_THINK] * 3
    assert set(switch_rates(switched)) == set(MODES)


def test_answer_stage_answers_in_both_modes(instruct_pool):
    from stages.answer import AnswerConfig, answer_instructions, answer_metrics

    records = [{"id": f"i{i}", "instruction": q, "domain": d, "task_type": "qa", "seed_id": f"s{i}",
                "source_kind": "book", "parent_id": None, "operator": None, "round": 0, "model": "m"}
               for i, (q, d) in enumerate([("A box has 3 red and 4 blue balls. How many balls are in it?", "math"),
                                           ("Name a Python keyword used to define a function.", "knowledge_qa")])]
    cfg = AnswerConfig(k=2, thinking={"modes": [THINK, NO_THINK], "think_max_tokens": 96}, max_tokens=48,
                       code_tests={"enabled": False})
    out = answer_instructions(records, cfg, lambda role: instruct_pool, run_seed=0)
    assert [(a["id"], a["mode"]) for a in out] == [("i0", THINK), ("i0", NO_THINK), ("i1", THINK), ("i1", NO_THINK)]
    assert [len(a["responses"]) for a in out] == [2, 2, 1, 1]  # k for the objective domain, in both modes
    for a in out:
        for r in a["responses"]:
            assert r["mode"] == a["mode"] and isinstance(r["final"], str)
            if r["reasoning"]:
                assert r["text"] == render_answer(r["reasoning"], r["final"], THINK, RENDER_FORMAT)
            else:
                assert r["text"] == r["final"]
            if a["mode"] == NO_THINK:
                assert r["reasoning"] is None
    metrics = answer_metrics(out)
    assert metrics["by_mode"] == {THINK: 2, NO_THINK: 2}
    assert metrics["mode_tokens"][THINK] > 0 and metrics["mode_tokens"][NO_THINK] > 0
