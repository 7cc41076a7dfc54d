"""The eval stage and `posttrain eval` on real vLLM engines (tiny random models: the figures are near zero, the
test checks the plumbing, the determinism of greedy answers and the paired statistics)."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.run.stage import Stage
from stages.eval import generate_answers, load_prompts
from stages.eval.metrics import ACCURACIES, MODEL_KEYS, SUMMARY_KEYS, gain_keys

pytestmark = pytest.mark.slow


def test_greedy_answers_repeat(tiny_sync_pool):
    rows = load_prompts("ifeval", limit=6)
    first = generate_answers(tiny_sync_pool, rows, max_tokens=12)
    again = generate_answers(tiny_sync_pool, rows, max_tokens=12)
    assert first == again
    assert [a["key"] for a in first] == [r["key"] for r in rows]
    assert all(a["n_tokens"] <= 12 and a["finish_reason"] in ("stop", "length") for a in first)


def test_posttrain_eval_json(ray_session, embedded_models):
    out = CliRunner().invoke(app, ["eval", "tiny-moe", "--limit", "5", "--max-tokens", "8", "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output.strip().splitlines()[-1])
    assert list(summary) == list(SUMMARY_KEYS)
    assert summary["benchmark"] == "ifeval" and summary["model"] == "tiny-moe" and summary["n"] == 5
    assert all(0.0 <= summary[k] <= 1.0 for k in (*ACCURACIES, "truncated_fraction"))
    assert 0 < summary["mean_tokens"] <= 8
    bad = CliRunner().invoke(app, ["eval", "tiny-moe", "--benchmark", "mmlu"])
    assert bad.exit_code == 2 and "unknown benchmark 'mmlu'" in bad.output


def _copy_model(ctx, output: str, source: str) -> None:
    from pipeline.models.catalog import resolve_model

    shutil.copytree(resolve_model(source), ctx.output_path(output), dirs_exist_ok=True)


class NoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


# sft_model: another architecture than the policy role (its own engines); dpo_model: the policy's own weights
# (served by the role's running engines after a sync), so the final model answers exactly as the start does.
MODELS_STAGES = [
    Stage(name="fake_sft", inputs=(), outputs=("sft_model",), config_cls=NoConfig,
          run=lambda ctx: _copy_model(ctx, "sft_model", "tiny-dense")),
    Stage(name="fake_dpo", inputs=("sft_model",), outputs=("dpo_model",), config_cls=NoConfig,
          run=lambda ctx: _copy_model(ctx, "dpo_model", "tiny-moe")),
]


def test_eval_stage_through_the_runner(tiny_sync_pool, tmp_path):
    from pipeline.run.artifacts import ArtifactStore
    from pipeline.run.config import load_config
    from pipeline.run.runner import Runner

    pool_yaml = json.dumps(tiny_sync_pool.config.model_dump(mode="json"))
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        run_dir: {tmp_path / 'run'}
        seed: 5
        plugins: ["tests.test_eval_engine:MODELS_STAGES"]
        graph: [fake_sft, fake_dpo, eval]
        models:
          policy: {pool_yaml}
        stages:
          eval: {{limit: 12, max_tokens: 10, start_model: tiny-moe, bootstrap_samples: 500, shard_size: 5}}
    """))
    Runner(load_config(path), quiet=True, pools=[tiny_sync_pool]).run()
    store = ArtifactStore(tmp_path / "run")
    manifest = store.read_manifest("eval")
    assert manifest["state"] == "done"
    metrics = manifest["metrics"]
    assert set(MODEL_KEYS) <= set(metrics) and metrics["prompts"] == 12
    results = store.read_dataset("eval_results").to_list()
    assert len(results) == 36 and {r["model_label"] for r in results} == {"start", "sft", "final"}
    by = {label: [r for r in results if r["model_label"] == label] for label in ("start", "sft", "final")}
    # The final model is the start's weights: the same greedy answers, so every paired difference is exactly 0.
    assert [r["response"] for r in by["final"]] == [r["response"] for r in by["start"]]
    for accuracy in ACCURACIES:
        gain, low, high = gain_keys("final_vs_start", accuracy)
        assert (metrics[gain], metrics[low], metrics[high]) == (0.0, 0.0, 0.0)
        gain, low, high = gain_keys("sft_vs_start", accuracy)
        assert metrics[low] <= metrics[gain] <= metrics[high]
        assert metrics[gain] == pytest.approx(metrics[f"sft_{accuracy}"] - metrics[f"start_{accuracy}"], abs=1e-3)
    # The SFT model (another architecture) got engines of its own, whose output went to the run's worker logs; the
    # final model was served by the role's running engines (weights synced in), which started none.
    logs = sorted(p.name for p in (tmp_path / "run" / "logs" / "workers").iterdir())
    assert logs and all(name.startswith("engine-sft_model-") for name in logs), logs
    # A rerun is up to date: nothing is answered again.
    items = Runner(load_config(path), quiet=True, pools=[tiny_sync_pool]).plan()
    assert [(i.stage, i.action) for i in items] == [("fake_sft", "skip"), ("fake_dpo", "skip"), ("eval", "skip")]
