"""A pool of vLLM engines, each held by a Ray actor (``engine.EngineActor``).

- On GPUs: one actor per tensor-parallel group, placed with a placement group of ``tp`` GPU
  bundles (vLLM's Ray executor then puts its TP workers in that group).
- On CPU (vLLM's CPU build): one actor per worker; with tp=1 the engine runs inside the actor
  process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weight syncs pass tensors by reference.

Requests are chat conversations; results come back in request order. Batches are cut into
chunks that go to whichever worker is free (``executor.run_items``); a chunk whose worker dies is
re-sent to a restarted worker (bounded by ``max_retries``). Weight syncs go through the transports
of ``sync/registry.py``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.engines.engine import EngineActor, EngineStartError, engine_settings
from pipeline.engines.sync.registry import SyncTransports, check_transport_name
from pipeline.executor import TaskError, WorkerDied, ray_cause, run_items
from pipeline.models.catalog import ModelError, resolve_model

__all__ = ["ChatRequest", "ChatResult", "Completion", "EngineActor", "EngineStartError", "PoolConfig", "WorkerPool"]

log = logging.getLogger(__name__)


class PoolConfig(BaseModel):
    """A pool of vLLM engines serving one model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str = "smollm2-moe"
    """Embedded model name (see `posttrain models list`) or a transformers model folder."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where engines run. auto: cuda when the Ray cluster has GPUs, else vLLM's CPU build."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Engine dtype. auto: float32 on CPU (CPUs without bf16 units, such as AVX2 ones, compute bfloat16
    slowly), bfloat16 on GPU."""
    num_workers: int = Field(1, ge=1)
    """Engines in the pool (each is one Ray actor and one tensor-parallel group)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per engine (vLLM tensor parallelism). Must be 1 on CPU."""
    num_cpus_per_worker: float = Field(1.0, gt=0)
    """Ray CPUs each engine actor reserves."""
    cpu_threads: int | None = Field(None, ge=1)
    """CPU only: threads each engine computes with (OMP_NUM_THREADS). None: the machine's cores divided
    among the pool's workers. Ray would otherwise set it to `num_cpus_per_worker` (1), leaving the other
    cores idle."""
    max_model_len: int = Field(2048, ge=64)
    """Longest prompt + completion, in tokens."""
    max_num_seqs: int = Field(64, ge=1)
    """Sequences an engine batches at once."""
    kv_cache_gib: int = Field(2, ge=1)
    """CPU only: KV cache size per engine in whole GiB (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """GPU only: fraction of each GPU's memory vLLM may use."""
    gpus_per_engine: float = Field(1.0, gt=0, le=1)
    """GPU only, tensor_parallel_size 1: the share of a GPU each engine reserves in Ray. Below 1 the engine can
    share its GPU with a trainer worker or a scoring actor (colocation; lower gpu_memory_utilization to match, and
    set ``engine_kwargs: {enable_sleep_mode: true}`` so DPO can free the engine's memory while it trains)."""
    enforce_eager: bool | None = None
    """Skip CUDA graphs / torch.compile. None: True on CPU, False on GPU."""
    chunk_size: int = Field(256, ge=1)
    """Largest number of requests sent to one engine in one call (the unit that is re-sent if a worker dies)."""
    max_retries: int = Field(2, ge=0)
    """Times a chunk is re-sent after its worker died before the call fails."""
    seed: int = 0
    """Engine seed (requests can also carry their own seed)."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for vllm.LLM (e.g. {"enable_prefix_caching": false})."""
    sync_transport: str = "auto"
    """How `sync_weights` moves weights into the engines: auto, or a transport of
    pipeline/engines/sync/registry.py (each documented there). shared_memory: the trainer writes the weights once
    into a memory segment every engine maps, laid out for vLLM's CPU kernels, which load straight from it (CPU
    engines on the trainer's machine, tensor parallel size 1). object_store: through Ray's object store and
    vLLM's `reload_weights` (any engine, any node). collective: a gloo (CPU) or NCCL (GPU) group of the sender and
    every engine through vLLM's weight-transfer calls, also from an FSDP2 trainer job (not in auto). auto: the registry's order, each transport where it applies
    (shared_memory after its first sync has checked that it leaves the engines exactly as vLLM's reload does;
    object_store otherwise)."""

    @field_validator("sync_transport")
    @classmethod
    def _known_transport(cls, value: str) -> str:
        return check_transport_name(value)


@dataclass
class ChatRequest:
    """One chat-format generation request."""

    messages: list[dict[str, str]]
    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    """Per-request seed: the same request and seed give the same samples whatever the batch."""
    logprobs: bool = False
    """Return the log-probability of every sampled token (raw model logprobs, before temperature)."""
    stop: list[str] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    """Arguments for the model's chat template, e.g. ``{"enable_thinking": False}`` (``pipeline.thinking``)."""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None


@dataclass
class ChatResult:
    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)
    worker: int = 0
    """Index of the engine that served the request."""


class WorkerPool:
    """vLLM engines on Ray actors. Use as a context manager or call shutdown()."""

    def __init__(self, config: PoolConfig | None = None, **overrides):
        import ray

        from pipeline.executor import cluster_has_gpus, ensure_ray

        self.config = cfg = (config or PoolConfig()).model_copy(update=overrides)
        self.model_path = str(resolve_model(cfg.model))
        ensure_ray()
        device = cfg.device if cfg.device != "auto" else ("cuda" if cluster_has_gpus() else "cpu")
        if device == "cpu" and cfg.tensor_parallel_size != 1:
            raise ValueError("pool.tensor_parallel_size must be 1 on CPU (vLLM's CPU build runs one process per engine here)")
        self.device = device
        self.dtype = cfg.dtype if cfg.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
        self._engine_args, self._env = engine_settings(cfg, device, self.dtype)
        self._placement_groups = []
        self._transports = SyncTransports(self)
        self._actor_cls = ray.remote(EngineActor)
        self.actors = [self._start_actor(i) for i in range(cfg.num_workers)]
        self._wait_ready(self.actors)

    # -- lifecycle -------------------------------------------------------------------------
    def _start_actor(self, index: int):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.config
        options: dict[str, Any] = {"runtime_env": {"env_vars": self._env}}
        if self.device == "cuda":
            tp = cfg.tensor_parallel_size
            share = cfg.gpus_per_engine if tp == 1 else 1
            pg = placement_group([{"GPU": share, "CPU": cfg.num_cpus_per_worker}] * tp, strategy="STRICT_PACK")
            self._placement_groups.append(pg)
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_capture_child_tasks=True)
            # tp=1: the actor uses its bundle's GPU; tp>1: vLLM's Ray workers take the bundles.
            options["num_gpus"] = share if tp == 1 else 0
            options["num_cpus"] = cfg.num_cpus_per_worker if tp == 1 else 0
        else:
            options["num_cpus"] = cfg.num_cpus_per_worker
        return self._actor_cls.options(**options).remote(self.model_path, self._engine_args, index)

    def _wait_ready(self, actors) -> None:
        import ray

        for i, actor in enumerate(actors):
            try:
                ready = actor.info.remote()
                self._wait_placed(i, ready)
                ray.get(ready)
            except Exception as exc:
                cause = ray_cause(exc)
                self.shutdown()
                if isinstance(cause, ModelError):
                    raise ModelError(str(cause)) from None
                raise EngineStartError(f"worker {i}: {cause}") from None

    def _wait_placed(self, index: int, ref, every_s: float = 60.0) -> None:
        """Wait for the engine to answer; while it waits for CPUs or GPUs that other actors hold (an engine or a
        reward actor of an earlier step still up), say so once a minute, with the fix, instead of hanging
        silently."""
        import ray

        cfg = self.config
        need_gpu = self.config.gpus_per_engine if self.device == "cuda" else 0
        while not ray.wait([ref], timeout=every_s)[0]:
            free = ray.available_resources()
            if free.get("CPU", 0) < cfg.num_cpus_per_worker or free.get("GPU", 0) < need_gpu:
                total = ray.cluster_resources()
                log.warning("vLLM worker %d of %s is waiting for %g CPU / %g GPU: the cluster has %g of %g CPUs and "
                            "%g of %g GPUs free, the rest held by other engines and actors of the run; fix: give Ray "
                            "more logical CPUs (ray.num_cpus in the run config), or models.<role>.num_cpus_per_worker "
                            "less", index, self.model_path, cfg.num_cpus_per_worker, need_gpu, free.get("CPU", 0),
                            total.get("CPU", 0), free.get("GPU", 0), total.get("GPU", 0))

    def _restart(self, index: int) -> None:
        """Replace worker ``index`` with a fresh engine, given the weights of the last sync."""
        import ray

        try:
            ray.kill(self.actors[index])
        except Exception:
            pass
        log.warning("restarting vLLM worker %d", index)
        self.actors[index] = self._start_actor(index)
        self._wait_ready([self.actors[index]])
        self._transports.restore(index)  # the new engine loaded the model folder's weights

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in getattr(self, "actors", []):
            try:
                ray.get(actor.shutdown.remote(), timeout=30)
            except Exception:
                pass
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.actors = []
        if getattr(self, "_transports", None) is not None:
            self._transports.close()
        for pg in self._placement_groups:
            try:
                remove_placement_group(pg)
            except Exception:
                pass
        self._placement_groups = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- work ------------------------------------------------------------------------------
    def _dispatch(self, method: str, items: Sequence[Any], progress: Callable[[int], None] | None = None) -> list:
        """Run ``method`` over ``items`` in chunks on free workers; results in item order."""
        if not items:
            return []
        size = max(1, min(self.config.chunk_size, math.ceil(len(items) / len(self.actors))))
        chunks = [list(items[i:i + size]) for i in range(0, len(items), size)]
        results: list[list] = [[] for _ in chunks]

        def finished(c: int, value: list) -> None:
            results[c] = value
            if progress is not None:
                progress(len(chunks[c]))

        def died(c: int, w: int, exc: BaseException, attempt: int) -> None:
            log.warning("vLLM worker %d died (%s); re-sending its %d requests (retry %d/%d)", w, type(exc).__name__,
                        len(chunks[c]), attempt, self.config.max_retries)
            self._restart(w)

        try:
            run_items(range(len(chunks)), lambda c, w: getattr(self.actors[w], method).remote(chunks[c]),
                      range(len(self.actors)), max_retries=self.config.max_retries, on_result=finished,
                      on_death=died, cancel_on_error=False)  # Ray cannot force-cancel actor calls
        except WorkerDied as exc:
            raise RuntimeError(f"vLLM worker {exc.slot} died {exc.attempts} times on a chunk of "
                               f"{len(chunks[exc.index])} requests; last error: {ray_cause(exc.last)}") from None
        except TaskError as exc:
            raise RuntimeError(f"vLLM worker {exc.slot} failed: {exc.cause}") from None
        return [r for chunk in results for r in chunk]

    def generate(self, requests: Sequence[ChatRequest], progress: Callable[[int], None] | None = None) -> list[ChatResult]:
        """Sample completions for chat requests; results come back in request order."""
        payload = [asdict(r) for r in requests]
        raw = self._dispatch("generate", payload, progress)
        return [ChatResult(prompt_token_ids=r["prompt_token_ids"], worker=r["worker"],
                           completions=[Completion(**c) for c in r["completions"]]) for r in raw]

    def completion_logprobs(self, items: Sequence[tuple[list[dict], str]]) -> list[list[float]]:
        """Per-token log-probabilities the served model gives fixed completions after chat prompts."""
        return self._dispatch("completion_logprobs", list(items))

    # -- sleep mode (GPU) -------------------------------------------------------------------
    def sleep_mode_problem(self) -> str | None:
        """Why ``sleep`` cannot work on this pool, with the fix; None when it can."""
        if self.device != "cuda":
            return (f"the engines of {self.model_path} run on CPU and vLLM's sleep mode is GPU-only; fix: "
                    "dpo.sleep_engines_while_training: false")
        if not self.config.engine_kwargs.get("enable_sleep_mode"):
            return (f"the engines of {self.model_path} were started without sleep mode; fix: set engine_kwargs: "
                    "{enable_sleep_mode: true} on their model role")
        return None

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode on every engine: level 1 moves the weights to host memory and drops the KV cache, so
        a trainer on the same GPUs gets the memory back (see ``sleep_mode_problem``)."""
        import ray

        problem = self.sleep_mode_problem()
        if problem:
            raise ValueError(problem)
        ray.get([a.sleep.remote(level) for a in self.actors])

    def wake_up(self) -> None:
        """Bring every engine back from ``sleep`` (weights and KV cache on the GPU again)."""
        import ray

        ray.get([a.wake_up.remote() for a in self.actors])

    # -- weights ---------------------------------------------------------------------------
    def sync_weights(self, model, dtype=None, transport: str | None = None) -> dict:
        """Push ``model``'s current weights into every engine, in memory, without a restart.

        ``transport`` overrides ``pool.sync_transport`` for this call. Returns timings: export (model ->
        the transport), put (into Ray's object store; 0 through shared memory), load (slowest engine),
        total seconds, bytes sent, and the transport used (plus that transport's extras).
        A model whose tensors do not match the served checkpoint is refused before any engine is touched.
        """
        import torch

        from pipeline.memory import release_freed_memory

        # A sync usually follows a training step in this process: return its freed heap before the export
        # allocates the payload (the engines and the trainer share the RAM on a CPU machine).
        release_freed_memory()
        target = dtype or getattr(torch, self.dtype)
        return self._transports.sync(model, target, transport or self.config.sync_transport).as_dict()

    def sync_remote(self, metadata: list, send: Callable[[dict], Any], master_address: str | None = None) -> dict:
        """Push weights that a trainer job's ranks send, through the collective transport: ``metadata`` is
        ``collective.weight_metadata(model, dtype)`` (checked against the served checkpoint first), ``send(spec)``
        makes every rank run ``CollectiveSender(spec).send``; ``master_address`` is trainer rank 0's node. Returns
        ``sync_weights``' timings."""
        return self._transports.sync_remote(metadata, send, master_address).as_dict()

    def reset_sync(self) -> None:
        """Close the sync transports (the shared segment, the first-sync check, a fallback they made): the next
        sync sets them up as in a fresh pool. The engines keep the weights they hold."""
        self._transports.close()

    @functools.cached_property
    def served_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape of the checkpoint the engines serve: what every sync is checked against."""
        from pipeline.engines.sync.base import checkpoint_shapes

        return checkpoint_shapes(self.model_path)

    def checksums(self, names: list[str]) -> list[dict]:
        """Per engine: the sum of each named parameter as loaded (vLLM's names), to check a sync took effect."""
        import ray

        return [r[0] for r in ray.get([a.call_extension.remote("posttrain_weight_checksum", names)
                                       for a in self.actors])]
