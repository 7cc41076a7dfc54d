"""Methods added to every vLLM worker through vLLM's ``worker_extension_cls`` extension point.

vLLM injects this class into its worker class; the pool calls the methods with
``LLM.collective_rpc("posttrain_load_weights", ...)``. This module is imported inside vLLM's
worker process, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import logging
import math
import time


class _ExpectedReloadWarnings(logging.Filter):
    """Drop vLLM's "X: Failed to load weights" for layers that have no checkpoint tensor of their own (the
    rotary cache is computed; a tied LM head is refreshed by ``_refresh_tied_head``): after every sync
    they would tell the user something is wrong when nothing is."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.endswith("Failed to load weights") and msg.split(":")[0] in ("RotaryEmbedding", "ParallelLMHead"))


class _SetNumThreadsWarnings(logging.Filter):
    """vLLM's CPU worker replaces torch.set_num_threads with a function that warns; libraries in the
    same process call it on every batch, which floods the log with a warning about nothing we control."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads" not in record.getMessage()


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_ExpectedReloadWarnings())
logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_SetNumThreadsWarnings())


def _unpack(payload):
    """Turn a weight payload into (name, tensor) pairs.

    The payload is either a list of (name, tensor) pairs (in-process engine: passed by
    reference), or ``bytes`` of a pickled Ray ObjectRef to such a list (multi-process engines whose
    workers are Ray actors: each worker fetches the tensors from Ray's shared-memory object store).
    """
    if isinstance(payload, bytes | bytearray):
        import ray
        import ray.cloudpickle as cloudpickle

        payload = ray.get(cloudpickle.loads(payload))
    from pipeline.engines.weight_sync import unpack_tensors

    return unpack_tensors(payload)


class WeightSyncExtension:
    """Worker-side half of the in-memory weight sync (the trainer side is pipeline/engines/weight_sync.py)."""

    def posttrain_load_weights(self, payload) -> dict:
        """Load checkpoint-format weights into the running model, in place.

        Uses vLLM's own in-place reload (``model_runner.reload_weights``), which re-runs each
        layer's weight processing. vLLM 0.32's CPU MoE kernel prepacks expert weights only when
        the kernel is first built, so after a reload the experts hold unpacked data; we re-run its
        prepack here (a no-op for GPU kernels, which need no prepack).
        """
        t0 = time.perf_counter()
        named = _unpack(payload)
        n_bytes = sum(t.numel() * t.element_size() for _, t in named)
        self.model_runner.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
        retied = _refresh_tied_head(self.model_runner.model)
        repacked = _repack_cpu_moe(self.model_runner.model)
        _reset_fused_gates(self.model_runner.model)
        n_tensors = len(named)
        del named
        # the payload and the replaced weights: measured RSS of a CPU engine grew from ~5 to ~7 GB over a few
        # syncs of the 1.65 GB policy without this
        from pipeline.memory import release_freed_memory

        release_freed_memory()
        return {"tensors": n_tensors, "bytes": n_bytes, "repacked_moe_layers": repacked, "tied_head_refreshed": retied,
                "seconds": time.perf_counter() - t0}

    def posttrain_shared_plan(self, shapes: dict[str, tuple[int, ...]]) -> dict:
        """Where each checkpoint tensor goes in a shared segment this engine can load from directly
        (``pipeline/engines/kernel_load.py``), or why it cannot."""
        from pipeline.engines.kernel_load import Unsupported, assign_offsets, plan_slots

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

    def posttrain_load_shared(self, path: str, nbytes: int, verify: bool = False) -> dict:
        """Load the weights the trainer wrote into the segment at ``path`` (laid out by
        ``posttrain_shared_plan``) straight into the kernels.

        ``verify``: check this loader against vLLM's own: blank every tensor it should write, load,
        fingerprint the engine; then load the same weights with vLLM's reload and compare. The engine
        is left as the reload made it, and the result names the first tensor that differed, if any (the
        pool then stops using this path).
        """
        import torch

        from pipeline.engines.kernel_load import blank_slots, fingerprint, fingerprint_difference, load_slots
        from pipeline.memory import large_buffers_on_heap

        t0 = time.perf_counter()
        slots, layout = self._posttrain_plan
        segments = self.__dict__.setdefault("_posttrain_segments", {})
        if path not in segments:
            try:
                segments[path] = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
            except (OSError, RuntimeError) as exc:
                raise RuntimeError(f"cannot map the weight-sync segment {path} ({nbytes} bytes): {exc}; "
                                   "set pool.sync_transport=object_store") from exc
        segment = segments[path]
        model, dtype = self.model_runner.model, self.model_runner.model_config.dtype
        mismatch, parts, retied = None, {}, False
        try:
            if verify:  # a tensor the loader forgot would otherwise keep its (maybe equal) old value unnoticed
                blank_slots(model, slots)
            with large_buffers_on_heap(keep_freed=True):  # the new GEMM buffers reuse the old ones' pages
                parts = load_slots(model, slots, segment, dtype)
                retied = _refresh_tied_head(model)
            _reset_fused_gates(model)
            direct = fingerprint(model, slots) if verify else None
        except Exception as exc:
            if not verify:
                raise
            direct, mismatch = None, f"direct load failed: {type(exc).__name__}: {exc}"
        if verify:  # the reference, and what the engine keeps: vLLM's own reload of the same bytes
            self._posttrain_reload([(n, segment[o: o + math.prod(shape) * dtype.itemsize].view(dtype).view(shape))
                                    for n, (o, shape) in layout.items()])
            if direct is not None:
                mismatch = fingerprint_difference(direct, fingerprint(model, slots))
        return {"tensors": len(layout), "bytes": nbytes, "tied_head_refreshed": retied, "verified": verify,
                "verify_mismatch": mismatch, "seconds": time.perf_counter() - t0,
                "parts_s": {k: round(v, 4) for k, v in parts.items()}}

    def _posttrain_reload(self, named) -> None:
        self.model_runner.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
        _refresh_tied_head(self.model_runner.model)
        _repack_cpu_moe(self.model_runner.model)
        _reset_fused_gates(self.model_runner.model)

    def posttrain_weight_checksum(self, names: list[str]) -> dict:
        """Sum of each named parameter (as loaded in vLLM's layout), to check a sync took effect."""
        params = dict(self.model_runner.model.named_parameters())
        return {n: float(params[n].detach().double().sum()) for n in names if n in params}


def _refresh_tied_head(model) -> bool:
    """Rebuild the LM head from the new embeddings after a reload, when the two are tied.

    With tied embeddings the checkpoint has no lm_head tensor, so vLLM's layerwise reload loads
    nothing into the head and skips its weight processing; on CPU that processing prepacks the
    head's weight into a oneDNN GEMM handle (``cpu_linear``), which then keeps computing logits with
    the *pre-sync* embeddings. Measured on smollm2-moe: logprobs off by 0.1 per token without this.
    """
    cfg = getattr(model, "config", None)
    head, inner = getattr(model, "lm_head", None), getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if not getattr(cfg, "tie_word_embeddings", False) or head is None or embed is None:
        return False
    if head.weight is not embed.weight:
        head.tie_weights(embed)
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)
    return True


def _reset_fused_gates(model) -> None:
    """vLLM's MoE runner may concatenate the router and shared-expert gate weights on its first forward
    and keep the result: drop it so the next forward concatenates the synced ones."""
    for module in model.modules():
        if getattr(module, "_combined_gate_weight", None) is not None:
            module._combined_gate_weight = None


def _repack_cpu_moe(model) -> int:
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # a vLLM build without the CPU MoE kernel
        return 0
    count = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None and isinstance(getattr(kernel, "fused_experts", None), CPUUnquantizedExperts):
            kernel.fused_experts.process_weights_after_loading(module)
            count += 1
    return count
