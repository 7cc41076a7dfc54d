"""``train_sft``: records + config -> a model folder + metrics. Checks and splits the records, keeps or discards
the work folder's state, stages the data, and runs ``train_worker`` as a Ray Train job or in this process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.files import atomic_write_json, state_key
from pipeline.thinking import detect_format
from stages.sft.config import SFTStageConfig
from stages.sft.modes import mix_modes, serving_template
from stages.sft.records import SFTDataError, check_records, split_heldout, stage_splits
from stages.sft.worker import train_worker

log = logging.getLogger(__name__)

STATE_VERSION = 1  # bump when the work-folder layout changes, so old partial state is discarded
WORK_STATE = ("phases", "data", "train_log.jsonl", "heldout_before.json", "summary.json")
"""What a run keeps in the work folder; discarded when the inputs change."""


def train_sft(records: Sequence[dict] | Any, cfg: SFTStageConfig, output_dir: str | os.PathLike,
              work_dir: str | os.PathLike, seed: int = 0,
              log_metrics: Callable[[dict], None] | None = None, model: str | None = None) -> dict:
    """Fine-tune a model on SFT ``records`` (list of dicts or a datasets.Dataset) into ``output_dir``.

    The model is ``cfg.model``, else ``model`` (the stage passes its role's model).

    Holds out a few records, trains the phases (via Ray Train, or in-process with backend local),
    writes a model folder that transformers and vLLM load, and returns the metrics (held-out loss
    before/after, per-phase steps, tokens, tokens/s). ``work_dir`` keeps finished phases: calling again
    with the same inputs continues where a killed run stopped. ``log_metrics`` receives each training
    log (loss, LR, aux loss, expert load) after training.
    """
    from pipeline.models.catalog import resolve_model

    if hasattr(records, "to_list"):
        records = records.to_list()
    records = list(records)
    if not records:
        raise SFTDataError("the sft dataset is empty; fix: check the filter stage's output")
    check_records(records)
    seed = cfg.seed if cfg.seed is not None else seed
    if (cfg.model or model) is None:
        raise ValueError("sft: no model to fine-tune; fix: set sft.model or a model role (sft.model_role)")
    model_path = str(resolve_model(cfg.model or model))
    think_template, mode_counts = None, None
    if cfg.thinking is not None:
        records, think_template, mode_counts = _thinking_rows(records, cfg, model_path, seed)
    train, heldout = split_heldout(records, cfg.heldout_fraction, cfg.heldout_max_records, seed)
    # Absolute paths: Ray Train wants an absolute storage path, and its workers run in another folder.
    work, output_dir = Path(work_dir).resolve(), Path(output_dir).resolve()
    _keep_or_discard_state(work, _state_key(cfg, model_path, train, heldout, seed))
    stage_splits(work, train, heldout)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    spec = {"config": cfg.model_dump(mode="json"), "model_path": model_path, "work_dir": str(work),
            "output_dir": str(output_dir), "seed": seed, "use_gpu": False, "world_size": 1,
            "think_template": think_template}
    t0 = time.perf_counter()
    log_path = work / "train_log.jsonl"
    logged_before = sum(1 for _ in log_path.open()) if log_path.exists() else 0
    if cfg.distributed.backend == "ray":
        summary = _ray_train(spec, cfg, work)
    else:
        summary = train_worker(spec)
        summary["workers"], summary["use_gpu"] = 1, False
    if log_metrics is not None and log_path.exists():
        with log_path.open() as f:
            for i, line in enumerate(f):
                if i >= logged_before:
                    log_metrics(json.loads(line))
    phases = [p for p in summary["phases"] if p.get("records")]
    tokens = sum(p.get("train_tokens", 0) for p in phases)
    runtime = sum(p.get("train_runtime_s", 0.0) for p in phases)
    return {
        "records": len(records), "train_records": len(train), "heldout_records": len(heldout),
        "heldout_nll_before": summary.get("heldout_nll_before"),
        "heldout_nll_after": summary.get("heldout_nll_after"),
        "train_tokens": tokens, "train_runtime_s": round(runtime, 3),
        "train_tokens_per_s": round(tokens / runtime, 3) if runtime else None,
        "steady_tokens_per_s": _steady(phases),
        "wall_s": round(time.perf_counter() - t0, 3),
        "workers": summary.get("workers"), "use_gpu": summary.get("use_gpu"),
        "phases": summary["phases"],
        **({"thinking": mode_counts} if mode_counts is not None else {}),
    }


def _thinking_rows(records: list[dict], cfg: SFTStageConfig, model_path: str, seed: int) -> tuple[list, str | None, dict]:
    """The records in their thinking modes (``stages.sft.modes``), the template to train and save the policy with
    when it is not the model's own (our ChatML think template), and the modes' counts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    template = serving_template(tokenizer)
    fmt = detect_format(tokenizer, template)
    assert fmt is not None  # serving_template returns a template with think markers
    rows, counts = mix_modes(records, cfg.thinking, fmt, seed)
    log.info("sft: thinking modes %s", counts)
    return rows, (template if template != tokenizer.chat_template else None), counts


def _state_key(cfg: SFTStageConfig, model_path: str, train: list[dict], heldout: list[dict], seed: int) -> str:
    """Same config (but where it runs), model, seed and records (ids and messages, train and held-out): same key."""
    def pairs(rows: list[dict]) -> list:
        return [[str(r.get("id")), r.get("messages")] for r in rows]

    return state_key(STATE_VERSION, cfg.model_dump(mode="json", exclude={"distributed"}), model_path, seed,
                     pairs(train), pairs(heldout))


def _keep_or_discard_state(work: Path, key: str) -> None:
    """Keep the work folder's state when it was written for ``key``; otherwise delete it (``WORK_STATE``)."""
    state_file = work / "state.json"
    try:
        kept = json.loads(state_file.read_text()).get("key") if state_file.exists() else None
    except (OSError, ValueError):  # unreadable: treat as another run's state
        kept = None
    if work.exists() and kept != key:
        for sub in WORK_STATE:
            target = work / sub
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    atomic_write_json(state_file, {"key": key})


def _ray_train(spec: dict, cfg: SFTStageConfig, work: Path) -> dict:
    """Run ``train_worker`` as a Ray Train job (CPU: one worker); returns the rank-0 summary."""
    from pipeline.training.ray_train import TrainJob, resolve_scaling, run_train_job

    workers, use_gpu = resolve_scaling(cfg.distributed.num_workers, cfg.distributed.use_gpu)
    if not use_gpu and workers > 1:
        log.warning("sft: %d CPU workers requested; CPU training uses one worker", workers)
        workers = 1
    if not use_gpu and cfg.distributed.strategy != "ddp":
        log.info("sft: strategy %s shards across GPUs; this CPU run has one worker and does not use it",
                 cfg.distributed.strategy)
    job = TrainJob(name="sft", work_dir=work, workers=workers, use_gpu=use_gpu,
                   cpus_per_worker=cfg.distributed.cpus_per_worker, worker_nice=cfg.distributed.worker_nice,
                   storage_path=cfg.distributed.storage_path, result_file="summary.json")
    summary = run_train_job(train_worker, {**spec, "use_gpu": use_gpu, "world_size": workers}, job)
    summary["workers"] = workers
    summary["use_gpu"] = use_gpu
    return summary


def _steady(phases: list[dict]) -> float | None:
    seconds = sum(p.get("steady_s") or 0.0 for p in phases)
    return round(sum(p.get("steady_tokens") or 0 for p in phases) / seconds, 3) if seconds else None
