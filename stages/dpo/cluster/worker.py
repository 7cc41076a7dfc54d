"""The training workers of the rounds: one Ray Train job for the stage, whose workers load the policy and the
frozen reference once, then serve the driver's requests round after round (``serve``).

Requests (``RoundWorker`` methods, called on every worker in the same order; rank 0 answers):
``train`` (a round's pairs: reference log-probabilities once, then the optimizer steps), ``ref_logprobs`` (the
reference's log-probabilities of sampled completions, for the KL estimate), ``weight_metadata`` and ``sync`` (the
weights, EMA swapped in, to the engines through the collective transport), ``checkpoint`` (sharded), ``export``
(a plain model folder) and ``stop``.

Micro-batch j of optimizer step s is trained by worker ``j % world_size``; each worker accumulates
``gradient_accumulation_steps`` of them, so N workers step exactly as one process with N times the accumulation.
Every forward of a sharded model is a collective, so every worker runs the same number of them (the last step
and the reference passes are padded with repeats whose results are dropped).
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from stages.dpo import metrics as M
from stages.dpo.cluster import shard
from stages.dpo.config import OnlineDPOConfig
from stages.dpo.step import (
    collate_pairs,
    micro_batch_loss,
    optimizer_step,
    reference_logps,
    replay_rows,
    tokenize_pairs,
)

log = logging.getLogger(__name__)

REF_BATCH = 4
"""Rows per reference forward (reference log-probabilities and the KL's)."""


def collective_map(items: Sequence[Any], batch_size: int, run: Callable[[list], list]) -> list:
    """``run`` over batches of ``items`` split across the workers, results in item order on every worker. Each
    worker runs the same number of batches (repeats of the first batch, whose results are dropped, fill in)."""
    import torch.distributed as dist

    rank, size = shard.world()
    batches = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    if not batches:
        return []
    per_rank = math.ceil(len(batches) / size)
    mine = []
    for i in range(per_rank):
        b = i * size + rank
        out = run(batches[b] if b < len(batches) else batches[0])
        if b < len(batches):
            mine.append((b, out))
    gathered = [mine]
    if size > 1:
        gathered = [None] * size
        dist.all_gather_object(gathered, mine)
    by_batch = dict(x for part in gathered for x in part)
    return [y for b in range(len(batches)) for y in by_batch[b]]


class RoundWorker:
    """One training worker: the sharded policy, its reference, the EMA shard and the replay rows."""

    def __init__(self, spec: dict):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.training.moe import apply_moe_dropout, single_top_k
        from stages.dpo.trainer import tokenize_replay

        self.cfg = cfg = OnlineDPOConfig(**spec["config"])
        self.seed = spec["seed"]
        self.device = torch.device("cuda", torch.cuda.current_device()) if spec.get("use_gpu") else torch.device("cpu")
        self.dtype = cfg.train_dtype(self.device.type)
        self.tokenizer = AutoTokenizer.from_pretrained(spec["sft_path"])
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = self.tokenizer.pad_token_id or 0
        policy = AutoModelForCausalLM.from_pretrained(spec["sft_path"], dtype=self.dtype)
        single_top_k(policy, aux_loss=cfg.moe.router_aux_loss_coef > 0)
        apply_moe_dropout(policy, cfg.moe)
        if cfg.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref = None
        if cfg.lora is not None:
            policy = _with_lora(policy, cfg)
        else:
            self.ref = AutoModelForCausalLM.from_pretrained(spec["sft_path"], dtype=self.dtype).eval()
            self.ref.requires_grad_(False)
            self.ref = shard.shard(self.ref, cfg.distributed.strategy, self.device)
        self.policy = shard.shard(policy, cfg.distributed.strategy, self.device)
        self.ema = shard.ema_init(self.policy) if cfg.ema_decay else None
        if spec.get("start_checkpoint"):
            ema = shard.load_sharded(self.policy, Path(spec["start_checkpoint"]), with_ema=self.ema is not None)
            self.ema = ema if ema is not None else self.ema
        self.replay = (tokenize_replay(self.tokenizer, spec.get("sft_rows") or [], cfg.max_length)
                       if cfg.sft_replay_coef > 0 else [])
        self.policy.train()

    # -- the reference ---------------------------------------------------------------------------------------
    def _reference(self):
        """(model, context): the frozen reference, or the policy with its adapters disabled (LoRA)."""
        import contextlib

        if self.ref is not None:
            return self.ref, contextlib.nullcontext()
        return self.policy, self.policy.disable_adapter()

    def pair_ref_logps(self, rows: Sequence[dict]) -> list[tuple[float, float]]:
        model, ctx = self._reference()
        was_training = model.training
        model.eval()
        try:
            with ctx:
                return collective_map(rows, REF_BATCH, lambda b: reference_logps(
                    model, b, self.pad_id, self.cfg.max_length, REF_BATCH, self.device))
        finally:
            model.train(was_training)

    def ref_logprobs(self, items: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        """Summed reference log-probability of each (prompt_ids, completion_ids)."""
        from stages.dpo.rollout import sequence_logprobs

        model, ctx = self._reference()
        with ctx:
            return collective_map(items, REF_BATCH, lambda b: sequence_logprobs(model, b, batch_size=REF_BATCH))

    # -- training --------------------------------------------------------------------------------------------
    def train(self, pairs: Sequence[dict], seed: int, round_index: int) -> dict[str, float]:
        """Train on a round's pairs (fresh optimizer, as a round of the in-process trainer); the round's means of
        the logged terms, the grad norm, and ``train_steps``."""
        import torch.distributed as dist

        from pipeline.training.moe import make_moe_optimizer_and_scheduler
        from stages.dpo.trainer import collate_replay, dpo_training_args

        cfg = self.cfg
        rank, size = shard.world()
        rows = tokenize_pairs(self.tokenizer, pairs, cfg.max_length)
        if not rows:
            return {M.TRAIN_STEPS: 0.0}
        refs = self.pair_ref_logps(rows)
        micro = [list(range(i, min(i + cfg.batch_size, len(rows)))) for i in range(0, len(rows), cfg.batch_size)]
        total = max(1, round(cfg.epochs_per_round * len(micro)))
        order = [micro[k % len(micro)] for k in range(total)]
        per_step = size * cfg.gradient_accumulation_steps
        steps = math.ceil(total / per_step)
        with tempfile.TemporaryDirectory(prefix="dpo-args-") as scratch:
            args = dpo_training_args(cfg, scratch, seed)
        optimizer, scheduler = make_moe_optimizer_and_scheduler(self.policy, args, cfg.moe, steps)
        aux_coef = cfg.moe.router_aux_loss_coef

        def micro_run(j: int, step: int):
            idx = order[j % total]

            def run():
                batch = collate_pairs([rows[i] for i in idx], self.pad_id, cfg.max_length, self.device)
                rc = torch.tensor([refs[i][0] for i in idx], device=self.device)
                rr = torch.tensor([refs[i][1] for i in idx], device=self.device)
                replay = replay_rows(self.replay, cfg.replay_batch_size, seed, step, j)
                replay_batch = collate_replay(replay, self.pad_id, self.device) if replay else None
                return micro_batch_loss(self.policy, batch, rc, rr, replay_batch, cfg, aux_coef)
            return run

        def clip(params, max_norm):
            shard.reduce_gradients(self.policy)
            return shard.clip_grad_norm(params, max_norm)

        logged: list[dict] = []
        norms = []
        for s in range(steps):
            mine = [s * per_step + rank + size * a for a in range(cfg.gradient_accumulation_steps)]
            norm, terms = optimizer_step(self.policy, [micro_run(j, s) for j in mine], optimizer, scheduler,
                                         args.max_grad_norm, clip)
            norms.append(norm)
            logged.extend(t for j, t in zip(mine, terms, strict=True) if j < total)
            if self.ema is not None:
                shard.ema_update(self.policy, self.ema, cfg.ema_decay)
        keys = sorted({k for t in logged for k in t})
        sums = torch.tensor([[sum(t.get(k, 0.0) for t in logged), sum(k in t for t in logged)] for k in keys],
                            dtype=torch.float64)
        if size > 1:
            dist.all_reduce(sums)
        out = {k: float(v / n) for k, (v, n) in zip(keys, sums.tolist(), strict=True) if n}
        out[M.GRAD_NORM] = statistics.fmean(norms)
        out[M.TRAIN_STEPS] = float(steps)
        return out

    # -- weights out -----------------------------------------------------------------------------------------
    def served_dtype(self, dtype: str | None) -> torch.dtype:
        return getattr(torch, dtype) if dtype else self.dtype

    def weight_metadata(self, dtype: str | None = None) -> list:
        from pipeline.engines.sync.collective import weight_metadata

        return weight_metadata(self.policy, self.served_dtype(dtype))

    def sync(self, group: dict, dtype: str | None = None) -> dict:
        """Send the served weights (the EMA when kept; LoRA merged by the sender) to the engines' group: every
        worker gathers, rank 0 sends."""
        from pipeline.engines.sync.collective import CollectiveSender

        with shard.ema_weights(self.policy, self.ema):
            return CollectiveSender(group).send(self.policy, self.served_dtype(dtype))

    def checkpoint(self, folder: str) -> None:
        shard.save_sharded(self.policy, self.ema, Path(folder))

    def export(self, folder: str) -> None:
        """A plain transformers folder of the served weights (EMA, LoRA merged), written by rank 0."""
        with shard.ema_weights(self.policy, self.ema), _merged(self.policy):
            state = shard.full_state_dict(_served_model(self.policy))
        if shard.world()[0] == 0:
            from pipeline.files import write_folder_atomically

            model = _served_model(self.policy)
            # Tied weights once (the copies no longer share memory, so save_pretrained would keep both).
            own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
            state = _plain_names({k: v for k, v in state.items() if k in own})
            write_folder_atomically(Path(folder), lambda tmp: (
                model.save_pretrained(tmp, state_dict=state), self.tokenizer.save_pretrained(tmp)))


def _with_lora(policy, cfg: OnlineDPOConfig):
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    return get_peft_model(policy, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def _served_model(policy):
    """The module whose parameters the engines serve: the base model under peft's wrapper."""
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


def _merged(policy):
    """LoRA: the adapters merged into the base weights inside the block (unmerged after); else nothing."""
    import contextlib

    if not hasattr(policy, "merge_adapter"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def merged():
        with torch.no_grad():
            policy.merge_adapter()
        try:
            yield
        finally:
            with torch.no_grad():
                policy.unmerge_adapter()
    return merged()


def _plain_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base-model tensor names of a (possibly LoRA-wrapped) state dict: ``.base_layer`` dropped, adapters left out."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


def serve(spec: dict) -> dict:
    """The Ray Train worker function: build the worker, then run the driver's requests until ``stop``. Rank 0
    reads each request from ``spec["requests"]`` (a Ray queue), every worker runs it, rank 0 puts the answer (or
    the error) in ``spec["answers"]``."""
    import os
    import signal

    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    requests, answers = spec["requests"], spec["answers"]
    try:
        worker = RoundWorker(spec)
    except BaseException as exc:
        if rank == 0:
            answers.put({"error": f"{type(exc).__name__}: {exc}"})
        raise
    if rank == 0:
        answers.put({"ok": {"pid": os.getpid(), "world_size": size, "node_ip": ray.util.get_node_ip_address()}})
    seen: dict[str, int] = {}
    while True:
        box = [requests.get() if rank == 0 else None]
        if size > 1:
            dist.broadcast_object_list(box, src=0)
        op, kwargs = box[0]
        if op == "stop":
            break
        seen[op] = seen.get(op, 0) + 1
        kill = spec.get("kill_rank_in")  # tests: (rank, op, n): SIGKILL that worker at its n-th `op` (a real crash)
        if kill and (kill[0], kill[1], kill[2]) == (rank, op, seen[op]):
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            result = getattr(worker, op)(**kwargs)
        except BaseException as exc:
            if rank == 0:
                answers.put({"error": f"{type(exc).__name__}: {exc}"})
            raise
        if rank == 0:
            answers.put({"ok": result})
    return {"stopped": True}
