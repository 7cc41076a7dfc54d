"""Cluster configs (configs/cluster/*.yaml) and the MoE training helpers on the architectures they train.

The configs load through the loader `posttrain config show` uses: no model folder, GPU or network is
needed to validate them. The MoE checks build tiny random models from transformers' config classes of
each policy architecture (Qwen3-MoE, HunYuan-MoE-V1 with Hunyuan-A13B's per-layer top-k list, and the
embedded policy's Qwen2-MoE), on CPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import (
    HunYuanMoEV1Config,
    HunYuanMoEV1ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from pipeline.run.config import ConfigError, load_config
from pipeline.run.registry import DEFAULT_GRAPH
from pipeline.training.moe import (
    apply_moe_dropout,
    classify_param,
    moe_layout,
    moe_param_groups,
    routed_lr_scale,
    single_top_k,
)
from pipeline.training.moe_config import MoETrainingConfig

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "configs" / "cluster"

# What each file must resolve to. `arch` is the policy's architecture (its config.json `architectures`),
# `gpus` the cluster its header declares; `dpo_workers` the Ray Train FSDP2 workers of the dpo stage (1 GPU each),
# `scoring` (actors, GPUs per actor) of the reward model in both the reward and the dpo stage, `reward_gpus` the
# GPU of the reward model's training task.
EXPECTED = {
    "qwen-moe.yaml": dict(arch="Qwen3MoeForCausalLM", policy_tp=2, policy_workers=3, strategy="deepspeed_zero3",
                          sft_workers=16, gpus=16, dpo_workers=8, dpo_cpus=8, scoring=(4, 0.5), reward_gpus=1,
                          kl_samples=256),
    "hunyuan-a13b.yaml": dict(arch="HunYuanMoEV1ForCausalLM", policy_tp=4, policy_workers=4, strategy="fsdp",
                              sft_workers=32, gpus=32, dpo_workers=14, dpo_cpus=8, scoring=(4, 0.5), reward_gpus=1,
                              kl_samples=256),
}
FILES = sorted(EXPECTED)


def _load(name: str, overrides=()):
    return load_config(CLUSTER / name, list(overrides))


def _problems(path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value.problems


def _header(name: str) -> str:
    lines = (CLUSTER / name).read_text().splitlines()
    return "\n".join(line for line in lines[:next(i for i, s in enumerate(lines) if not s.startswith("#"))])


def test_every_cluster_config_is_covered():
    assert sorted(p.name for p in CLUSTER.glob("*.yaml")) == FILES


@pytest.mark.parametrize("name", FILES)
def test_cluster_config_resolves_to_a_multi_gpu_run(name):
    from stages.answer import check_routes

    want = EXPECTED[name]
    cfg = _load(name)
    assert cfg.graph == list(DEFAULT_GRAPH)  # the whole recipe, DPO included
    assert cfg.run_dir.is_absolute() and cfg.run_dir.parts[:3] == ("/", "mnt", "shared")

    policy = cfg.models["policy"]
    assert (policy.tensor_parallel_size, policy.num_workers) == (want["policy_tp"], want["policy_workers"])
    for role, pool in cfg.models.items():
        assert (pool.device, pool.dtype) == ("cuda", "bfloat16"), role
        assert pool.tensor_parallel_size > 1 and pool.num_workers >= 2, role  # TP groups, several engines
        # Folders on shared storage: posttrain never downloads at run time and takes no Hub ids.
        assert pool.model.startswith("/mnt/shared/models/"), role
    assert cfg.stage_config("seeds").tokenizer == policy.model
    for stage in ("generate", "evolve", "answer"):
        assert cfg.stage_config(stage).model == "policy"
    check_routes(cfg.stage_config("answer"), set(cfg.models))  # the answer stage's own early check
    assert set(cfg.stage_config("answer").routes.values()) - {"policy"}  # specialized answerers in use

    sft = cfg.stage_config("sft")
    assert sft.model_role == "policy" and sft.dtype == "bfloat16" and sft.lora is None
    dist = sft.distributed
    assert (dist.backend, dist.strategy, dist.use_gpu, dist.num_workers) == \
        ("ray", want["strategy"], True, want["sft_workers"])
    assert cfg.stage_config("reward").scoring.num_workers > 1


@pytest.mark.parametrize("name", FILES)
def test_cluster_config_trains_dpo_and_scores_rewards_on_gpus(name):
    want = EXPECTED[name]
    cfg = _load(name)
    dpo = cfg.stage_config("dpo")
    assert dpo.pool_role == "policy"
    assert (dpo.dtype, dpo.gradient_checkpointing, dpo.kl_samples, dpo.lora) == \
        ("bfloat16", True, want["kl_samples"], None)
    d = dpo.distributed
    assert (d.backend, d.strategy, d.use_gpu, d.num_workers, d.cpus_per_worker) == \
        ("ray", "fsdp2", True, want["dpo_workers"], want["dpo_cpus"])
    reward = cfg.stage_config("reward")
    assert (reward.num_gpus, reward.dtype) == (want["reward_gpus"], "bfloat16")
    for scoring in (dpo.reward, reward.scoring):
        assert (scoring.num_workers, scoring.num_gpus_per_worker, scoring.dtype) == (*want["scoring"], "bfloat16")


@pytest.mark.parametrize("name", FILES)
def test_cluster_config_is_larger_than_the_embedded_default(name):
    cfg, default = _load(name), load_config(REPO / "configs" / "default.yaml")

    def total_chunks(c):
        return sum(s.max_chunks or 0 for s in c.stage_config("seeds").sources)

    assert total_chunks(cfg) >= 100 * total_chunks(default)
    bigger = [("generate", "n_per_seed"), ("evolve", "rounds"), ("answer", "k"), ("answer", "max_tokens"),
              ("sft", "max_length"), ("sft", "heldout_max_records"), ("dpo", "rounds"),
              ("dpo", "prompts_per_round"), ("dpo", "samples_per_prompt"), ("dpo", "max_tokens")]
    for stage, field in bigger:
        assert getattr(cfg.stage_config(stage), field) > getattr(default.stage_config(stage), field), (stage, field)
    assert cfg.models["policy"].max_model_len > default.models["policy"].max_model_len
    assert cfg.shard_size > default.shard_size
    # The DPO rounds and held-out prompts must come from distinct prompts (the stage refuses reuse).
    dpo = cfg.stage_config("dpo")
    assert not dpo.reuse_prompts and dpo.rounds * dpo.prompts_per_round + dpo.eval_prompts < \
        cfg.stage_config("seeds").max_seeds


def _pack(items: list[float], nodes: int, per_node: int) -> bool:
    """First-fit decreasing: every item (GPUs that must share one node) placed on some node."""
    free = [float(per_node)] * nodes
    for size in sorted(items, reverse=True):
        slot = next((i for i, f in enumerate(free) if f >= size), None)
        if slot is None:
            return False
        free[slot] -= size
    return True


def _engine_groups(pool) -> list[int]:
    """GPUs of each engine of a pool (one TP group each, STRICT_PACKed on one node; a share of one GPU with
    ``gpus_per_engine`` at TP 1); none for a CPU pool."""
    size = pool.gpus_per_engine if pool.tensor_parallel_size == 1 else pool.tensor_parallel_size
    return [size] * pool.num_workers if pool.device != "cpu" else []


def _scoring_gpus(scoring) -> list[float]:
    """GPUs of each reward scoring actor, from the options ``RewardPool`` gives them."""
    from reward.score import actor_options

    return [actor_options(scoring)["num_gpus"]] * scoring.num_workers


def gpu_demand(cfg) -> dict[str, list[float]]:
    """GPUs each stage holds at once, per placement unit (an engine's TP group, a training worker, a scoring
    actor, the reward model's training task), by the rules the stages follow:

    - generate .. filter: every pool (roles configured alike share one, as ``pipeline.run.runner.PoolManager``
      does) stays up until sft releases the engines;
    - sft: one GPU per Ray Train worker;
    - reward: the training task (``stages.reward.train_task_options``, on a cluster with GPUs), then, once it
      has finished, the scoring actors of the held-out accuracy;
    - dpo: the engines of ``pool_role`` (and of ``judge_role``) + each Ray Train worker's GPU share + the scoring
      actors.

    The driver holds no GPU.
    """
    from stages.reward import train_task_options

    pools = {p.model_dump_json(): p for p in cfg.models.values()}
    sft, reward, dpo = cfg.stage_config("sft").distributed, cfg.stage_config("reward"), cfg.stage_config("dpo")
    engines = _engine_groups(cfg.models[dpo.pool_role])
    if dpo.judge_role:
        engines += _engine_groups(cfg.models[dpo.judge_role])
    d = dpo.distributed
    trainers = [d.gpus_per_worker] * d.num_workers if d.use_gpu is not False else []
    return {
        "filter": [g for p in pools.values() for g in _engine_groups(p)],
        "sft": [1] * sft.num_workers if sft.use_gpu is not False and sft.num_workers != "auto" else [],
        "reward_train": [train_task_options(reward, cluster_gpus=True, env={})["num_gpus"]],
        "reward_scoring": _scoring_gpus(reward.scoring),
        "dpo": engines + trainers + _scoring_gpus(dpo.reward),
    }


def over_the_cluster(cfg, gpus: int) -> list[str]:
    """The stages whose GPUs (``gpu_demand``) exceed the cluster's ``gpus``, with their counts."""
    return [f"{stage}: {sum(units):g} GPUs > {gpus}" for stage, units in gpu_demand(cfg).items() if sum(units) > gpus]


@pytest.mark.parametrize("name", FILES)
def test_cluster_config_fits_the_cluster_its_header_declares(name):
    want = EXPECTED[name]
    cfg = _load(name)
    header = _header(name)
    nodes, per_node = map(int, re.search(r"(\d+) nodes x (\d+) GPUs", header).groups())
    assert nodes * per_node == want["gpus"]

    demand = gpu_demand(cfg)
    assert over_the_cluster(cfg, want["gpus"]) == []
    for stage, units in demand.items():
        assert _pack(units, nodes, per_node), stage
    pools = {p.model_dump_json(): p for p in cfg.models.values()}
    assert len(pools) < len(cfg.models)  # instruct and critic share one pool
    # dpo uses the whole cluster: policy engines + FSDP2 workers + scoring actors.
    policy = cfg.models["policy"]
    engines = policy.num_workers * policy.tensor_parallel_size
    scoring = want["scoring"][0] * want["scoring"][1]
    assert sum(demand["dpo"]) == engines + want["dpo_workers"] + scoring == want["gpus"]
    assert demand["reward_train"] == [want["reward_gpus"]]
    assert demand["reward_scoring"] == [want["scoring"][1]] * want["scoring"][0]
    assert demand["sft"] == [1] * want["sft_workers"]

    # The header's per-stage resource lines say what the values say.
    assert f"{policy.num_workers} engines x TP {policy.tensor_parallel_size} = {engines} GPUs" in header
    assert f"{want['sft_workers']} workers x (1 GPU + {cfg.stage_config('sft').distributed.cpus_per_worker:g} CPUs)" \
        in header
    assert f"{sum(demand['filter'])} GPUs held" in header
    assert f"a Ray task with {want['reward_gpus']} GPU trains" in header
    assert f"policy pool again ({engines} GPUs, SFT weights synced in) + Ray Train: {want['dpo_workers']} FSDP2 " \
           f"workers x (1 GPU + {want['dpo_cpus']:g} CPUs)" in header
    n, g = want["scoring"]
    assert header.count(f"{n} scoring actors x {g:g} GPU ({scoring:g} GPUs)") == 2  # reward and dpo
    assert f"({scoring:g} GPUs) = {want['gpus']} GPUs" in header
    assert want["arch"].removesuffix("ForCausalLM") in header
    # Nothing needs a GPU in the driver any more, and dpo runs.
    assert "--entrypoint-num-gpus" not in header and "driver GPU" not in header
    assert "stop after the reward model" not in header and "graph=[" not in header


@pytest.mark.parametrize("override,stage", [
    ("stages.dpo.distributed.num_workers=9", "dpo"),
    ("stages.dpo.reward.num_gpus_per_worker=1", "dpo"),
    ("models.policy.num_workers=4", "dpo"),
    ("stages.reward.scoring.num_workers=40", "reward_scoring"),
    ("stages.sft.distributed.num_workers=17", "sft"),
])
def test_a_config_over_the_cluster_is_caught(override, stage):
    """The computation the fit test relies on does fail: one setting raised past the 16 GPUs of qwen-moe."""
    cfg = _load("qwen-moe.yaml", [override])
    [problem] = over_the_cluster(cfg, EXPECTED["qwen-moe.yaml"]["gpus"])
    assert problem.startswith(f"{stage}: ")


def test_shared_gpus_count_as_their_share():
    """Colocation: 16 DPO workers are over qwen-moe's 16 GPUs with a whole GPU each, and fit at half a GPU each
    (gpus_per_worker), as Ray places them."""
    workers = "stages.dpo.distributed.num_workers=16"
    assert over_the_cluster(_load("qwen-moe.yaml", [workers]), 16) != []
    cfg = _load("qwen-moe.yaml", [workers, "stages.dpo.distributed.gpus_per_worker=0.5"])
    base = _load("qwen-moe.yaml")  # 8 workers of one GPU each
    assert over_the_cluster(cfg, 16) == [] and sum(gpu_demand(cfg)["dpo"]) == sum(gpu_demand(base)["dpo"]) == 16


@pytest.mark.parametrize("name", [n for n in FILES if EXPECTED[n]["strategy"] == "fsdp"])
def test_fsdp_wraps_the_policy_decoder_layer(name):
    dist = _load(name).stage_config("sft").distributed
    assert dist.fsdp_config["version"] == 2 and dist.fsdp_config["state_dict_type"] == "FULL_STATE_DICT"
    # A class name that is not the policy's decoder layer would silently wrap nothing.
    wrap = dist.fsdp_config["transformer_layer_cls_to_wrap"]
    assert wrap and set(wrap) <= set(getattr(transformers, EXPECTED[name]["arch"])._no_split_modules)


def test_config_show_prints_a_cluster_config():
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["config", "show", str(CLUSTER / "qwen-moe.yaml")])
    assert result.exit_code == 0, result.output
    assert "strategy: deepspeed_zero3" in result.output and "tensor_parallel_size: 4" in result.output


# -- broken variants: one error naming the field path ---------------------------------------------

BROKEN = [
    ("stages.sft.distributed.stratgy=fsdp", "stages.sft.distributed.stratgy: unknown field 'stratgy'"),
    ("models.policy.tensor_parallel_size=0",
     "models.policy.tensor_parallel_size: Input should be greater than or equal to 1"),
    ("stages.sft.distributed.strategy=zero4",
     "stages.sft.distributed.strategy: Input should be 'ddp', 'fsdp' or 'deepspeed_zero3'"),
    ("models.critic.device=tpu", "models.critic.device: Input should be 'auto', 'cpu' or 'cuda'"),
    ("stages.dpo.pool_role=polcy", "stages.dpo.pool_role: model role 'polcy' is not defined"),
]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("override,message", BROKEN, ids=[b[0].split("=")[0] for b in BROKEN])
def test_broken_variant_names_the_field(name, override, message):
    [problem] = _problems(CLUSTER / name, [override])
    assert problem.startswith(f"--set {override}: {message}"), problem


def test_zero_sft_workers_is_refused():
    [problem] = _problems(CLUSTER / "qwen-moe.yaml", ["stages.sft.distributed.num_workers=0"])
    assert "stages.sft.distributed.num_workers" in problem


@pytest.mark.parametrize("name", FILES)
def test_typo_in_the_file_names_the_file_and_field(name, tmp_path):
    text = (CLUSTER / name).read_text()
    assert text.count("    tensor_parallel_size: ") >= 2
    broken = tmp_path / name
    broken.write_text(text.replace("    tensor_parallel_size: ", "    tensor_paralel_size: ", 1))
    [problem] = _problems(broken)
    assert problem.startswith(f"{broken}: models.policy.tensor_paralel_size: unknown field 'tensor_paralel_size'")
    assert "tensor_parallel_size" in problem.split("allowed fields:")[1]


# -- the MoE training helpers on each policy architecture ------------------------------------------

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, attn_implementation="eager")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one torch thread. On a busy 2-core machine, torch's threads spin waiting for each other
    and a forward of these models took ~0.7 s instead of ~5 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(arch: str, **over) -> torch.nn.Module:
    """A random model of ``arch`` shaped like the real one (shared expert or not, top-k > 1)."""
    torch.manual_seed(0)
    if arch == "Qwen3MoeForCausalLM":  # Qwen3-30B-A3B: 128 routed experts top-8, no shared expert
        cfg = Qwen3MoeConfig(head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                             **{**_COMMON, **over})
        return Qwen3MoeForCausalLM(cfg)
    if arch == "HunYuanMoEV1ForCausalLM":  # Hunyuan-A13B: 1 shared + 64 routed, top-8 given per layer
        over = {"moe_topk": [2, 2], **over}
        return HunYuanMoEV1ForCausalLM(HunYuanMoEV1Config(head_dim=16, num_experts=8, **{**_COMMON, **over}))
    if arch == "Qwen2MoeForCausalLM":  # the embedded policy: shared expert + routed experts
        cfg = Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8,
                             num_experts_per_tok=2, **{**_COMMON, **over})
        return Qwen2MoeForCausalLM(cfg)
    raise KeyError(arch)


ARCHS = ["Qwen3MoeForCausalLM", "HunYuanMoEV1ForCausalLM", "Qwen2MoeForCausalLM"]
HAS_SHARED_EXPERT = {"Qwen3MoeForCausalLM": False, "HunYuanMoEV1ForCausalLM": True, "Qwen2MoeForCausalLM": True}


def test_every_config_architecture_is_tested_and_implemented():
    for want in EXPECTED.values():
        assert want["arch"] in ARCHS
        assert hasattr(transformers, want["arch"])
    vllm = pytest.importorskip("vllm")
    supported = set(vllm.ModelRegistry.get_supported_archs())
    assert {w["arch"] for w in EXPECTED.values()} <= supported


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_and_parameter_groups(arch):
    model = _tiny(arch)
    assert type(model).__name__ == arch
    layout = moe_layout(model)
    assert len(layout.layers) == len(layout.attentions) == len(layout.mlps) == 2
    assert [i for i, _ in layout.routers] == [0, 1]
    assert (layout.num_experts, layout.top_k) == (8, 2)

    groups: dict[str, list[str]] = {"non_expert": [], "shared_expert": [], "routed_expert": []}
    for name, _ in model.named_parameters():
        groups[classify_param(name)].append(name)
    assert groups["routed_expert"] and all(".mlp.experts." in n for n in groups["routed_expert"])
    assert bool(groups["shared_expert"]) == HAS_SHARED_EXPERT[arch]
    assert any(n.startswith("model.layers.0.self_attn.") for n in groups["non_expert"])
    routers = [r for _, r in layout.routers]
    router_params = {f"{prefix}.{n}" for prefix, m in model.named_modules() if any(m is r for r in routers)
                     for n, _ in m.named_parameters()}
    assert router_params and router_params <= set(groups["non_expert"])  # routers see every token

    cfg = MoETrainingConfig()
    scale = routed_lr_scale(cfg, 8, 2)
    assert 0 < scale < 1
    lrs = {g["group"]: g["lr"] for g in moe_param_groups(model, 2e-5, 0.0, cfg)}
    assert lrs["routed_expert"] == pytest.approx(2e-5 * scale) and lrs["non_expert"] == 2e-5
    assert ("shared_expert" in lrs) == HAS_SHARED_EXPERT[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_dropout_acts_in_train_mode_only(arch):
    model = _tiny(arch)
    ids = torch.randint(3, 250, (2, 32), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        reference = model(ids).logits
    handle = apply_moe_dropout(model, MoETrainingConfig(attention_dropout=0.1, hidden_dropout=0.2))
    layout = moe_layout(model)
    assert len(handle.handles) == len(handle.hidden_sites) == 2 * len(layout.layers)
    assert all(a.attention_dropout == 0.1 for a in layout.attentions)

    zeros, total = [0], [0]

    def count(module, args, output):  # registered after the dropout hooks: sees the dropped output
        out = output[0] if isinstance(output, tuple) else output
        zeros[0] += int((out == 0).sum())
        total[0] += out.numel()

    counters = [m.register_forward_hook(count) for m in handle.hidden_sites]
    model.train()
    with torch.no_grad():
        t1, t2 = model(ids).logits, model(ids).logits
    assert not torch.allclose(t1, t2) and not torch.allclose(t1, reference)
    assert abs(zeros[0] / total[0] - 0.2) < 0.015, zeros[0] / total[0]

    model.eval()
    zeros[0] = total[0] = 0
    with torch.no_grad():
        e1, e2 = model(ids).logits, model(ids).logits
    assert zeros[0] == 0 and torch.equal(e1, e2)
    assert torch.allclose(e1, reference, atol=1e-6)
    for c in counters:
        c.remove()
    handle.remove()
    assert all(a.attention_dropout == 0.0 for a in layout.attentions)


@pytest.mark.parametrize("arch", ARCHS)
def test_router_aux_loss_inputs_are_usable(arch):
    """TRL computes the router aux loss from the router logits with config.num_experts_per_tok (Mixtral's
    load_balancing_loss_func); the MoE trainers call single_top_k first so that HunYuan's per-layer list works."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = _tiny(arch).eval()
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == 2
    cfg = model.config
    if arch == "HunYuanMoEV1ForCausalLM":
        with pytest.raises(TypeError):  # what TRL hit before single_top_k
            load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, None)
    single_top_k(model)
    assert cfg.num_experts_per_tok == 2
    aux = load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, None)
    assert torch.isfinite(aux) and float(aux) > 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out.logits)  # routing unchanged


def test_per_layer_top_k_that_differs_is_refused_only_with_aux_loss():
    model = _tiny("HunYuanMoEV1ForCausalLM", moe_topk=[2, 1])
    with pytest.raises(ValueError, match="router_aux_loss_coef: 0"):
        single_top_k(model)
    single_top_k(model, aux_loss=False)
    assert model.config.moe_topk == [2, 1]


def test_moe_trainers_store_a_single_top_k_before_training():
    """The SFT and DPO trainers (MoETrainerMixin over a TRL trainer) fix HunYuan's per-layer top-k list at
    construction; a stand-in base trainer keeps this free of TRL's dataset preparation."""
    from types import SimpleNamespace

    from pipeline.training.moe_trainer import moe_trainer_class

    class BaseTrainer:
        def __init__(self, model=None, args=None):
            self.model, self.args = model, args

        def add_callback(self, callback):
            self.callback = callback

    model = _tiny("HunYuanMoEV1ForCausalLM")
    assert model.config.num_experts_per_tok == [2, 2]
    trainer = moe_trainer_class(BaseTrainer)(model=model, args=SimpleNamespace(),
                                             moe_config=MoETrainingConfig(router_aux_loss_coef=0.01))
    assert model.config.num_experts_per_tok == 2 and trainer.args.router_aux_loss_coef == 0.01
    assert [layer.mlp.gate.top_k for layer in model.model.layers] == [2, 2]
    assert len(trainer.moe_dropout.handles) == 4  # dropout hooks attached by the same constructor
