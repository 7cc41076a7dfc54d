"""Experiment tracking: the run's trainers and stage figures go to the trackers users already use.

A run names its trackers (``RunConfig.tracking``); the runner makes them known to every process of the run
through two environment variables (``tracking_env``, also passed to Ray workers). Trainers built by the stages
take ``report_to()`` for their ``TrainingArguments`` (transformers' own integrations: TensorBoard, W&B, MLflow)
and ``attach(trainer, name)`` points TensorBoard's writer at ``<tracking dir>/<name>``; ``StageWriter`` writes a
stage's own figures (per-round DPO figures, eval figures: what ``StageContext.log_metrics`` records) to TensorBoard
next to them. Outside a run (tests, benchmarks, notebooks) nothing is tracked unless the variables are set.
Of the project it imports only ``executor.environment`` (same layer).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.executor import environment

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow")
"""Trackers a run may name (transformers' ``report_to`` values)."""
REPORT_TO_ENV = "POSTTRAIN_REPORT_TO"
"""Comma-separated trackers of the current run."""
TRACKING_DIR_ENV = "POSTTRAIN_TRACKING_DIR"
"""Folder of the run's TensorBoard event files (one subfolder per trainer or stage)."""


def available(trackers: list[str]) -> list[str]:
    """The named trackers whose package is installed (a missing one is skipped with a warning: tracking must not
    stop a run)."""
    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
    out = []
    for name in trackers:
        if importlib.util.find_spec(modules[name]) is None:
            log.warning("tracker %s is not installed; its figures are not sent (pip install %s)", name, name)
        else:
            out.append(name)
    return out


@contextlib.contextmanager
def tracking_to(trackers: list[str], folder: str | os.PathLike) -> Iterator[None]:
    """Inside the block, trainers and stages of this process (and the Ray workers started with ``tracking_env``)
    report to ``trackers``, TensorBoard under ``folder``."""
    with environment({REPORT_TO_ENV: ",".join(available(trackers)),
                      TRACKING_DIR_ENV: os.fspath(os.path.abspath(folder))}):
        yield


def tracking_env() -> dict[str, str]:
    """The tracking variables for a Ray worker's ``runtime_env`` (empty outside a tracked run)."""
    return {k: os.environ[k] for k in (REPORT_TO_ENV, TRACKING_DIR_ENV) if os.environ.get(k)}


def report_to() -> list[str] | str:
    """``TrainingArguments.report_to`` of a trainer in this process: the run's trackers, else "none"."""
    names = [n for n in os.environ.get(REPORT_TO_ENV, "").split(",") if n]
    return names or "none"


def tracking_dir(name: str) -> str | None:
    """``<tracking dir>/<name>``, or None outside a tracked run."""
    root = os.environ.get(TRACKING_DIR_ENV)
    return os.path.join(root, name) if root else None


def attach(trainer: Any, name: str) -> None:
    """Point the trainer's TensorBoard callback (if it has one) at ``<tracking dir>/<name>``: one folder per
    trainer, so SFT phases and DPO rounds are separate runs in TensorBoard. Call before ``train()``."""
    folder = tracking_dir(name)
    if folder is None:
        return
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TensorBoardCallback":
            cb.logging_dir = folder


class StageWriter:
    """A stage's own figures (numbers of ``StageContext.log_metrics`` rows) as TensorBoard scalars under
    ``<tracking dir>/<stage>``; a no-op outside a run that tracks to TensorBoard."""

    def __init__(self, stage: str):
        self.stage = stage
        self._writer = None
        self._enabled = "tensorboard" in report_to() and tracking_dir(stage) is not None

    def log(self, values: Mapping[str, Any], step: int | None) -> None:
        if not self._enabled:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=tracking_dir(self.stage))
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(f"{self.stage}/{key}", value, global_step=step or 0)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
