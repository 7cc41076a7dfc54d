"""Methods added to every vLLM worker through vLLM's ``worker_extension_cls`` extension point.

vLLM injects this class into its worker class; the pool calls the methods with
``LLM.collective_rpc("posttrain_load_weights", ...)``. This module is imported inside vLLM's
worker process, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import logging
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
    from pipeline.weight_sync import unpack_tensors

    return unpack_tensors(payload)


class WeightSyncExtension:
    """Worker-side half of the in-memory weight sync (the trainer side is pipeline/weight_sync.py)."""

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
        n_tensors = len(named)
        del named
        # the payload and the replaced weights: measured RSS of a CPU engine grew from ~5 to ~7 GB over a few
        # syncs of the 1.65 GB policy without this
        from pipeline.memory import release_freed_memory

        release_freed_memory()
        return {"tensors": n_tensors, "bytes": n_bytes, "repacked_moe_layers": repacked, "tied_head_refreshed": retied,
                "seconds": time.perf_counter() - t0}

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
