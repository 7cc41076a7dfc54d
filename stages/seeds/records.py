"""Rows of files of records (JSONL, JSONL.gz, a JSON array, Parquet) and of `datasets` datasets, streamed.

A file of records is never rejected for its total size: JSONL is read line by line (a line longer than
``max_document_bytes`` is skipped without being held in memory), Parquet one batch of a row group at a time,
a dataset row by row; each record is bounded by ``max_document_bytes`` on its own. A broken line or row is
skipped and counted with its file and line, the rest of the file is kept.
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from stages.seeds.config import SeedSource
from stages.seeds.skips import (
    BROKEN_JSON_FILE,
    BROKEN_JSON_LINE,
    EMPTY_FILE,
    NOT_AN_ITEM_OBJECT,
    NOT_AN_OBJECT,
    TOO_LARGE,
    UNDECODABLE,
    UNREADABLE,
    UNREADABLE_PARQUET,
    SeedSourceError,
    SkipLog,
)
from stages.seeds.text import read_file_bytes

RECORD_SUFFIXES = (".jsonl", ".parquet")
"""Files of records every source kind reads, one document per record (``.gz`` allowed for JSONL)."""
PARQUET_BATCH = 1024
"""Rows per Parquet read (inside one row group): what is held in memory at once."""


def is_record_file(path: Path) -> bool:
    return path.name.removesuffix(".gz").lower().endswith(RECORD_SUFFIXES)


def field_value(row: dict[str, Any], dotted: str) -> Any:
    """row['a']['b'] for 'a.b'; a list takes its first element; None when absent."""
    value: Any = row
    for part in dotted.split("."):
        if isinstance(value, list):
            value = value[0] if value else None
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, list):
        value = value[0] if value else None
    return value


def text_value(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _too_large(row: dict[str, Any], limit: int) -> bool:
    """Whether a row's text (its string values, nested ones included) is over ``limit`` UTF-8 bytes. Runs per record:
    a string is encoded to count its bytes only when its length alone cannot decide (a character is 1-4 bytes)."""
    strings: list[str] = []

    def collect(v: Any) -> None:
        if isinstance(v, str):
            strings.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                collect(x)
        elif isinstance(v, list | tuple):
            for x in v:
                collect(x)

    collect(row)
    chars = sum(len(s) for s in strings)
    if chars > limit:
        return True
    if 4 * chars <= limit:
        return False
    return sum(len(s.encode("utf-8", "surrogatepass")) for s in strings) > limit


def _lines(f: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of a binary stream; None for a line longer than ``limit`` (read past, not kept)."""
    number = 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # drop the rest of the long line, a piece at a time
                line = f.readline(1 << 20)
            yield number, None
            continue
        yield number, line


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_jsonl(path: Path, source: SeedSource, skips: SkipLog) -> Iterator[tuple[str, dict]]:
    """(location, row) of every good line of a JSONL file (gzipped or not), streamed."""
    limit = source.max_document_bytes
    blank = True
    try:
        with _open(path) as f:
            for number, raw in _lines(f, limit):
                blank = blank and raw is not None and not raw.strip()
                where = f"{path}:{number}"
                if raw is None:
                    skips.skip(where, TOO_LARGE, f"(line over {limit} bytes)")
                    continue
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    skips.skip(where, UNDECODABLE, f"({exc.reason} at byte {exc.start})")
                    continue
                except json.JSONDecodeError as exc:
                    skips.skip(where, BROKEN_JSON_LINE, f"({exc.msg})")
                    continue
                if not isinstance(row, dict):
                    skips.skip(where, NOT_AN_OBJECT)
                    continue
                yield where, row
    except (OSError, EOFError, gzip.BadGzipFile) as exc:  # a truncated .gz: the lines before the damage are kept
        skips.skip(str(path), UNREADABLE, f"({type(exc).__name__}: {exc})")
        return
    if blank:
        skips.skip(str(path), EMPTY_FILE)


def parquet_row_groups(path: Path) -> list[int]:
    """Rows per row group of a Parquet file (empty when it cannot be read: reading it then counts why)."""
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    except Exception:  # pyarrow raises several types on a damaged file
        return []


def iter_parquet(path: Path, source: SeedSource, skips: SkipLog, row_group: int | None = None,
                 first_row: int = 0) -> Iterator[tuple[str, dict]]:
    """(location, row) of a Parquet file (or of one row group, whose first row is number ``first_row``), one
    batch at a time; rows over the limit skipped."""
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        i = first_row
        groups = None if row_group is None else [row_group]
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=groups):
            for row in batch.to_pylist():
                where = f"{path}:row {i}"
                i += 1
                if _too_large(row, source.max_document_bytes):
                    skips.skip(where, TOO_LARGE, f"(row over {source.max_document_bytes} bytes)")
                    continue
                yield where, row
    except Exception as exc:  # pyarrow raises several types on a damaged file
        skips.skip(str(path), UNREADABLE_PARQUET, f"({type(exc).__name__}: {exc})")


def iter_json_array(path: Path, source: SeedSource, skips: SkipLog) -> Iterator[tuple[str, dict]]:
    """(location, item) of a JSON file holding a list of objects (one document: bounded as a whole)."""
    data = read_file_bytes(path, source, skips)
    if data is None:
        return
    try:
        rows = json.load(io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        skips.skip(str(path), BROKEN_JSON_FILE, f"({exc})")
        return
    if not isinstance(rows, list):
        skips.skip(str(path), BROKEN_JSON_FILE, f"(a {type(rows).__name__}, not a list of objects)")
        return
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            yield f"{path}:item {i}", row
        else:
            skips.skip(f"{path}:item {i}", NOT_AN_ITEM_OBJECT)


def iter_rows(path: Path, source: SeedSource, skips: SkipLog) -> Iterator[tuple[str, dict]]:
    """(location, row) from a JSONL(.gz), JSON (list of objects) or Parquet file; bad rows counted."""
    name = path.name.removesuffix(".gz").lower()
    if name.endswith(".parquet"):
        yield from iter_parquet(path, source, skips)
    elif name.endswith(".json"):
        yield from iter_json_array(path, source, skips)
    else:
        yield from iter_jsonl(path, source, skips)


def dataset_rows(source: SeedSource) -> int | None:
    """Rows of the source's dataset when it is a save_to_disk folder (slices of it can be read apart), else None."""
    import datasets

    folder = Path(source.dataset or "").expanduser()
    if not (folder.is_dir() and any((folder / f).exists() for f in ("state.json", "dataset_dict.json"))):
        return None
    ds = datasets.load_from_disk(str(folder))
    return len(ds[source.split] if isinstance(ds, datasets.DatasetDict) else ds)


def iter_dataset_rows(source: SeedSource, skips: SkipLog | None = None,
                      rows: tuple[int, int] | None = None) -> Iterator[tuple[str, dict]]:
    """Rows of a `datasets` dataset (a save_to_disk folder, memory-mapped; or a load_dataset name, streamed), or
    rows ``[start, end)`` of a save_to_disk one; rows over ``max_document_bytes`` are skipped."""
    import datasets

    name = source.dataset or ""
    try:
        folder = Path(name).expanduser()
        if folder.is_dir() and any((folder / f).exists() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[source.split]
        else:
            ds = datasets.load_dataset(name, source.dataset_config, split=source.split, streaming=True)
    except Exception as exc:  # datasets raises many types (missing split, no network, bad files)
        raise SeedSourceError(
            f"seed source {source.label()}: cannot load dataset {name!r} split {source.split!r} "
            f"({type(exc).__name__}: {exc}); fix: give a save_to_disk folder, local data files in "
            "`paths`, or a dataset available offline") from None
    start = 0
    if rows is not None:
        start, end = rows
        ds = ds.select(range(start, end))
    for i, row in enumerate(ds, start=start):
        if skips is not None and _too_large(row, source.max_document_bytes):
            skips.skip(f"{name}:row {i}", TOO_LARGE, f"(row over {source.max_document_bytes} bytes)")
            continue
        yield f"{name}:row {i}", row


def iter_module_texts(source: SeedSource) -> Iterator[tuple[str, str, str]]:
    """(location, title, text) from a Python attribute holding a str or a dict of title -> text."""
    spec = source.module or ""
    module_name, _, attr = spec.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
        for part in (attr.split(".") if attr else []):
            value = getattr(value, part)
    except (ImportError, AttributeError) as exc:
        raise SeedSourceError(f"seed source {source.label()}: cannot import {spec!r} ({exc}); "
                              "fix: give 'package.module:attribute' of an installed package") from None
    if isinstance(value, str):
        yield spec, attr or module_name, value
    elif isinstance(value, dict):
        for key in sorted(value):
            if isinstance(value[key], str):
                yield f"{spec}[{key!r}]", str(key), value[key]
    else:
        raise SeedSourceError(f"seed source {source.label()}: {spec} is a {type(value).__name__}, "
                              "not a str or a dict of str; fix: point at text")
