"""Starting or joining Ray."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS``, or start an embedded local Ray on loopback.

    Does nothing when Ray is already initialized in this process.
    """
    # Without this, Ray on Linux advertises the machine's network address even for a local
    # cluster; keep embedded clusters on loopback. It must be set before ray is imported.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
    )


def cluster_has_gpus() -> bool:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) > 0
