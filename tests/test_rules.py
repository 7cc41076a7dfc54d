"""Rule QC and deduplication on real text: markdown responses built from CPython's documentation
topics (``pydoc_data.topics``: prose paragraphs, code examples, topic titles), every defect made
from them by the test (cut off, re-encoded, escaped, sprinkled with other scripts, chat-template
tokens of the real embedded tokenizer, broken tables and lists, looping), and a check that the
good ones pass every rule."""

from __future__ import annotations

import random
import re
import textwrap

import pytest

from critique.dedup import DedupConfig, duplicate_groups, keep_best
from critique.rules import (
    RULES,
    RulesConfig,
    apply_rules,
    check_format,
    check_garbled,
    check_repetition,
    check_response,
    check_truncation,
    repetition_stats,
)

CFG = RulesConfig()


def _paragraphs(text: str) -> list[str]:
    out = []
    for p in re.split(r"\n\s*\n", text):
        if p and not p.startswith((" ", "\t")) and "*" not in p and "|" not in p:
            p = " ".join(p.split())
            if len(p.split()) > 8 and p.endswith("."):
                out.append(p)
    return out


def _code(text: str) -> str | None:
    """The first indented example of a topic that is Python (not a grammar rule), dedented."""
    for block in re.findall(r"\n((?:   \S.*\n)+)", text):
        block = textwrap.dedent(block)
        if "::=" not in block and ">>>" not in block:
            try:
                compile(block, "<topic>", "exec")
            except SyntaxError:
                continue
            return block
    return None


@pytest.fixture(scope="module")
def topics():
    from pydoc_data.topics import topics

    return topics


@pytest.fixture(scope="module")
def good(topics) -> list[str]:
    """Well-formed markdown answers made of real documentation text."""
    out = []
    for name in sorted(topics):
        paras = _paragraphs(topics[name])
        if len(paras) < 2:
            continue
        code = _code(topics[name])
        body = paras[0] + ("\n\nFor example:\n\n```python\n" + code + "```" if code else "") + "\n\n" + paras[1]
        out.append(body)
    titles = [(n, topics[n].splitlines()[0].strip()) for n in sorted(topics)[:6]]
    table = "| Topic | Title |\n|---|---|\n" + "\n".join(f"| {n} | {t} |" for n, t in titles)
    out.append(f"The first documentation topics:\n\n{table}\n\nEach topic is a page of the language reference.")
    sentences = re.split(r"(?<=\.) ", _paragraphs(topics["for"])[0] + " " + _paragraphs(topics["while"])[0])
    out.append("Key points:\n\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(sentences, 1)) + "\n\nThat is all.")
    return out


def test_good_real_text_passes_every_rule(good):
    assert len(good) >= 40
    assert sum("```python" in g for g in good) >= 5 and any("|---|" in g for g in good)
    failures = {i: found for i, g in enumerate(good) if (found := check_response(g, "Explain it.", "stop", CFG))}
    assert failures == {}
    records, counts = apply_rules([{"id": "a", "instruction": "Explain.",
                                    "responses": [{"text": g, "finish_reason": "stop"} for g in good]}], CFG)
    assert all(r["rejected_by"] is None and r["rule_reasons"] == [] for r in records[0]["responses"])
    assert counts == {name: {"flagged": 0, "rejected": 0} for name in RULES}


def test_truncation(good):
    text = next(g for g in good if "```python" in g)
    words = text.split(" ")
    cut = " ".join(words[: len(words) - 5])  # stops inside the last sentence
    assert any("last sentence is cut off" in r for r in check_truncation(cut, "stop", CFG))
    in_code = text[: text.rindex("```")]  # stops inside the code block
    assert check_truncation(in_code, "stop", CFG) == ["ends inside an unclosed code fence"]
    assert check_truncation(text, "length", CFG) == ["finish_reason=length (the generation hit max_tokens)"]
    assert check_truncation("  \n", "stop", CFG)[0].startswith("empty response")
    assert check_truncation(text, "stop", CFG) == []


def test_garbled(good, topics):
    text = next(p for n in sorted(topics) for p in _paragraphs(topics[n]) if re.search(r"[“”’—]", p))
    assert check_garbled(text, "Explain.", CFG) == []
    mojibake = text.encode("utf-8").decode("cp1252", errors="replace")
    assert any(r.startswith("mojibake") for r in check_garbled(mojibake, "Explain.", CFG))
    raw = bytearray(text.encode("utf-8"))
    lead = [i for i, b in enumerate(raw) if b >= 0xC0]  # drop the first byte of every multi-byte character
    damaged = bytes(b for i, b in enumerate(raw) if i not in set(lead)).decode("utf-8", errors="replace")
    assert any("replacement characters" in r for r in check_garbled(damaged, "Explain.", CFG))

    from rich.console import Console

    console = Console(force_terminal=True, color_system="standard", width=200)
    with console.capture() as cap:
        console.print(text, style="bold red")
    escaped = cap.get()  # real terminal escape codes, as left in text scraped from a console
    assert "\x1b[" in escaped
    assert any("control/private" in r and "U+001B" in r for r in check_garbled(escaped, "Explain.", CFG))

    rng = random.Random(0)
    noise = "".join(ch + (chr(rng.randint(0x0430, 0x044F)) if rng.random() < 0.06 else "") for ch in text)
    assert any(r.startswith("wrong-script noise") and "CYRILLIC" in r for r in check_garbled(noise, "Explain.", CFG))
    # The same letters are fine when the instruction itself is in that script.
    assert not any(r.startswith("wrong-script") for r in check_garbled(noise, "Объясни: " + text[:20], CFG))


@pytest.fixture(scope="module")
def chat_template_tail(embedded_models):
    """What a chat model emits after its answer when the end-of-turn token is not stripped: the
    real embedded tokenizer's template rendered for a next turn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_models["smollm2-135m-instruct"])
    rendered = tok.apply_chat_template([{"role": "user", "content": "QQQ"}, {"role": "assistant", "content": "AAA"},
                                        {"role": "user", "content": "BBB"}], tokenize=False)
    tail = rendered[rendered.index("AAA") + 3: rendered.index("BBB")]
    assert "<|im_end|>" in tail and "<|im_start|>" in tail
    return tail


def test_format_errors(good, chat_template_tail):
    text = good[0]
    assert check_format(text, CFG) == []
    leftover = text + chat_template_tail + "What else?"
    assert any(r.startswith("chat-template token") for r in check_format(leftover, CFG)), leftover[-60:]
    # Inside code, template tokens are content (an answer about chat templates), not leftovers.
    assert check_format(text + "\n\n```\n" + chat_template_tail + "\n```", CFG) == []
    role = text + "\n\nUser: And what about the while statement?"
    assert any(r.startswith("role marker at line") for r in check_format(role, CFG))

    table_text = next(g for g in good if "|---|" in g)
    lines = table_text.splitlines()
    row = next(i for i, ln in enumerate(lines) if ln.startswith("| ") and i > 3)
    ragged = "\n".join(lines[:row] + [lines[row].rsplit("|", 2)[0] + "|"] + lines[row + 1:])
    assert any("broken table" in r and "cells" in r for r in check_format(ragged, CFG))
    no_delim = "\n".join(ln for ln in lines if ln != "|---|---|")
    assert any("no |---| row" in r for r in check_format(no_delim, CFG))

    list_text = next(g for g in good if g.startswith("Key points"))
    assert check_format(list_text, CFG) == []
    skipped = list_text.replace("\n3. ", "\n4. ", 1)
    assert any("item 4 follows item 2" in r for r in check_format(skipped, CFG))
    lazy = re.sub(r"(?m)^\d+\. ", "1. ", list_text)  # 1. 1. 1. is valid markdown
    assert check_format(lazy, CFG) == []


def test_repetition(good, topics):
    text = good[3]
    assert check_repetition(text, CFG) == []
    sentence = _paragraphs(topics["if"])[0]
    looping = text + "\n\n" + " ".join([sentence] * 6)  # a model stuck in a loop
    stats = repetition_stats(looping, CFG)
    assert stats["dup_10gram_char_frac"] > 0.10
    assert check_repetition(looping, CFG)
    lines = text + "\n\n" + "\n".join([sentence[:60]] * 8)
    assert any(r.startswith("dup_line_frac") for r in check_repetition(lines, RulesConfig(max_top_ngram_char_frac={},
                                                                                          max_dup_ngram_char_frac={})))
    # Repeated lines inside code blocks are code, not degenerate output.
    code = text + "\n\n```python\n" + "print(x)  # a line of code\n" * 8 + "```"
    assert check_repetition(code, CFG) == []
    # Thresholds are configurable.
    assert check_repetition(looping, RulesConfig(max_dup_line_frac=1, max_top_ngram_char_frac={},
                                                 max_dup_ngram_char_frac={})) == []


def test_apply_rules_counts_flagged_and_first_rejection(good):
    text = good[2]
    truncated_and_looping = text + " " + " ".join([text.split(". ")[0] + "."] * 10) + " and then the"
    records = [{"id": "r1", "instruction": "Explain.", "responses": [
        {"text": text, "finish_reason": "stop"},
        {"text": truncated_and_looping, "finish_reason": "length"},
        {"text": text + "<|im_end|>", "finish_reason": "stop"},
    ]}]
    out, counts = apply_rules(records, CFG)
    first, second, third = out[0]["responses"]
    assert (first["rejected_by"], second["rejected_by"], third["rejected_by"]) == (None, "truncation", "format")
    assert {r.split(":")[0] for r in second["rule_reasons"]} == {"truncation", "repetition"}
    assert counts["truncation"] == {"flagged": 1, "rejected": 1}
    assert counts["repetition"] == {"flagged": 1, "rejected": 0}  # flagged, but truncation rejected it first
    assert counts["format"] == {"flagged": 1, "rejected": 1}
    only_format, _ = apply_rules(records, RulesConfig(enabled=["format"]))
    assert [r["rejected_by"] for r in only_format[0]["responses"]] == [None, None, "format"]
    with pytest.raises(ValueError, match="unknown rule"):
        apply_rules(records, RulesConfig(enabled=["spelling"]))


def test_dedup_exact_near_and_keep_best(topics):
    names = sorted(topics)
    texts = [topics[n] for n in names]
    groups = duplicate_groups(texts, DedupConfig())
    # CPython ships the "if" statement's page under two topic names: a real exact duplicate.
    assert [[names[i] for i in g] for g in groups] == [["else", "if"]]
    para = " ".join(_paragraphs(topics["for"])[:3])
    words = para.split()
    near = " ".join(words[:-3] + ["in", "every", "case."])  # a few words differ
    assert len(words) > 80
    other = " ".join(_paragraphs(topics["while"])[:3])
    assert duplicate_groups([para, near, other], DedupConfig()) == [[0, 1]]
    assert duplicate_groups([para, near, other], DedupConfig(near=False)) == []
    assert duplicate_groups([para, para.upper() + " ", other], DedupConfig(near=False)) == [[0, 1]]
    # Keep the best-scored copy; the others point at it.
    assert keep_best([[0, 1, 2]], key=lambda i: [1, 3, 2][i]) == {0: 1, 2: 1}
    assert keep_best([[0, 1]], key=lambda i: 5) == {1: 0}  # tie: the first
