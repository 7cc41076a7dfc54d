"""Shared fixtures. vLLM engines are session-scoped: each starts at most once per test run.

Fixtures are lazy: an engine starts only when a test asks for it. Prefer `tiny_pool` (random tiny
MoE, fast) unless a test needs sensible text (`instruct_pool`) or the real MoE policy (`moe_pool`).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """An embedded Ray for the whole test run. Logical CPUs exceed the 2 real cores on purpose so
    that several session engines (each reserving 1 CPU) can be up at once."""
    import ray

    from pipeline.executor import ensure_ray

    if not ray.is_initialized():
        os.environ.pop("RAY_ADDRESS", None)
        ensure_ray(num_cpus=8)
    yield ray


@pytest.fixture(scope="session")
def embedded_models():
    """Build (or reuse from the cache) every embedded model; name -> folder."""
    from pipeline.models.catalog import prepare_all

    return prepare_all(log=lambda *_: None)


def _pool(model: str, **kw):
    from pipeline.engines.pool import PoolConfig, WorkerPool

    return WorkerPool(PoolConfig(model=model, kv_cache_gib=1, max_model_len=1024, **kw))


@pytest.fixture(scope="session")
def tiny_pool(ray_session, embedded_models):
    """The random tiny MoE on two engines (small chunks, so batches spread over both)."""
    pool = _pool("tiny-moe", num_workers=2, chunk_size=8)
    yield pool
    pool.shutdown()


@pytest.fixture
def tiny_sync_pool(tiny_pool, embedded_models):
    """`tiny_pool` for a test that syncs other weights into it or changes how it syncs: its sync transports start
    as in a fresh pool, and after the test, passed or failed, they are reset again and the engines get back
    the weights they started with, so no other test depends on what this one did."""
    import torch
    from transformers import AutoModelForCausalLM

    tiny_pool.reset_sync()
    try:
        yield tiny_pool
    finally:
        tiny_pool.reset_sync()
        tiny_pool.sync_weights(AutoModelForCausalLM.from_pretrained(embedded_models["tiny-moe"], dtype=torch.float32))


@pytest.fixture(scope="session")
def instruct_pool(ray_session, embedded_models):
    """The real SmolLM2-135M-Instruct (dense): sensible text."""
    pool = _pool("smollm2-135m-instruct")
    yield pool
    pool.shutdown()


@pytest.fixture(scope="session")
def moe_pool(ray_session, embedded_models):
    """The upcycled MoE policy, float32 (weight-sync tests mutate it: they restore it after)."""
    pool = _pool("smollm2-moe", dtype="float32")
    yield pool
    pool.shutdown()


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory, embedded_models):
    """A reward model trained once per test run (TRL RewardTrainer, tiny-dense base, a few seconds) on
    preference pairs derived from CPython's docstrings (reward/stdlib_pairs.py); used by the reward
    and DPO tests. Returns {"path", "metrics", "train", "held"}."""
    from reward.stdlib_pairs import preference_records, stdlib_docs
    from reward.train import RewardModelConfig, split_pairs, train_reward_model

    train, held = split_pairs(preference_records(stdlib_docs(), seed=0), 0.2)
    cfg = RewardModelConfig(base_model="tiny-dense", learning_rate=1e-3, num_epochs=3, batch_size=8, max_length=256)
    path = tmp_path_factory.mktemp("reward") / "reward_model"
    metrics = train_reward_model(train, cfg, path)
    return {"path": path, "metrics": metrics, "train": train, "held": held}
