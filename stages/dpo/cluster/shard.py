"""The policy on N training workers: FSDP2 sharding (or whole copies), gradient reduction and clipping, the EMA
as float32 shards in host memory, sharded checkpoints (torch distributed checkpoint) and the full state dict.

Every function works for a model sharded by ``fully_shard`` (parameters are DTensors), a whole model on N
workers and a single process alike, and creates its tensors on the device of the tensors it works with.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def decoder_layers(model) -> list:
    """The transformer blocks FSDP2 shards one by one (peft's wrapper looked through)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", inner), "layers", None)
    if layers is None:
        raise ValueError(f"{type(inner).__name__} has no model.layers to shard with FSDP2; fix: strategy none")
    return list(layers)


def shard(model, strategy: str, device: torch.device, reshard_after_forward: bool = True):
    """Shard ``model`` with FSDP2 (each decoder layer, then the root; weights, gradients and optimizer state
    sharded over the workers) and move it to ``device``; with strategy none (or one worker) only the move."""
    _, size = world()
    if strategy == "fsdp2" and size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (size,))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model.to(device)


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def reduce_gradients(model) -> None:
    """Average the gradients over the workers when the model is whole on each (FSDP2 reduce-scatters its own)."""
    _, size = world()
    if size == 1 or is_sharded(model):
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(size)


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (over every shard) to ``max_norm``, as ``torch.nn.utils.clip_grad_norm_``
    does; returns the norm before clipping. The sum of squares is accumulated in float64 over the local shards
    and summed over the workers, so N workers and one process agree on it to float64 rounding (torch's DTensor
    norm sums float32 per-shard norms in another order)."""
    sharded = any(local(p) is not p for p in params)
    device = params[0].grad.device if params else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=getattr(local(params[0].grad), "device", device)
                     if params else device)
    for p in params:
        sq += local(p.grad).detach().double().pow(2).sum()
    if sharded and world()[1] > 1:
        dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        local(p.grad).mul_(coef.to(local(p.grad).dtype))
    return norm


def local(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this worker holds (its shard for a DTensor)."""
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def ema_init(model) -> dict[str, torch.Tensor]:
    """EMA of this worker's shard of every trainable parameter: float32, in host memory."""
    return {n: local(p).detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters()
            if p.requires_grad}


def ema_update(model, ema: dict[str, torch.Tensor], decay: float) -> None:
    """ema = decay * ema + (1 - decay) * weights, each shard brought to the EMA's device first."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in ema:
                ema[n].mul_(decay).add_(local(p).detach().to(ema[n].device, torch.float32), alpha=1 - decay)


@contextlib.contextmanager
def ema_weights(model, ema: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Inside the block the model's shards hold the EMA (copied in, in the model's dtype and device); the trained
    shards are kept in host memory and copied back after."""
    if not ema:
        yield
        return
    saved = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in ema:
                shard_ = local(p)
                saved[n] = shard_.detach().to("cpu", copy=True)
                shard_.copy_(ema[n].to(shard_.device, shard_.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    local(p).copy_(saved[n].to(local(p).device))


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's tensors in host memory on rank 0 (gathered from the shards); empty on other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        # A copy: the caller may change the weights right after (EMA swapped back, LoRA unmerged).
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if world()[0] == 0 else {}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model, ema: dict | None, folder: Path) -> None:
    """Each worker writes its shards (torch distributed checkpoint) and its EMA shard; the folder appears whole
    (written as ``folder.tmp``, renamed by rank 0 after every worker finished)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    rank, size = world()
    tmp = folder.with_name(folder.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp))
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / f"ema_rank{rank:05d}.safetensors"))
    _barrier()
    if rank == 0:
        (tmp / "world_size").write_text(str(size))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    _barrier()


def load_sharded(model, folder: Path, with_ema: bool) -> dict | None:
    """Load what ``save_sharded`` wrote (same number of workers for the EMA shards); returns the EMA or None."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    rank, size = world()
    saved_size = int((folder / "world_size").read_text())
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    if not with_ema:
        return None
    if saved_size != size:
        raise ValueError(f"{folder} holds EMA shards of {saved_size} workers, this job has {size}; fix: run with "
                         f"dpo.distributed.num_workers: {saved_size} or delete the stage's work folder")
    return load_file(str(folder / f"ema_rank{rank:05d}.safetensors"))


def _barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
