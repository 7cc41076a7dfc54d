"""Grading (instruction, response) pairs with a critique model served by the worker pool.

``grade_pairs`` sends one critique request per pair, parses every output, and applies the
configured policy to outputs that do not parse: ``retry`` (ask again with another seed, up to
``max_retries`` times, then fall back to ``after_retries``), ``drop`` (the pair gets no grade and
is dropped), or ``lowest_tier`` (the pair gets tier 1). Parse statistics come back with the grades
so that the parse rate of the critique model is measured on every run.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from critique.parse import ParsedCritique, parse_critique
from critique.prompts import DEFAULT_PROMPTS, critique_messages, load_prompts
from critique.rubric import DIMENSIONS, MIN_TIER, Critique


class CritiqueConfig(BaseModel):
    """The critique model: 4-tier grading of every response that passed the rules."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enabled: bool = True
    """Grade with the critique model (False: every kept response gets tier `default_tier`)."""
    prompts: str = DEFAULT_PROMPTS
    """Critique prompt file: rubric, template, few-shot examples (relative: current folder, then
    this repository)."""
    few_shot: bool = True
    """Show the prompt file's few-shot examples (False for a critic fine-tuned on the format with
    stages/sft/critic.py, which was trained without them)."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature of the first attempt (0: greedy, the most format-faithful)."""
    samples: int = Field(1, ge=1, le=16)
    """Critiques sampled per pair (use a temperature > 0 with more than 1): the pair gets the median tier of
    those that parse (the lower median for an even count), each dimension its median score, and the reason of a
    critique with that tier. A 135M critic's single greedy grade is close to noise; the median of several
    samples is steadier (``python -m benchmarks.critic`` measures it)."""
    max_tokens: int = Field(96, ge=16)
    """Longest critique in tokens (the format needs about 40 plus the reason)."""
    max_chars: int = Field(3000, ge=200)
    """Responses longer than this are shown to the critic clipped (start and end kept); the
    instruction gets half of it. Keeps prompts inside the critic's context."""
    on_unparseable: Literal["retry", "drop", "lowest_tier"] = "retry"
    """What to do with a critique that does not parse: retry, drop the pair, or give it tier 1."""
    max_retries: int = Field(2, ge=0)
    """Retries per pair with policy retry."""
    retry_temperature: float = Field(0.8, ge=0)
    """Temperature of retries (a greedy retry would repeat the same output)."""
    after_retries: Literal["drop", "lowest_tier"] = "drop"
    """Policy retry: what happens to a pair still unparseable after `max_retries`."""
    default_tier: int = Field(3, ge=1, le=4)
    """Tier given to every kept response when `enabled` is false."""


def grade_pairs(pairs: Sequence[tuple[str, str]], seeds: Sequence[int], cfg: CritiqueConfig, pool,
                progress=None) -> tuple[list[Critique], dict[str, int]]:
    """Grade ``pairs`` of (instruction, response) with the critique model in ``pool``.

    ``seeds`` (one per pair, e.g. ``record_seed(run_seed, response_id)``) make the requests and the
    few-shot rotation reproducible. Returns one ``Critique`` per pair (status "dropped", tier None:
    unparseable and dropped by policy) and
    counts: requests, ok, partial (parsed with something missing), unparseable_first (first
    attempt did not parse), retried, recovered (parsed on a retry), dropped, lowest_tier,
    fewer_examples / clipped (prompts shortened to fit the critic's context).
    """
    from pipeline.engines.pool import ChatRequest

    if len(pairs) != len(seeds):
        raise ValueError(f"grade_pairs: {len(pairs)} pairs but {len(seeds)} seeds")
    prompts = load_prompts(cfg.prompts)
    stats = dict.fromkeys(("pairs", "requests", "ok", "partial", "unparseable_first", "retried", "recovered",
                           "dropped", "lowest_tier", "fewer_examples", "clipped"), 0)
    stats["pairs"] = len(pairs)
    if not cfg.enabled:
        return [Critique(tier=cfg.default_tier, scores=dict.fromkeys(DIMENSIONS), status="default", attempts=0)
                for _ in pairs], stats
    fit = _prompt_fitter(pool, cfg)
    messages, fits = [], []
    for (ins, resp), seed in zip(pairs, seeds, strict=True):
        msgs, how = fit(lambda n_ex, chars, ins=ins, resp=resp, seed=seed: critique_messages(
            ins, resp, prompts, rotation=seed, max_chars=chars, few_shot=cfg.few_shot, max_examples=n_ex),
            len(prompts.examples) if cfg.few_shot else 0)
        if how:
            stats[how] += 1
        messages.append(msgs)
        fits.append(how)
    results: list[Critique | None] = [None] * len(pairs)
    raw: list[str] = [""] * len(pairs)
    attempts = [0] * len(pairs)
    todo = list(range(len(pairs)))
    max_attempts = 1 + (cfg.max_retries if cfg.on_unparseable == "retry" else 0)
    for attempt in range(max_attempts):
        if not todo:
            break
        temperature = cfg.temperature if attempt == 0 else cfg.retry_temperature
        requests = [ChatRequest(messages=messages[i], n=cfg.samples, temperature=temperature, top_p=1.0,
                                max_tokens=cfg.max_tokens, seed=(seeds[i] + attempt * 7919) % (2**31),
                                stop=list(prompts.stop) or None) for i in todo]
        outs = pool.generate(requests, progress=progress if attempt == 0 else None)
        stats["requests"] += len(requests)
        if attempt > 0:
            stats["retried"] += len(requests)
        still = []
        for i, out in zip(todo, outs, strict=True):
            text, parsed = _median_critique([c.text for c in out.completions] or [""])
            raw[i] = text
            attempts[i] += 1
            if parsed.status == "unparseable":
                if attempt == 0:
                    stats["unparseable_first"] += 1
                still.append(i)
                continue
            if attempt > 0:
                stats["recovered"] += 1
            stats[parsed.status] += 1
            results[i] = Critique(tier=parsed.tier, scores=parsed.scores, reason=parsed.reason, status=parsed.status,
                                  attempts=attempts[i], raw=text, prompt_fit=fits[i])
        todo = still
    fallback = cfg.after_retries if cfg.on_unparseable == "retry" else cfg.on_unparseable
    for i in todo:
        if fallback == "lowest_tier":
            stats["lowest_tier"] += 1
            results[i] = Critique(tier=MIN_TIER, scores=dict.fromkeys(DIMENSIONS), reason="unparseable critique",
                                  status="lowest_tier", attempts=attempts[i], raw=raw[i], prompt_fit=fits[i])
        else:
            stats["dropped"] += 1
            results[i] = Critique(tier=None, scores=dict.fromkeys(DIMENSIONS), reason="unparseable critique",
                                  status="dropped", attempts=attempts[i], raw=raw[i], prompt_fit=fits[i])
    return results, stats  # type: ignore[return-value]


def _median_critique(texts: Sequence[str]) -> tuple[str, ParsedCritique]:
    """(raw text, parsed critique) of several sampled critiques of one pair: the median tier of those that parse,
    median dimension scores, and the text and reason of the first critique with the median tier. One text: it
    as parsed. None parse: the last text, unparseable."""
    parsed = [(t, parse_critique(t)) for t in texts]
    good = [(t, p) for t, p in parsed if p.status != "unparseable"]
    if len(parsed) == 1 or not good:
        return parsed[-1]
    tier = statistics.median_low([p.tier for _, p in good])
    text, pick = next((t, p) for t, p in good if p.tier == tier)
    scores = {d: statistics.median_low(v) if (v := [p.scores.get(d) for _, p in good if p.scores.get(d) is not None])
              else None for d in DIMENSIONS}
    return text, dataclasses.replace(pick, tier=tier, scores=scores)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _prompt_fitter(pool, cfg: CritiqueConfig):
    """A function (build(n_examples, max_chars) -> messages, n_examples) -> (messages, how) that fits
    the prompt into the critic's context (``pool.config.max_model_len`` minus ``max_tokens``): first
    with fewer few-shot examples, then with the response clipped harder. ``how`` names what was
    given up ("" when nothing). Without a pool (tests of the prompt alone) prompts are not measured."""
    limit = getattr(getattr(pool, "config", None), "max_model_len", None)
    path = getattr(pool, "model_path", None)
    if limit is None or path is None:
        return lambda build, n_examples: (build(n_examples, cfg.max_chars), "")
    tok = _tokenizer(str(path))
    budget = limit - cfg.max_tokens

    def n_tokens(messages) -> int:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def fit(build, n_examples: int):
        for n in range(n_examples, -1, -1):
            messages = build(n, cfg.max_chars)
            if n_tokens(messages) <= budget:
                return messages, "" if n == n_examples else "fewer_examples"
        chars = cfg.max_chars
        while chars > 200:
            chars //= 2
            messages = build(0, chars)
            if n_tokens(messages) <= budget:
                return messages, "clipped"
        raise ValueError(f"critique prompt does not fit the critic's context of {limit} tokens even without "
                         f"examples and with the response clipped to 200 characters; fix: raise "
                         f"max_model_len of the critic's model role, or lower critique.max_tokens ({cfg.max_tokens})")

    return fit


def parse_rate(stats: dict[str, int]) -> float | None:
    """Share of pairs whose FIRST critique parsed (the critique model's format fidelity)."""
    graded = stats.get("pairs", 0)
    if not graded or not stats.get("requests"):
        return None
    return 1 - stats.get("unparseable_first", 0) / graded
