"""A generation worker killed mid-batch: its requests are re-sent and the call completes."""

from __future__ import annotations

import os
import signal

import pytest
import ray

from pipeline.engines.pool import ChatRequest

pytestmark = pytest.mark.slow  # kills and restarts the session's vLLM engines


def _requests(k=48):
    from pydoc_data.topics import topics

    names = sorted(topics)[:k]
    return [ChatRequest(messages=[{"role": "user", "content": f"Describe '{n}'."}], max_tokens=24,
                        temperature=1.0, seed=i) for i, n in enumerate(names)]


def test_worker_killed_mid_batch_requests_are_resent(tiny_pool):
    reqs = _requests()
    reference = tiny_pool.generate(reqs)
    victim_pid = ray.get(tiny_pool.actors[1].info.remote())["pid"]
    killed = []

    def kill_once(_n):
        if not killed:  # worker 1 is busy with its own chunk when worker 0 reports its first one
            os.kill(victim_pid, signal.SIGKILL)
            killed.append(victim_pid)

    results = tiny_pool.generate(reqs, progress=kill_once)
    assert killed, "the worker was never killed"
    new_pid = ray.get(tiny_pool.actors[1].info.remote())["pid"]
    assert new_pid != victim_pid  # a fresh worker replaced the dead one
    # nothing lost, nothing duplicated, same samples as without the fault (per-request seeds)
    assert len(results) == len(reqs)
    assert [[c.token_ids for c in r.completions] for r in results] == \
           [[c.token_ids for c in r.completions] for r in reference]


def test_restarted_worker_serves_the_last_synced_weights(tiny_sync_pool, embedded_models):
    """A worker that dies after a sync comes back with the synced weights (from the shared-memory
    segment), not with the model folder's."""
    import torch
    from transformers import AutoModelForCausalLM

    pool = tiny_sync_pool
    model = AutoModelForCausalLM.from_pretrained(embedded_models["tiny-moe"], dtype=torch.float32)
    item = [([{"role": "user", "content": "Describe 'assert'."}], "It checks a condition and raises.")]
    original = ray.get(pool.actors[1].completion_logprobs.remote(item))[0]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.2)
    assert pool.sync_weights(model)["transport"] == "shared_memory"
    synced = ray.get(pool.actors[1].completion_logprobs.remote(item))[0]
    assert max(abs(a - b) for a, b in zip(synced, original, strict=True)) > 0.05
    victim_pid = ray.get(pool.actors[1].info.remote())["pid"]
    os.kill(victim_pid, signal.SIGKILL)
    pool.completion_logprobs(item * 16)  # spread over both workers: worker 1 is found dead, restarted
    assert ray.get(pool.actors[1].info.remote())["pid"] != victim_pid
    after = ray.get(pool.actors[1].completion_logprobs.remote(item))[0]
    assert max(abs(a - b) for a, b in zip(after, synced, strict=True)) <= 1e-4
