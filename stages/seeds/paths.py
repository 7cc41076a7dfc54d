"""Seed path expansion that reads each real file once, whatever links and patterns lead to it.

``glob('**', recursive=True)`` follows a link to a parent folder over and over (a crawl folder holding
such a link matched every page dozens of times). Here a ``**`` pattern is expanded by walking the tree
with ``os.scandir``: a folder is entered once (by device and inode), so a link loop or a second link to
the same folder is skipped and counted; files are then kept once per device and inode, so a link (or a
hard link) to a file already matched is skipped and counted too. Patterns without ``**`` cannot loop and
use ``glob``. With ``follow_symlinks`` false, links met below a pattern's literal folder are not read.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from fnmatch import fnmatchcase
from pathlib import Path

from stages.seeds.skips import LINK_NOT_FOLLOWED, LINK_SEEN, SeedSourceError, SkipLog


def _placeholders() -> dict[str, str]:
    paths = sysconfig.get_paths()
    return {"stdlib": paths["stdlib"], "purelib": paths["purelib"]}


def _expand_placeholders(pattern: str) -> str:
    try:
        return str(Path(pattern.format(**_placeholders())).expanduser())
    except (KeyError, IndexError, ValueError) as exc:
        raise SeedSourceError(f"seed path {pattern!r}: bad placeholder ({exc}); allowed: {{stdlib}}, {{purelib}}") from None


def _literal_root(parts: list[str]) -> int:
    """Number of leading path parts without glob characters."""
    for i, part in enumerate(parts):
        if glob.has_magic(part):
            return i
    return len(parts)


def _matches(names: list[str], pattern: list[str]) -> bool:
    """Whether relative path parts match pattern parts, ``**`` standing for any number of folders.

    As in ``glob``, a wildcard does not match a name starting with '.' unless the pattern part does.
    """
    if not pattern:
        return not names
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        if _matches(names, rest):
            return True
        return bool(names) and not names[0].startswith(".") and _matches(names[1:], pattern)
    if not names or (names[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatchcase(names[0], head) and _matches(names[1:], rest)


def _walk(root: str, pattern: list[str], follow: bool, skips: SkipLog) -> list[str]:
    """Files below ``root`` whose relative path matches ``pattern``; each folder entered once."""
    found: list[str] = []
    try:
        st = os.stat(root)
    except OSError:
        return found
    entered = {(st.st_dev, st.st_ino)}
    stack = [(root, [])]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            names = [*rel, entry.name]
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                continue
            if is_dir:
                if entry.name.startswith(".") or "**" not in pattern:
                    continue  # '**' does not enter hidden folders, as in glob
                if entry.is_symlink() and not follow:
                    skips.skip(entry.path, LINK_NOT_FOLLOWED)
                    continue
                st = entry.stat(follow_symlinks=True)
                if (st.st_dev, st.st_ino) in entered:
                    skips.skip(entry.path, LINK_SEEN, f"(-> {os.path.realpath(entry.path)})")
                    continue
                entered.add((st.st_dev, st.st_ino))
                stack.append((entry.path, names))
            elif _matches(names, pattern):
                found.append(entry.path)
    return found


def _under_link(path: str, root: str) -> bool:
    """Whether a part of ``path`` below ``root`` is a symbolic link."""
    current = Path(root)
    for part in Path(path).relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            return True
    return False


def expand_paths(patterns: list[str], skips: SkipLog, follow_symlinks: bool = True) -> list[Path]:
    """Files matched by glob patterns with {stdlib}/{purelib} placeholders, sorted, each real file once."""
    matched: set[str] = set()
    for pattern in patterns:
        expanded = _expand_placeholders(pattern)
        parts = list(Path(expanded).parts)
        n = _literal_root(parts)
        root = str(Path(*parts[:n])) if n else "."
        if "**" in parts[n:]:
            hits = _walk(root, parts[n:], follow_symlinks, skips)
        else:
            hits = glob.glob(expanded)
            if not follow_symlinks and n < len(parts):
                for hit in [h for h in hits if _under_link(h, root)]:
                    skips.skip(hit, LINK_NOT_FOLLOWED)
                    hits.remove(hit)
        matched.update(h for h in hits if os.path.isfile(h))
    return _once_per_file(sorted(matched), skips)


def _once_per_file(paths: list[str], skips: SkipLog) -> list[Path]:
    """The first path of each real file (its own path when matched, else the first link to it)."""
    by_file: dict[tuple[int, int], list[str]] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        by_file.setdefault((st.st_dev, st.st_ino), []).append(path)
    keep: set[str] = set()
    for group in by_file.values():
        own = [p for p in group if not os.path.islink(p)]
        first = (own or group)[0]
        keep.add(first)
        for other in group:
            if other != first:
                skips.skip(other, LINK_SEEN, f"(same file as {first})")
    return [Path(p) for p in paths if p in keep]
