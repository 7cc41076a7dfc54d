"""MoE training helpers (pipeline/training/moe.py, moe_trainer.py): dropout, router aux loss, expert load, expert LRs.

Models: the embedded random `tiny-moe` (Qwen2-MoE, our policy's architecture) and tiny random
HunYuan-MoE-V1 and Mixtral models built here, all on CPU in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HunYuanMoEV1Config,
    HunYuanMoEV1ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    TrainerCallback,
)

from pipeline.training.moe import (
    apply_moe_dropout,
    classify_param,
    lr_factor,
    moe_layout,
    moe_param_groups,
    routed_lr_scale,
    window_scheduler,
)
from pipeline.training.moe_config import LRWindow, MoETrainingConfig
from pipeline.training.moe_trainer import ExpertLoadCallback


def _tiny(arch: str, path=None):
    torch.manual_seed(0)
    if arch == "qwen2_moe":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    if arch == "hunyuan_v1_moe":
        return HunYuanMoEV1ForCausalLM(HunYuanMoEV1Config(head_dim=16, num_experts=4, moe_topk=1, **common))
    return MixtralForCausalLM(MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common))


ARCHS = ["qwen2_moe", "hunyuan_v1_moe", "mixtral"]


@pytest.fixture(scope="module")
def tiny_moe_path(embedded_models):
    return embedded_models["tiny-moe"]


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_dropout_active_in_train_mode_only(arch, tiny_moe_path):
    model = _tiny(arch, tiny_moe_path)
    ids = torch.randint(3, 200, (4, 48), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        reference = model(ids).logits
    cfg = MoETrainingConfig(attention_dropout=0.1, hidden_dropout=0.2)
    handle = apply_moe_dropout(model, cfg)
    layout = moe_layout(model)
    assert len(handle.hidden_sites) == 2 * len(layout.layers) > 0
    assert all(a.attention_dropout == 0.1 for a in layout.attentions)

    # Measure the drop rate where the hooks act: a hook registered after ours sees the dropped output.
    # Exact zeros are what dropout writes (the undropped activations of a random model are never 0.0).
    zeros, total = [0], [0]

    def count(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        zeros[0] += int((out == 0).sum())
        total[0] += out.numel()

    counters = [m.register_forward_hook(count) for m in handle.hidden_sites]
    # Attention dropout: eager attention returns the dropped probabilities; count zeros where the
    # causal mask allows attention (the masked upper triangle is zero anyway).
    model.train()
    with torch.no_grad():
        out1 = model(ids, output_attentions=True)
        out2 = model(ids).logits
    rate = zeros[0] / total[0]
    assert abs(rate - 0.2) < 0.015, rate
    allowed = torch.tril(torch.ones(48, 48, dtype=torch.bool))
    attn_zero = sum(float((a[..., allowed] == 0).float().mean()) for a in out1.attentions) / len(out1.attentions)
    assert abs(attn_zero - 0.1) < 0.02, attn_zero
    assert not torch.allclose(out1.logits, out2)  # two train-mode passes differ

    model.eval()
    zeros[0] = total[0] = 0
    with torch.no_grad():
        e1, e2 = model(ids).logits, model(ids).logits
    assert zeros[0] == 0
    assert torch.equal(e1, e2)
    assert torch.allclose(e1, reference, atol=1e-6)  # eval mode is the model without dropout

    for c in counters:
        c.remove()
    handle.remove()  # restores the model: no dropout left even in train mode
    model.train()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, model(ids).logits)
    assert all(a.attention_dropout == 0.0 for a in layout.attentions)


def test_param_groups_by_role_and_auto_lr_scale(tiny_moe_path):
    cfg = MoETrainingConfig()
    # The report's number: 16 routed experts, top-1 -> ~0.31 of the base LR.
    assert routed_lr_scale(cfg, 16, 1) == pytest.approx(0.31, abs=0.005)
    assert routed_lr_scale(MoETrainingConfig(routed_expert_lr_scale=0.5), 16, 1) == 0.5
    # Fewer experts per token share -> closer to 1; a top-k equal to n routes every token everywhere.
    assert routed_lr_scale(cfg, 8, 1) > routed_lr_scale(cfg, 16, 1)
    assert routed_lr_scale(cfg, 4, 4) == pytest.approx(1.0)

    for arch in ARCHS:
        model = _tiny(arch, tiny_moe_path)
        layout = moe_layout(model)
        scale = routed_lr_scale(cfg, layout.num_experts, layout.top_k)
        groups = moe_param_groups(model, 2e-5, 0.1, cfg)
        seen = {}
        params = dict(model.named_parameters())
        for g in groups:
            for name, p in zip(g["param_names"], g["params"], strict=True):
                assert name not in seen and p is params[name]
                seen[name] = g
        assert set(seen) == {n for n, _ in model.named_parameters()}  # every parameter exactly once
        for name, g in seen.items():
            if ".shared_expert" in name or ".shared_mlp." in name:
                want, lr = "shared_expert", 2e-5
            elif ".mlp.experts." in name:
                want, lr = "routed_expert", 2e-5 * scale
            else:  # attention, norms, embeddings, routers
                want, lr = "non_expert", 2e-5
            assert g["group"] == want, name
            assert g["lr"] == pytest.approx(lr), name
            decays = not (name.endswith("bias") or "norm" in name)
            assert g["weight_decay"] == (0.1 if decays else 0.0), name
        assert {g["group"] for g in groups} >= {"non_expert", "routed_expert"}
    assert classify_param("base_model.model.model.layers.3.mlp.shared_expert.up_proj.lora_A.default.weight") \
        == "shared_expert"
    assert classify_param("model.layers.0.mlp.gate.weight") == "non_expert"


def test_lr_window_schedule_is_continuous_across_phases():
    w = dict(kind="cosine", warmup_ratio=0.1, min_lr_rate=0.1)
    assert lr_factor(0.0, LRWindow(**w)) == 0.0
    assert lr_factor(0.1, LRWindow(**w)) == pytest.approx(1.0)
    assert lr_factor(1.0, LRWindow(**w)) == pytest.approx(0.1)  # 2e-5 -> 2e-6
    assert lr_factor(1.0, LRWindow(kind="linear", min_lr_rate=0.1)) == pytest.approx(0.1)
    # Two phases of 10 and 30 steps covering [0, 0.25) and [0.25, 1): the second starts where the first ends.
    param = torch.nn.Parameter(torch.zeros(1))
    lrs = []
    for start, end, steps in ((0.0, 0.25, 10), (0.25, 1.0, 30)):
        opt = torch.optim.SGD([param], lr=2e-5)
        sched = window_scheduler(opt, LRWindow(start=start, end=end, **w), steps)
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    boundary = lrs[10]  # end of phase 1
    assert boundary == pytest.approx(lrs[11])  # start of phase 2
    assert boundary == pytest.approx(2e-5 * lr_factor(0.25, LRWindow(**w)))
    assert lrs[-1] == pytest.approx(2e-6)


def _sft_trainer(path, tmp_path, *, coef=0.01, steps=3, lr=2e-5, window=None, moe=None, extra_callbacks=()):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from benchmarks.sft import python_doc_sft_records
    from pipeline.training.moe_trainer import moe_trainer_class
    from stages.sft import training_chat_template

    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = training_chat_template(tok)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = Dataset.from_list([{"messages": r["messages"]} for r in python_doc_sft_records(8, max_chars=300)])
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=2,
                     learning_rate=lr, lr_scheduler_type="cosine_with_min_lr",
                     lr_scheduler_kwargs={"min_lr_rate": 0.1}, logging_steps=1, bf16=False, use_cpu=True,
                     gradient_checkpointing=False, assistant_only_loss=True, max_length=96, report_to=[],
                     save_strategy="no", disable_tqdm=True, seed=0)
    moe = moe or MoETrainingConfig(router_aux_loss_coef=coef)
    cls = moe_trainer_class(SFTTrainer)
    return cls(model=model, args=args, train_dataset=ds, processing_class=tok, moe_config=moe, lr_window=window,
               callbacks=list(extra_callbacks))


class _RecordLR(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.steps.append([(g["group"], g["lr"]) for g in optimizer.param_groups])


def test_expert_lrs_hold_through_the_schedule(tiny_moe_path, tmp_path):
    rec = _RecordLR()
    trainer = _sft_trainer(tiny_moe_path, tmp_path, steps=4, lr=2e-5, extra_callbacks=[rec])
    routed_before = trainer.model.model.layers[0].mlp.experts.down_proj.detach().clone()
    trainer.train()
    layout = moe_layout(trainer.model)
    scale = routed_lr_scale(trainer.moe_config, layout.num_experts, layout.top_k)
    assert len(rec.steps) == 4
    for i, groups in enumerate(rec.steps):
        base = dict(groups)["non_expert"]
        # TRL/transformers' cosine_with_min_lr over 4 steps, no warmup: 2e-5 decaying toward 2e-6
        expected = 2e-5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 4)))
        assert base == pytest.approx(expected, rel=1e-6)
        for name, lr in groups:
            assert lr == pytest.approx(base * (scale if name == "routed_expert" else 1.0), rel=1e-6)
    final = {g["group"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert final["non_expert"] == pytest.approx(2e-6)
    assert final["routed_expert"] == pytest.approx(2e-6 * scale)
    # The routed experts are really in the optimizer: they moved.
    assert not torch.equal(routed_before, trainer.model.model.layers[0].mlp.experts.down_proj.detach())


def test_router_aux_loss_coefficient_changes_the_loss(tiny_moe_path, tmp_path):
    losses, aux = {}, {}
    for coef in (0.0, 0.5):
        trainer = _sft_trainer(tiny_moe_path, tmp_path, coef=coef)
        assert trainer.router_aux_loss_coef == coef  # TRL's wiring got our coefficient
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.eval()  # no dropout: the two coefficients see the same forward
        with torch.no_grad():
            losses[coef] = float(trainer.compute_loss(trainer.model, dict(batch)))
            out = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}, output_router_logits=True)
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        aux[coef] = float(load_balancing_loss_func(out.router_logits, trainer.model.config.num_experts,
                                                   trainer.model.config.num_experts_per_tok, batch["attention_mask"]))
    assert aux[0.0] == pytest.approx(aux[0.5])
    assert aux[0.5] > 0.9  # top-1 load-balancing loss is >= ~1
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * aux[0.5], rel=1e-4)


def test_aux_loss_and_expert_load_logged_during_training(tiny_moe_path, tmp_path):
    trainer = _sft_trainer(tiny_moe_path, tmp_path, steps=2, coef=0.01)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    layout = moe_layout(trainer.model)
    for h in logs:
        assert h["aux_loss"] > 0.9
        for layer in range(len(layout.layers)):
            load = [h[f"expert_load/layer_{layer:02d}/expert_{e:02d}"] for e in range(layout.num_experts)]
            assert sum(load) == pytest.approx(layout.top_k, abs=1e-5)  # fractions of tokens, top-1
            assert h[f"expert_load/layer_{layer:02d}/aux_loss"] >= 1.0 - 1e-5  # Switch loss >= 1
        assert h["expert_load/max_load_ratio"] >= 1.0


def test_expert_load_counts_the_routing_of_real_tokens(tiny_moe_path):
    """The callback's load equals the routers' top-k choices on non-padding tokens, per layer."""
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_path, dtype=torch.float32)
    cb = ExpertLoadCallback(model)
    ids = torch.randint(3, 1000, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # padding in the second row
    model.train()  # the callback counts training forwards only (no dropout applied to this model)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_logits=True)
    metrics = cb.pop_metrics()
    cb.detach()
    keep = mask.reshape(-1).bool()
    for layer, logits in enumerate(out.router_logits):
        chosen = logits.softmax(-1).topk(model.config.num_experts_per_tok, -1).indices[keep]
        counts = torch.bincount(chosen.reshape(-1), minlength=model.config.num_experts).float() / int(keep.sum())
        got = [metrics[f"expert_load/layer_{layer:02d}/expert_{e:02d}"] for e in range(model.config.num_experts)]
        assert got == pytest.approx(counts.tolist())
    model.eval()
    with torch.no_grad():
        model(ids)
    assert cb.pop_metrics() == {}  # detached and eval: nothing counted
