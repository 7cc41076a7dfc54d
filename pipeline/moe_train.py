"""MoE training helpers shared by the SFT and DPO stages (Hunyuan-Large's MoE-specific settings).

- ``apply_moe_dropout``: attention dropout (the models' own ``attention_dropout``) plus *hidden
  dropout*, which no transformers MoE model implements: forward hooks drop elements of each
  decoder layer's attention output and MLP/MoE output before they are added to the residual
  stream (where Megatron-style ``hidden_dropout`` sits), active in train mode only. No model code
  is forked, so every architecture whose decoder layers have an attention module and an ``mlp``
  works (tested: Qwen2-MoE, HunYuan-MoE-V1, Mixtral).
- ``moe_param_groups``: shared-expert, routed-expert and non-expert parameters in separate
  optimizer groups, routed experts at a scaled learning rate (``routed_lr_scale``).
- ``MoETrainerMixin`` / ``moe_trainer_class``: a TRL trainer (SFTTrainer, DPOTrainer) with those
  groups, the configured router aux-loss coefficient (TRL's own ``router_aux_loss_coef`` wiring),
  MoE dropout, expert-load logging and, optionally, an LR schedule that spans several trainers
  (coarse-to-fine phases).
- ``ExpertLoadCallback``: per-layer expert load (fraction of tokens per expert) and per-layer
  load-balancing loss, logged with the trainer's logs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import TrainerCallback

ParamGroupName = Literal["non_expert", "shared_expert", "routed_expert"]

# Name fragments of the shared expert in transformers' MoE families: Qwen2-MoE (shared_expert,
# shared_expert_gate), HunYuan-MoE-V1 (shared_mlp), DeepSeek-V2/V3, GLM-4-MoE (shared_experts).
SHARED_EXPERT_KEYS = (".shared_expert.", ".shared_expert_gate.", ".shared_mlp.", ".shared_experts.")
# Routed experts: fused ``mlp.experts.gate_up_proj`` (transformers 5.x) or per-expert ``experts.{i}.``.
ROUTED_EXPERT_KEYS = (".experts.",)


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


def _base(model: nn.Module) -> nn.Module:
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
    base = _base(model)
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
    base = _base(model)
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
        base = _base(self.model)
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
    base = _base(model)
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


# --------------------------------------------------------------------------------------------------
# Expert load logging


class ExpertLoadCallback(TrainerCallback):
    """Per-layer expert load and load-balancing loss, logged with the trainer's logs.

    Forward hooks on the routers accumulate, over the training forwards between two logging steps,
    how many tokens each expert received (top-k assignments; padding excluded when an attention mask
    is given) and the mean router probability per expert. At each log it adds, per MoE layer L:
    ``expert_load/layer_L/expert_E`` (fraction of tokens routed to E; sums to top_k over E),
    ``expert_load/layer_L/aux_loss`` (Switch/Mixtral load-balancing loss of that layer alone,
    num_experts * sum_E load_E * mean_prob_E; 1.0 is perfectly balanced top-1) and
    ``expert_load/max_load_ratio`` (largest load over the balanced load top_k / num_experts). With several
    data-parallel ranks the counts are summed over ranks at each log.
    """

    def __init__(self, model: nn.Module | None = None):
        self._handles: list = []
        self._counts: dict[int, torch.Tensor] = {}
        self._probs: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self.layout: MoELayout | None = None
        self.history: list[dict] = []
        """Every dict of metrics this callback produced, with its ``step``."""
        if model is not None:
            self.attach(model)

    # hooks ---------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        if self._handles:
            return
        self.layout = moe_layout(model)
        if not self.layout.routers:
            return
        base = _base(model)
        self._handles.append(base.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        for layer_idx, router in self.layout.routers:
            self._handles.append(router.register_forward_hook(self._router_hook(layer_idx)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask = mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _router_hook(self, layer_idx: int):
        num_experts, top_k = self.layout.num_experts, self.layout.top_k

        def hook(module, args, output):
            if not module.training:
                return
            with torch.no_grad():
                logits = output[0] if isinstance(output, tuple) else output
                logits = logits.detach().reshape(-1, logits.shape[-1]).float()
                probs = logits.softmax(-1)
                if isinstance(output, tuple) and len(output) >= 3 and output[2].dtype in (torch.int64, torch.int32):
                    chosen = output[2].detach().reshape(logits.shape[0], -1)
                else:
                    chosen = probs.topk(top_k, dim=-1).indices
                if self._mask is not None and self._mask.numel() == logits.shape[0]:
                    keep = self._mask.to(logits.device)
                    probs, chosen = probs[keep], chosen[keep]
                counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
                if layer_idx not in self._counts:
                    self._counts[layer_idx] = counts
                    self._probs[layer_idx] = probs.sum(0)
                    self._tokens[layer_idx] = torch.tensor(float(probs.shape[0]), device=probs.device)
                else:
                    self._counts[layer_idx] += counts
                    self._probs[layer_idx] += probs.sum(0)
                    self._tokens[layer_idx] += probs.shape[0]

        return hook

    # metrics -------------------------------------------------------------------------------------
    def pop_metrics(self) -> dict[str, float]:
        """Metrics accumulated since the last call (empty when nothing was routed)."""
        if not self._counts:
            return {}
        self._all_reduce()
        out: dict[str, float] = {}
        num_experts, top_k = self.layout.num_experts, self.layout.top_k
        worst = 0.0
        for layer_idx in sorted(self._counts):
            tokens = float(self._tokens[layer_idx].item())
            if tokens == 0:
                continue
            load = (self._counts[layer_idx] / tokens).tolist()
            mean_prob = (self._probs[layer_idx] / tokens).tolist()
            for e, value in enumerate(load):
                out[f"expert_load/layer_{layer_idx:02d}/expert_{e:02d}"] = value
            out[f"expert_load/layer_{layer_idx:02d}/aux_loss"] = num_experts * sum(
                (lv / top_k) * p for lv, p in zip(load, mean_prob, strict=True))
            worst = max(worst, max(load) / (top_k / num_experts))
        out["expert_load/max_load_ratio"] = worst
        self._counts, self._probs, self._tokens = {}, {}, {}
        return out

    def _all_reduce(self) -> None:
        """Sum the counts over data-parallel ranks (every rank logs at the same steps), so the load
        is that of the global batch, not of one rank's share."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        layers = sorted(self._counts)
        flat = torch.cat([torch.cat([self._counts[i], self._probs[i], self._tokens[i].reshape(1)]) for i in layers])
        dist.all_reduce(flat)
        width = self.layout.num_experts * 2 + 1
        for j, i in enumerate(layers):
            row = flat[j * width:(j + 1) * width]
            e = self.layout.num_experts
            self._counts[i], self._probs[i], self._tokens[i] = row[:e], row[e:2 * e], row[2 * e]

    # TrainerCallback -----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # A trainer with MoETrainerMixin merges the metrics before its log() (so every reporter sees
        # them); for a plain trainer, add them here to the logs and the entry just appended to history.
        metrics = self.pop_metrics()
        if not metrics or logs is None:
            return
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        self.history.append({"step": state.global_step, **metrics})


# --------------------------------------------------------------------------------------------------
# Trainer mixin


class MoETrainerMixin:
    """Mix into a TRL trainer: ``class MoESFTTrainer(MoETrainerMixin, SFTTrainer)`` (or ``moe_trainer_class``).

    Adds: the configured router aux-loss coefficient (through TRL's ``router_aux_loss_coef``), MoE
    dropout on the trained model, MoE optimizer groups, expert-load logging, and with ``lr_window``
    a schedule that is one window of a global schedule (for phases run as consecutive trainers).
    Pass ``args=`` as a keyword. With a DPO reference model, only the trained model gets dropout.
    """

    def __init__(self, *args: Any, moe_config: MoETrainingConfig | None = None, lr_window: LRWindow | None = None,
                 **kwargs: Any):
        self.moe_config = moe_config or MoETrainingConfig()
        self.lr_window = lr_window
        targs = kwargs.get("args")
        if targs is None:
            raise TypeError(f"{type(self).__name__} needs its training arguments as the keyword `args=`")
        # TRL reads this to turn on output_router_logits and add coef * aux_loss to the loss.
        targs.router_aux_loss_coef = self.moe_config.router_aux_loss_coef
        super().__init__(*args, **kwargs)
        # TRL reads config.num_experts_per_tok in the forward for the aux loss (HunYuan may hold a list there).
        single_top_k(self.model, aux_loss=self.moe_config.router_aux_loss_coef > 0)
        self.moe_dropout = apply_moe_dropout(self.model, self.moe_config)
        self.expert_load: ExpertLoadCallback | None = None
        if self.moe_config.log_expert_load:
            self.expert_load = ExpertLoadCallback()
            self.add_callback(self.expert_load)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = moe_param_groups(opt_model, self.args.learning_rate, self.args.weight_decay, self.moe_config)
            if self.optimizer_cls_and_kwargs is not None:
                opt_cls, opt_kwargs = self.optimizer_cls_and_kwargs
            else:
                opt_cls, opt_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            opt_kwargs = {k: v for k, v in opt_kwargs.items() if k not in ("params", "model")}
            self.optimizer = opt_cls(groups, **opt_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_window is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            self.lr_scheduler = window_scheduler(optimizer or self.optimizer, self.lr_window, num_training_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.expert_load is not None and self.model.training:
            metrics = self.expert_load.pop_metrics()
            if metrics:
                logs.update(metrics)
                self.expert_load.history.append({"step": self.state.global_step, **metrics})
        super().log(logs, *args, **kwargs)


def moe_trainer_class(base: type) -> type:
    """``MoETrainerMixin`` mixed into a TRL trainer class, e.g. ``moe_trainer_class(DPOTrainer)``."""
    return type(f"MoE{base.__name__}", (MoETrainerMixin, base), {})
