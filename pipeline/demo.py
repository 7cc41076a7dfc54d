"""`posttrain demo` before the full graph exists: the MoE policy answers prompts through the pool.

The prompts ask about topics of CPython's own documentation (``pydoc_data.topics``, which ships
with every Python), so nothing here is hand-written data.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def doc_topic_prompts(k: int = 4) -> list[str]:
    from pydoc_data.topics import topics

    names = sorted(topics)[:: max(1, len(topics) // k)][:k]
    return [f"In two sentences, explain the Python documentation topic '{name}'." for name in names]


def answer_prompts(model: str = "smollm2-moe", max_tokens: int = 128, echo: Callable[[str], None] = print) -> None:
    from pipeline.engines.pool import ChatRequest, WorkerPool
    from pipeline.models.catalog import models_dir, prepare_all

    echo(f"model cache: {models_dir()}")
    prepare_all(log=echo)
    prompts = doc_topic_prompts()
    t0 = time.time()
    with WorkerPool(model=model) as pool:
        echo(f"pool ready: {len(pool.actors)} vLLM worker(s), {pool.device}, {pool.dtype} ({time.time() - t0:.0f}s)")
        t1 = time.time()
        results = pool.generate([ChatRequest(messages=[{"role": "user", "content": p}], max_tokens=max_tokens,
                                             temperature=0.7, seed=i) for i, p in enumerate(prompts)])
        tokens = sum(len(c.token_ids) for r in results for c in r.completions)
        for prompt, res in zip(prompts, results, strict=True):
            echo(f"\n> {prompt}\n{res.completions[0].text.strip()}")
        echo(f"\n{tokens} tokens in {time.time() - t1:.1f}s")
