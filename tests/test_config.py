"""Run config: validation before any work, readable errors (file, field path, what is allowed),
`--set` overrides, `posttrain config show`. No engine, no Ray: the config layer only."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline.run.config import ConfigError, StageResources, config_dict, load_config

PLUGINS = 'plugins: ["tests.runner_stages:ALL"]\n'


def write(tmp_path, text: str, name: str = "run.yaml", plugins: bool = True):
    """A config file in tmp_path; the test stages' plugin line first unless plugins=False."""
    path = tmp_path / name
    path.write_text((PLUGINS if plugins else "") + textwrap.dedent(text))
    return path


def problems(path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def test_valid_config_is_typed_with_stage_config_classes(tmp_path):
    from tests.runner_stages import DocsConfig, TokenizeConfig

    path = write(tmp_path, """
        run_dir: runs/x
        graph: [tokenize, docs]
        resources: {tokenize: {remote: true, num_cpus: 0.5}}
        stages: {docs: {limit: 5}}
    """)
    cfg = load_config(path)
    assert isinstance(cfg.stage_config("docs"), DocsConfig) and cfg.stage_config("docs").limit == 5
    # A section left out gets the stage's defaults.
    assert isinstance(cfg.stage_config("tokenize"), TokenizeConfig)
    assert cfg.resources_for("tokenize") == StageResources(remote=True, num_cpus=0.5)
    assert cfg.resources_for("docs") == StageResources()
    assert list(cfg.enabled) == ["tokenize", "docs"]


def test_unknown_field_names_file_path_and_allowed_fields(tmp_path):
    path = write(tmp_path, """
        graph: [docs, tokenize]
        stages:
          tokenize: {head_tokns: 3}
    """)
    [msg] = problems(path)
    assert msg.startswith(f"{path}: stages.tokenize.head_tokns: unknown field 'head_tokns'")
    assert "allowed fields: model, head_tokens, delay_s, fail_on_topic" in msg


def test_wrong_type_and_wrong_value_are_all_reported(tmp_path):
    path = write(tmp_path, """
        graph: [docs]
        models:
          policy: {model: tiny-moe, dtype: fp8, num_workers: 0}
        stages:
          docs: {limit: many}
    """)
    found = problems(path)
    assert len(found) == 3, found
    by_path = {m.split(": ")[1]: m for m in found}
    assert "valid integer" in by_path["stages.docs.limit"] and "(got 'many')" in by_path["stages.docs.limit"]
    assert "Number of CPython documentation topics" in by_path["stages.docs.limit"]  # the field's doc
    # Literal values: the allowed values are listed.
    assert "'auto', 'float32', 'bfloat16' or 'float16'" in by_path["models.policy.dtype"]
    assert "(got 'fp8')" in by_path["models.policy.dtype"]
    assert "greater than or equal to 1" in by_path["models.policy.num_workers"]
    assert all(m.startswith(str(path)) for m in found)


def test_unknown_stage_in_graph_and_sections(tmp_path):
    path = write(tmp_path, "graph: [docs, tokenise]\n")
    [msg] = problems(path)
    assert msg.startswith(f"{path}: graph[1]: unknown stage 'tokenise'; known stages: seeds, generate")
    assert "tokenize" in msg

    path = write(tmp_path, "graph: [docs]\nstages: {tokenise: {}}\nresources: {dox: {}}\n", "b.yaml")
    found = problems(path)
    assert any("stages.tokenise: unknown stage 'tokenise'" in m for m in found), found
    assert any("resources.dox: unknown stage 'dox'" in m for m in found), found


def test_disabled_stage_is_not_imported(tmp_path, monkeypatch):
    """A stage module that does not exist breaks only configs that enable it."""
    from pipeline.run import registry

    monkeypatch.setitem(registry.DEFAULT_STAGES, "report", "stages.module_not_written_yet:STAGE")
    ok = write(tmp_path, "graph: [docs]\nstages: {report: {anything: 1}}\n")
    cfg = load_config(ok)
    assert list(cfg.enabled) == ["docs"]
    bad = write(tmp_path, "graph: [docs, report]\n", "bad.yaml")
    [msg] = problems(bad)
    assert "graph[1]: stage 'report' (stages.module_not_written_yet:STAGE) cannot be imported" in msg
    assert "No module named 'stages.module_not_written_yet'" in msg and "fix: remove 'report' from graph" in msg


def test_bad_plugin_is_named(tmp_path):
    path = write(tmp_path, 'plugins: ["tests.runner_stages:NOPE", "tests.runner_stages:DocsConfig"]\ngraph: []\n',
                 plugins=False)
    found = problems(path)
    assert found[0].startswith(f"{path}: plugins[0]: cannot import 'tests.runner_stages:NOPE'")
    assert "plugins[1]:" in found[1] and "not a Stage" in found[1]


def test_model_role_must_be_defined(tmp_path):
    path = write(tmp_path, """
        graph: [docs, gen]
        models: {tiny: {model: tiny-moe}}
    """)
    [msg] = problems(path)
    assert "stages.gen.same_model: model role 'tiny_again' is not defined; defined roles: tiny" in msg


def test_set_overrides_are_yaml_typed(tmp_path):
    path = write(tmp_path, "graph: [docs]\nstages: {docs: {limit: 5}}\n")
    cfg = load_config(path, ["seed=7", "stages.docs.limit=12", "graph=[docs, tokenize]", "ray.num_cpus=2",
                             "models.policy.model=tiny-moe", "resources.tokenize.remote=true"])
    assert cfg.seed == 7 and cfg.stage_config("docs").limit == 12
    assert list(cfg.enabled) == ["docs", "tokenize"] and cfg.ray.num_cpus == 2
    assert cfg.models["policy"].model == "tiny-moe" and cfg.resources_for("tokenize").remote is True


def test_bad_override_names_the_set(tmp_path):
    path = write(tmp_path, "graph: [docs]\n")
    [msg] = problems(path, ["stages.docs.limit=lots"])
    assert msg.startswith("--set stages.docs.limit=lots: stages.docs.limit:") and "valid integer" in msg
    [msg] = problems(path, ["stages.docs.limit"])
    assert "--set stages.docs.limit: expected a dotted field path and a value" in msg
    [msg] = problems(path, ["seed.x=1"])
    assert msg.startswith("--set seed.x=1: seed: Input should be a valid integer")


def test_yaml_errors_name_the_line(tmp_path):
    path = write(tmp_path, "graph: [docs\nseed: 1\n", plugins=False)
    [msg] = problems(path)
    assert msg.startswith(f"{path}: line ") and "not valid YAML" in msg
    [msg] = problems(tmp_path / "missing.yaml")
    assert "config file not found" in msg


def test_config_show_prints_the_resolved_config(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    path = write(tmp_path, "graph: [docs, tokenize]\nstages: {docs: {limit: 5}}\n")
    res = CliRunner().invoke(app, ["config", "show", str(path), "--set", "stages.tokenize.head_tokens=4"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.output)
    assert shown == config_dict(load_config(path, ["stages.tokenize.head_tokens=4"]))
    assert shown["stages"]["tokenize"] == {"model": "tiny-moe", "head_tokens": 4, "delay_s": 0.0,
                                           "fail_on_topic": None}
    assert shown["stages"]["docs"]["max_chars"] == 2000  # defaults filled in
    res = CliRunner().invoke(app, ["config", "show", str(path), "--set", "stages.docs.limit=x"])
    assert res.exit_code == 2 and "stages.docs.limit" in res.output


def test_default_config_lists_every_stage_in_order():
    from pipeline.run.config import load_yaml
    from pipeline.run.registry import DEFAULT_GRAPH

    data = load_yaml(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")
    assert tuple(data["graph"]) == DEFAULT_GRAPH
    assert list(data["stages"]) == list(DEFAULT_GRAPH)
    assert {"policy", "instruct", "critic"} <= set(data["models"])
