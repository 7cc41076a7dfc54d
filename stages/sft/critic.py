"""Fine-tune a critique model on graded examples, through the SFT stage's training path (``posttrain critic train``).

A graded example is an (instruction, response) pair with its dimension scores, tier and reason:
an `sft` row of a run whose critic was a stronger model (``messages`` + ``scores`` + ``tier`` +
``critique_reason``), a `filter_graded` response, or any dataset with ``instruction``, ``response``,
``scores``, ``tier``, ``reason``. Each becomes one chat conversation: the critique prompt the
filter stage sends (``critique_messages``, without few-shot turns by default) and, as the assistant
turn, the critique in the exact format the parser reads (``format_critique``). Training is
``train_sft`` (TRL SFTTrainer, assistant-only loss, resumable phases), so the critic gets the same
trainer, checkpointing and Ray placement as the policy. It lives with the SFT stage, not in
``critique/``: critique/ holds what the filter stage grades with, and may not import stages.

Use the result as the critic: point a model role at the output folder and set
``stages.filter.critique.few_shot: false`` (the prompt it was trained on).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from critique.parse import format_critique
from critique.prompts import DEFAULT_PROMPTS, critique_messages, load_prompts
from critique.rubric import DIMENSIONS, MAX_TIER, MIN_TIER
from pipeline.training.moe_config import MoETrainingConfig
from stages.sft.config import DistributedSettings, SFTPhase, SFTStageConfig
from stages.sft.launch import train_sft


class CritiqueTrainConfig(BaseModel):
    """Supervised fine-tuning of a critique model on graded examples."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    base_model: str = "smollm2-135m-instruct"
    """Model to fine-tune into a critic: an embedded name or a transformers model folder."""
    prompts: str = DEFAULT_PROMPTS
    """Critique prompt file whose rubric and template the training prompts use (same as the filter's)."""
    few_shot: bool = False
    """Include the prompt file's few-shot turns in training prompts (False: shorter prompts; the
    fine-tuned critic learns the format itself)."""
    max_chars: int = Field(3000, ge=200)
    """Responses are clipped to this many characters in the prompt, as the filter stage does."""
    epochs: float = Field(3.0, gt=0)
    """Passes over the examples."""
    learning_rate: float = Field(5e-5, gt=0)
    """Peak learning rate."""
    min_learning_rate: float = Field(5e-6, ge=0)
    """Learning rate at the end of training."""
    per_device_train_batch_size: int = Field(4, ge=1)
    """Conversations per micro-batch."""
    max_length: int = Field(1024, ge=64)
    """Longest training conversation in tokens."""
    max_steps: int | None = Field(None, ge=1)
    """Cap on optimizer steps (short runs); None: `epochs` decide."""
    heldout_fraction: float = Field(0.1, ge=0, lt=1)
    """Fraction of examples kept out to measure the loss before and after."""
    backend: Literal["ray", "local"] = "ray"
    """ray: a Ray Train job (the SFT stage's default); local: train in this process."""
    moe: MoETrainingConfig = Field(default_factory=lambda: MoETrainingConfig(attention_dropout=0.0,
                                                                             hidden_dropout=0.0))
    """MoE settings passed to the SFT path. The recipe's dropout targets the MoE policy on large data;
    a small critic on a few thousand examples trains without it by default."""


class CritiqueDataError(ValueError):
    """A graded example cannot be used; the message names the example and the field."""


def _get(row: dict, *names: str) -> Any:
    for n in names:
        if row.get(n) is not None:
            return row[n]
    return None


def critique_training_records(graded: Iterable[dict], cfg: CritiqueTrainConfig) -> list[dict]:
    """Chat conversations (``id``, ``tier``, ``messages``) teaching the critique format, one per
    graded example. Raises CritiqueDataError naming the example and field on unusable rows."""
    prompts = load_prompts(cfg.prompts)
    out = []
    for i, row in enumerate(graded):
        msgs = row.get("messages")
        instruction = _get(row, "instruction")
        response = _get(row, "response", "text")
        if isinstance(msgs, list) and msgs:
            instruction = instruction or next((m["content"] for m in msgs if m.get("role") == "user"), None)
            response = response or next((m["content"] for m in reversed(msgs) if m.get("role") == "assistant"), None)
        crit = row.get("critique") if isinstance(row.get("critique"), dict) else {}
        tier = _get(row, "tier") if row.get("tier") is not None else crit.get("tier")
        scores = _get(row, "scores") or crit.get("scores") or {}
        reason = _get(row, "critique_reason", "reason") or crit.get("reason") or ""
        where = f"graded example {i} (id={row.get('id', '?')})"
        if not isinstance(instruction, str) or not isinstance(response, str):
            raise CritiqueDataError(f"{where}: needs `instruction` and `response` strings (or chat `messages` with "
                                    "a user and an assistant turn)")
        if tier not in range(MIN_TIER, MAX_TIER + 1):
            raise CritiqueDataError(f"{where}: field `tier` must be {MIN_TIER}-{MAX_TIER}, got {tier!r}")
        bad = {d: scores.get(d) for d in DIMENSIONS if scores.get(d) not in (None, *range(MIN_TIER, MAX_TIER + 1))}
        if bad:
            raise CritiqueDataError(f"{where}: field `scores` values must be {MIN_TIER}-{MAX_TIER} or null, got {bad}")
        if not str(reason).strip():
            raise CritiqueDataError(f"{where}: field `reason` (or `critique_reason`) is empty; a critic must learn "
                                    "to justify its tier")
        key = f"{instruction}\x1f{response}"
        rid = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
        prompt = critique_messages(instruction, response, prompts, rotation=int(rid, 16), max_chars=cfg.max_chars,
                                   few_shot=cfg.few_shot)
        target = format_critique(scores, int(tier), str(reason))
        out.append({"id": rid, "tier": int(tier), "messages": [*prompt, {"role": "assistant", "content": target}]})
    if not out:
        raise CritiqueDataError("no graded examples; fix: pass rows with instruction, response, scores, tier, reason")
    return out


def train_critique_model(graded: Iterable[dict], cfg: CritiqueTrainConfig, output_dir: str | os.PathLike,
                         work_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Fine-tune ``cfg.base_model`` on ``graded`` examples into ``output_dir`` (a model folder vLLM
    serves). Returns the SFT metrics (held-out loss before/after, tokens, tokens/s, phases)."""
    from transformers import AutoConfig

    from pipeline.models.catalog import resolve_model

    records = critique_training_records(graded, cfg)
    moe = cfg.moe
    base_cfg = AutoConfig.from_pretrained(resolve_model(cfg.base_model)).get_text_config()
    if not hasattr(base_cfg, "output_router_logits") and moe.router_aux_loss_coef:
        # A dense critic has no router: TRL refuses a router aux loss coefficient for it.
        moe = moe.model_copy(update={"router_aux_loss_coef": 0.0})
    sft_cfg = SFTStageConfig(
        model=cfg.base_model,
        phases=[SFTPhase(tiers=[1, 2, 3, 4], epochs=cfg.epochs)],
        learning_rate=cfg.learning_rate, min_learning_rate=cfg.min_learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size, max_length=cfg.max_length,
        heldout_fraction=cfg.heldout_fraction, max_steps_per_phase=cfg.max_steps,
        moe=moe, distributed=DistributedSettings(backend=cfg.backend), seed=seed,
    )
    metrics = train_sft(records, sft_cfg, output_dir, work_dir, seed=seed)
    metrics["examples"] = len(records)
    metrics["tiers"] = {str(t): sum(r["tier"] == t for r in records) for t in range(MIN_TIER, MAX_TIER + 1)}
    return metrics
