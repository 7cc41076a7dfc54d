"""What the seed readers skip: a fixed set of reasons, counted per reason with a few examples each.

Bad input never stops a run: an undecodable line, an empty file, a broken JSON line, a huge record or a
row without the configured field is skipped and counted with its file and line. The reasons are a fixed
list (the detail, such as a byte offset or a size, goes into the example, never into the reason), so the
manifest's reason table stays small however broken a corpus is.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Reasons for skipping bad input: a source with any of these gets one warning on the console.
UNREADABLE = "unreadable file"
EMPTY_FILE = "empty file"
BINARY = "binary file (NUL bytes)"
UNDECODABLE = "undecodable bytes"
LONG_LINE = "line longer than max_line_chars"
TOO_LARGE = "document larger than max_document_bytes"
BROKEN_JSON_LINE = "broken JSON line"
NOT_AN_OBJECT = "JSON line is not an object"
BROKEN_JSON_FILE = "broken JSON file"
NOT_AN_ITEM_OBJECT = "JSON item is not an object"
MISSING_FIELD = "missing or empty field(s)"
UNREADABLE_PARQUET = "unreadable Parquet"
NO_MAIN_TEXT = "no main text found in the page"
NO_USABLE_TEXT = "no usable text"
EMPTY_TEXT = "empty text"
FAQ_NO_ANSWER = "FAQ entry without an answer"
FAQ_NO_QUESTION = "FAQ entry without a question"
NO_FAQ_PAIRS = "no 'Q:'/'A:' pairs found"
BAD_INPUT = (UNREADABLE, EMPTY_FILE, BINARY, UNDECODABLE, LONG_LINE, TOO_LARGE, BROKEN_JSON_LINE, NOT_AN_OBJECT,
             BROKEN_JSON_FILE, NOT_AN_ITEM_OBJECT, MISSING_FIELD, UNREADABLE_PARQUET, NO_MAIN_TEXT, NO_USABLE_TEXT,
             EMPTY_TEXT, FAQ_NO_ANSWER, FAQ_NO_QUESTION, NO_FAQ_PAIRS)
"""Reasons that say the input is broken (as opposed to left out on purpose)."""

# Reasons for leaving input out on purpose (configured filters, links already followed, chunk limits).
VENDORED = "vendored or build folder"
GENERATED = "generated file"
LINK_SEEN = "link to a file or folder already read"
LINK_NOT_FOLLOWED = "symlink not followed (follow_symlinks is false)"
SHORT_CHUNK = "chunk shorter than min_chunk_tokens"
LONG_QUESTION = "question alone exceeds chunk_tokens"
BY_CHOICE = (VENDORED, GENERATED, LINK_SEEN, LINK_NOT_FOLLOWED, SHORT_CHUNK, LONG_QUESTION)
"""Reasons that say the input was left out by the source's settings."""

REASONS = BAD_INPUT + BY_CHOICE
"""Every reason a seed input can be skipped for; ``SkipLog.skip`` accepts no other."""


class SeedSourceError(ValueError):
    """A seed source is misconfigured or gave nothing usable; the message names it and the fix."""


@dataclass
class SkipLog:
    """Counts what was skipped, by reason, with the first few locations of each reason."""

    counts: Counter = field(default_factory=Counter)
    shown: list[tuple[str, str]] = field(default_factory=list)
    """(reason, 'location: reason detail') in the order they happened, at most ``per_reason`` per reason."""
    per_reason: int = 5

    def skip(self, location: str, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; add it to stages/seeds/skips.py")
        self.counts[reason] += 1
        self._show(reason, f"{location}: {reason} {detail}".rstrip())
        log.debug("skipped %s: %s %s", location, reason, detail)

    def _show(self, reason: str, example: str) -> None:
        if sum(r == reason for r, _ in self.shown) < self.per_reason:
            self.shown.append((reason, example))

    @property
    def examples(self) -> list[str]:
        return [example for _, example in self.shown]

    def total(self) -> int:
        return sum(self.counts.values())

    def bad_input(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason in BAD_INPUT)

    def merge(self, other: SkipLog) -> None:
        """Add another log's counts and, within the per-reason cap, its examples (in its order)."""
        self.counts.update(other.counts)
        for reason, example in other.shown:
            self._show(reason, example)

    def examples_by_reason(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for reason, example in self.shown:
            out.setdefault(reason, []).append(example)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "shown": [list(x) for x in self.shown]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipLog:
        return cls(counts=Counter(data["counts"]), shown=[(r, e) for r, e in data["shown"]])


def summary_line(skips: SkipLog, reasons: tuple[str, ...] = BAD_INPUT) -> str:
    """'3 undecodable bytes, 1 broken JSON line' for the given reasons, most frequent first."""
    parts = sorted(((n, r) for r, n in skips.counts.items() if r in reasons), key=lambda x: (-x[0], x[1]))
    return ", ".join(f"{n} {r}" for n, r in parts)
