"""MoE model helpers for training (Hunyuan-Large's MoE-specific settings), independent of any trainer.

- ``moe_layout``: where the decoder layers, attention, MLP/MoE blocks and routers of a transformers model are.
- ``apply_moe_dropout``: attention dropout (the models' own ``attention_dropout``) plus *hidden
  dropout*, which no transformers MoE model implements: forward hooks drop elements of each
  decoder layer's attention output and MLP/MoE output before they are added to the residual
  stream (where Megatron-style ``hidden_dropout`` sits), active in train mode only. No model code
  is forked, so every architecture whose decoder layers have an attention module and an ``mlp``
  works (tested: Qwen2-MoE, HunYuan-MoE-V1, Mixtral).
- ``moe_param_groups``: shared-expert, routed-expert and non-expert parameters in separate
  optimizer groups, routed experts at a scaled learning rate (``routed_lr_scale``).
- ``LRWindow`` / ``window_scheduler``: an LR schedule that is one window of a global schedule, so phases
  trained by consecutive trainers follow one decay.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.training.moe_config import LRWindow, MoETrainingConfig

ParamGroupName = Literal["non_expert", "shared_expert", "routed_expert"]

# Name fragments of the shared expert in transformers' MoE families: Qwen2-MoE (shared_expert,
# shared_expert_gate), HunYuan-MoE-V1 (shared_mlp), DeepSeek-V2/V3, GLM-4-MoE (shared_experts).
SHARED_EXPERT_KEYS = (".shared_expert.", ".shared_expert_gate.", ".shared_mlp.", ".shared_experts.")
# Routed experts: fused ``mlp.experts.gate_up_proj`` (transformers 5.x) or per-expert ``experts.{i}.``.
ROUTED_EXPERT_KEYS = (".experts.",)


# --------------------------------------------------------------------------------------------------
# Model layout


@dataclass
class MoELayout:
    """Where the MoE-relevant modules of a transformers model are."""

    layers: list[nn.Module]
    """Decoder layers, in order."""
    attentions: list[nn.Module]
    """Attention module of each decoder layer."""
    mlps: list[nn.Module]
    """MLP or sparse-MoE block of each decoder layer."""
    routers: list[tuple[int, nn.Module]]
    """(layer index, router module) for every MoE layer."""
    num_experts: int
    top_k: int


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft / DDP / FSDP wrapper."""
    for _ in range(4):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            break
    return model


def _recorded_class(entry) -> type | None:
    if entry is None:
        return None
    return entry if isinstance(entry, type) else getattr(entry, "target_class", None)


def moe_layout(model: nn.Module) -> MoELayout:
    """Find decoder layers, their attention and MLP modules and the routers.

    Uses the classes transformers itself registers for output capture (``_can_record_outputs``:
    ``hidden_states`` = decoder layer, ``attentions``, ``router_logits``), so no per-architecture table.
    """
    base = base_model(model)
    record = {}
    for module in base.modules():
        rec = getattr(module, "_can_record_outputs", None)
        if rec:
            record = rec
            break
    layer_cls = _recorded_class(record.get("hidden_states"))
    attn_cls = _recorded_class(record.get("attentions"))
    router_cls = _recorded_class(record.get("router_logits"))
    name = type(base).__name__
    if layer_cls is None or attn_cls is None:
        raise ValueError(f"{name} does not declare its decoder layer / attention classes (_can_record_outputs); "
                         "fix: use a transformers causal LM architecture (e.g. Qwen2MoeForCausalLM)")
    layers = [m for m in base.modules() if isinstance(m, layer_cls)]
    attentions, mlps = [], []
    for i, layer in enumerate(layers):
        attn = [m for m in layer.children() if isinstance(m, attn_cls)]
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        if len(attn) != 1 or mlp is None:
            raise ValueError(f"{name} layer {i}: expected one attention module and an `mlp` child, found "
                             f"{[n for n, _ in layer.named_children()]}; hidden dropout cannot be placed")
        attentions.append(attn[0])
        mlps.append(mlp)
    routers = []
    if router_cls is not None:
        for i, layer in enumerate(layers):
            routers += [(i, m) for m in layer.modules() if isinstance(m, router_cls)]
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    num_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if routers and (not isinstance(num_experts, int) or not isinstance(top_k, int)):
        num_experts, top_k = routers[0][1].num_experts, routers[0][1].top_k
    return MoELayout(layers, attentions, mlps, routers, int(num_experts or 0), int(top_k or 0))


def single_top_k(model: nn.Module, aux_loss: bool = True) -> None:
    """Store a per-layer top-k list that holds one value as that one int, in place.

    Why: HunYuan-MoE-V1 configs may give top-k per layer (Hunyuan-A13B's config.json has
    ``moe_topk: [8, 8, ...]``), but TRL computes the router aux loss with a single
    ``config.num_experts_per_tok`` (Mixtral's ``load_balancing_loss_func``) and fails on a list
    ("topk(): argument 'k' must be int, not list"). Routing does not change: each gate already holds
    its own ``top_k``. Different values per layer have no single-k aux loss: ValueError when ``aux_loss``.
    """
    base = base_model(model)
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if not isinstance(top_k, (list, tuple)) or not top_k:
        return
    if len(set(top_k)) == 1:
        cfg.num_experts_per_tok = int(top_k[0])
    elif aux_loss:
        raise ValueError(f"{type(base).__name__}: top-k differs per layer ({sorted(set(top_k))}), and the router aux "
                         "loss (TRL's load_balancing_loss_func) takes one top-k; fix: set moe.router_aux_loss_coef: 0")


# --------------------------------------------------------------------------------------------------
# MoE dropout


@dataclass
class MoEDropout:
    """Handle of the dropout applied to a model; ``remove()`` restores the model as it was."""

    model: nn.Module
    attention_dropout: float
    hidden_dropout: float
    hidden_sites: list[nn.Module]
    """Modules whose output gets hidden dropout (attention and MLP of every layer)."""
    handles: list
    previous_attention_dropout: list[float]
    attentions: list[nn.Module]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for module, p in zip(self.attentions, self.previous_attention_dropout, strict=True):
            module.attention_dropout = p
        base = base_model(self.model)
        if self.previous_attention_dropout:
            base.config.attention_dropout = self.previous_attention_dropout[0]
        if getattr(base, "_posttrain_moe_dropout", None) is self:
            del base._posttrain_moe_dropout


def _hidden_dropout_hook(p: float) -> Callable:
    def hook(module: nn.Module, args, output):
        if not module.training or p == 0:
            return None
        if isinstance(output, tuple):  # attention modules return (attn_output, attn_weights)
            return (nn.functional.dropout(output[0], p, training=True), *output[1:])
        return nn.functional.dropout(output, p, training=True)

    return hook


def apply_moe_dropout(model: nn.Module, cfg: MoETrainingConfig) -> MoEDropout:
    """Set attention dropout and add hidden dropout (forward hooks); both act in train mode only.

    Idempotent: a model that already has MoE dropout gets the old hooks removed first.
    """
    base = base_model(model)
    old = getattr(base, "_posttrain_moe_dropout", None)
    if old is not None:
        old.remove()
    layout = moe_layout(model)
    previous = []
    for attn in layout.attentions:
        if not hasattr(attn, "attention_dropout"):
            raise ValueError(f"{type(attn).__name__} has no `attention_dropout` attribute, so attention dropout "
                             "cannot be set without forking its code")
        previous.append(float(attn.attention_dropout))
        attn.attention_dropout = cfg.attention_dropout
    # Keep the config in step (what a reader of model.config sees); the modules read their own attribute.
    base.config.attention_dropout = cfg.attention_dropout
    sites = [m for pair in zip(layout.attentions, layout.mlps, strict=True) for m in pair]
    handles = [m.register_forward_hook(_hidden_dropout_hook(cfg.hidden_dropout)) for m in sites] \
        if cfg.hidden_dropout > 0 else []
    handle = MoEDropout(model, cfg.attention_dropout, cfg.hidden_dropout, sites, handles, previous,
                        layout.attentions)
    base._posttrain_moe_dropout = handle
    return handle


@torch.no_grad()
def dropout_loss_gap(model: nn.Module, batch: dict[str, torch.Tensor], seed: int = 0) -> tuple[float, float]:
    """(eval-mode loss, train-mode loss) of ``model`` on one labelled batch, with its dropout as currently set.

    A model pretrained without dropout can be wrecked by the recipe's: the embedded policy's loss on a CPython
    passage goes from 3.9 in eval mode to 11.1 in train mode with hidden dropout 0.2, worse than uniform over
    its vocabulary, so SFT would spend its steps teaching it to survive dropout. The RNG state and the model's
    mode are restored.
    """
    was_training = model.training
    try:
        model.eval()
        eval_loss = float(model(**batch).loss)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.train()
            train_loss = float(model(**batch).loss)
    finally:
        model.train(was_training)
    return eval_loss, train_loss


# --------------------------------------------------------------------------------------------------
# Expert-specific learning rates


def classify_param(name: str) -> ParamGroupName:
    """Which optimizer group a parameter belongs to, from its name (peft/FSDP prefixes do not matter)."""
    dotted = f".{name}."
    if any(k in dotted for k in SHARED_EXPERT_KEYS):
        return "shared_expert"
    if any(k in dotted for k in ROUTED_EXPERT_KEYS):
        return "routed_expert"
    return "non_expert"  # attention, norms, embeddings, routers (they see every token) and the LM head


def lr_opt(batch_ratio: float) -> float:
    """Optimal Adam LR relative to lr_max at B / B_noise = batch_ratio (Hunyuan-Large report)."""
    return 2.0 / (math.sqrt(1.0 / batch_ratio) + math.sqrt(batch_ratio))


def routed_lr_scale(cfg: MoETrainingConfig, num_experts: int, top_k: int) -> float:
    """The routed experts' LR multiplier (see ``MoETrainingConfig.routed_expert_lr_scale``)."""
    if cfg.routed_expert_lr_scale != "auto":
        return float(cfg.routed_expert_lr_scale)
    if num_experts <= 0 or top_k <= 0:
        return 1.0
    x = cfg.batch_noise_ratio
    return lr_opt(x * top_k / num_experts) / lr_opt(x)


def moe_param_groups(model: nn.Module, lr: float, weight_decay: float, cfg: MoETrainingConfig) -> list[dict]:
    """Optimizer parameter groups: {non_expert, shared_expert, routed_expert} x {decay, no decay}.

    Each group carries ``group`` (its name) and ``lr``; the routed groups get ``lr * routed_lr_scale``.
    Weight decay skips biases and norms, as transformers' Trainer does. Empty groups are left out;
    the first group is the non-expert decay group, whose LR is what the trainer logs.
    """
    from transformers.trainer_pt_utils import get_parameter_names

    layout = moe_layout(model)
    scale = routed_lr_scale(cfg, layout.num_experts, layout.top_k)
    decay_names = set(get_parameter_names(
        model, [nn.LayerNorm], [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]))
    buckets: dict[tuple[str, bool], list] = {}
    names: dict[tuple[str, bool], list[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (classify_param(name), name in decay_names)
        buckets.setdefault(key, []).append(param)
        names.setdefault(key, []).append(name)
    groups = []
    for group in ("non_expert", "shared_expert", "routed_expert"):
        for decay in (True, False):
            if (group, decay) not in buckets:
                continue
            groups.append({
                "params": buckets[(group, decay)],
                "param_names": names[(group, decay)],
                "group": group,
                "lr": lr * (scale if group == "routed_expert" else 1.0),
                "weight_decay": weight_decay if decay else 0.0,
            })
    return groups


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule spanning several trainers


def lr_factor(progress: float, window: LRWindow) -> float:
    """LR multiplier at global progress in [0, 1]: linear warmup, then decay to ``min_lr_rate``."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < window.warmup_ratio:
        return progress / window.warmup_ratio
    if window.kind == "constant":
        return 1.0
    p = (progress - window.warmup_ratio) / max(1e-12, 1.0 - window.warmup_ratio)
    decay = 0.5 * (1.0 + math.cos(math.pi * p)) if window.kind == "cosine" else 1.0 - p
    return window.min_lr_rate + (1.0 - window.min_lr_rate) * decay


def make_moe_optimizer_and_scheduler(model: nn.Module, args, cfg: MoETrainingConfig, num_training_steps: int,
                                     window: LRWindow | None = None):
    """(optimizer, scheduler) with MoE parameter groups, for ``Trainer(optimizers=...)`` or a custom loop.

    The optimizer class and its kwargs come from ``args.optim`` (transformers' choice); with ``window``
    the schedule is that window of a global one, else ``args.lr_scheduler_type`` over this trainer.
    """
    from transformers import Trainer
    from transformers.optimization import get_scheduler

    groups = moe_param_groups(model, args.learning_rate, args.weight_decay, cfg)
    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    opt_kwargs = {k: v for k, v in opt_kwargs.items() if k not in ("params", "model")}
    optimizer = opt_cls(groups, **opt_kwargs)
    if window is None:
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                                  num_warmup_steps=args.get_warmup_steps(num_training_steps),
                                  num_training_steps=num_training_steps,
                                  scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    else:
        scheduler = window_scheduler(optimizer, window, num_training_steps)
    return optimizer, scheduler


def window_scheduler(optimizer, window: LRWindow, num_training_steps: int):
    """LambdaLR over ``window``: step s of n maps to global progress start + (end - start) * s / n."""
    span = window.end - window.start
    steps = max(1, num_training_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(window.start + span * step / steps, window))
