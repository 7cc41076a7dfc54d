"""The answer stage's thinking modes: per instruction a slow answer (reasoning, then the final answer) and/or a fast
one, how each is asked for and how a response becomes (reasoning, final answer, rendered text).

A model whose chat template has think markers (Qwen3, Hunyuan-A13B, a policy trained with ours) is asked through its
switch (``pipeline.thinking.apply_switch``) and its output split at the markers. A model without them (SmolLM2) is
asked in words: a slow answer writes its reasoning after ``Reasoning:`` and the answer after ``Answer:``, which are
parsed; a fast answer is asked as usual. The rendered text is ``<think>\\nREASONING\\n</think>\\n\\nANSWER`` (slow) or
the answer (fast); SFT renders rows again for its policy's template from ``reasoning`` and ``final``.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.run.stage import ModelRole
from pipeline.thinking import (
    DEFAULT_EMPTY_BLOCK,
    FINAL_FIELD,
    MODE_FIELD,
    NO_THINK,
    REASONING_FIELD,
    THINK,
    Mode,
    ThinkFormat,
    apply_switch,
    render_answer,
    split_reasoning,
)

RENDER_FORMAT = ThinkFormat(family="chatml", switch="template_arg", empty_block=DEFAULT_EMPTY_BLOCK)
"""The format of an answer record's rendered text (Qwen3's and ours)."""


class AnswerThinking(BaseModel):
    """Answers in both thinking modes: one answer record per instruction and mode."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    modes: list[Mode] = Field(default_factory=lambda: [THINK, NO_THINK], min_length=1)
    """Modes answered per instruction: think (reasoning, then the final answer) and/or no_think (the answer)."""
    think_role: ModelRole | None = None
    """Model role that writes the slow answers; None: the domain's route (`routes` / `model`)."""
    no_think_role: ModelRole | None = None
    """Model role that writes the fast answers; None: the domain's route."""
    reasoning_suffix: str = ("First think it through step by step after a line 'Reasoning:'. Then write your final "
                             "answer after a line 'Answer:'.")
    """Appended to the instruction of a slow answer from a model whose chat template has no think markers."""
    think_max_tokens: int = Field(512, ge=8)
    """Longest slow answer in tokens (reasoning included); fast answers keep the stage's `max_tokens`."""


def mode_role(mode: str, domain_role: str, cfg: AnswerThinking) -> str:
    """The role that answers ``mode`` for a domain routed to ``domain_role``."""
    role = cfg.think_role if mode == THINK else cfg.no_think_role
    return role or domain_role


def mode_request(messages: list[dict], mode: str, fmt: ThinkFormat | None,
                 cfg: AnswerThinking) -> tuple[list[dict], dict[str, Any]]:
    """(messages, chat-template kwargs) asking the answering model for ``mode``: its switch when its template has
    think markers (``fmt``), else the reasoning request in words for a slow answer."""
    if fmt is not None:
        return apply_switch(messages, mode, fmt)
    if mode == NO_THINK:
        return list(messages), {}
    out = [dict(m) for m in messages]
    out[-1]["content"] = f"{out[-1]['content'].rstrip()}\n\n{cfg.reasoning_suffix}"
    return out, {}


_ANSWER_LINE = re.compile(r"^[\s*#_]*(?:final\s+)?answer\s*[*_]*\s*:[*_]*", re.IGNORECASE | re.MULTILINE)
_REASONING_LINE = re.compile(r"^[\s*#_]*reasoning\s*[*_]*\s*:[*_]*", re.IGNORECASE | re.MULTILINE)


def parse_labelled(text: str) -> tuple[str, str]:
    """(reasoning, final answer) of a text written as 'Reasoning: ... Answer: ...' (the last 'Answer:' line starts
    the answer; without one the whole text is reasoning and the answer is empty)."""
    answers = list(_ANSWER_LINE.finditer(text))
    if not answers:
        head, final = text, ""
    else:
        head, final = text[:answers[-1].start()], text[answers[-1].end():]
    reasoning = _REASONING_LINE.sub("", head, count=1)
    return reasoning.strip(), final.strip()


def mode_response(text: str, mode: str, fmt: ThinkFormat | None) -> dict[str, Any]:
    """``mode``, ``reasoning`` (None when there is none), ``final`` and the rendered ``text`` of a response."""
    if fmt is not None or split_reasoning(text).reasoning is not None:
        split = split_reasoning(text)
        reasoning, final = split.reasoning or None, split.final
    elif mode == THINK:
        reasoning, final = parse_labelled(text)
        reasoning = reasoning or None
    else:
        reasoning, final = None, text.strip()
    rendered = render_answer(reasoning, final, THINK, RENDER_FORMAT) if reasoning else final
    return {MODE_FIELD: mode, REASONING_FIELD: reasoning, FINAL_FIELD: final, "text": rendered}
