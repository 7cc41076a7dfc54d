"""Files that survive a kill: atomic writes of text, JSON, JSON lines and whole folders; content hashes.

Everything the pipeline keeps on disk (manifests, round state, checkpoints, model folders, the report) is
written aside and renamed into place, so a kill at any moment leaves the old version or the new one, never
half of one. This module imports nothing of the project: every layer may use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings (for hashing)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def state_key(*parts: Any) -> str:
    """Key of a stage's resumable work-folder state: the same config, inputs and seed give the same key, so a
    rerun keeps the state; anything else discards it."""
    return fingerprint(list(parts))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync it, rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """``obj`` as JSON, written atomically (values JSON does not know are written as their ``str``)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """One JSON value per line, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The values of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_folder_atomically(dest: str | os.PathLike, build: Callable[[Path], Any], record: dict | None = None) -> Path:
    """Build a folder aside with ``build(tmpdir)`` and rename it into place (a kill leaves the old folder or the
    new one, never half of one). ``record`` is written as ``posttrain.json`` in it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        build(tmp)
        if record is not None:
            (tmp / "posttrain.json").write_text(json.dumps(record, indent=2))
        replace_folder(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def copy_folder_atomically(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """A copy of the folder ``src`` at ``dest``, swapped into place atomically."""
    return write_folder_atomically(dest, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


def replace_folder(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Put the finished folder ``tmp`` at ``dest``, replacing what is there: the old folder is renamed aside
    first and removed after, so a reader sees the old folder or the new one."""
    tmp, dest = Path(tmp), Path(dest)
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def remove_leftovers(folder: str | os.PathLike, name: str) -> None:
    """Delete what a killed writer of ``folder/name`` left beside it (``.name.*`` temporaries)."""
    for p in Path(folder).glob(f".{name}.*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
