"""Stage `dpo`: iterative online DPO with a chosen-response loss and SFT replay (Hunyuan-Large's RLHF).

Rounds r = 1..R. Each round draws a fresh batch of prompts (from `evolved`, never reused unless
``reuse_prompts``); the current policy, served by this stage's vLLM engines, samples n responses per
prompt; the reward model (Ray actors) scores them; best vs worst becomes a pair (a gap under
``min_reward_gap`` is a tie, skipped and counted); the policy trains on the round's pairs mixed with
offline pairs (`preferences`) and the new weights are pushed into the running engines in memory.

The loss of a step is

    dpo_weight * L_dpo(beta) + alpha * NLL(chosen) + router_aux + gamma * (NLL(SFT replay) + router_aux)

where L_dpo is ``dpo_loss_type`` (sigmoid DPO by default). TRL's DPOTrainer computes the first two
(``loss_type=[dpo_loss_type, "sft"]``, ``loss_weights=[dpo_weight, alpha]``) and the router aux loss
(``router_aux_loss_coef``, wired by ``pipeline.training`` as in SFT); the replay term is ours: each step also
runs the policy on a random batch of `sft` conversations. The reference model is the SFT policy. With
``ema_decay`` an exponential moving average of the weights is kept (the report's guard against reward
hacking): it is what the engines serve and what is published, while the raw weights keep training.

Per round (``metrics.jsonl`` with step = round, and the manifest; keys in ``metrics``): reward mean/std of the
samples, chosen-rejected reward margin, ties, DPO accuracy and margin, each loss term, a KL estimate to the
reference from the sampled tokens (sum over a sample of log pi(y_t) - log pi_ref(y_t), pi's logprobs from vLLM,
pi_ref's from a forward of the reference model), and on held-out prompts the mean reward and win rate against
the SFT policy (same prompts, same request seeds; the reward model judges).

Resume: every round leaves ``work/rounds/round_NNN/`` with its pairs (written before training) and, when it
finishes, the policy checkpoint and ``metrics.json`` (``state``). A rerun loads the latest finished round's
policy, syncs it into the engines and goes on with the next round, reusing its pairs if they exist.

Modules: ``config`` (OnlineDPOConfig), ``prompts`` (prompt rows, split, round batches), ``rollout`` (sample,
score, pairs, KL), ``losses`` (the loss types and the logged loss terms), ``trainer`` (the TRL subclass with SFT
replay, the CPU LM head, ``train_round``), ``local`` (the rounds' training in this process, on ``trainer``),
``step`` (one DPO step without a Trainer: TRL's collator and loss, SFT replay) and ``cluster`` (the rounds'
training on a Ray Train job of FSDP2 workers, weights sent to the engines over a collective), ``ema``, ``evaluation`` (held-out figures), ``state`` (the work
folder), ``loop`` (the rounds, resume), ``metrics`` (every key the stage writes); this module wires the stage.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

from pipeline.records import pair_items, source_item
from pipeline.thinking import MODE_FIELD, REASONING_FIELD, require_format
from stages.dpo import metrics as M
from stages.dpo.config import OnlineDPOConfig
from stages.dpo.ema import init_ema, swapped_weights
from stages.dpo.evaluation import held_out_metrics, paired_gain
from stages.dpo.judge import critic_judge
from stages.dpo.loop import OnlineDPOResult, online_dpo, save_policy
from stages.dpo.losses import DpoLossType, dpo_loss
from stages.dpo.prompts import (
    assign_modes,
    pair_in_mode,
    prompt_rows,
    round_prompts,
    split_prompts,
    stdlib_prompt_rows,
)
from stages.dpo.rollout import best_worst_pairs, kl_estimate, sample, score_results, sequence_logprobs
from stages.dpo.state import finished_rounds
from stages.dpo.trainer import (
    dpo_training_args,
    make_trainer,
    replay_dpo_trainer_class,
    tokenize_replay,
    train_round,
)

__all__ = [
    "STAGE", "DpoLossType", "OnlineDPOConfig", "OnlineDPOResult", "best_worst_pairs", "dpo_loss",
    "dpo_training_args", "held_out_metrics", "init_ema", "kl_estimate", "make_trainer", "online_dpo",
    "paired_gain", "prompt_rows", "replay_dpo_trainer_class", "round_prompts", "run", "sample",
    "save_policy", "score_results", "sequence_logprobs", "split_prompts", "stdlib_prompt_rows", "swapped_weights",
    "tokenize_replay", "train_round",
]

def reward_training_items(reward_path, log) -> set[str]:
    """Source items the reward model trained on, from the file the reward stage writes next to it (none known for
    a pretrained model or one written by an earlier version: then the split cannot keep apart from them)."""
    import json

    from reward.train import TRAINING_ITEMS

    path = Path(reward_path) / TRAINING_ITEMS
    data = json.loads(path.read_text()) if path.is_file() else {"items": [], "known": False}
    if not data.get("known"):
        log.warning("dpo: the reward model's training items are unknown (%s has no %s): held-out prompts cannot "
                    "be kept apart from its training data", reward_path, TRAINING_ITEMS)
    return set(data["items"])


def manifest_metrics(result: OnlineDPOResult, cfg: OnlineDPOConfig) -> dict:
    """The stage's manifest metrics: every round's figures (without the per-expert loads), counts, final_*."""
    last = result.rounds[-1] if result.rounds else {}
    return {
        M.ROUNDS: [{k: v for k, v in m.items() if not k.startswith("expert_load")} for m in result.rounds],
        M.ONLINE_PAIRS: len(result.pairs), M.TIES: sum(m.get(M.TIES, 0) for m in result.rounds),
        **M.final_metrics(last), M.EMA: cfg.ema_decay is not None, M.TRAINER_RESTARTS: result.restarts,
    }


def run(ctx) -> None:
    """Stage entry: read the inputs, check the prompt budget, get engines and reward actors, run the rounds,
    write `dpo_model` and `online_pairs`.

    The policy is served by the engines of ``pool_role`` (already running when earlier stages used them) with
    the SFT weights synced in, when the role's model has the SFT model's shapes and chat template; otherwise by
    engines of this stage that load `sft_model`. Afterwards the pools are released: their engines hold the trained
    weights. With ``thinking``, prompts, offline pairs and SFT replay rows are each in one mode, as the policy's
    template writes it.
    """
    from pipeline.engines.pool import WorkerPool
    from pipeline.models.catalog import resolve_model, servable_by
    from reward.score import RewardPool

    cfg: OnlineDPOConfig = ctx.config
    sft_path = ctx.input_path("sft_model")
    reward_path = ctx.input_path("reward_model")
    prompts = prompt_rows(ctx.read("evolved").to_list()) + stdlib_prompt_rows(cfg.stdlib_prompts)
    preferences = ctx.read("preferences").to_list()
    sft_rows = ctx.read("sft").to_list() if cfg.sft_replay_coef > 0 else []
    trained = {i for p in preferences for i in pair_items(p)} | {source_item(r) for r in sft_rows}
    split = split_prompts(prompts, cfg, ctx.seed, reward_training_items(reward_path, ctx.log), trained)
    train_p, eval_p = split.train, split.held_out
    if cfg.thinking is not None:  # every prompt in one mode, asked through the switch the SFT policy's template takes
        from transformers import AutoTokenizer

        from stages.sft.modes import SFTThinking, mix_modes

        fmt = require_format(AutoTokenizer.from_pretrained(sft_path), "dpo.thinking (the sft_model's chat template)")
        train_p, eval_p = (assign_modes(ps, cfg.thinking.think_ratio, fmt, ctx.seed) for ps in (train_p, eval_p))
        ctx.metrics["prompts_by_mode"] = dict(Counter(p[MODE_FIELD] for p in train_p + eval_p))
        preferences = [pair_in_mode(p, fmt) for p in preferences]  # offline pairs as the policy writes each mode
        if any(r.get(REASONING_FIELD) for r in sft_rows):  # SFT replay rows in both modes, as SFT trained them
            sft_rows, _ = mix_modes(sft_rows, SFTThinking(think_ratio=cfg.thinking.think_ratio), fmt, ctx.seed)
    offline = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in preferences]
    ctx.metrics.update({M.PROMPTS_EXCLUDED: split.excluded, M.PROMPTS_TRAIN: len(train_p),
                        M.PROMPTS_HELD_OUT: len(eval_p)})
    if len(eval_p) < cfg.eval_prompts:
        ctx.log.warning("dpo: %d held-out prompts, not %d: only those items are used by no training data",
                        len(eval_p), cfg.eval_prompts)
    role_cfg = ctx.run_config.models[cfg.pool_role]
    work = Path(ctx.work_dir) / "rounds"
    bar = ctx.progress(cfg.rounds, "dpo rounds")
    bar.advance(finished_rounds(work))
    with contextlib.ExitStack() as stack:
        if servable_by(resolve_model(role_cfg.model), sft_path):
            pool = ctx.pool(cfg.pool_role)
        else:  # e.g. an SFT with `thinking` saved our think template: the role's engines keep their own
            ctx.log.info("dpo: role %s serves %s, whose shapes or chat template differ from sft_model's; starting "
                         "engines for sft_model", cfg.pool_role, role_cfg.model)
            ctx.ensure_ray()
            pool = stack.enter_context(WorkerPool(role_cfg.model_copy(update={"model": str(sft_path)})))
        ctx.used_ray = True
        scorer = stack.enter_context(RewardPool(reward_path, cfg.reward))
        judge = None
        if cfg.judge_role:
            if ctx.run_config.models[cfg.judge_role] == role_cfg:
                raise ValueError(f"dpo.judge_role {cfg.judge_role!r} has the policy's engine settings, so it would "
                                 "share the engines whose weights DPO trains; fix: give it another model")
            judge = critic_judge(ctx.pool(cfg.judge_role), cfg.judge, ctx.seed)
        try:
            result = online_dpo(sft_path, pool, scorer, train_p, eval_p, offline, sft_rows, cfg, work,
                                seed=ctx.seed, log_metrics=lambda m, r: ctx.log_metrics(m, step=r),
                                on_round=lambda r, m: bar.advance(1), judge=judge,
                                export_dir=ctx.output_path("dpo_model"))
        finally:
            bar.close()
            ctx.release_pools()  # their engines now hold trained weights, not their role's model
    ctx.write("online_pairs", result.pairs)
    ctx.metrics.update(manifest_metrics(result, cfg))


def _make_stage():
    from pipeline.run.stage import Stage

    return Stage(name="dpo", inputs=("sft_model", "reward_model", "sft", "preferences", "evolved"),
                 outputs=("dpo_model", "online_pairs"), config_cls=OnlineDPOConfig, run=run)


STAGE = _make_stage()
