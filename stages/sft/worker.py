"""What each SFT training process runs (a Ray Train worker, or this process with backend local).

Every phase not finished yet is trained from the model the previous phase saved. Work folder: ``data/`` (the
staged records), ``phases/K/`` (``trainer/`` with the ``save_steps`` checkpoints while phase K trains;
``model/`` and ``done.json`` once it is finished), ``heldout_before.json`` and ``train_log.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.files import atomic_write_json, copy_folder_atomically, replace_folder
from pipeline.thinking import require_format
from pipeline.tracking import attach
from pipeline.training.moe_config import LRWindow
from stages.sft.config import SFTPhase, SFTStageConfig
from stages.sft.measures import Throughput, dropout_check, heldout_nll, jsonl_log_callback
from stages.sft.records import SFTDataError, lr_windows, phase_records, read_splits
from stages.sft.template import think_training_template, training_chat_template
from stages.sft.trainer import load_model, lora_config, make_sft_trainer, training_args, unpartitioned_load


@dataclass
class WorkerRun:
    """What every phase of one training process's run shares."""

    cfg: SFTStageConfig
    spec: dict
    work: Path
    is_main: bool
    bf16: bool
    tokenizer: Any
    original_template: str | None
    heldout_ds: Any
    windows: list[LRWindow]

    @property
    def seed(self) -> int:
        return self.spec["seed"]

    @property
    def dtype_name(self) -> str:
        return "bfloat16" if self.bf16 else "float32"


def train_worker(spec: dict) -> dict:
    """Train every phase not finished yet; runs in each training process. Returns the main process's metrics.

    ``spec``: config (dict), model path, work folder, output folder, seed, world size, use_gpu.
    Phase k reads ``work/phases/k-1/model`` (or the base model), trains, and saves ``work/phases/k/model``
    with a ``done.json``; the last phase's model is copied to the output folder.
    """
    run, train_all = _start(spec)
    cfg = run.cfg
    summary: dict[str, Any] = {"phases": []}
    before_file = run.work / "heldout_before.json"
    if before_file.exists():  # measured by an earlier, interrupted run of these phases
        summary["heldout_nll_before"] = json.loads(before_file.read_text())["nll"]
    model_in = spec["model_path"]
    for k, phase in enumerate(cfg.phases):
        phase_dir = run.work / "phases" / str(k)
        done = phase_dir / "done.json"
        if done.exists():
            summary["phases"].append(json.loads(done.read_text()))
            if (phase_dir / "model").exists():
                model_in = str(phase_dir / "model")
            continue
        records = phase_records(train_all, phase.tiers)
        if not records:
            info = {"phase": k, "tiers": phase.tiers, "records": 0, "skipped": "no records of these tiers"}
            if run.is_main:
                atomic_write_json(done, info)
            summary["phases"].append(info)
            continue
        last = k == len(cfg.phases) - 1 or all(not phase_records(train_all, p.tiers) for p in cfg.phases[k + 1:])
        summary["phases"].append(_train_phase(run, k, phase, records, model_in, summary, last))
        model_in = str(phase_dir / "model")
    _finish(run, summary, model_in)
    return summary


def _start(spec: dict) -> tuple[WorkerRun, list[dict]]:
    """Set up this process (torch threads, process group), read the staged records, load the tokenizer with
    its training chat template. Returns the run's shared state and the training records."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    cfg = SFTStageConfig.model_validate(spec["config"])
    work = Path(spec["work_dir"])
    if not spec["use_gpu"]:
        torch.set_num_threads(cfg.distributed.torch_threads or len(os.sched_getaffinity(0)))
    if spec["world_size"] == 1:
        _leave_single_process_group()
    is_main = int(os.environ.get("RANK", "0")) == 0
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and spec["use_gpu"])

    train_all, heldout = read_splits(work)
    windows = lr_windows([len(phase_records(train_all, p.tiers)) * p.epochs for p in cfg.phases], cfg)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    if spec.get("think_template"):  # sft.thinking on a policy without think markers: trained and saved with ours
        tokenizer.chat_template = spec["think_template"]
    original_template = tokenizer.chat_template
    if cfg.assistant_only_loss:
        template = training_chat_template(tokenizer, cfg.chat_template_path)
        if cfg.thinking is not None:  # no loss on the empty think block of fast-mode rows
            template = think_training_template(tokenizer, template or original_template,
                                               require_format(tokenizer, "sft.thinking"))
        if template is not None:
            tokenizer.chat_template = template
    heldout_ds = Dataset.from_list([{"messages": r["messages"]} for r in heldout]) if heldout else None
    run = WorkerRun(cfg=cfg, spec=spec, work=work, is_main=is_main, bf16=bf16, tokenizer=tokenizer,
                    original_template=original_template, heldout_ds=heldout_ds, windows=windows)
    return run, train_all


def _train_phase(run: WorkerRun, k: int, phase: SFTPhase, records: list[dict], model_in: str, summary: dict,
                 last: bool) -> dict:
    """Train phase ``k`` from ``model_in`` (resuming from its newest checkpoint, if any), save its model and
    ``done.json``; returns the phase's metrics. Measures the held-out loss before phase 0 (into ``summary``) and
    after the ``last`` phase that has records."""
    import torch

    from pipeline.memory import large_buffers_on_heap

    cfg, seed = run.cfg, run.seed + k
    phase_dir = run.work / "phases" / str(k)
    torch.manual_seed(seed)
    # The training arguments first: with strategy deepspeed_zero3 they hold transformers' ZeRO-3 context, which
    # must exist when the model loads so that `from_pretrained` partitions the weights across the workers
    # (`deepspeed.zero.Init`) instead of every worker loading a full copy.
    args = training_args(cfg, run.spec, phase_dir / "trainer", run.bf16, cfg.max_steps_per_phase, seed)
    args.num_train_epochs = phase.epochs
    model = load_model(model_in, run.dtype_name)
    text_cfg = model.config.get_text_config()
    saved_config = {key: getattr(text_cfg, key) for key in ("output_router_logits", "router_aux_loss_coef")
                    if hasattr(text_cfg, key)}
    clock = Throughput()
    trainer = make_sft_trainer(model, run.tokenizer, records, cfg, args, run.windows[k], lora_config(cfg.lora),
                               callbacks=[jsonl_log_callback(run.work / "train_log.jsonl", k), clock.callback])
    clock.trainer = trainer
    attach(trainer, f"sft/phase_{k}")
    if k == 0 and "heldout_nll_before" not in summary:  # the base model, before any phase
        summary["heldout_nll_before"] = heldout_nll(trainer, run.heldout_ds)
        if run.is_main:
            atomic_write_json(run.work / "heldout_before.json", {"nll": summary["heldout_nll_before"]})
    resume = last_checkpoint(phase_dir / "trainer")
    check = dropout_check(trainer, cfg, seed) if k == 0 and resume is None else None
    t0 = time.perf_counter()
    with large_buffers_on_heap():
        result = trainer.train(resume_from_checkpoint=resume)
    info = _phase_info(trainer, result, time.perf_counter() - t0, clock, k, phase, records, run.windows[k])
    info.update({"resumed_from": resume, "started_from": model_in, "torch_threads": torch.get_num_threads(),
                 "nice": os.getpriority(os.PRIO_PROCESS, 0), "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
                 "dropout_loss_check": check})
    if last:
        summary["heldout_nll_after"] = info["heldout_nll_after"] = heldout_nll(trainer, run.heldout_ds)
    save_phase(trainer, run, model_in, phase_dir / "model", saved_config)
    if run.is_main:
        shutil.rmtree(phase_dir / "trainer", ignore_errors=True)  # checkpoints of a finished phase
        atomic_write_json(phase_dir / "done.json", info)
    return info


def _phase_info(trainer, result, wall: float, clock: Throughput, k: int, phase: SFTPhase, records: list[dict],
                window: LRWindow) -> dict:
    """The metrics of a trained phase: steps, loss, tokens, tokens/s, LR window, routed-expert LR scale."""
    tokens = int(trainer._total_train_tokens)  # TRL's count of non-padding tokens trained on
    runtime = float(result.metrics.get("train_runtime", wall))
    return {
        "phase": k, "tiers": phase.tiers, "epochs": phase.epochs, "records": len(records),
        "steps": int(trainer.state.global_step), "train_loss": float(result.metrics.get("train_loss", math.nan)),
        "train_tokens": tokens, "train_runtime_s": round(runtime, 3),
        "train_tokens_per_s": round(tokens / runtime, 3) if runtime > 0 else None,
        "steady_tokens_per_s": clock.tokens_per_s(),
        "steady_tokens": clock.tokens, "steady_s": round(clock.seconds, 3),
        "lr_window": [window.start, window.end],
        "routed_expert_lr_scale": next((g["initial_lr"] / trainer.args.learning_rate
                                        for g in trainer.optimizer.param_groups if g.get("group") == "routed_expert"),
                                       None),
    }


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete ``checkpoint-N`` in ``folder`` (None if none). The Trainer writes ``trainer_state.json``
    last, so a checkpoint without it was cut short by a kill and the one before it is used."""
    complete = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None


def _finish(run: WorkerRun, summary: dict, model_in: str) -> None:
    """The held-out loss after training, and (main process) the last phase's model copied to the output."""
    if "heldout_nll_after" not in summary:
        after = [p.get("heldout_nll_after") for p in summary["phases"] if p.get("heldout_nll_after") is not None]
        summary["heldout_nll_after"] = after[-1] if after else None
    if run.is_main:
        if model_in == run.spec["model_path"]:
            raise SFTDataError("no phase had records to train on; fix: check the phases' tiers against the sft set")
        copy_folder_atomically(model_in, run.spec["output_dir"])


def _leave_single_process_group() -> None:
    """One training process: leave the process group Ray Train set up, so that transformers does not wrap the
    model in DDP: over one process DDP only adds work (every gradient copied into its buckets, the autograd graph
    walked for unused experts at every step)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1:
        dist.destroy_process_group()
    for var in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):  # accelerate would set the group up again
        os.environ.pop(var, None)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_phase(trainer, run: WorkerRun, model_in: str, out: Path, saved_config: dict) -> None:
    """Save the phase's model as a plain transformers folder (LoRA merged, original chat template).

    Every rank calls the trainer's save (FSDP / DeepSpeed gather the weights collectively), so the folder is
    built at a fixed temporary path every rank knows, then the main process swaps it into place.
    """
    trainer.moe_dropout.remove()  # restores attention_dropout in the config; hooks are not saved anyway
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    text_cfg = base.config.get_text_config()
    for key, value in saved_config.items():  # TRL switched output_router_logits on for training
        setattr(text_cfg, key, value)
    tmp = out.parent / f".{out.name}.tmp"
    if run.is_main and tmp.exists():
        shutil.rmtree(tmp)
    if run.cfg.lora is not None:
        adapter = out.parent / f".{out.name}.adapter"
        trainer.save_model(str(adapter))
        if run.is_main:
            from peft import PeftModel

            with unpartitioned_load():  # only this process loads: ZeRO-3's collective zero.Init would hang
                merged = PeftModel.from_pretrained(load_model(model_in, str(base.dtype).removeprefix("torch.")),
                                                   str(adapter)).merge_and_unload()
            for key, value in saved_config.items():
                setattr(merged.config.get_text_config(), key, value)
            merged.save_pretrained(tmp)
            shutil.rmtree(adapter, ignore_errors=True)
    else:
        trainer.save_model(str(tmp))
    if run.is_main:
        tokenizer = run.tokenizer
        training_template, tokenizer.chat_template = tokenizer.chat_template, run.original_template
        tokenizer.save_pretrained(tmp)  # the served model keeps the tokenizer's own template
        tokenizer.chat_template = training_template
        for stale in tmp.glob("training_args.bin"):
            stale.unlink()
        replace_folder(tmp, out)
    _barrier()  # other ranks load this folder for the next phase
