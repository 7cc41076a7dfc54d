"""The online rounds: load the policy and its reference, then per round sample and pair (``rollout``), train
(``trainer``), sync the new weights into the engines, evaluate on held-out prompts (``evaluation``) and
checkpoint (``state``); a rerun resumes after the latest finished round."""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.dpo import metrics as M
from stages.dpo import rollout, state
from stages.dpo.config import OnlineDPOConfig
from stages.dpo.ema import init_ema, swapped_weights
from stages.dpo.evaluation import held_out_metrics
from stages.dpo.prompts import round_prompts
from stages.dpo.trainer import tokenize_replay, train_round

log = logging.getLogger(__name__)

Judge = Callable[[Sequence[dict], Sequence], list]
"""``judge(prompts, results) -> grades``: a second judge of the held-out samples (``stages.dpo.judge``)."""


@dataclass
class OnlineDPOResult:
    policy: Any
    """The trained policy (raw weights)."""
    ema: dict | None
    """EMA weights (name -> tensor) when ``ema_decay`` is set."""
    rounds: list[dict]
    """Per-round metrics, round 1 first (resumed rounds included, read back from their metrics.json)."""
    pairs: list[dict]
    """Every round's online pairs."""
    baseline: dict
    """Held-out samples of the SFT policy: rewards, tokens, finish reasons, the judge's grades."""
    timings: dict = field(default_factory=dict)
    """Seconds spent outside the rounds, per ``metrics.SETUP_PHASES`` phase."""


@dataclass
class _Models:
    """What the rounds train and compare with."""

    tokenizer: Any
    policy: Any
    ref_model: Any
    """The SFT policy, frozen: DPO's reference and the KL's."""
    ema: dict | None
    replay: list[dict]
    """Tokenized SFT rows for the replay term."""


def _load_models(sft_path: str, work: Path, done: int, sft_rows: Sequence[dict], cfg: OnlineDPOConfig) -> _Models:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(state.start_policy(work, sft_path, done), dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(sft_path, dtype=torch.float32).eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    ema = None
    if cfg.ema_decay:
        ema = state.saved_ema(work, done)
        ema = init_ema(policy) if ema is None else ema
    replay = tokenize_replay(tokenizer, sft_rows, cfg.max_length) if cfg.sft_replay_coef > 0 else []
    if cfg.sft_replay_coef > 0 and not replay:
        raise ValueError("dpo.sft_replay_coef > 0 but the `sft` dataset has no usable conversation; fix: set "
                         "dpo.sft_replay_coef: 0 or check the filter stage's output")
    return _Models(tokenizer, policy, ref_model, ema, replay)


def _baseline(pool, scorer, eval_prompts: Sequence[dict], cfg: OnlineDPOConfig, seed: int, work: Path,
              done: int, judge: Judge | None) -> dict[str, list]:
    """Held-out samples of the SFT policy (the engines serve it now), drawn once and kept in the work folder."""
    samples = state.read_baseline(work)
    if eval_prompts and samples is None:
        if done:  # cannot happen with an intact work folder: the baseline is written before round 1
            raise RuntimeError(f"{work / 'baseline.json'} is missing though round {done} finished; fix: delete {work}")
        samples = rollout.held_out_samples(pool, scorer, eval_prompts, cfg, seed, judge=judge)
        state.write_baseline(work, samples)
    return samples if samples is not None else {"rewards": []}


def _round_pairs(r: int, pool, scorer, models: _Models, prompts: Sequence[dict], cfg: OnlineDPOConfig, seed: int,
                 rdir: Path, clock: M.PhaseClock) -> tuple[list[dict], dict]:
    """The round's pairs and sampling figures: those saved before an interruption, else a fresh rollout."""
    saved = state.saved_pairs(rdir)
    if saved is not None:
        log.info("dpo round %d: reusing its %d pairs from before the interruption", r, len(saved[0]))
        return saved
    pairs, stats = rollout.rollout_round(pool, scorer, models.ref_model, prompts, cfg, seed, r, clock)
    state.save_pairs(rdir, pairs, stats)
    return pairs, stats


def _offline_sample(offline_pairs: Sequence[dict], n_online: int, cfg: OnlineDPOConfig, seed: int, r: int) -> list:
    k = min(len(offline_pairs), int(round(cfg.offline_ratio * n_online)))
    return random.Random(f"{seed}:{r}").sample(list(offline_pairs), k) if k else []


def _run_round(r: int, pool, scorer, models: _Models, train_prompts: Sequence[dict], eval_prompts: Sequence[dict],
               offline_pairs: Sequence[dict], baseline: dict, cfg: OnlineDPOConfig, work: Path,
               seed: int, judge: Judge | None) -> tuple[dict, list[dict]]:
    """One round, from its prompts to its metrics (written last: they mark it finished). Returns
    (metrics, online pairs)."""
    clock = M.PhaseClock()
    t_round = time.perf_counter()
    rdir = state.round_dir(work, r)
    rdir.mkdir(exist_ok=True)
    prompts = round_prompts(train_prompts, r, cfg.prompts_per_round)
    pairs, stats = _round_pairs(r, pool, scorer, models, prompts, cfg, seed, rdir, clock)
    offline = _offline_sample(offline_pairs, len(pairs), cfg, seed, r)
    train_pairs = pairs + offline
    # Seeded per round (not one generator across rounds), so a resumed round trains exactly as it would have.
    random.Random(f"{seed}:{r}:order").shuffle(train_pairs)
    train_metrics: dict[str, float] = {}
    if train_pairs:
        with clock("train"), tempfile.TemporaryDirectory(prefix="dpo-trainer-", dir=work) as scratch:
            train_metrics = train_round(models.policy, models.ref_model, models.tokenizer, train_pairs, models.replay,
                                        cfg, seed * 1000 + r, scratch, models.ema, tracking_name=f"dpo/round_{r:03d}")
    else:
        log.warning("dpo round %d: every prompt was a tie and there are no offline pairs; no training", r)
    with clock("sync"), swapped_weights(models.policy, models.ema):
        sync = pool.sync_weights(models.policy)
    eval_metrics: dict[str, float] = {}
    if eval_prompts:
        samples = rollout.held_out_samples(pool, scorer, eval_prompts, cfg, seed, clock,
                                           judge=judge if baseline.get("grades") is not None else None)
        eval_metrics = held_out_metrics(eval_prompts, samples, baseline, cfg.eval_samples)
    with clock("checkpoint"):
        state.save_checkpoint(rdir, models.policy, models.tokenizer, models.ema)
    metrics = {M.ROUND: r, **stats, M.PAIRS_ONLINE: len(pairs), M.PAIRS_OFFLINE: len(offline),
               **{M.round_key(k): v for k, v in train_metrics.items()}, **eval_metrics,
               M.SYNC_BYTES: sync.get("bytes", 0), **clock.metrics()}
    metrics[M.TIME_TOTAL] = time.perf_counter() - t_round
    state.finish_round(work, r, metrics)
    log.info("dpo round %d: %d pairs (%d ties), reward %.3f, kl %.3f, held-out win rate %s", r, len(pairs),
             stats[M.TIES], stats[M.REWARD_MEAN], stats.get(M.KL, math.nan),
             f"{eval_metrics[M.EVAL_WIN_RATE]:.2f}" if eval_metrics else "-")
    return metrics, pairs


def online_dpo(sft_path: str | os.PathLike, pool, scorer, train_prompts: Sequence[dict], eval_prompts: Sequence[dict],
               offline_pairs: Sequence[dict], sft_rows: Sequence[dict], cfg: OnlineDPOConfig, work_dir: str | os.PathLike,
               seed: int = 0, log_metrics: Callable[[dict, int], None] | None = None,
               on_round: Callable[[int, dict], None] | None = None, judge: Judge | None = None) -> OnlineDPOResult:
    """Run (or resume) the online rounds. ``pool`` serves the policy (its weights are replaced: first by the
    starting policy, then after every round); ``scorer.score(conversations)`` gives rewards; ``judge(prompts,
    results)``, when given, grades the held-out samples a second time (``stages.dpo.judge``).

    ``train_prompts`` come from ``split_prompts``; ``work_dir`` keeps the per-round state (``state``).
    """
    from pipeline.models.catalog import resolve_model

    work = Path(work_dir)
    sft_path = str(resolve_model(sft_path))
    ids = [p["id"] for p in list(train_prompts) + list(eval_prompts)]
    state.open_work_folder(work, state.work_key(cfg.model_dump(mode="json"), sft_path, seed, ids))

    setup = M.PhaseClock()
    done = state.finished_rounds(work)
    with setup("load"):
        models = _load_models(sft_path, work, done, sft_rows, cfg)
    if done:
        log.info("dpo: resuming after round %d (policy from %s)", done, state.start_policy(work, sft_path, done))
    with setup("start_sync"), swapped_weights(models.policy, models.ema):
        pool.sync_weights(models.policy)
    with setup("baseline"):
        baseline = _baseline(pool, scorer, eval_prompts, cfg, seed, work, done, judge)

    rounds, pairs_all = state.finished_round_records(work, done)
    for r in range(done + 1, cfg.rounds + 1):
        metrics, pairs = _run_round(r, pool, scorer, models, train_prompts, eval_prompts, offline_pairs, baseline,
                                    cfg, work, seed, judge)
        rounds.append(metrics)
        pairs_all.extend(pairs)
        if log_metrics is not None:
            log_metrics(metrics, r)
        if on_round is not None:
            on_round(r, metrics)
    return OnlineDPOResult(policy=models.policy, ema=models.ema, rounds=rounds, pairs=pairs_all, baseline=baseline,
                           timings=setup.seconds)


def save_policy(result: OnlineDPOResult, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the published policy (the EMA weights when kept) as a plain transformers folder vLLM serves."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    with swapped_weights(result.policy, result.ema):
        result.policy.save_pretrained(out)
    tok.save_pretrained(out)
    return out
