"""Run a training function as a Ray Train job (``TorchTrainer``) and return what its rank 0 returned.

The generic part of a training stage's launch, shared by the trainers that run on Ray Train (SFT; online DPO
next): how many workers and whether they use GPUs, the resources each reserves, Ray Train's storage path as a
URI, the CPU worker's runtime environment, the niceness of the worker processes, Ray Train's print patch
undone, and the worker's own exception dug out of Ray Train's wrapping. The worker function gets the job's
config dict on every rank; rank 0's return value (JSON) comes back to the caller.

Imports layers 0-1 only (``files``, ``executor``); nothing of ``stages``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.executor import cluster_has_gpus, ensure_ray, log_worker_output, root_cause, worker_log_env
from pipeline.files import atomic_write_json
from pipeline.tracking import tracking_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """Where a Ray Train job runs and where it keeps its state."""

    name: str
    """Ray Train run name; also names the job in errors."""
    work_dir: Path
    """Folder of rank 0's result file and, unless ``storage_path`` is set, of Ray Train's run state."""
    workers: int = 1
    """Training workers (one process each)."""
    use_gpu: bool = False
    """Each worker reserves a GPU (``gpus_per_worker`` of one)."""
    cpus_per_worker: float = 1.0
    """Ray CPUs each worker reserves."""
    gpus_per_worker: float = 1.0
    """With ``use_gpu``: the share of a GPU each worker reserves (below 1: it shares the GPU with other actors)."""
    worker_nice: int | None = 0
    """Niceness of the worker processes (Ray starts its workers at nice 15); None: keep Ray's."""
    storage_path: str | None = None
    """Ray Train's storage: a URI (s3://, gs://...) or a local path; None: ``work_dir / "ray_train"``."""
    result_file: str = "result.json"
    """File in ``work_dir`` where rank 0 writes the worker function's return value."""


def resolve_scaling(num_workers: int | Literal["auto"], use_gpu: bool | Literal["auto"]) -> tuple[int, bool]:
    """(workers, use_gpu) for a job, joining or starting Ray. use_gpu auto: when the Ray cluster has GPUs;
    num_workers auto: one per GPU of the cluster, or 1 without GPUs."""
    import ray

    ensure_ray()
    gpu = cluster_has_gpus() if use_gpu == "auto" else bool(use_gpu)
    if num_workers == "auto":
        workers = int(ray.cluster_resources().get("GPU", 0)) if gpu else 1
    else:
        workers = num_workers
    return max(1, workers), gpu


def _torch_trainer(worker: Callable[[dict], Any], config: dict, job: TrainJob, result_path: Path | None,
                   timeout_s: int | None = None):
    """Ray Train's TorchTrainer running ``worker(config)`` on every worker of ``job``; rank 0 writes its return
    value to ``result_path`` (when given). ``timeout_s``: of the workers' process-group operations (Ray's default
    when None)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    nice = job.worker_nice

    def loop(loop_config: dict) -> None:
        import ray.train

        _undo_print_patch()
        log_worker_output(f"{job.name}-rank{ray.train.get_context().get_world_rank()}")
        if nice is not None:
            renice_threads(nice)
        out = worker(loop_config)
        if result_path is not None and ray.train.get_context().get_world_rank() == 0:
            atomic_write_json(result_path, out)

    resources = {"CPU": job.cpus_per_worker}
    if job.use_gpu:
        resources["GPU"] = job.gpus_per_worker
    return TorchTrainer(
        loop, train_loop_config=config,
        torch_config=TorchConfig(timeout_s=timeout_s) if timeout_s else None,
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage_uri(job.storage_path, Path(job.work_dir)), name=job.name,
                             worker_runtime_env={"env_vars": {**cpu_worker_env(job.use_gpu), **worker_log_env(),
                                                                **tracking_env()}}),
    )


def run_train_job(worker: Callable[[dict], Any], config: dict, job: TrainJob) -> Any:
    """Run ``worker(config)`` on every worker of a Ray Train job; returns what rank 0's call returned.

    A failure on a worker raises RuntimeError naming the job and the worker's own exception (type and message).
    """
    ensure_ray()
    result_path = Path(job.work_dir) / job.result_file
    result_path.unlink(missing_ok=True)
    trainer = _torch_trainer(worker, config, job, result_path)
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train wraps the worker's exception; surface its message
        cause = worker_exception(exc)
        raise RuntimeError(f"{job.name} Ray Train job failed: {type(cause).__name__}: {cause}") from exc
    if result.error is not None:
        raise RuntimeError(f"{job.name} Ray Train job failed: {result.error}") from result.error
    if not result_path.exists():
        raise RuntimeError(f"{job.name} Ray Train job ended without writing {result_path}; see the worker log above")
    return json.loads(result_path.read_text())


class BackgroundTrainJob:
    """A Ray Train job whose ``fit()`` runs in a thread of this process, for workers that serve requests while
    the caller goes on (the online DPO rounds). ``error`` is the worker's own exception once the job failed."""

    def __init__(self, worker: Callable[[dict], Any], config: dict, job: TrainJob, timeout_s: int | None = None):
        import threading

        ensure_ray()
        self.name = job.name
        self.error: BaseException | None = None
        self.raw_error: BaseException | None = None
        """Ray Train's own error (every rank's failure in its text); ``error`` is the lowest failed rank's."""
        self._trainer = _torch_trainer(worker, config, job, None, timeout_s)
        self._thread = threading.Thread(target=self._fit, name=f"ray-train-{job.name}", daemon=True)
        self._thread.start()

    def _fit(self) -> None:
        try:
            result = self._trainer.fit()
            if result.error is not None:
                self.error = self.raw_error = result.error
        except Exception as exc:  # noqa: BLE001 - kept for the caller, who raises it with context
            self.raw_error = exc
            self.error = worker_exception(exc)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def worker_exception(exc: BaseException) -> BaseException:
    """The exception a worker raised, inside Ray Train's error: the lowest failed rank's (``WorkerGroupError``
    keeps each rank's exception), or the controller's, followed to the root of its ``raise ... from`` chain."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        exc = failures[min(failures)]
    elif isinstance(getattr(exc, "controller_failure", None), BaseException):
        exc = exc.controller_failure
    return root_cause(exc)


def _undo_print_patch() -> None:
    """Ray Train patches print() into its logger, which also logs what a library prints into a captured stream:
    dill (behind `datasets` fingerprints) disassembles functions that way, pages of bytecode per run. Plain print
    still reaches the driver through Ray's log."""
    try:
        import builtins

        from ray.train.v2._internal.logging import patch_print

        builtins.print = patch_print._original_print
    except ImportError:  # another Ray version: at worst, noisy logs
        pass


def renice_threads(nice: int) -> None:
    """Set the niceness of every thread of this process (Linux keeps it per thread; threads started
    later inherit it). Lowering it needs CAP_SYS_NICE or a matching RLIMIT_NICE: else left as is."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:  # not permitted, or the thread ended
            log.debug("ray_train: cannot set niceness %d on thread %d", nice, tid)


def cpu_worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment of a CPU training worker: one malloc arena (``MALLOC_ARENA_MAX=1``, unless set already).

    Ray Train runs the training function in a thread of the worker process, and glibc gives each thread its own
    arena: heaps it maps and unmaps as tensors come and go, so the training steps page-fault and zero the same
    memory again and again, which ``pipeline.memory.large_buffers_on_heap`` cannot change (it tunes the main
    arena). With one arena the thread allocates from the main heap, as a training on the main thread does. The
    arena count is read when the process starts, hence the worker's runtime env. The README's Performance
    section has the measured effect.
    """
    if use_gpu:
        return {}
    return {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1")}


def storage_uri(configured: str | None, work: Path) -> str:
    """Ray Train's storage path: a URI (s3://, gs://...) as given, a local path made absolute (Ray requires it)."""
    if configured and "://" in configured:
        return configured
    return str(Path(configured or work / "ray_train").resolve())
