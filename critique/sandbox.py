"""Run untrusted, model-written Python in a separate interpreter under resource limits, without network.

Why: self-consistency runs the code of every response against the record's tests; that code may loop,
fork, allocate without bound, fill the disk or reach out to the network. Each run gets:

* a fresh throwaway folder as working directory (removed afterwards), a stripped environment, no stdin,
  ``python -I -S`` (isolated mode, no site-packages: the standard library only);
* ``resource`` limits on CPU seconds, address space, file size, processes and open files, and a wall
  clock limit after which its whole session is killed (the process group, and any process that left it);
* its own network namespace when the kernel allows one (only a loopback that is down: every connect
  fails), else an audit hook that refuses socket calls (best effort: see ``_LAUNCHER``);
* when started by root, a fresh unprivileged user id, because the kernel does not apply RLIMIT_NPROC
  to root (nor to any process with CAP_SYS_RESOURCE or CAP_SYS_ADMIN): as root a fork bomb is stopped
  only after the switch to a uid that no other process uses, which also makes the limit count the
  sandbox's own processes only. That uid cannot write the caller's files either.

The limits are applied by a small launcher in the child (``-c _LAUNCHER``) rather than by
``preexec_fn``: ``preexec_fn`` is unsafe when the caller has threads, and the launcher can report what
it actually managed to apply.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from typing import IO, Literal

from pydantic import BaseModel, ConfigDict, Field

SandboxStatus = Literal["passed", "failed", "timeout", "cpu", "memory", "processes", "file_size",
                        "open_files", "network", "killed", "error"]
"""passed: exit status 0. failed: any other exit that no limit explains. timeout: killed after
``wall_seconds``. cpu: stopped by SIGXCPU. memory: MemoryError. processes: fork/thread refused.
file_size: a write past ``file_bytes``. open_files: too many open files. network: a refused network
call. killed: ended by another signal. error: the sandbox itself could not start the program."""
NetworkIsolation = Literal["netns", "audit_hook"]
"""netns: own network namespace (no usable interface). audit_hook: socket calls refused in Python."""
ProcessLimit = Literal["own_uid", "shared_uid", "none"]
"""own_uid: RLIMIT_NPROC counts only the sandbox's processes (fresh uid). shared_uid: the caller's uid
is not root; the limit is its current task count plus ``processes``. none: root, uid switch failed."""

MiB = 1 << 20
_UID_BASE, _UID_SPAN = 1_000_000, 1_000_000  # fresh uids are drawn here: above ordinary users


class SandboxLimits(BaseModel):
    """What one sandboxed run may use."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    cpu_seconds: int = Field(10, ge=1)
    """RLIMIT_CPU per process: SIGXCPU after this many CPU seconds (hard kill one second later)."""
    wall_seconds: float = Field(10.0, gt=0)
    """Wall-clock limit: then the run's whole session is killed."""
    memory_bytes: int = Field(512 * MiB, ge=64 * MiB)
    """RLIMIT_AS: address space per process (allocations beyond it raise MemoryError)."""
    file_bytes: int = Field(1 * MiB, ge=4096)
    """RLIMIT_FSIZE: largest file a process may write (its captured stdout/stderr included)."""
    processes: int = Field(32, ge=1)
    """RLIMIT_NPROC: processes and threads the run may have at once (see ``ProcessLimit``)."""
    open_files: int = Field(64, ge=16)
    """RLIMIT_NOFILE: open file descriptors per process."""
    output_chars: int = Field(4000, ge=0)
    """How much of the end of stdout and stderr the result keeps."""
    allow_netns: bool = True
    """Use a network namespace when the kernel allows it; False applies only the audit hook (the
    fallback; for testing it on machines where namespaces work)."""


class SandboxResult(BaseModel):
    """How one sandboxed run ended."""

    model_config = ConfigDict(frozen=True)

    status: SandboxStatus
    returncode: int | None
    """Exit status of the program's process (negative: the signal that ended it)."""
    seconds: float
    stdout: str
    """The last ``output_chars`` characters of stdout."""
    stderr: str
    """The last ``output_chars`` characters of stderr."""
    network: NetworkIsolation | None
    """The network isolation that was applied (None: the launcher did not get that far)."""
    processes: ProcessLimit
    uid: int | None
    """The fresh uid the program ran as (None: the caller's own uid)."""
    pid: int
    """The program's process id, which is also its process group and session id."""


# The launcher runs in the child before the program. It is passed as ``-c`` so that it is read while
# the child is still the caller's user. Order matters: the namespace first (root needs its
# capabilities for it), then the limits, then the uid switch, then no_new_privs.
# The audit hook fallback is bypassable by determined code (ctypes can call libc's connect directly,
# and a hook sees only Python-level socket calls): it stops ordinary and accidental network use, not an
# attacker. The namespace is enforced by the kernel.
_LAUNCHER = r"""
import builtins, ctypes, json, os, resource, runpy, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
report = {"network": "audit_hook", "uid": None}
if cfg["netns"]:
    flags = 0x40000000 if os.geteuid() == 0 else 0x40000000 | 0x10000000  # CLONE_NEWNET [| CLONE_NEWUSER]
    if libc.unshare(flags) == 0:
        report["network"] = "netns"
for name, limit in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), tuple(limit))
if cfg["uid"] is not None:
    uid = cfg["uid"]
    try:
        if cfg["keep_read"]:
            libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if cfg["keep_read"]:  # only CAP_DAC_READ_SEARCH (2): read the interpreter's files, write nothing
            header = (ctypes.c_uint32 * 2)(0x20080522, 0)
            data = (ctypes.c_uint32 * 6)(1 << 2, 1 << 2, 0, 0, 0, 0)
            if libc.capset(header, data) != 0:
                raise OSError(ctypes.get_errno(), "capset failed")
        report["uid"] = uid
    except OSError as exc:
        report["uid_error"] = str(exc)
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary or file capability regains privileges
if report["network"] != "netns":
    _refused = {"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
                "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg"}
    def _no_network(event, args):
        if event in _refused:
            raise PermissionError(f"sandbox: network access is disabled ({event})")
    sys.addaudithook(_no_network)
os.write(cfg["fd"], json.dumps(report).encode())
os.close(cfg["fd"])
builtins.exit = builtins.quit = sys.exit  # -S skips site, which defines them
sys.argv = [cfg["program"]]
runpy.run_path(cfg["program"], run_name="__main__")
"""

# stderr patterns that tell which limit a failing program ran into, checked in this order.
_MARKERS: list[tuple[SandboxStatus, re.Pattern[str]]] = [
    ("memory", re.compile(r"\bMemoryError\b")),
    ("processes", re.compile(r"BlockingIOError: \[Errno 11\]|Resource temporarily unavailable|"
                             r"can't start new thread")),
    ("file_size", re.compile(r"\[Errno 27\]|File too large")),
    ("open_files", re.compile(r"\[Errno 24\]|Too many open files")),
    ("network", re.compile(r"sandbox: network access is disabled|\[Errno (?:101|99|-3|-2)\]|"
                           r"Network is unreachable|Cannot assign requested address|"
                           r"Temporary failure in name resolution|Name or service not known")),
]


def run_python(program: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``program`` (Python source) in the sandbox and say how it ended; never runs it in-process."""
    limits = limits or SandboxLimits()
    folder = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    try:
        return _run_in(folder, program, limits)
    finally:
        _remove_tree(folder)


def _run_in(folder: str, program: str, limits: SandboxLimits) -> SandboxResult:
    path = os.path.join(folder, "program.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(program)
    root = os.geteuid() == 0
    uid = _fresh_uid() if root else None
    if uid is not None:
        for p in (folder, path):
            os.chown(p, uid, uid)
    nproc = limits.processes if root else _user_tasks(os.getuid()) + limits.processes
    rlimits = {
        "RLIMIT_CPU": (limits.cpu_seconds, limits.cpu_seconds + 1),
        "RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
        "RLIMIT_FSIZE": (limits.file_bytes, limits.file_bytes),
        "RLIMIT_NPROC": (nproc, nproc),
        "RLIMIT_NOFILE": (limits.open_files, limits.open_files),
        "RLIMIT_CORE": (0, 0),
    }
    rlimits = {name: _within_hard(name, soft, hard) for name, (soft, hard) in rlimits.items()}
    read_fd, write_fd = os.pipe()
    cfg = {"program": path, "fd": write_fd, "rlimits": rlimits, "uid": uid, "netns": limits.allow_netns,
           "keep_read": uid is not None and not _reachable_by_others(os.path.dirname(os.__file__))}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": folder, "LANG": "C.UTF-8"}
    timed_out = False
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)],
                                    cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    pass_fds=(write_fd,), start_new_session=True)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        try:
            returncode = proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_session(proc.pid, uid)
            returncode = proc.wait()
        seconds = time.monotonic() - start
        kill_session(proc.pid, uid)  # whatever it left running (forked children, daemons)
        report = _read_report(read_fd)
        stdout, stderr = _read_all(out), _read_all(err)
    status = _classify(returncode, timed_out, stderr, started=report is not None)
    ran_as = (report or {}).get("uid")
    processes: ProcessLimit = "shared_uid" if not root else ("own_uid" if ran_as is not None else "none")
    keep = limits.output_chars
    return SandboxResult(
        status=status, returncode=returncode, seconds=round(seconds, 3),
        stdout=stdout[-keep:] if keep else "", stderr=stderr[-keep:] if keep else "",
        network=(report or {}).get("network"), processes=processes, uid=ran_as, pid=proc.pid)


def _classify(returncode: int, timed_out: bool, stderr: str, started: bool) -> SandboxStatus:
    """Which of ``SandboxStatus`` explains the end of the run (the limit that stopped it, if one did)."""
    if timed_out:
        return "timeout"
    if returncode == -signal.SIGXCPU:
        return "cpu"
    if returncode == -signal.SIGXFSZ:
        return "file_size"
    if returncode == 0:
        return "passed"
    if not started:
        return "error"
    if returncode < 0:
        return "killed"
    for status, marker in _MARKERS:
        if marker.search(stderr):
            return status
    return "failed"


def session_processes(sid: int, uid: int | None) -> list[int]:
    """Live (not zombie) processes of session ``sid`` or of ``uid``: what a run may have left behind.

    The uid catches children that called setsid() to leave the session; without a fresh uid (caller
    not root) such a child is not found.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            real_uid = None
            if uid is not None:
                with open(f"/proc/{entry}/status", encoding="utf-8", errors="replace") as f:
                    real_uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, IndexError, StopIteration, ValueError):
            continue  # exited meanwhile
        state, session = fields[0], int(fields[3])
        if state != "Z" and (session == sid or (uid is not None and real_uid == uid)):
            found.append(int(entry))
    return found


def kill_session(sid: int, uid: int | None, rounds: int = 200) -> None:
    """SIGKILL the run's process group and every process ``session_processes`` finds, until none is left."""
    for _ in range(rounds):
        try:
            os.killpg(sid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        left = session_processes(sid, uid)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _fresh_uid() -> int:
    """A uid that no running process has (so RLIMIT_NPROC counts only the sandbox's processes)."""
    rng = random.SystemRandom()
    while True:
        uid = _UID_BASE + rng.randrange(_UID_SPAN)
        if not session_processes(-1, uid):
            return uid


def _user_tasks(uid: int) -> int:
    """Tasks (threads included, as RLIMIT_NPROC counts them) that ``uid`` runs now."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="utf-8", errors="replace") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return total


def _within_hard(name: str, soft: int, hard: int) -> tuple[int, int]:
    """The limit clipped to the caller's hard limit (raising a hard limit needs privileges)."""
    current = resource.getrlimit(getattr(resource, name))[1]
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    return soft, hard


def _reachable_by_others(path: str) -> bool:
    """Whether any user may search every folder on the way to ``path`` (and list it)."""
    path = os.path.realpath(path)
    if not os.stat(path).st_mode & stat.S_IROTH:
        return False
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _read_report(fd: int) -> dict | None:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        data = b""
    finally:
        os.close(fd)
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def _read_all(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode("utf-8", errors="replace")


def _remove_tree(folder: str) -> None:
    """Remove the throwaway folder, also where the program took away its own permissions."""
    def unlock(func, path, _exc) -> None:
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path, ignore_errors=True)
        else:
            func(path)

    shutil.rmtree(folder, onerror=unlock)

