"""Reading seed files: path expansion, bytes and lines that survive bad input, rows of JSONL/JSON/Parquet/datasets.

Bad input never stops a run: an undecodable line, an empty file, a broken JSON line, a huge line or a row
without the configured field is skipped and counted with its file and line (``SkipLog``); a file that cannot
be read at all is skipped the same way.
"""

from __future__ import annotations

import gzip
import importlib
import json
import logging
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any

from stages.seeds.config import SeedSource

log = logging.getLogger(__name__)


@dataclass
class Document:
    """One unit of source text before chunking."""

    text: str
    source: str
    """Where it came from: file path (plus line or row) or dataset + row."""
    title: str | None = None
    language: str | None = None
    question: str | None = None
    answer: str | None = None


@dataclass
class SkipLog:
    """Counts what was skipped, by reason, with the first few locations for the manifest."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 50

    def skip(self, location: str, reason: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{location}: {reason}")
        log.debug("skipped %s: %s", location, reason)

    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipLog) -> None:
        self.counts.update(other.counts)
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[:max(0, room)])


class SeedSourceError(ValueError):
    """A seed source is misconfigured or gave nothing usable; the message names it and the fix."""


# -- finding and reading files ------------------------------------------------------------------
def expand_paths(patterns: list[str]) -> list[Path]:
    """Files matched by glob patterns with {stdlib}/{purelib} placeholders, sorted, no duplicates."""
    paths = sysconfig.get_paths()
    places = {"stdlib": paths["stdlib"], "purelib": paths["purelib"]}
    found: dict[str, Path] = {}
    for pattern in patterns:
        try:
            expanded = str(Path(pattern.format(**places)).expanduser())
        except (KeyError, IndexError, ValueError) as exc:
            raise SeedSourceError(f"seed path {pattern!r}: bad placeholder ({exc}); allowed: {{stdlib}}, {{purelib}}") from None
        for hit in glob(expanded, recursive=True):
            p = Path(hit)
            if p.is_file():
                found.setdefault(str(p), p)
    return [found[k] for k in sorted(found)]


def read_bytes(path: Path, source: SeedSource, skips: SkipLog) -> bytes | None:
    """Whole file (gunzipped if .gz), or None after counting why it is unusable."""
    try:
        size = path.stat().st_size
        if size > source.max_file_bytes:
            skips.skip(str(path), f"file larger than max_file_bytes ({size} > {source.max_file_bytes})")
            return None
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        skips.skip(str(path), f"unreadable file ({type(exc).__name__}: {exc})")
        return None
    if not data.strip():
        skips.skip(str(path), "empty file")
        return None
    return data


def decode_lines(data: bytes, location: str, source: SeedSource, skips: SkipLog) -> list[tuple[int, str]]:
    """(line number, text) of every usable line; undecodable and huge lines are skipped and counted.

    Decoding per line (not per file) keeps the rest of a file whose few bytes are corrupt.
    """
    out = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            skips.skip(f"{location}:{number}", f"undecodable bytes ({exc.reason} at byte {exc.start})")
            continue
        if len(line) > source.max_line_chars:
            skips.skip(f"{location}:{number}", f"line longer than max_line_chars ({len(line)} > {source.max_line_chars})")
            continue
        out.append((number, line.rstrip("\r")))
    return out


def read_text(path: Path, source: SeedSource, skips: SkipLog) -> str | None:
    data = read_bytes(path, source, skips)
    if data is None:
        return None
    if b"\x00" in data[:8192]:
        skips.skip(str(path), "binary file (NUL bytes)")
        return None
    text = "\n".join(line for _, line in decode_lines(data, str(path), source, skips))
    if not text.strip():
        skips.skip(str(path), "no usable text")
        return None
    return text


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


# -- rows from JSONL / JSON / Parquet / datasets -------------------------------------------------
def iter_rows(path: Path, source: SeedSource, skips: SkipLog) -> Iterator[tuple[str, dict]]:
    """(location, row) from a JSONL, JSON (list of objects) or Parquet file; bad rows counted."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types on a damaged file
            skips.skip(str(path), f"unreadable Parquet ({type(exc).__name__}: {exc})")
            return
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}:row {i}", row
        return
    data = read_bytes(path, source, skips)
    if data is None:
        return
    if name.endswith(".json") and data.lstrip()[:1] == b"[":
        try:
            rows = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            skips.skip(str(path), f"broken JSON ({exc})")
            return
        for i, row in enumerate(rows):
            if isinstance(row, dict):
                yield f"{path}:item {i}", row
            else:
                skips.skip(f"{path}:item {i}", "not a JSON object")
        return
    for number, line in decode_lines(data, str(path), source, skips):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            skips.skip(f"{path}:{number}", f"broken JSON line ({exc.msg})")
            continue
        if not isinstance(row, dict):
            skips.skip(f"{path}:{number}", "JSON line is not an object")
            continue
        yield f"{path}:{number}", row


def iter_dataset_rows(source: SeedSource) -> Iterator[tuple[str, dict]]:
    """Rows of a `datasets` dataset (a save_to_disk folder or a load_dataset name)."""
    import datasets

    name = source.dataset or ""
    try:
        folder = Path(name).expanduser()
        if folder.is_dir() and any((folder / f).exists() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[source.split]
        else:
            ds = datasets.load_dataset(name, source.dataset_config, split=source.split)
    except Exception as exc:  # datasets raises many types (missing split, no network, bad files)
        raise SeedSourceError(
            f"seed source {source.label()}: cannot load dataset {name!r} split {source.split!r} "
            f"({type(exc).__name__}: {exc}); fix: give a save_to_disk folder, local data files in "
            "`paths`, or a dataset available offline") from None
    for i, row in enumerate(ds):
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
