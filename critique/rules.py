"""Rule-based quality control of responses: truncation, garbled text, format errors, repetition.

Each rule is a plain function ``check_<rule>(text, ..., cfg) -> list[str]`` returning the reasons
it rejects the text for (empty: the text passes). ``apply_rules`` runs every enabled rule on every
response of a batch of records, writes the reasons onto each response (``rule_reasons``), and
counts, per rule, how many responses it flagged and how many it was the first to reject (the
filter funnel). Duplication needs the whole dataset and lives in ``critique/dedup.py``.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

RULES: tuple[str, ...] = ("truncation", "garbled", "format", "repetition")
"""Rule names, in the order the funnel applies them."""


class RulesConfig(BaseModel):
    """Rule-based quality control (the cheap filters that run before the critique model)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enabled: list[str] = Field(default_factory=lambda: list(RULES))
    """Rules to apply, among truncation, garbled, format, repetition (duplication is configured under
    `dedup`)."""
    # -- truncation
    min_chars: int = Field(2, ge=0)
    """Responses with fewer non-space characters than this are rejected as empty."""
    check_last_sentence: bool = True
    """Reject responses whose last prose line stops mid-sentence (no closing punctuation)."""
    list_item_max_words: int = Field(8, ge=0)
    """A last line that is a list item of at most this many words may end without punctuation."""
    # -- garbled text
    max_replacement_chars: int = Field(0, ge=0)
    """Most U+FFFD replacement characters allowed (they mark bytes lost in decoding)."""
    max_control_chars: int = Field(0, ge=0)
    """Most control, private-use, surrogate or unassigned code points allowed (tab/newline excepted)."""
    check_mojibake: bool = True
    """Reject text that ftfy can re-decode (UTF-8 read as Latin-1/Windows-1252 and the like)."""
    max_foreign_script_frac: float = Field(0.02, ge=0, le=1)
    """Most letters allowed in scripts that neither the instruction nor the response's main script use
    (wrong-script noise such as stray Cyrillic or CJK in an English answer)."""
    min_foreign_script_chars: int = Field(3, ge=1)
    """Foreign-script letters below this count are never noise (a name, a symbol)."""
    allowed_scripts: list[str] = Field(default_factory=lambda: ["LATIN", "GREEK"])
    """Scripts always allowed (first word of the Unicode character name; GREEK covers math symbols)."""
    # -- format
    template_tokens: list[str] = Field(default_factory=lambda: [
        r"<\|[a-z_]{2,30}\|>", r"\[/?INST\]", r"<</?SYS>>", r"^\s*<s>", r"</s>\s*$", r"<(start|end)_of_turn>",
        r"<\|?(begin|end)_of_text\|?>", r"\[(SYSTEM|USER|ASSISTANT)_PROMPT\]"])
    """Regular expressions of chat-template tokens that must not appear in a response outside code
    (Llama's <s> and </s> only at the very start/end: elsewhere they are HTML strikethrough)."""
    role_markers: list[str] = Field(default_factory=lambda: [
        r"(user|human|assistant|ai|system|bot|model)\s*:", r"#{2,}\s*(human|assistant|instruction|response)\s*:?",
        r"<\|?(user|assistant|system)\|?>"])
    """Regular expressions (matched case-insensitively at the start of a line, outside code) of role
    markers: the model went on writing the next turn of the conversation."""
    # -- repetition (Gopher's repetition filters, Rae et al. 2021, Table A1)
    max_dup_line_frac: float = Field(0.3, ge=0, le=1)
    """Most lines (of at least `min_line_chars`) that repeat an earlier line, as a fraction of lines."""
    min_line_chars: int = Field(12, ge=1)
    """Shorter lines are not counted for line repetition (closing braces, blank-ish lines in code)."""
    max_top_ngram_char_frac: dict[int, float] = Field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    """n -> most characters covered by the single most frequent word n-gram, as a fraction of all."""
    max_dup_ngram_char_frac: dict[int, float] = Field(default_factory=lambda: {
        5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    """n -> most characters covered by word n-grams that occur more than once, as a fraction of all."""
    min_words_for_ngrams: int = Field(100, ge=1)
    """N-gram ratios are not computed on responses with fewer words: on short text, parallel sentences
    ("The & operator yields ... The ^ operator yields ...") read as repetition."""


# -- markdown structure ---------------------------------------------------------------------------
# markdown-it (installed with rich) closes an unclosed fence silently at the end of the document and
# pads ragged table rows, i.e. it hides exactly the defects we look for; these small scanners report them.
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def split_code(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]], bool]:
    """(prose lines, code lines, ends_inside_fence): lines as (line number, text); fenced code
    blocks follow CommonMark (a closing fence uses the opening character, at least as long)."""
    prose, code = [], []
    fence: str | None = None
    for i, line in enumerate(text.splitlines()):
        m = _FENCE.match(line)
        if fence is None:
            if m and not (m.group(1)[0] == "`" and "`" in m.group(2)):
                fence = m.group(1)
                code.append((i, line))
            else:
                prose.append((i, line))
        else:
            code.append((i, line))
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not m.group(2).strip():
                fence = None
    return prose, code, fence is not None


_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def prose_text(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced code, with inline code spans replaced by the word CODE."""
    return [(i, _INLINE_CODE.sub("CODE", line)) for i, line in split_code(text)[0]]


# -- truncation ---------------------------------------------------------------------------------
_END_OK = tuple(".!?:;)]}\"'`*_>|…。！？；：」』）】》") + ("$",)
_LIST_ITEM = re.compile(r"^\s*([-*+•]|\d{1,3}[.)])\s+")
_URL_END = re.compile(r"https?://\S+$")


def check_truncation(text: str, finish_reason: str | None, cfg: RulesConfig) -> list[str]:
    """Cut-off responses: the engine hit its token limit, the text ends inside a code block, or the
    last prose line stops mid-sentence."""
    reasons = []
    if len("".join(text.split())) < cfg.min_chars:
        return [f"empty response ({len(text.strip())} characters)"]
    if finish_reason == "length":
        reasons.append("finish_reason=length (the generation hit max_tokens)")
    prose, code, in_fence = split_code(text)
    if in_fence:
        reasons.append("ends inside an unclosed code fence")
    if cfg.check_last_sentence and not in_fence:
        lines = [(i, ln) for i, ln in prose if ln.strip()]
        last_code = code[-1][0] if code else -1
        if lines and lines[-1][0] > last_code:  # the text ends with prose, not with a code block
            last = lines[-1][1].strip()
            words = len(last.split())
            exempt = (last.startswith(("#", "|", "<", "!["))  # heading, table row, html, image
                      or _URL_END.search(last)
                      or (_LIST_ITEM.match(last) and words <= cfg.list_item_max_words + 1))
            if not exempt and not last.endswith(_END_OK) and not _ends_with_emoji(last):
                reasons.append(f"last sentence is cut off: ...{last[-40:]!r}")
    return reasons


def _ends_with_emoji(line: str) -> bool:
    return unicodedata.category(line[-1]) == "So"


# -- garbled text -------------------------------------------------------------------------------
_BAD_CATEGORIES = {"Cc", "Co", "Cs", "Cn"}


def letter_scripts(text: str) -> Counter:
    """Letters counted by script (the first word of their Unicode name: LATIN, CYRILLIC, CJK, ...)."""
    # Python's unicodedata has no Script property; the first word of the character name is the
    # script for letters in every script we need to tell apart (CJK ideographs are named "CJK ...").
    counts: Counter = Counter()
    for ch in text:
        if ch.isalpha() and ord(ch) > 0x7F:
            counts[unicodedata.name(ch, "UNKNOWN").split(" ")[0]] += 1
        elif ch.isalpha():
            counts["LATIN"] += 1
    return counts


def check_garbled(text: str, instruction: str, cfg: RulesConfig) -> list[str]:
    """Mojibake, replacement characters, control characters, wrong-script noise."""
    import ftfy

    reasons = []
    n_repl = text.count("\ufffd")
    if n_repl > cfg.max_replacement_chars:
        reasons.append(f"{n_repl} replacement characters (U+FFFD)")
    bad = [ch for ch in text if ch not in "\t\n\r" and unicodedata.category(ch) in _BAD_CATEGORIES]
    if len(bad) > cfg.max_control_chars:
        codes = ", ".join(sorted({f"U+{ord(c):04X}" for c in bad})[:4])
        reasons.append(f"{len(bad)} control/private/unassigned characters ({codes})")
    if cfg.check_mojibake:
        fixed, steps = ftfy.fix_encoding_and_explain(text)
        if fixed != text and steps:
            how = " -> ".join(f"{step[0]} {step[1]}" for step in steps if step[0] in ("encode", "decode"))
            reasons.append(f"mojibake (ftfy re-decodes it: {how or steps[0][0]})")
    scripts = letter_scripts(text)
    total = sum(scripts.values())
    if total:
        main = scripts.most_common(1)[0][0]
        allowed = set(cfg.allowed_scripts) | {main} | set(letter_scripts(instruction))
        foreign = {s: n for s, n in scripts.items() if s not in allowed}
        n_foreign = sum(foreign.values())
        if n_foreign >= cfg.min_foreign_script_chars and n_foreign / total > cfg.max_foreign_script_frac:
            names = ", ".join(f"{s} {n}" for s, n in sorted(foreign.items(), key=lambda x: -x[1])[:3])
            reasons.append(f"wrong-script noise: {n_foreign} of {total} letters ({names}) in a {main} text")
    return reasons


# -- format errors ------------------------------------------------------------------------------
_TABLE_DELIM = re.compile(r"^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$")
_ORDERED = re.compile(r"^(\s*)(\d{1,3})[.)]\s+\S")
_EMPTY_ITEM = re.compile(r"^\s*([-*+]|\d{1,3}[.)])\s*$")


def _cells(row: str) -> int:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return len(re.split(r"(?<!\\)\|", row))


def _table_problems(lines: list[tuple[int, str]]) -> list[str]:
    problems, block = [], []
    for item in lines + [(-1, "")]:
        if item[1].strip().startswith("|"):
            block.append(item)
            continue
        if len(block) >= 2 and _cells(block[0][1]) >= 2:  # a lone leading "|" is no table (grammar rules)
            (_, header), (_, delim) = block[0], block[1]
            if not _TABLE_DELIM.match(delim):
                problems.append(f"broken table at line {block[0][0] + 1}: no |---| row under the header")
            else:
                want = _cells(header)
                if _cells(delim) != want:
                    problems.append(f"broken table at line {block[1][0] + 1}: delimiter row has "
                                    f"{_cells(delim)} cells, header {want}")
                for ln, row in block[2:]:
                    if _cells(row) != want:
                        problems.append(f"broken table at line {ln + 1}: row has {_cells(row)} cells, header {want}")
                        break
        block = []
    return problems


def _list_problems(lines: list[tuple[int, str]]) -> list[str]:
    problems = []
    last: dict[str, int] = {}  # indent -> last number of an ordered list at that indent
    for ln, line in lines:
        if not line.strip():
            continue
        if _EMPTY_ITEM.match(line):
            problems.append(f"broken list at line {ln + 1}: empty list item")
            continue
        m = _ORDERED.match(line)
        if m:
            indent, n = m.group(1), int(m.group(2))
            prev = last.get(indent)
            # 1, 1, 1 (lazy numbering) and a restart at 1 are valid markdown; a skip or a step back is not
            if prev is not None and n not in (prev, prev + 1, 1):
                problems.append(f"broken list at line {ln + 1}: item {n} follows item {prev}")
            last[indent] = n
            for deeper in [k for k in last if len(k) > len(indent)]:
                del last[deeper]
        elif not line.startswith((" ", "\t")):
            last.clear()  # unindented prose ends every list
    return problems


def check_format(text: str, cfg: RulesConfig) -> list[str]:
    """Broken markdown (tables, lists), leftover chat-template tokens, role markers."""
    reasons = []
    lines = prose_text(text)
    joined = "\n".join(line for _, line in lines)
    for pattern in cfg.template_tokens:
        m = re.search(pattern, joined)
        if m:
            reasons.append(f"chat-template token {m.group(0)!r} left in the response")
            break
    for pattern in cfg.role_markers:
        rx = re.compile(r"^\s*[*_]*" + pattern, re.IGNORECASE)
        hit = next(((ln, line) for ln, line in lines if rx.match(line)), None)
        if hit:
            reasons.append(f"role marker at line {hit[0] + 1}: {hit[1].strip()[:40]!r}")
            break
    reasons += _table_problems(lines)[:1]
    reasons += _list_problems(lines)[:1]
    return reasons


# -- repetition ---------------------------------------------------------------------------------
_WORD = re.compile(r"\w+", re.UNICODE)


_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)|<?https?://\S+>?")


def _top_dup_chars(words: list[str], n: int) -> int:
    counts = Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    if not counts:
        return 0
    gram, count = counts.most_common(1)[0]
    return len(gram) * count if count > 1 else 0


def _all_dup_chars(words: list[str], n: int) -> int:
    """Characters in repeated occurrences of n-grams (the first occurrence is not counted, and a
    counted repeat is skipped over so that overlapping repeats count once), as in Gopher/datatrove."""
    seen: set[str] = set()
    chars, i = 0, 0
    while i < len(words) - n + 1:
        gram = " ".join(words[i:i + n])
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def repetition_stats(text: str, cfg: RulesConfig) -> dict[str, float]:
    """Gopher's repetition ratios: duplicate-line fraction, and per n the character fraction of the
    most frequent n-gram (small n) and of repeated n-grams (large n)."""
    # datatrove implements the same ratios, but only inside its document pipeline (and with an
    # NLTK/spaCy tokenizer dependency); the formulas fit in a few lines.
    stats: dict[str, float] = {}
    # Prose only, links reduced to their text: code and URLs repeat tokens by nature (Gopher's
    # thresholds are for prose).
    text = _LINK.sub(r"\1", "\n".join(line for _, line in prose_text(text)))
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= cfg.min_line_chars]
    if lines:
        stats["dup_line_frac"] = 1 - len(set(lines)) / len(lines)
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < cfg.min_words_for_ngrams:
        return stats
    total_chars = max(1, len(" ".join(text.split())))
    for n in sorted(cfg.max_top_ngram_char_frac):
        stats[f"top_{n}gram_char_frac"] = _top_dup_chars(words, n) / total_chars
    for n in sorted(cfg.max_dup_ngram_char_frac):
        stats[f"dup_{n}gram_char_frac"] = _all_dup_chars(words, n) / total_chars
    return stats


def check_repetition(text: str, cfg: RulesConfig) -> list[str]:
    """Line and n-gram repetition over the configured thresholds (degenerate, looping output)."""
    stats = repetition_stats(text, cfg)
    limits = {"dup_line_frac": cfg.max_dup_line_frac}
    limits |= {f"top_{n}gram_char_frac": v for n, v in cfg.max_top_ngram_char_frac.items()}
    limits |= {f"dup_{n}gram_char_frac": v for n, v in cfg.max_dup_ngram_char_frac.items()}
    for key, value in stats.items():
        if value > limits[key]:
            return [f"{key}={value:.2f} > {limits[key]}"]
    return []


# -- applying the rules -------------------------------------------------------------------------
def check_response(text: str, instruction: str, finish_reason: str | None, cfg: RulesConfig) -> dict[str, list[str]]:
    """Rule name -> reasons, for every enabled rule that rejects the response."""
    if not isinstance(text, str):
        return {"truncation": [f"response text is {type(text).__name__}, not a string"]}
    checks = {
        "truncation": lambda: check_truncation(text, finish_reason, cfg),
        "garbled": lambda: check_garbled(text, instruction or "", cfg),
        "format": lambda: check_format(text, cfg),
        "repetition": lambda: check_repetition(text, cfg),
    }
    unknown = set(cfg.enabled) - set(checks)
    if unknown:
        raise ValueError(f"rules.enabled: unknown rule(s) {sorted(unknown)}; known: {list(RULES)}")
    out = {}
    for name in RULES:
        if name in cfg.enabled:
            reasons = checks[name]()
            if reasons:
                out[name] = reasons
    return out


def apply_rules(records: Iterable[dict], cfg: RulesConfig) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """Check every response of every record.

    Returns the records, each response annotated with ``rule_reasons`` (list of "rule: reason"
    strings, empty when it passes) and ``rejected_by`` (the first rule that rejects it, in RULES
    order, or None), and per-rule counts: ``flagged`` (responses the rule rejects, overlaps
    included) and ``rejected`` (responses it is the first to reject: the funnel).
    """
    counts = {name: {"flagged": 0, "rejected": 0} for name in RULES if name in cfg.enabled}
    out = []
    for rec in records:
        responses = []
        for resp in rec.get("responses") or []:
            found = check_response(resp.get("text"), rec.get("instruction", ""), resp.get("finish_reason"), cfg)
            for name in found:
                counts[name]["flagged"] += 1
            first = next(iter(found), None)
            if first:
                counts[first]["rejected"] += 1
            responses.append({**resp, "rule_reasons": [f"{k}: {r}" for k, rs in found.items() for r in rs],
                              "rejected_by": first})
        out.append({**rec, "responses": responses})
    return out, counts
