"""Progress bars per stage: rich bars on a terminal, periodic plain log lines otherwise, nothing
under ``--quiet``. Bars show records done / total, records per second and the ETA."""

from __future__ import annotations

import logging
import time
from typing import Any

from rich.progress import ProgressColumn

log = logging.getLogger("posttrain.progress")


class Bar:
    """One progress bar; ``advance(n)`` after n records, ``close()`` (or use ``with``)."""

    def __init__(self, reporter: ProgressReporter, total: int, desc: str):
        self.reporter, self.total, self.desc = reporter, total, desc
        self.done = 0
        self.t0 = time.monotonic()
        self._last_line = self.t0
        self._task: Any = None
        self._closed = False
        if reporter.rich is not None:
            self._task = reporter.rich.add_task(desc, total=total)

    def advance(self, n: int = 1) -> None:
        if self._closed or n <= 0:
            return
        self.done += n
        if self._task is not None:
            self.reporter.rich.update(self._task, advance=n)
        elif self.reporter.plain:
            now = time.monotonic()
            if now - self._last_line >= self.reporter.interval_s or self.done >= self.total:
                self._last_line = now
                log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 and self.total else None
        eta_s = "-" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
        return f"{self.desc}: {self.done}/{self.total} records ({rate:.1f} records/s, ETA {eta_s})"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self.reporter.rich.remove_task(self._task)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ProgressReporter:
    """Makes the bars of one run. ``mode``: "rich" (terminal), "plain" (log lines every
    ``interval_s``) or "quiet"."""

    def __init__(self, mode: str = "plain", console: Any = None, interval_s: float = 10.0):
        self.mode, self.interval_s = mode, interval_s
        self.plain = mode == "plain"
        self.rich = None
        if mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.rich = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 _RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console, transient=False)
            self.rich.start()

    def bar(self, total: int, desc: str) -> Bar:
        return Bar(self, total, desc)

    def stop(self) -> None:
        if self.rich is not None:
            self.rich.stop()
            self.rich = None


class _RateColumn(ProgressColumn):
    """records/s (rich's own speed column formats bytes)."""

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text("- records/s" if speed is None else f"{speed:.1f} records/s")
