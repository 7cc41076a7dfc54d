"""Batched reward scoring: a scalar-head reward model on Ray actors.

``RewardScorer`` is the plain in-process scorer (one model, batches sorted by length); ``RewardPool``
holds one scorer per Ray actor and splits a call into chunks over them, results in input order.
A conversation is scored the way TRL's RewardTrainer trained on it: the chat template applied to the
whole conversation (prompt + assistant reply), the head read at the last non-pad token.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

Conversation = list[dict[str, str]]


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


def conversation(prompt: Sequence[dict[str, str]], completion: str) -> Conversation:
    """The conversation a reward model scores: prompt messages plus the assistant's reply."""
    return [dict(m) for m in prompt] + [{"role": "assistant", "content": completion}]


class RewardScorer:
    """A sequence-classification reward model (num_labels=1) in this process."""

    def __init__(self, model_path: str | os.PathLike, batch_size: int = 16, max_length: int = 1024,
                 num_threads: int | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from pipeline.models.catalog import ModelError, resolve_model

        path = resolve_model(model_path)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
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
            width = max(len(ids[i]) for i in idx)
            batch = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                batch[row, :len(ids[i])] = torch.tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=batch, attention_mask=mask).logits[:, 0]
            for row, i in enumerate(idx):
                out[i] = float(logits[row])
        return out


class _ScorerActor:
    """Wrapped with ray.remote by RewardPool."""

    def __init__(self, model_path: str, batch_size: int, max_length: int, num_threads: int):
        from pipeline.executor import log_worker_output

        log_worker_output("reward-scorer")
        self.scorer = RewardScorer(model_path, batch_size=batch_size, max_length=max_length, num_threads=num_threads)

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
        threads = cfg.num_threads or max(1, int(cfg.num_cpus_per_worker))
        actor_cls = ray.remote(_ScorerActor).options(
            num_cpus=cfg.num_cpus_per_worker,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
                                      **worker_log_env()}})
        self.actors = [actor_cls.remote(self.model_path, cfg.batch_size, cfg.max_length, threads)
                       for _ in range(cfg.num_workers)]
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
