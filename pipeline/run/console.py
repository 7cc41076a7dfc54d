"""Where a run's log goes: the console (rich, plain or quiet) and ``RUN_DIR/logs/run.log``."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Loggers whose records go to the console and RUN_DIR/logs/run.log (stage modules log under their
# package names; library loggers such as vllm's and ray's keep their own handlers).
LOGGER_NAMES = ("posttrain", "pipeline", "stages", "critique", "reward")


FILE_ONLY = "file_only"
"""A log record with this attribute set (``extra={FILE_ONLY: True}``) goes to RUN_DIR/logs/run.log, not the console
(a failed stage's traceback: the console shows the one-line error)."""


def console_mode(quiet: bool) -> str:
    if quiet:
        return "quiet"
    return "rich" if sys.stderr.isatty() else "plain"


@contextlib.contextmanager
def logging_to(run_dir: Path | None, mode: str) -> Iterator[Any]:
    """Console + RUN_DIR/logs/run.log handlers on the project's loggers for one run."""
    handlers: list[logging.Handler] = []
    console = None
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    if mode == "rich":
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(stderr=True)
        h: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
    else:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
    h.setLevel(logging.WARNING if mode == "quiet" else logging.INFO)
    h.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    handlers.append(h)
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "logs" / "run.log", encoding="utf-8")
        fh.setFormatter(fmt)
        fh.setLevel(logging.INFO)
        handlers.append(fh)
    loggers = [logging.getLogger(n) for n in LOGGER_NAMES]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        for hd in handlers:
            lg.addHandler(hd)
    try:
        yield console
    finally:
        for lg, level in saved:
            for hd in handlers:
                lg.removeHandler(hd)
            lg.setLevel(level)
        for hd in handlers:
            hd.close()



@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """Inside the block, ``datasets`` and ``transformers`` draw no progress bars of their own ("Creating parquet
    from Arrow format", "Loading weights"): a run shows one progress line per stage instead."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_on = not datasets.are_progress_bars_disabled()
    hf_on = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if hf_on:
            hf_logging.enable_progress_bar()
