"""Seed corpora as users have them: a folder broken the ways real crawls, QA dumps and book shelves break.

The corpus is built here from real text that installs with Python (CPython's reference topics and IDLE's HTML
help, the HTML entity table): a symlink loop, a page that declares latin-1, books in cp1252 and UTF-16 (with BOM),
a 2+ MB JSONL of question/answer pairs with broken lines, a file with NUL bytes, a one-line multi-MB page. Each
test asserts what was kept, what was skipped and under which reason; the Ray Data reader must give the same seeds
as the in-driver reader.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import sysconfig
from html.entities import codepoint2name
from pathlib import Path

import pytest

from stages.seeds import SeedsConfig, SeedSource, SkipLog, build_seeds, load_documents
from stages.seeds.skips import BINARY, BROKEN_JSON_LINE, LINK_SEEN, NOT_AN_OBJECT, REASONS, UNDECODABLE

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TYPOGRAPHIC = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                             "\u2014": "-", "\u2026": "..."})
LATIN1_LETTERS = [f"{chr(cp)} ({name})" for cp, name in sorted(codepoint2name.items()) if 0xC0 <= cp <= 0xFF]


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    topics = _topics()
    web = root / "web"
    web.mkdir()
    shutil.copy(STDLIB / "idlelib" / "help.html", web / "help.html")
    os.symlink("..", web / "loop")  # a link to its parent: a naive `**` walks the tree again and again
    body = topics["assignment"].translate(TYPOGRAPHIC)  # latin-1 has no typographic quotes
    page = (f'<html><head><meta charset="iso-8859-1"><title>Latin letters</title></head><body><h1>Assignment</h1>'
            f"<p>{html.escape(body)}</p><h2>Letters</h2><p>{'; '.join(LATIN1_LETTERS)}</p></body></html>")
    (web / "latin1.html").write_bytes(page.encode("latin-1"))
    paragraphs = "".join(f"<p>{html.escape(topics[k])}</p>" for k in sorted(topics))
    big = f"<html><head><title>All topics</title></head><body>{paragraphs * 5}</body></html>".replace("\n", " ")
    (web / "one-line.html").write_text(big)
    books = root / "books"
    books.mkdir()
    (books / "attribute-access.txt").write_bytes(topics["attribute-access"].encode("cp1252"))
    (books / "calls.txt").write_bytes(topics["calls"].encode("utf-16"))
    (books / "binary.txt").write_bytes(b"\x00\x01\x02" * 1000 + topics["assert"].encode())
    qa = root / "qa"
    qa.mkdir()
    lines = []
    for rep in range(12):
        for key in sorted(topics):
            lines.append(json.dumps({"question": f"({rep}) What does the Python reference say about {key}?",
                                     "answer": topics[key]}).encode())
    lines[10] = lines[10][:40]                # cut off mid-record
    lines[20] = b"[1, 2, 3]"                   # JSON, not an object
    lines[30] = lines[30][:-30] + b"\xff\xfe\"}"  # bytes that are not UTF-8
    (qa / "topics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


def _sources(root: Path) -> list[SeedSource]:
    return [SeedSource(kind="web", name="web", paths=[str(root / "web" / "**" / "*.html")], license="PSF-2.0"),
            SeedSource(kind="web_qa", name="qa", paths=[str(root / "qa" / "*.jsonl")], license="PSF-2.0"),
            SeedSource(kind="book", name="books", paths=[str(root / "books" / "*")], license="PSF-2.0")]


def test_each_page_is_read_once_through_a_link_loop_and_a_declared_charset_is_honoured(corpus):
    web = _sources(corpus)[0]
    skips = SkipLog()
    docs = load_documents(web, skips)
    assert sorted(Path(d.source).name for d in docs) == ["help.html", "latin1.html", "one-line.html"]
    assert skips.counts[LINK_SEEN] == 1  # the loop, noticed once, not followed
    latin1 = next(d for d in docs if d.source.endswith("latin1.html"))
    assert latin1.encoding == "iso8859-1" and "é (eacute)" in latin1.text and "ÿ (yuml)" in latin1.text
    one_line = next(d for d in docs if d.source.endswith("one-line.html"))
    assert (corpus / "web" / "one-line.html").stat().st_size > 2_000_000 and "assignment statement" in one_line.text


def test_books_in_any_encoding_are_read_and_binary_files_skipped(corpus):
    books = _sources(corpus)[2]
    skips = SkipLog()
    docs = {Path(d.source).name: d for d in load_documents(books, skips)}
    assert sorted(docs) == ["attribute-access.txt", "calls.txt"]
    topics = _topics()
    assert docs["calls.txt"].encoding == "utf-16" and docs["calls.txt"].text == topics["calls"]
    # Detection reads it as a Windows code page (cp1250 and cp1252 agree on every byte this text uses): the text,
    # typographic quotes included, comes back exactly.
    assert docs["attribute-access.txt"].text == topics["attribute-access"]
    assert docs["attribute-access.txt"].encoding in ("cp1252", "cp1250")
    assert dict(skips.counts) == {BINARY: 1}


def test_a_large_jsonl_keeps_its_good_lines(corpus):
    qa = _sources(corpus)[1]
    skips = SkipLog()
    docs = load_documents(qa, skips)
    n_lines = 12 * len(_topics())
    assert (corpus / "qa" / "topics.jsonl").stat().st_size > 2_000_000  # the old per-file limit rejected it whole
    assert len(docs) == n_lines - 3
    assert dict(skips.counts) == {BROKEN_JSON_LINE: 1, NOT_AN_OBJECT: 1, UNDECODABLE: 1}
    (example,) = skips.examples_by_reason()[BROKEN_JSON_LINE]
    assert example.startswith(f"{corpus / 'qa' / 'topics.jsonl'}:11: broken JSON line (")


def test_the_stage_reports_bounded_reasons_and_warns_once_per_source(corpus, caplog):
    with caplog.at_level(logging.WARNING, logger="stages.seeds"):
        records, metrics = build_seeds(SeedsConfig(sources=_sources(corpus), near_dup_threshold=None))
    assert metrics["reader"] == "driver"
    assert set(metrics["skipped_by_reason"]) <= set(REASONS)
    assert all(len(v) <= SkipLog().per_reason for v in metrics["skipped_examples"].values())
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and warned[0].startswith("seed source qa: skipped 3 input(s) for bad input")
    assert warned[1].startswith("seed source books: skipped 1 input(s) for bad input: 1 binary file")
    books = metrics["sources"]["books"]
    assert "utf-16" in books["encodings"] and len(books["encodings"]) == 2
    assert sum(books["encodings"].values()) == books["chunks"]
    assert {r["encoding"] for r in records if r["source_kind"] == "book"} == set(books["encodings"])


@pytest.mark.slow
def test_ray_data_reader_gives_the_same_seeds(corpus, ray_session):
    from stages.seeds.ray_reader import read_units

    cfg = SeedsConfig(sources=_sources(corpus))
    units, _ = read_units(cfg)
    assert len(units) == 7  # one task per file: several Ray Data blocks
    driver, driver_metrics = build_seeds(cfg.model_copy(update={"reader": "driver"}))
    ray_records, ray_metrics = build_seeds(cfg.model_copy(update={"reader": "ray_data"}))
    assert ray_metrics["reader"] == "ray_data"
    assert [r["id"] for r in ray_records] == [r["id"] for r in driver]
    assert ray_records == driver
    for key in ("duplicates_exact", "duplicates_near", "skipped_by_reason", "seeds_by_kind"):
        assert ray_metrics[key] == driver_metrics[key], key
