"""Bad inputs across the CLI surface (issue 9): run configs, `--set`, seed files, command arguments and
model folders. Each gets one clear error: a non-zero exit (2: invalid input, 1: the run failed), no
traceback, and a message that names the thing (file, field, path) and says what to do.

The cases run the real `posttrain` entry point in subprocesses; configs enable only stages whose
modules import fast (sft and dpo import torch: ~8 s per process).
Function-level checks of the same layers are in test_config.py, test_seeds.py and test_models.py;
model-folder checks that need no CLI run in-process below. No Ray, no vLLM engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.models import catalog as models
from pipeline.models.catalog import ModelError

REPO = Path(__file__).resolve().parent.parent
POSTTRAIN = Path(sys.executable).parent / "posttrain"
LIGHT_GRAPH = ["seeds", "generate", "evolve", "answer", "filter", "reward", "report"]
FAQ = Path("/usr/share/doc/xz-utils/faq.txt.gz")  # the default web_qa seed source (Debian xz-utils)


def posttrain(*args: str, env: dict | None = None) -> tuple[int, str]:
    """Exit code and stdout+stderr of `posttrain ARGS` run from the repository root."""
    res = subprocess.run([str(POSTTRAIN), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=env)
    return res.returncode, res.stdout + res.stderr


def _dump(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, str]:
    """Every input file of the cases, by name (configs are variants of configs/default.yaml)."""
    root = tmp_path_factory.mktemp("errs")
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    base = {**default, "run_dir": str(root / "run"), "graph": LIGHT_GRAPH}
    files = {"root": str(root), "base": _dump(root / "base.yaml", base)}

    def variant(name: str, **changes) -> None:
        data = json.loads(json.dumps(base))
        for dotted, value in changes.items():
            node = data
            *head, last = dotted.split("__")
            for part in head:
                node = node[part]
            node[last] = value
        files[name] = _dump(root / f"{name}.yaml", data)

    variant("unknown_top", shards_per_stage=4)
    variant("typo_key", stages__evolve={"roundz": 2})
    variant("unknown_stage", graph=["seeds", "generat", "evolve"])
    variant("unknown_role", stages__evolve={"model": "judge"})
    variant("bad_plugin", plugins=["stages.nosuch_plugin:STAGE"])
    (root / "invalid.yaml").write_text(f"run_dir: {root / 'run'}\ngraph: [seeds\nseed: 1\n")
    (root / "toplist.yaml").write_text("- seeds\n- generate\n")
    files["invalid"], files["toplist"] = str(root / "invalid.yaml"), str(root / "toplist.yaml")
    (root / "folder.yaml").mkdir()
    files["folder"] = str(root / "folder.yaml")

    # Seed files: JSONL lines made from the real FAQ pairs, broken in the ways real files are.
    from stages.seeds import SeedSource, SkipLog, load_documents

    pairs = [(d.question, d.answer) for d in load_documents(SeedSource(kind="web_qa", paths=[str(FAQ)]), SkipLog())]
    data = root / "seeddata"
    data.mkdir()
    line = json.dumps({"question": pairs[0][0], "answer": pairs[0][1]})
    (data / "broken.jsonl").write_text("\n".join([line[:-12], json.dumps({"question": pairs[1][0]}), "[1, 2]"]) + "\n")
    (data / "undecodable.jsonl").write_bytes(line.encode().replace(b"?", b"\xff\xfe", 1) + b"\n\xc3\x28\n")
    (data / "empty.jsonl").write_text("")
    for name, path in [("nomatch", data / "nothing-here" / "*.jsonl"), ("broken", data / "broken.jsonl"),
                       ("undecodable", data / "undecodable.jsonl"), ("empty", data / "empty.jsonl")]:
        source = {"kind": "web_qa", "name": f"{name}-faq", "paths": [str(path)]}
        files[f"seeds_{name}"] = _dump(root / f"seeds_{name}.yaml", {
            "run_dir": str(root / f"run_{name}"), "graph": ["seeds"], "stages": {"seeds": {"sources": [source]}}})
        files[f"{name}_file"] = str(path)
    files["seeds_tokenizer"] = _dump(root / "seeds_tokenizer.yaml", {
        "run_dir": str(root / "run_tok"), "graph": ["seeds"],
        "stages": {"seeds": {"tokenizer": str(root / "models" / "nosuch"),
                             "sources": [{"kind": "book", "module": "pydoc_data.topics:topics"}]}}})
    files["role_model_missing"] = _dump(root / "role_model_missing.yaml", {
        "run_dir": str(root / "run_role"), "graph": ["seeds", "generate"],
        "models": {"policy": {"model": str(root / "models" / "gone")}}})
    (root / "not-a-run").write_text("a file\n")
    return files


# (case id, arguments with {file} placeholders, exit code, texts the output must contain: what, then the fix)
CASES = [
    # -- run config (file) ------------------------------------------------------------------------
    ("config-missing-file", ["run", "{root}/nope.yaml", "--dry-run"], 2,
     ["{root}/nope.yaml: config file not found", "fix: give the path of a YAML run config"]),
    ("config-is-a-folder", ["config", "show", "{folder}"], 2,
     ["{folder}: is a folder, not a config file", "fix:"]),
    ("config-invalid-yaml", ["run", "{invalid}", "--dry-run"], 2,
     ["{invalid}: line 3 column 5: not valid YAML", "expected ',' or ']'"]),
    ("config-top-level-list", ["run", "{toplist}", "--dry-run"], 2,
     ["{toplist}: the top level must be a mapping of fields (run_dir, graph, stages, ...), not a list"]),
    ("config-unknown-top-key", ["config", "show", "{unknown_top}"], 2,
     ["{unknown_top}: shards_per_stage: unknown field 'shards_per_stage'", "allowed fields: run_dir, seed, graph"]),
    ("config-typo-stage-key", ["config", "show", "{typo_key}"], 2,
     ["{typo_key}: stages.evolve.roundz: unknown field 'roundz' (did you mean 'rounds'?)", "allowed fields: "]),
    ("config-unknown-stage", ["config", "show", "{unknown_stage}"], 2,
     ["{unknown_stage}: graph[1]: unknown stage 'generat'", "known stages: seeds, generate"]),
    ("config-unknown-role", ["config", "show", "{unknown_role}"], 2,
     ["stages.evolve.model: model role 'judge' is not defined; defined roles: policy, instruct, critic",
      "fix: add models.judge or use a defined role"]),
    ("config-missing-plugin", ["config", "show", "{bad_plugin}"], 2,
     ["{bad_plugin}: plugins[0]: cannot import 'stages.nosuch_plugin:STAGE'", "No module named 'stages.nosuch_plugin'",
      "fix: give 'package.module:ATTR'"]),
    # -- run config (--set) -----------------------------------------------------------------------
    ("set-wrong-type", ["config", "show", "{base}", "--set", "stages.evolve.rounds=abc"], 2,
     ["--set stages.evolve.rounds=abc: stages.evolve.rounds: Input should be a valid integer", "(got 'abc')",
      "the field: Evolution rounds"]),
    ("set-out-of-range", ["run", "{base}", "--dry-run", "--set", "stages.evolve.rounds=11"], 2,
     ["--set stages.evolve.rounds=11: stages.evolve.rounds: Input should be less than or equal to 10", "the field: "]),
    ("set-no-value", ["config", "show", "{base}", "--set", "foo"], 2,
     ["--set foo: expected a dotted field path and a value, e.g. --set stages.evolve.rounds=2"]),
    ("set-value-not-yaml", ["config", "show", "{base}", "--set", "graph=[seeds"], 2,
     ["--set graph=[seeds: the value is not valid YAML (expected ',' or ']'", "fix: quote it"]),
    # -- seed files (`posttrain stage seeds`) -----------------------------------------------------
    ("seeds-paths-match-nothing", ["stage", "seeds", "{seeds_nomatch}", "-q"], 1,
     ["seed source nomatch-faq (web_qa) gave no usable text", "no files matched",
      "fix: point it at readable files of that kind or remove it from stages.seeds.sources"]),
    ("seeds-broken-jsonl", ["stage", "seeds", "{seeds_broken}", "-q"], 1,
     ["seed source broken-faq (web_qa)", "{broken_file}:1: broken JSON line",
      "{broken_file}:2: missing or empty field(s) ['answer']", "{broken_file}:3: JSON line is not an object", "fix:"]),
    ("seeds-undecodable-bytes", ["stage", "seeds", "{seeds_undecodable}", "-q"], 1,
     ["seed source undecodable-faq (web_qa)", "{undecodable_file}:1: undecodable bytes",
      "{undecodable_file}:2: undecodable bytes", "fix:"]),
    ("seeds-empty-file", ["stage", "seeds", "{seeds_empty}", "-q"], 1,
     ["seed source empty-faq (web_qa)", "{empty_file}: empty file", "fix:"]),
    # -- command arguments ------------------------------------------------------------------------
    ("cli-unknown-command", ["nosuch"], 2, ["No such command 'nosuch'", "posttrain --help"]),
    ("cli-stage-not-a-stage", ["stage", "seedz", "{seeds_empty}"], 2,
     ["'seedz' is not a stage (did you mean 'seeds'?)", "fix: posttrain stage seeds {seeds_empty}"]),
    ("cli-stage-not-enabled", ["stage", "evolve", "{seeds_empty}"], 1,
     ["stage 'evolve' is not enabled in this config (graph: seeds)", "fix: add it to graph"]),
    ("cli-status-missing-dir", ["status", "{root}/nonexistent"], 2,
     ["{root}/nonexistent is not a run directory (it does not exist)", "fix: pass the run_dir of a run config"]),
    ("cli-status-file", ["status", "{root}/not-a-run"], 2,
     ["{root}/not-a-run is a file, not a run directory", "fix: pass the run_dir"]),
    ("cli-report-missing-dir", ["report", "{root}/nonexistent"], 2,
     ["run directory {root}/nonexistent does not exist", "fix: pass the folder that `posttrain run` wrote"]),
    ("cli-publish-bad-repo-id", ["publish", "{root}/run", "--repo-id", "bad", "--dry-run", "{root}/bundle"], 1,
     ["--repo-id 'bad' is not ORG/NAME", "fix: e.g. --repo-id my-org/posttrain-data"]),
    # -- model folders through the CLI (the seeds stage loads its tokenizer: no engine, no Ray) ----
    ("model-folder-missing", ["stage", "seeds", "{seeds_tokenizer}", "-q"], 1,
     ["stage seeds failed: model folder {root}/models/nosuch does not exist",
      "fix: give an existing transformers model folder or one of the embedded names"]),
    # a role's model folder is checked before any stage runs (not when the stage that needs it starts)
    ("model-folder-of-a-role-missing", ["run", "{role_model_missing}", "-q"], 1,
     ["models.policy.model (used by generate): model folder {root}/models/gone does not exist",
      "fix: give an existing transformers model folder"]),
]


@pytest.mark.parametrize("args,code,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error(w, args, code, expected):
    rc, out = posttrain(*[a.format(**w) for a in args])
    assert rc == code, out
    assert "Traceback" not in out, out
    for text in expected:
        assert text.format(**w) in out, (text.format(**w), out)
    # one message, not a dump: the error line plus at most the runner's log line of the same failure
    assert len(out.strip().splitlines()) <= 8, out


# -- model folders, in-process (what `posttrain` reaches through pipeline.models.catalog) ------------------

def test_damaged_config_json_is_named_with_the_fix(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]')  # cut off
    with pytest.raises(ModelError) as err:
        models.resolve_model(folder)
    msg = str(err.value)
    assert msg.startswith(f"{folder / 'config.json'} is not readable JSON") and "fix: restore it" in msg, msg


def test_config_json_without_architectures_is_named_with_the_fix(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ModelError) as err:
        models.model_architecture(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "config.json") in msg and "names no architecture" in msg and "fix:" in msg, msg


def test_unwritable_model_cache_fails_before_the_build(tmp_path, monkeypatch):
    """A POSTTRAIN_HOME that cannot be written is named before the ~30 s GGUF conversion, not after it
    as a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")  # a file where the cache folder should be (root ignores chmod)
    monkeypatch.setenv("POSTTRAIN_HOME", str(blocker / "home"))

    def build(*_):
        raise AssertionError("the build started before the cache folder was checked")

    monkeypatch.setattr(models, "load_dense_from_gguf", build)
    with pytest.raises(ModelError) as err:
        models.prepare_dense()
    msg = str(err.value)
    assert f"cannot write the model cache {blocker / 'home' / 'models'}" in msg, msg
    assert "fix: set POSTTRAIN_HOME to a writable folder" in msg, msg

