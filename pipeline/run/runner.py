"""The graph runner: order the enabled stages by their inputs and outputs, skip those whose
fingerprint matches a finished manifest, resume interrupted ones from their finished shards, run
the rest (on Ray where configured), and keep the run directory's manifests current.

A stage's fingerprint covers its config section, the fingerprints of its inputs, its code (every
project file it uses and the files its config names, ``pipeline/run/fingerprint.py``), the run seed
and the output-relevant settings of the model roles it used. Manifest states: ``running`` (also what
a killed run leaves), ``done``, ``failed``, ``stale`` (an upstream stage was rerun).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pipeline.executor import worker_logs_in
from pipeline.files import atomic_write_text, fingerprint
from pipeline.run.artifacts import ArtifactStore, library_versions
from pipeline.run.checks import check_inputs, check_model_folders, disk_sources
from pipeline.run.config import RunConfig, dump_config
from pipeline.run.console import FILE_ONLY, console_mode, library_bars_off, logging_to
from pipeline.run.errors import RunError
from pipeline.run.fingerprint import code_version, pool_fingerprint, what_changed
from pipeline.run.graph import dependents, order_stages, producers, upstream
from pipeline.run.manifest import StageManifest
from pipeline.run.progress import ProgressReporter
from pipeline.run.session import PoolManager, RayHandle
from pipeline.run.stage import StageContext, StageError
from pipeline.run.status import status_rows
from pipeline.tracking import tracking_to

__all__ = ["PlanItem", "RunError", "Runner", "format_plan", "order_stages", "run_graph", "run_stage", "status_rows"]

log = logging.getLogger("posttrain.runner")


@dataclass
class PlanItem:
    """What the runner does with one stage, and why."""

    stage: str
    action: str
    """run (fresh start), resume (keep finished shards) or skip."""
    reason: str
    fingerprint: str
    parts: dict = field(default_factory=dict)


def format_plan(items: list[PlanItem], marks_stale: list[str] | None = None) -> str:
    width = max([len(i.stage) for i in items] + [5])
    lines = [f"  {i.stage:<{width}}  {i.action:<6}  {i.reason}" for i in items]
    if marks_stale:
        lines.append(f"  then marks stale: {', '.join(marks_stale)}")
    return "\n".join(lines)


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path) -> Iterator[None]:
    """One posttrain process per run directory (a kill releases the lock)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise RunError(f"run directory {run_dir} is in use by another posttrain process (pid {holder}); "
                       "wait for it to finish or use another run_dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Runner:
    """Runs the enabled stages of one run config (``posttrain run`` / ``posttrain stage``)."""

    def __init__(self, cfg: RunConfig, quiet: bool = False, progress_mode: str | None = None,
                 pools: list | tuple = ()):
        """``pools``: WorkerPools already running that serve the roles configured exactly like
        them (they are not shut down by the runner)."""
        self.cfg = cfg
        self.store = ArtifactStore(cfg.run_dir)
        self.stages = cfg.enabled
        self.order = order_stages(self.stages)
        self.quiet = quiet
        self.mode = progress_mode or console_mode(quiet)
        self.ray = RayHandle(cfg)
        self.pools = PoolManager(cfg, running=pools)

    def _manifest(self, name: str) -> StageManifest | None:
        data = self.store.read_manifest(name)
        return StageManifest.from_json(data) if data is not None else None

    def _write(self, manifest: StageManifest) -> None:
        self.store.write_manifest(manifest.stage, manifest.to_json())

    def _names(self, only: str | None) -> list[str]:
        return [only] if only else self.order

    def check_inputs(self, only: str | None = None) -> None:
        check_inputs(self.store, self.stages, self._names(only), only)

    def check_model_folders(self, only: str | None = None) -> None:
        check_model_folders(self.cfg, self._names(only))

    # -- fingerprints and plan --------------------------------------------------------------------------
    def _parts(self, name: str, input_fps: dict[str, str | None], roles: list[str]) -> dict:
        section = self.cfg.stage_config(name)
        return {"stage": name, "config": fingerprint(section.model_dump(mode="json")),
                "code": code_version(self.stages[name], section), "seed": self.cfg.seed,
                "inputs": dict(sorted(input_fps.items())),
                "pools": {r: pool_fingerprint(self.cfg, r) for r in sorted(roles)}}

    def plan_stage(self, name: str, out_fps: dict[str, str | None], reran: list[str], force: bool = False) -> PlanItem:
        st = self.stages[name]
        old = self._manifest(name)
        # The roles of the fingerprint the manifest was written with: for a done stage the roles it
        # used; for an interrupted one the roles predicted when it started (not the ones it had
        # reached when killed: that would change the fingerprint and lose its finished shards).
        roles = sorted((old.fingerprint_parts if old else {}).get("pools", {}))
        made_by = producers(self.stages)
        optional = {i: out_fps.get(i) for i in st.optional_inputs if i in made_by}
        parts = self._parts(name, {**{i: out_fps.get(i) for i in st.inputs}, **optional}, roles)
        fp = fingerprint(parts)
        if force:
            return PlanItem(name, "run", "forced (--force)", fp, parts)
        if old is None:
            return PlanItem(name, "run", "not run before", fp, parts)
        if old.state == "stale":
            return PlanItem(name, "run", f"stale: {old.stale_reason or 'upstream changed'}", fp, parts)
        if old.fingerprint != fp:
            return PlanItem(name, "run", what_changed(old.fingerprint_parts, parts), fp, parts)
        if old.state == "done":
            missing = [o for o in st.outputs if not self.store.artifact_exists(o)]
            if missing:
                return PlanItem(name, "run", f"output {', '.join(missing)} missing from the run directory", fp, parts)
            above = [u for u in reran if u in upstream(self.stages, name)]
            if above:
                return PlanItem(name, "run", f"upstream {above[0]} reran", fp, parts)
            return PlanItem(name, "skip", f"up to date (fingerprint {fp[:12]})", fp, parts)
        done = sum(m.get("done", 0) for m in old.maps.values())
        total = sum(m.get("shards", 0) for m in old.maps.values())
        what = "interrupted" if old.state == "running" else "failed"
        return PlanItem(name, "resume", f"{what} earlier; {done}/{total} shards done, kept", fp, parts)

    def _initial_out_fps(self) -> dict[str, str | None]:
        return {k: v["fingerprint"] for k, v in disk_sources(self.store).items()}

    def _output_fps(self, name: str) -> dict[str, str | None]:
        m = self._manifest(name)
        return {o: (m.outputs if m else {}).get(o, {}).get("fingerprint") for o in self.stages[name].outputs}

    def plan(self, only: str | None = None, force: bool = False) -> list[PlanItem]:
        """What ``run`` would do, without doing it (predicted fingerprints for stages that run)."""
        self.check_inputs(only)
        out_fps = self._initial_out_fps()
        reran: list[str] = []
        items = []
        for name in self._names(only):
            item = self.plan_stage(name, out_fps, reran, force=force)
            items.append(item)
            if item.action == "skip":
                out_fps.update(self._output_fps(name))
            else:
                out_fps.update({o: fingerprint({"stage": item.fingerprint, "output": o})
                                for o in self.stages[name].outputs})
                reran.append(name)
        return items

    # -- execution ---------------------------------------------------------------------------------------
    def run(self, only: str | None = None, force: bool = False) -> list[PlanItem]:
        """Run the graph (or only stage ``only``). Returns what was done for each stage."""
        if only is not None and only not in self.stages:
            raise RunError(f"stage {only!r} is not enabled in this config (graph: {', '.join(self.order)})")
        root = Path(self.cfg.run_dir)
        # vLLM engines, reward actors and training workers write their output to RUN_DIR/logs/workers/ (one file
        # per worker), not to the console
        tracking = self.cfg.tracking
        with _run_dir_lock(root), logging_to(root, self.mode) as console, worker_logs_in(root / "logs" / "workers"), \
                tracking_to(tracking.report_to, tracking.dir or root / "tracking"), library_bars_off():
            reporter = ProgressReporter(self.mode, console=console)
            t0 = time.perf_counter()
            log.info("run %s: %s", root, " -> ".join(self._names(only)))
            done: list[PlanItem] = []
            try:
                self.check_inputs(only)
                self.check_model_folders(only)
                atomic_write_text(root / "config.yaml", dump_config(self.cfg))
                out_fps = self._initial_out_fps()
                reran: list[str] = []
                for name in self._names(only):
                    item = self.plan_stage(name, out_fps, reran, force=force)
                    if item.action == "skip":
                        log.info("stage %s: skip, %s", name, item.reason)
                    else:
                        log.info("stage %s: %s (%s)", name, item.action, item.reason)
                        self._execute(item, reporter)
                        reran.append(name)
                        self.mark_stale(dependents(self.store, self.stages, name), f"upstream {name} reran")
                    out_fps.update(self._output_fps(name))
                    done.append(item)
            finally:
                reporter.stop()
                self.pools.shutdown()
                self.ray.shutdown()
            ran = sum(i.action != "skip" for i in done)
            log.info("finished in %.1fs: %d stage(s) ran, %d skipped", time.perf_counter() - t0, ran,
                     len(done) - ran)
            return done

    def mark_stale(self, names: list[str], reason: str) -> None:
        for n in names:
            m = self._manifest(n)
            if m is None or m.state == "stale":
                continue
            m.state, m.stale_reason = "stale", reason
            self._write(m)
            log.info("stage %s marked stale (%s)", n, reason)

    def _start_manifest(self, item: PlanItem) -> StageManifest:
        """The manifest of a stage that starts (or resumes: its shard counts, metrics and time carry over)."""
        name, st = item.stage, self.stages[item.stage]
        old = self._manifest(name) or StageManifest(stage=name)
        if item.action == "run":
            self.store.clear_stage(name, st.outputs)
            old = StageManifest(stage=name)
        made_by, disk = producers(self.stages), disk_sources(self.store)
        return StageManifest(
            stage=name, state="running", fingerprint=item.fingerprint, fingerprint_parts=item.parts,
            reason=item.reason, config=self.cfg.stage_config(name).model_dump(mode="json"),
            declared_inputs=list(st.reads), declared_outputs=list(st.outputs),
            inputs={i: {"fingerprint": item.parts["inputs"].get(i),
                        "stage": made_by.get(i) or disk.get(i, {}).get("stage")} for i in item.parts["inputs"]},
            maps=old.maps, metrics=old.metrics, pools_used=old.pools_used, attempts=old.attempts + 1,
            started_at=_now(), previous_duration_s=float(old.elapsed_s or 0.0) + float(old.previous_duration_s or 0.0),
            pid=os.getpid(), host=socket.gethostname(), versions=library_versions())

    def _execute(self, item: PlanItem, reporter: ProgressReporter) -> None:
        name = item.stage
        st = self.stages[name]
        manifest = self._start_manifest(item)
        self._write(manifest)
        ctx = StageContext(stage=st, config=self.cfg.stage_config(name), run_config=self.cfg, store=self.store,
                           resources=self.cfg.resources_for(name), pools=self.pools, reporter=reporter,
                           ensure_ray=self.ray.ensure, metrics=dict(manifest.metrics))
        t0 = time.perf_counter()

        def refresh() -> None:
            manifest.maps = {**manifest.maps, **{k: dict(v) for k, v in ctx.maps.items()}}
            manifest.elapsed_s = round(time.perf_counter() - t0, 3)
            manifest.pools_used = {**manifest.pools_used, **ctx.pools_used}
            self._write(manifest)

        ctx.on_progress = refresh
        try:
            st.run(ctx)
            ctx.tracker.close()
            missing = [o for o in st.outputs if o not in ctx.written or not self.store.artifact_exists(o)]
            if missing:
                raise StageError(f"stage {name} returned without writing its declared output(s) {missing}; "
                                 "fix: write them with ctx.map / ctx.write / ctx.output_path")
        except BaseException as exc:
            ctx.tracker.close()
            refresh()
            manifest.state, manifest.error, manifest.finished_at = "failed", f"{type(exc).__name__}: {exc}", _now()
            manifest.metrics, manifest.ray = ctx.metrics, self.ray.info if ctx.used_ray else None
            self._write(manifest)
            log.error("stage %s failed after %.1fs: %s: %s", name, time.perf_counter() - t0, type(exc).__name__, exc)
            log.error("stage %s traceback:\n%s", name, traceback.format_exc(), extra={FILE_ONLY: True})
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise RunError(f"stage {name} failed: {exc}") from exc
        refresh()
        parts = dict(item.parts, pools={r: pool_fingerprint(self.cfg, r) for r in sorted(manifest.pools_used)})
        manifest.fingerprint = fp = fingerprint(parts)
        manifest.fingerprint_parts = parts
        manifest.outputs = {o: {**self.store.describe(o), "fingerprint": fingerprint({"stage": fp, "output": o})}
                            for o in st.outputs}
        manifest.intermediates = {n: self.store.describe(n, stage=name) for n, k in ctx.written.items()
                                  if k == "intermediate"}
        duration = round(time.perf_counter() - t0, 3)
        manifest.state, manifest.metrics, manifest.finished_at = "done", ctx.metrics, _now()
        manifest.duration_s = manifest.elapsed_s = duration
        manifest.ray = self.ray.info if ctx.used_ray else None
        self._write(manifest)
        counts = ", ".join(f"{o}: {d['records']} records" if d["kind"] == "dataset" else f"{o}: model"
                           for o, d in manifest.outputs.items())
        log.info("stage %s done in %.1fs (%s)", name, duration, counts)


# -- entry points used by the CLI --------------------------------------------------------------------------

def run_graph(cfg: RunConfig, dry_run: bool = False, quiet: bool = False) -> list[PlanItem]:
    runner = Runner(cfg, quiet=quiet)
    if dry_run:
        return runner.plan()
    return runner.run()


def run_stage(cfg: RunConfig, name: str, force: bool = False, dry_run: bool = False,
              quiet: bool = False) -> tuple[list[PlanItem], list[str]]:
    """Run one stage (``posttrain stage``); afterwards every stage that depends on it is stale.
    Returns the plan item and the stages marked (or, with ``dry_run``, to be marked) stale."""
    runner = Runner(cfg, quiet=quiet)
    if name not in runner.stages:
        raise RunError(f"stage {name!r} is not enabled in this config (graph: {', '.join(runner.order)}); "
                       "fix: add it to graph")
    stale = dependents(runner.store, runner.stages, name)
    if dry_run:
        items = runner.plan(only=name, force=force)
        return items, stale if items[0].action != "skip" else []
    items = runner.run(only=name, force=force)
    return items, stale if items[0].action != "skip" else []
