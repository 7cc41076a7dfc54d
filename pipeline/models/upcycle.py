"""Sparse upcycling: turn a dense Llama-style model into a Qwen2-MoE model with the same function.

Layout (Hunyuan-Large's shape: one shared expert that sees every token plus N routed experts,
top-k routing). The dense MLP's intermediate neurons are split in two parts, A and B:

- the shared expert holds the A neurons. Qwen2-MoE scales the shared expert by
  sigmoid(shared_expert_gate(x)); the gate starts at zero, so that factor is exactly 0.5 and
  the shared expert's down projection is doubled to compensate;
- every routed expert holds a copy of the B neurons. Routing weights are renormalized over the
  top-k (``norm_topk_prob``), so they sum to 1 and any choice of identical experts gives f_B(x).

So MoE(x) = f_A(x) + f_B(x) = dense MLP(x) exactly (up to float rounding) for any router, while
the routers are random and spread tokens over the experts. Active parameters per token equal the
dense model's; total parameters grow with N.

Router init: plain random rows route most tokens of a layer to one expert, because the inputs of
an MLP share a large common component. Given calibration text, each router row is made orthogonal
to the layer's mean MLP input, which spreads tokens over the experts (``tests/test_models.py``
checks that no expert takes most of a layer's tokens and that half of them at least are used in every layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM


@dataclass
class UpcycleConfig:
    """How to upcycle a dense model into a MoE."""

    num_experts: int = 8
    """Routed experts per layer (Hunyuan-Large: 16). The embedded default uses 8 to stay trainable on a CPU."""
    top_k: int = 1
    """Routed experts per token (Hunyuan-Large: 1)."""
    shared_fraction: float = 0.5
    """Fraction of the dense MLP's intermediate neurons that go to the shared expert; the rest
    is copied into every routed expert."""
    router_init_std: float = 0.02
    """Std of the random router weights. Any value keeps the function; larger spreads tokens more."""
    router_aux_loss_coef: float = 0.01
    """Written into the MoE config; training overrides it from the run config."""
    seed: int = 0


def moe_config_from_dense(dense_config, cfg: UpcycleConfig) -> Qwen2MoeConfig:
    inter = dense_config.intermediate_size
    shared = int(round(inter * cfg.shared_fraction))
    if not 0 < shared < inter:
        raise ValueError(f"shared_fraction={cfg.shared_fraction} leaves no neurons for one side of {inter}")
    if not 1 <= cfg.top_k <= cfg.num_experts:
        raise ValueError(f"top_k={cfg.top_k} must be between 1 and num_experts={cfg.num_experts}")
    head_dim = getattr(dense_config, "head_dim", None) or dense_config.hidden_size // dense_config.num_attention_heads
    return Qwen2MoeConfig(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        intermediate_size=inter,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        head_dim=head_dim,
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        rms_norm_eps=dense_config.rms_norm_eps,
        tie_word_embeddings=dense_config.tie_word_embeddings,
        rope_parameters=dense_config.rope_parameters,
        moe_intermediate_size=inter - shared,
        shared_expert_intermediate_size=shared,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=True,
        qkv_bias=True,  # vLLM's Qwen2-MoE always has q/k/v biases; they start at zero
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        attention_dropout=0.0,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        pad_token_id=getattr(dense_config, "pad_token_id", None),
        dtype="float32",
    )


@torch.no_grad()
def mean_mlp_inputs(dense: LlamaForCausalLM, calibration: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the mean input vector of the MLP over the calibration tokens."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(layer_idx):
        def fn(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[layer_idx] = sums.get(layer_idx, 0) + x.sum(0)
            counts[layer_idx] = counts.get(layer_idx, 0) + x.shape[0]
        return fn

    handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(dense.model.layers)]
    try:
        dense.eval()
        for ids in calibration:
            dense(ids)
    finally:
        for h in handles:
            h.remove()
    return [sums[i] / counts[i] for i in range(len(dense.model.layers))]


@torch.no_grad()
def upcycle(dense: LlamaForCausalLM, cfg: UpcycleConfig,
            calibration: list[torch.Tensor] | None = None) -> Qwen2MoeForCausalLM:
    """Return a Qwen2-MoE model whose logits equal ``dense``'s (see module docstring).

    ``calibration``: token-id tensors of real text; when given, router rows are made orthogonal to
    each layer's mean MLP input so tokens spread over the experts.
    """
    dc = dense.config
    means = mean_mlp_inputs(dense, calibration) if calibration else None
    if getattr(dc, "attention_bias", False) or getattr(dc, "mlp_bias", False):
        raise ValueError("upcycling supports Llama-style models without attention/MLP biases")
    mcfg = moe_config_from_dense(dc, cfg)
    moe = Qwen2MoeForCausalLM(mcfg).to(torch.float32)
    dense_sd = {k: v.float() for k, v in dense.state_dict().items()}
    shared = mcfg.shared_expert_intermediate_size
    gen = torch.Generator().manual_seed(cfg.seed)
    new_sd = {}
    for key, target in moe.state_dict().items():
        if key in dense_sd:
            new_sd[key] = dense_sd[key]
            continue
        if key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            new_sd[key] = torch.zeros_like(target)
            continue
        prefix = key.split(".mlp.")[0] + ".mlp."
        gate = dense_sd[prefix + "gate_proj.weight"]
        up = dense_sd[prefix + "up_proj.weight"]
        down = dense_sd[prefix + "down_proj.weight"]
        if key.endswith("shared_expert.gate_proj.weight"):
            new_sd[key] = gate[:shared]
        elif key.endswith("shared_expert.up_proj.weight"):
            new_sd[key] = up[:shared]
        elif key.endswith("shared_expert.down_proj.weight"):
            new_sd[key] = down[:, :shared] * 2.0  # sigmoid(0) = 0.5 from the zero shared gate
        elif key.endswith("shared_expert_gate.weight"):
            new_sd[key] = torch.zeros_like(target)
        elif key.endswith("experts.gate_up_proj"):
            one = torch.cat([gate[shared:], up[shared:]], dim=0)
            new_sd[key] = one.unsqueeze(0).repeat(mcfg.num_experts, 1, 1)
        elif key.endswith("experts.down_proj"):
            new_sd[key] = down[:, shared:].unsqueeze(0).repeat(mcfg.num_experts, 1, 1)
        elif key.endswith("mlp.gate.weight"):
            w = torch.randn(target.shape, generator=gen) * cfg.router_init_std
            if means is not None:
                u = means[int(key.split(".layers.")[1].split(".")[0])]
                u = u / u.norm().clamp(min=1e-12)
                w = w - (w @ u)[:, None] * u[None, :]
            new_sd[key] = w
        else:  # a parameter this mapping does not know: refuse rather than leave it random
            raise KeyError(f"upcycle: no rule for MoE parameter {key}")
    moe.load_state_dict(new_sd, strict=True)
    if mcfg.tie_word_embeddings:
        moe.tie_weights()
    moe.generation_config = dense.generation_config
    return moe.eval()
