"""In-memory weight sync from transformers into running vLLM engines.

Both sides run float32, so vLLM's logprobs for a fixed completion match transformers' closely; the bound 1e-2
leaves room for kernel differences (fused MoE, attention) while a perturbation of 2% of each weight's std moves
the logprobs far beyond it (each test asserts that it does). Tests that start an engine are marked slow; those
that sync other weights into the shared `tiny_pool` take it through `tiny_sync_pool`, which restores it.
"""

from __future__ import annotations

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.engines.sync import shared_memory
from pipeline.engines.sync.kernel_load import (
    Slot,
    Unsupported,
    assign_offsets,
    blank_slots,
    check_names,
    fingerprint,
    fingerprint_difference,
    load_slots,
)
from pipeline.engines.sync.registry import TRANSPORTS
from pipeline.engines.sync.shared_memory import SharedSegment
from pipeline.engines.sync.tensors import (
    checkpoint_format_tensors,
    checkpoint_views,
    pack_tensors,
    unpack_tensors,
    views_match_checkpoint_format,
)

MESSAGES = [{"role": "user", "content": "What does the Python statement 'assert' do?"}]


def _completion():
    from pydoc_data.topics import topics

    return " ".join(topics["assert"].split()[:40])  # real text as the fixed completion


def _hf_logprobs(model, tok, messages, completion):
    p = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    p = list(p["input_ids"] if hasattr(p, "keys") else p)
    c = tok(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        lp = model(ids).logits[0].float().log_softmax(-1)
    return torch.stack([lp[len(p) + i - 1, t] for i, t in enumerate(c)])


def _perturb(model, scale=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * scale * p.float().std().clamp(min=1e-3))


def _mad(a, b):
    return (torch.as_tensor(a) - torch.as_tensor(b)).abs().mean().item()


def test_export_translates_fused_experts_to_checkpoint_names(embedded_models):
    model = AutoModelForCausalLM.from_pretrained(embedded_models["tiny-moe"], dtype=torch.float32)
    named = dict(checkpoint_format_tensors(model))
    assert not any(k.endswith("experts.gate_up_proj") for k in named)
    e = model.config.num_experts
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    inter = fused.shape[1] // 2
    for i in range(e):
        assert torch.equal(named[f"model.layers.0.mlp.experts.{i}.gate_proj.weight"], fused[i, :inter])
        assert torch.equal(named[f"model.layers.0.mlp.experts.{i}.up_proj.weight"], fused[i, inter:])
    assert "lm_head.weight" not in named  # tied to the embeddings; vLLM ties them itself
    round_trip = dict(unpack_tensors(pack_tensors(named.items())))
    assert all(torch.equal(round_trip[k], v) for k, v in named.items())
    bf16 = dict(unpack_tensors(pack_tensors(checkpoint_format_tensors(model, torch.bfloat16))))
    assert bf16["model.embed_tokens.weight"].dtype == torch.bfloat16


@pytest.mark.slow
def test_sync_into_running_moe_engine_float32(moe_pool, embedded_models):
    path = embedded_models["smollm2-moe"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    completion = _completion()
    item = [(MESSAGES, completion)]
    old_hf = _hf_logprobs(model, tok, MESSAGES, completion)
    before = moe_pool.completion_logprobs(item)[0]
    assert _mad(before, old_hf) <= 1e-2

    _perturb(model)
    new_hf = _hf_logprobs(model, tok, MESSAGES, completion)
    assert _mad(new_hf, old_hf) > 0.05  # the perturbation is visible
    try:
        timing = moe_pool.sync_weights(model)
        after = moe_pool.completion_logprobs(item)[0]
        assert _mad(after, new_hf) <= 1e-2, "engine does not serve the synced weights"
        assert _mad(after, old_hf) > 0.05, "engine still serves the old weights"
        assert timing["bytes"] > 1.5e9  # the whole float32 policy went over
    finally:  # restore the engine for other tests
        fresh = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        moe_pool.sync_weights(fresh)
    restored = moe_pool.completion_logprobs(item)[0]
    assert _mad(restored, old_hf) <= 1e-2


@pytest.mark.slow
def test_sync_reaches_every_worker(tiny_sync_pool, embedded_models):
    path = embedded_models["tiny-moe"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    completion = _completion()
    item = [(MESSAGES, completion)]
    old_hf = _hf_logprobs(model, tok, MESSAGES, completion)
    _perturb(model, scale=0.2)
    new_hf = _hf_logprobs(model, tok, MESSAGES, completion)
    assert _mad(new_hf, old_hf) > 0.05
    tiny_sync_pool.sync_weights(model)
    per_worker = ray.get([a.completion_logprobs.remote(item) for a in tiny_sync_pool.actors])
    assert len(per_worker) == 2
    for lps in per_worker:
        assert _mad(lps[0], new_hf) <= 1e-2
        assert _mad(lps[0], old_hf) > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("bad", ["missing", "shape"])
def test_sync_of_mismatched_weights_fails_loudly(tiny_sync_pool, embedded_models, bad, transport):
    """A model of another shape must not be half-loaded silently, whichever transport syncs it."""
    from transformers import AutoConfig

    path = embedded_models["tiny-moe"]
    cfg = AutoConfig.from_pretrained(path)
    if bad == "shape":
        cfg.moe_intermediate_size = cfg.moe_intermediate_size * 2
    else:
        cfg.num_experts = cfg.num_experts - 1
    other = AutoModelForCausalLM.from_config(cfg)
    before = tiny_sync_pool.completion_logprobs([(MESSAGES, _completion())])[0]
    with pytest.raises(ValueError, match="weight sync refused") as err:
        tiny_sync_pool.sync_weights(other, transport=transport)
    assert ("missing" if bad == "missing" else "another shape") in str(err.value)
    # refused before touching the engine: it still serves the same weights
    assert tiny_sync_pool.completion_logprobs([(MESSAGES, _completion())])[0] == before


def test_checkpoint_views_are_transformers_export_without_copies(embedded_models):
    """The shared-memory sync writes views of the trainer's own tensors; they must be exactly what
    transformers' revert_weight_conversion exports, and must not copy the experts."""
    model = AutoModelForCausalLM.from_pretrained(embedded_models["tiny-moe"], dtype=torch.float32)
    convention, why = views_match_checkpoint_format(model)
    assert convention == ("gate_proj", "up_proj", "down_proj"), why
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with checkpoint_views(model, convention) as views:
        assert len(views) == len(checkpoint_format_tensors(model))
        assert all(t.untyped_storage().data_ptr() in storages for _, t in views)
        layout, at = {}, 0
        for name, t in views:
            layout[name] = (at, tuple(t.shape))
            at += t.numel() * 2
        segment = SharedSegment(at)
        try:
            assert segment.write(views, layout, torch.bfloat16) == at
            again = torch.from_file(segment.path, shared=True, size=at, dtype=torch.uint8)  # as an engine maps it
            name, t = views[-1]
            offset, shape = layout[name]
            got = again[offset: offset + t.numel() * 2].view(torch.bfloat16).view(shape)
            assert torch.equal(got, t.to(torch.bfloat16))
        finally:
            segment.close()


def test_layout_makes_each_kernel_tensor_one_region():
    shapes = {"a.q.weight": (4, 3), "a.k.weight": (2, 3), "n.weight": (3,)}
    slots = [Slot("linear", "a.qkv", "weight", ["a.q.weight", "a.k.weight"], (6, 3)),
             Slot("copy", "n", "weight", ["n.weight"], (3,))]
    check_names(slots, shapes)
    layout = assign_offsets(slots, shapes, element_size=4)
    q, k = layout["tensors"]["a.q.weight"][0], layout["tensors"]["a.k.weight"][0]
    assert k == q + 4 * 3 * 4  # k's rows right after q's: the [6, 3] qkv weight is one region
    assert all(s.offset % 64 == 0 for s in slots) and layout["nbytes"] >= slots[-1].offset + 3 * 4
    with pytest.raises(Unsupported, match="no place"):
        check_names(slots, {**shapes, "extra.weight": (1,)})
    with pytest.raises(Unsupported, match="do not stack"):
        check_names(slots, {**shapes, "a.k.weight": (2, 5)})
    with pytest.raises(Unsupported, match="no checkpoint tensor"):
        check_names(slots, {k: v for k, v in shapes.items() if k != "n.weight"})


def test_first_sync_check_sees_a_tensor_the_loader_did_not_write():
    """The check compares a direct load with vLLM's reload of the same bytes. A loader that skips a tensor
    leaves whatever was there, often the right value already (the reload of the same weights, or a zero
    bias): only blanking the targets first makes the skip visible."""
    model = torch.nn.Module()
    model.norm, model.emb = torch.nn.LayerNorm(4), torch.nn.Embedding(3, 4)
    shapes = {"norm.weight": (4,), "norm.bias": (4,), "emb.weight": (3, 4)}
    slots = [Slot("copy", n.split(".")[0], n.split(".")[1], [n], shape) for n, shape in shapes.items()]
    layout = assign_offsets(slots, shapes, element_size=4)
    segment = SharedSegment(layout["nbytes"])
    try:
        g = torch.Generator().manual_seed(0)
        segment.write([(n, torch.randn(shape, generator=g)) for n, shape in shapes.items()], layout["tensors"],
                      torch.float32)
        load_slots(model, slots, segment.buffer, torch.float32)
        reference = fingerprint(model, slots)
        forgetful = [s for s in slots if s.attr != "bias"]
        load_slots(model, forgetful, segment.buffer, torch.float32)
        assert fingerprint_difference(reference, fingerprint(model, slots)) is None  # blind without blanking
        blank_slots(model, slots)
        load_slots(model, forgetful, segment.buffer, torch.float32)
        assert fingerprint_difference(reference, fingerprint(model, slots)) == "norm.bias"
        blank_slots(model, slots)
        load_slots(model, slots, segment.buffer, torch.float32)
        assert fingerprint_difference(reference, fingerprint(model, slots)) is None
    finally:
        segment.close()


@pytest.mark.slow
def test_shared_memory_and_object_store_syncs_serve_the_same_model(tiny_sync_pool, embedded_models):
    pool = tiny_sync_pool
    path = embedded_models["tiny-moe"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    item = [(MESSAGES, _completion())]
    old_hf = _hf_logprobs(model, tok, MESSAGES, item[0][1])
    _perturb(model, scale=0.2, seed=1)
    new_hf = _hf_logprobs(model, tok, MESSAGES, item[0][1])
    via_store = pool.sync_weights(model, transport="object_store")
    store_lps = ray.get([a.completion_logprobs.remote(item) for a in pool.actors])
    back = pool.sync_weights(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))  # back to old
    via_shared = pool.sync_weights(model)
    shared_lps = ray.get([a.completion_logprobs.remote(item) for a in pool.actors])
    assert [r["transport"] for r in (via_store, back, via_shared)] == ["object_store", "shared_memory", "shared_memory"]
    # the pool's first shared-memory sync compared the engines with vLLM's reload of the same weights; once only
    assert back["checked_against_reload"] and back["check_mismatch"] is None
    assert not via_shared["checked_against_reload"] and via_shared["check_mismatch"] is None
    for store, shared in zip(store_lps, shared_lps, strict=True):
        assert _mad(shared[0], new_hf) <= 1e-2 and _mad(shared[0], old_hf) > 0.05
        assert _mad(shared[0], store[0]) <= 1e-6  # the same weights in the same kernels


@pytest.mark.slow
def test_sync_falls_back_to_the_object_store_where_shared_memory_does_not_apply(
        tiny_sync_pool, embedded_models, monkeypatch, caplog):
    """When the no-copy export cannot be trusted (as for fused experts it does not know), the sync goes
    through the object store and the log says why; forcing shared memory then fails loudly, naming why."""
    path = embedded_models["tiny-moe"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with monkeypatch.context() as patch:
        patch.setattr(shared_memory, "views_match_checkpoint_format", lambda model: (None, "names differ (e.g. x)"))
        with caplog.at_level("INFO", logger="pipeline.engines.sync.shared_memory"):
            result = tiny_sync_pool.sync_weights(model)
        assert result["transport"] == "object_store" and "names differ" in caplog.text
    with pytest.raises(ValueError, match=r"sync_transport=shared_memory does not apply .*names differ"):
        tiny_sync_pool.sync_weights(model, transport="shared_memory")
    assert tiny_sync_pool.sync_weights(model)["transport"] == "object_store"  # the pool remembers the fallback
