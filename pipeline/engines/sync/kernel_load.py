"""Engine side of the shared-memory weight sync: checkpoint tensors -> vLLM's CPU kernels, directly.

vLLM's in-place ``reload_weights`` (the object-store transport) rebuilds every layer on the side: it allocates
each layer again from meta tensors, runs the layer's weight loaders into it, re-prepacks the kernel weights and
copies the result back. On a CPU engine that machinery costs more than the data (``benchmarks/sync_profile.py``
measures where the time goes). Here the trainer writes the weights into one shared-memory segment, laid out so
that every tensor a kernel consumes (qkv, gate_up, the experts' w13/w2) is one contiguous region; the engine
then hands each region straight to the kernel's own weight processing (oneDNN handle for a linear layer, the
CPU MoE prepack for experts) and copies the few plain tensors (norms, biases, embeddings). One read of the
bytes, no allocation of the model a second time.

A plan covers only layers it understands (vLLM's unquantized linear, embedding and CPU MoE layers, plain
parameters, tensor parallel size 1); anything else returns a reason and the pool keeps the reload path.
``fingerprint`` lets the pool check once that this loader leaves the engine exactly as vLLM's reload does for
the same weights before it trusts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.engines.sync.tensors import EXPERT_NAME_CONVENTIONS

ALIGN = 64  # bytes: every region starts on a cache line (oneDNN reads them with vector loads)


@dataclass
class Slot:
    """One engine tensor and the checkpoint tensors, in order, that fill it (stacked along dim 0)."""

    kind: str  # "linear" (prepacked GEMM weight), "moe" (CPU MoE prepack), "copy" (plain tensor)
    module: str
    attr: str
    names: list[str]
    shape: tuple[int, ...]
    offset: int = 0  # bytes into the segment


class Unsupported(Exception):
    """The engine has a layer this loader does not handle; the message names it."""


def _modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return dict(model.named_modules())


def plan_slots(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> list[Slot]:
    """Every parameter of ``model`` as a slot filled from the checkpoint tensors named in ``shapes``."""
    from vllm.distributed import get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise Unsupported("not a CPU engine (GPU kernels need no prepack: the reload path is the right one)")
    if get_tensor_model_parallel_world_size() != 1:
        raise Unsupported("tensor parallel size > 1")
    if current_platform.is_zen_cpu() and hasattr(torch.ops, "zentorch"):
        raise Unsupported("zentorch GEMMs keep a reference to the weight they were built from")
    packed = getattr(model, "packed_modules_mapping", None) or {}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    slots: list[Slot] = []
    for mname, mod in model.named_modules():
        params = dict(mod.named_parameters(recurse=False))
        if not params:
            continue
        qm = getattr(mod, "quant_method", None)
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, LinearBase):
            if not isinstance(qm, UnquantizedLinearMethod) or set(params) - {"weight", "bias"}:
                raise Unsupported(f"{mname}: {type(mod).__name__} with {type(qm).__name__}")
            parent, _, leaf = mname.rpartition(".")
            bases = [f"{parent}.{s}" if parent else s for s in packed.get(leaf, [])] or [mname]
            if params.get("bias") is not None:
                slots.append(Slot("copy", mname, "bias", [f"{b}.bias" for b in bases], tuple(params["bias"].shape)))
            shape = (int(getattr(mod, "output_size_per_partition", None) or mod.output_size),
                     int(getattr(mod, "input_size_per_partition", None) or mod.input_size))
            slots.append(Slot("linear", mname, "weight", [f"{b}.weight" for b in bases], shape))
        elif isinstance(mod, VocabParallelEmbedding):
            if not isinstance(qm, UnquantizedEmbeddingMethod) or set(params) != {"weight"}:
                raise Unsupported(f"{mname}: {type(mod).__name__} with {type(qm).__name__}")
            if tied and mname == "lm_head":
                continue  # shares the embeddings' tensor; the worker rebuilds its GEMM after the load
            slots.append(Slot("copy", mname, "weight", [f"{prefix}weight"], tuple(params["weight"].shape)))
        elif {"w13_weight", "w2_weight"} <= set(params):
            slots.extend(_expert_slots(mname, mod, params, shapes))
        elif qm is not None:
            raise Unsupported(f"{mname}: {type(mod).__name__} with {type(qm).__name__}")
        else:
            slots.extend(Slot("copy", mname, n, [f"{prefix}{n}"], tuple(p.shape)) for n, p in params.items())
    check_names(slots, shapes)
    return slots


def _cpu_experts(mod: torch.nn.Module):
    """The CPU MoE kernel of an experts module, or None."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:
        return None
    kernel = getattr(getattr(mod, "quant_method", None), "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    return experts if isinstance(experts, CPUUnquantizedExperts) else None


def _expert_slots(mname: str, mod, params: dict, shapes: dict) -> list[Slot]:
    experts = _cpu_experts(mod)
    if experts is None or getattr(experts, "_use_zentorch", False) or set(params) != {"w13_weight", "w2_weight"}:
        raise Unsupported(f"{mname}: experts without vLLM's unquantized CPU MoE kernel")
    cfg = experts.moe_config
    if experts._padded_intermediate_size(cfg) != cfg.intermediate_size_per_partition:
        raise Unsupported(f"{mname}: the CPU MoE kernel pads the intermediate size")
    base = mname.removesuffix(".routed_experts")  # vLLM's MoE runner nests the experts one level down
    n_experts = params["w13_weight"].shape[0]
    for gate, up, down in EXPERT_NAME_CONVENTIONS:
        w13 = [f"{base}.{e}.{p}.weight" for e in range(n_experts) for p in (gate, up)]
        w2 = [f"{base}.{e}.{down}.weight" for e in range(n_experts)]
        if all(n in shapes for n in w13 + w2):
            return [Slot("moe", mname, "w13_weight", w13, tuple(params["w13_weight"].shape)),
                    Slot("moe", mname, "w2_weight", w2, tuple(params["w2_weight"].shape))]
    raise Unsupported(f"{mname}: no checkpoint tensors named like {base}.0.gate_proj.weight or {base}.0.w1.weight")


def check_names(slots: list[Slot], shapes: dict[str, tuple[int, ...]]) -> None:
    """Each slot's sources exist and stack (along dim 0) into exactly its shape; every source is used once."""
    used: set[str] = set()
    for s in slots:
        missing = [n for n in s.names if n not in shapes]
        if missing:
            raise Unsupported(f"{s.module}.{s.attr}: no checkpoint tensor {missing[0]}")
        numel = sum(math.prod(shapes[n]) for n in s.names)
        if numel != math.prod(s.shape) or any(tuple(shapes[n])[1:] != _rows_of(s.shape) for n in s.names):
            raise Unsupported(f"{s.module}.{s.attr}: {s.names[0]}... do not stack into {s.shape}")
        used.update(s.names)
    unused = sorted(set(shapes) - used)
    if unused:
        raise Unsupported(f"checkpoint tensor {unused[0]} has no place in the engine ({len(unused)} such)")


def _rows_of(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Trailing dims every source of a slot must have: [rows, K] blocks stack into [N, K] and into 3-D
    experts [E, 2I, K]; 1-D tensors (biases, norms) stack whole."""
    return tuple(shape[-1:]) if len(shape) >= 2 else ()


def assign_offsets(slots: list[Slot], shapes: dict[str, tuple[int, ...]], element_size: int) -> dict:
    """Give each slot an aligned region; returns {name: (byte offset, shape)} for the trainer and the size."""
    layout = {}
    offset = 0
    for s in slots:
        s.offset = offset
        at = offset
        for n in s.names:
            layout[n] = (at, tuple(shapes[n]))
            at += math.prod(shapes[n]) * element_size
        offset = -(-at // ALIGN) * ALIGN
    return {"tensors": layout, "nbytes": offset}


@torch.no_grad()
def load_slots(model: torch.nn.Module, slots: list[Slot], segment: torch.Tensor, dtype: torch.dtype) -> dict[str, float]:
    """Fill the engine from ``segment`` (uint8, the trainer's layout): prepack or copy each slot.
    Returns seconds per slot kind."""
    import time

    modules = _modules(model)
    esize = dtype.itemsize
    seconds = dict.fromkeys(("linear", "moe", "copy"), 0.0)
    for s in slots:
        t0 = time.perf_counter()
        mod = modules[s.module]
        src = segment[s.offset: s.offset + math.prod(s.shape) * esize].view(dtype).view(s.shape)
        if s.kind == "copy":
            getattr(mod, s.attr).data.copy_(src)
        elif s.kind == "moe":
            experts = _cpu_experts(mod)
            torch.ops._C.prepack_moe_weight(src, getattr(mod, s.attr).data, experts.isa)
        else:  # linear: the layer's own CPU weight processing builds its GEMM from the region, then drops it
            mod.weight = torch.nn.Parameter(src, requires_grad=False)
            mod.quant_method.process_weights_after_loading(mod)
            if mod.weight.numel():  # a kernel that computes from the weight itself: give it a private copy
                mod.weight = torch.nn.Parameter(src.clone(), requires_grad=False)
        seconds[s.kind] += time.perf_counter() - t0
    for s in slots:  # embeddings: rebuild their (tied head's) GEMM from the new values, as the reload does
        mod = modules[s.module]
        if s.kind == "copy" and s.attr == "weight" and hasattr(mod, "cpu_linear") and hasattr(mod, "quant_method"):
            t0 = time.perf_counter()
            mod.quant_method.process_weights_after_loading(mod)
            seconds["linear"] += time.perf_counter() - t0
    return seconds


@torch.no_grad()
def blank_slots(model: torch.nn.Module, slots: list[Slot]) -> None:
    """Fill every tensor ``load_slots`` should write with NaN and make every GEMM it should rebuild return
    NaN (NaN: no weight equals it, not even a zero bias, and it never compares equal)."""
    modules = _modules(model)
    for s in slots:
        mod = modules[s.module]
        if s.kind == "linear":
            mod.cpu_linear = lambda x, weight, bias, n=s.shape[0]: x.new_full((*x.shape[:-1], n), float("nan"))
        else:
            getattr(mod, s.attr).data.fill_(float("nan"))


@torch.no_grad()
def fingerprint(model: torch.nn.Module, slots: list[Slot], seed: int = 0) -> dict[str, torch.Tensor]:
    """What the engine computes with, per slot, cheaply: a linear layer's output on a fixed input (its
    prepacked weight is not readable), about 4096 evenly spaced elements of the other tensors (all of a small
    one; after the MoE prepack)."""
    modules = _modules(model)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in slots:
        mod = modules[s.module]
        key = f"{s.module}.{s.attr}"
        if s.kind == "linear":
            x = torch.randn(3, s.shape[1], generator=g).to(getattr(mod, "params_dtype", torch.float32))
            out[key] = mod.cpu_linear(x, mod.weight, None).float().clone()
        else:
            flat = getattr(mod, s.attr).detach().reshape(-1)
            out[key] = flat[:: max(1, flat.numel() // 4096)].float().clone()
    return out


def fingerprint_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str | None:
    """The first slot whose fingerprint differs, or None when the two engines compute the same."""
    for key, va in a.items():
        vb = b.get(key)
        if vb is None or va.shape != vb.shape or not torch.equal(va, vb):
            return key
    return None
