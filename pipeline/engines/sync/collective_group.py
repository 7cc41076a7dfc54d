"""The collective group the weight sync runs in, shared by its two sides (``collective.py``: the trainer's sender
and the pool; ``collective_engine.py``: vLLM's workers): the bucket plan both compute from the metadata, and
joining, broadcasting in and leaving vLLM's stateless gloo group or its ``PyNcclCommunicator``."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import torch

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


def broadcast(group: Any, tensor: torch.Tensor) -> None:
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


def join_group(spec: dict, rank: int, device: Any) -> Any:
    """This process's handle on the group of ``spec`` at ``rank`` (blocks until every rank has joined)."""
    if spec["backend"] == "nccl":
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        return stateless_init_process_group(spec["master_address"], spec["master_port"], rank, spec["world_size"],
                                            device)
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        spec["master_address"], spec["master_port"], rank, spec["world_size"], backend="gloo",
        timeout=timedelta(seconds=spec["timeout_s"]))


def leave_group(group: Any) -> None:
    from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

    if group is not None:
        group.destroy() if hasattr(group, "comm") else stateless_destroy_torch_distributed_process_group(group)
