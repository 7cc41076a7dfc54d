"""The runner on Ray: shard tasks whose worker is killed are retried (bounded) and finished shards
stay; `ray job submit --working-dir . -- posttrain run CONFIG` joins a real `ray start --head`
cluster on loopback (started here on free ports, and only its own processes stopped after)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.run.artifacts import ArtifactStore
from pipeline.run.config import load_config
from pipeline.run.runner import RunError, Runner

pytestmark = pytest.mark.slow  # real Ray clusters and killed processes

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def lengths_config(tmp_path: Path, crash_times: int, max_retries: int, num_workers: int = 2) -> Path:
    path = tmp_path / "lengths.yaml"
    path.write_text(textwrap.dedent(f"""\
        run_dir: {tmp_path / 'run'}
        seed: 2
        plugins: ["tests.runner_stages:ALL"]
        graph: [docs, lengths]
        shard_size: 4
        resources:
          lengths: {{remote: true, num_cpus: 1, num_workers: {num_workers}, max_retries: {max_retries}}}
        stages:
          docs: {{limit: 12}}
          lengths: {{crash_shard: 1, crash_times: {crash_times}}}
    """))
    return path


def check_lengths(store: ArtifactStore) -> list[dict]:
    docs = {r["id"]: r for r in store.read_dataset("docs").to_list()}
    rows = store.read_dataset("lengths").to_list()
    assert [r["id"] for r in rows] == list(docs)  # every record once, in order
    assert all(r["chars"] == len(docs[r["id"]]["text"]) for r in rows)
    return rows


def test_killed_ray_worker_is_retried(tmp_path, ray_session):
    cfg = load_config(lengths_config(tmp_path, crash_times=1, max_retries=2))
    Runner(cfg, quiet=True).run()
    store = ArtifactStore(tmp_path / "run")
    manifest = store.read_manifest("lengths")
    assert manifest["state"] == "done" and manifest["maps"]["lengths"]["retries"] == 1
    assert len(list((tmp_path / "run" / "stages" / "lengths" / "work").glob("crash-*"))) == 1
    rows = check_lengths(store)
    assert os.getpid() not in {r["worker_pid"] for r in rows}  # shards ran on Ray workers
    assert manifest["metrics"]["call_pid"] != os.getpid()  # and so did ctx.call
    assert manifest["ray"]["embedded"] is False  # joined the Ray this process already had


def test_worker_deaths_beyond_max_retries_fail_and_finished_shards_stay(tmp_path, ray_session):
    path = lengths_config(tmp_path, crash_times=3, max_retries=1, num_workers=1)
    with pytest.raises(RunError, match=r"stage lengths: shard 1 of 'lengths': its Ray worker died 2 times "
                                       r"\(resources.lengths.max_retries=1\); last error: WorkerCrashedError"):
        Runner(load_config(path), quiet=True).run()
    store = ArtifactStore(tmp_path / "run")
    assert store.read_manifest("lengths")["state"] == "failed"
    assert [p.name for p in store.shard_files("lengths")] == ["shard-00000.parquet"]
    kept = store.shard_files("lengths")[0].stat().st_mtime_ns
    # Retries are not part of the fingerprint: a rerun with more of them resumes from shard 1.
    items = Runner(load_config(path, ["resources.lengths.max_retries=2"]), quiet=True).run()
    assert [(i.stage, i.action) for i in items] == [("docs", "skip"), ("lengths", "resume")]
    manifest = store.read_manifest("lengths")
    assert manifest["state"] == "done" and manifest["maps"]["lengths"]["resumed"] == 1
    assert manifest["maps"]["lengths"]["retries"] == 1  # the third and last crash
    assert store.shard_files("lengths")[0].stat().st_mtime_ns == kept
    check_lengths(store)


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_pids(temp_dir: str) -> list[int]:
    """Processes of the test cluster: their command line names its private temp dir."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if temp_dir.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_ray_job_submit_joins_the_cluster(tmp_path):
    # Loopback only, token auth as Ray 2.60's `ray start` requires (PLATFORM.md).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", PATH=f"{BIN}:{env.get('PATH', '')}")
    gcs, dash, client, agent_listen, agent_grpc, metrics, runtime_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="ptray", dir="/tmp")  # short: Ray's socket paths have a length limit
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent_listen}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answering (401 without the token): it is up
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not come up in 180s"
                time.sleep(1)
        cfg = tmp_path / "job.yaml"
        cfg.write_text(textwrap.dedent(f"""\
            run_dir: {tmp_path / 'run'}
            plugins: ["tests.runner_stages:ALL"]
            graph: [docs, lengths]
            shard_size: 8
            resources: {{lengths: {{remote: true, num_workers: 2}}}}
            stages: {{docs: {{limit: 24}}}}
        """))
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
             "--", "posttrain", "run", str(cfg), "--quiet"],
            env=env, capture_output=True, text=True, timeout=400)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower()
        store = ArtifactStore(tmp_path / "run")
        manifest = store.read_manifest("lengths")
        assert manifest["state"] == "done"
        assert manifest["ray"]["address"] == f"127.0.0.1:{gcs}" and manifest["ray"]["joined"] is True
        assert manifest["ray"]["embedded"] is False
        rows = check_lengths(store)
        assert manifest["metrics"]["driver_pid"] not in {r["worker_pid"] for r in rows}
        assert json.loads((tmp_path / "run" / "stages" / "docs" / "manifest.json").read_text())["state"] == "done"
    finally:
        with_pids = _session_pids(temp_dir)
        try:
            os.killpg(head.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # `ray start --block` can take long to stop: a test cluster
            os.killpg(head.pid, signal.SIGKILL)  # loses nothing to SIGKILL
            head.wait()
        for pid in set(with_pids) | set(_session_pids(temp_dir)):  # anything of this cluster still up
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
