"""Token-budget chunking at natural bounds: sections and paragraphs for prose, top-level blocks for code.

A chunk ends at a section or paragraph bound (prose) or a top-level definition (code) whenever
one fits; only a single paragraph/block longer than the budget is cut further (sentences, then
lines, then words). Token counts come from the tokenizer of the model that will read the seeds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

TokenCounter = Callable[[list[str]], list[int]]
"""Tokens in each of a batch of texts."""

MD_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(\S.*?)\s*#*\s*$")
RST_RULE = re.compile(r"^\s*([=\-~*^#+\"'`:.])\1{2,}\s*$")
SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+(?=\S)")


@lru_cache(maxsize=4)
def token_counter(tokenizer: str) -> TokenCounter:
    """A batched token counter for an embedded model name or a tokenizer folder (loaded once per process)."""
    from transformers import AutoTokenizer

    from pipeline.models.catalog import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(tokenizer)))

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    return count


@dataclass
class Unit:
    """A piece that is never split unless it alone exceeds the budget."""

    text: str
    section_start: bool = False
    title: str | None = None


@dataclass
class Chunk:
    text: str
    title: str | None
    n_tokens: int


def split_sections(text: str) -> list[tuple[str | None, str]]:
    """(heading, body) pairs; headings are markdown '#' lines or reST-underlined lines."""
    lines = text.splitlines()
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    i = 0
    while i < len(lines):
        line = lines[i]
        md = MD_HEADING.match(line)
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if md:
            sections.append((md.group(2), []))
        elif line.strip() and not RST_RULE.match(line) and RST_RULE.match(nxt) and \
                len(nxt.strip()) >= min(len(line.strip()), 3) and not line.startswith((" ", "\t")):
            sections.append((line.strip(), []))
            i += 1  # the underline
        elif RST_RULE.match(line) and (not sections[-1][1] or not any(s.strip() for s in sections[-1][1])):
            pass  # an overline, or a rule right after a heading
        else:
            sections[-1][1].append(line)
        i += 1
    return [(h, "\n".join(body).strip()) for h, body in sections if h or "\n".join(body).strip()]


def prose_units(text: str) -> list[Unit]:
    units = []
    for heading, body in split_sections(text):
        paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", body) if p.strip()]
        if heading:
            paragraphs = [heading] + paragraphs if not paragraphs else [f"{heading}\n\n{paragraphs[0]}"] + paragraphs[1:]
        for j, p in enumerate(paragraphs):
            units.append(Unit(p, section_start=j == 0, title=heading))
    return units


def code_units(text: str) -> list[Unit]:
    """Top-level blocks: a new block starts at an unindented line after a blank line."""
    units: list[Unit] = []
    current: list[str] = []
    prev_blank = True
    for line in text.splitlines():
        top = bool(line) and not line[0].isspace() and not line.startswith((")", "]", "}"))
        if top and prev_blank and any(x.strip() for x in current):
            units.append(Unit("\n".join(current).strip("\n"), section_start=True))
            current = []
        current.append(line)
        prev_blank = not line.strip()
    if any(x.strip() for x in current):
        units.append(Unit("\n".join(current).strip("\n"), section_start=True))
    return units


def _split_oversized(unit: Unit, budget: int, count: TokenCounter, code: bool) -> list[Unit]:
    """Cut one unit that exceeds the budget: blank lines and lines (code) or sentences (prose), then words."""
    if code:
        parts = [p for p in re.split(r"\n\s*\n", unit.text) if p.strip()]
        if len(parts) <= 1:
            parts = unit.text.splitlines()
        sep = "\n"
    else:
        parts = SENTENCE_END.split(unit.text)
        sep = " "
    if len(parts) <= 1:
        words = unit.text.split(" ")
        if len(words) <= 1:  # one giant token run: cut by characters
            step = max(1, len(unit.text) // max(2, count([unit.text])[0] // budget + 1))
            parts = [unit.text[i:i + step] for i in range(0, len(unit.text), step)]
        else:
            half = len(words) // 2
            parts = [" ".join(words[:half]), " ".join(words[half:])]
    pieces = [Unit(p, title=unit.title) for p in parts if p.strip()]
    out = pack(pieces, budget, count, code=code, joiner=sep)
    return [Unit(c.text, section_start=(k == 0 and unit.section_start), title=unit.title) for k, c in enumerate(out)]


def pack(units: list[Unit], budget: int, count: TokenCounter, code: bool = False, joiner: str = "\n\n") -> list[Chunk]:
    """Greedy packing of units into chunks of at most ``budget`` tokens.

    A section start closes the current chunk once it holds half the budget, so chunks tend to
    follow sections without producing many tiny chunks.
    """
    sizes = count([u.text for u in units])
    expanded: list[tuple[Unit, int]] = []
    for unit, size in zip(units, sizes, strict=True):
        if size > budget:
            for sub in _split_oversized(unit, budget, count, code):
                expanded.append((sub, count([sub.text])[0]))
        else:
            expanded.append((unit, size))
    chunks: list[Chunk] = []
    cur: list[Unit] = []
    cur_tokens = 0
    sep_tokens = 1 if joiner.strip() == "" else 2

    def flush() -> None:
        if cur:
            chunks.append(Chunk(joiner.join(u.text for u in cur), cur[0].title, cur_tokens))

    for unit, size in expanded:
        estimate = cur_tokens + sep_tokens + size
        closes = bool(cur) and (estimate > budget or (unit.section_start and cur_tokens >= budget // 2))
        if cur and not closes and estimate > budget - 16:
            # Near the budget the sum of parts can undercount (tokens merge across joins): measure.
            closes = count([joiner.join([u.text for u in cur] + [unit.text])])[0] > budget
        if closes:
            flush()
            cur, cur_tokens = [], 0
        cur_tokens += size + (sep_tokens if cur else 0)
        cur.append(unit)
    flush()
    return chunks


def chunk_prose(text: str, budget: int, count: TokenCounter) -> list[Chunk]:
    return pack(prose_units(text), budget, count)


def chunk_code(text: str, budget: int, count: TokenCounter) -> list[Chunk]:
    return pack(code_units(text), budget, count, code=True, joiner="\n\n")


def fit_qa(question: str, answer: str, budget: int, count: TokenCounter) -> tuple[str, str]:
    """Shorten an answer that does not fit the budget, at paragraph then sentence bounds."""
    text = qa_text(question, answer)
    if count([text])[0] <= budget:
        return text, answer
    pieces = [p for p in re.split(r"\n\s*\n", answer) if p.strip()]
    if len(pieces) <= 1:
        pieces = SENTENCE_END.split(answer)
    kept: list[str] = []
    for piece in pieces:
        trial = "\n\n".join(kept + [piece]) if len(pieces) > 1 else " ".join(kept + [piece])
        if count([qa_text(question, trial)])[0] > budget:
            break
        kept.append(piece)
    short = ("\n\n" if len(pieces) > 1 else " ").join(kept)
    return qa_text(question, short), short


def qa_text(question: str, answer: str) -> str:
    return f"Question: {question}\n\nAnswer: {answer}".strip()
