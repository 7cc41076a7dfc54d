"""Training of a round: TRL's DPOTrainer with the MoE settings of SFT and our SFT-replay term, the plain-logits
LM head for CPU, and ``train_round`` (one trainer, fresh optimizer, the round's mean figures).

TRL is imported inside the functions, so that importing the stage (to read its config) does not import it.
"""

from __future__ import annotations

import functools
import random
import statistics
import types
from collections.abc import Sequence
from typing import Any

from pipeline.tracking import attach, report_to
from stages.dpo import metrics as M
from stages.dpo.config import OnlineDPOConfig
from stages.dpo.ema import ema_callback
from stages.dpo.losses import TRL_DEFAULTS, preference_terms


def tokenize_replay(tokenizer, rows: Sequence[dict], max_length: int) -> list[dict]:
    """SFT conversations -> {input_ids, labels} with the loss on the last assistant turn only."""
    out = []
    for i, row in enumerate(rows):
        msgs = row.get("messages")
        if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            raise ValueError(f"sft record {row.get('id', i)!r}: 'messages' must be a chat ending with an assistant "
                             "turn; fix: rerun the filter stage")
        prompt = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        full = list(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
        n = 0
        while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
            n += 1
        full = full[:max_length]
        labels = [-100] * min(n, len(full)) + full[n:]
        if any(t != -100 for t in labels[1:]):
            out.append({"input_ids": full, "labels": labels})
    return out


def collate_replay(rows: Sequence[dict], pad_id: int, device=None) -> dict:
    """Right-padded {input_ids, attention_mask, labels} tensors of tokenized replay rows, on ``device``."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    labels = torch.full((len(rows), width), -100, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"], device=device)
        labels[i, :n] = torch.tensor(r["labels"], device=device)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plain_head_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                       **kwargs):
    """Stand-in for TRL's fused-LM-head forward on devices without Triton (CPU).

    TRL's fused head (``trl.trainer.utils.add_fused_lm_head``) tiles the LM head to avoid materializing logits;
    without Triton its fallback runs many elementwise passes over every [token, vocab] tile, which is slower than
    one ``log_softmax`` of the plain logits (``python -m benchmarks.dpo`` measures both). At the batch sizes this
    stage trains with on CPU the logits fit in memory, so we compute the same fields (``log_probs``, ``entropy``,
    ``mean_logits``, ``is_top1``, ``aux_loss``, ``loss``) from them.
    """
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    forward = type(self).forward
    if not fused_lm_head:
        for key, value in (("labels", labels), ("shift_labels", shift_labels), ("num_items_in_batch", num_items_in_batch)):
            if value is not None:
                kwargs[key] = value
        return forward(self, *args, **kwargs)
    kwargs["use_cache"] = False
    out = forward(self, *args, **kwargs)
    logits = out.logits.float()
    if shift_labels is None:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    mask = targets != -100
    logp = torch.log_softmax(logits, dim=-1)
    log_probs = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1) * mask
        mean_logits = logits.mean(-1) * mask
        is_top1 = (logits.argmax(-1) == targets) & mask
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        loss = loss + getattr(self.config.get_text_config(), "router_aux_loss_coef", 0.0) * aux
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=None,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=mask, aux_loss=aux)


def unpatch_forward(*models) -> None:
    """Undo TRL's fused-LM-head patch (an instance attribute over ``forward``), so the next round's trainer
    patches the plain forward again instead of stacking wrappers."""
    for m in models:
        if m is not None:
            m.__dict__.pop("forward", None)


def _check_loss_settings(trainer, dpo_loss_type: str) -> None:
    """The logged terms assume TRL's loss is [dpo_loss_type, "sft"] with TRL's defaults for the settings that
    change it; refuse anything else rather than log figures of another loss."""
    others = [t for t in trainer.loss_types if t != "sft"]
    if others and others != [dpo_loss_type]:
        raise ValueError(f"DPOConfig.loss_type={trainer.loss_types} but the trainer logs {dpo_loss_type!r} as "
                         "loss/dpo; fix: build the arguments with dpo_training_args")
    changed = {k: getattr(trainer.args, k) for k, v in TRL_DEFAULTS.items() if getattr(trainer.args, k) != v}
    if changed:
        raise ValueError(f"DPOConfig sets {changed}, which the logged loss terms do not follow; fix: leave them at "
                         f"TRL's defaults {TRL_DEFAULTS}")


@functools.cache
def replay_dpo_trainer_class() -> type:
    """TRL's DPOTrainer with the MoE settings of SFT (``pipeline.training``) and our SFT-replay term.

    Built on first use so that importing this module (to read its config) does not import TRL.
    """
    from trl import DPOTrainer
    from trl.kernels.chunked_logprob import _use_triton

    from pipeline.training.moe_trainer import MoETrainerMixin

    class ReplayDPOTrainer(MoETrainerMixin, DPOTrainer):
        """DPO + chosen NLL (TRL) + gamma * SFT loss on a replay batch (ours); logs every term.

        The terms are logged as ``loss/dpo`` (the configured ``dpo_loss_type``), ``loss/chosen_nll``,
        ``loss/router_aux``, ``loss/replay_nll`` (the unweighted values) and ``loss/total``. The DPO and chosen
        values are recomputed from the per-token log-probabilities of the very forward passes TRL ran (read by
        forward hooks), not by extra passes.
        """

        def __init__(self, *args: Any, replay: Sequence[dict] = (), replay_coef: float = 0.0,
                     replay_batch_size: int = 2, replay_seed: int = 0, dpo_loss_type: str = "sigmoid",
                     plain_head: bool = True, **kwargs: Any):
            self.replay_rows = list(replay)
            self.replay_coef = replay_coef
            self.replay_batch_size = replay_batch_size
            self.replay_rng = random.Random(replay_seed)
            self.dpo_loss_type = dpo_loss_type
            super().__init__(*args, **kwargs)
            _check_loss_settings(self, dpo_loss_type)
            self.pad_id = self.processing_class.pad_token_id or 0
            if plain_head and not _use_triton(self.accelerator.device) and not self.use_weighting:
                for m in (self.accelerator.unwrap_model(self.model), self.ref_model):
                    if m is not None:
                        m.forward = types.MethodType(plain_head_forward, m)

        def replay_batch(self) -> dict:
            rows = self.replay_rng.sample(self.replay_rows, min(self.replay_batch_size, len(self.replay_rows)))
            return collate_replay(rows, self.pad_id, self.accelerator.device)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            captured: dict[str, Any] = {}
            policy = self.accelerator.unwrap_model(model)
            hooks = [policy.register_forward_hook(lambda m, a, o: captured.setdefault("policy", o))]
            if self.ref_model is not None:
                hooks.append(self.ref_model.register_forward_hook(lambda m, a, o: captured.setdefault("ref", o)))
            try:
                loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
            finally:
                for h in hooks:
                    h.remove()
            terms = preference_terms(inputs, captured.get("policy"), captured.get("ref"), self.beta,
                                     self.dpo_loss_type)
            if self.replay_coef > 0 and self.replay_rows:
                replay_loss, replay_terms = self._replay_loss(model)
                loss = loss + self.replay_coef * replay_loss
                terms.update(replay_terms)
            terms[M.LOSS_TOTAL] = float(loss.detach())
            for key, value in terms.items():
                self._metrics[mode][key].append(value)
            return loss

        def _replay_loss(self, model) -> tuple[Any, dict[str, float]]:
            """NLL (+ router aux loss) of the policy on a random replay batch, and its logged terms."""
            batch = self.replay_batch()
            kwargs: dict[str, Any] = {"use_cache": False}
            if self.aux_loss_enabled:
                kwargs["output_router_logits"] = True
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], fused_lm_head=True, **kwargs)
            n_tokens = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
            replay_nll = -out.log_probs.sum() / n_tokens
            terms = {M.LOSS_REPLAY_NLL: float(replay_nll.detach())}
            if self.aux_loss_enabled and out.aux_loss is not None:
                terms[M.LOSS_REPLAY_ROUTER_AUX] = float(out.aux_loss.detach())
                return replay_nll + self.router_aux_loss_coef * out.aux_loss, terms
            return replay_nll, terms

    return ReplayDPOTrainer


def dpo_training_args(cfg: OnlineDPOConfig, output_dir: str, seed: int):
    """TRL's DPOConfig of a round: loss types and weights from ``cfg``, one logging row per step, no saving."""
    import torch
    from trl import DPOConfig

    loss_type, weights = [], []
    if cfg.dpo_weight > 0:
        loss_type.append(cfg.dpo_loss_type)
        weights.append(cfg.dpo_weight)
    if cfg.chosen_loss_coef > 0:
        loss_type.append("sft")
        weights.append(cfg.chosen_loss_coef)
    return DPOConfig(
        output_dir=output_dir, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay, num_train_epochs=cfg.epochs_per_round,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        beta=cfg.beta, loss_type=loss_type, loss_weights=weights, max_length=cfg.max_length, seed=seed,
        optim=cfg.optim,
        # float32: bf16 is slower than float32 on this kind of CPU (PLATFORM.md); activation checkpointing
        # trades time for memory that these sequence lengths do not need.
        bf16=False, use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to=report_to(), disable_tqdm=True,
    )


def make_trainer(policy, ref_model, tokenizer, pairs: Sequence[dict], replay: Sequence[dict], cfg: OnlineDPOConfig,
                 seed: int, scratch: str, ema: dict | None = None, plain_head: bool = True, tracking_name: str = "dpo"):
    """The round's ReplayDPOTrainer on ``pairs`` (prompt/chosen/rejected), with the EMA callback when kept; its
    logs go to the run's trackers under ``tracking_name``."""
    import datasets
    from transformers.trainer_callback import PrinterCallback

    data = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    callbacks = [ema_callback(ema, cfg.ema_decay)] if ema is not None and cfg.ema_decay else []
    trainer = replay_dpo_trainer_class()(
        model=policy, ref_model=ref_model, args=dpo_training_args(cfg, scratch, seed), train_dataset=data,
        processing_class=tokenizer, callbacks=callbacks, moe_config=cfg.moe, replay=replay,
        replay_coef=cfg.sft_replay_coef, replay_batch_size=cfg.replay_batch_size, replay_seed=seed,
        dpo_loss_type=cfg.dpo_loss_type, plain_head=plain_head)
    trainer.remove_callback(PrinterCallback)
    attach(trainer, tracking_name)
    return trainer


def train_round(policy, ref_model, tokenizer, pairs: Sequence[dict], replay: Sequence[dict], cfg: OnlineDPOConfig,
                seed: int, scratch, ema: dict | None = None, plain_head: bool = True,
                tracking_name: str = "dpo") -> dict[str, float]:
    """Train the policy in place on ``pairs`` (one DPOTrainer, fresh optimizer); returns the round's means of the
    logged figures (``metrics.TRAIN_LOG_KEYS``, by their logged names) and ``train_steps``. ``plain_head=False``
    keeps TRL's fused LM head on CPU too (benchmarks/dpo.py compares the two)."""
    from pipeline.memory import large_buffers_on_heap

    trainer = make_trainer(policy, ref_model, tokenizer, pairs, replay, cfg, seed, str(scratch), ema, plain_head,
                           tracking_name)
    try:
        with large_buffers_on_heap():
            trainer.train()
    finally:
        unpatch_forward(policy, ref_model)
    rows = [h for h in trainer.state.log_history if "loss" in h]
    out = {k: statistics.fmean(float(h[k]) for h in rows if k in h) for k in M.TRAIN_LOG_KEYS
           if any(k in h for h in rows)}
    out[M.TRAIN_STEPS] = float(trainer.state.global_step)
    policy.eval()
    return out
