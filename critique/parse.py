"""The critique text format: write it (``format_critique``) and read it back (``parse_critique``).

The format is one ``Name: value`` line per field::

    Accuracy: 4
    Relevance: 4
    Completeness: 3
    Usefulness: 3
    Clarity: 4
    Tier: 4
    Reason: Correct and direct answer.

``parse_critique`` never raises: small critique models drift from any format, so it also reads a
JSON object, markdown decoration (``**Accuracy:** 4``, bullets), ``3/4`` and ``3 out of 4``,
field-name variants (``Overall``, ``Grade``, ``Explanation``), repeated fields (the first one
wins) and chatter around the grades. What it cannot read is reported as ``unparseable`` with the
problem, for the caller's policy (retry, drop, lowest tier) to handle.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from critique.rubric import DIMENSIONS, MAX_TIER, MIN_TIER, tier_from_scores

# Names a model may use for each field (lower case). The first list entry is the canonical name.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "accuracy": ("accuracy", "correctness", "accurate"),
    "relevance": ("relevance", "relevancy", "relevant"),
    "completeness": ("completeness", "complete"),
    "usefulness": ("usefulness", "helpfulness", "useful", "helpful"),
    "clarity": ("clarity", "clearness", "clear"),
    "tier": ("tier", "overall tier", "overall", "overall grade", "grade", "final tier", "rating", "overall rating"),
    "reason": ("reason", "reasons", "reasoning", "explanation", "justification", "rationale", "comment"),
}
_ALIAS_TO_FIELD = {alias: name for name, aliases in FIELD_ALIASES.items() for alias in aliases}
_BOLD = r"(?:\*\*|__)?"
_LINE = re.compile(
    r"^[\s>*#\-+•\d.)]*"                       # bullets, numbering, quote marks, heading hashes
    + r"(?P<bold>\*\*|__)?(?P<key>[A-Za-z][A-Za-z ]{1,24}?)" + _BOLD  # field name, maybe bold
    + r"\s*(?:\(\s*1\s*-\s*4\s*\))?\s*" + _BOLD + r"\s*[:=]\s*"  # "(1-4)", separator
    # a bold that closes after the separator ("__Reason:__ ...") only when one opened before the name, so a value
    # that itself starts with "__" keeps it
    + r"(?(bold)(?:\*\*|__)?)\s*"
    r"(?P<value>.*)$"
)
# A score: 1-4 alone, as x/4 or "x out of 4", optionally in brackets or bold; not a range (1-4),
# not a decimal (3.5), not another scale (3/5, 7/10).
_SCORE = re.compile(
    r"^[\s*_(\[]*(?P<n>[1-4])(?:\.0+)?(?!\s*-\s*\d)(?!\.\d)(?!\d)"
    r"(?:\s*(?:/|out of)\s*(?P<scale>\d+))?"
)
_TIER_IN_TEXT = re.compile(r"\btier\b(?:\s+is|\s+of)?\s*[:=]?\s*[*_]*([1-4])\b(?![-/.]\d|\s*(?:-|/|out of)\s*\d)",
                           re.IGNORECASE)
MIN_SCORES_TO_DERIVE_TIER = 3
"""A missing tier is derived from the dimension scores only when at least this many were given."""
MAX_REASON_CHARS = 400
"""Longer reasons are cut: the reason is a short justification, and a runaway model can ramble."""


@dataclass
class ParsedCritique:
    """What ``parse_critique`` read from one critique-model output."""

    status: str
    """ok: tier, every dimension score and a reason; partial: a tier (given or derived from the
    scores) but something missing; unparseable: no tier could be read or derived."""
    tier: int | None = None
    scores: dict[str, int | None] = field(default_factory=dict)
    reason: str = ""
    problem: str = ""
    """What was missing or wrong ("" when status is ok)."""
    tier_derived: bool = False
    """True when the tier was not given and was derived from the scores."""


def format_critique(scores: dict[str, int | None], tier: int, reason: str) -> str:
    """The canonical critique text (what few-shot examples show and critique fine-tuning targets)."""
    lines = [f"{d.capitalize()}: {scores[d]}" for d in DIMENSIONS if scores.get(d) is not None]
    lines.append(f"Tier: {tier}")
    lines.append(f"Reason: {' '.join(str(reason).split())}")
    return "\n".join(lines)


def critique_regex(min_reason_chars: int = 8, max_reason_chars: int = 200) -> str:
    """A regular expression of the canonical format, for engines that constrain decoding to it
    (vLLM structured outputs). The reason must start with a letter and stay on one line."""
    dims = "".join(f"{d.capitalize()}: [1-4]\\n" for d in DIMENSIONS)
    return dims + f"Tier: [1-4]\\nReason: [A-Za-z][^\\n]{{{min_reason_chars},{max_reason_chars}}}\\n?"


def _score(value: object) -> int | None:
    """A 1-4 score from a field value, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value) if float(value).is_integer() and MIN_TIER <= value <= MAX_TIER else None
    if not isinstance(value, str):
        return None
    m = _SCORE.match(value)
    if not m:
        return None
    if m.group("scale") is not None and m.group("scale") != str(MAX_TIER):
        return None
    return int(m.group("n"))


def _clean_reason(text: object) -> str:
    if not isinstance(text, str):
        return ""
    text = " ".join(text.replace("*", " ").split()).strip(" \"'`-")
    if text.startswith("<") and text.endswith(">"):  # the format's "<one short sentence>" copied back
        return ""
    return text[:MAX_REASON_CHARS]


def _from_json(text: str) -> dict[str, object] | None:
    """Fields of the first JSON object in ``text`` whose keys name critique fields."""
    start = text.find("{")
    while start != -1:
        depth = 0
        for end in range(start, min(len(text), start + 4000)):
            ch = text[end]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    try:
                        obj = json.loads(text[start:end + 1])
                    except (ValueError, RecursionError):
                        break
                    if isinstance(obj, dict):
                        found = {}
                        for key, value in obj.items():
                            name = _ALIAS_TO_FIELD.get(str(key).strip().lower())
                            if name and name not in found:
                                found[name] = value
                        if found:
                            return found
                    break
        start = text.find("{", start + 1)
    return None


def _from_lines(text: str) -> dict[str, object]:
    found: dict[str, object] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _LINE.match(line)
        if not m:
            continue
        name = _ALIAS_TO_FIELD.get(" ".join(m.group("key").lower().split()))
        if name is None or name in found:
            continue
        value = m.group("value")
        if name == "reason":
            if not value.strip(" *\t"):  # "Reason:" (or "**Reason:**") then the reason on the next line
                value = next((ln for ln in lines[i + 1:] if ln.strip()), "")
            found[name] = value
        elif _score(value) is not None:
            found[name] = value
    return found


def parse_critique(text: object) -> ParsedCritique:
    """Read grades from a critique-model output. Never raises; see the module docstring."""
    if not isinstance(text, str) or not text.strip():
        return ParsedCritique(status="unparseable", scores=dict.fromkeys(DIMENSIONS), problem="empty output")
    fields = _from_json(text) or _from_lines(text)
    scores = {d: _score(fields.get(d)) for d in DIMENSIONS}
    reason = _clean_reason(fields.get("reason"))
    tier = _score(fields.get("tier"))
    if tier is None:  # "Tier 3", "the overall tier is 3" in running text
        m = _TIER_IN_TEXT.search(text)
        tier = int(m.group(1)) if m else None
    derived = False
    if tier is None and sum(v is not None for v in scores.values()) >= MIN_SCORES_TO_DERIVE_TIER:
        tier = tier_from_scores(scores)
        derived = tier is not None
    missing = [d for d in DIMENSIONS if scores[d] is None]
    if tier is None:
        return ParsedCritique(status="unparseable", scores=scores, reason=reason,
                              problem="no tier, and too few dimension scores to derive one")
    problems = []
    if derived:
        problems.append("tier derived from the scores")
    if missing:
        problems.append("missing " + ", ".join(missing))
    if not reason:
        problems.append("no reason")
    return ParsedCritique(status="partial" if problems else "ok", tier=tier, scores=scores, reason=reason,
                          problem="; ".join(problems), tier_derived=derived)
