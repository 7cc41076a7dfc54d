"""The run framework: run config, stage registry, the stage contract, the graph runner, the run directory.

Owns ``RUN_DIR`` (manifests, datasets, model folders, logs) and the order, skipping and resuming of stages.
Stages see it only through ``pipeline.run.stage`` (``Stage``, ``StageContext``, ``ModelRole``,
``record_seed``). May import layers 0-2 (``files``, ``executor``, ``models``, ``engines`` for ``PoolConfig``)
and, by name through the registry, the stages; never ``reporting``.
"""
