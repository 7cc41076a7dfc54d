"""The weight-sync registry and interface, without an engine: transports registered here stand in for real ones
(they move no weights; the real transports are tested on engines in test_weight_sync.py)."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pydantic
import pytest

from pipeline.engines.engine import WORKER_EXTENSION
from pipeline.engines.pool import PoolConfig
from pipeline.engines.sync import registry
from pipeline.engines.sync.base import SyncResult, check_weights_match
from pipeline.engines.sync.registry import SyncTransports, transport_chain


class _Fake:
    engine_methods = None
    reason: str | None = None

    def __init__(self, pool):
        self.pool, self.synced, self.restored, self.closed = pool, [], [], False

    def applies(self):
        return self.reason

    def sync(self, model, dtype):
        self.synced.append(model)
        return SyncResult(transport=type(self).__name__.lower(), export_s=1.0, put_s=0.0, load_s=2.0, total_s=3.0,
                          bytes=10, workers=2, engine_load_s=1.5, extras={"model": model})

    def restore(self, worker):
        self.restored.append(worker)

    def close(self):
        self.closed = True


class Works(_Fake):
    """Syncs every time."""


class NotNow(_Fake):
    """Applies, but cannot sync this time (as the shared-memory transport for another dtype)."""

    def sync(self, model, dtype):
        self.synced.append(model)
        return None


class NotHere(_Fake):
    """Does not apply to the pool (as the shared-memory transport on a GPU pool)."""

    reason = "it needs hardware this test does not have"

    def sync(self, model, dtype):
        raise AssertionError("a transport that does not apply was asked to sync")


class GivesUp(_Fake):
    """Finds out during its first sync that it does not apply (as the shared-memory transport when the engines
    cannot plan the weights)."""

    def sync(self, model, dtype):
        self.synced.append(model)
        self.reason = "the engines cannot plan these weights"
        return None


@pytest.fixture
def fakes(monkeypatch):
    names = {"nothere": NotHere, "givesup": GivesUp, "notnow": NotNow, "works": Works}
    monkeypatch.setattr(registry, "TRANSPORTS", {n: f"{__name__}:{c.__name__}" for n, c in names.items()})
    monkeypatch.setattr(registry, "AUTO_ORDER", ("nothere", "givesup", "notnow", "works"))
    return SyncTransports(SimpleNamespace(model_path="/models/fake"))


def test_a_registered_transport_is_chosen_by_name_and_its_result_is_the_pools_dict(fakes):
    result = fakes.sync("model-a", "float32", "works").as_dict()
    assert result == {"export_s": 1.0, "put_s": 0.0, "load_s": 2.0, "total_s": 3.0, "bytes": 10, "workers": 2,
                      "engine_load_s": 1.5, "transport": "works", "model": "model-a"}
    assert PoolConfig(sync_transport="works").sync_transport == "works"


def test_a_sync_a_transport_cannot_do_falls_back_to_the_next_one(fakes):
    assert fakes.sync("model-a", "float32", "notnow").transport == "works"
    assert fakes.sync("model-b", "float32", "notnow").transport == "works"
    assert fakes.get("notnow").synced == ["model-a", "model-b"]  # asked first each time: only "not this time"
    # auto: skips the one that does not apply, tries the others in order
    assert fakes.sync("model-c", "float32", "auto").transport == "works"
    assert fakes.get("givesup").synced == ["model-c"]
    assert fakes.get("notnow").synced[-1] == "model-c"


def test_a_named_transport_that_does_not_apply_is_refused_with_its_reason(fakes):
    with pytest.raises(ValueError, match=r"pool.sync_transport=nothere does not apply to /models/fake: it needs "
                                         r"hardware this test does not have; use auto or givesup, notnow, works"):
        fakes.sync("model-a", "float32", "nothere")
    # found out during the sync: refused too, and remembered (auto no longer asks it)
    with pytest.raises(ValueError, match="givesup does not apply to /models/fake: the engines cannot plan"):
        fakes.sync("model-a", "float32", "givesup")
    assert fakes.sync("model-b", "float32", "auto").transport == "works"
    assert fakes.get("givesup").synced == ["model-a"]


def test_unknown_transport_names_are_refused_with_the_choices(fakes):
    with pytest.raises(ValueError, match=r"unknown weight-sync transport 'nope': use auto or one of nothere, givesup, "
                                         r"notnow, works \(registered in pipeline/engines/sync/registry.py\)"):
        fakes.sync("model-a", "float32", "nope")
    with pytest.raises(pydantic.ValidationError, match="unknown weight-sync transport 'nope'"):
        PoolConfig(sync_transport="nope")


def test_chain_of_a_transport_outside_the_auto_order(monkeypatch, fakes):
    monkeypatch.setattr(registry, "AUTO_ORDER", ("notnow", "works"))
    assert transport_chain("auto") == ["notnow", "works"]
    assert transport_chain("notnow") == ["notnow", "works"]
    assert transport_chain("works") == ["works"]
    assert transport_chain("givesup") == ["givesup", "notnow", "works"]


def test_restore_goes_to_the_transport_of_the_last_sync_and_close_forgets_it(fakes):
    fakes.restore(1)  # no sync yet: nothing to restore
    fakes.sync("model-a", "float32", "works")
    fakes.restore(1)
    assert fakes.get("works").restored == [1]
    made = [fakes.get(n) for n in ("works", "notnow")]
    fakes.close()
    assert all(t.closed for t in made) and fakes.last is None
    assert fakes.get("works") is not made[0]  # created again, as in a fresh pool


def test_the_worker_extension_has_every_registered_transports_engine_methods():
    module, _, name = WORKER_EXTENSION.rpartition(".")
    extension = getattr(importlib.import_module(module), name)
    for transport in registry.TRANSPORTS:
        mixin = registry.transport_class(transport).engine_methods
        methods = [m for m in vars(mixin) if m.startswith("posttrain_")]
        assert methods and all(getattr(extension, m) is getattr(mixin, m) for m in methods), transport
    assert hasattr(extension, "posttrain_weight_checksum")


def test_weights_of_another_shape_are_refused_naming_the_tensor():
    served = {"a.weight": (4, 3), "b.weight": (2,)}
    check_weights_match(dict(served), served, "/models/x")
    with pytest.raises(ValueError, match=r"weight sync refused for /models/x: .*1 missing \(e.g. b.weight\); 1 unknown "
                                         r"to the engine \(e.g. c.weight\)"):
        check_weights_match({"a.weight": (4, 3), "c.weight": (2,)}, served, "/models/x")
    with pytest.raises(ValueError, match=r"1 with another shape \(e.g. a.weight: got \(4, 5\), engine has \(4, 3\)\)"):
        check_weights_match({"a.weight": (4, 5), "b.weight": (2,)}, served, "/models/x")
