"""The stage contract: what a stage declares (`Stage`) and what it gets while it runs (`StageContext`).

A stage module ends with a ``STAGE = Stage(...)`` object; the runner (``pipeline/run/runner.py``)
orders stages by their declared inputs and outputs, decides which ones to run, and calls
``stage.run(ctx)``. Everything a stage reads or writes goes through its context, so that outputs
are written atomically, fingerprinted and resumable after a kill.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel

from pipeline.executor import (
    CapacityError,
    TaskError,
    WorkerDied,
    check_capacity,
    first_line,
    remote_task,
    run_items,
)
from pipeline.files import canonical_json
from pipeline.tracking import StageWriter

if TYPE_CHECKING:  # imported lazily at run time: these pull in Ray / vLLM / datasets
    import datasets

    from pipeline.engines.pool import WorkerPool
    from pipeline.run.artifacts import ArtifactStore
    from pipeline.run.config import RunConfig, StageResources
    from pipeline.run.progress import Bar, ProgressReporter

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _RoleMarker:
    """Metadata marking a stage config field whose value names a model role of ``models:``."""


ModelRole = Annotated[str, _RoleMarker()]
"""Type for a stage config field that names a model role (e.g. ``model: ModelRole = "policy"``):
the run config is rejected before any work when the role is not defined under ``models:``."""
OptionalModelRole = Annotated[str | None, _RoleMarker()]
"""``ModelRole`` that may be None (the feature it serves is off)."""


def _is_role(annotation_metadata) -> bool:
    return any(isinstance(m, _RoleMarker) for m in annotation_metadata)


def roles_named(section: Any) -> list[tuple[str, str]]:
    """(field path, role) for every model role a stage config names: fields typed ``ModelRole`` and the
    values of fields typed ``dict[str, ModelRole]`` (e.g. answer.routes)."""
    out: list[tuple[str, str]] = []
    for field_name, info in type(section).model_fields.items():
        value = getattr(section, field_name)
        if _is_role(info.metadata):
            if value is not None:
                out.append((field_name, value))
        elif isinstance(value, dict) and typing.get_origin(info.annotation) is dict:
            value_type = typing.get_args(info.annotation)[1]
            if _is_role(getattr(value_type, "__metadata__", ())):
                out.extend((f"{field_name}.{k}", v) for k, v in value.items())
    return out


class StageError(RuntimeError):
    """A stage failed; the message names the stage, and the shard or worker when there is one."""


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline, with declared inputs and outputs (artifact names)."""

    name: str
    """Unique stage name (the key of its section under ``stages:`` in the run config)."""
    inputs: tuple[str, ...]
    """Names of the datasets / model artifacts it reads (outputs of upstream stages)."""
    outputs: tuple[str, ...]
    """Names of the datasets / model artifacts it writes; each must exist when ``run`` returns."""
    config_cls: type[BaseModel]
    """Pydantic model of this stage's config section (``extra="forbid"``, documented fields)."""
    run: Callable[[StageContext], None]
    """``run(ctx)``: does the work through the context."""
    version: str = "1"
    """Bump when the stage's behaviour changes through code outside its own module (its module's
    source is already part of the fingerprint), so cached outputs are recomputed."""
    optional_inputs: tuple[str, ...] = ()
    """Artifacts the stage reads when an enabled stage writes them (e.g. the report reads the eval stage's results):
    then the stage runs after that one and its fingerprint covers them; when no enabled stage writes them they are
    not required."""

    @property
    def reads(self) -> tuple[str, ...]:
        """``inputs`` and ``optional_inputs``: everything the stage may read."""
        return (*self.inputs, *self.optional_inputs)

    def __post_init__(self) -> None:
        # Lists are accepted for convenience; tuples keep the object hashable and immutable.
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "optional_inputs", tuple(self.optional_inputs))
        if not _NAME.match(self.name or ""):
            raise ValueError(f"Stage name {self.name!r} must be an identifier (letters, digits, _)")
        for kind, names in (("inputs", self.reads), ("outputs", self.outputs)):
            for n in names:
                if not isinstance(n, str) or not _NAME.match(n):
                    raise ValueError(f"stage {self.name}: {kind} entry {n!r} must be an identifier")
            if len(set(names)) != len(names):
                raise ValueError(f"stage {self.name}: {kind} has duplicates: {list(names)}")
        if set(self.reads) & set(self.outputs):
            raise ValueError(f"stage {self.name}: {sorted(set(self.reads) & set(self.outputs))} "
                             "are both inputs and outputs")
        if not (isinstance(self.config_cls, type) and issubclass(self.config_cls, BaseModel)):
            raise ValueError(f"stage {self.name}: config_cls must be a pydantic BaseModel subclass")
        if not callable(self.run):
            raise ValueError(f"stage {self.name}: run must be callable")


def record_seed(run_seed: int, record_id: str, salt: str = "") -> int:
    """A stable per-record seed in [0, 2**31): the same run seed, record id and salt give the same
    seed in every process and every rerun (Python's ``hash`` is salted per process, so it is not
    usable). Use ``salt`` to draw independent seeds for several requests about one record."""
    digest = hashlib.blake2b(f"{run_seed}\x1f{salt}\x1f{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def records_hash(records: Sequence[Any]) -> str:
    """Content hash of a list of records (identifies a shard's input, to reuse finished shards)."""
    return hashlib.blake2b(canonical_json(list(records)).encode(), digest_size=16).hexdigest()


@dataclass
class StageContext:
    """What a running stage gets. Built by the runner; see ARCHITECTURE.md "Stage contract"."""

    stage: Stage
    config: Any
    """This stage's config (an instance of ``stage.config_cls``)."""
    run_config: RunConfig
    """The whole resolved run config."""
    store: ArtifactStore
    resources: StageResources
    """Ray resources of this stage's remote shards (``resources.<stage>`` in the run config)."""
    pools: Any
    """The runner's PoolManager (shared by all stages of the run)."""
    reporter: ProgressReporter
    ensure_ray: Callable[[], None]
    on_progress: Callable[[], None] = lambda: None
    """Called after each finished shard (the runner refreshes the manifest)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Figures merged into the stage manifest (counts of dropped records, final loss, ...)."""
    maps: dict[str, dict[str, int]] = field(default_factory=dict)
    """Shard bookkeeping of every ``map`` call (shards, done, resumed, retries), for the manifest."""
    written: dict[str, str] = field(default_factory=dict)
    """Artifact name -> kind ("dataset", "model", "intermediate") written by this stage."""
    pools_used: dict[str, str] = field(default_factory=dict)
    """Model role -> model, for every ``pool(role)`` call (part of the fingerprint)."""
    used_ray: bool = False
    tracker: StageWriter = field(default=None)  # type: ignore[assignment]
    """Where ``log_metrics`` rows also go (the run's TensorBoard); the runner closes it when the stage ends."""

    def __post_init__(self) -> None:
        if self.tracker is None:
            self.tracker = StageWriter(self.stage.name)

    # -- identity -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def seed(self) -> int:
        """The run seed (derive per-record seeds with ``record_seed(ctx.seed, id)``)."""
        return self.run_config.seed

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"posttrain.stage.{self.stage.name}")

    @property
    def work_dir(self) -> Path:
        """Private folder of the stage; survives a kill (checkpoints, partial state); cleared when
        the stage starts fresh (config/input/code change or --force)."""
        path = self.store.work_dir(self.stage.name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- inputs ---------------------------------------------------------------------------------
    def _check_input(self, name: str) -> None:
        if name not in self.stage.reads and name not in self.written:
            raise StageError(
                f"stage {self.name} reads {name!r}, which is not among its declared inputs "
                f"{list(self.stage.reads)}; fix: add it to the Stage's inputs")

    def read(self, name: str) -> datasets.Dataset:
        """An upstream output dataset (or one this stage already wrote) as a ``datasets.Dataset``."""
        self._check_input(name)
        if self.written.get(name) == "intermediate":
            return self.store.read_dataset(name, stage=self.name)
        return self.store.read_dataset(name)

    def input_path(self, name: str) -> Path:
        """Folder of an upstream artifact: ``models/<name>`` for a model, ``datasets/<name>`` else."""
        self._check_input(name)
        return self.store.artifact_path(name)

    # -- outputs --------------------------------------------------------------------------------
    def _claim(self, name: str, kind: str) -> None:
        if kind != "intermediate" and name not in self.stage.outputs:
            raise StageError(f"stage {self.name} writes {name!r}, which is not among its declared outputs "
                             f"{list(self.stage.outputs)}; fix: add it to the Stage's outputs")
        if name in self.stage.reads:
            raise StageError(f"stage {self.name}: {name!r} is one of its inputs and cannot be written")
        self.written[name] = kind

    def _kind(self, name: str) -> str:
        return "dataset" if name in self.stage.outputs else "intermediate"

    def write(self, name: str, data: Iterable[dict] | datasets.Dataset, shard_size: int | None = None) -> None:
        """Write a whole output dataset (sharded Parquet, swapped into place atomically)."""
        kind = self._kind(name)
        self._claim(name, kind)
        n = self.store.write_dataset(name, data, shard_size=self._shard_size(shard_size),
                                     stage=self.name if kind == "intermediate" else None)
        self.log.info("wrote %s: %d records", name, n)

    def output_path(self, name: str) -> Path:
        """Folder for a model artifact output (``models/<name>``); write it there, e.g. with
        ``save_pretrained``. It is fingerprinted when the stage returns."""
        self._claim(name, "model")
        path = self.store.model_dir(name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _shard_size(self, shard_size: int | None) -> int:
        return int(shard_size or self.resources.shard_size or self.run_config.shard_size)

    def map(self, name: str, records: Iterable[dict], fn: Callable[[list[dict]], list[dict]],
            shard_size: int | None = None, desc: str | None = None) -> list[dict]:
        """Resumable map over fixed shards of ``records``.

        ``records`` is cut into shards of ``shard_size``; ``fn(shard) -> list[dict]`` runs on each
        shard that has no finished output yet (a finished shard is one whose file exists and was
        made from the same input records), and each result is written atomically as one Parquet
        shard of ``name``. Returns all output records in shard order (read back from the shards,
        so a resumed run returns exactly what an uninterrupted one does).

        ``name`` is a declared output or a stage-internal intermediate (e.g. ``evolve_round_1``).
        ``fn`` must be deterministic given its shard (seed requests with ``record_seed``). With
        ``resources.<stage>.remote: true`` shards run as Ray tasks (``num_cpus``/``num_gpus`` each,
        ``num_workers`` at once, re-run up to ``max_retries`` times when their worker dies); then
        ``fn`` must not capture a worker pool (pools live in the driver process).
        """
        kind = self._kind(name)
        self._claim(name, kind)
        stage_dir = self.name if kind == "intermediate" else None
        records = list(records)
        size = self._shard_size(shard_size)
        shards = [records[i:i + size] for i in range(0, len(records), size)]
        hashes = [records_hash(s) for s in shards]
        if not shards:  # no input: the output is an empty dataset (one empty shard marks it written)
            self.store.prepare_map(name, 0, stage=stage_dir)
            self.store.write_shard(name, 0, 1, [], input_hash=records_hash([]), stage=stage_dir)
            self.maps[name] = {"shards": 0, "done": 0, "resumed": 0, "retries": 0, "records_in": 0}
            return []
        self.store.prepare_map(name, len(shards), stage=stage_dir)
        done = [self.store.shard_matches(name, i, h, stage=stage_dir) for i, h in enumerate(hashes)]
        stats = {"shards": len(shards), "done": sum(done), "resumed": sum(done), "retries": 0,
                 "records_in": len(records)}
        self.maps[name] = stats
        if stats["resumed"]:
            self.log.info("%s: resuming, %d of %d shards already done", name, stats["resumed"], len(shards))
        bar = self.progress(len(records), desc or f"{self.name}:{name}")
        bar.advance(sum(len(s) for s, d in zip(shards, done, strict=True) if d))

        def finished(i: int, out: list[dict]) -> None:
            _check_output(self.name, name, i, out)
            self.store.write_shard(name, i, len(shards), out, input_hash=hashes[i], stage=stage_dir)
            stats["done"] += 1
            bar.advance(len(shards[i]))
            self.on_progress()

        todo = [i for i, d in enumerate(done) if not d]
        try:
            if todo:
                if self.resources.remote:
                    self.ensure_ray()
                    self.used_ray = True
                self._run_shards(name, shards, todo, fn, finished, stats)
        finally:
            bar.close()
            self.on_progress()
        self.store.unify_shards(name, stage=stage_dir)
        return self.store.read_dataset(name, stage=stage_dir).to_list()

    def _run_shards(self, name: str, shards: list[list[dict]], todo: list[int],
                    fn: Callable[[list[dict]], list[dict]], finished: Callable[[int, list[dict]], None],
                    stats: dict) -> None:
        """Run ``fn`` on the shards in ``todo``: in this process, or as Ray tasks when the stage's resources say
        ``remote``. ``finished(i, records)`` writes each result as it arrives."""
        if not self.resources.remote:
            for i in todo:
                try:
                    out = fn(shards[i])
                except Exception as exc:
                    raise StageError(f"stage {self.name}: shard {i} of {name!r} ({len(shards[i])} records) failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
                finished(i, out)
            return
        import ray

        res = self._checked_resources()
        fn_ref = ray.put(fn)  # serialized once, shared by every shard task

        def died(i: int, slot: int, exc: BaseException, attempt: int) -> None:
            stats["retries"] += 1
            self.log.warning("shard %d of %s: Ray worker died (%s); re-running it (retry %d/%d)", i, name,
                             type(exc).__name__, attempt, res.max_retries)

        try:
            run_items(todo, lambda i, _: remote_task(f"{self.name}:{name}[{i}]", res.num_cpus, res.num_gpus)
                      .remote(fn_ref, shards[i]), range(res.num_workers), max_retries=res.max_retries,
                      on_result=finished, on_death=died)
        except WorkerDied as exc:
            stats["retries"] += 1
            raise StageError(f"stage {self.name}: shard {exc.index} of {name!r}: its Ray worker died {exc.attempts} "
                             f"times (resources.{self.name}.max_retries={res.max_retries}); last error: "
                             f"{first_line(exc.last)}") from None
        except TaskError as exc:
            raise StageError(f"stage {self.name}: shard {exc.index} of {name!r} failed on a Ray worker: {exc}") from None

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once with this stage's resources: as a Ray task with
        ``num_cpus``/``num_gpus`` (re-run if its worker dies) when ``resources.<stage>.remote``
        is true (e.g. training on a GPU node), else in the driver process."""
        if not self.resources.remote:
            return fn(*args, **kwargs)
        self.ensure_ray()
        self.used_ray = True
        res = self._checked_resources()
        result: dict[int, Any] = {}

        def died(i: int, slot: int, exc: BaseException, attempt: int) -> None:
            self.log.warning("Ray task of stage %s died (%s); re-running it", self.name, type(exc).__name__)

        try:
            run_items([0], lambda i, _: remote_task(f"{self.name}:call", res.num_cpus, res.num_gpus)
                      .remote(fn, *args, **kwargs), [0], max_retries=res.max_retries,
                      on_result=result.__setitem__, on_death=died)
        except WorkerDied as exc:
            raise StageError(f"stage {self.name}: its Ray task died {exc.attempts} times "
                             f"(resources.{self.name}.max_retries={res.max_retries}); last error: "
                             f"{first_line(exc.last)}") from None
        except TaskError as exc:
            raise StageError(f"stage {self.name}: its Ray task failed: {exc}") from None
        return result[0]

    def _checked_resources(self) -> StageResources:
        """This stage's resources, after checking that some Ray node can run a task that asks for them."""
        res = self.resources
        fixed = not (self.run_config.ray.address or os.environ.get("RAY_ADDRESS"))
        try:
            check_capacity(res.num_cpus, res.num_gpus, fixed, what=f"stage {self.name}: resources.{self.name}",
                           fix=f"lower resources.{self.name}.num_cpus/num_gpus or raise ray.num_cpus/num_gpus")
        except CapacityError as exc:
            raise StageError(str(exc)) from None
        return res

    # -- pools, metrics, progress ---------------------------------------------------------------
    def pool(self, role: str) -> WorkerPool:
        """The WorkerPool of a model role of the run config (``models.<role>``), started on first
        use and shared with every stage (two roles with the same settings share one pool)."""
        self.ensure_ray()
        self.used_ray = True
        pool = self.pools.get(role, stage=self.name)
        self.pools_used[role] = self.run_config.models[role].model
        return pool

    def release_pools(self) -> None:
        """Shut down every worker pool (frees engines before training); later ``pool()`` calls
        start them again."""
        self.pools.shutdown()

    def log_metrics(self, values: dict[str, Any], step: int | None = None) -> None:
        """Append one point of a time series (loss curves, per-round figures) to
        ``stages/<stage>/metrics.jsonl``, and send its numbers to the run's TensorBoard."""
        self.store.append_metrics(self.name, {"time": time.time(), "step": step, **values})
        self.tracker.log(values, step)

    def progress(self, total: int, desc: str | None = None) -> Bar:
        """A progress bar (records, records/s, ETA); ``bar.advance(n)``; closes with ``with``."""
        return self.reporter.bar(total, desc or self.name)


def _check_output(stage: str, name: str, index: int, out: Any) -> None:
    if not isinstance(out, list) or not all(isinstance(r, dict) for r in out):
        got = type(out).__name__ if not isinstance(out, list) else \
            type(next(r for r in out if not isinstance(r, dict))).__name__
        raise StageError(f"stage {stage}: the map function for {name!r} returned {got} for shard {index}; "
                         "it must return a list of dicts (one per output record)")
