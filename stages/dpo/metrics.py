"""The metric keys of the dpo stage, declared once: the loop writes them, the report reads them.

A round's metrics (``work/rounds/round_NNN/metrics.json``, one ``metrics.jsonl`` row with step = round, and an
entry of the manifest's ``rounds``) hold the sampling figures, the trainer's figures (the names TRL and our
trainer log, with ``/`` made ``_``), the held-out figures against the SFT policy and the seconds per phase.
The manifest adds the ``final_*`` keys of the last round. Key strings are those of earlier run directories, so
those are still reported. This module imports nothing heavy: the report imports it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping

# -- sampling figures of a round (rollout) -----------------------------------------------------------------
ROUND = "round"
PROMPTS = "prompts"
SAMPLES = "samples"
TIES = "ties"
SAMPLE_TOKENS = "sample_tokens"
REWARD_MEAN = "reward_mean"
REWARD_STD = "reward_std"
REWARD_MARGIN = "reward_margin"
"""Mean chosen - rejected reward of the round's pairs (the reward model's scores, not DPO's implicit reward)."""
KL = "kl"
"""KL(policy || reference) per sample, estimated on the policy's samples."""
KL_PER_TOKEN = "kl_per_token"
VERIFIED_SAMPLES = "verified_samples"
"""Samples of prompts with verifiable constraints (``critique.constraints``) in the round."""
VERIFIED_PASS_RATE = "verified_pass_rate"
"""Share of those samples that follow every constraint of their prompt (NaN when the round has none)."""
PAIRS_VERIFIED = "pairs_verified"
"""Pairs whose chosen sample follows its prompt's constraints and whose rejected sample does not."""
PAIRS_ONLINE = "pairs_online"
PAIRS_OFFLINE = "pairs_offline"
SYNC_BYTES = "sync_bytes"

# -- what the trainer logs per step (names in TRL's log history); a round keeps their means -------------------
LOSS_TOTAL = "loss/total"
LOSS_DPO = "loss/dpo"
"""The configured preference loss (``OnlineDPOConfig.dpo_loss_type``), unweighted."""
LOSS_CHOSEN_NLL = "loss/chosen_nll"
LOSS_ROUTER_AUX = "loss/router_aux"
LOSS_REPLAY_NLL = "loss/replay_nll"
LOSS_REPLAY_ROUTER_AUX = "loss/replay_router_aux"
TRL_ACCURACIES = "rewards/accuracies"
"""TRL: share of pairs whose implicit reward beta * log(pi/pi_ref) is higher for the chosen response."""
TRL_MARGINS = "rewards/margins"
TRL_CHOSEN = "rewards/chosen"
TRL_REJECTED = "rewards/rejected"
EXPERT_MAX_LOAD = "expert_load/max_load_ratio"
"""Written by ``pipeline.training.moe_trainer.ExpertLoadCallback``."""
GRAD_NORM = "grad_norm"
TRAIN_LOG_KEYS = (LOSS_TOTAL, LOSS_DPO, LOSS_CHOSEN_NLL, LOSS_REPLAY_NLL, LOSS_ROUTER_AUX, LOSS_REPLAY_ROUTER_AUX,
                  TRL_ACCURACIES, TRL_MARGINS, TRL_CHOSEN, TRL_REJECTED, EXPERT_MAX_LOAD, GRAD_NORM)
"""The logged figures a round reports (as the mean over its steps), in this order."""
TRAIN_STEPS = "train_steps"


def round_key(log_key: str) -> str:
    """The key under which a round's metrics hold a logged figure: ``loss/dpo`` -> ``loss_dpo``."""
    return log_key.replace("/", "_")


# -- held-out figures against the SFT policy (evaluation) ----------------------------------------------------
EVAL_REWARD_MEAN = "eval_reward_mean"
EVAL_REWARD_SFT_MEAN = "eval_reward_sft_mean"
EVAL_REWARD_GAIN = "eval_reward_gain"
EVAL_REWARD_GAIN_SE = "eval_reward_gain_se"
EVAL_WIN_RATE = "eval_win_rate"
EVAL_PROMPTS = "eval_prompts"
"""Only per source (``eval_prompts_<source>``): how many held-out prompts came from that source."""
# length and truncation of both sides (stages/dpo/evaluation.py)
EVAL_TOKENS_MEAN = "eval_tokens_mean"
EVAL_SFT_TOKENS_MEAN = "eval_sft_tokens_mean"
EVAL_TRUNCATED = "eval_truncated"
"""Share of the round's held-out samples cut at ``max_tokens``."""
EVAL_SFT_TRUNCATED = "eval_sft_truncated"
EVAL_UNTRUNCATED_PAIRS = "eval_untruncated_pairs"
EVAL_REWARD_GAIN_UNTRUNCATED = "eval_reward_gain_untruncated"
"""The reward gain over the pairs where neither sample was cut at ``max_tokens``."""
EVAL_REWARD_GAIN_UNTRUNCATED_SE = "eval_reward_gain_untruncated_se"
EVAL_REWARD_GAIN_LENGTH_ADJUSTED = "eval_reward_gain_length_adjusted"
"""The gain at equal length: intercept of the paired reward difference regressed on the token difference."""
EVAL_REWARD_PER_TOKEN = "eval_reward_per_token"
"""Slope of that regression: reward per extra token of the policy's sample over the SFT policy's."""
# the second judge (the critic's tiers), which did not train the policy
EVAL_JUDGE_PAIRS = "eval_judge_pairs"
EVAL_JUDGE_MEAN = "eval_judge_mean"
EVAL_JUDGE_SFT_MEAN = "eval_judge_sft_mean"
EVAL_JUDGE_GAIN = "eval_judge_gain"
EVAL_JUDGE_GAIN_SE = "eval_judge_gain_se"
EVAL_JUDGE_WIN_RATE = "eval_judge_win_rate"
HELD_OUT_TABLE: dict[str, str] = {
    EVAL_REWARD_GAIN: "reward gain", EVAL_REWARD_GAIN_SE: "± se", EVAL_WIN_RATE: "win rate",
    EVAL_REWARD_GAIN_UNTRUNCATED: "gain, untruncated pairs", EVAL_UNTRUNCATED_PAIRS: "untruncated pairs",
    EVAL_REWARD_GAIN_LENGTH_ADJUSTED: "gain at equal length", EVAL_REWARD_PER_TOKEN: "reward per token",
    EVAL_TOKENS_MEAN: "tokens", EVAL_SFT_TOKENS_MEAN: "tokens (SFT)", EVAL_TRUNCATED: "truncated",
    EVAL_SFT_TRUNCATED: "truncated (SFT)", EVAL_JUDGE_GAIN: "judge gain", EVAL_JUDGE_GAIN_SE: "± se (judge)",
    EVAL_JUDGE_WIN_RATE: "judge win rate", EVAL_JUDGE_PAIRS: "judged pairs",
}
"""Key -> column title of the report's per-round table of held-out figures against the SFT policy."""


def per_source(key: str, source: str) -> str:
    """A held-out figure restricted to the prompts of one source: ``eval_win_rate`` -> ``eval_win_rate_stdlib``."""
    return f"{key}_{source}"


# -- seconds per phase ---------------------------------------------------------------------------------------
ROUND_PHASES = ("sample", "score", "kl", "train", "sync", "eval_sample", "eval_score", "eval_judge", "checkpoint")
"""Phases of a round; a resumed round that reuses its saved pairs has no sample, score or kl time."""
SETUP_PHASES = ("load", "start_sync", "baseline")
"""Phases before the first round (``OnlineDPOResult.timings``, keyed by phase name)."""


def time_key(phase: str) -> str:
    return f"time_{phase}"


TIME_TOTAL = time_key("total")


class PhaseClock:
    """Accumulates wall time per phase: ``with clock("train"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        """The phases' seconds under their round keys (``time_<phase>``)."""
        return {time_key(k): v for k, v in self.seconds.items()}


# -- the manifest ---------------------------------------------------------------------------------------------
PROMPTS_EXCLUDED = "prompts_excluded"
"""Prompts dropped because the reward model trained on their source item."""
PROMPTS_TRAIN = "prompts_train"
PROMPTS_HELD_OUT = "prompts_held_out"
ROUNDS = "rounds"
ONLINE_PAIRS = "online_pairs"
EMA = "ema"
TRAINER_RESTARTS = "trainer_restarts"
"""Times the Ray Train job of the rounds started again after a worker died (0 for the in-process trainer)."""


def final_key(key: str) -> str:
    return f"final_{key}"


FINAL_FIGURES = (EVAL_WIN_RATE, EVAL_REWARD_GAIN, EVAL_REWARD_GAIN_SE, KL)
FINAL_IF_MEASURED = (EVAL_REWARD_GAIN_UNTRUNCATED, EVAL_REWARD_GAIN_LENGTH_ADJUSTED, EVAL_TOKENS_MEAN,
                     EVAL_SFT_TOKENS_MEAN, EVAL_TRUNCATED, EVAL_SFT_TRUNCATED, EVAL_JUDGE_GAIN, EVAL_JUDGE_GAIN_SE,
                     EVAL_JUDGE_WIN_RATE)
"""Also copied to the manifest's final_* keys when the last round measured them (a run without a judge, or
resumed from a baseline written before lengths were recorded, has no such figures)."""
FINAL_KEYS: tuple[str, ...] = tuple(final_key(k) for k in FINAL_FIGURES)
"""The final_* keys the stage puts in its manifest metrics: the last round's figures."""
FINAL_SOURCE_FIGURES = (EVAL_REWARD_GAIN, EVAL_REWARD_GAIN_SE, EVAL_WIN_RATE)
"""Per-source figures also copied to the manifest (``final_eval_reward_gain_stdlib``, ...) when the held-out
prompts come from several sources."""


def final_metrics(last: Mapping[str, object]) -> dict[str, object]:
    """The final_* keys from the last round's metrics (None where the round has no such figure)."""
    sources = [k[len(EVAL_PROMPTS) + 1:] for k in last if k.startswith(EVAL_PROMPTS + "_")]
    wanted = {per_source(k, s) for s in sources for k in FINAL_SOURCE_FIGURES}
    out: dict[str, object] = {final_key(k): last.get(k) for k in FINAL_FIGURES}
    out.update({final_key(k): last[k] for k in FINAL_IF_MEASURED if k in last})
    out.update({final_key(k): v for k, v in last.items() if k in wanted})
    return out


ROUND_FIGURES: dict[str, tuple[str, str]] = {
    "reward": (REWARD_MEAN, "mean reward of the policy's samples"),
    "reward_std": (REWARD_STD, "std of the rewards of the policy's samples"),
    "margin": (REWARD_MARGIN, "chosen - rejected reward margin"),
    "dpo_accuracy": (round_key(TRL_ACCURACIES), "DPO accuracy"),
    "kl": (KL, "KL to the reference (estimate)"),
    "win_rate": (EVAL_WIN_RATE, "win rate vs the SFT policy"),
}
"""figure name -> (key in a round's metrics, title): the per-round figures the report plots."""
