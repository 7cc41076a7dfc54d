"""Weight sync through Ray's object store into vLLM's in-place ``reload_weights``: any engine, any node.

The trainer exports the weights with transformers' own conversion (``tensors.checkpoint_format_tensors``), puts
them once into Ray's object store as raw byte arrays (zero-copy for readers) and every engine reloads from the
object. A tensor-parallel engine's workers are Ray actors of their own: each fetches the object itself.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pipeline.engines.sync.base import SyncResult, check_weights_match
from pipeline.engines.sync.engine_helpers import reload_in_place

if TYPE_CHECKING:
    import torch

    from pipeline.engines.pool import WorkerPool

log = logging.getLogger(__name__)


class ObjectStoreEngine:
    """vLLM worker methods of this transport (mixed into the worker extension, see ``extension.py``)."""

    def posttrain_load_weights(self, payload) -> dict:
        """Load checkpoint-format weights into the running model, in place, with vLLM's own reload.

        ``payload``: a list of packed tensors (in-process engine: passed by reference), or ``bytes`` of a
        pickled Ray ObjectRef to such a list (workers that are Ray actors fetch it from the object store).
        """
        from pipeline.engines.sync.tensors import unpack_tensors
        from pipeline.memory import release_freed_memory

        t0 = time.perf_counter()
        if isinstance(payload, bytes | bytearray):
            import ray
            import ray.cloudpickle as cloudpickle

            payload = ray.get(cloudpickle.loads(payload))
        named = unpack_tensors(payload)
        n_bytes = sum(t.numel() * t.element_size() for _, t in named)
        repaired = reload_in_place(self.model_runner, named)
        n_tensors = len(named)
        del named, payload
        release_freed_memory()  # the payload and the replaced weights: the engine's RSS would grow with each sync
        return {"tensors": n_tensors, "bytes": n_bytes, **repaired, "seconds": time.perf_counter() - t0}


class ObjectStoreTransport:
    """``sync_transport: object_store``; the last of the auto order (it applies to every pool)."""

    engine_methods = ObjectStoreEngine

    def __init__(self, pool: WorkerPool):
        self.pool = pool

    def applies(self) -> str | None:
        return None

    def sync(self, model: torch.nn.Module, dtype: torch.dtype) -> SyncResult:
        import ray

        from pipeline.engines.sync.tensors import (
            checkpoint_format_tensors,
            pack_tensors,
            payload_bytes,
            payload_shapes,
        )

        pool = self.pool
        t0 = time.perf_counter()
        packed = pack_tensors(checkpoint_format_tensors(model, dtype))
        check_weights_match(payload_shapes(packed), pool.served_shapes, pool.model_path)
        t1 = time.perf_counter()
        ref = ray.put(packed)
        t2 = time.perf_counter()
        if pool.config.tensor_parallel_size == 1:
            arg = ref  # a top-level argument: Ray hands the engine actor the list itself
        else:  # vLLM's TP workers are Ray actors: each fetches the object itself
            import ray.cloudpickle as cloudpickle

            arg = cloudpickle.dumps(ref)
        loads = [r[0] for r in ray.get([a.call_extension.remote("posttrain_load_weights", arg, weights_changed=True)
                                        for a in pool.actors])]
        t3 = time.perf_counter()
        del ref
        return SyncResult(transport="object_store", export_s=t1 - t0, put_s=t2 - t1, load_s=t3 - t2, total_s=t3 - t0,
                          bytes=payload_bytes(packed), workers=len(loads),
                          engine_load_s=max(x["seconds"] for x in loads))

    def restore(self, worker: int) -> None:
        # Keeping the payload for restarts would hold a second copy of the weights in the object store.
        log.warning("vLLM worker %d restarted with the model folder's weights: the object-store transport keeps no "
                    "copy of the last synced ones; the next sync brings them", worker)

    def close(self) -> None:
        pass  # holds nothing between syncs
