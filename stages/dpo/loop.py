"""The online rounds: load the policy and its reference, then per round sample and pair (``rollout``), train
(``trainer``), sync the new weights into the engines, evaluate on held-out prompts (``evaluation``) and
checkpoint (``state``); a rerun resumes after the latest finished round."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.dpo import metrics as M
from stages.dpo import rollout, state
from stages.dpo.config import OnlineDPOConfig
from stages.dpo.ema import swapped_weights
from stages.dpo.evaluation import held_out_metrics
from stages.dpo.prompts import round_prompts

log = logging.getLogger(__name__)

Judge = Callable[[Sequence[dict], Sequence], list]
"""``judge(prompts, results) -> grades``: a second judge of the held-out samples (``stages.dpo.judge``)."""


@dataclass
class OnlineDPOResult:
    policy: Any
    """The trained policy (raw weights) of an in-process run; None when the rounds trained on a Ray Train job."""
    ema: dict | None
    """EMA weights (name -> tensor) of an in-process run when ``ema_decay`` is set."""
    rounds: list[dict]
    """Per-round metrics, round 1 first (resumed rounds included, read back from their metrics.json)."""
    pairs: list[dict]
    """Every round's online pairs."""
    baseline: dict
    """Held-out samples of the SFT policy: rewards, tokens, finish reasons, the judge's grades."""
    timings: dict = field(default_factory=dict)
    """Seconds spent outside the rounds, per ``metrics.SETUP_PHASES`` phase."""
    restarts: int = 0
    """Times the Ray Train job was started again after a worker died."""


def make_round_trainer(sft_path: str, work: Path, done: int, sft_rows: Sequence[dict], cfg: OnlineDPOConfig,
                       seed: int, test_kill: tuple[int, str, int] | None = None):
    """The round trainer of ``cfg.distributed.backend``: ``local.LocalRoundTrainer`` (this process) or
    ``cluster.job.ClusterRoundTrainer`` (a Ray Train job), resuming after round ``done``."""
    if cfg.distributed.backend == "local":
        from stages.dpo.local import LocalRoundTrainer

        return LocalRoundTrainer(sft_path, work, done, sft_rows, cfg)
    from stages.dpo.cluster.job import CHECKPOINT, ClusterRoundTrainer

    if cfg.sft_replay_coef > 0 and not sft_rows:
        raise ValueError("dpo.sft_replay_coef > 0 but the `sft` dataset is empty; fix: set dpo.sft_replay_coef: 0 "
                         "or check the filter stage's output")

    def latest() -> Path | None:
        r = state.finished_rounds(work)
        return state.round_dir(work, r) / CHECKPOINT if r else None

    return ClusterRoundTrainer(cfg, sft_path, sft_rows, work, seed, latest, test_kill=test_kill)


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


def _round_pairs(r: int, pool, scorer, trainer, prompts: Sequence[dict], cfg: OnlineDPOConfig, seed: int,
                 rdir: Path, clock: M.PhaseClock) -> tuple[list[dict], dict]:
    """The round's pairs and sampling figures: those saved before an interruption, else a fresh rollout."""
    saved = state.saved_pairs(rdir)
    if saved is not None:
        log.info("dpo round %d: reusing its %d pairs from before the interruption", r, len(saved[0]))
        return saved
    pairs, stats = rollout.rollout_round(pool, scorer, trainer.ref_logprobs, prompts, cfg, seed, r, clock)
    state.save_pairs(rdir, pairs, stats)
    return pairs, stats


def _offline_sample(offline_pairs: Sequence[dict], n_online: int, cfg: OnlineDPOConfig, seed: int, r: int) -> list:
    k = min(len(offline_pairs), int(round(cfg.offline_ratio * n_online)))
    return random.Random(f"{seed}:{r}").sample(list(offline_pairs), k) if k else []


@contextlib.contextmanager
def engines_asleep(pool, enabled: bool) -> Iterator[None]:
    """The pool's engines asleep (``WorkerPool.sleep``) for the block when ``enabled``, awake again after it,
    also when it raised (the rerun of a round samples first)."""
    if not enabled:
        yield
        return
    pool.sleep()
    try:
        yield
    finally:
        pool.wake_up()


def _run_round(r: int, pool, scorer, trainer, train_prompts: Sequence[dict], eval_prompts: Sequence[dict],
               offline_pairs: Sequence[dict], baseline: dict, cfg: OnlineDPOConfig, work: Path,
               seed: int, judge: Judge | None) -> tuple[dict, list[dict]]:
    """One round, from its prompts to its metrics (written last: they mark it finished). Returns
    (metrics, online pairs)."""
    clock = M.PhaseClock()
    t_round = time.perf_counter()
    rdir = state.round_dir(work, r)
    rdir.mkdir(exist_ok=True)
    prompts = round_prompts(train_prompts, r, cfg.prompts_per_round)
    pairs, stats = _round_pairs(r, pool, scorer, trainer, prompts, cfg, seed, rdir, clock)
    offline = _offline_sample(offline_pairs, len(pairs), cfg, seed, r)
    train_pairs = pairs + offline
    # Seeded per round (not one generator across rounds), so a resumed round trains exactly as it would have.
    random.Random(f"{seed}:{r}:order").shuffle(train_pairs)
    train_metrics: dict[str, float] = {}
    if train_pairs:
        with clock("train"), engines_asleep(pool, cfg.sleep_engines_while_training):
            train_metrics = trainer.train(r, train_pairs, seed * 1000 + r)
    else:
        log.warning("dpo round %d: every prompt was a tie and there are no offline pairs; no training", r)
    with clock("sync"):
        sync = trainer.sync(pool)
    eval_metrics: dict[str, float] = {}
    if eval_prompts:
        samples = rollout.held_out_samples(pool, scorer, eval_prompts, cfg, seed, clock,
                                           judge=judge if baseline.get("grades") is not None else None)
        eval_metrics = held_out_metrics(eval_prompts, samples, baseline, cfg.eval_samples)
    with clock("checkpoint"):
        trainer.checkpoint(rdir)
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
               on_round: Callable[[int, dict], None] | None = None, judge: Judge | None = None,
               export_dir: str | os.PathLike | None = None,
               test_kill: tuple[int, str, int] | None = None) -> OnlineDPOResult:
    """Run (or resume) the online rounds. ``pool`` serves the policy (its weights are replaced: first by the
    starting policy, then after every round); ``scorer.score(conversations)`` gives rewards; ``judge(prompts,
    results)``, when given, grades the held-out samples a second time (``stages.dpo.judge``).

    ``train_prompts`` come from ``split_prompts``; ``work_dir`` keeps the per-round state (``state``). With
    ``export_dir`` the final policy (the EMA when kept) is written there as a plain model folder. The rounds
    train where ``cfg.distributed`` says (``make_round_trainer``); a worker of a Ray Train job that dies makes
    the job restart from the last finished round and the round run again (``test_kill``: tests only, a
    (rank, request, n): a worker of the first job kills itself at its n-th such request).
    """
    from pipeline.models.catalog import resolve_model
    from stages.dpo.cluster.job import TrainerRestarted

    work = Path(work_dir)
    sft_path = str(resolve_model(sft_path))
    if cfg.sleep_engines_while_training and (problem := pool.sleep_mode_problem()):
        raise ValueError(f"dpo.sleep_engines_while_training: {problem}")
    ids = [p["id"] for p in list(train_prompts) + list(eval_prompts)]
    state.open_work_folder(work, state.work_key(cfg.model_dump(mode="json"), sft_path, seed, ids))

    setup = M.PhaseClock()
    done = state.finished_rounds(work)
    with setup("load"):
        trainer = make_round_trainer(sft_path, work, done, sft_rows, cfg, seed, test_kill)
    try:
        if done:
            log.info("dpo: resuming after round %d", done)
        with setup("start_sync"):
            trainer.sync(pool)
        with setup("baseline"):
            baseline = _baseline(pool, scorer, eval_prompts, cfg, seed, work, done, judge)

        rounds, pairs_all = state.finished_round_records(work, done)
        r = done + 1
        while r <= cfg.rounds:
            try:
                metrics, pairs = _run_round(r, pool, scorer, trainer, train_prompts, eval_prompts, offline_pairs,
                                            baseline, cfg, work, seed, judge)
            except TrainerRestarted as exc:
                log.warning("dpo round %d: %s; running the round again from its saved pairs", r, exc)
                trainer.sync(pool)  # the engines may hold a half-sent update
                continue
            rounds.append(metrics)
            pairs_all.extend(pairs)
            if log_metrics is not None:
                log_metrics(metrics, r)
            if on_round is not None:
                on_round(r, metrics)
            r += 1
        if export_dir is not None:
            trainer.export(Path(export_dir))
    finally:
        trainer.close()
    return OnlineDPOResult(policy=getattr(trainer, "policy", None), ema=getattr(trainer, "ema", None),
                           rounds=rounds, pairs=pairs_all, baseline=baseline, timings=setup.seconds,
                           restarts=getattr(trainer, "restarts", 0))


def save_policy(result: OnlineDPOResult, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the published policy of an in-process run (the EMA weights when kept) as a plain transformers
    folder vLLM serves (a Ray Train run writes it with ``online_dpo(export_dir=...)``)."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    with swapped_weights(result.policy, result.ema):
        result.policy.save_pretrained(out)
    tok.save_pretrained(out)
    return out
