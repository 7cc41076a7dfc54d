"""Weight sync over a collective group (gloo on CPU, NCCL on GPU) through vLLM's weight-transfer API.

One group holds the trainer's sender (rank 0) and every worker of every engine (engine ``i`` at its own rank
offset). Each sync the sender gathers the model one layer group at a time (an FSDP2 ``DTensor``'s
``full_tensor()`` is a collective of the trainer's own group, so every trainer rank runs ``send``), converts the
group to checkpoint names (transformers' ``revert_weight_conversion``, as ``tensors.checkpoint_format_tensors``)
and broadcasts it in packed buckets; each engine loads them with vLLM's worker calls ``start_weight_update`` /
``update_weights`` / ``finish_weight_update`` (layerwise in-place reload), then the repairs of ``engine_helpers``.
Before each bucket the sender broadcasts a flag (1: a bucket follows, 0: abort), so a sender that fails between
buckets releases the engines at once instead of leaving them waiting for the group's timeout.

The trainer may run as a torch.distributed job: the pool's ``sync_remote(metadata, send)`` checks the metadata,
starts the engines' receive and calls ``send(spec)``, which must make every trainer rank run
``CollectiveSender(spec).send(model, dtype)``.

This module is the trainer's sender and the pool's transport; the engines' side is ``collective_engine.py``, the
group both join is ``collective_group.py``.
"""

from __future__ import annotations

import logging
import math
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from pipeline.engines.sync.base import SyncResult, check_weights_match
from pipeline.engines.sync.collective_engine import CollectiveEngine
from pipeline.engines.sync.collective_group import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_TIMEOUT_S,
    Metadata,
    broadcast,
    join_group,
    leave_group,
    plan_buckets,
)

if TYPE_CHECKING:
    from pipeline.engines.pool import WorkerPool

log = logging.getLogger(__name__)


# -- trainer side ----------------------------------------------------------------------------------------------
@contextmanager
def _trainer_state(model: torch.nn.Module, merge: bool) -> Iterator[tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    """(base model, its tensors by in-memory name, possibly DTensors), tied duplicates and LoRA tensors dropped.
    Duplicates are found by parameter identity, the same on every rank (``tensors._model_state`` compares
    data pointers, which an empty local shard does not keep apart). A peft model is merged while open if
    ``merge``."""
    is_peft = hasattr(model, "merge_adapter") and hasattr(model, "get_base_model")
    if is_peft and merge:
        model.merge_adapter()
    try:
        base = model.get_base_model() if is_peft else model
        unique = {n for n, _ in base.named_parameters()}
        tied = {n for n, _ in base.named_parameters(remove_duplicate=False)} - unique
        state = {n.replace(".base_layer.", "."): t.detach() for n, t in base.state_dict().items()
                 if n not in tied and "lora_" not in n}
        yield base, state
    finally:
        if is_peft and merge:
            model.unmerge_adapter()


def _groups(model: torch.nn.Module, merge: bool) -> Iterator[tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    """(base model, {in-memory name: tensor}) per layer group (vLLM's ``layerwise_groups``), in send order."""
    from vllm.distributed.weight_transfer.base import layerwise_groups

    with _trainer_state(model, merge) as (base, state):
        for group in layerwise_groups(list(state)):
            yield base, {n: state[n] for n in group}


def weight_metadata(model: torch.nn.Module, dtype: torch.dtype) -> Metadata:
    """(checkpoint name, shape, dtype name) of every tensor ``CollectiveSender.send`` sends, in its order; from
    shapes alone (meta tensors: nothing is gathered), so a driver can check a model before any engine is touched."""
    from transformers.core_model_loading import revert_weight_conversion

    out: Metadata = []
    for base, part in _groups(model, merge=False):
        meta = {n: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta") for n, t in part.items()}
        for name, t in revert_weight_conversion(base, meta).items():
            out.append((name, tuple(t.shape), str(dtype if t.is_floating_point() else t.dtype).removeprefix("torch.")))
    return out


_SENDER_GROUPS: dict[str, Any] = {}
"""The sender's group per group id in this process: kept across syncs, dropped when a new id comes."""


def leave_sender_groups() -> None:
    """Leave every group this process joined as a sender."""
    while _SENDER_GROUPS:
        leave_group(_SENDER_GROUPS.popitem()[1])


class CollectiveSender:
    """The trainer side: ``send(model, dtype)`` on every rank of the trainer job (or in a single process), at once.

    ``rank``: this process's rank in the trainer job (default: torch.distributed's rank, 0 without a default
    group); rank 0 is the sender, which joins the engines' group; the other ranks only take part in the gathers.
    """

    def __init__(self, spec: dict, rank: int | None = None) -> None:
        import torch.distributed as dist

        self.spec = spec
        self.rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
        self.device = torch.device("cuda", torch.cuda.current_device()) if spec["backend"] == "nccl" else "cpu"

    def _group(self) -> Any:
        gid = self.spec["group_id"]
        if gid not in _SENDER_GROUPS:
            leave_sender_groups()
            _SENDER_GROUPS[gid] = join_group(self.spec, 0, self.device.index if self.spec["backend"] == "nccl" else None)
        return _SENDER_GROUPS[gid]

    def _tensors(self, model: torch.nn.Module, dtype: torch.dtype, stats: dict) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint-format tensors, one layer group gathered at a time (on every rank: a collective)."""
        from transformers.core_model_loading import revert_weight_conversion

        for base, part in _groups(model, merge=True):
            t0 = time.perf_counter()
            full = {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in part.items()}
            if self.rank == 0:
                named = [(n, (t.to(dtype) if t.is_floating_point() else t).to(self.device).contiguous())
                         for n, t in revert_weight_conversion(base, full).items()]
                del full
                stats["export_s"] += time.perf_counter() - t0
                yield from named

    def send(self, model: torch.nn.Module, dtype: torch.dtype) -> dict:
        """Send ``model``'s weights (cast to ``dtype``) to the engines of the spec. A model whose metadata differs
        from the spec's is refused (ValueError) on every rank; the engines get an abort and keep their weights."""
        from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

        t0 = time.perf_counter()
        expected = [(n, tuple(s), d) for n, s, d in self.spec["metadata"]]
        got = weight_metadata(model, dtype)
        stats = {"sender": self.rank == 0, "export_s": 0.0, "buckets": 0, "bytes": 0}
        group = self._group() if self.rank == 0 else None
        stats["join_s"] = time.perf_counter() - t0
        flag = torch.tensor([int(got == expected)], dtype=torch.int64, device=self.device)
        if group is not None:
            broadcast(group, flag)  # go (1) or refuse (0): the engines start their update only on a go
        if got != expected:
            first = next((a, b) for a, b in zip([*got, None], [*expected, None], strict=False) if a != b)
            raise ValueError(f"collective weight sync refused: the model's tensors differ from the sync's metadata "
                             f"(first difference: model {first[0]}, metadata {first[1]})")
        tensors = self._tensors(model, dtype, stats)
        if group is None:  # another rank of the trainer job: take part in the gathers only
            for _ in tensors:
                pass
            return stats | {"seconds": time.perf_counter() - t0}
        try:
            at = 0
            for count in plan_buckets(expected, self.spec["bucket_bytes"]):
                names = [n for n, _, _ in expected[at: at + count]]
                chunk = pack_tensors(tensors, lambda item: item[1], self.spec["bucket_bytes"])
                if chunk is None or chunk.names != names:
                    raise RuntimeError(f"bucket {stats['buckets']}: the model yielded {chunk and chunk.names[:3]}, "
                                       f"the engines expect {names[:3]}")
                broadcast(group, flag)  # only once the bucket is packed: a failure before it sends the abort
                broadcast(group, chunk.packed_tensor)
                at, stats["buckets"] = at + count, stats["buckets"] + 1
                stats["bytes"] += chunk.packed_tensor.numel()
        except BaseException:
            try:
                broadcast(group, flag.zero_())  # release the engines before raising
            finally:
                leave_sender_groups()
            raise
        finally:
            tensors.close()  # unmerges a peft model now, not when the generator is collected
        return stats | {"seconds": time.perf_counter() - t0}


# -- pool side -------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class CollectiveTransport:
    """``sync_transport: collective``: a group of the trainer's sender and every engine worker (see the module
    docstring). ``sync`` sends from this process; ``sync_remote`` from a trainer job's ranks."""

    engine_methods = CollectiveEngine

    def __init__(self, pool: WorkerPool, bucket_bytes: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.pool = pool
        self.bucket_bytes = bucket_bytes or (DEFAULT_BUCKET_BYTES if pool.device == "cpu" else 1 << 30)
        self.timeout_s = timeout_s
        self.group: dict | None = None
        """The group the engines are in: group_id, backend, master_address, master_port, world_size,
        rank_offsets (None: the next sync builds one)."""

    def applies(self) -> str | None:
        if self.pool.device == "cuda" and not torch.cuda.is_available():
            return ("NCCL needs a GPU in the sending process; send from the trainer job with "
                    "CollectiveTransport.sync_remote")
        return None

    def _spec(self, metadata: Metadata, master_address: str | None) -> dict:
        """This sync's spec, on the current group or on a new one (new id and port)."""
        if self.group is None or (master_address and master_address != self.group["master_address"]):
            import ray

            self.close()
            tp = self.pool.config.tensor_parallel_size
            self.group = {"group_id": uuid.uuid4().hex, "backend": "nccl" if self.pool.device == "cuda" else "gloo",
                          "master_address": master_address or ray.util.get_node_ip_address(),
                          "master_port": _free_port(), "world_size": 1 + tp * len(self.pool.actors),
                          "rank_offsets": [1 + tp * i for i in range(len(self.pool.actors))]}
        return {**self.group, "bucket_bytes": self.bucket_bytes, "timeout_s": self.timeout_s,
                "metadata": [(n, tuple(s), d) for n, s, d in metadata]}

    def sync(self, model: torch.nn.Module, dtype: torch.dtype) -> SyncResult:
        return self.sync_remote(weight_metadata(model, dtype), lambda spec: CollectiveSender(spec).send(model, dtype))

    def sync_remote(self, metadata: Metadata, send: Callable[[dict], Any],
                    master_address: str | None = None) -> SyncResult:
        """One sync whose sender runs wherever ``send`` puts it: ``send(spec)`` must make every rank of the trainer
        job run ``CollectiveSender(spec).send(model, dtype)`` and return when they have (its return value, or a
        list with the rank-0 dict, gives the export figures). ``metadata``: ``weight_metadata(model, dtype)``,
        checked against the served checkpoint before any engine is touched. ``master_address``: the address of
        trainer rank 0's node (it hosts the group's rendezvous; default this node, on a port free here)."""
        import ray

        t0 = time.perf_counter()
        check_weights_match({n: tuple(s) for n, s, _ in metadata}, self.pool.served_shapes, self.pool.model_path)
        built = self.group is None
        spec = self._spec(metadata, master_address)
        refs = [a.call_extension.remote("posttrain_collective_receive", spec, offset, weights_changed=True)
                for a, offset in zip(self.pool.actors, spec["rank_offsets"], strict=True)]
        t1 = time.perf_counter()
        try:
            result = send(spec)  # the sender's dict, or a list with it (marked "sender")
            sent = next((r for r in (result if isinstance(result, list | tuple) else [result])
                         if isinstance(r, dict) and r.get("sender")), {})
            t2 = time.perf_counter()
            loads = [r[0] for r in ray.get(refs)]
        except BaseException as exc:
            from pipeline.executor import ray_cause

            if not isinstance(exc, ValueError):  # the sender refused its model: the group is still sound
                self.group = None  # else the next sync builds a new one (the engines leave this one then)
                leave_sender_groups()
            try:  # an engine's error explains a failed send best (the sender only sees the group break)
                ray.get(ray.wait(refs, num_returns=len(refs), timeout=5)[0])
            except Exception as err:
                if not isinstance(exc, ValueError):
                    raise RuntimeError(f"collective weight sync failed on an engine: {ray_cause(err)}") from exc
            raise
        t3 = time.perf_counter()
        return SyncResult(transport="collective", export_s=sent.get("export_s", 0.0), put_s=0.0, load_s=t3 - t1,
                          total_s=t3 - t0, bytes=sum(math.prod(s) * getattr(torch, d).itemsize
                                                     for _, s, d in metadata),
                          workers=len(loads), engine_load_s=max(x["seconds"] for x in loads),
                          extras={"group_built": built, "group_id": spec["group_id"],
                                  "buckets": len(plan_buckets(spec["metadata"], self.bucket_bytes)),
                                  "send_s": t2 - t1})

    def restore(self, worker: int) -> None:
        # The restarted engine is not in the group; the next sync builds a new one and brings it the weights.
        self.close()
        log.warning("vLLM worker %d restarted with the model folder's weights: the collective transport keeps no "
                    "copy of the last synced ones; the next sync brings them", worker)

    def close(self) -> None:
        """Make the engines leave the group and forget it: the next sync builds a new one (new id, new port), as
        after a trainer job restarted."""
        import ray

        if self.group is not None:
            try:
                ray.get([a.call_extension.remote("posttrain_collective_leave") for a in self.pool.actors],
                        timeout=self.timeout_s)
            except Exception as exc:  # an engine that is gone has left anyway
                log.warning("collective weight sync: an engine could not leave its group (%s)", exc)
        self.group = None
        leave_sender_groups()
