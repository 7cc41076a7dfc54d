"""MoE settings for TRL trainers: ``MoETrainerMixin`` / ``moe_trainer_class`` and ``ExpertLoadCallback``.

- ``MoETrainerMixin`` / ``moe_trainer_class``: a TRL trainer (SFTTrainer, DPOTrainer) with the MoE optimizer
  groups, the configured router aux-loss coefficient (TRL's own ``router_aux_loss_coef`` wiring), MoE dropout,
  expert-load logging and, optionally, an LR schedule that spans several trainers (coarse-to-fine phases).
- ``ExpertLoadCallback``: per-layer expert load (fraction of tokens per expert) and per-layer load-balancing
  loss, logged with the trainer's logs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from pipeline.training.moe import (
    LRWindow,
    MoELayout,
    apply_moe_dropout,
    base_model,
    moe_layout,
    moe_param_groups,
    single_top_k,
    window_scheduler,
)
from pipeline.training.moe_config import MoETrainingConfig

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
        base = base_model(model)
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
