"""SFT stage: fine-tune the MoE policy on the tiered SFT set, coarse to fine, with TRL's SFTTrainer.

Hunyuan-Large's settings are the defaults: 3 epochs in all, lr 2e-5 decaying to 2e-6, attention
dropout 0.1 and hidden dropout 0.2, router aux loss, routed experts at a scaled LR (see
``pipeline/training/moe.py``). Loss is on assistant tokens only (TRL's ``assistant_only_loss`` with a
training copy of the chat template that marks assistant turns with ``{% generation %}``).

Coarse-to-fine: ``phases`` is a list of {tiers, epochs}; phase k trains on the records whose
``tier`` is in its tiers, starting from the model phase k-1 saved. One LR schedule (warmup, then
decay to ``min_learning_rate``) spans all phases. Each finished phase is saved in the stage's work
folder, so a rerun after a kill continues with the next phase (and, with ``save_steps``, from the
last checkpoint inside a phase).

The training runs as a Ray Train job (``TorchTrainer``, one worker per GPU, DDP / FSDP / DeepSpeed
ZeRO-3 from ``distributed``; ``pipeline.training.ray_train``); on a machine without GPUs the same path
runs one CPU worker. ``backend: local`` runs the same worker function in this process instead.

Fast and slow thinking (``thinking``): rows of both modes at a ratio, the switch as the policy's template supports it,
no loss on a fast row's empty think block; a ChatML policy without think markers trains and is saved with ours.

Modules: ``config`` (settings), ``template`` (chat template with generation markers), ``modes`` (the thinking
modes' mix), ``records`` (checks,
held-out split, phases' records, LR windows, staged data), ``trainer`` (a phase's TRL trainer), ``measures``
(logs, throughput, held-out loss, dropout check), ``worker`` (what each training process runs), ``launch``
(``train_sft``), ``critic`` (fine-tuning a critique model with this trainer; not part of the stage).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.run.stage import Stage
from stages.sft.config import DistributedSettings, LoraSettings, SFTPhase, SFTStageConfig
from stages.sft.launch import train_sft
from stages.sft.measures import Throughput
from stages.sft.records import SFTDataError, check_records, lr_windows, phase_records, split_heldout
from stages.sft.template import chatml_training_template, training_chat_template
from stages.sft.trainer import make_sft_trainer

__all__ = ["STAGE", "DistributedSettings", "LoraSettings", "SFTDataError", "SFTPhase", "SFTStageConfig",
           "Throughput", "check_records", "chatml_training_template", "lr_windows", "make_sft_trainer",
           "phase_records", "run", "split_heldout", "train_sft", "training_chat_template"]


def run(ctx) -> None:
    """Stage entry: read `sft`, free the generation engines, train, write the `sft_model` folder."""
    cfg: SFTStageConfig = ctx.config
    records = ctx.read("sft")
    model = cfg.model or ctx.run_config.models[cfg.model_role].model
    ctx.release_pools()  # training needs the memory the vLLM engines hold
    if cfg.distributed.backend == "ray":
        ctx.ensure_ray()  # the run's Ray (its address / resources), which the Ray Train job joins
        ctx.used_ray = True
    ctx.log.info("sft: fine-tuning %s on %d records, phases %s", model, len(records),
                 [(p.tiers, p.epochs) for p in cfg.phases])
    metrics = train_sft(records, cfg, ctx.output_path("sft_model"), Path(ctx.work_dir) / "sft", seed=ctx.seed,
                        log_metrics=lambda row: ctx.log_metrics(row, step=row.get("step")), model=model)
    ctx.log.info("sft: held-out loss %s -> %s, %s train tokens/s", metrics["heldout_nll_before"],
                 metrics["heldout_nll_after"], metrics["train_tokens_per_s"])
    ctx.metrics.update(metrics)


STAGE = Stage(name="sft", inputs=("sft",), outputs=("sft_model",), config_cls=SFTStageConfig, run=run)
