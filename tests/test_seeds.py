"""Seed corpora: the four source kinds, chunking, dedup, stable ids, and bad input.

No engine: only the embedded tokenizer. Bad inputs are made from real files (CPython's standard
library and documentation, the XZ Utils FAQ) copied into tmp_path and damaged there.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from stages.seeds import (
    SeedsConfig,
    SeedSource,
    SeedSourceError,
    SkipLog,
    build_seeds,
    load_documents,
    seed_id,
)
from stages.seeds.chunking import chunk_prose, split_sections, token_counter

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FAQ = Path("/usr/share/doc/xz-utils/faq.txt.gz")
BUDGET = 160


@pytest.fixture(scope="module")
def default_seeds():
    cfg = SeedsConfig()
    for source in cfg.sources:
        source.max_chunks = None
    return build_seeds(cfg, seed=0)


def _faq_pairs() -> list[tuple[str, str]]:
    skips = SkipLog()
    docs = load_documents(SeedSource(kind="web_qa", paths=[str(FAQ)]), skips)
    return [(d.question, d.answer) for d in docs]


def test_default_sources_cover_every_kind_with_budgeted_chunks(default_seeds):
    records, metrics = default_seeds
    kinds = {r["source_kind"] for r in records}
    assert kinds == {"web", "web_qa", "code", "book"}
    assert all(metrics["seeds_by_kind"][k] > 0 for k in kinds)
    budget, floor = SeedsConfig().chunk_tokens, SeedsConfig().min_chunk_tokens
    count = token_counter(SeedsConfig().tokenizer)
    sample = records[::25]
    assert count([r["text"] for r in sample]) == [r["n_tokens"] for r in sample]
    assert all(floor <= r["n_tokens"] <= budget for r in records)
    assert all(r["license"] and r["license"] != "unknown" for r in records)
    assert len({r["id"] for r in records}) == len(records)
    qa = [r for r in records if r["source_kind"] == "web_qa"]
    assert all(r["question"] and r["answer"] and r["question"] in r["text"] for r in qa)
    code = [r for r in records if r["source_kind"] == "code"]
    assert all(r["language"] == "python" for r in code)
    # every seed points back at a real file or module
    assert all(Path(r["source"].split(":")[0].split("#")[0]).exists() or r["source"].startswith("pydoc_data")
               for r in records)


def test_web_page_main_text_has_no_boilerplate(default_seeds):
    records, _ = default_seeds
    web = "\n".join(r["text"] for r in records if r["source_kind"] == "web")
    html = (STDLIB / "idlelib" / "help.html").read_text()
    for boilerplate in ("Previous topic", "Report a Bug", "Show Source", "Quick search", "Last updated"):
        assert boilerplate in html and boilerplate not in web
    assert "Integrated Development and Learning Environment" in web


def test_seed_ids_are_stable_and_content_derived(default_seeds):
    records, _ = default_seeds
    again, _ = build_seeds(SeedsConfig(sources=[s.model_copy(update={"max_chunks": None})
                                                for s in SeedsConfig().sources]), seed=0)
    assert [r["id"] for r in again] == [r["id"] for r in records]
    rec = records[0]
    assert rec["id"] == seed_id(rec["source_kind"], rec["text"])
    assert seed_id("book", "some text") != seed_id("book", "some text!")


def test_max_chunks_is_a_seeded_sample():
    a, _ = build_seeds(SeedsConfig(), seed=1)
    b, _ = build_seeds(SeedsConfig(), seed=1)
    c, _ = build_seeds(SeedsConfig(), seed=2)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [r["id"] for r in a] != [r["id"] for r in c]
    per_kind = {k: sum(r["source_kind"] == k for r in a) for k in ("web", "web_qa", "code", "book")}
    assert per_kind == {k: 6 for k in per_kind}


def test_book_chunks_end_at_section_or_paragraph_bounds():
    from pydoc_data.topics import topics

    text = topics["exceptions"] + "\n\n" + topics["assert"]
    sections = split_sections(text)
    headings = [h for h, _ in sections if h]
    assert headings[0] == "Exceptions" and 'The "assert" statement' in headings
    count = token_counter("smollm2-135m-instruct")
    chunks = chunk_prose(text, BUDGET, count)
    assert len(chunks) > 3
    assert all(c.n_tokens <= BUDGET for c in chunks)
    paragraphs = {" ".join(p.split()) for _, body in sections for p in body.split("\n\n") if p.strip()}
    for chunk in chunks:
        last = " ".join(chunk.text.split("\n\n")[-1].split())
        first = " ".join(chunk.text.split("\n\n")[0].split())
        # a chunk ends where a paragraph ends and starts where a paragraph (or heading) starts,
        # unless that single paragraph was longer than the budget and had to be cut
        assert any(p.endswith(last) for p in paragraphs) or count([last])[0] > BUDGET // 2
        assert first in set(headings) or any(p.startswith(first) for p in paragraphs) or count([first])[0] > BUDGET // 2


def test_code_skips_binary_vendored_and_generated_files(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "_vendor").mkdir()
    shutil.copy(STDLIB / "textwrap.py", repo / "pkg" / "textwrap.py")
    shutil.copy(STDLIB / "heapq.py", repo / "pkg" / "_vendor" / "heapq.py")            # vendored
    shutil.copy(STDLIB / "token.py", repo / "pkg" / "token.py")                         # "Auto-generated by"
    pyc = next((STDLIB / "__pycache__").glob("textwrap.*.pyc"))
    shutil.copy(pyc, repo / "pkg" / "compiled.py")                                      # binary
    (repo / "pkg" / "notes.txt").write_text("not code")                                  # other language
    source = SeedSource(kind="code", paths=[f"{repo}/**/*"], license="PSF-2.0")
    skips = SkipLog()
    docs = load_documents(source, skips)
    assert [Path(d.source).name for d in docs] == ["textwrap.py"]
    assert skips.counts["vendored or build folder"] == 1
    assert skips.counts["generated file"] == 1
    assert skips.counts["binary file (NUL bytes)"] == 1
    assert any("compiled.py" in e for e in skips.examples)


def test_bad_lines_are_skipped_and_counted_with_file_and_line(tmp_path):
    # a real reST document with undecodable bytes on line 3 and a huge line on line 6
    from pydoc_data.topics import topics

    raw_lines = topics["assert"].encode().split(b"\n")
    raw_lines[2] += b" \xff\xfe"                       # line 3: bytes that are not UTF-8
    raw_lines.insert(5, b"x" * 30_000)                  # line 6: a huge line
    doc = tmp_path / "assert.rst"
    doc.write_bytes(b"\n".join(raw_lines))
    empty = tmp_path / "empty.md"
    empty.write_text("  \n\n")
    source = SeedSource(kind="book", paths=[str(tmp_path / "*")], license="PSF-2.0")
    skips = SkipLog()
    docs = load_documents(source, skips)
    assert len(docs) == 1 and "assert" in docs[0].text
    assert any(e.startswith(f"{doc}:3: undecodable bytes") for e in skips.examples)
    assert any(e.startswith(f"{doc}:6: line longer than max_line_chars") for e in skips.examples)
    assert any(e.startswith(f"{empty}: empty file") for e in skips.examples)
    assert skips.total() == 3


def test_web_qa_jsonl_with_broken_lines_and_missing_fields(tmp_path):
    pairs = _faq_pairs()
    assert len(pairs) >= 10
    rows = [json.dumps({"q": {"title": q}, "answers": {"text": [a, "other"]}}) for q, a in pairs[:6]]
    rows.insert(2, rows[0][:-9])                                  # line 3: truncated JSON
    rows.insert(4, json.dumps({"q": {"title": pairs[6][0]}}))     # line 5: no answer
    rows.insert(5, "[1, 2]")                                      # line 6: not an object
    path = tmp_path / "faq.jsonl"
    path.write_text("\n".join(rows) + "\n")
    source = SeedSource(kind="web_qa", paths=[str(path)], question_field="q.title", answer_field="answers.text")
    skips = SkipLog()
    docs = load_documents(source, skips)
    assert [(d.question, d.answer) for d in docs] == pairs[:6]
    assert any(e.startswith(f"{path}:3: broken JSON line") for e in skips.examples)
    assert any(e.startswith(f"{path}:5: missing or empty field(s) ['answers.text']") for e in skips.examples)
    assert any(e.startswith(f"{path}:6: JSON line is not an object") for e in skips.examples)
    assert skips.total() == 3


def test_web_qa_from_parquet_and_a_saved_dataset(tmp_path):
    import datasets

    pairs = _faq_pairs()[:5]
    table = datasets.Dataset.from_list([{"question": q, "answer": a} for q, a in pairs])
    table.to_parquet(str(tmp_path / "faq.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    skips = SkipLog()
    from_parquet = load_documents(SeedSource(kind="web_qa", paths=[str(tmp_path / "*.parquet")]), skips)
    from_dataset = load_documents(SeedSource(kind="web_qa", dataset=str(tmp_path / "saved")), skips)
    assert [(d.question, d.answer) for d in from_parquet] == pairs
    assert [(d.question, d.answer) for d in from_dataset] == pairs
    assert skips.total() == 0


def test_source_with_nothing_usable_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty.html").write_text("")
    (tmp_path / "nav-only.html").write_text("<html><body><nav><a href='/'>Home</a></nav></body></html>")
    cfg = SeedsConfig(sources=[SeedSource(kind="web", name="broken-site", paths=[str(tmp_path / "*.html")])])
    with pytest.raises(SeedSourceError, match=r"seed source broken-site \(web\) gave no usable text.*empty file"):
        build_seeds(cfg)
    missing = SeedsConfig(sources=[SeedSource(kind="book", name="nowhere", paths=[str(tmp_path / "none/*.md")])])
    with pytest.raises(SeedSourceError, match="nowhere.*no files matched"):
        build_seeds(missing)


def test_one_bad_file_does_not_stop_a_source(tmp_path):
    good = tmp_path / "help.html"
    shutil.copy(STDLIB / "idlelib" / "help.html", good)
    bad = tmp_path / "truncated.html.gz"
    bad.write_bytes(gzip.compress(good.read_bytes())[:500])   # a cut-off download
    cfg = SeedsConfig(sources=[SeedSource(kind="web", paths=[str(tmp_path / "*")], license="PSF-2.0")])
    records, metrics = build_seeds(cfg)
    assert records and all(r["source"].startswith(str(good)) for r in records)
    assert any(str(bad) in e for e in metrics["skipped_examples"]["unreadable file"])


def test_exact_and_near_duplicates_are_dropped(tmp_path):
    text = (STDLIB / "textwrap.py").read_text()
    (tmp_path / "a.py").write_text(text)
    (tmp_path / "b.py").write_text(text)                                   # exact copy
    (tmp_path / "c.py").write_text(text.replace("Wrap a single paragraph", "Wrap one paragraph", 1))
    cfg = SeedsConfig(sources=[SeedSource(kind="code", paths=[str(tmp_path / "*.py")], license="PSF-2.0")])
    records, metrics = build_seeds(cfg)
    single, _ = build_seeds(SeedsConfig(sources=[SeedSource(kind="code", paths=[str(tmp_path / "a.py")],
                                                            license="PSF-2.0")]))
    assert len(records) == len(single)
    assert metrics["duplicates_exact"] >= len(single)
    assert metrics["duplicates_near"] >= 1
    assert {r["id"] for r in records} == {r["id"] for r in single}


def test_record_size_limit_counts_utf8_bytes_of_nested_text():
    from stages.seeds.records import _too_large

    assert not _too_large({"q": "x" * 10, "a": {"text": ["y" * 10]}}, 100)
    assert _too_large({"q": "x" * 60, "a": {"text": ["y" * 41]}}, 100)  # nested strings count
    assert _too_large({"a": ["é" * 30]}, 50)        # 30 characters, 60 bytes
    assert not _too_large({"a": "é" * 25, "n": 10 ** 9}, 50)  # 50 bytes; numbers are not text
