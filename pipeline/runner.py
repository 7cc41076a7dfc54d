"""The graph runner: order the enabled stages by their inputs and outputs, skip those whose
fingerprint matches a finished manifest, resume interrupted ones from their finished shards, run
the rest (on Ray where configured), and keep the run directory's manifests current.

A stage's fingerprint covers its config section, the fingerprints of its inputs, its code (the
source of its module and ``Stage.version``), the run seed and the output-relevant settings of the
model roles it used. Manifest states: ``running`` (also what a killed run leaves), ``done``,
``failed``, ``stale`` (an upstream stage was rerun).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.artifacts import ArtifactStore, atomic_write_text, fingerprint, library_versions
from pipeline.config import RunConfig, StageResources, dump_config
from pipeline.progress import ProgressReporter
from pipeline.stage import Stage, StageContext, StageError, apply_fn

log = logging.getLogger("posttrain.runner")

# Loggers whose records go to the console and RUN_DIR/logs/run.log (stage modules log under their
# package names; library loggers such as vllm's and ray's keep their own handlers).
LOGGER_NAMES = ("posttrain", "pipeline", "stages", "critique", "reward")
# PoolConfig fields that change what a pool generates (the others change only speed/placement).
POOL_OUTPUT_FIELDS = ("model", "device", "dtype", "max_model_len", "seed", "engine_kwargs")


class RunError(RuntimeError):
    """The run cannot start or a stage failed; the message names the stage and the fix."""


# -- graph ---------------------------------------------------------------------------------------

def order_stages(stages: dict[str, Stage]) -> list[str]:
    """Topological order of the stages by inputs/outputs; ties keep the given (graph) order."""
    producers: dict[str, str] = {}
    for st in stages.values():
        for out in st.outputs:
            if out in producers:
                raise RunError(f"stages {producers[out]!r} and {st.name!r} both write {out!r}; "
                               "fix: enable only one of them in graph")
            producers[out] = st.name
    deps = {n: {producers[i] for i in st.inputs if i in producers} for n, st in stages.items()}
    order: list[str] = []
    remaining = list(stages)
    while remaining:
        ready = [n for n in remaining if deps[n] <= set(order)]
        if not ready:
            cycle = ", ".join(f"{n} <- {sorted(deps[n] - set(order))}" for n in remaining)
            raise RunError(f"the stages depend on each other in a cycle: {cycle}")
        order.append(ready[0])
        remaining.remove(ready[0])
    return order


def _producers(stages: dict[str, Stage]) -> dict[str, str]:
    return {out: st.name for st in stages.values() for out in st.outputs}


def dependents(store: ArtifactStore, stages: dict[str, Stage], name: str) -> list[str]:
    """Stages that read, directly or transitively, an output of ``name``: the enabled ones and
    the ones known only from manifests on disk."""
    edges: dict[str, tuple[set[str], set[str]]] = {}
    for n, m in store.manifests().items():
        edges[n] = (set(m.get("declared_inputs", [])), set(m.get("declared_outputs", [])))
    for n, st in stages.items():
        edges[n] = (set(st.inputs), set(st.outputs))
    found: list[str] = []
    frontier = set(edges.get(name, (set(), set()))[1])
    while frontier:
        new_out: set[str] = set()
        for n, (ins, outs) in edges.items():
            if n != name and n not in found and ins & frontier:
                found.append(n)
                new_out |= outs
        frontier = new_out
    return found


def code_version(stage: Stage) -> str:
    """Hash of the stage module's source, ``Stage.version`` and the posttrain version."""
    module = sys.modules.get(getattr(stage.run, "__module__", ""), None)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        source = getattr(stage.run, "__qualname__", "")
    return fingerprint({"source": hashlib.sha256(source.encode()).hexdigest(), "version": stage.version,
                        "posttrain": library_versions().get("posttrain")})


def _pool_fingerprint(cfg: RunConfig, role: str) -> str | None:
    pc = cfg.models.get(role)
    if pc is None:
        return None
    return fingerprint({k: v for k, v in pc.model_dump(mode="json").items() if k in POOL_OUTPUT_FIELDS})


def _what_changed(old: dict | None, new: dict) -> str:
    if not old:
        return "fingerprint changed"
    changes = []
    for key, label in (("config", "config"), ("code", "code"), ("seed", "seed")):
        if old.get(key) != new.get(key):
            changes.append(f"{label} changed")
    old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
    for k in sorted(set(old_in) | set(new_in)):
        if old_in.get(k) != new_in.get(k):
            changes.append(f"input {k!r} changed")
    old_p, new_p = old.get("pools", {}), new.get("pools", {})
    for k in sorted(set(old_p) | set(new_p)):
        if old_p.get(k) != new_p.get(k):
            changes.append(f"model role {k!r} changed")
    return ", ".join(changes) or "fingerprint changed"


# -- plan ------------------------------------------------------------------------------------------

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


# -- Ray and pools -----------------------------------------------------------------------------------

class PoolManager:
    """Worker pools of the run's model roles, started lazily and shared by every stage; roles
    with identical settings share one pool."""

    def __init__(self, cfg: RunConfig, running: list | tuple = ()):
        self.cfg = cfg
        self._pools: dict[str, Any] = {}
        # Pools the caller already runs (a notebook, a test session) serve the roles configured
        # exactly like them; the caller keeps them: shutdown() leaves them up.
        self._given = {p.config.model_dump_json(): p for p in running}
        self.started = 0

    def get(self, role: str, stage: str = "?"):
        if role not in self.cfg.models:
            raise StageError(f"stage {stage} asks for model role {role!r}, which is not in the run config's models "
                             f"(defined: {', '.join(self.cfg.models) or 'none'}); fix: add models.{role}")
        pc = self.cfg.models[role]
        key = pc.model_dump_json()
        if key in self._given:
            return self._given[key]
        if key not in self._pools:
            from pipeline.pool import WorkerPool

            log.info("starting worker pool for role %s: %s, %d worker(s)", role, pc.model, pc.num_workers)
            t0 = time.perf_counter()
            self._pools[key] = WorkerPool(pc)
            self.started += 1
            log.info("worker pool for role %s ready in %.0fs", role, time.perf_counter() - t0)
        return self._pools[key]

    def shutdown(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            try:
                pool.shutdown()
            except Exception as exc:  # shutting down must not hide the run's own error
                log.warning("worker pool shutdown failed: %s", exc)


class RayHandle:
    """Starts an embedded Ray or joins a cluster the first time a stage needs Ray."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.started = False
        self.info: dict | None = None

    def ensure(self) -> None:
        if self.info is not None:
            return
        # Keep embedded clusters on loopback (must be set before Ray starts; see PLATFORM.md).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        from pipeline.ray_utils import ensure_ray

        address = self.cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            if address:
                log.info("joining the Ray cluster at %s", address)
                try:
                    ray.init(address=address, log_to_driver=True)
                except Exception as exc:
                    hint = ""
                    if "auth" in str(exc).lower() or "token" in str(exc).lower():
                        hint = ("; fix: set RAY_AUTH_MODE=token (Ray 2.60 clusters started with `ray start` use "
                                "token auth; the token is in ~/.ray/auth_token)")
                    raise RunError(f"cannot join the Ray cluster at {address}: {exc}{hint}") from None
            else:
                ensure_ray(num_cpus=self.cfg.ray.num_cpus, num_gpus=self.cfg.ray.num_gpus)
                self.started = True
                log.info("started an embedded Ray (%s)", ray.cluster_resources())
        ctx = ray.get_runtime_context()
        self.info = {"address": ctx.gcs_address, "embedded": self.started, "joined": bool(address),
                     "resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}}

    def shutdown(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False
            self.info = None


_RETRYABLE_NAMES = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OutOfMemoryError", "RayActorError",
                    "LocalRayletDiedError")


def _retryable() -> tuple[type, ...]:
    import ray.exceptions as rex

    return tuple(getattr(rex, n) for n in _RETRYABLE_NAMES if hasattr(rex, n))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _task(res: StageResources) -> Callable[[str], Any]:
    """``submit(name)`` -> a Ray remote function with the stage's resources, named for the dashboard."""
    import ray

    remote = ray.remote(apply_fn)

    def submit(name: str):
        # Retries are ours (bounded by max_retries, logged, counted in the manifest), not Ray's.
        return remote.options(name=name, num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=0,
                              retry_exceptions=False)

    return submit


def _check_resources(ctx: StageContext) -> None:
    """A task asking for more than any node offers would wait forever: fail on a fixed (embedded)
    cluster, warn on a joined one (an autoscaler may still add such a node)."""
    import ray

    res = ctx.resources
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= res.num_cpus and r.get("GPU", 0) >= res.num_gpus for r in nodes):
        return
    best = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    msg = (f"stage {ctx.name}: resources.{ctx.name} asks {res.num_cpus:g} CPU / {res.num_gpus:g} GPU per task, but no "
           f"Ray node offers that (largest: {best.get('CPU', 0):g} CPU / {best.get('GPU', 0):g} GPU)")
    if not (ctx.run_config.ray.address or os.environ.get("RAY_ADDRESS")):
        raise StageError(msg + f"; fix: lower resources.{ctx.name}.num_cpus/num_gpus or raise ray.num_cpus/num_gpus")
    log.warning("%s; its tasks wait until such a node joins", msg)


def run_shards(ctx: StageContext, name: str, shards: list[list[dict]], todo: list[int],
               fn: Callable[[list[dict]], list[dict]], finished: Callable[[int, list[dict]], None],
               stats: dict) -> None:
    """Run ``fn`` on the shards in ``todo``: in this process, or as Ray tasks when the stage's
    resources say ``remote``. ``finished(i, records)`` writes each result as it arrives."""
    if not ctx.resources.remote:
        for i in todo:
            try:
                out = fn(shards[i])
            except Exception as exc:
                raise StageError(f"stage {ctx.name}: shard {i} of {name!r} ({len(shards[i])} records) failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
            finished(i, out)
        return
    import ray

    res = ctx.resources
    _check_resources(ctx)
    task = _task(res)
    retryable = _retryable()
    fn_ref = ray.put(fn)  # serialized once, shared by every shard task
    pending = list(todo)
    attempts: dict[int, int] = {}
    running: dict[Any, int] = {}
    try:
        while pending or running:
            while pending and len(running) < res.num_workers:
                i = pending.pop(0)
                running[task(f"{ctx.name}:{name}[{i}]").remote(fn_ref, shards[i])] = i
            done, _ = ray.wait(list(running), num_returns=1)
            i = running.pop(done[0])
            try:
                out = ray.get(done[0])
            except retryable as exc:
                attempts[i] = attempts.get(i, 0) + 1
                stats["retries"] += 1
                if attempts[i] > res.max_retries:
                    raise StageError(f"stage {ctx.name}: shard {i} of {name!r}: its Ray worker died {attempts[i]} "
                                     f"times (resources.{ctx.name}.max_retries={res.max_retries}); last error: "
                                     f"{_first_line(exc)}") from None
                ctx.log.warning("shard %d of %s: Ray worker died (%s); re-running it (retry %d/%d)", i, name,
                                type(exc).__name__, attempts[i], res.max_retries)
                pending.insert(0, i)
                continue
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                raise StageError(f"stage {ctx.name}: shard {i} of {name!r} failed on a Ray worker: "
                                 f"{type(cause).__name__}: {cause}") from None
            finished(i, out)
    finally:
        for ref in running:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)


def call_remote(ctx: StageContext, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)`` as one Ray task with the stage's resources, re-run if its worker dies."""
    import ray

    res = ctx.resources
    _check_resources(ctx)
    task = _task(res)
    retryable = _retryable()
    for attempt in range(res.max_retries + 1):
        try:
            return ray.get(task(f"{ctx.name}:call").remote(fn, *args, **kwargs))
        except retryable as exc:
            if attempt >= res.max_retries:
                raise StageError(f"stage {ctx.name}: its Ray task died {attempt + 1} times "
                                 f"(resources.{ctx.name}.max_retries={res.max_retries}); last error: "
                                 f"{_first_line(exc)}") from None
            ctx.log.warning("Ray task of stage %s died (%s); re-running it", ctx.name, type(exc).__name__)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
            raise StageError(f"stage {ctx.name}: its Ray task failed: {type(cause).__name__}: {cause}") from None


# -- logging ---------------------------------------------------------------------------------------------

def _console_mode(quiet: bool) -> str:
    if quiet:
        return "quiet"
    return "rich" if sys.stderr.isatty() else "plain"


@contextlib.contextmanager
def _logging_to(run_dir: Path | None, mode: str) -> Iterator[Any]:
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


# -- the runner ------------------------------------------------------------------------------------------

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
        self.mode = progress_mode or _console_mode(quiet)
        self.ray = RayHandle(cfg)
        self.pools = PoolManager(cfg, running=pools)

    # -- fingerprints and plan --------------------------------------------------------------------------
    def _disk_sources(self) -> dict[str, dict]:
        """Outputs of finished stages on disk (for inputs no enabled stage produces)."""
        found: dict[str, dict] = {}
        for n, m in self.store.manifests().items():
            if m.get("state") not in ("done", "stale"):
                continue
            for out, desc in (m.get("outputs") or {}).items():
                found[out] = {"stage": n, "fingerprint": desc.get("fingerprint"), "state": m["state"]}
        return found

    def check_inputs(self, only: str | None = None) -> None:
        """Every input of the stages to run comes from an enabled stage or a finished one on disk."""
        producers = _producers(self.stages)
        disk = self._disk_sources()
        problems = []
        names = [only] if only else self.order
        for n in names:
            for inp in self.stages[n].inputs:
                src = producers.get(inp)
                if src is not None and (only is None or src == n):
                    continue
                if src is not None:  # `posttrain stage`: the producer must already be done
                    m = self.store.read_manifest(src)
                    state = m.get("state") if m else "never run"
                    if state == "done" or (state == "stale" and inp in disk):
                        continue
                    problems.append(f"stage {n} reads {inp!r} from stage {src}, which is not done (state: {state}); "
                                    f"fix: posttrain run CONFIG (or posttrain stage {src} CONFIG) first")
                elif inp not in disk or not self.store.artifact_exists(inp):
                    problems.append(f"stage {n} reads {inp!r}, which no enabled stage writes and {self.store.root} "
                                    "does not hold; fix: add the stage that writes it to graph")
        if problems:
            raise RunError("\n".join(problems))

    def check_model_folders(self, only: str | None = None) -> None:
        """Before any work: every model folder a stage to run names (through a role, or directly) exists and
        holds a model. Otherwise a missing folder would surface only when that stage starts, after the earlier
        stages ran. Embedded names are skipped: they are built on first use."""
        from pipeline.models import EMBEDDED, ModelError, resolve_model
        from pipeline.stage import roles_named

        users: dict[str, list[str]] = {}
        for name in [only] if only else self.order:
            section = self.cfg.stage_config(name)
            for _, role in roles_named(section) if section is not None else ():
                users.setdefault(role, []).append(name)
        problems = []
        for role, stages in sorted(users.items()):
            model = self.cfg.models[role].model if role in self.cfg.models else None
            if model is None or model in EMBEDDED:
                continue
            try:
                resolve_model(model)
            except ModelError as exc:
                problems.append(f"models.{role}.model (used by {', '.join(dict.fromkeys(stages))}): {exc}")
        if problems:
            raise RunError("\n".join(problems))

    def _parts(self, name: str, input_fps: dict[str, str | None], roles: list[str]) -> dict:
        st = self.stages[name]
        section = self.cfg.stage_config(name)
        return {"stage": name, "config": fingerprint(section.model_dump(mode="json")), "code": code_version(st),
                "seed": self.cfg.seed, "inputs": dict(sorted(input_fps.items())),
                "pools": {r: _pool_fingerprint(self.cfg, r) for r in sorted(roles)}}

    def plan_stage(self, name: str, out_fps: dict[str, str | None], reran: list[str], force: bool = False) -> PlanItem:
        st = self.stages[name]
        old = self.store.read_manifest(name)
        # The roles of the fingerprint the manifest was written with: for a done stage the roles it
        # used; for an interrupted one the roles predicted when it started (not the ones it had
        # reached when killed: that would change the fingerprint and lose its finished shards).
        roles = sorted(((old or {}).get("fingerprint_parts") or {}).get("pools", {}))
        inputs = {i: out_fps.get(i) for i in st.inputs}
        parts = self._parts(name, inputs, roles)
        fp = fingerprint(parts)
        if force:
            return PlanItem(name, "run", "forced (--force)", fp, parts)
        if old is None:
            return PlanItem(name, "run", "not run before", fp, parts)
        state = old.get("state")
        if state == "stale":
            return PlanItem(name, "run", f"stale: {old.get('stale_reason') or 'upstream changed'}", fp, parts)
        if old.get("fingerprint") != fp:
            return PlanItem(name, "run", _what_changed(old.get("fingerprint_parts"), parts), fp, parts)
        if state == "done":
            missing = [o for o in st.outputs if not self.store.artifact_exists(o)]
            if missing:
                return PlanItem(name, "run", f"output {', '.join(missing)} missing from the run directory", fp, parts)
            upstream = [u for u in reran if u in self._upstream(name)]
            if upstream:
                return PlanItem(name, "run", f"upstream {upstream[0]} reran", fp, parts)
            return PlanItem(name, "skip", f"up to date (fingerprint {fp[:12]})", fp, parts)
        maps = old.get("maps") or {}
        done = sum(m.get("done", 0) for m in maps.values())
        total = sum(m.get("shards", 0) for m in maps.values())
        what = "interrupted" if state == "running" else "failed"
        return PlanItem(name, "resume", f"{what} earlier; {done}/{total} shards done, kept", fp, parts)

    def _upstream(self, name: str) -> set[str]:
        producers = _producers(self.stages)
        seen: set[str] = set()
        frontier = [name]
        while frontier:
            n = frontier.pop()
            for i in self.stages[n].inputs:
                p = producers.get(i)
                if p and p not in seen:
                    seen.add(p)
                    frontier.append(p)
        return seen

    def _initial_out_fps(self) -> dict[str, str | None]:
        return {k: v["fingerprint"] for k, v in self._disk_sources().items()}

    def plan(self, only: str | None = None, force: bool = False) -> list[PlanItem]:
        """What ``run`` would do, without doing it (predicted fingerprints for stages that run)."""
        self.check_inputs(only)
        out_fps = self._initial_out_fps()
        reran: list[str] = []
        items = []
        for name in ([only] if only else self.order):
            item = self.plan_stage(name, out_fps, reran, force=force)
            items.append(item)
            old = self.store.read_manifest(name) or {}
            for o in self.stages[name].outputs:
                if item.action == "skip":
                    out_fps[o] = (old.get("outputs") or {}).get(o, {}).get("fingerprint")
                else:
                    out_fps[o] = fingerprint({"stage": item.fingerprint, "output": o})
            if item.action != "skip":
                reran.append(name)
        return items

    # -- execution ---------------------------------------------------------------------------------------
    def run(self, only: str | None = None, force: bool = False) -> list[PlanItem]:
        """Run the graph (or only stage ``only``). Returns what was done for each stage."""
        if only is not None and only not in self.stages:
            raise RunError(f"stage {only!r} is not enabled in this config (graph: {', '.join(self.order)})")
        root = Path(self.cfg.run_dir)
        with _run_dir_lock(root), _logging_to(root, self.mode) as console:
            reporter = ProgressReporter(self.mode, console=console)
            t0 = time.perf_counter()
            log.info("run %s: %s", root, " -> ".join([only] if only else self.order))
            done: list[PlanItem] = []
            try:
                self.check_inputs(only)
                self.check_model_folders(only)
                atomic_write_text(root / "config.yaml", dump_config(self.cfg))
                out_fps = self._initial_out_fps()
                reran: list[str] = []
                for name in ([only] if only else self.order):
                    item = self.plan_stage(name, out_fps, reran, force=force)
                    if item.action == "skip":
                        log.info("stage %s: skip, %s", name, item.reason)
                    else:
                        log.info("stage %s: %s (%s)", name, item.action, item.reason)
                        self._execute(item, reporter)
                        reran.append(name)
                        self.mark_stale(dependents(self.store, self.stages, name), f"upstream {name} reran")
                    m = self.store.read_manifest(name) or {}
                    for o in self.stages[name].outputs:
                        out_fps[o] = (m.get("outputs") or {}).get(o, {}).get("fingerprint")
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
            m = self.store.read_manifest(n)
            if m is None or m.get("state") == "stale":
                continue
            m["state"], m["stale_reason"] = "stale", reason
            self.store.write_manifest(n, m)
            log.info("stage %s marked stale (%s)", n, reason)

    def _execute(self, item: PlanItem, reporter: ProgressReporter) -> None:
        name = item.stage
        st = self.stages[name]
        old = self.store.read_manifest(name) or {}
        if item.action == "run":
            self.store.clear_stage(name, st.outputs)
            old = {}
        producers = _producers(self.stages)
        disk = self._disk_sources()
        manifest: dict[str, Any] = {
            "stage": name, "state": "running", "fingerprint": item.fingerprint, "fingerprint_parts": item.parts,
            "reason": item.reason, "config": self.cfg.stage_config(name).model_dump(mode="json"),
            "declared_inputs": list(st.inputs), "declared_outputs": list(st.outputs),
            "inputs": {i: {"fingerprint": item.parts["inputs"].get(i),
                           "stage": producers.get(i) or disk.get(i, {}).get("stage")} for i in st.inputs},
            "outputs": {}, "intermediates": {}, "maps": old.get("maps", {}), "metrics": old.get("metrics", {}),
            "pools_used": old.get("pools_used", {}), "attempts": int(old.get("attempts", 0)) + 1,
            "started_at": _now(), "finished_at": None, "duration_s": None,
            "previous_duration_s": float(old.get("elapsed_s") or 0.0) + float(old.get("previous_duration_s") or 0.0),
            "elapsed_s": 0.0, "pid": os.getpid(), "host": socket.gethostname(), "error": None,
            "versions": library_versions(), "ray": None,
        }
        self.store.write_manifest(name, manifest)
        ctx = StageContext(stage=st, config=self.cfg.stage_config(name), run_config=self.cfg, store=self.store,
                           resources=self.cfg.resources_for(name), pools=self.pools, reporter=reporter,
                           ensure_ray=self.ray.ensure, metrics=dict(manifest["metrics"]))
        t0 = time.perf_counter()

        def refresh() -> None:
            manifest["maps"] = {**manifest["maps"], **{k: dict(v) for k, v in ctx.maps.items()}}
            manifest["elapsed_s"] = round(time.perf_counter() - t0, 3)
            manifest["pools_used"] = {**manifest["pools_used"], **ctx.pools_used}
            self.store.write_manifest(name, manifest)

        ctx.on_progress = refresh
        try:
            st.run(ctx)
            missing = [o for o in st.outputs if o not in ctx.written or not self.store.artifact_exists(o)]
            if missing:
                raise StageError(f"stage {name} returned without writing its declared output(s) {missing}; "
                                 "fix: write them with ctx.map / ctx.write / ctx.output_path")
        except BaseException as exc:
            refresh()
            manifest.update(state="failed", error=f"{type(exc).__name__}: {exc}", finished_at=_now(),
                            metrics=_jsonable(ctx.metrics), ray=self.ray.info if ctx.used_ray else None)
            self.store.write_manifest(name, manifest)
            log.error("stage %s failed after %.1fs: %s: %s", name, time.perf_counter() - t0, type(exc).__name__, exc)
            log.debug("%s", traceback.format_exc())
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise RunError(f"stage {name} failed: {exc}") from exc
        refresh()
        pools_used = {**manifest["pools_used"], **ctx.pools_used}
        parts = dict(item.parts, pools={r: _pool_fingerprint(self.cfg, r) for r in sorted(pools_used)})
        fp = fingerprint(parts)
        outputs = {o: {**self.store.describe(o), "fingerprint": fingerprint({"stage": fp, "output": o})}
                   for o in st.outputs}
        inter = {n: self.store.describe(n, stage=name) for n, k in ctx.written.items() if k == "intermediate"}
        duration = time.perf_counter() - t0
        manifest.update(state="done", fingerprint=fp, fingerprint_parts=parts, outputs=outputs, intermediates=inter,
                        metrics=_jsonable(ctx.metrics), pools_used=pools_used, finished_at=_now(),
                        duration_s=round(duration, 3), elapsed_s=round(duration, 3),
                        ray=self.ray.info if ctx.used_ray else None)
        self.store.write_manifest(name, manifest)
        counts = ", ".join(f"{o}: {d['records']} records" if d["kind"] == "dataset" else f"{o}: model"
                           for o, d in outputs.items())
        log.info("stage %s done in %.1fs (%s)", name, duration, counts)


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))


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


# -- status ------------------------------------------------------------------------------------------------

def _alive(pid: int | None, host: str | None) -> bool:
    """Whether the process that owns a ``running`` manifest still runs (another host: assume so)."""
    if host != socket.gethostname():
        return True
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def status_rows(run_dir: str | os.PathLike) -> list[dict]:
    """One row per stage of a run directory: state, record counts, time, note."""
    import yaml

    store = ArtifactStore(run_dir)
    if not store.root.is_dir():
        raise RunError(f"{store.root} is not a run directory (it does not exist)")
    manifests = store.manifests()
    graph: list[str] = []
    cfg_path = store.root / "config.yaml"
    if cfg_path.exists():
        with contextlib.suppress(Exception):
            graph = list(yaml.safe_load(cfg_path.read_text()).get("graph") or [])
    # Dependency order from the manifests' declared inputs/outputs; ties: graph order, then start time.
    rank = {n: (graph.index(n) if n in graph else len(graph), manifests[n].get("started_at") or "") for n in manifests}
    producers = {o: n for n, m in manifests.items() for o in m.get("declared_outputs", [])}
    deps = {n: {producers[i] for i in m.get("declared_inputs", []) if i in producers} - {n}
            for n, m in manifests.items()}
    ordered: list[str] = []
    remaining = sorted(manifests, key=lambda n: rank[n])
    while remaining:
        ready = [n for n in remaining if deps[n] <= set(ordered)] or remaining[:1]
        ordered.append(ready[0])
        remaining.remove(ready[0])
    rows = []
    for n in ordered:
        m = manifests[n]
        state = m.get("state", "?")
        if state == "running" and not _alive(m.get("pid"), m.get("host")):
            state = "interrupted"
        if m.get("outputs"):
            counts = ", ".join(f"{o}={d['records']}" if d.get("kind") == "dataset" else f"{o}=model"
                               for o, d in m["outputs"].items())
        else:
            counts = ", ".join(f"{k}: {v.get('done', 0)}/{v.get('shards', 0)} shards"
                               for k, v in (m.get("maps") or {}).items())
        seconds = m.get("duration_s") if state == "done" else m.get("elapsed_s")
        note = m.get("error") if state == "failed" else m.get("stale_reason") if state == "stale" else ""
        if state in ("interrupted", "failed"):
            note = (note + "; " if note else "") + "rerun `posttrain run` to resume"
        rows.append({"stage": n, "state": state, "records": counts, "time": _fmt_s(seconds),
                     "finished": m.get("finished_at") or "-", "attempts": m.get("attempts", 1), "note": note or ""})
    for n in graph:
        if n not in manifests:
            rows.append({"stage": n, "state": "pending", "records": "", "time": "-", "finished": "-",
                         "attempts": 0, "note": ""})
    return rows
