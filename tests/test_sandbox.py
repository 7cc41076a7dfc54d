"""The code sandbox (``critique.sandbox``) with real subprocesses: every limit is shown to stop a program
that would otherwise succeed (a 4 GiB allocation, a 100 MiB file, 200 children, a connection to a live
listener), and a run leaves no process and no folder behind."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from critique.sandbox import SandboxLimits, run_python

FAST = SandboxLimits(wall_seconds=10, cpu_seconds=5)


def _live(sid: int, uid: int | None) -> list[int]:
    """Processes (not zombies) still in session ``sid`` or running as ``uid`` (read from /proc here,
    independently of the sandbox's own clean-up)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{entry}/status").read_text()
        except (OSError, IndexError):
            continue
        real_uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if stat[0] != "Z" and (int(stat[3]) == sid or (uid is not None and real_uid == uid)):
            found.append(int(entry))
    return found


def test_passing_and_failing_programs_run_in_a_throwaway_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    program = ("import os, unittest\n"  # the standard library imports without site-packages (-S)
               "open('escape.txt', 'w').write('x')\n"
               "print(os.getcwd())\n"
               "exit(0)\n")  # exit() works although -S skips site
    passed = run_python(program, FAST)
    assert (passed.status, passed.returncode) == ("passed", 0), passed.stderr
    folder = Path(passed.stdout.strip())
    assert folder != tmp_path and not folder.exists()  # its own folder, removed afterwards
    assert not (tmp_path / "escape.txt").exists()
    failed = run_python("def add(a, b):\n    return a - b\n\nassert add(2, 2) == 4\n", FAST)
    assert (failed.status, failed.returncode) == ("failed", 1)
    assert "AssertionError" in failed.stderr
    assert failed.network in ("netns", "audit_hook")
    if passed.uid is not None:  # started by root: it ran as a fresh uid, which cannot write our files
        target = tmp_path / "absolute.txt"
        denied = run_python(f"open({str(target)!r}, 'w').write('x')\n", FAST)
        assert denied.status == "failed" and "PermissionError" in denied.stderr
        assert not target.exists()


def test_a_fork_bomb_is_refused_and_leaves_nothing_behind():
    limits = SandboxLimits(wall_seconds=10, processes=32)
    # Bounded first: 200 sleeping children would all start without the limit.
    bounded = ("import os, time\n"
               "for i in range(200):\n"
               "    try:\n"
               "        pid = os.fork()\n"
               "    except OSError:\n"
               "        print(i, flush=True)\n"
               "        raise\n"
               "    if pid == 0:\n"
               "        time.sleep(30)\n"
               "        os._exit(0)\n")
    result = run_python(bounded, limits)
    assert result.status == "processes" and result.processes != "none", result.stderr
    assert "BlockingIOError" in result.stderr
    assert int(result.stdout.split()[-1]) < 32  # refused before the limit was passed
    assert result.seconds < 10  # it did not wait for the sleeping children
    assert _live(result.pid, result.uid) == []  # the children were killed
    # Now the real thing.
    result = run_python("import os\nwhile True:\n    os.fork()\n", limits)
    assert result.status in ("processes", "timeout"), result.stderr
    assert result.seconds < 15
    assert _live(result.pid, result.uid) == []


def test_a_child_that_leaves_the_session_is_killed_too():
    program = ("import os, time\n"
               "pid = os.fork()\n"
               "if pid == 0:\n"
               "    os.setsid()\n"
               "    time.sleep(60)\n"
               "    os._exit(0)\n"
               "print(pid)\n")
    result = run_python(program, FAST)
    if result.uid is None:
        pytest.skip("not root: no fresh uid to find a child that left the session by")
    assert result.status == "passed"
    child = int(result.stdout.strip())
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_memory_hog_is_reported_as_memory():
    limits = SandboxLimits(wall_seconds=10, memory_bytes=512 << 20)
    assert run_python("b = bytearray(128 << 20)\n", limits).status == "passed"  # below the limit: fine
    result = run_python("b = bytearray(4 << 30)\n", limits)
    assert result.status == "memory" and "MemoryError" in result.stderr


def test_a_long_sleep_times_out_and_a_cpu_spin_hits_the_cpu_limit():
    result = run_python("import time\ntime.sleep(60)\n", SandboxLimits(wall_seconds=2))
    assert result.status == "timeout" and result.returncode == -signal.SIGKILL
    assert 1.9 <= result.seconds < 6
    assert _live(result.pid, result.uid) == []
    result = run_python("while True:\n    pass\n", SandboxLimits(wall_seconds=20, cpu_seconds=1))
    assert result.status == "cpu" and result.returncode == -signal.SIGXCPU
    assert result.seconds < 10  # the CPU limit stopped it, not the wall clock


@pytest.mark.parametrize("allow_netns", [True, False], ids=["best", "audit_hook"])
def test_no_network_inside_while_the_same_connection_works_outside(allow_netns):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # outside the sandbox the listener is reachable
        listener.accept()[0].close()
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)\nprint('connected')\n"
        result = run_python(program, SandboxLimits(wall_seconds=10, allow_netns=allow_netns))
        assert result.status == "network", result.stderr
        assert "connected" not in result.stdout
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing got through
    assert result.network in (("netns", "audit_hook") if allow_netns else ("audit_hook",))


def test_a_file_size_bomb_is_stopped():
    limits = SandboxLimits(wall_seconds=10, file_bytes=1 << 20)
    assert run_python("open('small', 'wb').write(b'x' * (100 << 10))\n", limits).status == "passed"
    result = run_python("print(__import__('os').getcwd())\nopen('big', 'wb').write(b'x' * (100 << 20))\n", limits)
    assert result.status == "file_size" and "File too large" in result.stderr
    assert not Path(result.stdout.strip()).exists()


def test_too_many_open_files():
    result = run_python("files = [open('f%d' % i, 'w') for i in range(200)]\n",
                        SandboxLimits(wall_seconds=10, open_files=32))
    assert result.status == "open_files"
