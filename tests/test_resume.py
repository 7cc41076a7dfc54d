"""Resume after a real kill: `posttrain run` in a subprocess is SIGKILLed in the middle of a
`ctx.map` stage (tokenizing CPython's documentation topics with the embedded tokenizer), then
rerun. The finished shards are kept as they are, and the final dataset equals an uninterrupted
run's with the same seed: no record lost or duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.run.artifacts import ArtifactStore
from pipeline.run.config import load_config
from pipeline.run.runner import Runner, status_rows

pytestmark = pytest.mark.slow  # starts real processes and kills them

REPO = Path(__file__).resolve().parent.parent
POSTTRAIN = Path(sys.executable).parent / "posttrain"
DOCS, SHARD = 48, 4  # 12 shards


def write_config(tmp_path: Path, name: str, delay_s: float) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        run_dir: {tmp_path / name}
        seed: 11
        plugins: ["tests.runner_stages:ALL"]
        graph: [docs, tokenize]
        shard_size: {SHARD}
        stages:
          docs: {{limit: {DOCS}}}
          tokenize: {{delay_s: {delay_s}}}
    """))
    return path


def test_sigkill_mid_stage_then_resume(tmp_path):
    killed_cfg = write_config(tmp_path, "killed", delay_s=0.5)
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(POSTTRAIN), "run", str(killed_cfg)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    shards = tmp_path / "killed" / "datasets" / "tokens"
    deadline = time.monotonic() + 300
    try:
        while len(list(shards.glob("shard-*.parquet"))) < 3:
            assert proc.poll() is None, f"the run ended before it was killed:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no shards after 300s:\n{log_path.read_text()}"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    store = ArtifactStore(tmp_path / "killed")
    finished = sorted(shards.glob("shard-*.parquet"))
    assert 3 <= len(finished) < DOCS // SHARD, "the kill must land in the middle of the stage"
    assert store.read_manifest("tokenize")["state"] == "running"
    row = next(r for r in status_rows(tmp_path / "killed") if r["stage"] == "tokenize")
    assert row["state"] == "interrupted" and "rerun `posttrain run` to resume" in row["note"]
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}

    # The uninterrupted reference run (same seed; the delay hook does not change outputs).
    reference_cfg = write_config(tmp_path, "reference", delay_s=0.0)
    Runner(load_config(reference_cfg), quiet=True).run()
    reference = ArtifactStore(tmp_path / "reference").read_dataset("tokens").to_list()

    items = Runner(load_config(killed_cfg), quiet=True).run()
    assert [(i.stage, i.action) for i in items] == [("docs", "skip"), ("tokenize", "resume")]
    assert items[1].reason.startswith("interrupted earlier;")
    manifest = store.read_manifest("tokenize")
    assert manifest["state"] == "done" and manifest["attempts"] == 2
    assert manifest["maps"]["tokens"]["resumed"] == len(finished)
    # Finished shards were kept as they were (same file, not rewritten), no temp file is left.
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == stamps
    assert not list(shards.glob(".*"))

    resumed = store.read_dataset("tokens").to_list()
    assert resumed == reference
    ids = [r["id"] for r in resumed]
    assert len(ids) == len(set(ids)) == DOCS
    assert set(ids) == set(store.read_dataset("docs")["id"])
