"""SIGKILL of the driver in the middle of an online DPO round, then a rerun.

`posttrain run` (a subprocess: reward model on tiny-dense, online DPO on a tiny-MoE vLLM engine, inputs from
CPython's docstrings via the test stage `tests.test_dpo:INPUTS_STAGE`) joins the test session's Ray and is
killed with SIGKILL as soon as round 2 has saved its pairs and before the round finishes. The rerun skips the
finished stages, keeps round 1 as it was, reuses round 2's saved pairs (no resampling) and finishes: every
online pair is there exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.run.artifacts import ArtifactStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
POSTTRAIN = Path(sys.executable).parent / "posttrain"


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        run_dir: {tmp_path / 'run'}
        seed: 5
        plugins: ["tests.test_dpo:INPUTS_STAGE"]
        graph: [dpo_inputs, reward, dpo]
        models:
          policy: {{model: tiny-moe, kv_cache_gib: 1, max_model_len: 1024}}
        stages:
          dpo_inputs: {{docs: 40}}
          reward: {{base_model: tiny-dense, learning_rate: 0.003, num_epochs: 1, max_length: 256}}
          # many epochs over a round's few pairs: round 2's training lasts long enough to be killed in
          dpo: {{rounds: 2, prompts_per_round: 4, samples_per_prompt: 3, max_tokens: 12, eval_prompts: 2,
                 learning_rate: 0.005, min_reward_gap: 0.0, epochs_per_round: 10, batch_size: 2}}
    """))
    return path


def _run(config: Path, log_path: Path, env: dict) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([str(POSTTRAIN), "run", str(config), "--quiet"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)


def test_sigkill_mid_dpo_round_then_resume(ray_session, embedded_models, tmp_path):
    config = _config(tmp_path)
    # Join the session's Ray: the killed driver's engine actor is then reaped by Ray, not left running.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    rounds = tmp_path / "run" / "stages" / "dpo" / "work" / "rounds"
    log_path = tmp_path / "killed.log"
    proc = _run(config, log_path, env)
    deadline = time.monotonic() + 600
    try:
        while not (rounds / "round_002" / "samples.json").exists():  # written right after pairs.jsonl
            assert proc.poll() is None, f"the run ended before it was killed:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"round 2 never started:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (rounds / "round_001" / "metrics.json").is_file()
    assert not (rounds / "round_002" / "metrics.json").exists(), "the kill must land inside round 2"
    store = ArtifactStore(tmp_path / "run")
    assert store.read_manifest("dpo")["state"] == "running"
    round1_metrics = (rounds / "round_001" / "metrics.json").read_text()
    saved = {r: [json.loads(x)["id"] for x in (rounds / f"round_00{r}" / "pairs.jsonl").read_text().splitlines()]
             for r in (1, 2)}
    round2_pairs = (rounds / "round_002" / "pairs.jsonl").read_text()

    rerun_log = tmp_path / "rerun.log"
    rerun = _run(config, rerun_log, env)
    assert rerun.wait(timeout=600) == 0, rerun_log.read_text()[-3000:]
    manifest = store.read_manifest("dpo")
    assert manifest["state"] == "done"
    assert store.read_manifest("reward")["state"] == "done"
    assert [r["round"] for r in manifest["metrics"]["rounds"]] == [1, 2]
    assert (rounds / "round_001" / "metrics.json").read_text() == round1_metrics  # round 1 was not redone
    # round 2 was not resampled: its saved pairs were read back, not rewritten (the run log says so)
    assert (rounds / "round_002" / "pairs.jsonl").read_text() == round2_pairs
    assert "dpo round 2: reusing its" in (tmp_path / "run" / "logs" / "run.log").read_text()
    pairs = store.read_dataset("online_pairs").to_list()
    ids = [p["id"] for p in pairs]
    assert len(ids) == len(set(ids)), "a pair was duplicated"
    # the pairs saved before the kill are the ones trained on and published: nothing lost, nothing resampled
    assert sorted(ids) == sorted(saved[1] + saved[2])
