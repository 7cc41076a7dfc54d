"""The graph runner on real (test-only) stages: ordering, skip on matching fingerprint, reruns on
change, `posttrain stage --force` marking dependents stale, dry-run plans, status, failures.

The stages (tests/runner_stages.py) read CPython's documentation topics and tokenize them with the
embedded tokenizer; they run in this process (no Ray, no engine), so these tests are quick."""

from __future__ import annotations

import json
import textwrap

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.run.artifacts import ArtifactStore
from pipeline.run.config import load_config
from pipeline.run.runner import RunError, Runner, order_stages, run_stage, status_rows
from pipeline.run.stage import Stage
from tests.runner_stages import DocsConfig


def make_config(tmp_path, extra: str = "", graph: str = "[stats, tokenize, docs]", name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""\
        run_dir: {tmp_path / 'run'}
        seed: 5
        plugins: ["tests.runner_stages:ALL"]
        graph: {graph}
        shard_size: 4
        stages:
          docs: {{limit: 12}}
    """) + extra)
    return path


def shard_times(run_dir) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")}


def actions(items) -> dict[str, str]:
    return {i.stage: i.action for i in items}


def test_graph_order_from_inputs_and_outputs(tmp_path):
    cfg = load_config(make_config(tmp_path))
    assert Runner(cfg).order == ["docs", "tokenize", "stats"]  # graph listed them backwards

    def stage(name, inputs, outputs):
        return Stage(name=name, inputs=inputs, outputs=outputs, config_cls=DocsConfig, run=lambda ctx: None)

    # Independent stages keep their graph order; dependents come after their producers.
    assert order_stages({s.name: s for s in [stage("c", ("a_out",), ("c_out",)), stage("b", (), ("b_out",)),
                                             stage("a", (), ("a_out",))]}) == ["b", "a", "c"]
    with pytest.raises(RunError, match="cycle: x <- \\['y'\\], y <- \\['x'\\]"):
        order_stages({"x": stage("x", ("y_out",), ("x_out",)), "y": stage("y", ("x_out",), ("y_out",))})
    with pytest.raises(RunError, match="stages 'x' and 'y' both write 'out'"):
        order_stages({"x": stage("x", (), ("out",)), "y": stage("y", (), ("out",))})


def test_run_skip_and_rerun_on_change(tmp_path):
    path = make_config(tmp_path)
    run_dir = tmp_path / "run"
    items = Runner(load_config(path), quiet=True).run()
    assert actions(items) == {"docs": "run", "tokenize": "run", "stats": "run"}
    store = ArtifactStore(run_dir)
    tokens = store.read_dataset("tokens")
    assert len(tokens) == 12 and len(set(tokens["id"])) == 12
    assert store.read_dataset("token_stats")[0]["tokens"] == sum(tokens["n_tokens"])
    assert [len(h) for h in tokens["head"]] == [16] * 12
    manifest = store.read_manifest("tokenize")
    assert manifest["state"] == "done" and manifest["outputs"]["tokens"]["records"] == 12
    assert manifest["maps"]["tokens"] == {"shards": 3, "done": 3, "resumed": 0, "retries": 0, "records_in": 12}
    assert manifest["versions"]["datasets"] and manifest["duration_s"] >= 0
    assert "stage tokenize done" in (run_dir / "logs" / "run.log").read_text()
    before = shard_times(run_dir)

    # Same config: every fingerprint matches, nothing is rewritten.
    items = Runner(load_config(path), quiet=True).run()
    assert actions(items) == {"docs": "skip", "tokenize": "skip", "stats": "skip"}
    assert shard_times(run_dir) == before
    assert store.read_manifest("tokenize")["attempts"] == 1

    # A changed stage config reruns that stage and what depends on it, not what is upstream.
    cfg = load_config(path, ["stages.tokenize.head_tokens=4"])
    plan = {i.stage: (i.action, i.reason) for i in Runner(cfg).plan()}
    assert plan["docs"][0] == "skip" and plan["tokenize"] == ("run", "config changed")
    assert plan["stats"] == ("run", "input 'tokens' changed")
    Runner(cfg, quiet=True).run()
    assert [len(h) for h in store.read_dataset("tokens")["head"]] == [4] * 12
    after = shard_times(run_dir)
    assert all(after[k] == v for k, v in before.items() if k.startswith("datasets/docs"))
    assert all(after[k] != v for k, v in before.items() if k.startswith("datasets/tokens"))


def test_force_marks_dependents_stale(tmp_path):
    path = make_config(tmp_path)
    cfg = load_config(path)
    Runner(cfg, quiet=True).run()
    store = ArtifactStore(tmp_path / "run")
    docs_before = shard_times(tmp_path / "run" / "datasets" / "docs")

    items, stale = run_stage(cfg, "tokenize", quiet=True)  # up to date and not forced: nothing to do
    assert items[0].action == "skip" and stale == []
    items, stale = run_stage(cfg, "tokenize", force=True, quiet=True)
    assert items[0].action == "run" and items[0].reason == "forced (--force)" and stale == ["stats"]
    assert store.read_manifest("tokenize")["attempts"] == 1  # a forced run starts fresh
    stats = store.read_manifest("stats")
    assert stats["state"] == "stale" and stats["stale_reason"] == "upstream tokenize reran"
    assert store.read_manifest("docs")["state"] == "done"
    assert {r["stage"]: r["state"] for r in status_rows(tmp_path / "run")} == \
        {"docs": "done", "tokenize": "done", "stats": "stale"}

    plan = {i.stage: (i.action, i.reason) for i in Runner(cfg).plan()}
    assert plan == {"docs": ("skip", plan["docs"][1]), "tokenize": ("skip", plan["tokenize"][1]),
                    "stats": ("run", "stale: upstream tokenize reran")}
    Runner(cfg, quiet=True).run()
    assert store.read_manifest("stats")["state"] == "done"
    assert shard_times(tmp_path / "run" / "datasets" / "docs") == docs_before


def test_dry_run_plan_and_status_cli(tmp_path):
    path = make_config(tmp_path)
    cli = CliRunner()
    res = cli.invoke(app, ["run", str(path), "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"plan for {tmp_path / 'run'}:"
    assert [ln.split()[:2] for ln in lines[1:]] == [["docs", "run"], ["tokenize", "run"], ["stats", "run"]]
    assert "not run before" in lines[1]
    assert not (tmp_path / "run" / "stages").exists()  # a dry run does no work

    # Only docs has run: the plan skips it and runs the rest.
    Runner(load_config(path, ["graph=[docs]"]), quiet=True).run()
    manifests = {p: p.read_bytes() for p in (tmp_path / "run").rglob("manifest.json")}
    res = cli.invoke(app, ["run", str(path), "--dry-run"])
    assert res.exit_code == 0, res.output
    plan = {ln.split()[0]: ln.split(None, 2)[1:] for ln in res.output.splitlines()[1:]}
    assert plan["docs"][0] == "skip" and plan["docs"][1].startswith("up to date (fingerprint ")
    assert plan["tokenize"] == ["run", "not run before"] and plan["stats"][0] == "run"
    assert {p: p.read_bytes() for p in manifests} == manifests

    res = cli.invoke(app, ["stage", "tokenize", str(path), "--force", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "tokenize  run     forced (--force)" in res.output

    res = cli.invoke(app, ["status", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    row = next(ln for ln in res.output.splitlines() if " docs " in ln)
    assert "done" in row and "docs=12" in row


def test_inputs_come_from_enabled_stages_or_the_run_dir(tmp_path):
    path = make_config(tmp_path, graph="[tokenize]")
    with pytest.raises(RunError, match="stage tokenize reads 'docs', which no enabled stage writes"):
        Runner(load_config(path), quiet=True).run()
    Runner(load_config(path, ["graph=[docs]"]), quiet=True).run()
    # docs is not enabled now, but its finished output on disk feeds tokenize.
    items = Runner(load_config(path), quiet=True).run()
    assert actions(items) == {"tokenize": "run"}
    manifest = ArtifactStore(tmp_path / "run").read_manifest("tokenize")
    assert manifest["inputs"]["docs"]["stage"] == "docs"
    assert manifest["inputs"]["docs"]["fingerprint"] == \
        ArtifactStore(tmp_path / "run").read_manifest("docs")["outputs"]["docs"]["fingerprint"]


def test_failing_stage_keeps_finished_shards_and_resumes(tmp_path):
    from pydoc_data.topics import topics

    ninth = sorted(topics)[8]  # in shard 2 (shards of 4)
    path = make_config(tmp_path, extra=f"  tokenize: {{fail_on_topic: {json.dumps(ninth)}}}\n")
    cli = CliRunner()
    res = cli.invoke(app, ["run", str(path), "--quiet"])
    assert res.exit_code == 1, res.output
    assert "stage tokenize failed: stage tokenize: shard 2 of 'tokens' (4 records) failed: ValueError: " \
           f"test hook: failing on topic {ninth!r}" in res.output
    store = ArtifactStore(tmp_path / "run")
    manifest = store.read_manifest("tokenize")
    assert manifest["state"] == "failed" and "shard 2 of 'tokens'" in manifest["error"]
    assert [p.name for p in store.shard_files("tokens")] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert store.read_manifest("stats") is None
    rows = {r["stage"]: r for r in status_rows(tmp_path / "run")}
    assert rows["tokenize"]["state"] == "failed" and "ValueError" in rows["tokenize"]["note"]
    assert rows["tokenize"]["records"] == "tokens: 2/3 shards"
    # Same config again: the plan keeps the two finished shards.
    [item] = [i for i in Runner(load_config(path)).plan() if i.stage == "tokenize"]
    assert (item.action, item.reason) == ("resume", "failed earlier; 2/3 shards done, kept")


def test_missing_declared_output_fails_the_stage(tmp_path):
    path = make_config(tmp_path, extra="  stats: {write: false}\n")
    with pytest.raises(RunError, match=r"stage stats returned without writing its declared output\(s\) "
                                       r"\['token_stats'\]"):
        Runner(load_config(path), quiet=True).run()
    assert ArtifactStore(tmp_path / "run").read_manifest("stats")["state"] == "failed"


def test_empty_input_gives_empty_datasets(tmp_path):
    Runner(load_config(make_config(tmp_path), ["stages.docs.limit=0"]), quiet=True).run()
    store = ArtifactStore(tmp_path / "run")
    assert len(store.read_dataset("docs")) == 0 and len(store.read_dataset("tokens")) == 0
    assert store.read_dataset("token_stats")[0]["records"] == 0
    assert store.read_manifest("tokenize")["outputs"]["tokens"]["records"] == 0


@pytest.mark.slow
def test_model_roles_share_a_pool_and_pools_enter_the_fingerprint(tmp_path, instruct_pool):
    """`ctx.pool(role)` on a real vLLM engine (the session's `instruct_pool`, SmolLM2-135M-Instruct,
    handed to the runner as an already running pool): two roles with identical settings get one pool,
    a failed pool stage resumes, generation is seeded per record, the roles used are part of the
    stage's fingerprint."""
    pool_yaml = json.dumps(instruct_pool.config.model_dump(mode="json"))
    path = make_config(tmp_path, graph="[docs, gen]", extra="  gen: {records: 6, max_tokens: 8, fail_times: 1}\n"
                       f"models:\n  tiny: {pool_yaml}\n  tiny_again: {pool_yaml}\n")
    cfg = load_config(path)
    with pytest.raises(RunError, match="shard 1 of 'gens'.*test hook"):
        Runner(cfg, quiet=True, pools=[instruct_pool]).run()
    store = ArtifactStore(tmp_path / "run")
    assert store.read_manifest("gen")["pools_used"] == {"tiny": instruct_pool.config.model,
                                                        "tiny_again": instruct_pool.config.model}
    # The roles it reached before failing do not change its fingerprint: it resumes.
    items = Runner(cfg, quiet=True, pools=[instruct_pool]).run()
    assert [(i.stage, i.action) for i in items] == [("docs", "skip"), ("gen", "resume")]
    manifest = store.read_manifest("gen")
    assert manifest["state"] == "done" and manifest["maps"]["gens"]["resumed"] == 1
    assert manifest["metrics"]["shared_pool"] is True
    assert set(manifest["fingerprint_parts"]["pools"]) == {"tiny", "tiny_again"}
    first = store.read_dataset("gens").to_list()
    assert len(first) == 6 and all(0 < len(r["tokens"]) <= 8 for r in first)
    assert len(instruct_pool.actors) == instruct_pool.config.num_workers  # a given pool is left running
    assert {i.stage: i.action for i in Runner(cfg).plan()} == {"docs": "skip", "gen": "skip"}

    # Seeded per record: an uninterrupted run (without the failure hook) generates what the
    # failed-then-resumed one did.
    clean = load_config(path, ["stages.gen.fail_times=0"])
    items = Runner(clean, quiet=True, pools=[instruct_pool]).run()
    assert [(i.stage, i.action, i.reason) for i in items][1] == ("gen", "run", "config changed")
    assert store.read_dataset("gens").to_list() == first

    # Placement-only pool settings do not invalidate outputs; output-relevant ones do.
    moved = load_config(path, ["stages.gen.fail_times=0", "models.tiny.num_workers=1",
                               "models.tiny_again.num_workers=1"])
    assert {i.stage: i.action for i in Runner(moved).plan()} == {"docs": "skip", "gen": "skip"}
    reseeded = load_config(path, ["stages.gen.fail_times=0", "models.tiny.seed=1"])
    [gen] = [i for i in Runner(reseeded).plan() if i.stage == "gen"]
    assert (gen.action, gen.reason) == ("run", "model role 'tiny' changed")
