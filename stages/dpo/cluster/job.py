"""The driver's side of the rounds' Ray Train job: start it, send it requests, notice when a worker died and
start it again from the last finished round.

``ClusterRoundTrainer`` has the methods of ``stages.dpo.loop``'s round trainer (``train``, ``ref_logprobs``,
``sync``, ``checkpoint``, ``export``, ``close``); each is one request to every worker of the job
(``worker.serve``). When a worker dies the request raises ``TrainerRestarted`` after the job was started again
(at most ``distributed.max_restarts`` times) from the latest finished round's sharded checkpoint: the loop then
runs the round again from its saved pairs, and the next sync builds a new weight-sync group.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stages.dpo.config import OnlineDPOConfig

log = logging.getLogger(__name__)

CHECKPOINT = "policy_dcp"
"""A round folder's sharded checkpoint (``shard.save_sharded``)."""
JOB_TIMEOUT_S = 6 * 3600
"""Process-group timeout of the workers: they wait in a broadcast while the driver samples and scores a round."""
POLL_S = 2.0


class TrainerRestarted(RuntimeError):
    """A training worker died; the job was started again from the last finished round (the round reruns)."""


class ClusterRoundTrainer:
    """The rounds' training on a Ray Train job (see the module docstring)."""

    def __init__(self, cfg: OnlineDPOConfig, sft_path: str, sft_rows: Sequence[dict], work: Path, seed: int,
                 latest_checkpoint: Callable[[], Path | None], test_kill: tuple[int, str, int] | None = None):
        from pipeline.training.ray_train import resolve_scaling

        self.cfg, self.work, self.seed = cfg, work, seed
        self.latest_checkpoint = latest_checkpoint
        d = cfg.distributed
        self.workers, self.use_gpu = resolve_scaling(d.num_workers, d.use_gpu)
        self.restarts = 0
        self.sync_dtype: str | None = None
        self._spec = {"config": cfg.model_dump(mode="json"), "sft_path": str(sft_path), "seed": seed,
                      "sft_rows": list(sft_rows) if cfg.sft_replay_coef > 0 else [], "use_gpu": self.use_gpu,
                      "torch_threads": d.torch_threads or _default_threads(self.workers, self.use_gpu)}
        self._test_kill = test_kill
        self._job = None
        self._start()

    # -- the job ---------------------------------------------------------------------------------------------
    def _start(self) -> None:
        from ray.util.queue import Queue

        from pipeline.training.ray_train import BackgroundTrainJob, TrainJob

        d = self.cfg.distributed
        self._requests, self._answers = Queue(), Queue()
        start = self.latest_checkpoint()
        spec = {**self._spec, "requests": self._requests, "answers": self._answers,
                "start_checkpoint": str(start) if start else None,
                "kill_rank_in": self._test_kill if self.restarts == 0 else None}
        job = TrainJob(name="dpo", work_dir=self.work, workers=self.workers, use_gpu=self.use_gpu,
                       cpus_per_worker=d.cpus_per_worker, gpus_per_worker=d.gpus_per_worker,
                       storage_path=d.storage_path)
        log.info("dpo: starting the training job (%d %s workers, %s) from %s", self.workers,
                 "GPU" if self.use_gpu else "CPU", d.strategy, start or "the SFT policy")
        self._job = BackgroundTrainJob(_serve, spec, job, timeout_s=JOB_TIMEOUT_S)
        self.info = self._answer("start")

    def _answer(self, op: str) -> Any:
        while True:
            try:
                answer = self._answers.get(timeout=POLL_S)
            except queue.Empty:
                if self._job.alive():
                    continue
                if _worker_died(self._job.raw_error):
                    self._restart(op)
                error = self._job.error
                raise RuntimeError(f"dpo training job ended in {op!r} without an answer: {type(error).__name__}: "
                                   f"{error}; see the worker logs (RUN_DIR/logs/workers)") from error
            if "error" in answer:
                self._job.join(60)
                if _worker_died(self._job.raw_error):
                    self._restart(op)
                raise RuntimeError(f"dpo training job failed in {op!r}: {answer['error']}")
            return answer["ok"]

    def _restart(self, op: str) -> None:
        error = self._job.error
        self._close_queues()
        if self.restarts >= self.cfg.distributed.max_restarts:
            raise RuntimeError(f"dpo training job failed in {op!r} ({type(error).__name__}: {error}) after "
                               f"{self.restarts} restarts; fix: see the worker logs, or raise "
                               "dpo.distributed.max_restarts") from error
        self.restarts += 1
        log.warning("dpo: a training worker died in %r (%s); starting the job again (restart %d of %d)", op, error,
                    self.restarts, self.cfg.distributed.max_restarts)
        self._start()
        raise TrainerRestarted(f"training job restarted after a worker died in {op!r}")

    def call(self, op: str, **kwargs: Any) -> Any:
        """Run request ``op`` on every worker; rank 0's answer."""
        self._requests.put((op, kwargs))
        return self._answer(op)

    def close(self) -> None:
        """Stop the job; the engines leave its weight-sync group (a later collective sync builds a new one)."""
        if self._job is not None and self._job.alive():
            self._requests.put(("stop", {}))
            self._job.join(120)
        self._close_queues()
        self._job = None
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.reset_sync()

    def _close_queues(self) -> None:
        for q in (getattr(self, "_requests", None), getattr(self, "_answers", None)):
            if q is not None:
                try:
                    q.shutdown()
                except Exception:  # noqa: BLE001 - the queue's actor may be gone with a dead node
                    log.debug("dpo: could not shut a request queue down", exc_info=True)

    # -- the round trainer interface -------------------------------------------------------------------------
    def train(self, round_index: int, pairs: Sequence[dict], seed: int) -> dict[str, float]:
        return self.call("train", pairs=list(pairs), seed=seed, round_index=round_index)

    def ref_logprobs(self, items: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        return self.call("ref_logprobs", items=[(list(p), list(c)) for p, c in items])

    def sync(self, pool) -> dict:
        """The served weights into ``pool``'s engines through the collective transport: shapes checked first,
        then the engines receive while every worker gathers and rank 0 sends. A restarted job gets a new group."""
        if getattr(self, "_synced_job", None) is not self._job:
            pool.reset_sync()  # a (re)started job: the engines leave the old group, the sync builds a new one
            self._synced_job = self._job
        self._pool = pool
        dtype = pool.dtype
        meta = self.call("weight_metadata", dtype=dtype)
        return pool.sync_remote(meta, lambda group: self.call("sync", group=group, dtype=dtype),
                                master_address=self.info["node_ip"])

    def checkpoint(self, rdir: Path) -> None:
        self.call("checkpoint", folder=str(Path(rdir).resolve() / CHECKPOINT))

    def export(self, out_dir: Path) -> None:
        self.call("export", folder=str(Path(out_dir).resolve()))


def _serve(spec: dict) -> dict:
    from stages.dpo.cluster.worker import serve

    return serve(spec)


def _worker_died(error: BaseException | None) -> bool:
    """Whether the job ended because a worker process died (restartable), not because the code failed: Ray
    Train's error names every rank's failure, and a dead worker's reads "health check failed" or "actor died"
    (the other ranks then fail in a collective with a connection error, which alone proves nothing)."""
    if error is None:
        return False
    text = f"{type(error).__name__}: {error}"
    return any(s in text for s in ("ActorDied", "health check failed", "worker process has died", "died unexpectedly",
                                     "ActorUnavailable"))


def _default_threads(workers: int, use_gpu: bool) -> int | None:
    import os

    return None if use_gpu else max(1, (os.cpu_count() or 1) // workers)
