"""The weight-sync transports by name, the order ``auto`` tries them in, and the choice between them per sync.

Light on purpose: ``PoolConfig`` validates ``sync_transport`` against ``TRANSPORTS`` and vLLM's worker process
builds its extension from it (``extension.py``); a transport's module is imported only when it is used.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pipeline.engines.sync.base import SyncResult, Transport

log = logging.getLogger(__name__)

TRANSPORTS: dict[str, str] = {
    # CPU engines on the trainer's node with tensor parallel size 1: the trainer writes the weights once into a
    # memory segment every engine maps, laid out for vLLM's CPU kernels, which load straight from it. Its first
    # sync is checked against vLLM's own reload; any difference and the pool stops using it.
    "shared_memory": "pipeline.engines.sync.shared_memory:SharedMemoryTransport",
    # Any engine on any node: through Ray's object store into vLLM's in-place reload_weights.
    "object_store": "pipeline.engines.sync.object_store:ObjectStoreTransport",
    # A collective group of the trainer's sender and every engine worker (gloo on CPU, NCCL on GPU) through vLLM's
    # weight-transfer calls; the sender may be rank 0 of an FSDP2 trainer job (CollectiveTransport.sync_remote).
    # Not in the auto order: on CPU shared memory is faster (no copy through a socket) and the object store
    # applies everywhere; it is chosen by name (GPU engines, or a trainer job that is not the driver).
    "collective": "pipeline.engines.sync.collective:CollectiveTransport",
}
"""Transport name -> ``"module:Class"`` of a class that implements ``base.Transport``."""

AUTO_ORDER: tuple[str, ...] = ("shared_memory", "object_store")
"""The transports ``auto`` tries, first to last; the last must apply to every pool."""


def check_transport_name(name: str) -> str:
    """``name`` if it is ``auto`` or a registered transport; else a ValueError that lists the choices."""
    if name != "auto" and name not in TRANSPORTS:
        raise ValueError(f"unknown weight-sync transport {name!r}: use auto or one of {', '.join(TRANSPORTS)} "
                         "(registered in pipeline/engines/sync/registry.py)")
    return name


def transport_class(name: str) -> type[Transport]:
    """The class registered as ``name`` (its module imported now)."""
    module, _, attr = TRANSPORTS[check_transport_name(name)].partition(":")
    return getattr(importlib.import_module(module), attr)


def transport_chain(mode: str) -> list[str]:
    """The transports a sync in ``mode`` tries, in order: ``auto`` is ``AUTO_ORDER``; a named transport comes
    first, then the transports after it in ``AUTO_ORDER`` (all of them when it is not in that order) take the
    syncs it cannot do."""
    check_transport_name(mode)
    if mode == "auto":
        return list(AUTO_ORDER)
    rest = AUTO_ORDER[AUTO_ORDER.index(mode) + 1:] if mode in AUTO_ORDER else AUTO_ORDER
    return [mode, *(n for n in rest if n != mode)]


class SyncTransports:
    """The transports of one pool: created on first use, asked in ``transport_chain`` order at each sync.

    A transport named by the pool's config (or by a ``sync_weights`` call) that does not apply is an error, with
    its reason; under ``auto`` it is skipped. The transport that made the last sync restores restarted workers.
    """

    def __init__(self, pool: Any):
        self.pool = pool
        self._made: dict[str, Transport] = {}
        self.last: str | None = None
        """Name of the transport that made the last sync (None: no sync since the pool started or was reset)."""

    def get(self, name: str) -> Transport:
        """The pool's instance of transport ``name`` (created on first use)."""
        if name not in self._made:
            self._made[name] = transport_class(name)(self.pool)
        return self._made[name]

    def sync(self, model: torch.nn.Module, dtype: torch.dtype, mode: str) -> SyncResult:
        chain = transport_chain(mode)
        for name in chain:
            transport = self.get(name)
            why = transport.applies()
            if why is None:
                result = transport.sync(model, dtype)
                if result is not None:
                    self.last = name
                    return result
                why = transport.applies()  # the transport may have found out during the sync that it cannot serve
            if why is not None and name == mode:
                others = ", ".join(n for n in TRANSPORTS if n != name)
                raise ValueError(f"pool.sync_transport={name} does not apply to {self.pool.model_path}: {why}; "
                                 f"use auto or {others}")
        raise RuntimeError(f"no weight-sync transport could sync {self.pool.model_path} (tried {', '.join(chain)}); "
                           f"the last of {AUTO_ORDER} must apply to every pool")

    def sync_remote(self, metadata: list, send: Any, master_address: str | None = None) -> SyncResult:
        """A collective sync whose sender is a trainer job outside this process (``CollectiveTransport.sync_remote``);
        it becomes the sync that restores restarted workers."""
        result = self.get("collective").sync_remote(metadata, send, master_address=master_address)
        self.last = "collective"
        return result

    def restore(self, worker: int) -> None:
        """Give a restarted worker the weights of the last sync."""
        if self.last is not None:
            self.get(self.last).restore(worker)

    def close(self) -> None:
        """Close every transport; the next sync creates them again, as in a fresh pool."""
        made, self._made, self.last = self._made, {}, None
        for transport in made.values():
            transport.close()
