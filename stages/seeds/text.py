"""Reading one document file as text, whatever its encoding: BOM first, then the charset the document declares
(HTML ``<meta>``, XML prolog), then UTF-8, then detection with ``charset-normalizer`` (a maintained detector).

A UTF-8 file with a few corrupt bytes is kept line by line (the bad lines are skipped and counted) rather than
re-read in a guessed single-byte encoding, which would garble all of it; a file is skipped as undecodable only
when no encoding reads it. Every document records the encoding it was read with.
"""

from __future__ import annotations

import codecs
import gzip
import re
from dataclasses import dataclass
from pathlib import Path

from stages.seeds.config import SeedSource
from stages.seeds.skips import (
    BINARY,
    EMPTY_FILE,
    LONG_LINE,
    NO_USABLE_TEXT,
    TOO_LARGE,
    UNDECODABLE,
    UNREADABLE,
    SkipLog,
)

BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
"""Byte-order marks, longest first (a UTF-32 LE mark starts with the UTF-16 LE one)."""
DECLARED = (re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE),
            re.compile(rb"""<\?xml[^>]+encoding\s*=\s*["']([A-Za-z0-9_.:-]+)["']""", re.IGNORECASE))
"""Where HTML (``<meta charset>``, ``<meta http-equiv content="...; charset=...">``) and XML declare a charset."""
MOSTLY_UTF8 = 0.01
"""A file whose UTF-8 decoding fails on at most this share of its lines is read as UTF-8 without those lines."""


@dataclass
class Decoded:
    text: str
    encoding: str
    """Python codec name the text was decoded with."""


def read_file_bytes(path: Path, source: SeedSource, skips: SkipLog) -> bytes | None:
    """The file's bytes (gunzipped if .gz), or None after counting why it is unusable. A document larger than
    ``max_document_bytes`` (its size on disk, then after gunzip) is skipped."""
    try:
        size = path.stat().st_size
        if size > source.max_document_bytes:
            skips.skip(str(path), TOO_LARGE, f"({size} > {source.max_document_bytes} bytes)")
            return None
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
            if len(data) > source.max_document_bytes:
                skips.skip(str(path), TOO_LARGE, f"({len(data)} > {source.max_document_bytes} bytes, gunzipped)")
                return None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        skips.skip(str(path), UNREADABLE, f"({type(exc).__name__}: {exc})")
        return None
    if not data.strip():
        skips.skip(str(path), EMPTY_FILE)
        return None
    return data


def _declared(data: bytes) -> str | None:
    head = data[:4096]
    for pattern in DECLARED:
        m = pattern.search(head)
        if m:
            try:
                return codecs.lookup(m.group(1).decode("ascii")).name
            except (LookupError, UnicodeDecodeError):
                return None
    return None


def _utf8_lines(data: bytes, location: str, skips: SkipLog) -> str | None:
    """UTF-8 without the lines that do not decode, when they are few (``MOSTLY_UTF8``); else None."""
    lines = data.split(b"\n")
    bad = []
    out = []
    for number, raw in enumerate(lines, start=1):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            bad.append((number, exc))
            out.append("")  # keeps the line numbers of what follows
    if len(bad) > max(1, MOSTLY_UTF8 * len(lines)):
        return None
    for number, exc in bad:
        skips.skip(f"{location}:{number}", UNDECODABLE, f"({exc.reason} at byte {exc.start})")
    return "\n".join(out)


def decode(data: bytes, location: str, skips: SkipLog) -> Decoded | None:
    """The document's text and the encoding read with (see the module docstring); None after counting why."""
    for bom, name in BOMS:
        if data.startswith(bom):
            try:
                return Decoded(data.decode(name), name)
            except UnicodeDecodeError as exc:
                skips.skip(location, UNDECODABLE, f"({name} byte-order mark, {exc.reason} at byte {exc.start})")
                return None
    if b"\x00" in data[:8192]:
        skips.skip(location, BINARY)
        return None
    declared = _declared(data)
    if declared is not None:
        try:
            return Decoded(data.decode(declared), declared)
        except UnicodeDecodeError:
            pass  # a wrong declaration is common: go on as if there were none
    try:
        return Decoded(data.decode("utf-8"), "utf-8")
    except UnicodeDecodeError:
        pass
    mostly = _utf8_lines(data, location, skips)
    if mostly is not None:
        return Decoded(mostly, "utf-8")
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        skips.skip(location, UNDECODABLE, "(no encoding reads it)")
        return None
    return Decoded(str(best), codecs.lookup(best.encoding).name)


def numbered_lines(text: str, location: str, source: SeedSource, skips: SkipLog) -> list[tuple[int, str]]:
    """(line number, line) of every line not longer than ``max_line_chars`` (the long ones counted)."""
    kept = []
    for number, line in enumerate(text.split("\n"), start=1):
        if len(line) > source.max_line_chars:
            skips.skip(f"{location}:{number}", LONG_LINE, f"({len(line)} > {source.max_line_chars} chars)")
        else:
            kept.append((number, line.rstrip("\r")))
    return kept


def usable_lines(text: str, location: str, source: SeedSource, skips: SkipLog, limit_lines: bool = True) -> str | None:
    """The text without lines longer than ``max_line_chars`` (counted; HTML pages pass ``limit_lines=False``), or
    None when nothing usable is left."""
    if limit_lines:
        text = "\n".join(line for _, line in numbered_lines(text, location, source, skips))
    if not text.strip():
        skips.skip(location, NO_USABLE_TEXT)
        return None
    return text


def read_document(path: Path, source: SeedSource, skips: SkipLog, limit_lines: bool = True) -> Decoded | None:
    """One document file as text (decoded, long lines dropped), or None after counting why it is unusable."""
    data = read_file_bytes(path, source, skips)
    if data is None:
        return None
    decoded = decode(data, str(path), skips)
    if decoded is None:
        return None
    text = usable_lines(decoded.text, str(path), source, skips, limit_lines)
    return Decoded(text, decoded.encoding) if text is not None else None
