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
ZeRO-3 from ``distributed``); on a machine without GPUs the same path runs one CPU worker.
``backend: local`` runs the same worker function in this process instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.run.stage import ModelRole, Stage
from pipeline.training.moe_config import LRWindow, MoETrainingConfig

log = logging.getLogger(__name__)

STATE_VERSION = 1  # bump when the work-folder layout changes, so old partial state is discarded


class SFTPhase(BaseModel):
    """One coarse-to-fine phase."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    tiers: list[int] = Field(min_length=1)
    """Quality tiers (1-4, 4 best, from the filter stage's critique) this phase trains on."""
    epochs: float = Field(1.0, gt=0)
    """Passes over this phase's records."""

    @field_validator("tiers")
    @classmethod
    def _tiers_in_range(cls, v: list[int]) -> list[int]:
        bad = [t for t in v if t not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"tiers must be among 1, 2, 3, 4 (4 best); got {bad}")
        return sorted(set(v))


class LoraSettings(BaseModel):
    """LoRA (peft) instead of full fine-tuning. Each phase's adapter is merged into the saved model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: int = Field(32, ge=1)
    """LoRA scaling numerator (lora_alpha)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Modules that get adapters. "all-linear": every nn.Linear but the LM head (attention, shared expert).
    transformers 5.x stores routed experts as fused 3-D parameters, which "all-linear" leaves frozen."""


class DistributedSettings(BaseModel):
    """How the trainer runs: a Ray Train job (one worker per GPU) or in this process."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    backend: Literal["ray", "local"] = "ray"
    """ray: a Ray Train TorchTrainer job (on CPU: one worker). local: run the same worker function in-process."""
    num_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Training workers. auto: one per GPU in the Ray cluster, or 1 on CPU."""
    use_gpu: bool | Literal["auto"] = "auto"
    """Workers use GPUs. auto: when the Ray cluster has GPUs."""
    strategy: Literal["ddp", "fsdp", "deepspeed_zero3"] = "ddp"
    """Data parallelism across GPU workers: DDP (replicated), FSDP (transformers' `fsdp` + `fsdp_config`) or
    DeepSpeed ZeRO-3 (needs `pip install deepspeed`). A CPU run has one worker and uses none of them."""
    fsdp: str = "full_shard auto_wrap"
    """transformers `fsdp` option string, used with strategy fsdp."""
    fsdp_config: dict[str, Any] = Field(default_factory=dict)
    """transformers `fsdp_config`, used with strategy fsdp (e.g. {"fsdp_version": 2})."""
    deepspeed_config: dict[str, Any] | None = None
    """DeepSpeed config for strategy deepspeed_zero3. None: ZeRO-3 with "auto" sizes and 16-bit weight gathering
    on save (so the saved folder is a plain model vLLM serves)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Ray CPUs each worker reserves."""
    torch_threads: int | None = Field(None, ge=1)
    """CPU only: torch threads per worker. None: every core of the machine (Ray would otherwise pin torch to
    `cpus_per_worker` threads, which halves training speed on a 2-core machine)."""
    worker_nice: int | None = 0
    """Niceness of the training worker processes. Ray starts its workers at nice 15, so on a machine shared with
    other work (other jobs, engines of another run) the training would get only a small share of the CPU.
    0: run at normal priority, when the OS allows it (root or CAP_SYS_NICE); None: keep Ray's."""
    storage_path: str | None = None
    """Where Ray Train keeps run state. None: the stage's work folder (must be shared storage on a multi-node
    cluster, like the run directory itself)."""


class SFTStageConfig(BaseModel):
    """Supervised fine-tuning of the MoE policy (TRL SFTTrainer) with Hunyuan-Large's MoE settings."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model_role: ModelRole = "policy"
    """Model role (`models.<role>` of the run config) whose model is fine-tuned: the MoE policy."""
    model: str | None = None
    """Fine-tune this model instead of the role's: an embedded name (`posttrain models list`) or a model folder."""
    phases: list[SFTPhase] = Field(
        default_factory=lambda: [SFTPhase(tiers=[2, 3, 4], epochs=2), SFTPhase(tiers=[3, 4], epochs=1)],
        min_length=1)
    """Coarse-to-fine phases, in order; each continues from the model the previous one saved. Default: every
    accepted tier for 2 epochs, then the top tiers for 1 (3 epochs in all, the recipe's number)."""
    learning_rate: float = Field(2e-5, gt=0)
    """Peak learning rate (non-expert and shared-expert parameters; routed experts get `moe.routed_expert_lr_scale`
    times it)."""
    min_learning_rate: float = Field(2e-6, ge=0)
    """Learning rate at the end of the last phase (the recipe decays 2e-5 to 2e-6)."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay shape from the peak to `min_learning_rate`, over all phases together."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Fraction of all training (all phases) spent warming up linearly from 0."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (not applied to biases and norms)."""
    per_device_train_batch_size: int = Field(4, ge=1)
    """Sequences per worker per micro-batch (packed rows when `packing`)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    max_length: int = Field(2048, ge=16)
    """Longest training sequence in tokens (longer conversations are truncated); the packed row length with
    `packing`. The report trains at 32k on GPUs."""
    packing: bool = False
    """Pack several conversations into each row (TRL best-fit-decreasing packing, padding-free)."""
    assistant_only_loss: bool = True
    """Loss on assistant tokens only (each assistant turn's content and its end-of-turn token)."""
    chat_template_path: str | None = None
    """A Jinja chat template with {% generation %} markers, for a tokenizer whose template neither TRL nor this
    stage knows how to mark (this stage marks ChatML templates itself)."""
    lora: LoraSettings | None = None
    """LoRA settings; None: full fine-tuning (the default)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~20-30% slower); turn on for long sequences."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Training dtype. auto: float32 on CPU (3x faster than bf16 on CPUs without bf16 units), bfloat16 on GPU."""
    heldout_fraction: float = Field(0.05, ge=0, lt=1)
    """Fraction of records (chosen by id hash) kept out of training to measure the loss before and after."""
    heldout_max_records: int = Field(64, ge=0)
    """Cap on held-out records (evaluation costs a forward pass each, twice)."""
    max_steps_per_phase: int | None = Field(None, ge=1)
    """Cap on optimizer steps per phase (short demo runs); None: the phase's epochs decide."""
    logging_steps: int = Field(10, ge=1)
    """Log loss, LR, aux loss and expert load every this many steps."""
    save_steps: int | None = Field(None, ge=1)
    """Checkpoint inside a phase every this many steps (a rerun resumes there); None: only whole phases are kept."""
    seed: int | None = None
    """Training seed (data order, dropout, LoRA init). None: the run seed."""
    moe: MoETrainingConfig = Field(default_factory=MoETrainingConfig)
    """MoE dropout, router aux loss, expert-specific learning rates, expert-load logging."""
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    """Ray Train workers and the multi-GPU strategy."""


class SFTDataError(ValueError):
    """The SFT records cannot be trained on; the message names the record/field and the fix."""


# --------------------------------------------------------------------------------------------------
# Chat template with generation markers


def _render(tokenizer, messages, template, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


_PROBES = [
    [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}],
    [{"role": "system", "content": "s1"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}],
    [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}],
]


def chatml_training_template(tokenizer) -> str | None:
    """A ChatML training template with {% generation %} around each assistant turn's content + <|im_end|>.

    TRL ships training templates only for the model families it lists (SmolLM2's is not among them),
    so ChatML templates, the most common family, are marked here. The template must render exactly
    what the tokenizer's own template renders on probe conversations, else None.
    """
    original = tokenizer.chat_template
    if not isinstance(original, str) or "<|im_start|>" not in original:
        return None
    try:
        text = _render(tokenizer, _PROBES[0], original)
    except Exception:  # a template that cannot render the probe is not one we can mark
        return None
    start = text.find("<|im_start|>user\nu1")
    if start < 0:
        return None
    default_prefix = json.dumps(text[:start], ensure_ascii=False)  # the default system turn, if any
    template = (
        "{%- for message in messages %}"
        "{%- if loop.first and message['role'] != 'system' %}{{ " + default_prefix + " }}{%- endif %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\\n' }}"
        "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    try:
        for probe in _PROBES:
            if _render(tokenizer, probe, template) != _render(tokenizer, probe, original):
                return None
        if _render(tokenizer, _PROBES[0][:1], template, True) != _render(tokenizer, _PROBES[0][:1], original, True):
            return None
    except Exception:
        return None
    return template


def training_chat_template(tokenizer, chat_template_path: str | None = None) -> str | None:
    """The chat template to train with (None: the tokenizer's own already has generation markers).

    Order: a template file given in the config; the tokenizer's own if it is marked; TRL's training
    template for known families; our ChatML marking. Otherwise a ValueError says how to fix it.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if chat_template_path is not None:
        path = Path(chat_template_path)
        if not path.is_file():
            raise ValueError(f"chat_template_path {path} does not exist; fix: point it to a .jinja template file")
        template = path.read_text()
        if not has_generation_markers(template):
            raise ValueError(f"{path} has no {{% generation %}} markers around assistant turns; fix: add them "
                             "(see TRL's chat_templates/*_training.jinja)")
        return template
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; fix: use a chat model's tokenizer or set "
                         "chat_template_path")
    if has_generation_markers(tokenizer.chat_template):
        return None
    try:
        template = get_training_chat_template(tokenizer)
    except Exception:  # TRL raises for families it does not know
        template = None
    template = template or chatml_training_template(tokenizer)
    if template is None:
        raise ValueError("the tokenizer's chat template has no {% generation %} markers and is neither a family "
                         "TRL knows nor ChatML, so assistant-only loss cannot mask it; fix: write a copy with "
                         "markers and set chat_template_path, or set assistant_only_loss: false")
    return template


# --------------------------------------------------------------------------------------------------
# Records


def check_records(records: Sequence[dict]) -> None:
    """Every record must have an id, a tier 1-4 and chat `messages` with an assistant turn."""
    for i, rec in enumerate(records):
        rid = rec.get("id", f"#{i}")
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise SFTDataError(f"sft record {rid}: field `messages` must be a non-empty list of "
                               "{role, content}; fix: re-run the filter stage")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise SFTDataError(f"sft record {rid}: every message needs string `role` and `content`, got {m!r}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise SFTDataError(f"sft record {rid}: `messages` has no assistant turn, so there is nothing to train on")
        if rec.get("tier") not in (1, 2, 3, 4):
            raise SFTDataError(f"sft record {rid}: field `tier` must be 1-4 (critique tier), got {rec.get('tier')!r}; "
                               "fix: re-run the filter stage")


def _hash_unit(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def split_heldout(records: Sequence[dict], fraction: float, max_records: int, seed: int) -> tuple[list, list]:
    """(train, heldout): held-out records are those with the smallest hash of (seed, id), a stable choice."""
    n = min(max_records, int(round(len(records) * fraction)))
    if fraction > 0 and n == 0 and len(records) >= 4 and max_records > 0:
        n = 1
    if n == 0:
        return list(records), []
    order = sorted(range(len(records)), key=lambda i: _hash_unit(f"{seed}:{records[i].get('id', i)}"))
    held = set(order[:n])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def phase_records(records: Sequence[dict], tiers: Sequence[int]) -> list[dict]:
    keep = set(tiers)
    return [r for r in records if r["tier"] in keep]


def lr_windows(sizes: Sequence[float], cfg: SFTStageConfig) -> list[LRWindow]:
    """Split one global schedule over the phases in proportion to their work (records x epochs)."""
    total = sum(sizes) or 1.0
    windows, start = [], 0.0
    min_rate = cfg.min_learning_rate / cfg.learning_rate
    for size in sizes:
        end = start + size / total
        windows.append(LRWindow(start=start, end=end, kind=cfg.lr_scheduler, warmup_ratio=cfg.warmup_ratio,
                                min_lr_rate=min_rate))
        start = end
    return windows


# --------------------------------------------------------------------------------------------------
# The worker: what each training process runs (Ray Train worker, or this process with backend local)


def _jsonl_callback(path: Path, phase: int):
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


def _training_args(cfg: SFTStageConfig, spec: dict, out_dir: Path, bf16: bool, max_steps: int | None, seed: int):
    from trl import SFTConfig

    kwargs: dict[str, Any] = {}
    if spec["use_gpu"] and spec["world_size"] > 1:
        if cfg.distributed.strategy == "fsdp":
            kwargs.update(fsdp=cfg.distributed.fsdp, fsdp_config=dict(cfg.distributed.fsdp_config))
        elif cfg.distributed.strategy == "deepspeed_zero3":
            kwargs["deepspeed"] = cfg.distributed.deepspeed_config or {
                "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                                      "overlap_comm": True, "contiguous_gradients": True},
                "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
            }
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
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kwargs,
    )


def _load_model(path: str, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


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


def _heldout_nll(trainer, dataset) -> float | None:
    if dataset is None or len(dataset) == 0:
        return None
    with _PureNLL(trainer):
        metrics = trainer.evaluate(eval_dataset=dataset)
    return float(metrics["eval_loss"])


def _leave_single_process_group() -> None:
    """One training process: leave the process group Ray Train set up, so that transformers does not wrap the
    model in DDP: over one process DDP only adds work (every gradient copied into its buckets, the autograd graph
    walked for unused experts at every step)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1:
        dist.destroy_process_group()
    for var in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):  # accelerate would set the group up again
        os.environ.pop(var, None)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _save_phase(trainer, model_in: str, out: Path, tokenizer, original_template, is_main: bool, lora: bool,
                saved_config: dict) -> None:
    """Save the phase's model as a plain transformers folder (LoRA merged, original chat template)."""
    trainer.moe_dropout.remove()  # restores attention_dropout in the config; hooks are not saved anyway
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    text_cfg = base.config.get_text_config()
    for key, value in saved_config.items():  # TRL switched output_router_logits on for training
        setattr(text_cfg, key, value)
    tmp = out.parent / f".{out.name}.tmp"
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    if lora:
        adapter = out.parent / f".{out.name}.adapter"
        trainer.save_model(str(adapter))
        if is_main:
            from peft import PeftModel

            merged = PeftModel.from_pretrained(_load_model(model_in, str(base.dtype).removeprefix("torch.")),
                                               str(adapter)).merge_and_unload()
            for key, value in saved_config.items():
                setattr(merged.config.get_text_config(), key, value)
            merged.save_pretrained(tmp)
            shutil.rmtree(adapter, ignore_errors=True)
    else:
        trainer.save_model(str(tmp))
    if is_main:
        training_template, tokenizer.chat_template = tokenizer.chat_template, original_template
        tokenizer.save_pretrained(tmp)  # the served model keeps the tokenizer's own template
        tokenizer.chat_template = training_template
        for stale in tmp.glob("training_args.bin"):
            stale.unlink()
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    _barrier()  # other ranks load this folder for the next phase


DROPOUT_GAP_WARN = 1.0
"""Nats of training-mode loss over eval-mode loss, on the first batch, above which the SFT stage warns that the
configured dropout wrecks the model (embedded policy: attention dropout 0.1 alone costs 0.07, hidden dropout 0.05
costs 1.2, 0.2 costs 7)."""


def _dropout_check(trainer, cfg: SFTStageConfig, seed: int) -> dict | None:
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


def make_sft_trainer(model, tokenizer, records: Sequence[dict], cfg: SFTStageConfig, args, window: LRWindow | None,
                     peft_config=None, callbacks: list | None = None):
    """TRL's SFTTrainer with the MoE settings (``moe_trainer_class``) over the records' `messages`.

    ``tokenizer`` must already carry the training chat template (``training_chat_template``) when
    ``args.assistant_only_loss`` is on. Only `messages` goes to TRL (lineage columns hold nested
    values TRL's collator has no use for).
    """
    from datasets import Dataset
    from trl import SFTTrainer

    from pipeline.training.moe_trainer import moe_trainer_class

    train_ds = Dataset.from_list([{"messages": r["messages"]} for r in records])
    return moe_trainer_class(SFTTrainer)(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                                         peft_config=peft_config, moe_config=cfg.moe, lr_window=window,
                                         callbacks=callbacks)


def train_worker(spec: dict) -> dict:
    """Train every phase not finished yet; runs in each training process. Returns the main process's metrics.

    ``spec``: config (dict), model path, work folder, output folder, seed, world size, use_gpu.
    Phase k reads ``work/phases/k-1/model`` (or the base model), trains, and saves ``work/phases/k/model``
    with a ``done.json``; the last phase's model is copied to the output folder.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from pipeline.memory import large_buffers_on_heap

    cfg = SFTStageConfig.model_validate(spec["config"])
    work = Path(spec["work_dir"])
    out_dir = Path(spec["output_dir"])
    if not spec["use_gpu"]:
        torch.set_num_threads(cfg.distributed.torch_threads or len(os.sched_getaffinity(0)))
    if spec["world_size"] == 1:
        _leave_single_process_group()
    rank = int(os.environ.get("RANK", "0"))
    is_main = rank == 0
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and spec["use_gpu"])
    dtype_name = "bfloat16" if bf16 else "float32"
    seed = spec["seed"]

    train_all = Dataset.from_parquet(str(work / "data" / "train.parquet")).to_list()
    heldout_path = work / "data" / "heldout.parquet"
    heldout = Dataset.from_parquet(str(heldout_path)).to_list() if heldout_path.exists() else []
    sizes = [len(phase_records(train_all, p.tiers)) * p.epochs for p in cfg.phases]
    windows = lr_windows(sizes, cfg)

    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    original_template = tokenizer.chat_template
    if cfg.assistant_only_loss:
        template = training_chat_template(tokenizer, cfg.chat_template_path)
        if template is not None:
            tokenizer.chat_template = template
    heldout_ds = Dataset.from_list([{"messages": r["messages"]} for r in heldout]) if heldout else None

    log_path = work / "train_log.jsonl"
    summary: dict[str, Any] = {"phases": []}
    before_file = work / "heldout_before.json"
    if before_file.exists():  # measured by an earlier, interrupted run of these phases
        summary["heldout_nll_before"] = json.loads(before_file.read_text())["nll"]
    model_in = spec["model_path"]
    last_trainer = None
    for k, phase in enumerate(cfg.phases):
        phase_dir = work / "phases" / str(k)
        done = phase_dir / "done.json"
        if done.exists():
            summary["phases"].append(json.loads(done.read_text()))
            if (phase_dir / "model").exists():
                model_in = str(phase_dir / "model")
            continue
        records = phase_records(train_all, phase.tiers)
        if not records:
            info = {"phase": k, "tiers": phase.tiers, "records": 0, "skipped": "no records of these tiers"}
            if is_main:
                phase_dir.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(info))
            summary["phases"].append(info)
            continue
        torch.manual_seed(seed + k)
        model = _load_model(model_in, dtype_name)
        text_cfg = model.config.get_text_config()
        saved_config = {key: getattr(text_cfg, key) for key in ("output_router_logits", "router_aux_loss_coef")
                        if hasattr(text_cfg, key)}
        args = _training_args(cfg, spec, phase_dir / "trainer", bf16, cfg.max_steps_per_phase, seed + k)
        args.num_train_epochs = phase.epochs
        peft_config = None
        if cfg.lora is not None:
            from peft import LoraConfig

            peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                     target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
        clock = Throughput()
        trainer = make_sft_trainer(model, tokenizer, records, cfg, args, windows[k], peft_config,
                                   callbacks=[_jsonl_callback(log_path, k), clock.callback])
        clock.trainer = trainer
        if k == 0 and "heldout_nll_before" not in summary:  # the base model, before any phase
            summary["heldout_nll_before"] = _heldout_nll(trainer, heldout_ds)
            if is_main:
                before_file.write_text(json.dumps({"nll": summary["heldout_nll_before"]}))
        resume = None
        ckpts = sorted((phase_dir / "trainer").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        if ckpts:
            resume = str(ckpts[-1])
        dropout_check = _dropout_check(trainer, cfg, seed + k) if k == 0 and resume is None else None
        t0 = time.perf_counter()
        with large_buffers_on_heap():
            result = trainer.train(resume_from_checkpoint=resume)
        wall = time.perf_counter() - t0
        tokens = int(trainer._total_train_tokens)  # TRL's count of non-padding tokens trained on
        runtime = float(result.metrics.get("train_runtime", wall))
        info = {
            "phase": k, "tiers": phase.tiers, "epochs": phase.epochs, "records": len(records),
            "steps": int(trainer.state.global_step), "train_loss": float(result.metrics.get("train_loss", math.nan)),
            "train_tokens": tokens, "train_runtime_s": round(runtime, 3),
            "train_tokens_per_s": round(tokens / runtime, 3) if runtime > 0 else None,
            "steady_tokens_per_s": clock.tokens_per_s(),
            "steady_tokens": clock.tokens, "steady_s": round(clock.seconds, 3),
            "lr_window": [windows[k].start, windows[k].end],
            "routed_expert_lr_scale": next((g["initial_lr"] / args.learning_rate for g in trainer.optimizer.param_groups
                                            if g.get("group") == "routed_expert"), None),
            "resumed_from": resume,
            "started_from": model_in,
            "torch_threads": torch.get_num_threads(),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
            "dropout_loss_check": dropout_check,
        }
        last_trainer = trainer
        if k == len(cfg.phases) - 1 or all(not phase_records(train_all, p.tiers) for p in cfg.phases[k + 1:]):
            summary["heldout_nll_after"] = _heldout_nll(trainer, heldout_ds)
            info["heldout_nll_after"] = summary["heldout_nll_after"]
        _save_phase(trainer, model_in, phase_dir / "model", tokenizer, original_template, is_main,
                    cfg.lora is not None, saved_config)
        if is_main:
            shutil.rmtree(phase_dir / "trainer", ignore_errors=True)  # checkpoints of a finished phase
            done.write_text(json.dumps(info))
        summary["phases"].append(info)
        model_in = str(phase_dir / "model")
        del trainer, model
    if "heldout_nll_after" not in summary:
        after = [p.get("heldout_nll_after") for p in summary["phases"] if p.get("heldout_nll_after") is not None]
        summary["heldout_nll_after"] = after[-1] if after else None
    if is_main:
        if model_in == spec["model_path"]:
            raise SFTDataError("no phase had records to train on; fix: check the phases' tiers against the sft set")
        tmp = out_dir.parent / f".{out_dir.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(model_in, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    del last_trainer
    return summary


# --------------------------------------------------------------------------------------------------
# The core: records + config -> model folder + metrics


def _renice(nice: int) -> None:
    """Set the niceness of every thread of this process (Linux keeps it per thread; threads started
    later inherit it). Lowering it needs CAP_SYS_NICE or a matching RLIMIT_NICE: else left as is."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:  # not permitted, or the thread ended
            log.debug("sft: cannot set niceness %d on thread %d", nice, tid)


def _ray_train(spec: dict, cfg: SFTStageConfig, work: Path) -> dict:
    """Run ``train_worker`` as a Ray Train TorchTrainer job; returns the rank-0 summary."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.executor import cluster_has_gpus, ensure_ray

    ensure_ray()
    use_gpu = cluster_has_gpus() if cfg.distributed.use_gpu == "auto" else bool(cfg.distributed.use_gpu)
    if cfg.distributed.num_workers == "auto":
        workers = int(ray.cluster_resources().get("GPU", 0)) if use_gpu else 1
    else:
        workers = cfg.distributed.num_workers
    workers = max(1, workers)
    if not use_gpu and workers > 1:
        log.warning("sft: %d CPU workers requested; CPU training uses one worker", workers)
        workers = 1
    if not use_gpu and cfg.distributed.strategy != "ddp":
        log.info("sft: strategy %s shards across GPUs; this CPU run has one worker and does not use it",
                 cfg.distributed.strategy)
    spec = {**spec, "use_gpu": use_gpu, "world_size": workers, "worker_nice": cfg.distributed.worker_nice}
    summary_path = work / "summary.json"
    summary_path.unlink(missing_ok=True)

    def loop(config: dict) -> None:
        # Ray Train patches print() into its logger, which also logs what a library prints into a
        # captured stream: dill (behind `datasets` fingerprints) disassembles functions that way,
        # ~100 lines of bytecode per run. Plain print still reaches the driver through Ray's log.
        try:
            import builtins

            from ray.train.v2._internal.logging import patch_print

            builtins.print = patch_print._original_print
        except ImportError:  # another Ray version: at worst, noisy logs
            pass
        if config.get("worker_nice") is not None:
            _renice(config["worker_nice"])
        out = train_worker(config)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(config["work_dir"], "summary.json").write_text(json.dumps(out))

    resources = {"CPU": cfg.distributed.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        loop, train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(storage_path=_storage_uri(cfg.distributed.storage_path, work),
                             name="sft", worker_runtime_env={"env_vars": _cpu_worker_env(use_gpu)}),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train wraps the worker's exception; surface its message
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise RuntimeError(f"sft Ray Train job failed: {type(cause).__name__}: {cause}") from exc
    if result.error is not None:
        raise RuntimeError(f"sft Ray Train job failed: {result.error}") from result.error
    if not summary_path.exists():
        raise RuntimeError(f"sft Ray Train job ended without writing {summary_path}; see the worker log above")
    summary = json.loads(summary_path.read_text())
    summary["workers"] = workers
    summary["use_gpu"] = use_gpu
    return summary


def _cpu_worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment of the CPU training worker: one malloc arena (``MALLOC_ARENA_MAX=1``, unless set already).

    Ray Train runs the training function in a thread of the worker process, and glibc gives each thread its own
    arena: 64 MB heaps that it maps and unmaps as tensors come and go, which ``large_buffers_on_heap`` cannot
    change (it tunes the main arena). Measured with the SFT benchmark's run in a thread of one process: 2x the
    page faults of the same run on the main thread (5.3 M vs 2.6 M) and 54 vs 66 tokens/s; with one arena,
    2.6 M faults and 71 tokens/s. The arena is chosen when the process starts, hence the worker's runtime env.
    """
    if use_gpu:
        return {}
    return {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1")}


def _storage_uri(configured: str | None, work: Path) -> str:
    """Ray Train's storage path: a URI (s3://, gs://...) as given, a local path made absolute (Ray requires it)."""
    if configured and "://" in configured:
        return configured
    return str(Path(configured or work / "ray_train").resolve())


def _steady(phases: list[dict]) -> float | None:
    seconds = sum(p.get("steady_s") or 0.0 for p in phases)
    return round(sum(p.get("steady_tokens") or 0 for p in phases) / seconds, 3) if seconds else None


def _state_key(cfg: SFTStageConfig, model_path: str, train: list[dict], heldout: list[dict], seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": STATE_VERSION, "cfg": cfg.model_dump(mode="json", exclude={"distributed"}),
                         "model": model_path, "seed": seed}, sort_keys=True).encode())
    for r in train + [{"heldout": 1}] + heldout:
        h.update(str(r.get("id")).encode() + json.dumps(r.get("messages"), sort_keys=True).encode())
    return h.hexdigest()


def train_sft(records: Sequence[dict] | Any, cfg: SFTStageConfig, output_dir: str | os.PathLike,
              work_dir: str | os.PathLike, seed: int = 0,
              log_metrics: Callable[[dict], None] | None = None, model: str | None = None) -> dict:
    """Fine-tune a model on SFT ``records`` (list of dicts or a datasets.Dataset) into ``output_dir``.

    The model is ``cfg.model``, else ``model`` (the stage passes its role's model).

    Holds out a few records, trains the phases (via Ray Train, or in-process with backend local),
    writes a model folder that transformers and vLLM load, and returns the metrics (held-out loss
    before/after, per-phase steps, tokens, tokens/s). ``work_dir`` keeps finished phases: calling again
    with the same inputs continues where a killed run stopped. ``log_metrics`` receives each training
    log (loss, LR, aux loss, expert load) after training.
    """
    from datasets import Dataset

    from pipeline.models.catalog import resolve_model

    if hasattr(records, "to_list"):
        records = records.to_list()
    records = list(records)
    if not records:
        raise SFTDataError("the sft dataset is empty; fix: check the filter stage's output")
    check_records(records)
    seed = cfg.seed if cfg.seed is not None else seed
    if (cfg.model or model) is None:
        raise ValueError("sft: no model to fine-tune; fix: set sft.model or a model role (sft.model_role)")
    model_path = str(resolve_model(cfg.model or model))
    train, heldout = split_heldout(records, cfg.heldout_fraction, cfg.heldout_max_records, seed)
    # Absolute paths: Ray Train wants an absolute storage path, and its workers run in another folder.
    work, output_dir = Path(work_dir).resolve(), Path(output_dir).resolve()
    key = _state_key(cfg, model_path, train, heldout, seed)
    state_file = work / "state.json"
    if work.exists() and (not state_file.exists() or json.loads(state_file.read_text()).get("key") != key):
        for sub in ("phases", "data", "train_log.jsonl", "heldout_before.json", "summary.json"):
            target = work / sub
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    (work / "data").mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"key": key}))
    columns = ("id", "tier", "messages")
    Dataset.from_list([{c: r.get(c) for c in columns} for r in train]).to_parquet(str(work / "data" / "train.parquet"))
    heldout_path = work / "data" / "heldout.parquet"
    if heldout:
        Dataset.from_list([{c: r.get(c) for c in columns} for r in heldout]).to_parquet(str(heldout_path))
    else:
        heldout_path.unlink(missing_ok=True)
    Path(output_dir).parent.mkdir(parents=True, exist_ok=True)
    spec = {"config": cfg.model_dump(mode="json"), "model_path": model_path, "work_dir": str(work),
            "output_dir": str(output_dir), "seed": seed, "use_gpu": False, "world_size": 1}
    t0 = time.perf_counter()
    log_path = work / "train_log.jsonl"
    logged_before = sum(1 for _ in log_path.open()) if log_path.exists() else 0
    if cfg.distributed.backend == "ray":
        summary = _ray_train(spec, cfg, work)
    else:
        summary = train_worker(spec)
        summary["workers"], summary["use_gpu"] = 1, False
    if log_metrics is not None and log_path.exists():
        with log_path.open() as f:
            for i, line in enumerate(f):
                if i >= logged_before:
                    log_metrics(json.loads(line))
    phases = [p for p in summary["phases"] if p.get("records")]
    tokens = sum(p.get("train_tokens", 0) for p in phases)
    runtime = sum(p.get("train_runtime_s", 0.0) for p in phases)
    return {
        "records": len(records), "train_records": len(train), "heldout_records": len(heldout),
        "heldout_nll_before": summary.get("heldout_nll_before"),
        "heldout_nll_after": summary.get("heldout_nll_after"),
        "train_tokens": tokens, "train_runtime_s": round(runtime, 3),
        "train_tokens_per_s": round(tokens / runtime, 3) if runtime else None,
        "steady_tokens_per_s": _steady(phases),
        "wall_s": round(time.perf_counter() - t0, 3),
        "workers": summary.get("workers"), "use_gpu": summary.get("use_gpu"),
        "phases": summary["phases"],
    }


# --------------------------------------------------------------------------------------------------
# Stage


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
