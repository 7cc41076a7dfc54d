"""The engine side of the collective weight sync: vLLM weight-transfer engines (gloo for the CPU build, vLLM's NCCL
engine with flagged buckets) and the worker methods the pool calls (mixed into the worker extension)."""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch

from pipeline.engines.sync.collective_group import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_TIMEOUT_S,
    broadcast,
    join_group,
    leave_group,
    plan_buckets,
)
from pipeline.engines.sync.engine_helpers import refresh_tied_head, repack_cpu_moe, reset_fused_gates


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
                broadcast(self.model_update_group, flag)
                if int(flag.item()) != 1:
                    raise RuntimeError(f"the trainer aborted the weight sync after {at} of {len(meta)} tensors")
                part = meta[at: at + count]
                sizes = [math.prod(s) * getattr(torch, d).itemsize for _, s, d in part]
                buf = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
                broadcast(self.model_update_group, buf)
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
            self.model_update_group = join_group(vars(init_info) | {"backend": "gloo"}, rank, self.device)

        def start_weight_update(self) -> None:
            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            finalize_layerwise_reload(self.model, self.model_config)

        def update_weights(self, update_info: dict) -> None:
            # the base class ends with torch.accelerator.synchronize(), which raises on a CPU-only torch
            self.receive_weights(self.parse_update_info(update_info))

        def shutdown(self) -> None:
            leave_group(self.model_update_group)
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
        broadcast(self.weight_transfer_engine.model_update_group, go)  # the sender's metadata check
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
