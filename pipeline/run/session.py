"""What a run holds while it runs: the Ray cluster it started or joined, and the worker pools of its model roles."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from pipeline.run.config import RunConfig
from pipeline.run.errors import RunError
from pipeline.run.stage import StageError

log = logging.getLogger("posttrain.runner")



class PoolManager:
    """Worker pools of the run's model roles, started lazily and shared by every stage; roles
    with identical settings share one pool."""

    def __init__(self, cfg: RunConfig, running: list | tuple = ()):
        self.cfg = cfg
        self._pools: dict[str, Any] = {}
        # Pools the caller already runs (a notebook, a test session) serve the roles configured
        # exactly like them; the caller keeps them: shutdown() leaves them up.
        self._given = {p.config.model_dump_json(): p for p in running}
        self.started = 0

    def get(self, role: str, stage: str = "?"):
        if role not in self.cfg.models:
            raise StageError(f"stage {stage} asks for model role {role!r}, which is not in the run config's models "
                             f"(defined: {', '.join(self.cfg.models) or 'none'}); fix: add models.{role}")
        pc = self.cfg.models[role]
        key = pc.model_dump_json()
        if key in self._given:
            return self._given[key]
        if key not in self._pools:
            from pipeline.engines.pool import WorkerPool

            log.info("starting worker pool for role %s: %s, %d worker(s)", role, pc.model, pc.num_workers)
            t0 = time.perf_counter()
            self._pools[key] = WorkerPool(pc)
            self.started += 1
            log.info("worker pool for role %s ready in %.0fs", role, time.perf_counter() - t0)
        return self._pools[key]

    def shutdown(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            try:
                pool.shutdown()
            except Exception as exc:  # shutting down must not hide the run's own error
                log.warning("worker pool shutdown failed: %s", exc)


class RayHandle:
    """Starts an embedded Ray or joins a cluster the first time a stage needs Ray."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.started = False
        self.info: dict | None = None

    def ensure(self) -> None:
        if self.info is not None:
            return
        # Keep embedded clusters on loopback (must be set before Ray starts; see PLATFORM.md).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        from pipeline.executor import ensure_ray

        address = self.cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            if address:
                log.info("joining the Ray cluster at %s", address)
                try:
                    ray.init(address=address, log_to_driver=True)
                except Exception as exc:
                    hint = ""
                    if "auth" in str(exc).lower() or "token" in str(exc).lower():
                        hint = ("; fix: set RAY_AUTH_MODE=token (Ray 2.60 clusters started with `ray start` use "
                                "token auth; the token is in ~/.ray/auth_token)")
                    raise RunError(f"cannot join the Ray cluster at {address}: {exc}{hint}") from None
            else:
                ensure_ray(num_cpus=self.cfg.ray.num_cpus, num_gpus=self.cfg.ray.num_gpus)
                self.started = True
                log.info("started an embedded Ray (%s)", ray.cluster_resources())
        ctx = ray.get_runtime_context()
        self.info = {"address": ctx.gcs_address, "embedded": self.started, "joined": bool(address),
                     "resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}}

    def shutdown(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False
            self.info = None
