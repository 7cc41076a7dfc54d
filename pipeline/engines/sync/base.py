"""The weight-sync interface: what a transport is, what a sync returns, and the check every sync passes first.

A transport moves a trainer's weights into a pool's running engines. The pool creates each transport once
(``Transport(pool)``) on first use and asks it, in the order ``registry.transport_chain`` gives:
``applies()`` (None, or why it cannot serve this pool), then ``sync(model, dtype)`` (a ``SyncResult``, or None:
it could not this time, the next transport takes over), ``restore(worker)`` after a worker restarted (the
transport that made the last sync gives it those weights again) and ``close()`` at shutdown.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch

    from pipeline.engines.pool import WorkerPool


@dataclass
class SyncResult:
    """What one sync did; ``WorkerPool.sync_weights`` returns it as a flat dict (``as_dict``)."""

    transport: str
    """Registry name of the transport that made the sync."""
    export_s: float
    """Seconds from the trainer's model to the transport (export, cast, write)."""
    put_s: float
    """Seconds putting the payload into Ray's object store (0 for transports that do not use it)."""
    load_s: float
    """Seconds until the slowest engine had loaded the weights."""
    total_s: float
    """Seconds of the whole sync."""
    bytes: int
    """Bytes of weights sent."""
    workers: int
    """Engines that loaded them."""
    engine_load_s: float
    """Seconds the slowest engine spent loading, as it measured itself."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Transport-specific figures, merged into the flat dict (e.g. the shared-memory first-sync check)."""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        extras = out.pop("extras")
        transport = out.pop("transport")
        return {**out, "transport": transport, **extras}


class Transport(Protocol):
    """One way of moving weights into a pool's engines (see the module docstring for the call order)."""

    engine_methods: ClassVar[type | None]
    """Mixin class of the vLLM worker methods (``posttrain_*``) this transport calls on the engines through
    ``EngineActor.call_extension``; ``extension.py`` builds vLLM's worker extension from those of every registered
    transport. None: the transport needs no engine-side method."""

    def __init__(self, pool: WorkerPool) -> None: ...

    def applies(self) -> str | None:
        """None when this transport can serve the pool; else why not (it may learn that during a ``sync``)."""

    def sync(self, model: torch.nn.Module, dtype: torch.dtype) -> SyncResult | None:
        """Push ``model``'s weights (cast to ``dtype``) into every engine. Must call ``check_weights_match``
        before it touches an engine. None: nothing was changed, the next transport should sync instead."""

    def restore(self, worker: int) -> None:
        """Give the restarted engine ``pool.actors[worker]`` the weights of this transport's last sync (or log
        why it cannot)."""

    def close(self) -> None:
        """Release what the transport holds (segments, process groups); the pool may create it again later."""


def checkpoint_shapes(model_path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in the model folder's safetensors files (headers only, no data read)."""
    from pathlib import Path

    from safetensors import safe_open

    shapes = {}
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def check_weights_match(got: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                        model_path: str) -> None:
    """Refuse a sync whose tensors (name -> shape) do not match the served checkpoint, before any engine is
    touched (a half-applied load would leave an engine serving a mix of old and new weights)."""
    if not expected:
        return
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    shape = sorted(k for k in set(got) & set(expected) if tuple(got[k]) != tuple(expected[k]))
    if missing or extra or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unknown to the engine (e.g. {extra[0]})")
        if shape:
            parts.append(f"{len(shape)} with another shape (e.g. {shape[0]}: got {got[shape[0]]}, "
                         f"engine has {expected[shape[0]]})")
        raise ValueError(f"weight sync refused for {model_path}: the trained model does not match the served one: "
                         + "; ".join(parts) + ". Fix: train the model the pool serves (same config).")
