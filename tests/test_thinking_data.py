"""Thinking-mode data: slow answers asked for and parsed (stages/answer_modes.py), the filter's judgement of a slow
answer's final answer and its reasoning checks (critique/reasoning.py) on constructed answer records, and online
DPO pairs kept within one mode (stages/dpo/rollout.py). The engines' side is in the slow tests of test_answer.py."""

from __future__ import annotations

from pipeline.engines.pool import ChatResult, Completion
from pipeline.thinking import NO_THINK, THINK, ThinkFormat
from stages.answer_modes import AnswerThinking, mode_request, mode_response, parse_labelled
from stages.filter import FilterConfig, grade_records, select_outputs

QWEN3 = ThinkFormat(family="chatml", switch="template_arg", empty_block="<think>\n\n</think>\n\n")
INSTRUCTION = "A list holds 3 items and 4 more are appended. How many items does it hold?"


def test_slow_answers_are_asked_for_and_parsed():
    cfg = AnswerThinking()
    user = [{"role": "user", "content": INSTRUCTION}]
    messages, kwargs = mode_request(user, THINK, None, cfg)  # no think markers: asked in words
    assert messages[-1]["content"].endswith(cfg.reasoning_suffix) and kwargs == {}
    assert mode_request(user, NO_THINK, None, cfg) == (user, {})
    assert mode_request(user, NO_THINK, QWEN3, cfg) == (user, {"enable_thinking": False})
    assert parse_labelled("Reasoning: 3 and 4 more is 7.\nAnswer: 7") == ("3 and 4 more is 7.", "7")
    assert parse_labelled("**Reasoning:** a\n\n**Final answer:** b") == ("a", "b")
    assert parse_labelled("I think it is seven") == ("I think it is seven", "")
    slow = mode_response("Reasoning: 3 and 4 more is 7.\nAnswer: It holds 7 items.", THINK, None)
    assert slow == {"mode": THINK, "reasoning": "3 and 4 more is 7.", "final": "It holds 7 items.",
                    "text": "<think>\n3 and 4 more is 7.\n</think>\n\nIt holds 7 items."}
    native = mode_response("<think>\n3 plus 4.\n</think>\n\n7 items.", THINK, QWEN3)
    assert (native["reasoning"], native["final"]) == ("3 plus 4.", "7 items.")
    fast = mode_response("<think>\n\n</think>\n\nIt holds 7 items.", NO_THINK, QWEN3)
    assert (fast["reasoning"], fast["final"], fast["text"]) == (None, "It holds 7 items.", "It holds 7 items.")
    assert mode_response("It holds 7 items.", NO_THINK, None)["text"] == "It holds 7 items."


def _response(text: str, mode: str, finish_reason: str = "stop") -> dict:
    return {**mode_response(text, mode, None), "model": "m", "finish_reason": finish_reason,
            "n_tokens": len(text.split())}


def _record(mode: str, responses: list[dict]) -> dict:
    return {"id": "i1", "instruction": INSTRUCTION, "domain": "math", "task_type": "qa", "seed_id": "s1",
            "source_kind": "book", "parent_id": None, "operator": None, "round": 0, "model": "m", "mode": mode,
            "responses": responses, "answer_model": "m", "answer_role": "policy", "objective": True}


def test_filter_judges_final_answers_and_drops_disagreeing_reasoning():
    loop = " ".join(["Then I count the items again."] * 30)
    slow = _record(THINK, [
        _response("Reasoning: The list has 3 items, 4 more makes 7.\nAnswer: The answer is 7.", THINK),
        _response("Reasoning: 3 items and 4 more gives 8.\nAnswer: The answer is 7.", THINK),  # disagrees
        _response(f"Reasoning: {loop}\nAnswer: The answer is 7.", THINK),  # loops
        _response("Reasoning: 3 items, then 4 more, so", THINK),  # no final answer
    ])
    fast = _record(NO_THINK, [_response("The answer is 7.", NO_THINK)])
    cfg = FilterConfig(critique={"enabled": False}, calibration={"enabled": False})
    graded = grade_records([slow, fast], cfg, get_pool=lambda: None, run_seed=0)
    by = [r["rejected_by"] for r in graded[0]["responses"]]
    # a slow answer cut off before its final answer has an empty final answer: the rules' truncation check drops it
    assert by == [None, "reasoning", "reasoning", "truncation"], [r["rule_reasons"] for r in graded[0]["responses"]]
    reasons = [r["rule_reasons"][-1] for r in graded[0]["responses"][1:]]
    assert reasons[0].startswith("reasoning: disagreement (reasoning ends on 8, the final answer says 7)")
    assert reasons[1].startswith("reasoning: repetition")
    no_truncation_rule = cfg.model_copy(update={"rules": cfg.rules.model_copy(
        update={"enabled": [r for r in cfg.rules.enabled if r != "truncation"]})})
    again = grade_records([slow], no_truncation_rule, get_pool=lambda: None, run_seed=0)
    assert again[0]["responses"][3]["rule_reasons"][-1].startswith("reasoning: truncated")
    assert graded[0]["responses"][0]["text"] == "The answer is 7."  # the final answer is what was judged
    assert graded[0]["responses"][0]["answer"] is not None  # and what self-consistency read
    sft, prefs, metrics = select_outputs(graded, cfg)
    row = {r["filter"]: r for r in metrics["funnel"]}["reasoning"]
    assert (row["responses_in"] - row["responses_out"], row["top_reasons"]["reasoning: disagreement"]) == (2, 1)
    assert metrics["reasoning"] == {"slow_responses": 4, "missing": 0, "truncated": 0, "repetition": 1,
                                    "disagreement": 1}
    # the slow and the fast answer of one instruction are not duplicates of each other: one SFT row each
    assert sorted(r["mode"] for r in sft) == [NO_THINK, THINK]
    slow_row = next(r for r in sft if r["mode"] == THINK)
    assert slow_row["messages"][-1]["content"].startswith("<think>\nThe list has 3 items, 4 more makes 7.\n</think>")
    assert (slow_row["reasoning"], slow_row["final"]) == ("The list has 3 items, 4 more makes 7.", "The answer is 7.")
    assert all(p["mode"] == THINK for p in prefs)


def test_reasoning_checks_only_objective_disagreement():
    from critique.reasoning import last_number, reasoning_reasons
    from critique.rules import RulesConfig

    resp = _response("Reasoning: 2,000 apples and 1/2 of them.\nAnswer: 1000 apples", THINK)
    assert last_number(resp["reasoning"]) == 0.5
    assert reasoning_reasons(resp, objective=False, cfg=RulesConfig()) == []
    assert reasoning_reasons(resp, objective=True, cfg=RulesConfig())[0].startswith("reasoning: disagreement")
    assert reasoning_reasons(_response("7", NO_THINK), objective=True, cfg=RulesConfig()) == []


def _result(texts: list[str]) -> ChatResult:
    return ChatResult(prompt_token_ids=[1], completions=[Completion(text=t, token_ids=[1, 2], finish_reason="stop")
                                                         for t in texts])


def test_dpo_pairs_stay_within_one_mode():
    from stages.dpo.prompts import assign_modes
    from stages.dpo.rollout import best_worst_pairs

    prompts = [{"id": "p1", "messages": [{"role": "user", "content": "Q1"}]},
               {"id": "p2", "messages": [{"role": "user", "content": "Q2"}]}]
    prompts = [assign_modes([p], ratio, QWEN3, seed=0)[0] for p, ratio in zip(prompts, (1.0, 0.0), strict=True)]
    results = [_result(["<think>\nr\n</think>\n\nA", "no reasoning at all", "<think>\nr2\n</think>\n\nB"]),
               _result(["<think>\nr\n</think>\n\nA", "plain B", "plain C"])]
    # the off-mode sample would be best (p1) and worst (p2) by score; it is left out of pairing
    scores = [[0.1, 0.9, 0.5], [0.9, 0.5, 0.1]]
    pairs, ties = best_worst_pairs(prompts, results, scores, min_gap=0.0, round_index=1)
    assert ties == 0 and [p["mode"] for p in pairs] == [THINK, NO_THINK]
    assert (pairs[0]["chosen"][0]["content"], pairs[0]["rejected"][0]["content"]) == (
        "<think>\nr2\n</think>\n\nB", "<think>\nr\n</think>\n\nA")
    # fast samples were drawn after the template's empty block (enable_thinking=False): the pair keeps it
    assert (pairs[1]["chosen"][0]["content"], pairs[1]["rejected"][0]["content"]) == (
        QWEN3.empty_block + "plain B", QWEN3.empty_block + "plain C")
    assert pairs[1]["prompt"] == [{"role": "user", "content": "Q2"}]
    assert all(p["off_mode_samples"] == 1 for p in pairs)
    # without modes (thinking off), pairing is as before: every sample competes
    plain = [{"id": p["id"], "messages": p["messages"]} for p in prompts]
    pairs, _ = best_worst_pairs(plain, results, scores, min_gap=0.0, round_index=1)
    assert pairs[0]["chosen"][0]["content"] == "no reasoning at all" and "mode" not in pairs[0]


def test_dpo_prompts_are_asked_in_their_mode():
    from stages.dpo.prompts import assign_modes
    from stages.dpo.rollout import prompt_request

    prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"Q{i}"}]} for i in range(200)]
    arg = assign_modes(prompts, 0.25, QWEN3, seed=3)
    share = sum(p["mode"] == THINK for p in arg) / len(arg)
    assert abs(share - 0.25) < 0.08 and arg == assign_modes(prompts, 0.25, QWEN3, seed=3)
    slow = next(p for p in arg if p["mode"] == THINK)
    assert prompt_request(slow) == (slow["messages"], {"enable_thinking": True})
    text_fmt = ThinkFormat(family="other", switch="prompt_text", empty_block=QWEN3.empty_block)
    text = assign_modes(prompts[:1], 0.0, text_fmt, seed=3)[0]
    assert prompt_request(text) == ([{"role": "user", "content": "Q0 /no_think"}], {})
    assert prompt_request(prompts[0]) == (prompts[0]["messages"], {})  # thinking off: unchanged


def test_eval_reports_figures_per_mode_and_the_switch_rates():
    from stages.eval.benchmark import load_prompts
    from stages.eval.metrics import mode_figure_key, switch_rate_key
    from stages.eval.modes import EvalThinking, thinking_jobs, thinking_metrics

    rows = load_prompts("ifeval", 4)
    jobs = thinking_jobs("sft", rows, EvalThinking(switch_prompts=2), QWEN3, 64)
    assert sorted(jobs) == ["sft_no_think", "sft_switch", "sft_think"] and len(jobs["sft_switch"][0]) == 2
    answers = {
        "sft_think": [{"key": r["key"], "response": "ok", "reasoning": "r", "follows": i > 0, "finish_reason": "stop",
                       "n_tokens": 40} for i, r in enumerate(rows)],
        "sft_no_think": [{"key": r["key"], "response": "ok", "reasoning": None, "follows": True,
                          "finish_reason": "stop", "n_tokens": 10} for r in rows],
        "sft_switch": [{"key": "a", "mode": THINK, "follows": True}, {"key": "b", "mode": THINK, "follows": False},
                       {"key": "a", "mode": NO_THINK, "follows": True}, {"key": "b", "mode": NO_THINK, "follows": True}],
    }
    m = thinking_metrics("sft", rows, answers, "ifeval", "model")
    assert (m[mode_figure_key("sft", THINK, "mean_tokens")], m[mode_figure_key("sft", NO_THINK, "mean_tokens")]) == (
        40, 10)
    assert m[mode_figure_key("sft", THINK, "mode_followed")] == 0.75
    assert (m[switch_rate_key("sft", THINK)], m[switch_rate_key("sft", NO_THINK)]) == (0.5, 1.0)
    assert 0 <= m[mode_figure_key("sft", NO_THINK, "prompt_loose")] <= 1


def test_offline_pairs_are_written_as_the_policy_writes_their_mode():
    from stages.dpo.prompts import pair_in_mode

    hunyuan = ThinkFormat(family="hunyuan", switch="template_arg", empty_block="<think>\n\n</think>\n")
    slow = {"prompt": [{"role": "user", "content": "Q"}], "mode": THINK,
            "chosen": [{"role": "assistant", "content": "<think>\nR\n</think>\n\nA"}],
            "rejected": [{"role": "assistant", "content": "B without reasoning"}]}
    out = pair_in_mode(slow, hunyuan)
    assert out["chosen"][0]["content"] == "<think>\nR\n</think>\n<answer>\nA\n</answer>"
    assert out["rejected"] == slow["rejected"] and out["prompt"] == slow["prompt"]
    fast = {**slow, "mode": NO_THINK, "chosen": [{"role": "assistant", "content": "A"}],
            "rejected": [{"role": "assistant", "content": "B"}]}
    assert pair_in_mode(fast, QWEN3)["chosen"][0]["content"] == "<think>\n\n</think>\n\nA"
    text_fmt = ThinkFormat(family="other", switch="prompt_text", empty_block=QWEN3.empty_block)
    assert pair_in_mode(fast, text_fmt)["prompt"] == [{"role": "user", "content": "Q /no_think"}]
    plain = {k: v for k, v in fast.items() if k != "mode"}
    assert pair_in_mode(plain, QWEN3) is plain
