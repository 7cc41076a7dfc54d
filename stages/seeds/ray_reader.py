"""The seeds stage's reading and chunking on Ray Data, for corpora too large for one machine.

The driver lists the work (``read_units``): each matched file, each row group of a Parquet file and each slice of
a save_to_disk dataset is one unit. Ray Data runs the units as tasks (``map_batches``): each reads its part with
the same functions as the in-driver path (``loaders.file_documents`` / ``row_document``), chunks it, and computes
the near-duplicate signature (MinHash) of every chunk. The driver puts the results back in unit order, so the
records, their order and therefore the exact/near dedup (one LSH index over all blocks, same MinHash settings),
the sampling and the ids are those of the in-driver path on the same input. A source's Python-attribute text
(kind book) is small and is read in the driver.

The files must be readable from every node at the same path (a shared filesystem, as the run directory).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.seeds.config import SeedsConfig, SeedSource
from stages.seeds.loaders import (
    Document,
    check_source,
    file_documents,
    module_documents,
    row_document,
    source_files,
)
from stages.seeds.records import dataset_rows, iter_dataset_rows, iter_parquet, parquet_row_groups
from stages.seeds.skips import SkipLog

DATASET_SLICE = 10_000
"""Rows of a save_to_disk dataset per unit."""


@dataclass(frozen=True)
class Unit:
    """One piece of a source that a task reads: a file, a row group of a Parquet file, or a dataset slice."""

    source: int
    """Index of the source in ``SeedsConfig.sources``."""
    kind: str
    """file | row_group | dataset"""
    path: str | None = None
    part: int | None = None
    """Row group index (row_group)."""
    rows: tuple[int, int] | None = None
    """The unit's rows [start, end) of the file (row_group) or of the dataset (dataset)."""


def read_units(cfg: SeedsConfig) -> tuple[list[Unit], list[SkipLog]]:
    """Every unit of work, in the order the in-driver path reads them, and per source the skips of listing its
    files (links, vendored folders)."""
    units: list[Unit] = []
    listing: list[SkipLog] = []
    for i, source in enumerate(cfg.sources):
        check_source(source)
        skips = SkipLog()
        for path in source_files(source, skips):
            groups = parquet_row_groups(path) if path.name.lower().endswith(".parquet") else []
            if len(groups) > 1:
                first = 0
                for g, n in enumerate(groups):
                    units.append(Unit(i, "row_group", str(path), g, (first, first + n)))
                    first += n
            else:
                units.append(Unit(i, "file", str(path)))
        if source.dataset:
            n = dataset_rows(source)
            if n is None:  # a dataset by name: streamed, one unit
                units.append(Unit(i, "dataset"))
            else:
                units.extend(Unit(i, "dataset", rows=(a, min(a + DATASET_SLICE, n))) for a in range(0, n, DATASET_SLICE))
        listing.append(skips)
    return units, listing


def unit_documents(unit: Unit, source: SeedSource, skips: SkipLog) -> list[Document]:
    """The documents of one unit (what ``loaders.load_documents`` reads from that part of the source)."""
    if unit.kind == "file":
        return file_documents(Path(unit.path), source, skips)
    if unit.kind == "row_group":
        return [d for loc, row in iter_parquet(Path(unit.path), source, skips, unit.part, unit.rows[0])
                if (d := row_document(loc, row, source, skips)) is not None]
    return [d for loc, row in iter_dataset_rows(source, skips, unit.rows)
            if (d := row_document(loc, row, source, skips)) is not None]


def process_units(batch: dict[str, Any], cfg_json: str) -> dict[str, Any]:
    """Ray Data task: read, chunk and sign the units of a batch; one pickled result per unit."""
    from stages.seeds.build import chunk_documents, minhash

    cfg = SeedsConfig.model_validate_json(cfg_json)
    out = []
    for raw in batch["unit"]:
        unit: Unit = pickle.loads(raw)
        source = cfg.sources[unit.source]
        skips = SkipLog()
        docs = unit_documents(unit, source, skips)
        chunks = chunk_documents(docs, source, cfg, skips) if docs else []
        signatures = [minhash(r["text"]) for r in chunks] if cfg.near_dup_threshold is not None else None
        out.append(pickle.dumps({"chunks": chunks, "signatures": signatures, "skips": skips.to_dict(),
                                 "documents": len(docs)}))
    return {"index": batch["index"], "result": out}


def read_on_ray_data(cfg: SeedsConfig) -> tuple[list[tuple[SeedSource, list[dict], SkipLog, int]], list | None]:
    """Every source read and chunked on Ray Data: (source, chunk records, skips, documents) per source, as the
    in-driver path returns them, and the MinHash signature of every record in that order."""
    import ray.data

    from pipeline.executor import ensure_ray
    from stages.seeds.build import chunk_documents, minhash, require_chunks

    ensure_ray()
    units, listing = read_units(cfg)
    results: list[dict] = [{}] * len(units)
    if units:
        items = [{"index": k, "unit": pickle.dumps(u)} for k, u in enumerate(units)]
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 200))
        done = ds.map_batches(process_units, fn_kwargs={"cfg_json": cfg.model_dump_json()}, batch_size=1)
        for row in done.iter_rows():
            results[row["index"]] = pickle.loads(row["result"])
    by_source = []
    signatures: list | None = [] if cfg.near_dup_threshold is not None else None
    for i, source in enumerate(cfg.sources):
        skips = listing[i]
        # kind book's module text: small, read here, first (as the in-driver path reads it)
        module_docs = module_documents(source, skips)
        chunks = chunk_documents(module_docs, source, cfg, skips) if module_docs else []
        sigs = [minhash(r["text"]) for r in chunks] if signatures is not None else []
        n_docs = len(module_docs)
        for unit, res in zip(units, results, strict=True):
            if unit.source != i:
                continue
            chunks.extend(res["chunks"])
            skips.merge(SkipLog.from_dict(res["skips"]))
            n_docs += res["documents"]
            if signatures is not None:
                sigs.extend(res["signatures"])
        by_source.append((source, require_chunks(source, chunks, skips), skips, n_docs))
        if signatures is not None:
            signatures.extend(sigs)
    return by_source, signatures
