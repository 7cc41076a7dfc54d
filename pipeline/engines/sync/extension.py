"""The class vLLM mixes into every worker (its ``worker_extension_cls``), built from the registered transports.

vLLM imports this module inside its worker process (``engine.WORKER_EXTENSION`` names the class) and adds the class to the worker's bases; the engine
actor then calls its methods with ``LLM.collective_rpc(name, ...)`` (``EngineActor.call_extension``). The class
is composed of each registered transport's ``engine_methods`` mixin and the shared ``WeightChecksum``, so a new
transport brings its engine side with its registry line. Everything imported here is light at module level.
"""

from __future__ import annotations

from pipeline.engines.sync.engine_helpers import WeightChecksum
from pipeline.engines.sync.registry import TRANSPORTS, transport_class


def _engine_mixins() -> tuple[type, ...]:
    mixins = [transport_class(name).engine_methods for name in TRANSPORTS]
    return (*(m for m in mixins if m is not None), WeightChecksum)


WeightSyncExtension = type("WeightSyncExtension", _engine_mixins(), {
    "__module__": __name__,
    "__doc__": "Worker-side methods of every registered weight-sync transport (see the module docstring).",
})
