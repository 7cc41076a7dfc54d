"""The rounds' training in the driver process (``distributed.backend: local``): TRL's DPOTrainer per round on
the policy, the frozen reference beside it, the EMA in host memory, plain model folders as round checkpoints.

``LocalRoundTrainer`` has the round-trainer methods ``stages.dpo.loop`` calls (``train``, ``ref_logprobs``,
``sync``, ``checkpoint``, ``export``, ``close``), like ``cluster.job.ClusterRoundTrainer``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from stages.dpo import state
from stages.dpo.config import OnlineDPOConfig
from stages.dpo.ema import init_ema, swapped_weights
from stages.dpo.trainer import tokenize_replay, train_round


class LocalRoundTrainer:
    """Policy, reference, EMA and replay rows in this process; resumes from the latest finished round's folder."""

    def __init__(self, sft_path: str, work: Path, done: int, sft_rows: Sequence[dict], cfg: OnlineDPOConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if cfg.lora is not None:
            raise ValueError("dpo.lora trains on the Ray Train job; fix: set dpo.distributed.backend: ray (one CPU "
                             "worker is fine) or remove dpo.lora")
        self.cfg, self.work = cfg, work
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = cfg.train_dtype(device)
        self.tokenizer = AutoTokenizer.from_pretrained(sft_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # On the device TRL trains on: the reference's log-probs (``ref_logprobs``) run outside the trainer.
        self.policy = AutoModelForCausalLM.from_pretrained(state.start_policy(work, sft_path, done), dtype=dtype,
                                                           device_map=device)
        self.ref_model = AutoModelForCausalLM.from_pretrained(sft_path, dtype=dtype, device_map=device).eval()
        self.ref_model.requires_grad_(False)
        if cfg.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ema = None
        if cfg.ema_decay:
            saved = state.saved_ema(work, done)
            self.ema = init_ema(self.policy) if saved is None else saved
        self.replay = tokenize_replay(self.tokenizer, sft_rows, cfg.max_length) if cfg.sft_replay_coef > 0 else []
        if cfg.sft_replay_coef > 0 and not self.replay:
            raise ValueError("dpo.sft_replay_coef > 0 but the `sft` dataset has no usable conversation; fix: set "
                             "dpo.sft_replay_coef: 0 or check the filter stage's output")

    def train(self, round_index: int, pairs: Sequence[dict], seed: int) -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="dpo-trainer-", dir=self.work) as scratch:
            return train_round(self.policy, self.ref_model, self.tokenizer, pairs, self.replay, self.cfg, seed,
                               scratch, self.ema, tracking_name=f"dpo/round_{round_index:03d}")

    def ref_logprobs(self, items: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        from stages.dpo.rollout import sequence_logprobs

        return sequence_logprobs(self.ref_model, items)

    def sync(self, pool) -> dict:
        with swapped_weights(self.policy, self.ema):
            return pool.sync_weights(self.policy)

    def checkpoint(self, rdir: Path) -> None:
        state.save_checkpoint(rdir, self.policy, self.tokenizer, self.ema)

    def export(self, out_dir: Path) -> None:
        """The served weights (the EMA when kept) as a plain transformers folder."""
        with swapped_weights(self.policy, self.ema):
            self.policy.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)

    def close(self) -> None:
        pass
