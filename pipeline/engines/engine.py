"""One vLLM engine in a Ray actor: its start (arguments, environment), generation, teacher-forced logprobs, and
one generic call into the worker extension that the weight-sync transports use."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.executor import log_worker_output, root_cause, worker_log_env
from pipeline.models.catalog import ModelError, model_architecture

if TYPE_CHECKING:
    from pipeline.engines.pool import PoolConfig

WORKER_EXTENSION = "pipeline.engines.sync.extension.WeightSyncExtension"
"""vLLM's ``worker_extension_cls``: the engine-side methods of every registered weight-sync transport."""


class EngineStartError(RuntimeError):
    """An engine failed to start; the message carries the root cause."""


def engine_settings(cfg: PoolConfig, device: str, dtype: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``vllm.LLM`` keyword arguments and the actor's environment variables for engines of ``cfg``."""
    engine_args: dict[str, Any] = {
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
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"), **worker_log_env()}
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
    return engine_args, env


class EngineActor:
    """Holds one vllm.LLM. Wrapped with ray.remote by WorkerPool (resources set there)."""

    def __init__(self, model_path: str, engine_args: dict, index: int):
        self.index = index
        self.model_path = model_path
        self.log_file = log_worker_output(f"engine-{Path(model_path).name}-{index}")
        try:
            import vllm
            from vllm import LLM, ModelRegistry

            arch = model_architecture(Path(model_path))
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

    def info(self) -> dict:
        import vllm

        return {"index": self.index, "pid": os.getpid(), "vllm": vllm.__version__, "model": self.model_path}

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def generate(self, requests: list[dict]) -> list[dict]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=r["n"], temperature=r["temperature"], top_p=r["top_p"], max_tokens=r["max_tokens"],
                seed=r["seed"], logprobs=0 if r["logprobs"] else None, stop=r["stop"],
            )
            for r in requests
        ]
        # vLLM takes one set of chat-template arguments per call: one call per distinct set, outputs in request order
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.get("chat_template_kwargs") or {}, sort_keys=True), []).append(i)
        outs: list[Any] = [None] * len(requests)
        for key, idx in groups.items():
            group = self.llm.chat([requests[i]["messages"] for i in idx], [params[i] for i in idx], use_tqdm=False,
                                  chat_template_kwargs=json.loads(key) or None)
            for i, out in zip(idx, group, strict=True):
                outs[i] = out
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

    def call_extension(self, method: str, *args: Any, weights_changed: bool = False) -> list:
        """Run the worker-extension method ``method`` (a ``posttrain_*`` method of a transport's engine mixin) on
        every worker of this engine; returns each worker's result. ``weights_changed``: the call loaded new
        weights, so the KV blocks cached for shared prefixes (computed with the old ones) are dropped, or prompts
        seen before the sync would keep attending to stale keys and values."""
        results = self.llm.collective_rpc(method, args=args)
        if weights_changed:
            self.llm.reset_prefix_cache()
        return results

    def sleep(self, level: int) -> None:
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # best effort: the actor is killed right after
                pass
            self.llm = None
