"""Running work on Ray: start or join Ray, run tasks with bounded retries, find the user's error in Ray's.

Three callers share this: the runner's remote shards and remote calls (``StageContext.map`` / ``call``),
the worker pool's dispatch of request chunks to its engine actors, and the training launchers (Ray Train).
A worker that dies (a crashed process, a lost node, Ray's OOM killer) is retried up to a bound; an exception
raised by the user's code is not retried: it comes back as ``TaskError`` carrying that exception.
This module imports nothing of the project; Ray is imported on first use.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

WORKER_DEATH_ERRORS = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OutOfMemoryError", "RayActorError",
                       "ActorDiedError", "LocalRayletDiedError")
"""Names of the Ray exceptions that mean the process running the work died (retryable), not that the work
raised."""


# -- starting Ray -----------------------------------------------------------------------------------------
WORKER_LOG_DIR = "POSTTRAIN_WORKER_LOG_DIR"
"""Environment variable naming the folder where the Ray workers the project starts (vLLM engines, reward actors,
training workers) write their output, one file per worker (a run sets ``RUN_DIR/logs/workers``). Unset: the output
goes where Ray sends it (the driver's console)."""


@contextlib.contextmanager
def environment(values: dict[str, str | None]):
    """``os.environ`` with these variables set (None: unset) inside the block, restored after; what this process,
    the Ray workers it passes them to, and the processes it spawns in the block see."""
    def apply(settings: dict[str, str | None]) -> None:
        for key, value in settings.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    saved = {key: os.environ.get(key) for key in values}
    apply(values)
    try:
        yield
    finally:
        apply(saved)


@contextlib.contextmanager
def worker_logs_in(folder: str | os.PathLike | None):
    """Inside the block, workers started by the project write their output under ``folder`` (see
    ``WORKER_LOG_DIR``); None leaves the setting as it is."""
    if folder is None:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    with environment({WORKER_LOG_DIR: os.fspath(os.path.abspath(folder))}):
        yield


def worker_log_env() -> dict[str, str]:
    """``WORKER_LOG_DIR`` for a Ray worker's ``runtime_env`` env_vars (empty when the driver sets none)."""
    folder = os.environ.get(WORKER_LOG_DIR)
    return {WORKER_LOG_DIR: folder} if folder else {}


def log_worker_output(name: str) -> str | None:
    """In a Ray worker: send this process's stdout and stderr to ``<WORKER_LOG_DIR>/<name>-<pid>.log`` when that
    folder is set; returns the file. File descriptors 1 and 2 are redirected, so what C++ code and child
    processes (vLLM's engine core) print goes there too."""
    import sys

    folder = os.environ.get(WORKER_LOG_DIR)
    if not folder:
        return None
    path = os.path.join(folder, f"{name}-{os.getpid()}.log")
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path



def ensure_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS``, or start an embedded local Ray on loopback.

    Does nothing when Ray is already initialized in this process.
    """
    # Without this, Ray on Linux advertises the machine's network address even for a local
    # cluster; keep embedded clusters on loopback. It must be set before ray is imported.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    # With the workers' output in files, what Ray would still forward is its own actors' chatter (Ray Train's
    # controller, placement-group cleaners): it stays in Ray's session logs.
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             log_to_driver=not os.environ.get(WORKER_LOG_DIR), configure_logging=False)


def cluster_has_gpus() -> bool:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) > 0


# -- errors ---------------------------------------------------------------------------------------------------

@functools.cache
def worker_death_types() -> tuple[type, ...]:
    import ray.exceptions as rex

    return tuple(getattr(rex, n) for n in WORKER_DEATH_ERRORS if hasattr(rex, n))


def is_worker_death(exc: BaseException) -> bool:
    """Whether ``exc`` says the Ray worker died (rather than that the work raised)."""
    return isinstance(exc, worker_death_types())


def ray_cause(exc: BaseException) -> BaseException:
    """The user's exception inside a Ray error (``RayTaskError.cause``), or ``exc`` itself."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    inner = getattr(exc, "as_instanceof_cause", None)
    if callable(inner):
        with contextlib.suppress(Exception):
            return inner()
    return exc


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a ``raise ... from`` / ``__context__`` chain."""
    seen: set[int] = set()
    while True:
        nxt = exc.__cause__ or exc.__context__
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(exc))
        exc = nxt


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for one-line error reports."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class TaskError(RuntimeError):
    """The work raised on a Ray worker; ``cause`` is the user's exception, ``index`` / ``slot`` say which item
    and which worker slot."""

    def __init__(self, index: int, slot: Any, cause: BaseException):
        self.index, self.slot, self.cause = index, slot, cause
        super().__init__(f"{type(cause).__name__}: {cause}")


class WorkerDied(RuntimeError):
    """The worker running an item died more often than the retry bound allows; ``last`` is Ray's last error."""

    def __init__(self, index: int, slot: Any, attempts: int, last: BaseException):
        self.index, self.slot, self.attempts, self.last = index, slot, attempts, last
        super().__init__(f"item {index}: its Ray worker died {attempts} times; last error: {first_line(last)}")


# -- running items on workers -----------------------------------------------------------------------------------

def run_items(todo: Sequence[int], submit: Callable[[int, Any], Any], slots: Sequence[Any], *, max_retries: int,
              on_result: Callable[[int, Any], None], on_death: Callable[[int, Any, BaseException, int], None] | None = None,
              cancel_on_error: bool = True) -> int:
    """Run every item of ``todo`` on a free slot, at most one item per slot at a time; returns the retries.

    ``submit(item, slot)`` starts the item and returns its Ray object ref (a task, or an actor call where the
    slot is an actor's index). ``on_result(item, value)`` gets each result as it arrives. When a worker dies, the
    item goes back to the front of the queue (``WorkerDied`` once it died more than ``max_retries`` times) and
    ``on_death(item, slot, error, attempt)`` runs before the slot takes work again (e.g. to restart an actor). An
    exception raised by the work itself raises ``TaskError`` at once; with ``cancel_on_error`` the items still
    running are cancelled (tasks only: Ray cannot force-cancel actor calls).
    """
    import ray

    pending = list(todo)
    free = list(slots)
    attempts: dict[int, int] = {}
    running: dict[Any, tuple[int, Any]] = {}
    retries = 0
    ok = False
    try:
        while pending or running:
            while pending and free:
                i, s = pending.pop(0), free.pop(0)
                running[submit(i, s)] = (i, s)
            done, _ = ray.wait(list(running), num_returns=1)
            i, s = running.pop(done[0])
            try:
                value = ray.get(done[0])
            except worker_death_types() as exc:
                attempts[i] = attempts.get(i, 0) + 1
                retries += 1
                if attempts[i] > max_retries:
                    raise WorkerDied(i, s, attempts[i], exc) from None
                if on_death is not None:
                    on_death(i, s, exc, attempts[i])
                free.append(s)
                pending.insert(0, i)
                continue
            except ray.exceptions.RayTaskError as exc:
                raise TaskError(i, s, ray_cause(exc)) from None
            free.append(s)
            on_result(i, value)
        ok = True
    finally:
        if not ok and cancel_on_error:
            for ref in running:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
    return retries


@functools.cache
def _remote_apply():
    import ray

    return ray.remote(_apply)


def remote_task(name: str, num_cpus: float, num_gpus: float):
    """A Ray task (call ``.remote(fn, *args, **kwargs)``) that runs ``fn(*args, **kwargs)`` with these resources,
    named for the dashboard, with no retries of Ray's own: ``run_items`` retries, bounded and logged. The task's
    body lives in this light module, so a Ray worker imports nothing heavy to run it."""
    return _remote_apply().options(name=name, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0,
                                   retry_exceptions=False)


def _apply(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def check_capacity(num_cpus: float, num_gpus: float, fixed_cluster: bool, what: str, fix: str) -> None:
    """A task asking for more than any node offers would wait forever: raise on a fixed (embedded) cluster,
    warn on a joined one (an autoscaler may still add such a node)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= num_cpus and r.get("GPU", 0) >= num_gpus for r in nodes):
        return
    best = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    msg = (f"{what} asks {num_cpus:g} CPU / {num_gpus:g} GPU per task, but no Ray node offers that (largest: "
           f"{best.get('CPU', 0):g} CPU / {best.get('GPU', 0):g} GPU)")
    if fixed_cluster:
        raise CapacityError(f"{msg}; fix: {fix}")
    log.warning("%s; its tasks wait until such a node joins", msg)


class CapacityError(RuntimeError):
    """No node of a fixed cluster can ever run a task with the requested resources."""
