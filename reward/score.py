"""Batched reward scoring: a scalar-head reward model on Ray actors.

``RewardScorer`` is the plain in-process scorer (one model on one device, batches sorted by length);
``RewardPool`` holds one scorer per Ray actor (on a CPU, or on a GPU or a share of one) and splits a call into
chunks over them, results in input order.
A conversation is scored the way TRL's RewardTrainer trained on it: the chat template applied to the
whole conversation (prompt + assistant reply), the head read at the last non-pad token.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Conversation = list[dict[str, str]]
ScoringDtype = Literal["auto", "float32", "bfloat16"]


class RewardPoolConfig(BaseModel):
    """Ray actors that score conversations with a reward model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    num_workers: int = Field(1, ge=1)
    """Scoring actors (each loads its own copy of the reward model)."""
    num_cpus_per_worker: float = Field(1.0, gt=0)
    """Ray CPUs each actor reserves; torch in the actor uses that many threads (at least 1) unless
    `num_threads` says otherwise."""
    num_threads: int | None = Field(None, ge=1)
    """Torch threads per actor; None: `num_cpus_per_worker`. More threads than reserved CPUs pays off where
    scoring never overlaps other work, as in the online DPO loop (sample, then score, then train)."""
    batch_size: int = Field(16, ge=1)
    """Conversations per forward pass (sorted by length first, so little padding)."""
    max_length: int = Field(1024, ge=16)
    """Longest tokenized conversation scored; longer ones keep their last tokens (the head reads the end)."""
    chunk_size: int = Field(64, ge=1)
    """Largest number of conversations sent to one actor per call."""
    num_gpus_per_worker: float = Field(0, ge=0)
    """GPUs each actor requests from Ray; above 0 the actor loads the model on its GPU. A fraction shares a GPU
    between actors (0.5: two actors per GPU). 0: the actors score on CPU."""
    dtype: ScoringDtype = "auto"
    """Dtype the model is loaded and run in. auto: bfloat16 on a GPU, float32 on CPU (CPUs without bf16 units
    emulate it, slowly)."""


def torch_dtype(dtype: ScoringDtype, device: Any):
    """The torch dtype of a model on ``device``: ``dtype`` itself, or for auto bfloat16 on CUDA and float32 elsewhere."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)


def actor_options(cfg: RewardPoolConfig, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Ray options of a scoring actor: its CPUs, its GPU request, and the environment (torch threads, ``env``)."""
    threads = scorer_threads(cfg)
    return {"num_cpus": cfg.num_cpus_per_worker, "num_gpus": cfg.num_gpus_per_worker,
            "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
                                         **(env or {})}}}


def scorer_threads(cfg: RewardPoolConfig) -> int:
    """Torch threads of a scoring actor: ``num_threads``, or its reserved CPUs (at least 1)."""
    return cfg.num_threads or max(1, int(cfg.num_cpus_per_worker))


def scorer_device(cfg: RewardPoolConfig) -> str:
    """Where an actor's model lives: its GPU when it requests one, else the CPU."""
    return "cuda" if cfg.num_gpus_per_worker > 0 else "cpu"


def batch_tensors(rows: Sequence[Sequence[int]], pad_id: int, device: Any):
    """``input_ids`` and ``attention_mask`` of token rows, right-padded to the longest, created on ``device``."""
    import torch

    width = max(len(r) for r in rows)
    ids = [list(r) + [pad_id] * (width - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(mask, dtype=torch.long, device=device))


def conversation(prompt: Sequence[dict[str, str]], completion: str) -> Conversation:
    """The conversation a reward model scores: prompt messages plus the assistant's reply."""
    return [dict(m) for m in prompt] + [{"role": "assistant", "content": completion}]


class RewardScorer:
    """A sequence-classification reward model (num_labels=1) in this process, on ``device`` (default the CPU)
    in ``dtype`` (``torch_dtype``: auto is bfloat16 on a GPU, float32 on CPU)."""

    def __init__(self, model_path: str | os.PathLike, batch_size: int = 16, max_length: int = 1024,
                 num_threads: int | None = None, device: str = "cpu", dtype: ScoringDtype = "auto"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from pipeline.models.catalog import ModelError, resolve_model

        path = resolve_model(model_path)
        if num_threads:
            torch.set_num_threads(num_threads)
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"reward scorer: device {device!r} asked for, but torch sees no CUDA device "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); fix: set "
                               "num_gpus_per_worker to 0 (stages.dpo.reward, stages.reward.scoring) on a cluster without GPUs")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype(dtype, device), device_map={"": device}).eval()
        if self.model.config.num_labels != 1:
            raise ModelError(
                f"{path}: a reward model needs one output (num_labels=1), this one has "
                f"{self.model.config.num_labels}; fix: train it with `posttrain run --stage reward` or give a "
                "sequence-classification folder with num_labels=1"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_length = max_length
        self.path = Path(path)

    def token_ids(self, conv: Conversation) -> list[int]:
        out = self.tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)
        ids = list(out["input_ids"])
        return ids[-self.max_length:]

    def score(self, convs: Sequence[Conversation]) -> list[float]:
        """One scalar reward per conversation, in input order."""
        import torch

        ids = [self.token_ids(c) for c in convs]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [0.0] * len(ids)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch, mask = batch_tensors([ids[i] for i in idx], pad, self.model.device)
            with torch.inference_mode():
                logits = self.model(input_ids=batch, attention_mask=mask).logits[:, 0]
            for i, value in zip(idx, logits.float().cpu().tolist(), strict=True):
                out[i] = value
        return out


class _ScorerActor:
    """Wrapped with ray.remote by RewardPool."""

    def __init__(self, model_path: str, cfg: RewardPoolConfig):
        from pipeline.executor import log_worker_output

        log_worker_output("reward-scorer")
        self.scorer = RewardScorer(model_path, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                   num_threads=scorer_threads(cfg), device=scorer_device(cfg), dtype=cfg.dtype)

    def score(self, convs: list[Conversation]) -> list[float]:
        return self.scorer.score(convs)

    def pid(self) -> int:
        return os.getpid()


class RewardPool:
    """Reward scoring on Ray actors. Use as a context manager or call shutdown()."""

    def __init__(self, model_path: str | os.PathLike, config: RewardPoolConfig | None = None):
        import ray

        from pipeline.executor import ensure_ray, worker_log_env
        from pipeline.models.catalog import ModelError, resolve_model

        self.config = cfg = config or RewardPoolConfig()
        self.model_path = str(resolve_model(model_path))
        ensure_ray()
        actor_cls = ray.remote(_ScorerActor).options(**actor_options(cfg, worker_log_env()))
        self.actors = [actor_cls.remote(self.model_path, cfg) for _ in range(cfg.num_workers)]
        try:
            ray.get([a.pid.remote() for a in self.actors])
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc
            self.shutdown()
            if isinstance(cause, ModelError):
                raise ModelError(str(cause)) from None
            raise RuntimeError(f"reward scoring actor for {self.model_path} failed to start: {cause}") from None

    def score(self, convs: Sequence[Conversation]) -> list[float]:
        """Scores in input order; chunks go to the actors round-robin and run in parallel."""
        import ray

        if not convs:
            return []
        size = max(1, min(self.config.chunk_size, math.ceil(len(convs) / len(self.actors))))
        chunks = [list(convs[i:i + size]) for i in range(0, len(convs), size)]
        refs = [self.actors[k % len(self.actors)].score.remote(chunk) for k, chunk in enumerate(chunks)]
        try:
            parts = ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            raise RuntimeError(f"reward scoring failed in a Ray actor: {exc.cause if hasattr(exc, 'cause') else exc}") \
                from None
        return [s for part in parts for s in part]

    def score_completions(self, prompts: Sequence[Sequence[dict[str, str]]], completions: Sequence[str]) -> list[float]:
        return self.score([conversation(p, c) for p, c in zip(prompts, completions, strict=True)])

    def shutdown(self) -> None:
        import ray

        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
