"""The TRL trainer of one SFT phase: its training arguments (the multi-GPU strategy included), the model load,
the LoRA config, and TRL's SFTTrainer with the MoE settings over the phase's records.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.thinking import TEMPLATE_ARG
from pipeline.tracking import report_to
from pipeline.training.moe_config import LRWindow
from stages.sft.config import LoraSettings, SFTStageConfig
from stages.sft.modes import ENABLE_THINKING_COLUMN

DEFAULT_DEEPSPEED_ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                          "overlap_comm": True, "contiguous_gradients": True},
    "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
}
"""DeepSpeed config of strategy deepspeed_zero3 when none is given: ZeRO-3, sizes from the trainer, 16-bit
weights gathered on save (so the saved folder is a plain model)."""


def training_args(cfg: SFTStageConfig, spec: dict, out_dir: Path, bf16: bool, max_steps: int | None, seed: int):
    """TRL ``SFTConfig`` of a phase (``num_train_epochs`` is set per phase). ``spec`` gives ``use_gpu`` and
    ``world_size``: the FSDP / DeepSpeed options apply only to several GPU workers."""
    from trl import SFTConfig

    kwargs: dict[str, Any] = {}
    if spec["use_gpu"] and spec["world_size"] > 1:
        if cfg.distributed.strategy == "fsdp":
            kwargs.update(fsdp=cfg.distributed.fsdp, fsdp_config=dict(cfg.distributed.fsdp_config))
        elif cfg.distributed.strategy == "deepspeed_zero3":
            kwargs["deepspeed"] = cfg.distributed.deepspeed_config or DEFAULT_DEEPSPEED_ZERO3
    return SFTConfig(
        output_dir=str(out_dir),
        num_train_epochs=1.0,  # replaced per phase
        max_steps=max_steps if max_steps is not None else -1,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        max_length=cfg.max_length,
        packing=cfg.packing,
        assistant_only_loss=cfg.assistant_only_loss,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=bf16,
        use_cpu=not spec["use_gpu"],
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=1,
        report_to=report_to(),
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kwargs,
    )


def load_model(path: str, dtype_name: str):
    """The causal LM at ``path`` in ``dtype_name`` (bfloat16 or float32).

    With strategy deepspeed_zero3, call it while the phase's training arguments are alive: transformers then loads
    the weights partitioned across the workers (``deepspeed.zero.Init``, a collective call of every worker).
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


@contextmanager
def unpartitioned_load() -> Iterator[None]:
    """Model loads in this block are plain full loads even while ZeRO-3 training arguments exist (for a load that
    only one process makes, where the collective ``deepspeed.zero.Init`` would wait for the others forever)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps no public getter of this weakref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        config = ref() if ref is not None else None
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def lora_config(lora: LoraSettings | None):
    """peft's ``LoraConfig`` for these settings; None without LoRA (full fine-tuning)."""
    if lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def make_sft_trainer(model, tokenizer, records: Sequence[dict], cfg: SFTStageConfig, args, window: LRWindow | None,
                     peft_config=None, callbacks: list | None = None):
    """TRL's SFTTrainer with the MoE settings (``moe_trainer_class``) over the records' `messages`.

    ``tokenizer`` must already carry the training chat template (``training_chat_template``) when
    ``args.assistant_only_loss`` is on. Only `messages` goes to TRL (lineage columns hold nested
    values TRL's collator has no use for), with each row's ``enable_thinking`` as its `chat_template_kwargs` when
    every row has one (sft.thinking with a template that takes the argument).
    """
    from datasets import Dataset
    from trl import SFTTrainer

    from pipeline.training.moe_trainer import moe_trainer_class

    train_ds = Dataset.from_list([_row(r) for r in records] if all(r.get(ENABLE_THINKING_COLUMN) is not None
                                                                    for r in records)
                                 else [{"messages": r["messages"]} for r in records])
    return moe_trainer_class(SFTTrainer)(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                                         peft_config=peft_config, moe_config=cfg.moe, lr_window=window,
                                         callbacks=callbacks)


def _row(rec: dict) -> dict:
    return {"messages": rec["messages"], "chat_template_kwargs": {TEMPLATE_ARG: bool(rec[ENABLE_THINKING_COLUMN])}}
