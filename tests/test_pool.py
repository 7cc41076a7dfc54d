"""The vLLM worker pool: request order, n samples, seeds, logprobs, finish reasons, spreading."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pipeline.engines.pool import ChatRequest

pytestmark = pytest.mark.slow  # every test runs the session's vLLM engines


def _msgs(text):
    return [{"role": "user", "content": text}]


def _topics(k):
    from pydoc_data.topics import topics

    return [f"Explain the Python topic '{name}'." for name in sorted(topics)[:k]]


def test_results_come_back_in_request_order_across_workers(tiny_pool, embedded_models):
    tok = AutoTokenizer.from_pretrained(embedded_models["tiny-moe"])
    prompts = _topics(24)
    reqs = [ChatRequest(messages=_msgs(p), n=1 + i % 3, max_tokens=4 + i % 5, seed=i) for i, p in enumerate(prompts)]
    seen = []
    results = tiny_pool.generate(reqs, progress=seen.append)
    assert len(results) == len(reqs) and sum(seen) == len(reqs)
    for req, res in zip(reqs, results, strict=True):
        expected = tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert res.prompt_token_ids == expected  # the result belongs to this request
        assert len(res.completions) == req.n
        for c in res.completions:
            assert len(c.token_ids) <= req.max_tokens
            assert c.finish_reason in ("stop", "length")
    assert {r.worker for r in results} == {0, 1}, "batches were not spread over both workers"


def test_per_request_seed_reproduces_samples_whatever_the_batch(tiny_pool):
    target = ChatRequest(messages=_msgs("Name a prime number."), n=3, temperature=1.0, max_tokens=12, seed=123)
    alone = tiny_pool.generate([target])[0]
    others = [ChatRequest(messages=_msgs(p), temperature=1.0, max_tokens=12, seed=i) for i, p in enumerate(_topics(9))]
    mixed = tiny_pool.generate(others[:5] + [target] + others[5:])[5]
    assert [c.token_ids for c in alone.completions] == [c.token_ids for c in mixed.completions]
    # n samples of one request differ from each other, and another seed gives other samples
    assert len({tuple(c.token_ids) for c in alone.completions}) > 1
    reseeded = tiny_pool.generate([ChatRequest(**{**target.__dict__, "seed": 124})])[0]
    assert [c.token_ids for c in reseeded.completions] != [c.token_ids for c in alone.completions]


def test_logprobs_and_length_finish_reason(tiny_pool):
    res = tiny_pool.generate([ChatRequest(messages=_msgs("Count to ten."), max_tokens=6, temperature=0.0,
                                          logprobs=True, seed=1)])[0]
    c = res.completions[0]
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
    assert all(lp <= 0.0 for lp in c.logprobs)
    if len(c.token_ids) == 6:
        assert c.finish_reason == "length"
    # greedy decoding picks the most likely token, so its logprob is the best the model offers:
    # teacher-forcing the same text must give the same logprobs
    forced = tiny_pool.completion_logprobs([(_msgs("Count to ten."), c.text)])[0]
    if len(forced) == len(c.logprobs):
        assert max(abs(a - b) for a, b in zip(forced, c.logprobs, strict=True)) < 1e-3


def test_real_instruct_model_answers(instruct_pool):
    """The embedded instruct model gives a stopped, non-empty answer to a real question."""
    res = instruct_pool.generate([ChatRequest(messages=_msgs("What is the capital of France?"),
                                              max_tokens=48, temperature=0.0, seed=0)])[0]
    c = res.completions[0]
    assert c.finish_reason == "stop" and c.text.strip()
