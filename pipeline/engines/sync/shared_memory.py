"""Weight sync through one shared-memory segment laid out for vLLM's CPU kernels, which load straight from it.

For CPU engines with tensor parallel size 1 on the trainer's node. On the first sync the engines plan where
each checkpoint tensor goes (``kernel_load.plan_slots``: every tensor a kernel consumes is one region), the
trainer creates a ``SharedSegment`` of that layout and writes views of its own tensors into it
(``tensors.checkpoint_views``, once ``views_match_checkpoint_format`` has checked them against transformers'
export); each engine then fills its kernels from the segment (``kernel_load.load_slots``). That first load is
checked against vLLM's own reload of the same bytes; a difference, or an engine that cannot plan or load,
makes the pool use the next transport from then on. A restarted engine reloads the segment, which holds the
last synced weights.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from pipeline.engines.sync.base import SyncResult, check_weights_match
from pipeline.engines.sync.engine_helpers import refresh_tied_head, reload_in_place, reset_fused_gates
from pipeline.engines.sync.tensors import checkpoint_views, views_match_checkpoint_format

if TYPE_CHECKING:
    from pipeline.engines.pool import WorkerPool

log = logging.getLogger(__name__)


class SharedSegment:
    """A shared-memory buffer the trainer writes weights into and every engine on this machine maps.

    An anonymous memory file (``memfd``): it needs no space in /dev/shm, engines open it by
    ``/proc/<pid>/fd/<fd>``, and the kernel frees it when the trainer and the engines have closed it,
    even if the trainer dies. It is kept across syncs, so only the first write faults its pages in.
    """

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.fd: int | None = os.memfd_create("posttrain-weights")
        os.ftruncate(self.fd, self.nbytes)
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"
        self.buffer: torch.Tensor | None = torch.from_file(self.path, shared=True, size=self.nbytes,
                                                           dtype=torch.uint8)

    def write(self, named: Iterable[tuple[str, torch.Tensor]], layout: dict[str, tuple[int, tuple[int, ...]]],
              dtype: torch.dtype) -> int:
        """Copy (and cast) each tensor into its region; returns the bytes written."""
        esize = dtype.itemsize
        written = 0
        with torch.no_grad():
            for name, t in named:
                offset, shape = layout[name]
                n = t.numel() * esize
                self.buffer[offset: offset + n].view(dtype).view(shape).copy_(t)
                written += n
        return written

    def close(self) -> None:
        self.buffer = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SharedMemoryEngine:
    """vLLM worker methods of this transport (mixed into the worker extension, see ``extension.py``)."""

    def posttrain_shared_plan(self, shapes: dict[str, tuple[int, ...]]) -> dict:
        """Where each checkpoint tensor goes in a segment this engine can load from directly, or why it cannot."""
        from pipeline.engines.sync.kernel_load import Unsupported, assign_offsets, plan_slots

        dtype = self.model_runner.model_config.dtype
        try:
            slots = plan_slots(self.model_runner.model, shapes)
        except Unsupported as exc:
            return {"reason": str(exc)}
        except Exception as exc:  # vLLM internals this loader relies on changed: keep the reload path
            return {"reason": f"planning failed on this vLLM build: {type(exc).__name__}: {exc}"}
        layout = assign_offsets(slots, shapes, dtype.itemsize)
        self._posttrain_plan = (slots, layout["tensors"])
        return {"layout": layout["tensors"], "nbytes": layout["nbytes"], "dtype": str(dtype).removeprefix("torch.")}

    def _posttrain_segment(self, path: str, nbytes: int) -> torch.Tensor:
        """The segment at ``path``, mapped once. Keyed by the file's inode too: a segment the trainer made again
        (after a reset) may reuse the fd number, hence the path, of the one before; that older mapping is
        dropped, which also lets the kernel free it."""
        mapped = self.__dict__.setdefault("_posttrain_segments", {})
        try:
            key = (path, os.stat(path).st_ino, nbytes)
            if key not in mapped:
                mapped.clear()
                mapped[key] = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        except (OSError, RuntimeError) as exc:
            raise RuntimeError(f"cannot map the weight-sync segment {path} ({nbytes} bytes): {exc}; "
                               "set pool.sync_transport=object_store") from exc
        return mapped[key]

    def posttrain_load_shared(self, path: str, nbytes: int, verify: bool = False) -> dict:
        """Load the weights the trainer wrote into the segment at ``path`` (laid out by
        ``posttrain_shared_plan``) straight into the kernels.

        ``verify``: check this loader against vLLM's own: blank every tensor it should write, load,
        fingerprint the engine; then load the same weights with vLLM's reload and compare. The engine
        is left as the reload made it, and the result names the first tensor that differed, if any (the
        pool then stops using this path).
        """
        from pipeline.engines.sync.kernel_load import (
            blank_slots,
            fingerprint,
            fingerprint_difference,
            load_slots,
        )
        from pipeline.memory import large_buffers_on_heap

        t0 = time.perf_counter()
        slots, layout = self._posttrain_plan
        segment = self._posttrain_segment(path, nbytes)
        model, dtype = self.model_runner.model, self.model_runner.model_config.dtype
        mismatch, parts, retied = None, {}, False
        try:
            if verify:  # a tensor the loader forgot would otherwise keep its (maybe equal) old value unnoticed
                blank_slots(model, slots)
            with large_buffers_on_heap(keep_freed=True):  # the new GEMM buffers reuse the old ones' pages
                parts = load_slots(model, slots, segment, dtype)
                retied = refresh_tied_head(model)
            reset_fused_gates(model)
            direct = fingerprint(model, slots) if verify else None
        except Exception as exc:
            if not verify:
                raise
            direct, mismatch = None, f"direct load failed: {type(exc).__name__}: {exc}"
        if verify:  # the reference, and what the engine keeps: vLLM's own reload of the same bytes
            reload_in_place(self.model_runner, [
                (n, segment[o: o + math.prod(shape) * dtype.itemsize].view(dtype).view(shape))
                for n, (o, shape) in layout.items()])
            if direct is not None:
                mismatch = fingerprint_difference(direct, fingerprint(model, slots))
        return {"tensors": len(layout), "bytes": nbytes, "tied_head_refreshed": retied, "verified": verify,
                "verify_mismatch": mismatch, "seconds": time.perf_counter() - t0,
                "parts_s": {k: round(v, 4) for k, v in parts.items()}}


class SharedMemoryTransport:
    """``sync_transport: shared_memory``; first in the auto order."""

    engine_methods = SharedMemoryEngine

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self.reason: str | None = None
        """Why this transport does not serve the pool (found before or during a sync); None: it may."""
        self._placement_checked = False
        self.segment: SharedSegment | None = None
        self.layout: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.dtype: torch.dtype | None = None
        self.convention: tuple[str, str, str] | None = None
        self.verified = False
        """The engines' first load from the segment matched vLLM's reload of the same bytes."""
        self.written = False

    def applies(self) -> str | None:
        if self.reason is None and not self._placement_checked:
            import ray

            self._placement_checked = True
            pool, here = self.pool, ray.get_runtime_context().get_node_id()
            if pool.device != "cpu" or pool.config.tensor_parallel_size != 1:
                self.reason = "it serves CPU engines with tensor parallel size 1 only"
            elif any(n != here for n in ray.get([a.node_id.remote() for a in pool.actors])):
                self.reason = "an engine runs on another node"
        return self.reason

    def _disable(self, why: str) -> None:
        self.reason = why
        self.close()

    def _plan(self, model: torch.nn.Module) -> bool:
        """Check the trainer's views and the engines' plans, make the segment; False (reason set): it does not
        apply to this model."""
        import ray

        convention, why = views_match_checkpoint_format(model)
        plans = []
        if convention is not None:
            with checkpoint_views(model, convention) as views:
                shapes = {n: tuple(t.shape) for n, t in views}
            check_weights_match(shapes, self.pool.served_shapes, self.pool.model_path)
            plans = [r[0] for r in ray.get([a.call_extension.remote("posttrain_shared_plan", shapes)
                                            for a in self.pool.actors])]
            why = next((p["reason"] for p in plans if "reason" in p), "")
            if not why and any(p != plans[0] for p in plans):
                why = "the engines laid the weights out differently"
        if why:
            log.info("weight sync: the shared-memory transport does not apply (%s)", why)
            self._disable(why)
            return False
        plan = plans[0]
        self.segment, self.layout = SharedSegment(plan["nbytes"]), plan["layout"]
        self.dtype, self.convention = getattr(torch, plan["dtype"]), convention
        return True

    def sync(self, model: torch.nn.Module, dtype: torch.dtype) -> SyncResult | None:
        """One sync through the segment; None (nothing sent) when this transport does not apply to ``model``,
        for another ``dtype`` than the engines', or when the first load failed. The first load is checked
        against vLLM's reload; after a difference the engines hold the reload's result and later syncs use the
        next transport."""
        if self.reason is not None or (self.segment is None and not self._plan(model)):
            return None
        if dtype != self.dtype:
            return None
        t0 = time.perf_counter()
        with checkpoint_views(model, self.convention) as views:
            shapes = {n: tuple(t.shape) for n, t in views}
            check_weights_match(shapes, self.pool.served_shapes, self.pool.model_path)
            if shapes != {n: tuple(shape) for n, (_, shape) in self.layout.items()}:
                return None
            n_bytes = self.segment.write(views, self.layout, self.dtype)
        self.written = True
        t1 = time.perf_counter()
        loads = self._load(self.pool.actors, verify=not self.verified)
        if loads is None:
            return None
        t2 = time.perf_counter()
        return SyncResult(transport="shared_memory", export_s=t1 - t0, put_s=0.0, load_s=t2 - t1, total_s=t2 - t0,
                          bytes=n_bytes, workers=len(loads), engine_load_s=max(x["seconds"] for x in loads),
                          extras={"checked_against_reload": any(x["verified"] for x in loads),
                                  "check_mismatch": next((x["verify_mismatch"] for x in loads
                                                          if x["verify_mismatch"]), None)})

    def _load(self, actors: list, verify: bool) -> list[dict] | None:
        """Load the segment into ``actors``; None when an engine could not on the checked first load (then
        nothing changed: the engine fails before it writes)."""
        import ray

        from pipeline.executor import ray_cause

        seg = self.segment
        try:
            loads = [r[0] for r in ray.get([a.call_extension.remote("posttrain_load_shared", seg.path, seg.nbytes,
                                                                    verify, weights_changed=True) for a in actors])]
        except ray.exceptions.RayTaskError as exc:
            cause = ray_cause(exc)
            if not verify:
                raise RuntimeError(f"weight sync through shared memory failed on an engine: "
                                   f"{type(cause).__name__}: {cause}") from None
            log.warning("weight sync: an engine could not load from shared memory (%s); syncing through the next "
                        "transport from now on", cause)
            self._disable(f"an engine could not load from shared memory ({type(cause).__name__}: {cause})")
            return None
        bad = next((x["verify_mismatch"] for x in loads if x["verify_mismatch"]), None)
        if bad is not None:
            log.warning("weight sync: loading straight into vLLM's kernels gave %s another value than vLLM's "
                        "reload; syncing through the next transport from now on", bad)
            self._disable(f"loading straight into vLLM's kernels gave {bad} another value than vLLM's reload")
        elif verify:
            self.verified = True
        return loads

    def restore(self, worker: int) -> None:
        import ray

        if self.segment is None or not self.written:
            log.warning("vLLM worker %d restarted with the model folder's weights: the shared-memory segment of the "
                        "last sync was released; the next sync brings them", worker)
            return
        actor = self.pool.actors[worker]
        ray.get(actor.call_extension.remote("posttrain_shared_plan",
                                            {n: shape for n, (_, shape) in self.layout.items()}))
        self._load([actor], verify=False)
        log.warning("vLLM worker %d restarted with the last synced weights", worker)

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
        self.segment, self.layout, self.verified, self.written = None, {}, False, False
