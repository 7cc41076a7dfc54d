"""The SFT set's thinking modes: the template the policy trains and serves with, and each row rendered in its mode
(slow: reasoning in think markers then the final answer; fast: the empty think block then the answer) with the
switch the template supports (``enable_thinking`` or the ``/think`` ``/no_think`` text), at a configured ratio.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.thinking import (
    FINAL_FIELD,
    MODE_FIELD,
    NO_THINK,
    REASONING_FIELD,
    TEMPLATE_ARG,
    THINK,
    ThinkFormat,
    apply_switch,
    detect_format,
    render_answer,
    split_reasoning,
    think_chatml_template,
)

ENABLE_THINKING_COLUMN = "enable_thinking"
"""Staged SFT column: the row's ``enable_thinking`` chat-template argument (None with the text switch)."""


class SFTThinking(BaseModel):
    """Fast and slow thinking in SFT: rows of both modes, the switch in the template argument or the prompt."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    think_ratio: float = Field(0.5, ge=0, le=1)
    """Fraction of SFT rows trained in slow mode, chosen among the rows with reasoning (slow answers of the answer
    stage's `thinking`) by a seeded hash of their id; the rest are trained fast on their final answer."""


def serving_template(tokenizer: Any) -> str:
    """The template the policy trains and serves with: its own when it has think markers, our ChatML one
    (``configs/chat_templates/chatml_think.jinja``) for a ChatML template without them (SmolLM2)."""
    template = tokenizer.chat_template
    if detect_format(tokenizer) is not None:
        return template
    if isinstance(template, str) and "<|im_start|>" in template:
        return think_chatml_template()
    raise ValueError("sft.thinking: the model's chat template has no think markers and is not ChatML; fix: give the "
                     "model a template with <think> markers (and enable_thinking), or drop sft.thinking")


def _unit(seed: int, rid: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:think:{rid}".encode()).digest()[:8], "big") / 2**64


def _reasoning_and_final(rec: dict) -> tuple[str | None, str]:
    """The record's reasoning and final answer: its fields, else split from the last assistant message."""
    if rec.get(FINAL_FIELD) is not None:
        return rec.get(REASONING_FIELD) or None, rec[FINAL_FIELD]
    text = next(m["content"] for m in reversed(rec["messages"]) if m["role"] == "assistant")
    split = split_reasoning(text)
    return split.reasoning or None, split.final


def mix_modes(records: Sequence[dict], cfg: SFTThinking, fmt: ThinkFormat, seed: int) -> tuple[list[dict], dict]:
    """Each record rendered in its mode: (rows with `messages`, `mode`, `enable_thinking`; counts).

    ``round(think_ratio * len(records))`` rows are slow: the records with reasoning first by a seeded hash of their
    id (fewer when fewer have reasoning, counted in ``think_short``); the others are fast.
    """
    parsed = [_reasoning_and_final(rec) for rec in records]
    want = round(cfg.think_ratio * len(records))
    with_reasoning = sorted((i for i, (reasoning, _) in enumerate(parsed) if reasoning),
                            key=lambda i: _unit(seed, str(records[i]["id"])))
    slow = set(with_reasoning[:want])
    rows, modes = [], Counter()
    for i, (rec, (reasoning, final)) in enumerate(zip(records, parsed, strict=True)):
        mode = THINK if i in slow else NO_THINK
        prompt = rec["messages"][:-1] if rec["messages"][-1]["role"] == "assistant" else rec["messages"]
        messages, kwargs = apply_switch(prompt, mode, fmt)
        messages.append({"role": "assistant", "content": render_answer(reasoning, final, mode, fmt)})
        rows.append({**rec, "messages": messages, MODE_FIELD: mode, ENABLE_THINKING_COLUMN: kwargs.get(TEMPLATE_ARG)})
        modes[mode] += 1
    if want and not slow:
        raise ValueError("sft.thinking.think_ratio > 0 but no SFT record has reasoning; fix: enable "
                         "stages.answer.thinking with the think mode (slow answers), or set think_ratio: 0")
    counts = {"think_rows": modes[THINK], "no_think_rows": modes[NO_THINK],
              "think_fraction": round(modes[THINK] / max(1, len(rows)), 4),
              "think_short": want - len(slow), "switch": fmt.switch, "think_family": fmt.family}
    return rows, counts
