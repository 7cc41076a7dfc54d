"""SFT stage (stages/sft/): assistant-only loss, packing, coarse-to-fine phases, resume, LoRA, the
Ray Train path through the real runner, and a result that vLLM serves. The SIGKILL of a run inside a phase
is tests/test_sft_kill.py.

All training uses the embedded random `tiny-moe` (Qwen2-MoE, the policy's architecture) for a few
steps on SFT records built from CPython's documentation topics (``benchmarks.sft``).
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.sft import python_doc_sft_records
from pipeline.run.stage import Stage
from pipeline.training.moe import routed_lr_scale
from pipeline.training.moe_config import MoETrainingConfig
from stages.sft import (
    STAGE,
    SFTDataError,
    SFTStageConfig,
    check_records,
    lr_windows,
    make_sft_trainer,
    split_heldout,
    train_sft,
    training_chat_template,
)
from stages.sft.trainer import training_args
from stages.sft.worker import last_checkpoint
from tests.tensorboard_events import scalars


def _multi_turn(records):
    """Two-turn conversations (with a system turn) from pairs of single-turn records."""
    out = []
    for a, b in zip(records[::2], records[1::2], strict=False):
        out.append({**a, "messages": [{"role": "system", "content": "Answer from the Python reference."},
                                      *a["messages"], *b["messages"]]})
    return out


def _labels_text(tok, example) -> tuple[list[int], list[int]]:
    ids, labels = example["input_ids"], example["labels"]
    return [t for t, lab in zip(ids, labels, strict=True) if lab != -100], \
        [t for t, lab in zip(ids, labels, strict=True) if lab == -100]


def test_assistant_only_labels_and_template(embedded_models, tmp_path):
    path = embedded_models["tiny-moe"]
    tok = AutoTokenizer.from_pretrained(path)
    original = tok.chat_template
    template = training_chat_template(tok)
    assert "{% generation %}" in template and "{% generation %}" not in original
    records = _multi_turn(python_doc_sft_records(6, max_chars=200)) + python_doc_sft_records(2, max_chars=200)
    for r in records:  # the training copy renders exactly what the model's own template renders
        for gen_prompt, msgs in ((False, r["messages"]), (True, r["messages"][:-1])):
            assert tok.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                           add_generation_prompt=gen_prompt) == \
                tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
    tok.chat_template = template
    cfg = SFTStageConfig(model=str(path), max_length=512)
    args = training_args(cfg, {"use_gpu": False, "world_size": 1}, tmp_path, False, 1, 0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = make_sft_trainer(model, tok, records, cfg, args, None)
    ds = trainer.train_dataset
    assert len(ds) == len(records)
    for example, rec in zip(ds, records, strict=True):
        labeled, unlabeled = _labels_text(tok, example)
        # Exactly the assistant turns' content and their end-of-turn token carry labels...
        want = "".join(m["content"] + "<|im_end|>" for m in rec["messages"] if m["role"] == "assistant")
        assert tok.decode(labeled) == want
        # ...and no user/system text does.
        text = tok.decode(unlabeled)
        for m in rec["messages"]:
            if m["role"] != "assistant":
                assert m["content"] in text
        assert "<|im_start|>assistant\n" in text  # the role header is prompt, not target


def test_unmarkable_template_and_bad_records_fail_clearly(embedded_models):
    tok = AutoTokenizer.from_pretrained(embedded_models["tiny-moe"])
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="chat_template_path"):
        training_chat_template(tok)
    recs = python_doc_sft_records(3)
    bad = dict(recs[1])
    bad.pop("tier")
    with pytest.raises(SFTDataError, match=f"sft record {bad['id']}: field `tier`"):
        check_records([recs[0], bad])
    no_answer = {**recs[2], "messages": recs[2]["messages"][:1]}
    with pytest.raises(SFTDataError, match="no assistant turn"):
        check_records([no_answer])


def test_heldout_split_is_stable_and_disjoint():
    recs = python_doc_sft_records(40)
    train, held = split_heldout(recs, 0.1, 64, seed=3)
    assert len(held) == 4 and len(train) == 36
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    assert {r["id"] for r in split_heldout(list(reversed(recs)), 0.1, 64, seed=3)[1]} == {r["id"] for r in held}
    assert {r["id"] for r in split_heldout(recs, 0.1, 64, seed=4)[1]} != {r["id"] for r in held}
    assert len(split_heldout(recs, 0.5, 5, seed=3)[1]) == 5  # capped


def test_lr_windows_split_one_schedule_by_work():
    cfg = SFTStageConfig(learning_rate=2e-5, min_learning_rate=2e-6, lr_scheduler="linear", warmup_ratio=0.1)
    windows = lr_windows([30.0, 10.0], cfg)  # phase 1 does 3x the work of phase 2
    assert [(w.start, w.end) for w in windows] == [(0.0, 0.75), (0.75, 1.0)]
    assert all(w.kind == "linear" and w.warmup_ratio == 0.1 and w.min_lr_rate == pytest.approx(0.1) for w in windows)
    assert [(w.start, w.end) for w in lr_windows([0.0, 0.0], cfg)] == [(0.0, 0.0), (0.0, 0.0)]


def test_resume_skips_a_checkpoint_a_kill_cut_short(tmp_path):
    """The Trainer writes trainer_state.json last: a newer checkpoint without it was being written when the run
    was killed, so the resume uses the last complete one (ordered by step, not by name)."""
    assert last_checkpoint(tmp_path / "missing") is None
    for step, complete in ((3, True), (12, True), (15, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-12")


def test_packing_packs_rows_and_keeps_assistant_labels(embedded_models, tmp_path):
    path = embedded_models["tiny-moe"]
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = training_chat_template(tok)
    records = python_doc_sft_records(12, max_chars=150)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    labeled = {}
    for packing in (False, True):
        cfg = SFTStageConfig(model=str(path), max_length=256, packing=packing)
        args = training_args(cfg, {"use_gpu": False, "world_size": 1}, tmp_path, False, 1, 0)
        ds = make_sft_trainer(model, tok, records, cfg, args, None).train_dataset
        labeled[packing] = sum(sum(1 for t in ex["labels"] if t != -100) for ex in ds)
        if packing:
            assert len(ds) < len(records)
            assert all(len(ex["input_ids"]) <= 256 for ex in ds)
            assert "seq_lengths" in ds.column_names or "position_ids" in ds.column_names
    assert labeled[True] == labeled[False] > 0


def _flat(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_coarse_to_fine_phases_resume_and_vllm_serves_the_result(embedded_models, ray_session, tmp_path):
    from pipeline.engines.pool import ChatRequest, PoolConfig, WorkerPool

    path = embedded_models["tiny-moe"]
    records = python_doc_sft_records(40, max_chars=300)
    cfg = SFTStageConfig(
        model=str(path), phases=[{"tiers": [1, 2, 3, 4], "epochs": 1}, {"tiers": [3, 4], "epochs": 1}],
        learning_rate=1e-3, min_learning_rate=1e-4, warmup_ratio=0.0, per_device_train_batch_size=4,
        max_length=128, heldout_fraction=0.1, logging_steps=1, distributed={"backend": "local"})
    out, work = tmp_path / "model", tmp_path / "work"
    rows: list[dict] = []
    m = train_sft(records, cfg, out, work, seed=0, log_metrics=rows.append)

    train, held = split_heldout(records, 0.1, 64, 0)
    p0, p1 = m["phases"]
    assert (m["train_records"], m["heldout_records"]) == (36, 4)
    assert p0["records"] == 36 and p1["records"] == sum(r["tier"] in (3, 4) for r in train)
    assert p1["started_from"] == str(work / "phases" / "0" / "model")  # phase 2 continues from phase 1
    shape = json.loads((path / "config.json").read_text())
    assert p0["routed_expert_lr_scale"] == pytest.approx(
        routed_lr_scale(MoETrainingConfig(), shape["num_experts"], shape["num_experts_per_tok"]))
    assert m["heldout_nll_after"] < m["heldout_nll_before"] - 0.1
    assert m["train_tokens"] > 0 and m["train_tokens_per_s"] > 0

    steps = [r for r in rows if "loss" in r and "learning_rate" in r]
    first = {ph: next(r for r in steps if r["phase"] == ph) for ph in (0, 1)}
    last0 = [r for r in steps if r["phase"] == 0][-1]
    # Continuation, not a restart: phase 2 starts at the loss phase 1 reached and at phase 1's last LR.
    assert first[1]["loss"] < first[0]["loss"] - 0.2
    assert first[1]["learning_rate"] <= last0["learning_rate"]
    assert steps[-1]["learning_rate"] < 0.5 * steps[0]["learning_rate"]
    assert all("aux_loss" in r and "expert_load/layer_00/expert_00" in r for r in steps)

    # The result is a plain model folder: original chat template, no training-only settings.
    saved_cfg = json.loads((out / "config.json").read_text())
    assert saved_cfg["attention_dropout"] == 0.0 and saved_cfg["output_router_logits"] is False
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(path).chat_template
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tw, bw = _flat(trained), _flat(base)
    assert not torch.equal(tw["model.layers.0.mlp.experts.down_proj"], bw["model.layers.0.mlp.experts.down_proj"])

    # vLLM serves the folder: an engine started on it gives transformers' logprobs of the trained model
    # for a fixed completion (and not the base model's).
    messages = held[0]["messages"][:1]
    completion = held[0]["messages"][1]["content"][:200]

    def hf_logprobs(model):
        p = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        p = list(p["input_ids"] if hasattr(p, "keys") else p)
        c = tok(completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = model(torch.tensor([p + c])).logits[0].float().log_softmax(-1)
        return torch.stack([lp[len(p) + i - 1, t] for i, t in enumerate(c)])

    with WorkerPool(PoolConfig(model=str(out), num_workers=1, kv_cache_gib=1, max_model_len=512)) as pool:
        served = torch.tensor(pool.completion_logprobs([(messages, completion)])[0])
        reply = pool.generate([ChatRequest(messages=messages, max_tokens=8, temperature=0.0)])[0]
    assert (served - hf_logprobs(trained)).abs().mean() < 1e-2
    assert (served - hf_logprobs(base)).abs().mean() > 0.05
    assert reply.completions[0].token_ids  # and generates from it

    # Rerun with the same inputs: nothing is retrained.
    rerun_rows: list[dict] = []
    again = train_sft(records, cfg, out, work, seed=0, log_metrics=rerun_rows.append)
    assert rerun_rows == []
    assert again["phases"] == m["phases"] and again["heldout_nll_after"] == m["heldout_nll_after"]
    # A run killed during phase 2 (its folder gone) continues there; phase 1 is not redone.
    done0 = (work / "phases" / "0" / "done.json").stat().st_mtime_ns
    shutil.rmtree(work / "phases" / "1")
    resumed_rows: list[dict] = []
    resumed = train_sft(records, cfg, out, work, seed=0, log_metrics=resumed_rows.append)
    assert (work / "phases" / "0" / "done.json").stat().st_mtime_ns == done0
    assert {r["phase"] for r in resumed_rows} == {1}
    assert resumed["phases"][0] == m["phases"][0]
    assert resumed["heldout_nll_before"] == m["heldout_nll_before"]
    assert resumed["phases"][1]["steps"] == m["phases"][1]["steps"]


@pytest.mark.slow
def test_lora_option_merges_into_a_plain_folder(embedded_models, tmp_path):
    path = embedded_models["tiny-moe"]
    cfg = SFTStageConfig(model=str(path), phases=[{"tiers": [1, 2, 3, 4], "epochs": 1}], learning_rate=1e-2,
                         lora={"r": 4, "alpha": 8, "dropout": 0.0}, max_steps_per_phase=2, max_length=96,
                         heldout_fraction=0.0, distributed={"backend": "local"})
    out = tmp_path / "model"
    m = train_sft(python_doc_sft_records(8, max_chars=200), cfg, out, tmp_path / "work")
    assert m["phases"][0]["steps"] == 2
    assert not (out / "adapter_config.json").exists()
    trained = _flat(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    base = _flat(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    assert set(trained) == set(base)
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    # "all-linear" adapters leave the fused routed experts frozen.
    assert torch.equal(trained["model.layers.0.mlp.experts.down_proj"], base["model.layers.0.mlp.experts.down_proj"])


# -- the stage through the real runner, on the Ray Train path ------------------------------------------

def _run_docs_sft(ctx) -> None:
    ctx.write("sft", python_doc_sft_records(16, max_chars=200))


class _SourceConfig(BaseModel):
    """Test stage that writes an `sft` dataset from CPython's documentation (no settings)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


SFT_SOURCE = Stage(name="sft_source", inputs=(), outputs=("sft",), config_cls=_SourceConfig, run=_run_docs_sft)


@pytest.mark.slow
def test_stage_runs_as_ray_train_job_through_the_runner(ray_session, embedded_models, tmp_path):
    from pipeline.run.config import load_config
    from pipeline.run.runner import run_graph

    assert (STAGE.name, STAGE.inputs, STAGE.outputs, STAGE.config_cls) == ("sft", ("sft",), ("sft_model",),
                                                                          SFTStageConfig)
    defaults = SFTStageConfig()  # the recipe's numbers are the defaults
    assert sum(p.epochs for p in defaults.phases) == 3
    assert (defaults.learning_rate, defaults.min_learning_rate) == (2e-5, 2e-6)
    assert (defaults.moe.attention_dropout, defaults.moe.hidden_dropout) == (0.1, 0.2)
    assert defaults.distributed.backend == "ray" and defaults.lora is None

    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(textwrap.dedent(f"""\
        run_dir: {tmp_path / 'run'}
        seed: 1
        plugins: ["tests.test_sft:SFT_SOURCE"]
        graph: [sft_source, sft]
        models:
          policy: {{model: tiny-moe}}
        stages:
          sft:
            phases: [{{tiers: [1, 2, 3, 4], epochs: 1}}]
            max_steps_per_phase: 2
            max_length: 96
            logging_steps: 1
            heldout_fraction: 0.25
            distributed: {{backend: ray, torch_threads: 2}}
    """))
    run_graph(load_config(cfg_path), quiet=True)
    run = tmp_path / "run"
    manifest = json.loads((run / "stages" / "sft" / "manifest.json").read_text())
    assert manifest["state"] == "done"
    metrics = manifest["metrics"]
    assert metrics["workers"] == 1 and metrics["use_gpu"] is False
    assert metrics["phases"][0]["steps"] == 2 and metrics["phases"][0]["torch_threads"] == 2
    if os.geteuid() == 0:  # allowed to undo Ray's nice 15 for the training worker (distributed.worker_nice: 0)
        assert metrics["phases"][0]["nice"] == 0
    # the worker trains in a thread: one malloc arena keeps its buffers on the heap
    # (pipeline.training.ray_train.cpu_worker_env)
    assert metrics["phases"][0]["malloc_arena_max"] == os.environ.get("MALLOC_ARENA_MAX", "1")
    # The phase's trainer reported to the run's TensorBoard (RunConfig.tracking's default): a loss per step.
    losses = scalars(run / "tracking" / "sft" / "phase_0")["train/loss"]
    assert [step for step, _ in losses] == [1, 2] and all(v > 0 for _, v in losses)
    check = metrics["phases"][0]["dropout_loss_check"]  # the recipe's dropout (default) is checked on batch 1
    assert check["train_loss"] != check["eval_loss"]
    assert metrics["heldout_records"] == 4 and metrics["heldout_nll_before"] is not None
    series = [json.loads(line) for line in (run / "stages" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in series if "loss" in r] == [1, 2]
    model = AutoModelForCausalLM.from_pretrained(run / "models" / "sft_model", dtype=torch.float32)
    assert model.config.architectures == ["Qwen2MoeForCausalLM"]


@pytest.mark.slow
def test_ray_train_job_names_the_workers_error(ray_session, embedded_models, tmp_path):
    """An error raised in the Ray Train worker (here: a chat template file without generation markers, which only
    the worker reads) comes back with the worker's exception type and message, not Ray Train's wrapper."""
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    cfg = SFTStageConfig(model=str(embedded_models["tiny-moe"]), phases=[{"tiers": [1, 2, 3, 4], "epochs": 1}],
                         max_steps_per_phase=1, max_length=96, heldout_fraction=0.0,
                         chat_template_path=str(template), distributed={"backend": "ray"})
    with pytest.raises(RuntimeError, match=r"^sft Ray Train job failed: ValueError: .*plain\.jinja has no "
                                           r"\{% generation %\} markers"):
        train_sft(python_doc_sft_records(4, max_chars=200), cfg, tmp_path / "model", tmp_path / "work")
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_dropout_check_flags_dropout_the_model_was_not_trained_with(embedded_models, tmp_path, caplog):
    """The embedded policy was pretrained without dropout: the recipe's hidden dropout 0.2 wrecks its training-mode
    loss, and the stage says so (naming the field); attention dropout alone does not. The RNG stream is untouched."""
    from trl import SFTConfig

    from stages.sft.measures import dropout_check

    path = embedded_models["smollm2-moe"]
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = training_chat_template(tok)
    records = python_doc_sft_records(4, max_chars=300)
    checks = {}
    for hidden in (0.2, 0.0):
        cfg = SFTStageConfig(model=str(path), max_length=96, per_device_train_batch_size=2,
                             moe=MoETrainingConfig(hidden_dropout=hidden, attention_dropout=0.1))
        args = SFTConfig(output_dir=str(tmp_path / f"out{hidden}"), per_device_train_batch_size=2, max_length=96,
                         assistant_only_loss=True, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                         disable_tqdm=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer = make_sft_trainer(model, tok, records, cfg, args, None)
        rng, mode = torch.get_rng_state(), trainer.model.training
        with caplog.at_level("WARNING", logger="stages.sft"):
            caplog.clear()
            checks[hidden] = dropout_check(trainer, cfg, seed=0)
            warned = [r.getMessage() for r in caplog.records if "hidden_dropout" in r.getMessage()]
        assert torch.equal(torch.get_rng_state(), rng)
        assert trainer.model.training == mode
        assert checks[hidden]["warned"] == bool(warned)
    assert checks[0.2]["train_loss"] > checks[0.2]["eval_loss"] + 3 and checks[0.2]["warned"]
    assert abs(checks[0.0]["train_loss"] - checks[0.0]["eval_loss"]) < 0.5 and not checks[0.0]["warned"]
    assert checks[0.2]["eval_loss"] == pytest.approx(checks[0.0]["eval_loss"], rel=1e-5)  # same model, same batch
