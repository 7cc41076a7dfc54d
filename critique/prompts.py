"""Critique prompts: load ``configs/prompts/critique.yaml`` and build the chat messages for one pair."""

from __future__ import annotations

import functools
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from critique.parse import format_critique
from critique.rubric import DIMENSIONS, MAX_TIER, MIN_TIER
from pipeline.templates import TemplateError, check_template, load_yaml_file, render, resolve_config_file

DEFAULT_PROMPTS = "configs/prompts/critique.yaml"
TEMPLATE_FIELDS = {"rubric", "instruction", "response", "format"}


class CritiqueExample(BaseModel):
    """One few-shot example: a pair and the critique the model should have written for it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    instruction: str
    """The example instruction."""
    response: str
    """The example response."""
    scores: dict[str, int]
    """Dimension -> score 1-4 (every dimension)."""
    tier: int = Field(ge=MIN_TIER, le=MAX_TIER)
    """Overall tier 1-4."""
    reason: str
    """One short sentence."""

    @field_validator("scores")
    @classmethod
    def _all_dimensions(cls, v: dict[str, int]) -> dict[str, int]:
        if set(v) != set(DIMENSIONS):
            raise ValueError(f"needs exactly the dimensions {list(DIMENSIONS)}, got {sorted(v)}")
        bad = {k: s for k, s in v.items() if not MIN_TIER <= s <= MAX_TIER}
        if bad:
            raise ValueError(f"scores must be {MIN_TIER}-{MAX_TIER}, got {bad}")
        return v


class CritiquePrompts(BaseModel):
    """The critique prompt file (see the comments in configs/prompts/critique.yaml)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    system: str | None = None
    """System message (None: none); may contain {rubric}."""
    rubric: str
    """What scores and tiers mean; filled into the template as {rubric}."""
    template: str
    """User message with {rubric}, {instruction}, {response}, {format}."""
    examples: list[CritiqueExample] = Field(default_factory=list)
    """Few-shot turns shown before the graded pair."""
    example_order: Literal["fixed", "rotate"] = "rotate"
    """fixed: examples in file order; rotate: the cycle starts at an example chosen per request."""
    stop: list[str] = Field(default_factory=list)
    """Strings that end a critique."""


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> CritiquePrompts:
    data = load_yaml_file(path)
    try:
        prompts = CritiquePrompts.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise TemplateError(f"{resolve_config_file(path)}: {problems}; fix: correct the critique prompt file") from None
    check_template(prompts.template, TEMPLATE_FIELDS, f"{resolve_config_file(path)}: template")
    if prompts.system:
        check_template(prompts.system, {"rubric"}, f"{resolve_config_file(path)}: system")
    missing = {"instruction", "response"} - _fields(prompts.template)
    if missing:
        raise TemplateError(f"{resolve_config_file(path)}: template must contain {sorted(missing)}")
    return prompts


def _fields(template: str) -> set[str]:
    from pipeline.templates import template_fields

    return template_fields(template)


def load_prompts(path: str = DEFAULT_PROMPTS) -> CritiquePrompts:
    """The critique prompts in ``path`` (relative: current folder, then this repository); errors
    name the file and the field."""
    return _load(str(path), resolve_config_file(path).stat().st_mtime)


def format_hint() -> str:
    """The line format with placeholders, as shown to the model."""
    return "\n".join([f"{d.capitalize()}: <1-4>" for d in DIMENSIONS] + ["Tier: <1-4>", "Reason: <one short sentence>"])


def clip(text: str, max_chars: int) -> str:
    """Keep the start and the end of an over-long text (the critic needs both: how it begins, and
    whether it ends properly), with a marker saying how much was left out."""
    text = text or ""
    if len(text) <= max_chars:
        return text
    head = max_chars * 2 // 3
    tail = max_chars - head
    return f"{text[:head]}\n[... {len(text) - max_chars} characters left out ...]\n{text[-tail:]}"


def critique_messages(instruction: str, response: str, prompts: CritiquePrompts, rotation: int = 0,
                      max_chars: int = 4000, few_shot: bool = True, max_examples: int | None = None
                      ) -> list[dict[str, str]]:
    """Chat messages asking the critique model to grade one pair (few-shot turns first unless
    ``few_shot`` is False: a critic fine-tuned on the format needs none). ``max_examples`` keeps
    only the last few examples of the (rotated) cycle, to fit a short context."""
    def user(ins: str, resp: str) -> dict[str, str]:
        return {"role": "user", "content": render(prompts.template, rubric=prompts.rubric.strip(),
                                                  instruction=clip(ins, max_chars // 2).strip(),
                                                  response=clip(resp, max_chars).strip(), format=format_hint())}

    messages = []
    if prompts.system:
        messages.append({"role": "system", "content": render(prompts.system, rubric=prompts.rubric.strip())})
    examples = list(prompts.examples) if few_shot else []
    if examples and prompts.example_order == "rotate":
        k = rotation % len(examples)
        examples = examples[k:] + examples[:k]
    if max_examples is not None:
        examples = examples[len(examples) - max_examples:] if max_examples > 0 else []
    for ex in examples:
        messages.append(user(ex.instruction, ex.response))
        messages.append({"role": "assistant", "content": format_critique(ex.scores, ex.tier, ex.reason)})
    messages.append(user(instruction, response))
    return messages
