"""`posttrain publish`: the dataset repo (configs + card), its dry run, and the upload.

The public Hugging Face Hub is not reachable from this machine (and tests must never write to it),
so the upload tests run the real ``huggingface_hub`` client against tests/hub_server.py: a local
server on 127.0.0.1 (free port) that answers the Hub endpoints the client calls for an upload
(whoami, repo create, tree, validate-yaml, preupload, LFS batch / upload / verify, commit). The Xet
storage protocol is not emulated, so these tests set HF_HUB_DISABLE_XET and the client uses LFS.
"""

from __future__ import annotations

import hashlib
import logging

import datasets
import huggingface_hub.constants
import pytest
from huggingface_hub import DatasetCard
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.models.catalog import resolve_model
from pipeline.reporting.card import UNDOCUMENTED
from pipeline.reporting.publish import PublishConfig, PublishError, publish
from pipeline.run.artifacts import ArtifactStore
from tests.hub_server import FakeHub
from tests.sample_run import build_sample_run

TOKEN = "hf_" + hashlib.sha256(b"posttrain test token").hexdigest()[:34]
CONFIGS = ["sft", "preferences", "online_dpo_round_1", "online_dpo_round_2"]


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    # the token is planted in the run config: the card must not carry it
    return build_sample_run(tmp_path_factory.mktemp("run") / "run", model_dir=resolve_model("tiny-moe"),
                            config_extra={"hub": {"token": TOKEN}, "notes": f"pushed with {TOKEN}"})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    # no token of this machine: not from the environment, not from `hf auth login`'s file
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    with FakeHub(token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_dry_run_writes_a_loadable_repo_with_its_card(sample_run, tmp_path):
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["publish", str(sample_run), "--repo-id", "posttrain-org/demo",
                                      "--dry-run", str(out)])
    assert result.exit_code == 0, result.output
    assert "nothing was uploaded" in result.output
    store = ArtifactStore(sample_run)
    online = store.read_dataset("online_pairs").to_list()
    expected = {"sft": store.read_dataset("sft").to_list(), "preferences": store.read_dataset("preferences").to_list(),
                **{f"online_dpo_round_{r}": [x for x in online if x["source"] == f"online_round_{r}"] for r in (1, 2)}}
    for name in CONFIGS:
        loaded = datasets.load_dataset(str(out), name=name, split="train")
        assert loaded.to_list() == expected[name], name
    assert datasets.load_dataset(str(out), split="train").to_list() == expected["sft"]  # sft is the default

    card = DatasetCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert sorted(c["config_name"] for c in meta["configs"]) == sorted(CONFIGS)
    assert next(c for c in meta["configs"] if c.get("default"))["config_name"] == "sft"
    infos = {i["config_name"]: i for i in meta["dataset_info"]}
    for name in CONFIGS:
        assert infos[name]["splits"][0]["num_examples"] == len(expected[name])
    assert meta["license"] == "other" and meta["license_name"] == "psf-2.0"
    body = card.text
    for f in ArtifactStore(sample_run).manifests():
        assert f"| {f} |" in body  # every stage in the stage table
    for name in ("seeds", "instructions", "evolved", "answers", "sft", "preferences", "online_pairs"):
        assert f"| {name} | " in body and f" | {store.count_records(name)} |" in body
    assert "| book | pydoc_data.topics | PSF-2.0 |" in body
    assert "smollm2-moe" in body and "smollm2-135m-instruct" in body
    assert UNDOCUMENTED not in body  # every field of every config has its meaning
    assert "posttrain run config.yaml" in body
    assert TOKEN not in (out / "README.md").read_text()
    # nothing but the repo's files, and a second dry run rewrites the same bytes
    files = {p.relative_to(out).as_posix(): _sha(p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert set(files) == {"README.md", *(f"data/{c}/train-00000-of-00001.parquet" for c in CONFIGS)}
    publish(sample_run, PublishConfig(repo_id="posttrain-org/demo", dry_run=out), echo=lambda _: None)
    assert files == {p.relative_to(out).as_posix(): _sha(p.read_bytes()) for p in out.rglob("*") if p.is_file()}


def test_upload_to_local_hub_then_rerun_skips_everything(sample_run, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = CliRunner().invoke(app, ["publish", str(sample_run), "--repo-id", "posttrain-org/demo", "--private",
                                      "--model-repo-id", "tester/posttrain-moe"])
    assert result.exit_code == 0, result.output
    assert not hub.unhandled
    # the real client went through preupload, the LFS batch API, PUT + verify, and commits
    assert hub.count("POST", r"/preupload/main$") >= 5 and hub.count("POST", r"/info/lfs/objects/batch$") >= 5
    assert hub.count("PUT", r"^/lfs-upload/") == len(CONFIGS) + 1  # the config shards + model.safetensors
    repo = hub.repo("dataset", "posttrain-org/demo")
    assert repo.private and [c["summary"].split(" ")[2].rstrip(",") for c in repo.commits] == [*CONFIGS, "card"]

    # what was uploaded is byte for byte what a dry run writes
    dry = tmp_path / "dry"
    publish(sample_run, PublishConfig(repo_id="posttrain-org/demo", dry_run=dry), echo=lambda _: None)
    uploaded = hub.file_bytes("dataset", "posttrain-org/demo")
    assert {p: _sha(b) for p, b in uploaded.items()} == {
        p.relative_to(dry).as_posix(): _sha(p.read_bytes()) for p in dry.rglob("*") if p.is_file()}
    model_files = hub.file_bytes("model", "tester/posttrain-moe")
    model_dir = sample_run / "models" / "dpo_model"
    for f in model_dir.iterdir():
        assert _sha(model_files[f.name]) == _sha(f.read_bytes())
    assert "tester/posttrain-moe" in model_files["README.md"].decode()

    puts, commits = hub.count("PUT", "."), sum(len(r.commits) for r in hub.repos.values())
    again = CliRunner().invoke(app, ["publish", str(sample_run), "--repo-id", "posttrain-org/demo",
                                     "--model-repo-id", "tester/posttrain-moe"])
    assert again.exit_code == 0, again.output
    assert again.output.count("already on the Hub, skipped") == len(CONFIGS) + 3
    assert hub.count("PUT", ".") == puts and sum(len(r.commits) for r in hub.repos.values()) == commits

    # files an older publication left (another shard count, a round this run no longer has) are deleted
    stale = ["data/sft/train-00001-of-00002.parquet", "data/online_dpo_round_9/train-00000-of-00001.parquet"]
    data_repo = hub.repo("dataset", "posttrain-org/demo")
    for path in stale:
        data_repo.lfs[path] = data_repo.lfs["data/sft/train-00000-of-00001.parquet"]
    third = publish(sample_run, PublishConfig(repo_id="posttrain-org/demo", endpoint=hub.endpoint), token=TOKEN,
                    echo=lambda _: None)
    assert third.uploaded == ["sft", "card"]
    assert [c["ops"] for c in data_repo.commits[-2:]] == [[("deletedFile", stale[0])], [("deletedFile", stale[1])]]
    assert set(hub.file_bytes("dataset", "posttrain-org/demo")) == set(uploaded)


def test_refused_commit_midway_says_what_was_uploaded_and_rerun_continues(sample_run, hub, monkeypatch):
    hub.refuse_commit_prefix = "data/online_dpo_round_2/"
    cfg = PublishConfig(repo_id="posttrain-org/demo", endpoint=hub.endpoint)
    with pytest.raises(PublishError) as err:
        publish(sample_run, cfg, token=TOKEN, echo=lambda _: None)
    msg = str(err.value)
    assert "stopped at 'online_dpo_round_2'" in msg and "HTTP 403" in msg
    assert "Already on the Hub: sft, preferences, online_dpo_round_1." in msg
    assert "Not uploaded: online_dpo_round_2, card." in msg and "rerun the same command" in msg
    assert sorted(hub.file_bytes("dataset", "posttrain-org/demo")) == [
        f"data/{c}/train-00000-of-00001.parquet" for c in ("online_dpo_round_1", "preferences", "sft")]

    hub.refuse_commit_prefix = None
    repo = hub.repo("dataset", "posttrain-org/demo")
    n_commits, puts = len(repo.commits), hub.count("PUT", ".")
    result = publish(sample_run, cfg, token=TOKEN, echo=lambda _: None)
    assert result.skipped == ["sft", "preferences", "online_dpo_round_1"]
    assert result.uploaded == ["online_dpo_round_2", "card"]
    # only the missing parts are committed; the refused shard's content had reached the LFS store,
    # so the LFS batch answer lets the client skip sending it again
    assert [op for c in repo.commits[n_commits:] for op in c["ops"]] == [
        ("lfsFile", "data/online_dpo_round_2/train-00000-of-00001.parquet"), ("file", "README.md")]
    assert hub.count("PUT", ".") == puts


def test_no_token_no_network_and_refusals_fail_before_any_upload(sample_run, hub, tmp_path):
    repo = "posttrain-org/demo"
    with pytest.raises(PublishError, match="no Hugging Face token found, nothing was uploaded"):
        publish(sample_run, PublishConfig(repo_id=repo, endpoint=hub.endpoint), echo=lambda _: None)
    assert hub.requests == []

    closed = FakeHub(token=TOKEN)  # started and stopped: its port now refuses connections
    with closed:
        dead = closed.endpoint
    with pytest.raises(PublishError, match=f"cannot reach the Hub at {dead}, nothing was uploaded"):
        publish(sample_run, PublishConfig(repo_id=repo, endpoint=dead), token=TOKEN, echo=lambda _: None)

    wrong = "hf_" + "x" * 34
    with pytest.raises(PublishError, match="refused the token, nothing was uploaded.*HTTP 401") as err:
        publish(sample_run, PublishConfig(repo_id=repo, endpoint=hub.endpoint), token=wrong, echo=lambda _: None)
    assert wrong not in str(err.value)

    with pytest.raises(PublishError, match="refused to create or open the dataset repo someone-else/demo.*HTTP 403"):
        publish(sample_run, PublishConfig(repo_id="someone-else/demo", endpoint=hub.endpoint), token=TOKEN,
                echo=lambda _: None)
    hub.role = "read"
    with pytest.raises(PublishError, match="is read-only, nothing was uploaded"):
        publish(sample_run, PublishConfig(repo_id=repo, endpoint=hub.endpoint), token=TOKEN, echo=lambda _: None)
    assert not any(m in ("PUT",) or "/preupload/" in p or "/commit/" in p for m, p in hub.requests)
    assert hub.repos == {}

    with pytest.raises(PublishError, match="not ORG/NAME"):
        publish(sample_run, PublishConfig(repo_id="no-namespace", dry_run=tmp_path / "x"), echo=lambda _: None)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("user file")
    with pytest.raises(PublishError, match="not empty and holds no posttrain bundle"):
        publish(sample_run, PublishConfig(repo_id=repo, dry_run=tmp_path / "busy"), echo=lambda _: None)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "user file"


def test_token_never_appears_in_output_logs_card_or_uploads(sample_run, hub, monkeypatch, caplog, capfd):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    hub.refuse_commit_prefix = "README.md"  # the last commit fails: the error path prints too
    result = CliRunner().invoke(app, ["publish", str(sample_run), "--repo-id", "posttrain-org/demo",
                                      "--model-repo-id", "tester/posttrain-moe"])
    assert result.exit_code == 1 and "stopped at 'card'" in result.output
    hub.refuse_commit_prefix = None
    ok = CliRunner().invoke(app, ["publish", str(sample_run), "--repo-id", "posttrain-org/demo",
                                  "--model-repo-id", "tester/posttrain-moe"])
    assert ok.exit_code == 0, ok.output
    assert f"Bearer {TOKEN}" in hub.auth_seen  # the token was in use ...
    captured = capfd.readouterr()
    texts = {"cli output": result.output + ok.output, "logs": caplog.text, "stdout": captured.out,
             "stderr": captured.err}
    for repo in hub.repos.values():
        for path, data in hub.file_bytes(repo.repo_type, repo.repo_id).items():
            texts[f"{repo.repo_id}/{path}"] = data.decode("latin-1")
    for where, text in texts.items():
        assert TOKEN not in text, f"the token leaked into {where}"  # ... and went nowhere else
    card = hub.file_bytes("dataset", "posttrain-org/demo")["README.md"].decode()
    assert "token: <redacted>" in card and "pushed with <redacted>" in card
