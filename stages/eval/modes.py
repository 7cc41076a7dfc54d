"""The eval stage's thinking modes: IFEval per mode (answers asked for through the switch the model's template takes,
scored on their final answer) and the switch-following rate on held-out prompts (``/think`` answers with reasoning,
``/no_think`` answers without).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.thinking import MODES, ThinkFormat, apply_switch, follows_mode, split_reasoning, text_switch
from stages.eval.evaluate import score_answers, summarize
from stages.eval.metrics import FIGURES, MODE_FOLLOWED, mode_figure_key, switch_rate_key


class EvalThinking(BaseModel):
    """IFEval per thinking mode and the switch-following rate, for the evaluated models whose chat template has
    think markers (a policy trained with `stages.sft.thinking`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    per_mode: bool = True
    """Answer the benchmark once per mode (the switch the template takes) and report each mode's figures
    (`sft_think_prompt_loose`, `sft_no_think_mean_tokens`, ...), scored on the final answer."""
    switch_prompts: int = Field(32, ge=1)
    """Held-out prompts (the benchmark's first ones; no stage trains on them) asked with `/think` and with
    `/no_think` in the prompt: the switch-following rates (`sft_switch_think_rate`, `sft_switch_no_think_rate`)."""


def _request(rows: Sequence[dict], messages_of, max_tokens: int) -> list:
    from pipeline.engines.pool import ChatRequest

    requests = []
    for row in rows:
        messages, kwargs = messages_of([{"role": "user", "content": row["prompt"]}])
        requests.append(ChatRequest(messages=messages, n=1, temperature=0.0, max_tokens=max_tokens,
                                    chat_template_kwargs=kwargs or None))
    return requests


def mode_answers(pool: Any, rows: Sequence[dict], max_tokens: int, mode: str, fmt: ThinkFormat) -> list[dict]:
    """Greedy answers in ``mode``: ``{key, response (the final answer), reasoning, follows, finish_reason, n_tokens
    (reasoning included)}`` per row."""
    results = pool.generate(_request(rows, lambda m: apply_switch(m, mode, fmt), max_tokens))
    out = []
    for row, res in zip(rows, results, strict=True):
        c = res.completions[0]
        split = split_reasoning(c.text)
        out.append({"key": row["key"], "response": split.final, "reasoning": split.reasoning,
                    "follows": follows_mode(c.text, mode), "finish_reason": c.finish_reason,
                    "n_tokens": len(c.token_ids)})
    return out


def switch_answers(pool: Any, rows: Sequence[dict], max_tokens: int) -> list[dict]:
    """Greedy answers to each row with ``/think`` and with ``/no_think`` in the prompt: ``{key, mode, text, follows,
    n_tokens}``, the modes in ``MODES`` order per row."""
    out = []
    for mode in MODES:
        results = pool.generate(_request(rows, lambda m, mode=mode: (text_switch(m, mode), {}), max_tokens))
        out += [{"key": row["key"], "mode": mode, "text": res.completions[0].text,
                 "follows": follows_mode(res.completions[0].text, mode), "n_tokens": len(res.completions[0].token_ids)}
                for row, res in zip(rows, results, strict=True)]
    return out


def switch_rates(answers: Sequence[dict]) -> dict[str, float]:
    """Per mode, the fraction of the answers that follow the switch."""
    return {mode: round(statistics.fmean(a["follows"] for a in answers if a["mode"] == mode), 4)
            for mode in MODES if any(a["mode"] == mode for a in answers)}


def thinking_jobs(label: str, rows: list[dict], cfg: EvalThinking, fmt: ThinkFormat, max_tokens: int
                  ) -> dict[str, tuple[list[dict], Callable[[Any, list[dict]], list[dict]]]]:
    """The eval stage's answer jobs of one model for ``cfg``: ``<label>_<mode>`` per mode, ``<label>_switch``."""
    jobs: dict[str, tuple[list[dict], Callable[[Any, list[dict]], list[dict]]]] = {}
    if cfg.per_mode:
        for mode in MODES:
            jobs[f"{label}_{mode}"] = (rows, lambda pool, shard, mode=mode: mode_answers(pool, shard, max_tokens,
                                                                                          mode, fmt))
    jobs[f"{label}_switch"] = (rows[:cfg.switch_prompts], lambda pool, shard: switch_answers(pool, shard, max_tokens))
    return jobs


def thinking_metrics(label: str, rows: list[dict], answers: dict[str, list[dict]], benchmark: str, model: str,
                     log: logging.Logger | None = None) -> dict[str, Any]:
    """The manifest figures of ``thinking_jobs``' answers: IFEval per mode (on the final answers), the fraction of
    each mode's answers in the mode, the switch-following rates."""
    out: dict[str, Any] = {}
    for mode in MODES:
        got = answers.get(f"{label}_{mode}")
        if got is None:
            continue
        summary = summarize(score_answers(rows, got), benchmark, model)
        out.update({mode_figure_key(label, mode, f): summary[f] for f in FIGURES})
        out[mode_figure_key(label, mode, MODE_FOLLOWED)] = round(statistics.fmean(a["follows"] for a in got), 4)
    rates = switch_rates(answers[f"{label}_switch"])
    out.update({switch_rate_key(label, mode): rate for mode, rate in rates.items()})
    if log is not None:
        log.info("eval %s: switch followed %s; per mode %s", label, rates,
                 {m: (out.get(mode_figure_key(label, m, "prompt_loose")), out.get(mode_figure_key(label, m, "mean_tokens")))
                  for m in MODES})
    return out
