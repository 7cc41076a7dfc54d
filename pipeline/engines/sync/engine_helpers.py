"""Engine-side helpers every transport shares, run inside vLLM's worker process (imports nothing heavy).

vLLM's in-place reload with the repairs it needs afterwards (tied LM head, CPU MoE prepack, fused gates), the
checksum the tests read, and log filters for warnings a sync makes that say nothing is wrong.
"""

from __future__ import annotations

import logging


class _ExpectedReloadWarnings(logging.Filter):
    """Drop vLLM's "X: Failed to load weights" for layers that have no checkpoint tensor of their own (the
    rotary cache is computed; a tied LM head is refreshed by ``refresh_tied_head``): after every sync
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


def reload_in_place(model_runner, named) -> dict:
    """Load checkpoint-format (name, tensor) pairs with vLLM's own in-place reload, then repair what it leaves
    stale. ``model_runner.reload_weights`` re-runs each layer's weight processing; vLLM 0.32's CPU MoE kernel
    prepacks expert weights only when the kernel is first built, so the experts are prepacked again here (a
    no-op for GPU kernels, which need no prepack)."""
    model_runner.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
    retied = refresh_tied_head(model_runner.model)
    repacked = repack_cpu_moe(model_runner.model)
    reset_fused_gates(model_runner.model)
    return {"repacked_moe_layers": repacked, "tied_head_refreshed": retied}


def refresh_tied_head(model) -> bool:
    """Rebuild the LM head from the new embeddings after a load, when the two are tied.

    With tied embeddings the checkpoint has no lm_head tensor, so vLLM's layerwise reload loads nothing into the
    head and skips its weight processing; on CPU that processing prepacks the head's weight into a oneDNN GEMM
    handle (``cpu_linear``), which would keep computing logits with the *pre-sync* embeddings.
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


def reset_fused_gates(model) -> None:
    """vLLM's MoE runner may concatenate the router and shared-expert gate weights on its first forward
    and keep the result: drop it so the next forward concatenates the synced ones."""
    for module in model.modules():
        if getattr(module, "_combined_gate_weight", None) is not None:
            module._combined_gate_weight = None


def repack_cpu_moe(model) -> int:
    """Run the CPU MoE kernel's weight prepack again on every expert layer; returns how many it repacked."""
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


class WeightChecksum:
    """Engine method every extension has: a checksum of named parameters, to check that a sync took effect."""

    def posttrain_weight_checksum(self, names: list[str]) -> dict:
        """Sum of each named parameter (as loaded in vLLM's layout)."""
        params = dict(self.model_runner.model.named_parameters())
        return {n: float(params[n].detach().double().sum()) for n in names if n in params}
