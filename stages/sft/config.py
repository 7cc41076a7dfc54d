"""The SFT stage's settings: coarse-to-fine phases, LoRA, how the trainer is distributed, and the stage config.

``LoraSettings`` and ``DistributedSettings`` are meant for reuse by other training stages.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.run.stage import ModelRole
from pipeline.training.moe_config import MoETrainingConfig
from stages.sft.modes import SFTThinking


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
    `cpus_per_worker` threads and leave the other cores idle)."""
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
    thinking: SFTThinking | None = None
    """Fast and slow thinking: rows of both modes at `think_ratio`, the switch (`enable_thinking` or `/think`
    `/no_think`) as the policy's chat template supports it, no loss on a fast row's empty think block. A ChatML
    policy without think markers (SmolLM2) trains and is saved with configs/chat_templates/chatml_think.jinja.
    None: rows as the filter wrote them (the default)."""
    lora: LoraSettings | None = None
    """LoRA settings; None: full fine-tuning (the default)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more compute); turn on for long sequences."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Training dtype. auto: float32 on CPU (CPUs without bf16 units emulate bf16, which is slower), bfloat16 on
    GPU."""
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

