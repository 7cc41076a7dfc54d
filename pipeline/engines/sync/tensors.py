"""Trainer side of the in-memory weight sync: a transformers model -> tensors vLLM can load.

transformers 5.x keeps MoE experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, H]),
while checkpoints and vLLM's ``load_weights`` use per-expert names
(``mlp.experts.{i}.gate_proj.weight`` ...). transformers' own ``revert_weight_conversion`` (what
``save_pretrained`` uses) does that translation, so any architecture transformers can save works
here without a table of our own.

Used by every transport (``pipeline/engines/sync/``): ``checkpoint_format_tensors`` exports through
transformers' own conversion; ``checkpoint_views`` gives the same tensors as views of the model's own (no copy),
once ``views_match_checkpoint_format`` has checked that the two agree; ``pack_tensors`` turns tensors into raw
byte arrays (numpy has no bfloat16) that Ray's object store hands to readers without a copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def _model_state(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    """(base model, its weights by in-memory name), tied duplicates and LoRA tensors dropped.

    A peft model is merged while the context is open (and unmerged after), so LoRA training syncs too.
    """
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
        yield base, state
    finally:
        if is_peft:
            model.unmerge_adapter()


def checkpoint_format_tensors(model: torch.nn.Module, dtype: torch.dtype | None = None) -> list[tuple[str, torch.Tensor]]:
    """The model's weights under checkpoint names, tied duplicates dropped, cast to ``dtype``.

    A peft model is merged for the export (and unmerged after), so LoRA training syncs too.
    """
    from transformers.core_model_loading import revert_weight_conversion

    with _model_state(model) as (base, state):
        state = revert_weight_conversion(base, state)
        out = []
        for name, tensor in state.items():
            t = tensor.detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out.append((name, t.contiguous()))
        return out


# checkpoint names of an expert's (gate, up, down) projections: Qwen-MoE/DeepSeek style, Mixtral style
EXPERT_NAME_CONVENTIONS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


@contextmanager
def checkpoint_views(model: torch.nn.Module, expert_names: tuple[str, str, str] = EXPERT_NAME_CONVENTIONS[0]
                     ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The model's weights under checkpoint names as views of its own tensors: no copy, no conversion.

    transformers keeps MoE experts fused in memory (``experts.gate_up_proj`` [E, 2I, H] with the gate
    rows first, ``experts.down_proj`` [E, H, I]); each expert's projection is a slice of those.
    ``expert_names`` are the checkpoint's names for an expert's gate, up and down projections. This is
    what transformers' ``revert_weight_conversion`` computes for such models, without its per-call cost (it
    compiles its renaming patterns and copies the experts on every call); ``views_match_checkpoint_format``
    checks that the two agree before a pool relies on it.
    """
    gate, up, down = expert_names
    with _model_state(model) as (_, state):
        out = []
        for name, t in state.items():
            if name.endswith(".experts.gate_up_proj") and t.dim() == 3:
                base, inter = name.removesuffix("gate_up_proj"), t.shape[1] // 2
                for e in range(t.shape[0]):
                    out += [(f"{base}{e}.{gate}.weight", t[e, :inter]), (f"{base}{e}.{up}.weight", t[e, inter:])]
            elif name.endswith(".experts.down_proj") and t.dim() == 3:
                base = name.removesuffix("down_proj")
                out += [(f"{base}{e}.{down}.weight", t[e]) for e in range(t.shape[0])]
            else:
                out.append((name, t))
        yield out


def views_match_checkpoint_format(model: torch.nn.Module) -> tuple[tuple[str, str, str] | None, str]:
    """The expert naming under which ``checkpoint_views`` equals transformers' own export of ``model``
    (names, shapes and values), or None and the first difference."""
    reference = dict(checkpoint_format_tensors(model))
    reason = "no fused experts convention matched"
    for convention in EXPERT_NAME_CONVENTIONS:
        with checkpoint_views(model, convention) as views:
            got = dict(views)
            if set(got) != set(reference):
                reason = f"names differ (e.g. {sorted(set(reference) ^ set(got))[0]})"
                continue
            bad = next((n for n, t in got.items() if t.shape != reference[n].shape or not torch.equal(t, reference[n])), None)
            if bad is None:
                return convention, ""
            reason = f"{bad} differs from transformers' export"
    return None, reason


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


def payload_shapes(packed) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a packed (or plain (name, tensor)) payload."""
    return {item[0]: tuple(item[2]) if len(item) == 4 else tuple(item[1].shape) for item in packed}


def payload_bytes(packed) -> int:
    """Bytes of the tensor data in a packed (or plain (name, tensor)) payload."""
    return int(sum(item[3].nbytes if len(item) == 4 else item[1].numel() * item[1].element_size() for item in packed))
