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
"""

from __future__ import annotations

import functools
import logging
import math
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from pipeline.engines.sync.base import SyncResult, check_weights_match
from pipeline.engines.sync.engine_helpers import refresh_tied_head, repack_cpu_moe, reset_fused_gates

if TYPE_CHECKING:
    from pipeline.engines.pool import WorkerPool

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 64 << 20
"""Bytes per broadcast on CPU (gloo): the trainer and the engines share the RAM there. On GPU vLLM's 1 GiB."""
DEFAULT_TIMEOUT_S = 600.0
"""Seconds a rank waits for the others (rendezvous and each broadcast) before the group fails."""

Metadata = list[tuple[str, tuple[int, ...], str]]


def plan_buckets(metadata: Metadata, bucket_bytes: int) -> list[int]:
    """Tensors per bucket, in order: as vLLM's ``packed_tensor.pack_tensors`` cuts them (a bucket closes after the
    tensor that takes it over ``bucket_bytes``), so the engines know each bucket's size from the metadata alone."""
    counts, n, total = [], 0, 0
    for _, shape, dtype in metadata:
        n, total = n + 1, total + math.prod(shape) * getattr(torch, dtype).itemsize
        if total > bucket_bytes:
            counts, n, total = [*counts, n], 0, 0
    return counts + [n] if n else counts


def _broadcast(group: Any, tensor: torch.Tensor) -> None:
    """Broadcast from rank 0 of a gloo ``ProcessGroup`` or a vLLM ``PyNcclCommunicator``. vLLM's stateless gloo
    group cannot use ``torch.distributed.broadcast`` (that maps global ranks); the group's own call takes group
    ranks."""
    if hasattr(group, "comm"):  # PyNcclCommunicator
        group.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
        return
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def _join(spec: dict, rank: int, device: Any) -> Any:
    """This process's handle on the group of ``spec`` at ``rank`` (blocks until every rank has joined)."""
    if spec["backend"] == "nccl":
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        return stateless_init_process_group(spec["master_address"], spec["master_port"], rank, spec["world_size"],
                                            device)
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        spec["master_address"], spec["master_port"], rank, spec["world_size"], backend="gloo",
        timeout=timedelta(seconds=spec["timeout_s"]))


def _leave(group: Any) -> None:
    from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

    if group is not None:
        group.destroy() if hasattr(group, "comm") else stateless_destroy_torch_distributed_process_group(group)


# -- engine side -----------------------------------------------------------------------------------------------
class _ReceiveBuckets:
    """The receive loop both engines share: flag, then a packed bucket, loaded with the model's ``load_weights``
    (wrapped by vLLM's layerwise reload since ``start_weight_update``)."""

    def receive_weights(self, update_info: Any) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        meta = [(n, tuple(s), d) for n, d, s in zip(update_info.names, update_info.dtype_names, update_info.shapes,
                                                    strict=True)]
        at, flag = 0, torch.zeros(1, dtype=torch.int64, device=self.device)
        with disable_mtp_completeness_check():
            for count in plan_buckets(meta, self.bucket_bytes):
                _broadcast(self.model_update_group, flag)
                if int(flag.item()) != 1:
                    raise RuntimeError(f"the trainer aborted the weight sync after {at} of {len(meta)} tensors")
                part = meta[at: at + count]
                sizes = [math.prod(s) * getattr(torch, d).itemsize for _, s, d in part]
                buf = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
                _broadcast(self.model_update_group, buf)
                self.model.load_weights(unpack_tensor(buf, [n for n, _, _ in part], [list(s) for _, s, _ in part],
                                                      [getattr(torch, d) for _, _, d in part], sizes))
                at += count


@functools.cache
def _engine_classes() -> dict[str, type]:
    """The weight-transfer engines this transport registers with vLLM's factory (built on first use: they
    subclass vLLM classes, which the light module import must not load)."""
    from dataclasses import dataclass

    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    @dataclass(kw_only=True)
    class GlooInitInfo(WeightTransferInitInfo):
        master_address: str
        master_port: int
        rank_offset: int
        world_size: int
        bucket_bytes: int = DEFAULT_BUCKET_BYTES
        timeout_s: float = DEFAULT_TIMEOUT_S

    @dataclass
    class GlooUpdateInfo(WeightTransferUpdateInfo):
        names: list[str]
        dtype_names: list[str]
        shapes: list[list[int]]

    class GlooWeightTransferEngine(_ReceiveBuckets, WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
        """vLLM ships NCCL (CUDA only) and CUDA-IPC engines; this is the same dense broadcast over gloo for the
        CPU build, in vLLM's stateless gloo group."""

        init_info_cls, update_info_cls = GlooInitInfo, GlooUpdateInfo
        model_update_group = None

        def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
            pc = self.parallel_config  # the worker's rank across DP and TP, as vLLM's NCCL engine computes it
            rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
            self.bucket_bytes = init_info.bucket_bytes
            self.model_update_group = _join(vars(init_info) | {"backend": "gloo"}, rank, self.device)

        def start_weight_update(self) -> None:
            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            finalize_layerwise_reload(self.model, self.model_config)

        def update_weights(self, update_info: dict) -> None:
            # the base class ends with torch.accelerator.synchronize(), which raises on a CPU-only torch
            self.receive_weights(self.parse_update_info(update_info))

        def shutdown(self) -> None:
            _leave(self.model_update_group)
            self.model_update_group = None

    class BucketedNCCLEngine(_ReceiveBuckets, NCCLWeightTransferEngine):
        """vLLM's NCCL engine (its group init with a rank offset per engine, layerwise start/finish) with this
        transport's flagged buckets; its own packed consumer has no abort signal. Not run on this project's CI."""

        bucket_bytes = 1 << 30

        def init_transfer_engine(self, init_info: Any) -> None:
            super().init_transfer_engine(init_info)
            self.bucket_bytes = init_info.packed_buffer_size_bytes

    engines = {"posttrain_gloo": GlooWeightTransferEngine, "posttrain_nccl": BucketedNCCLEngine}
    for name, cls in engines.items():
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(name, cls)
    return engines


class CollectiveEngine:
    """vLLM worker methods of this transport (mixed into the worker extension, see ``extension.py``)."""

    def posttrain_collective_join(self, spec: dict, rank_offset: int) -> dict:
        """Join the group of ``spec`` (blocks until every rank joined); a no-op when already in it. A new group id
        makes the engine leave its old group first (the trainer restarted, or the pool rebuilt the group)."""
        if getattr(self, "_posttrain_group_id", None) == spec["group_id"]:
            return {"joined": False}
        self.posttrain_collective_leave()
        from vllm.config.weight_transfer import WeightTransferConfig
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

        _engine_classes()
        t0 = time.perf_counter()
        backend = f"posttrain_{spec['backend']}"
        # The engines start without weight_transfer_config (the pool's other transports need none), so the
        # worker's engine is created here, with vLLM's factory, as vLLM's load_model would have.
        self.weight_transfer_engine = WeightTransferEngineFactory.create_engine(
            WeightTransferConfig(backend=backend), self.vllm_config, self.device, self.model_runner.get_model())
        common = {"master_address": spec["master_address"], "master_port": spec["master_port"],
                  "rank_offset": rank_offset, "world_size": spec["world_size"]}
        if spec["backend"] == "nccl":
            info = {**common, "packed": True, "packed_buffer_size_bytes": spec["bucket_bytes"]}
        else:
            info = {**common, "bucket_bytes": spec["bucket_bytes"], "timeout_s": spec["timeout_s"]}
        self.init_weight_transfer_engine(info)  # vLLM's worker call
        self._posttrain_group_id = spec["group_id"]
        return {"joined": True, "join_s": time.perf_counter() - t0}

    def posttrain_collective_receive(self, spec: dict, rank_offset: int) -> dict:
        """Receive the weights ``spec["metadata"]`` lists (joining the group first if needed) and load them in
        place. On an abort or a failure the engine still finishes vLLM's layerwise reload (layers not received
        keep their old weights) and the error is raised."""
        joined = self.posttrain_collective_join(spec, rank_offset)
        t0 = time.perf_counter()
        names, shapes, dtypes = zip(*spec["metadata"], strict=True) if spec["metadata"] else ((), (), ())
        go = torch.zeros(1, dtype=torch.int64, device=self.device)
        _broadcast(self.weight_transfer_engine.model_update_group, go)  # the sender's metadata check
        if int(go.item()) != 1:
            raise ValueError("the trainer refused the weight sync before sending: its model does not match the "
                             "sync's metadata (this engine's weights are unchanged)")
        self.start_weight_update()
        try:
            self.update_weights({"names": list(names), "dtype_names": list(dtypes),
                                 "shapes": [list(s) for s in shapes]})
        except BaseException:
            self.weight_transfer_engine.finish_weight_update()  # the worker already ended its update session
            raise
        self.finish_weight_update()
        model = self.model_runner.model
        retied, repacked = refresh_tied_head(model), repack_cpu_moe(model)
        reset_fused_gates(model)
        from pipeline.memory import release_freed_memory

        release_freed_memory()
        return {**joined, "tensors": len(names), "tied_head_refreshed": retied, "repacked_moe_layers": repacked,
                "seconds": time.perf_counter() - t0}

    def posttrain_collective_leave(self) -> dict:
        """Leave the group (if any); the engine keeps its weights."""
        left = getattr(self, "_posttrain_group_id", None)
        if left is not None and self.weight_transfer_engine is not None:
            self.shutdown_weight_transfer_engine()  # vLLM's worker call
        self._posttrain_group_id = None
        return {"left": left}


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
        _leave(_SENDER_GROUPS.popitem()[1])


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
            _SENDER_GROUPS[gid] = _join(self.spec, 0, self.device.index if self.spec["backend"] == "nccl" else None)
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
            _broadcast(group, flag)  # go (1) or refuse (0): the engines start their update only on a go
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
                _broadcast(group, flag)  # only once the bucket is packed: a failure before it sends the abort
                _broadcast(group, chunk.packed_tensor)
                at, stats["buckets"] = at + count, stats["buckets"] + 1
                stats["bytes"] += chunk.packed_tensor.numel()
        except BaseException:
            try:
                _broadcast(group, flag.zero_())  # release the engines before raising
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
