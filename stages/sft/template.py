"""The chat template SFT trains with: a copy of the tokenizer's template with ``{% generation %}`` markers.

TRL's assistant-only loss finds the assistant tokens through those markers. A template file from the
config is used as is; otherwise the tokenizer's own (if marked), TRL's training template for the families it
knows, or this module's marking of ChatML templates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.thinking import NO_THINK, ThinkFormat, render_answer


def _render(tokenizer, messages, template, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


_PROBES = [
    [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}],
    [{"role": "system", "content": "s1"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}],
    [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}],
]


def chatml_training_template(tokenizer) -> str | None:
    """A ChatML training template with {% generation %} around each assistant turn's content + <|im_end|>.

    TRL ships training templates only for the model families it lists (SmolLM2's is not among them),
    so ChatML templates, the most common family, are marked here. The template must render exactly
    what the tokenizer's own template renders on probe conversations, else None.
    """
    original = tokenizer.chat_template
    if not isinstance(original, str) or "<|im_start|>" not in original:
        return None
    try:
        text = _render(tokenizer, _PROBES[0], original)
    except Exception:  # a template that cannot render the probe is not one we can mark
        return None
    start = text.find("<|im_start|>user\nu1")
    if start < 0:
        return None
    default_prefix = json.dumps(text[:start], ensure_ascii=False)  # the default system turn, if any
    template = (
        "{%- for message in messages %}"
        "{%- if loop.first and message['role'] != 'system' %}{{ " + default_prefix + " }}{%- endif %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\\n' }}"
        "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    try:
        for probe in _PROBES:
            if _render(tokenizer, probe, template) != _render(tokenizer, probe, original):
                return None
        if _render(tokenizer, _PROBES[0][:1], template, True) != _render(tokenizer, _PROBES[0][:1], original, True):
            return None
    except Exception:
        return None
    return template


def training_chat_template(tokenizer, chat_template_path: str | None = None) -> str | None:
    """The chat template to train with (None: the tokenizer's own already has generation markers).

    Order: a template file given in the config; the tokenizer's own if it is marked; TRL's training
    template for known families; our ChatML marking. Otherwise a ValueError says how to fix it.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if chat_template_path is not None:
        path = Path(chat_template_path)
        if not path.is_file():
            raise ValueError(f"chat_template_path {path} does not exist; fix: point it to a .jinja template file")
        template = path.read_text()
        if not has_generation_markers(template):
            raise ValueError(f"{path} has no {{% generation %}} markers around assistant turns; fix: add them "
                             "(see TRL's chat_templates/*_training.jinja)")
        return template
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; fix: use a chat model's tokenizer or set "
                         "chat_template_path")
    if has_generation_markers(tokenizer.chat_template):
        return None
    try:
        template = get_training_chat_template(tokenizer)
    except Exception:  # TRL raises for families it does not know
        template = None
    template = template or chatml_training_template(tokenizer)
    if template is None:
        raise ValueError("the tokenizer's chat template has no {% generation %} markers and is neither a family "
                         "TRL knows nor ChatML, so assistant-only loss cannot mask it; fix: write a copy with "
                         "markers and set chat_template_path, or set assistant_only_loss: false")
    return template


_TRL_QWEN3_THINK = ("        {%- generation %}\n"
                    "        {{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}")
"""The lines of TRL's qwen3_training.jinja that put a fast answer's empty think block inside the loss."""
_QWEN3_FAST_BLOCK_OUT = (
    "        {%- if not reasoning_content.strip('\\n') %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}\n"
    "        {%- generation %}\n"
    "        {%- if reasoning_content.strip('\\n') %}"
    "{{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}{%- endif %}\n"
    "        {{- content.lstrip('\\n') }}")


def fast_block_trained(tokenizer: Any, template: str, fmt: ThinkFormat) -> bool:
    """Whether ``template`` puts loss on any token of a fast answer's empty think block (real tokenization, TRL's
    assistant mask from the {% generation %} markers)."""
    messages = [{"role": "user", "content": "u1"},
                {"role": "assistant", "content": render_answer(None, "a1", NO_THINK, fmt)}]
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    trained = tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m])
    return "think>" in trained


def think_training_template(tokenizer: Any, template: str, fmt: ThinkFormat) -> str:
    """``template`` (a training template with {% generation %} markers) such that fast-mode rows get no loss on the
    empty think block: as is when it already leaves the block out of the loss, TRL's Qwen3 training template with
    the block moved before {% generation %}, else a ValueError with the fix."""
    if not fast_block_trained(tokenizer, template, fmt):
        return template
    if _TRL_QWEN3_THINK in template:
        patched = template.replace(_TRL_QWEN3_THINK, _QWEN3_FAST_BLOCK_OUT)
        if not fast_block_trained(tokenizer, patched, fmt):
            return patched
    raise ValueError("the SFT chat template puts loss on the empty think block of fast-mode rows; fix: write the "
                     "block outside {% generation %} (see configs/chat_templates/hunyuan_a13b_training.jinja) and set "
                     "stages.sft.chat_template_path")
