"""MoE training settings (Hunyuan-Large's recipe), nested as ``moe:`` in the SFT and DPO stage configs.

Kept apart from the training code so that reading a stage's config imports pydantic only, not torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MoETrainingConfig(BaseModel):
    """MoE-specific training settings (Hunyuan-Large's recipe); nested as ``moe:`` in the SFT and DPO configs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    attention_dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout on the attention probabilities in train mode (the recipe's SFT value). Set on every attention
    module of the model (transformers reads ``module.attention_dropout``); off in eval mode."""
    hidden_dropout: float = Field(0.2, ge=0, lt=1)
    """Dropout on each decoder layer's attention output and MLP/MoE output before the residual add (the
    recipe's SFT value). transformers' MoE models have no such dropout; forward hooks add it, train mode only."""
    router_aux_loss_coef: float = Field(0.01, ge=0)
    """Weight of the router load-balancing loss added to the training loss (0 turns it off). Passed to TRL's
    ``router_aux_loss_coef``, which makes the model return its router logits and adds coef * aux_loss."""
    routed_expert_lr_scale: float | Literal["auto"] = "auto"
    """Learning-rate multiplier of the routed experts (shared expert and non-expert parameters use the base LR).
    "auto" derives it as in the Hunyuan-Large report: with Adam the optimal LR at batch size B is
    lr_opt(B) = 2 lr_max / (sqrt(B_noise / B) + sqrt(B / B_noise)). The shared expert and every dense parameter
    see all B tokens of a step, a routed expert only its share B * top_k / n_routed, so
    scale = lr_opt(B * top_k / n) / lr_opt(B), with x = B / B_noise from ``batch_noise_ratio``. For
    Hunyuan-Large (16 routed experts, top-1) and x = 0.26 this gives 0.31, the report's value; for the embedded
    8-expert top-1 policy it gives 0.43. A number uses that factor as is."""
    batch_noise_ratio: float = Field(0.26, gt=0)
    """x = B / B_noise for the "auto" scale: the training batch over the gradient noise scale. The report does not
    publish B_noise; 0.26 is the ratio at which the formula reproduces its 0.31 for 16 experts, top-1."""
    log_expert_load: bool = True
    """Log per-layer expert load (fraction of tokens routed to each expert) and per-layer load-balancing loss with
    the trainer's logs (keys ``expert_load/layer_XX/expert_YY``, ``expert_load/layer_XX/aux_loss``)."""


@dataclass
class LRWindow:
    """The part [start, end) of one global LR schedule that one trainer covers (coarse-to-fine phases).

    transformers' schedulers live inside one trainer; the phases of a coarse-to-fine SFT are several
    trainers that must share one warmup + decay, so the schedule is a function of global progress.
    """

    start: float = 0.0
    end: float = 1.0
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.0
    min_lr_rate: float = 0.1
    """Final LR as a fraction of the peak (the recipe: 2e-6 / 2e-5 = 0.1)."""
