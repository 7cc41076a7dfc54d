"""Fast and slow thinking: the two answer modes, how a model's chat template switches between them, the rendering of
an answer in each mode and the split of a generated text into (reasoning, final answer).

Slow (``think``): ``<think>\\nREASONING\\n</think>`` then the final answer. Fast (``no_think``): the empty block
``<think>\\n\\n</think>`` then the answer, where the template puts it in the generation prompt. The switch is detected
from the chat template, not assumed: a template that reads ``enable_thinking`` (Qwen3, Hunyuan-A13B, ours) takes the
chat-template argument; any other template gets the ``/think`` / ``/no_think`` text switch at the end of the prompt.
Hunyuan-A13B writes its final answer between ``<answer>`` tags (its template names ``<|extra_0|>``; the tags are the
model's output format, as vLLM's hunyuan_a13b reasoning parser reads them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

THINK = "think"
"""Slow thinking: reasoning, then the final answer."""
NO_THINK = "no_think"
"""Fast thinking: the final answer directly (after the empty think block)."""
MODES: tuple[str, str] = (THINK, NO_THINK)
Mode = Literal["think", "no_think"]
MODE_FIELD = "mode"
"""Record field naming the mode of an answer, an SFT row, a DPO prompt or pair, an eval sample."""
REASONING_FIELD = "reasoning"
"""Record field with the reasoning of a slow answer (None for a fast one)."""
FINAL_FIELD = "final"
"""Record field with the final answer (the whole answer of a fast one)."""

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
TEMPLATE_ARG = "enable_thinking"
"""The chat-template argument of templates that switch modes themselves."""
SWITCH_TEXT = {THINK: "/think", NO_THINK: "/no_think"}
"""The text switch, appended to the last user message."""
DEFAULT_EMPTY_BLOCK = "<think>\n\n</think>\n\n"

CHAT_TEMPLATES = Path(__file__).resolve().parent.parent / "configs" / "chat_templates"
THINK_CHATML_TEMPLATE = CHAT_TEMPLATES / "chatml_think.jinja"
"""Our ChatML template with think markers (plain text) and ``enable_thinking``, for the embedded SmolLM2 policies."""


@dataclass(frozen=True)
class ThinkFormat:
    """How one chat template writes and switches the two modes."""

    family: str
    """``hunyuan`` (answer in <answer> tags), ``chatml`` (Qwen3 and ours) or ``other``."""
    switch: Literal["template_arg", "prompt_text"]
    """template_arg: ``enable_thinking`` goes to the template; prompt_text: ``/think`` or ``/no_think`` in the prompt."""
    empty_block: str
    """What a fast answer starts with (the template's own when it writes one)."""

    @property
    def separator(self) -> str:
        """What follows ``</think>`` before the answer."""
        return self.empty_block.split(THINK_CLOSE, 1)[1] or "\n"


def _render(tokenizer: Any, template: str, messages: list[dict], **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def detect_format(tokenizer: Any, template: str | None = None) -> ThinkFormat | None:
    """The think format of ``template`` (default: the tokenizer's own), or None when it knows no think markers.

    A template that renders the generation prompt differently with ``enable_thinking=False`` takes the argument, and
    what it adds is the empty block; a template that only names ``<think>`` gets the text switch.
    """
    template = template if template is not None else tokenizer.chat_template
    if not isinstance(template, str) or (THINK_OPEN not in template and TEMPLATE_ARG not in template):
        return None
    family = "hunyuan" if "<|extra_0|>" in template else ("chatml" if "<|im_start|>" in template else "other")
    probe = [{"role": "user", "content": "u1"}]
    on = _render(tokenizer, template, probe, add_generation_prompt=True, enable_thinking=True)
    off = _render(tokenizer, template, probe, add_generation_prompt=True, enable_thinking=False)
    if off != on and off.startswith(on) and THINK_CLOSE in off[len(on):]:
        added = off[len(on):]
        return ThinkFormat(family=family, switch="template_arg", empty_block=added[added.index(THINK_OPEN):])
    return ThinkFormat(family=family, switch="prompt_text", empty_block=DEFAULT_EMPTY_BLOCK)


def require_format(tokenizer: Any, where: str) -> ThinkFormat:
    """``detect_format`` or a ValueError naming ``where`` and the fix."""
    fmt = detect_format(tokenizer)
    if fmt is None:
        raise ValueError(f"{where}: the chat template has no think markers ({THINK_OPEN} or {TEMPLATE_ARG}); fix: "
                         f"serve a model whose template has them (the SFT stage with `thinking` writes "
                         f"{THINK_CHATML_TEMPLATE.name} into a ChatML policy)")
    return fmt


def _wrap_final(final: str, fmt: ThinkFormat) -> str:
    final = final.strip()
    return f"{ANSWER_OPEN}\n{final}\n{ANSWER_CLOSE}" if fmt.family == "hunyuan" else final


def render_answer(reasoning: str | None, final: str, mode: str, fmt: ThinkFormat) -> str:
    """The assistant text of an answer in ``mode``: the reasoning in think markers, or the empty block, then the
    final answer (in <answer> tags for Hunyuan)."""
    check_mode(mode)
    if mode == THINK:
        if not reasoning or not reasoning.strip():
            raise ValueError("a slow (think) answer needs its reasoning; fix: render it in no_think mode")
        return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}{fmt.separator}{_wrap_final(final, fmt)}"
    return fmt.empty_block + _wrap_final(final, fmt)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown thinking mode {mode!r}; fix: use one of {list(MODES)}")
    return mode


def apply_switch(messages: list[dict], mode: str, fmt: ThinkFormat | None) -> tuple[list[dict], dict[str, Any]]:
    """(messages, chat-template kwargs) that ask for ``mode``: ``enable_thinking`` for a template that takes it, else
    the text switch at the end of the last user message (also when ``fmt`` is None)."""
    check_mode(mode)
    if fmt is not None and fmt.switch == "template_arg":
        return list(messages), {TEMPLATE_ARG: mode == THINK}
    return text_switch(messages, mode), {}


def text_switch(messages: list[dict], mode: str) -> list[dict]:
    """A copy of ``messages`` whose last user message ends with ``/think`` or ``/no_think``."""
    check_mode(mode)
    out = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(out) if m["role"] == "user"), default=None)
    if last is None:
        raise ValueError("the text switch needs a user message")
    out[last]["content"] = f"{out[last]['content'].rstrip()} {SWITCH_TEXT[mode]}"
    return out


@dataclass(frozen=True)
class Split:
    """A generated text split at its think markers."""

    reasoning: str | None
    """The reasoning (None: no think block; "" : an empty block, a fast answer)."""
    final: str
    """The final answer (answer tags removed)."""
    closed: bool
    """False when a think block was opened and never closed (the reasoning was cut off)."""

    @property
    def mode(self) -> str:
        """The mode the text is in: think when it carries reasoning."""
        return THINK if self.reasoning else NO_THINK


def split_reasoning(text: str) -> Split:
    """Split ``text`` into reasoning and final answer at ``<think>`` / ``</think>`` (and Hunyuan's answer tags)."""
    head, sep, tail = text.partition(THINK_CLOSE)
    if not sep:
        if THINK_OPEN in text:  # opened, never closed: cut off while reasoning
            return Split(reasoning=text.split(THINK_OPEN, 1)[1].strip(), final="", closed=False)
        return Split(reasoning=None, final=_strip_answer_tags(text), closed=True)
    reasoning = head.split(THINK_OPEN, 1)[1] if THINK_OPEN in head else head
    return Split(reasoning=reasoning.strip(), final=_strip_answer_tags(tail), closed=True)


def _strip_answer_tags(text: str) -> str:
    text = text.strip()
    if text.startswith(ANSWER_OPEN):
        text = text[len(ANSWER_OPEN):]
        text = text.split(ANSWER_CLOSE, 1)[0]
    return text.strip()


def follows_mode(text: str, mode: str) -> bool:
    """Whether a generated text is in ``mode``: reasoning present for think, absent for no_think."""
    return split_reasoning(text).mode == check_mode(mode)


def think_chatml_template() -> str:
    """Our ChatML template with think markers (``configs/chat_templates/chatml_think.jinja``)."""
    return THINK_CHATML_TEMPLATE.read_text()
