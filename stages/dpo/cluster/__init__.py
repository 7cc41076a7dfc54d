"""Online DPO rounds trained on a Ray Train job (``distributed.backend: ray``).

``job`` is the driver's side (start the job, send requests, restart after a worker died), ``worker`` the
workers' (policy and frozen reference loaded once, FSDP2-sharded, trained round after round, weights sent to
the engines through the collective weight-sync transport), ``shard`` the sharding, EMA shards and checkpoints.
"""
