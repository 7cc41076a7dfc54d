"""Evaluating a model on a benchmark: greedy answers through the vLLM pool, IFEval verdicts, the model's figures.

Generation is greedy (temperature 0) with the model's own chat template (the pool's ``llm.chat``), one user turn per
prompt, so the same model, prompts and token limit give the same answers and the same figures on every run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from critique.ifeval import score_prompt
from stages.eval.metrics import ACCURACIES, COMPARISONS, SUMMARY_KEYS, figure_key, gain_keys
from stages.eval.stats import paired_bootstrap

if TYPE_CHECKING:
    from pipeline.engines.pool import PoolConfig, WorkerPool

DEFAULT_MAX_TOKENS = 1280
"""Longest answer, in tokens (the limit common IFEval harnesses generate with)."""


def generate_answers(pool: WorkerPool, rows: Sequence[dict[str, Any]], max_tokens: int,
                     progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Greedy answers to benchmark prompts: ``{key, response, finish_reason, n_tokens}`` per row, in order."""
    from pipeline.engines.pool import ChatRequest

    # temperature 0 is greedy decoding: no seed is needed for the answers to repeat
    requests = [ChatRequest(messages=[{"role": "user", "content": r["prompt"]}], n=1, temperature=0.0,
                            max_tokens=max_tokens) for r in rows]
    results = pool.generate(requests, progress=progress)
    return [{"key": row["key"], "response": res.completions[0].text,
             "finish_reason": res.completions[0].finish_reason, "n_tokens": len(res.completions[0].token_ids)}
            for row, res in zip(rows, results, strict=True)]


def score_answers(rows: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per prompt: the prompt, its instructions (arguments as JSON text), the answer, and the
    verdicts (``strict``/``loose`` per instruction, ``prompt_strict``/``prompt_loose``)."""
    by_key = {a["key"]: a for a in answers}
    missing = [r["key"] for r in rows if r["key"] not in by_key]
    if missing:
        raise ValueError(f"no answer for prompt key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    out = []
    for row in rows:
        answer = by_key[row["key"]]
        out.append({"key": row["key"], "prompt": row["prompt"], "instruction_id_list": list(row["instruction_id_list"]),
                    "kwargs_json": json.dumps(row["kwargs"], sort_keys=True), "response": answer["response"],
                    "finish_reason": answer["finish_reason"], "n_tokens": int(answer["n_tokens"]),
                    **score_prompt(row, answer["response"])})
    return out


def summarize(scored: Sequence[Mapping[str, Any]], benchmark: str, model: str) -> dict[str, Any]:
    """A model's figures (the keys of ``SUMMARY_KEYS``) from its scored records."""
    if not scored:
        raise ValueError("no scored prompts to summarize")
    n_instructions = sum(len(r["strict"]) for r in scored)
    figures = {
        "prompt_strict": statistics.fmean(bool(r["prompt_strict"]) for r in scored),
        "prompt_loose": statistics.fmean(bool(r["prompt_loose"]) for r in scored),
        "instruction_strict": sum(sum(map(bool, r["strict"])) for r in scored) / n_instructions,
        "instruction_loose": sum(sum(map(bool, r["loose"])) for r in scored) / n_instructions,
        "truncated_fraction": statistics.fmean(r["finish_reason"] == "length" for r in scored),
        "mean_tokens": statistics.fmean(r["n_tokens"] for r in scored),
    }
    summary = {"benchmark": benchmark, "model": model, "n": len(scored),
               **{k: round(v, 4) for k, v in figures.items()}}
    return {k: summary[k] for k in SUMMARY_KEYS}


def _hits(scored: Sequence[Mapping[str, Any]], accuracy: str) -> tuple[list[float], list[float]]:
    """Per prompt: what was got right and what there was to get right, for one of ``ACCURACIES``."""
    level, mode = accuracy.split("_")
    if level == "prompt":
        return [float(bool(r[accuracy])) for r in scored], [1.0] * len(scored)
    return [float(sum(map(bool, r[mode]))) for r in scored], [float(len(r[mode])) for r in scored]


def paired_gains(scored: Mapping[str, Sequence[Mapping[str, Any]]], samples: int = 10_000,
                 confidence: float = 0.95, seed: int = 0) -> dict[str, float | None]:
    """For each comparison of ``COMPARISONS`` whose models are both in ``scored`` (label -> scored records of the
    same prompts): each accuracy's difference to the baseline and its paired bootstrap interval, by manifest key."""
    out: dict[str, float | None] = {}
    for comparison, (model, base) in COMPARISONS.items():
        if model not in scored or base not in scored:
            continue
        if [r["key"] for r in scored[model]] != [r["key"] for r in scored[base]]:
            raise ValueError(f"{comparison}: {model} and {base} were not scored on the same prompts")
        for accuracy in ACCURACIES:
            hits, counts = _hits(scored[model], accuracy)
            base_hits, _ = _hits(scored[base], accuracy)
            g = paired_bootstrap(hits, base_hits, counts, samples=samples, confidence=confidence, seed=seed)
            gain, low, high = gain_keys(comparison, accuracy)
            out.update({gain: round(g["gain"], 4), low: _round(g["ci_low"]), high: _round(g["ci_high"])})
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def model_metrics(label: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """A model's figures under its manifest keys (``final_prompt_loose``, ...)."""
    return {figure_key(label, k): summary[k] for k in SUMMARY_KEYS if k not in ("benchmark", "model")}


def evaluate_model(model: str, rows: Sequence[dict[str, Any]], max_tokens: int = DEFAULT_MAX_TOKENS,
                   pool_config: PoolConfig | None = None, benchmark: str = "ifeval",
                   progress: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Start engines for ``model`` (an embedded name or a model folder; other engine settings from
    ``pool_config``), answer ``rows`` greedily, free the engines; returns (scored records, summary)."""
    from pipeline.engines.pool import PoolConfig, WorkerPool

    cfg = (pool_config or PoolConfig()).model_copy(update={"model": model})
    with WorkerPool(cfg) as pool:
        answers = generate_answers(pool, rows, max_tokens, progress=progress)
    scored = score_answers(rows, answers)
    return scored, summarize(scored, benchmark, model)


def final_model(target: str | Path) -> str:
    """What `posttrain eval` evaluates: a run directory's final model (``models/dpo_model``, else
    ``models/sft_model``); anything else as given (an embedded name or a model folder)."""
    from pipeline.run.artifacts import final_model_dir

    path = Path(target)
    if not (path / "config.yaml").is_file() or not (path / "models").is_dir():
        return str(target)
    found = final_model_dir(path)
    if found is not None:
        return str(found)
    raise ValueError(f"{path} is a run directory without a finished model (models/dpo_model or models/sft_model); "
                     f"fix: run its sft stage first (posttrain run {path}/config.yaml), or pass a model")
