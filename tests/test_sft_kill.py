"""SIGKILL of an SFT run inside a phase, after a ``save_steps`` checkpoint, then a rerun.

`posttrain run` (a subprocess: SFT records from CPython's documentation topics via the test stage
``DOCS_STAGE`` below, then the sft stage on the embedded random `tiny-moe`) is killed with SIGKILL as soon as
the phase has a complete checkpoint and before the phase ends. The rerun resumes the phase from that
checkpoint (its ``resumed_from``, and only the steps after it are trained again), ends with the number of
optimizer steps the config gives an uninterrupted run, and writes a model folder that loads.

The stage trains with ``backend: local``, so the SIGKILL hits the process that trains. The resume itself (the
checkpoint lookup and ``resume_from_checkpoint``) is the same worker function on the Ray Train path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from pipeline.run.artifacts import ArtifactStore
from pipeline.run.stage import Stage
from tests.sigkill import kill_when, start_run

pytestmark = pytest.mark.slow

RECORDS, BATCH, SAVE_STEPS = 48, 2, 3
STEPS = math.ceil(RECORDS / BATCH)  # one epoch, no held-out records, no gradient accumulation


class _DocsConfig(BaseModel):
    """Test stage that writes an `sft` dataset from CPython's documentation topics."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    records: int = Field(RECORDS, ge=1)
    """How many records."""


def _write_docs(ctx) -> None:
    from benchmarks.sft import python_doc_sft_records

    ctx.write("sft", python_doc_sft_records(ctx.config.records, max_chars=200))


DOCS_STAGE = Stage(name="sft_docs", inputs=(), outputs=("sft",), config_cls=_DocsConfig, run=_write_docs)


def _config(tmp_path: Path) -> Path:
    sft = {"phases": [{"tiers": [1, 2, 3, 4], "epochs": 1}], "per_device_train_batch_size": BATCH, "max_length": 96,
           "heldout_fraction": 0.0, "logging_steps": 1, "save_steps": SAVE_STEPS,
           "distributed": {"backend": "local", "torch_threads": 2}}
    run = {"run_dir": str(tmp_path / "run"), "seed": 3, "plugins": ["tests.test_sft_kill:DOCS_STAGE"],
           "graph": ["sft_docs", "sft"], "models": {"policy": {"model": "tiny-moe"}},
           "stages": {"sft_docs": {"records": RECORDS}, "sft": sft}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run, sort_keys=False))
    return path


def _complete_checkpoints(folder: Path) -> dict[int, Path]:
    """step -> checkpoint folder, for the checkpoints whose trainer state is written (the Trainer writes it last)."""
    return {int(p.name.split("-")[-1]): p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()}


def test_sigkill_inside_an_sft_phase_resumes_from_its_checkpoint(embedded_models, tmp_path):
    config = _config(tmp_path)
    phase = tmp_path / "run" / "stages" / "sft" / "work" / "sft" / "phases" / "0"
    log_path = tmp_path / "killed.log"
    kill_when(start_run(config, log_path), lambda: bool(_complete_checkpoints(phase / "trainer")), log_path,
              timeout_s=300, waiting_for="complete checkpoint")
    assert not (phase / "done.json").exists(), "the kill must land before the phase ends"
    store = ArtifactStore(tmp_path / "run")
    assert store.read_manifest("sft")["state"] == "running"
    kept = _complete_checkpoints(phase / "trainer")
    step = max(kept)
    assert SAVE_STEPS <= step < STEPS and step % SAVE_STEPS == 0

    rerun_log = tmp_path / "rerun.log"
    rerun = start_run(config, rerun_log)
    assert rerun.wait(timeout=300) == 0, rerun_log.read_text()[-3000:]
    manifest = store.read_manifest("sft")
    assert manifest["state"] == "done"
    [info] = manifest["metrics"]["phases"]
    assert Path(info["resumed_from"]).resolve() == kept[step].resolve()
    assert info["steps"] == STEPS
    # The rerun trained only the steps after the checkpoint (its logs are the stage's metrics series).
    series = [json.loads(line) for line in (tmp_path / "run" / "stages" / "sft" / "metrics.jsonl").read_text()
              .splitlines()]
    assert [r["step"] for r in series if "loss" in r] == list(range(step + 1, STEPS + 1))
    assert not (phase / "trainer").exists()  # a finished phase's checkpoints are removed

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "models" / "sft_model")
    assert model.config.architectures == ["Qwen2MoeForCausalLM"]
