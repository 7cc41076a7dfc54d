"""Trainer side of the in-memory weight sync: a transformers model -> tensors vLLM can load.

transformers 5.x keeps MoE experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, H]),
while checkpoints and vLLM's ``load_weights`` use per-expert names
(``mlp.experts.{i}.gate_proj.weight`` ...). transformers' own ``revert_weight_conversion`` (what
``save_pretrained`` uses) does that translation, so any architecture transformers can save works
here without a table of our own.

Tensors travel to the engine actors through Ray's shared-memory object store as raw byte arrays
(numpy has no bfloat16), which Ray hands to readers without a copy.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


def checkpoint_format_tensors(model: torch.nn.Module, dtype: torch.dtype | None = None) -> list[tuple[str, torch.Tensor]]:
    """The model's weights under checkpoint names, tied duplicates dropped, cast to ``dtype``.

    A peft model is merged for the export (and unmerged after), so LoRA training syncs too.
    """
    from transformers.core_model_loading import revert_weight_conversion

    is_peft = hasattr(model, "merge_adapter") and hasattr(model, "get_base_model")
    if is_peft:
        model.merge_adapter()
    try:
        base = model.get_base_model() if is_peft else model
        state = {}
        seen: set[int] = set()
        for name, tensor in base.state_dict().items():
            if "lora_" in name:
                continue
            ptr = tensor.data_ptr()
            if ptr in seen:  # tied weights (lm_head = embed_tokens): vLLM ties them itself
                continue
            seen.add(ptr)
            state[name.replace(".base_layer.", ".")] = tensor.detach()
        state = revert_weight_conversion(base, state)
        out = []
        for name, tensor in state.items():
            t = tensor.detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out.append((name, t.contiguous()))
        return out
    finally:
        if is_peft:
            model.unmerge_adapter()


def pack_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, str, tuple[int, ...], np.ndarray]]:
    """(name, dtype, shape, uint8 array) per tensor: a form Ray's object store shares zero-copy."""
    packed = []
    for name, t in named:
        flat = t.contiguous().view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        packed.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), flat.numpy()))
    return packed


def unpack_tensors(packed) -> list[tuple[str, torch.Tensor]]:
    """Inverse of pack_tensors; plain (name, tensor) pairs pass through unchanged."""
    out = []
    for item in packed:
        if len(item) == 2:
            out.append(item)
            continue
        name, dtype, shape, arr = item
        # Arrays from Ray's object store are read-only views; vLLM only reads them (it copies
        # into its own parameters), so the non-writable warning torch would print is irrelevant.
        arr = np.asarray(arr)
        if not arr.flags.writeable:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.from_numpy(arr)
        else:
            raw = torch.from_numpy(arr)
        out.append((name, raw.view(getattr(torch, dtype)).reshape(shape)))
    return out


def payload_bytes(packed) -> int:
    return int(sum(item[3].nbytes if len(item) == 4 else item[1].numel() * item[1].element_size() for item in packed))
