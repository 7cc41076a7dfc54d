"""``OnlineDPOConfig``: the settings of the dpo stage (rounds, sampling, pairs, loss, training, held-out prompts)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from critique.grade import CritiqueConfig
from pipeline.run.stage import ModelRole, OptionalModelRole
from pipeline.training.moe_config import MoETrainingConfig
from reward.score import RewardPoolConfig
from stages.dpo.losses import DpoLossType
from stages.sft.config import LoraSettings


class DpoDistributedSettings(BaseModel):
    """Where the rounds' training runs: in the driver process (TRL's DPOTrainer) or as one Ray Train job that
    keeps the policy and its reference loaded across rounds (``stages/dpo/cluster``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    backend: Literal["local", "ray"] = "local"
    """local: train in the driver process (one device). ray: a Ray Train job of `num_workers` workers (gloo on
    CPU, NCCL on GPU), started once for the stage; the driver sends it each round's pairs."""
    num_workers: int = Field(1, ge=1)
    """Training workers of the Ray Train job (one process, and on GPU one GPU, each)."""
    strategy: Literal["fsdp2", "deepspeed_zero3", "none"] = "fsdp2"
    """How the workers share the model: fsdp2 (``torch.distributed.fsdp.fully_shard`` per decoder layer: weights,
    gradients and optimizer state sharded), deepspeed_zero3 (not implemented for DPO yet: rejected with the reason)
    or none (every worker holds the whole model; gradients all-reduced as in DDP)."""
    use_gpu: bool | Literal["auto"] = "auto"
    """Workers use GPUs. auto: when the Ray cluster has GPUs."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Ray CPUs each worker reserves."""
    gpus_per_worker: float = Field(1.0, gt=0, le=1)
    """GPU only: the share of a GPU each worker reserves in Ray. Below 1 a worker shares its GPU with the policy's
    engines (colocation, with ``sleep_engines_while_training``) or the scoring actors."""
    torch_threads: int | None = Field(None, ge=1)
    """CPU only: torch threads per worker. None: the machine's cores divided among the workers."""
    max_restarts: int = Field(1, ge=0)
    """Times the job is started again after a worker died; the round restarts from the last finished round's
    sharded checkpoint and its saved pairs, and the weight-sync group is rebuilt."""
    storage_path: str | None = None
    """Ray Train's run state. None: the stage's work folder (shared storage on a multi-node cluster)."""

    @model_validator(mode="after")
    def _known_strategy(self) -> DpoDistributedSettings:
        if self.backend == "ray" and self.strategy == "deepspeed_zero3":
            raise ValueError("dpo.distributed.strategy deepspeed_zero3 is not implemented for online DPO (the round "
                             "trainer shards with FSDP2); fix: use fsdp2")
        return self


class DPOThinking(BaseModel):
    """Online DPO per thinking mode."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    think_ratio: float = Field(0.5, ge=0, le=1)
    """Fraction of prompts sampled in slow mode (by a seeded hash of the prompt id), the rest in fast mode. Only the
    samples that follow their prompt's mode are paired."""


class OnlineDPOConfig(BaseModel):
    """Iterative online DPO of the SFT policy against the reward model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    pool_role: ModelRole = "policy"
    """Model role whose engine settings (workers, KV cache, max_model_len, dtype) serve the policy. The engines
    load this stage's `sft_model` input, not the role's model, and belong to this stage: their weights change
    every round."""
    rounds: int = Field(2, ge=1)
    """Online rounds (sample, score, pair, train, sync)."""
    prompts_per_round: int = Field(8, ge=1)
    """Fresh prompts drawn from `evolved` each round."""
    reuse_prompts: bool = False
    """Cycle through the prompts again when rounds x prompts_per_round exceeds them. False: such a config is
    rejected before any work starts."""
    samples_per_prompt: int = Field(4, ge=2)
    """Responses the policy samples per prompt; the best and the worst make the pair."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature. 1.0 samples the policy itself, which keeps the KL estimate unbiased."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold."""
    max_tokens: int = Field(128, ge=1)
    """Longest sampled response, in tokens."""
    min_reward_gap: float = Field(0.1, ge=0)
    """A prompt whose best and worst samples score closer than this is a tie: no pair, counted in `ties`."""
    offline_ratio: float = Field(0.5, ge=0)
    """Offline pairs (the `preferences` input) mixed into a round, per online pair (drawn at random)."""
    beta: float = Field(0.1, gt=0)
    """DPO temperature: higher keeps the policy closer to the reference (for "ipo", TRL's regularization tau)."""
    dpo_loss_type: DpoLossType = "sigmoid"
    """The preference loss of the DPO term, by its name in TRL's ``DPOConfig.loss_type``: "sigmoid" is the DPO
    paper's loss; the others allowed (``DpoLossType`` in ``stages/dpo/losses.py``, with their formulas) are the
    TRL variants that need no setting beyond ``beta``. TRL trains on it and ``loss/dpo`` logs it."""
    dpo_weight: float = Field(1.0, ge=0)
    """Weight of the DPO term (``dpo_loss_type``); 0 turns it off."""
    chosen_loss_coef: float = Field(0.2, ge=0)
    """alpha: weight of the NLL of the chosen response (TRL's "sft" loss type), so DPO cannot win by lowering
    both responses' likelihood; 0 turns it off."""
    sft_replay_coef: float = Field(0.1, ge=0)
    """gamma: weight of the SFT loss on a random batch of the `sft` dataset each step (keeps language ability);
    0 turns it off (no replay forward at all)."""
    replay_batch_size: int = Field(2, ge=1)
    """SFT conversations per step for the replay term."""
    learning_rate: float = Field(5e-6, gt=0)
    """AdamW learning rate (MoE parameter groups from `moe`: routed experts get a scaled LR)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule inside a round (each round starts a new optimizer)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    optim: str = "adamw_torch"
    """Optimizer, by its transformers name (`TrainingArguments.optim`), with the MoE parameter groups. "adafactor"
    keeps factored second moments and no first moment, so its state is a small fraction of AdamW's two full
    copies of the weights: that is what lets the policy, its reference and the engine share a small CPU
    machine."""
    epochs_per_round: float = Field(1.0, gt=0)
    """Passes over the round's pairs."""
    batch_size: int = Field(4, ge=1)
    """Pairs per micro-batch."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    max_length: int = Field(512, ge=32)
    """Longest prompt + response in tokens for training (longer sequences are truncated)."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """EMA of the policy weights, updated after every optimizer step: ema = d * ema + (1 - d) * weights. When
    set, the EMA is what the engines serve (sampling, held-out evaluation) and what `dpo_model` holds; the raw
    weights keep training. None: no EMA."""
    stdlib_prompts: int = Field(0, ge=0)
    """Prompts added to `evolved`'s: questions about the last N public functions of
    `reward.stdlib_pairs.stdlib_docs()` ("What does the Python function `json.dumps` do?"; the reward stage's
    `stdlib_pairs` use the first ones, so the reward model never saw these). A demo-sized evolve stage yields
    few prompts, and a reward model trained mostly on docstring pairs judges these best. Held-out figures are
    also reported per prompt source (`eval_reward_gain_evolved`, `eval_reward_gain_stdlib`)."""
    thinking: DPOThinking | None = None
    """Fast and slow thinking: each prompt (training and held-out) is sampled in one mode, through the switch the
    SFT policy's chat template takes; pairs never mix modes. None: prompts as they are (the default)."""
    eval_prompts: int = Field(8, ge=0)
    """Held-out prompts (never trained on) for the per-round reward and win rate against the SFT policy."""
    eval_samples: int = Field(2, ge=1)
    """Samples per held-out prompt (the same request seeds for the SFT policy and every round)."""
    judge_role: OptionalModelRole = None
    """Model role of a second judge of the held-out samples, one that did not train the policy: the critique
    model grades each sample on the filter's rubric (``stages/dpo/judge.py``), reported beside the reward model's
    figures (``eval_judge_gain``, ...). None: no second judge."""
    judge: CritiqueConfig = Field(default_factory=lambda: CritiqueConfig(on_unparseable="drop", max_retries=1))
    """How the judge grades (prompt file, few-shot, retries); an unparseable critique leaves the sample ungraded
    (the judge's figures count only pairs graded on both sides)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Dtype of the policy and the reference for training. auto: float32 on CPU (CPUs without bf16 units emulate
    it, slowly), bfloat16 on GPU. The EMA is always kept in float32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more compute): on for long sequences on GPU."""
    lora: LoraSettings | None = None
    """Train LoRA adapters (the SFT stage's settings) instead of every weight; the reference is then the policy
    with its adapters disabled (no second copy of the model). The engines receive the merged weights."""
    kl_samples: int | None = Field(None, ge=1)
    """Samples per round whose tokens the reference scores for the KL estimate (a seeded subsample); None: all."""
    sleep_engines_while_training: bool = False
    """Put the policy's engines in vLLM's sleep mode (level 1: weights to host memory, KV cache dropped) while a
    round trains, and wake them for the sync: the trainer gets their GPU memory when both share GPUs (GPU engines
    started with ``engine_kwargs: {enable_sleep_mode: true}``; vLLM's CPU build has no sleep mode)."""
    distributed: DpoDistributedSettings = Field(default_factory=DpoDistributedSettings)
    """Where the training of a round runs (driver process, or a Ray Train job with FSDP2)."""
    moe: MoETrainingConfig = Field(
        default_factory=lambda: MoETrainingConfig(attention_dropout=0.0, hidden_dropout=0.0))
    """MoE settings (router aux-loss coefficient, routed-expert LR scale, expert-load logging). Dropout is off
    by default: DPO compares the policy with a reference and dropout would bias the log-ratios."""
    reward: RewardPoolConfig = Field(default_factory=RewardPoolConfig)
    """Ray actors that score samples with the `reward_model` input."""

    def train_dtype(self, device_type: str):
        """The torch dtype of the policy and the reference on a ``device_type`` device (``dtype``'s auto rule)."""
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device_type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    @model_validator(mode="after")
    def _some_preference_loss(self) -> OnlineDPOConfig:
        if self.dpo_weight == 0 and self.chosen_loss_coef == 0:
            raise ValueError("dpo_weight and chosen_loss_coef are both 0, so the preference pairs would not be "
                             "trained on; fix: set at least one above 0")
        return self

    @model_validator(mode="after")
    def _optimizer_fits_the_strategy(self) -> OnlineDPOConfig:
        d = self.distributed
        if d.backend == "ray" and d.strategy == "fsdp2" and self.optim.startswith("adafactor"):
            raise ValueError(f"dpo.optim={self.optim} with dpo.distributed.strategy=fsdp2: transformers' Adafactor "
                             "keeps plain tensors that it adds to FSDP2's DTensor parameters, and the first step "
                             "fails; fix: optim: adamw_torch, or distributed.strategy: none (or backend: local)")
        return self
