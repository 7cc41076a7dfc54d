"""For the kill-and-resume tests: start `posttrain run` in a subprocess and SIGKILL it at a chosen moment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POSTTRAIN = Path(sys.executable).parent / "posttrain"


def start_run(config: Path, log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """`posttrain run CONFIG --quiet` from the repository root, its output in ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen([str(POSTTRAIN), "run", str(config), "--quiet"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log_path: Path, timeout_s: float,
              waiting_for: str) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (checked every 50 ms). Fails, with the end of the run's log,
    when the run ends first or ``waiting_for`` has not happened after ``timeout_s``; the process is killed and
    reaped in every case."""
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before it was killed:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, \
                f"no {waiting_for} after {timeout_s:g} s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
