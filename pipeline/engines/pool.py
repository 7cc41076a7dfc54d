"""A pool of vLLM engines, each held by a Ray actor.

- On GPUs: one actor per tensor-parallel group, placed with a placement group of ``tp`` GPU
  bundles (vLLM's Ray executor then puts its TP workers in that group).
- On CPU (vLLM's CPU build): one actor per worker; with tp=1 the engine runs inside the actor
  process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weight syncs pass tensors by reference.

Requests are chat conversations; results come back in request order. Batches are cut into
chunks that go to whichever worker is free; a chunk whose worker dies is re-sent to a restarted
worker (bounded by ``max_retries``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.executor import ray_cause, root_cause
from pipeline.models.catalog import ModelError, model_architecture, resolve_model

log = logging.getLogger(__name__)

WORKER_EXTENSION = "pipeline.engines.vllm_worker.WeightSyncExtension"


class PoolConfig(BaseModel):
    """A pool of vLLM engines serving one model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str = "smollm2-moe"
    """Embedded model name (see `posttrain models list`) or a transformers model folder."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where engines run. auto: cuda when the Ray cluster has GPUs, else vLLM's CPU build."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Engine dtype. auto: float32 on CPU (no bf16 units on AVX2 machines: 3x faster measured), bfloat16 on GPU."""
    num_workers: int = Field(1, ge=1)
    """Engines in the pool (each is one Ray actor and one tensor-parallel group)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per engine (vLLM tensor parallelism). Must be 1 on CPU."""
    num_cpus_per_worker: float = Field(1.0, gt=0)
    """Ray CPUs each engine actor reserves."""
    cpu_threads: int | None = Field(None, ge=1)
    """CPU only: threads each engine computes with (OMP_NUM_THREADS). None: the machine's cores divided
    among the pool's workers. Ray would otherwise set it to `num_cpus_per_worker` (1), which measured
    0.65x the speed of a plain vLLM engine on a 2-core machine."""
    max_model_len: int = Field(2048, ge=64)
    """Longest prompt + completion, in tokens."""
    max_num_seqs: int = Field(64, ge=1)
    """Sequences an engine batches at once."""
    kv_cache_gib: int = Field(2, ge=1)
    """CPU only: KV cache size per engine in whole GiB (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """GPU only: fraction of each GPU's memory vLLM may use."""
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
    sync_transport: Literal["auto", "shared_memory", "object_store"] = "auto"
    """How `sync_weights` moves weights into the engines. shared_memory: the trainer writes them once into a
    memory segment every engine maps, laid out for vLLM's CPU kernels, which load straight from it (CPU
    engines on the trainer's machine, tensor parallel size 1; measured 3-4x faster than object_store on the
    embedded policy). object_store: through Ray's object store and vLLM's `reload_weights` (any engine,
    any node). auto: shared_memory where it applies, after the first sync has checked that it leaves the
    engines exactly as vLLM's reload does; object_store otherwise."""


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


class EngineStartError(RuntimeError):
    """An engine failed to start; the message carries the root cause."""


class EngineActor:
    """Holds one vllm.LLM. Wrapped with ray.remote by WorkerPool (resources set there)."""

    def __init__(self, model_path: str, engine_args: dict, index: int):
        self.index = index
        self.model_path = model_path
        try:
            import vllm
            from vllm import LLM, ModelRegistry

            arch = model_architecture(__import__("pathlib").Path(model_path))
            if arch not in ModelRegistry.get_supported_archs():
                raise ModelError(
                    f"{model_path}: architecture {arch} is not one vLLM {vllm.__version__} can serve; "
                    "fix: use a model whose architecture vLLM supports (e.g. Qwen2MoeForCausalLM, "
                    "LlamaForCausalLM) or convert it"
                )
            self.llm = LLM(model=model_path, worker_extension_cls=WORKER_EXTENSION, **engine_args)
        except ModelError:
            raise
        except Exception as exc:
            root = root_cause(exc)
            raise EngineStartError(
                f"vLLM engine {index} for {model_path} failed to start: {type(root).__name__}: {root}"
            ) from exc
        self.tokenizer = self.llm.get_tokenizer()
        self.expected_shapes = _checkpoint_shapes(model_path)

    def info(self) -> dict:
        import vllm

        return {"index": self.index, "pid": os.getpid(), "vllm": vllm.__version__, "model": self.model_path}

    def generate(self, requests: list[dict]) -> list[dict]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=r["n"], temperature=r["temperature"], top_p=r["top_p"], max_tokens=r["max_tokens"],
                seed=r["seed"], logprobs=0 if r["logprobs"] else None, stop=r["stop"],
            )
            for r in requests
        ]
        outs = self.llm.chat([r["messages"] for r in requests], params, use_tqdm=False)
        results = []
        for req, out in zip(requests, outs, strict=True):
            comps = []
            for c in out.outputs:
                lps = None
                if req["logprobs"] and c.logprobs is not None:
                    lps = [step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids, strict=False)]
                comps.append({"text": c.text, "token_ids": list(c.token_ids),
                              "finish_reason": c.finish_reason or "unknown", "logprobs": lps})
            results.append({"prompt_token_ids": list(out.prompt_token_ids or []), "completions": comps,
                            "worker": self.index})
        return results

    def completion_logprobs(self, items: list[tuple[list[dict], str]]) -> list[list[float]]:
        """Per-token logprobs of fixed completions after chat prompts (teacher forcing)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, spans = [], []
        for messages, completion in items:
            p = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            p = list(p["input_ids"] if hasattr(p, "keys") else p)
            c = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
            prompts.append(TokensPrompt(prompt_token_ids=p + c))
            spans.append((len(p), c))
        outs = self.llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        result = []
        for out, (start, comp) in zip(outs, spans, strict=True):
            pl = out.prompt_logprobs
            result.append([pl[start + i][tok].logprob for i, tok in enumerate(comp)])
        return result

    def load_weights(self, payload) -> dict:
        if isinstance(payload, list):
            _check_weights_match(_payload_shapes(payload), self.expected_shapes, self.model_path)
        result = self.llm.collective_rpc("posttrain_load_weights", args=(payload,))[0]
        # KV blocks cached for shared prefixes were computed with the old weights: drop them, or
        # prompts seen before the sync would keep attending to stale keys/values.
        self.llm.reset_prefix_cache()
        return result

    def shared_plan(self, shapes: dict[str, tuple[int, ...]]) -> dict:
        _check_weights_match({n: tuple(sh) for n, sh in shapes.items()}, self.expected_shapes, self.model_path)
        return self.llm.collective_rpc("posttrain_shared_plan", args=(shapes,))[0]

    def load_shared(self, path: str, nbytes: int, verify: bool) -> dict:
        result = self.llm.collective_rpc("posttrain_load_shared", args=(path, nbytes, verify))[0]
        self.llm.reset_prefix_cache()  # as in load_weights
        return result

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def checksum(self, names: list[str]) -> dict:
        return self.llm.collective_rpc("posttrain_weight_checksum", args=(names,))[0]

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # best effort: the actor is killed right after
                pass
            self.llm = None


def _checkpoint_shapes(model_path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in the model folder's safetensors files (headers only, no data read)."""
    from pathlib import Path

    from safetensors import safe_open

    shapes = {}
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def _payload_shapes(payload: list) -> dict[str, tuple[int, ...]]:
    return {item[0]: tuple(item[2]) if len(item) == 4 else tuple(item[1].shape) for item in payload}


def _check_weights_match(got: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], model_path: str) -> None:
    """Refuse a sync whose tensors (name -> shape) do not match the served model, before touching the
    engine (a half-applied reload would leave the engine serving a mix of old and new weights)."""
    if not expected:
        return
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    shape = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or extra or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unknown to the engine (e.g. {extra[0]})")
        if shape:
            parts.append(f"{len(shape)} with another shape (e.g. {shape[0]}: got {got[shape[0]]}, "
                         f"engine has {expected[shape[0]]})")
        raise ValueError(f"weight sync refused for {model_path}: the trained model does not match the served one: "
                         + "; ".join(parts) + ". Fix: train the model the pool serves (same config).")


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
        dtype = cfg.dtype if cfg.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
        self.dtype = dtype
        engine_args = {
            "dtype": dtype,
            "max_model_len": cfg.max_model_len,
            "max_num_seqs": cfg.max_num_seqs,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "seed": cfg.seed,
            "enforce_eager": cfg.enforce_eager if cfg.enforce_eager is not None else device == "cpu",
            "disable_log_stats": True,
        }
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if cfg.tensor_parallel_size == 1 else "1",
               "TOKENIZERS_PARALLELISM": "false",
               # vLLM's INFO lines drown the pipeline's progress bars; VLLM_LOGGING_LEVEL=INFO brings them back
               "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        if device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
            threads = cfg.cpu_threads or max(1, (os.cpu_count() or 1) // cfg.num_workers)
            env["OMP_NUM_THREADS"] = str(threads)
            # vLLM 0.32 CPU: a seeded request whose prompt is prefilled in chunks (a batch of long
            # prompts over the step's token budget) kills the engine ("CPU Generator does not use
            # offset"); without chunked prefill a prompt is always prefilled whole.
            engine_args["enable_chunked_prefill"] = False
        else:
            engine_args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            if cfg.tensor_parallel_size > 1:
                engine_args["distributed_executor_backend"] = "ray"
        engine_args.update(cfg.engine_kwargs)
        self._engine_args = engine_args
        self._env = env
        self._placement_groups = []
        self._shared: dict | bool | None = None  # shared-memory sync state; None: not set up yet, False: not used
        self._actor_cls = ray.remote(EngineActor)
        self.actors = [self._start_actor(i) for i in range(cfg.num_workers)]
        self._wait_ready(self.actors)

    # -- lifecycle -------------------------------------------------------------------------
    def _start_actor(self, index: int):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.config
        options: dict[str, Any] = {"runtime_env": {"env_vars": self._env}, "name": None}
        if self.device == "cuda":
            tp = cfg.tensor_parallel_size
            pg = placement_group([{"GPU": 1, "CPU": cfg.num_cpus_per_worker}] * tp, strategy="STRICT_PACK")
            self._placement_groups.append(pg)
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_capture_child_tasks=True)
            # tp=1: the actor uses its bundle's GPU; tp>1: vLLM's Ray workers take the bundles.
            options["num_gpus"] = 1 if tp == 1 else 0
            options["num_cpus"] = cfg.num_cpus_per_worker if tp == 1 else 0
        else:
            options["num_cpus"] = cfg.num_cpus_per_worker
        options.pop("name")
        return self._actor_cls.options(**options).remote(self.model_path, self._engine_args, index)

    def _wait_ready(self, actors) -> None:
        import ray

        for i, actor in enumerate(actors):
            try:
                ray.get(actor.info.remote())
            except Exception as exc:
                cause = ray_cause(exc)
                self.shutdown()
                if isinstance(cause, ModelError):
                    raise ModelError(str(cause)) from None
                raise EngineStartError(f"worker {i}: {cause}") from None

    def _restart(self, index: int) -> None:
        import ray

        try:
            ray.kill(self.actors[index])
        except Exception:
            pass
        log.warning("restarting vLLM worker %d", index)
        self.actors[index] = self._start_actor(index)
        self._wait_ready([self.actors[index]])
        if self._shared and self._shared["written"]:
            # the new engine loaded the model folder's weights: give it the last synced ones, from the segment
            ray.get(self.actors[index].shared_plan.remote({n: s for n, (_, s) in self._shared["layout"].items()}))
            self._load_shared([self.actors[index]])
            log.warning("vLLM worker %d restarted with the last synced weights", index)

    def shutdown(self) -> None:
        import ray

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
        if getattr(self, "_shared", None):
            self._shared["segment"].close()
        self._shared = None
        from ray.util.placement_group import remove_placement_group

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
        import ray

        if not items:
            return []
        n_workers = len(self.actors)
        size = max(1, min(self.config.chunk_size, math.ceil(len(items) / n_workers)))
        chunks = [list(items[i:i + size]) for i in range(0, len(items), size)]
        results: list[list | None] = [None] * len(chunks)
        attempts = [0] * len(chunks)
        pending = list(range(len(chunks)))
        running: dict[Any, tuple[int, int]] = {}  # ref -> (chunk, worker)
        idle = list(range(n_workers))
        while pending or running:
            while pending and idle:
                c, w = pending.pop(0), idle.pop(0)
                ref = getattr(self.actors[w], method).remote(chunks[c])
                running[ref] = (c, w)
            done, _ = ray.wait(list(running), num_returns=1)
            ref = done[0]
            c, w = running.pop(ref)
            try:
                results[c] = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError,
                    ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as exc:
                attempts[c] += 1
                if attempts[c] > self.config.max_retries:
                    raise RuntimeError(
                        f"vLLM worker {w} died {attempts[c]} times on a chunk of {len(chunks[c])} requests; "
                        f"last error: {ray_cause(exc)}") from None
                log.warning("vLLM worker %d died (%s); re-sending its %d requests", w, type(exc).__name__, len(chunks[c]))
                # Other chunks still running on that worker died with it and come back here too.
                if not any(wk == w for _, wk in running.values()):
                    self._restart(w)
                    idle.append(w)
                pending.insert(0, c)
                continue
            except ray.exceptions.RayTaskError as exc:
                raise RuntimeError(f"vLLM worker {w} failed: {ray_cause(exc)}") from None
            idle.append(w)
            if progress is not None:
                progress(len(chunks[c]))
        return [r for chunk in results for r in chunk]  # type: ignore[union-attr]

    def generate(self, requests: Sequence[ChatRequest], progress: Callable[[int], None] | None = None) -> list[ChatResult]:
        """Sample completions for chat requests; results come back in request order."""
        payload = [asdict(r) for r in requests]
        raw = self._dispatch("generate", payload, progress)
        return [ChatResult(prompt_token_ids=r["prompt_token_ids"], worker=r["worker"],
                           completions=[Completion(**c) for c in r["completions"]]) for r in raw]

    def completion_logprobs(self, items: Sequence[tuple[list[dict], str]]) -> list[list[float]]:
        """Per-token log-probabilities the served model gives fixed completions after chat prompts."""
        return self._dispatch("completion_logprobs", list(items))

    def sync_weights(self, model, dtype=None, transport: str | None = None) -> dict:
        """Push ``model``'s current weights into every engine, in memory, without a restart.

        ``transport`` overrides ``pool.sync_transport`` for this call. Returns timings: export (model ->
        the transport), put (into Ray's object store; 0 through shared memory), load (slowest engine),
        total seconds, bytes sent, and the transport used.
        """
        import torch

        from pipeline.memory import release_freed_memory

        # A sync usually follows a training step in this process: return its freed heap before the export
        # allocates the payload (the engines and the trainer share the RAM on a CPU machine).
        release_freed_memory()
        target = dtype or getattr(torch, self.dtype)
        mode = transport or self.config.sync_transport
        if mode not in ("auto", "shared_memory", "object_store"):
            raise ValueError(f"sync transport {mode!r}: use auto, shared_memory or object_store")
        if mode == "object_store":
            return self._sync_object_store(model, target)
        if self._shared is None and self._shared_applies(mode):
            self._shared = self._shared_setup(model, mode)
        if mode == "shared_memory" and not self._shared:
            raise ValueError("pool.sync_transport=shared_memory: this pool fell back to the object store "
                             "(see the log for why); use auto or object_store")
        if self._shared and target == getattr(torch, self._shared["dtype"]):
            result = self._sync_shared(model)
            if result is not None:
                return result
        return self._sync_object_store(model, target)

    def _shared_applies(self, mode: str) -> bool:
        """Whether the shared-memory transport can apply here (the engines still have a say: see _shared_setup)."""
        import ray

        cfg = self.config
        why = None
        if self.device != "cpu" or cfg.tensor_parallel_size != 1:
            why = "it serves CPU engines with tensor parallel size 1 only"
        elif any(n != ray.get_runtime_context().get_node_id() for n in ray.get([a.node_id.remote() for a in self.actors])):
            why = "an engine runs on another node"
        if why is None:
            return True
        if mode == "shared_memory":
            raise ValueError(f"pool.sync_transport=shared_memory does not apply: {why}; use auto or object_store")
        self._shared = False
        return False

    def _shared_setup(self, model, mode: str) -> dict | bool:
        """Check the trainer's views and the engines' plans; make the segment. False: use the object store."""
        import ray

        from pipeline.engines.weight_sync import (
            SharedSegment,
            checkpoint_views,
            views_match_checkpoint_format,
        )

        convention, why = views_match_checkpoint_format(model)
        plans = []
        if convention is not None:
            with checkpoint_views(model, convention) as views:
                shapes = {n: tuple(t.shape) for n, t in views}
            plans = ray.get([a.shared_plan.remote(shapes) for a in self.actors])
            why = next((p["reason"] for p in plans if "reason" in p), "")
            if not why and any(p != plans[0] for p in plans):
                why = "the engines laid the weights out differently"
        if why:
            if mode == "shared_memory":
                raise ValueError(f"pool.sync_transport=shared_memory does not apply to {self.model_path}: {why}")
            log.info("weight sync through Ray's object store: the shared-memory path does not apply (%s)", why)
            return False
        plan = plans[0]
        return {"segment": SharedSegment(plan["nbytes"]), "layout": plan["layout"], "dtype": plan["dtype"],
                "convention": convention, "verified": False, "written": False}

    def _sync_shared(self, model) -> dict | None:
        """One sync through the shared segment; None (nothing sent) for a model whose tensors are not the
        ones the segment was laid out for. The first sync is checked against vLLM's reload (see
        _load_shared); if that found a difference the engines hold the reload's result of the same weights,
        and later syncs use the object store."""
        import torch

        from pipeline.engines.weight_sync import checkpoint_views

        sh = self._shared
        t0 = time.perf_counter()
        with checkpoint_views(model, sh["convention"]) as views:
            if {n: tuple(t.shape) for n, t in views} != {n: tuple(shape) for n, (_, shape) in sh["layout"].items()}:
                return None
            n_bytes = sh["segment"].write(views, sh["layout"], getattr(torch, sh["dtype"]))
        sh["written"] = True
        t1 = time.perf_counter()
        loads = self._load_shared(self.actors)
        if loads is None:
            return None
        t2 = time.perf_counter()
        return {"export_s": t1 - t0, "put_s": 0.0, "load_s": t2 - t1, "total_s": t2 - t0, "bytes": n_bytes,
                "workers": len(loads), "engine_load_s": max(x["seconds"] for x in loads),
                "transport": "shared_memory", "checked_against_reload": any(x["verified"] for x in loads),
                "check_mismatch": next((x["verify_mismatch"] for x in loads if x["verify_mismatch"]), None)}

    def _load_shared(self, actors) -> list[dict] | None:
        """Load the segment into ``actors``; None when an engine could not (first sync only: nothing changed)."""
        import ray

        sh = self._shared
        seg = sh["segment"]
        try:
            loads = ray.get([a.load_shared.remote(seg.path, seg.nbytes, not sh["verified"]) for a in actors])
        except ray.exceptions.RayTaskError as exc:
            if sh["verified"]:
                raise
            log.warning("weight sync: an engine could not load from shared memory (%s); syncing through Ray's "
                        "object store from now on", ray_cause(exc))
            seg.close()
            self._shared = False
            return None
        bad = next((x["verify_mismatch"] for x in loads if x["verify_mismatch"]), None)
        if bad is not None:
            log.warning("weight sync: loading straight into vLLM's kernels gave %s another value than vLLM's "
                        "reload; syncing through Ray's object store from now on", bad)
            seg.close()
            self._shared = False
        else:
            sh["verified"] = True
        return loads

    def _sync_object_store(self, model, target) -> dict:
        import ray

        from pipeline.engines.weight_sync import checkpoint_format_tensors, pack_tensors, payload_bytes

        t0 = time.perf_counter()
        packed = pack_tensors(checkpoint_format_tensors(model, target))
        t1 = time.perf_counter()
        ref = ray.put(packed)
        t2 = time.perf_counter()
        if self.config.tensor_parallel_size == 1:
            loads = ray.get([a.load_weights.remote(ref) for a in self.actors])
        else:  # vLLM's TP workers are Ray actors: each fetches the object itself
            import ray.cloudpickle as cloudpickle

            blob = cloudpickle.dumps(ref)
            loads = ray.get([a.load_weights.remote(blob) for a in self.actors])
        t3 = time.perf_counter()
        del ref
        return {"export_s": t1 - t0, "put_s": t2 - t1, "load_s": t3 - t2, "total_s": t3 - t0,
                "bytes": payload_bytes(packed), "workers": len(loads),
                "engine_load_s": max(x["seconds"] for x in loads), "transport": "object_store"}

    def checksums(self, names: list[str]) -> list[dict]:
        import ray

        return ray.get([a.checksum.remote(names) for a in self.actors])
