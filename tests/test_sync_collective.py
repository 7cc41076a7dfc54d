"""The collective weight-sync transport (gloo on this CPU) on the real tiny-MoE engines of `tiny_pool`.

The trainer is two processes in a gloo group (Ray actors, started once for the module) holding the model
FSDP2-sharded (`fully_shard`): every rank gathers, rank 0 sends. vLLM and transformers both run float32 here.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import ray
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.engines.sync.collective import CollectiveSender, CollectiveTransport, weight_metadata
from pipeline.engines.sync.collective_group import plan_buckets
from pipeline.engines.sync.tensors import checkpoint_format_tensors
from tests.test_weight_sync import MESSAGES, _completion, _hf_logprobs, _mad, _perturb

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trainer actors below, in Ray's workers

BUCKET = 1 << 20  # 1 MiB buckets: the tiny model goes over in several
EXACT = 1e-4


class TrainerRank:
    """One rank of a torch.distributed trainer job holding the tiny MoE sharded with FSDP2."""

    def __init__(self, rank: int, world: int, port: int, path: str, seed: int):
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        _perturb(self.model, scale=0.2, seed=seed)
        for layer in self.model.model.layers:
            fully_shard(layer)
        fully_shard(self.model)

    def shards(self) -> list[tuple[bool, int, int]]:
        """(is a DTensor, local elements, full elements) of every parameter."""
        from torch.distributed.tensor import DTensor

        return [(isinstance(p, DTensor), p.to_local().numel(), p.numel()) for p in self.model.parameters()]

    def metadata(self) -> list:
        return weight_metadata(self.model, torch.float32)

    def send(self, spec: dict, dtype: str = "float32") -> dict:
        return CollectiveSender(spec).send(self.model, getattr(torch, dtype))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_trainer(path, seed):
    actor = ray.remote(num_cpus=0)(TrainerRank)
    port = _free_port()
    ranks = [actor.remote(r, 2, port, str(path), seed) for r in range(2)]
    ray.get([r.shards.remote() for r in ranks])
    return ranks


@pytest.fixture(scope="module")
def trainer(ray_session, embedded_models):
    """The two trainer ranks (seed 1 perturbation), shared by this module's tests."""
    ranks = _start_trainer(embedded_models["tiny-moe"], seed=1)
    yield ranks
    for r in ranks:
        ray.kill(r)


def _send(ranks, dtype="float32"):
    return lambda spec: ray.get([r.send.remote(spec, dtype) for r in ranks])


def _local_model(path, seed):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _perturb(model, scale=0.2, seed=seed)
    return model


def _engine_lps(actors, item):
    return [lps[0] for lps in ray.get([a.completion_logprobs.remote(item) for a in actors])]


@pytest.mark.slow
def test_fsdp_trainer_syncs_into_one_engine_then_two_as_shared_memory_does(tiny_sync_pool, trainer, embedded_models):
    pool, path = tiny_sync_pool, embedded_models["tiny-moe"]
    tok = AutoTokenizer.from_pretrained(path)
    item = [(MESSAGES, _completion())]
    old_hf = _hf_logprobs(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tok, *item[0])
    local = _local_model(path, seed=1)  # the trainer's weights, unsharded
    new_hf = _hf_logprobs(local, tok, *item[0])
    assert _mad(new_hf, old_hf) > 0.05
    shards = ray.get([r.shards.remote() for r in trainer])  # FSDP2: each rank holds a part of every parameter
    assert all(dt for dt, _, _ in shards[0]) and sum(here for _, here, _ in shards[0]) < sum(f for _, _, f in shards[0])
    assert [a[1] + b[1] for a, b in zip(*shards, strict=True)] == [f for _, _, f in shards[0]]
    metadata = ray.get(trainer[0].metadata.remote())
    assert metadata == weight_metadata(local, torch.float32)
    assert [n for n, _, _ in metadata] == [n for n, _ in checkpoint_format_tensors(local)]
    assert len(plan_buckets(metadata, BUCKET)) > 2

    # one engine: a group of the sender and engine 0 only; engine 1 is not touched
    one = CollectiveTransport(SimpleNamespace(actors=pool.actors[:1], config=pool.config, device=pool.device,
                                              served_shapes=pool.served_shapes, model_path=pool.model_path),
                              bucket_bytes=BUCKET)
    try:
        r1 = one.sync_remote(metadata, _send(trainer))
        assert r1.workers == 1 and r1.extras["group_built"]
        lps = _engine_lps(pool.actors, item)
        assert _mad(lps[0], new_hf) <= EXACT and _mad(lps[1], old_hf) <= EXACT
    finally:
        one.close()

    # two engines in one group (rank offsets 1 and 2), through a transport of the pool
    two = CollectiveTransport(pool, bucket_bytes=BUCKET)
    try:
        r2 = two.sync_remote(metadata, _send(trainer))
        assert two.group["world_size"] == 3 and two.group["rank_offsets"] == [1, 2]
        collective_lps = _engine_lps(pool.actors, item)
        for lps in collective_lps:
            assert _mad(lps, new_hf) <= EXACT and _mad(lps, old_hf) > 0.05
        assert r2.transport == "collective" and r2.workers == 2 and r2.extras["buckets"] > 2
        assert r2.bytes == sum(t.numel() * 4 for _, t in checkpoint_format_tensors(local))
        assert 0 < r2.engine_load_s <= r2.load_s <= r2.total_s and r2.export_s > 0
        # a second sync reuses the group
        r3 = two.sync_remote(metadata, _send(trainer))
        assert not r3.extras["group_built"] and r3.extras["group_id"] == r2.extras["group_id"]
    finally:
        two.close()

    # the same weights through shared memory give the same logprobs, exactly; so does the driver-side sender
    pool.sync_weights(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))  # back to the old weights
    assert _mad(_engine_lps(pool.actors, item)[0], old_hf) <= EXACT
    assert pool.sync_weights(local, transport="shared_memory")["transport"] == "shared_memory"
    assert _engine_lps(pool.actors, item) == collective_lps
    pool.sync_weights(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    driver = pool.sync_weights(local, transport="collective")
    assert driver["transport"] == "collective" and driver["bytes"] == r2.bytes
    assert _engine_lps(pool.actors, item) == collective_lps


@pytest.mark.slow
def test_a_mismatched_model_is_refused_before_any_engine_is_touched(tiny_sync_pool, trainer, embedded_models):
    pool, path = tiny_sync_pool, embedded_models["tiny-moe"]
    names = ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]
    before = pool.checksums(names)
    transport = CollectiveTransport(pool, bucket_bytes=BUCKET)
    sent = []
    try:
        for change in ("one more layer", "twice the hidden size"):
            cfg = AutoConfig.from_pretrained(path)
            if change == "one more layer":
                cfg.num_hidden_layers += 1
                cfg.layer_types = [*cfg.layer_types, cfg.layer_types[-1]]
            else:
                cfg.hidden_size *= 2
            other = AutoModelForCausalLM.from_config(cfg)
            with pytest.raises(ValueError, match="weight sync refused"):
                transport.sync_remote(weight_metadata(other, torch.float32), sent.append)
        assert sent == [] and transport.group is None  # no spec was made, no engine asked
        assert pool.checksums(names) == before
        # a trainer whose model does not match the sync's metadata (here: another dtype) refuses on every rank;
        # the engines, already in the group, are told before they change anything, and the group stays usable
        metadata = ray.get(trainer[0].metadata.remote())
        with pytest.raises(ray.exceptions.RayTaskError, match="collective weight sync refused"):
            transport.sync_remote(metadata, _send(trainer, "bfloat16"))
        assert pool.checksums(names) == before and transport.group is not None
        again = transport.sync_remote(metadata, _send(trainer))
        assert not again.extras["group_built"] and pool.checksums(names) != before
    finally:
        transport.close()


@pytest.mark.slow
def test_a_restarted_trainer_syncs_through_a_new_group(tiny_sync_pool, trainer, embedded_models):
    pool, path = tiny_sync_pool, embedded_models["tiny-moe"]
    tok = AutoTokenizer.from_pretrained(path)
    item = [(MESSAGES, _completion())]
    transport = CollectiveTransport(pool, bucket_bytes=BUCKET)
    restarted = []
    try:
        first = transport.sync_remote(ray.get(trainer[0].metadata.remote()), _send(trainer))
        old_group = dict(transport.group)
        transport.close()  # the trainer job is going away: the engines leave its group
        assert transport.group is None
        assert all(r[0]["left"] is None for r in ray.get([a.call_extension.remote("posttrain_collective_leave")
                                                          for a in pool.actors]))
        restarted[:] = _start_trainer(path, seed=2)  # a new trainer job with other weights
        second = transport.sync_remote(ray.get(restarted[0].metadata.remote()), _send(restarted))
        assert second.extras["group_built"] and second.extras["group_id"] != first.extras["group_id"]
        assert transport.group["master_port"] != old_group["master_port"]
        new_hf = _hf_logprobs(_local_model(path, seed=2), tok, *item[0])
        for lps in _engine_lps(pool.actors, item):
            assert _mad(lps, new_hf) <= EXACT
    finally:
        transport.close()
        for r in restarted:
            ray.kill(r)
