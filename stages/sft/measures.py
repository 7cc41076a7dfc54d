"""What an SFT phase measures besides TRL's own logs: every log line to a JSON-lines file, steady-state
tokens/s, the held-out loss without the aux term, and the first-batch check of the configured dropout.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from stages.sft.config import SFTStageConfig

log = logging.getLogger(__name__)

DROPOUT_GAP_WARN = 1.0
"""Training-mode loss minus eval-mode loss (nats) on the first batch above which the stage warns that the
configured dropout wrecks the model: a model pretrained with that dropout loses little to it, one pretrained
without it (such as the embedded policy with the recipe's hidden dropout) loses far more."""


def jsonl_log_callback(path: Path, phase: int):
    """A TrainerCallback that appends every log of the main process, with its phase and step, to ``path``."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Appends every log of the main process to a JSON-lines file (the driver replays it as metrics)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                with path.open("a") as f:
                    f.write(json.dumps({"phase": phase, "step": state.global_step, **logs}) + "\n")

    return JsonlLog()


class Throughput:
    """TrainerCallback: trained tokens and time of every step after the first (whose time includes
    one-off set-up: lazy allocations, first kernel calls), for a steady-state tokens/s."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                outer._begin = time.perf_counter()
                outer._tokens0 = outer._count()

            def on_step_end(self, args, state, control, **kwargs):
                if outer.steps_seen > 0:  # skip the first step
                    outer.seconds += time.perf_counter() - outer._begin
                    outer.tokens += outer._count() - outer._tokens0
                outer.steps_seen += 1

        self.callback = _CB()
        self.trainer = None
        self.steps_seen, self.seconds, self.tokens = 0, 0.0, 0

    def _count(self) -> int:
        return int(getattr(self.trainer, "_total_train_tokens", 0))  # TRL's count of non-padding tokens

    def tokens_per_s(self) -> float | None:
        return round(self.tokens / self.seconds, 3) if self.seconds > 0 else None


class _PureNLL:
    """Held-out loss without the aux term: TRL adds coef * aux_loss to eval losses too, which would make
    the before/after numbers depend on the coefficient."""

    def __init__(self, trainer):
        self.trainer = trainer

    def __enter__(self):
        self.saved = self.trainer.aux_loss_enabled
        self.trainer.aux_loss_enabled = False

    def __exit__(self, *exc):
        self.trainer.aux_loss_enabled = self.saved


def heldout_nll(trainer, dataset) -> float | None:
    """Mean token loss of ``trainer``'s model on ``dataset`` (no aux term); None without held-out records."""
    if dataset is None or len(dataset) == 0:
        return None
    with _PureNLL(trainer):
        metrics = trainer.evaluate(eval_dataset=dataset)
    return float(metrics["eval_loss"])


def dropout_check(trainer, cfg: SFTStageConfig, seed: int) -> dict | None:
    """Loss of the model on its first training batch in eval mode and in train mode (MoE dropout on); warns when
    the dropout alone costs over ``DROPOUT_GAP_WARN`` nats, i.e. the model was not trained with such dropout.
    Skipped where the trainer shards or places the model itself (FSDP, DeepSpeed)."""
    import torch

    from pipeline.training.moe import dropout_loss_gap

    if cfg.moe.hidden_dropout == 0 and cfg.moe.attention_dropout == 0:
        return None
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        return None
    ds = trainer.train_dataset
    rows = [ds[i] for i in range(min(len(ds), trainer.args.per_device_train_batch_size))]
    batch = {key: value.to(trainer.model.device) for key, value in trainer.data_collator(rows).items()
             if key in ("input_ids", "attention_mask", "position_ids", "labels") and isinstance(value, torch.Tensor)}
    eval_loss, train_loss = dropout_loss_gap(trainer.model, batch, seed)
    wrecked = train_loss - eval_loss > DROPOUT_GAP_WARN
    if wrecked:
        log.warning("sft: with moe.hidden_dropout=%s and moe.attention_dropout=%s the model's loss on its first batch "
                    "is %.2f in training mode vs %.2f without dropout: it was not trained with this much dropout, and "
                    "SFT would mostly teach it to survive it. Fix: lower stages.sft.moe.hidden_dropout (the recipe's "
                    "0.2 is for a model trained with it; configs/default.yaml uses 0.0 for the embedded policy)",
                    cfg.moe.hidden_dropout, cfg.moe.attention_dropout, train_loss, eval_loss)
    return {"eval_loss": round(eval_loss, 4), "train_loss": round(train_loss, 4),
            "warned": wrecked}
