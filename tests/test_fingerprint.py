"""A stage's fingerprint covers the project files it uses: editing a helper module or a prompt file of the filter,
sft, reward or dpo stage makes ``posttrain run --dry-run`` rerun that stage (naming the file) and what depends on
it, while the stages that do not use the file stay up to date.

The test works on a copy of the project (so the repository is never edited) and a run directory whose manifests
say every stage of the default graph is done (written from the runner's own plan: no stage runs, no model is
built), then edits one file of the copy at a time and reads the plan the CLI prints.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COPIED = ("pipeline", "stages", "critique", "reward", "configs")

MARK_DONE = """
import json, sys
from pipeline.files import fingerprint
from pipeline.run.config import load_config
from pipeline.run.runner import Runner

cfg = load_config("configs/default.yaml", ["run_dir=" + sys.argv[1]])
runner = Runner(cfg)
for item in runner.plan():
    st = runner.stages[item.stage]
    for out in st.outputs:  # any file makes an artifact exist for the planner
        folder = runner.store.model_dir(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "marker").write_text("x")
    runner.store.write_manifest(item.stage, {
        "stage": item.stage, "state": "done", "fingerprint": item.fingerprint, "fingerprint_parts": item.parts,
        "declared_inputs": list(st.inputs), "declared_outputs": list(st.outputs),
        "outputs": {o: {"kind": "model", "fingerprint": fingerprint({"stage": item.fingerprint, "output": o})}
                    for o in st.outputs}})
"""

# edited file -> (stages that must rerun, naming the file when marked *), stages that must stay up to date
CASES = {
    "critique/rules.py": ({"filter*", "sft", "reward", "dpo", "report"}, {"seeds", "generate", "evolve", "answer"}),
    "configs/prompts/critique.yaml": ({"filter*", "sft", "reward", "dpo"}, {"seeds", "generate", "evolve", "answer"}),
    "pipeline/training/moe.py": ({"sft*", "dpo*"}, {"seeds", "generate", "evolve", "answer", "filter", "reward"}),
    "reward/train.py": ({"reward*", "dpo"}, {"seeds", "generate", "evolve", "answer", "filter", "sft"}),
    "reward/score.py": ({"reward*", "dpo*"}, {"seeds", "generate", "evolve", "answer", "filter", "sft"}),
}


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _plan(root: Path, run_dir: Path) -> dict[str, tuple[str, str]]:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/default.yaml", "--set",
                          f"run_dir={run_dir}", "--dry-run"], cwd=root, env=_env(root), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    plan = {}
    for line in out.stdout.splitlines()[1:]:
        stage, action, reason = line.split(maxsplit=2)
        plan[stage] = (action, reason)
    return plan


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for name in COPIED:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    run_dir = root / "run"
    done = subprocess.run([sys.executable, "-c", MARK_DONE, str(run_dir)], cwd=root, env=_env(root),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root, run_dir


def test_unchanged_project_is_up_to_date(project):
    root, run_dir = project
    plan = _plan(root, run_dir)
    assert {"seeds", "filter", "sft", "reward", "dpo"} <= set(plan)
    assert {s: a for s, (a, _) in plan.items() if a != "skip"} == {}


@pytest.mark.parametrize("edited", list(CASES))
def test_editing_a_file_a_stage_uses_reruns_it_and_its_dependents(project, edited):
    root, run_dir = project
    rerun, kept = CASES[edited]
    path = root / edited
    original = path.read_bytes()
    path.write_bytes(original + b"\n# an edit\n")
    try:
        plan = _plan(root, run_dir)
    finally:
        path.write_bytes(original)
    for entry in rerun:
        stage = entry.rstrip("*")
        action, reason = plan[stage]
        assert action == "run", (stage, plan[stage])
        if entry.endswith("*"):
            assert f"code changed ({edited}" in reason or f", {edited}" in reason, (stage, reason)
    for stage in kept:
        assert plan[stage][0] == "skip", (stage, plan[stage])
