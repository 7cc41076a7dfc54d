"""Verifiable constraints: the library the `constrain` evolve operator draws from and the filter checks against.

A constraint kind is a triple: phrasing templates (ours), a parameter sampler (ours), and a checker. The checkers
are Google's IFEval instruction checkers from the maintained ``if-verifiable`` package (through
``critique.ifeval.check_response``, which swaps in NLTK's untrained sentence splitter); a kind names the
checker id and turns its parameters into that checker's arguments. The kinds are generic instruction constraints
(length, case, format, keywords, punctuation, how the answer ends); the phrasings and parameter ranges are this
project's, and no benchmark prompt text is used.

A record carries its constraints as ``constraints``: a JSON list of ``{"kind", "params", "text"}`` (a JSON string,
so every dataset row has the same Arrow type whatever the kinds' parameters); ``"[]"`` when it has none.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

NO_CONSTRAINTS = "[]"
"""The ``constraints`` value of a record without constraints."""

_STOPWORDS = frozenset("""a an the and or but if then else of to in on at by for with from into about as is are was
were be been being it its this that these those what which who whom whose how why when where there here can could
should would will shall may might must do does did done have has had not no yes your you their they them his her
our we i me my than so such also more most some any each every all both either neither other another one two three
write explain describe give list tell show use using make answer question task student""".split())


@dataclass(frozen=True)
class ConstraintKind:
    """One kind of verifiable constraint."""

    checker: str
    """The IFEval checker id that verifies it (``if_verifiable.ifeval.instructions_registry``)."""
    templates: tuple[str, ...]
    """Phrasings, ``str.format`` templates over the sampled parameters; one is drawn per use."""
    sample: Callable[[random.Random, str], dict[str, Any]]
    """(rng, instruction) -> the parameters (JSON-serializable)."""
    arguments: Callable[[dict[str, Any]], dict[str, Any]]
    """Parameters -> the checker's ``build_description`` arguments."""


def _content_words(instruction: str) -> list[str]:
    words = [w.lower() for w in re.findall(r"[A-Za-z]{4,}", instruction)]
    return sorted({w for w in words if w not in _STOPWORDS})


def _keywords(rng: random.Random, instruction: str) -> dict:
    """One or two of the instruction's own content words (a natural thing to ask an answer to mention)."""
    words = _content_words(instruction) or ["example"]
    return {"words": rng.sample(words, min(len(words), rng.choice((1, 2))))}


def _keyword_frequency(rng: random.Random, instruction: str) -> dict:
    return {"word": rng.choice(_content_words(instruction) or ["example"]), "times": rng.choice((2, 3))}


_FILLER_WORDS = ("very", "really", "basically", "simply", "actually", "just", "thing", "stuff", "obviously")
"""Words an answer can do without: the ones a forbidden-words constraint picks from."""
_ENDINGS = ("That is my answer.", "End of answer.", "Thank you for reading.", "That is the whole answer.")
"""Closing phrases an end-phrase constraint asks for."""


KINDS: dict[str, ConstraintKind] = {
    "max_words": ConstraintKind(
        "length_constraints:number_words",
        ("Answer in fewer than {n} words.", "Keep your response under {n} words.", "Use less than {n} words."),
        lambda rng, _: {"n": rng.choice((40, 60, 80, 100, 150))},
        lambda p: {"num_words": p["n"], "relation": "less than"}),
    "min_words": ConstraintKind(
        "length_constraints:number_words",
        ("Write at least {n} words.", "Your response should be {n} words or longer."),
        lambda rng, _: {"n": rng.choice((30, 50, 80, 120))},
        lambda p: {"num_words": p["n"], "relation": "at least"}),
    "max_sentences": ConstraintKind(
        "length_constraints:number_sentences",
        ("Use at most {n} sentences.", "Answer in no more than {n} sentences."),
        lambda rng, _: {"n": rng.choice((2, 3, 4, 5))},
        lambda p: {"num_sentences": p["n"] + 1, "relation": "less than"}),
    "paragraphs": ConstraintKind(
        "length_constraints:number_paragraphs",
        ("Write exactly {n} paragraphs and separate them with a line containing only ***.",
         "Your answer must have {n} paragraphs, with the markdown divider *** between them."),
        lambda rng, _: {"n": rng.choice((2, 3))},
        lambda p: {"num_paragraphs": p["n"]}),
    "include_words": ConstraintKind(
        "keywords:existence",
        ("Make sure to mention {listed}.", "Your response must include {listed}."),
        _keywords,
        lambda p: {"keywords": p["words"]}),
    "word_frequency": ConstraintKind(
        "keywords:frequency",
        ('Use the word "{word}" at least {times} times.', 'Mention "{word}" {times} or more times.'),
        _keyword_frequency,
        lambda p: {"keyword": p["word"], "frequency": p["times"], "relation": "at least"}),
    "forbidden_words": ConstraintKind(
        "keywords:forbidden_words",
        ("Do not use {listed} anywhere in your answer.", "Avoid {listed} in your response."),
        lambda rng, _: {"words": rng.sample(_FILLER_WORDS, 2)},
        lambda p: {"forbidden_words": p["words"]}),
    "lowercase": ConstraintKind(
        "change_case:english_lowercase",
        ("Write your entire answer in lowercase letters, with no capital letters at all.",
         "Use only lowercase letters in your response."),
        lambda rng, _: {},
        lambda p: {}),
    "uppercase": ConstraintKind(
        "change_case:english_capital",
        ("Write your entire answer in capital letters.", "Your whole response must be in English UPPERCASE letters."),
        lambda rng, _: {},
        lambda p: {}),
    "json": ConstraintKind(
        "detectable_format:json_format",
        ("Format your entire output as JSON.", "Reply with valid JSON only; you may wrap it in a ```json block."),
        lambda rng, _: {},
        lambda p: {}),
    "bullets": ConstraintKind(
        "detectable_format:number_bullet_lists",
        ("Answer with exactly {n} bullet points, each line starting with '* '.",
         "Give your answer as a markdown list of exactly {n} items that start with '* '."),
        lambda rng, _: {"n": rng.choice((2, 3, 4, 5))},
        lambda p: {"num_bullets": p["n"]}),
    "title": ConstraintKind(
        "detectable_format:title",
        ("Begin with a title between double angle brackets, such as <<my title>>.",
         "Put a title at the top, enclosed in << and >>, for example <<a short title>>."),
        lambda rng, _: {},
        lambda p: {}),
    "highlights": ConstraintKind(
        "detectable_format:number_highlighted_sections",
        ("Highlight at least {n} parts of your answer with markdown, like *this part*.",
         "Mark at least {n} key phrases with single asterisks, such as *key phrase*."),
        lambda rng, _: {"n": rng.choice((1, 2, 3))},
        lambda p: {"num_highlights": p["n"]}),
    "sections": ConstraintKind(
        "detectable_format:multiple_sections",
        ("Split your answer into {n} sections; begin each with '{marker} 1', '{marker} 2', and so on.",
         "Organize the response in {n} parts, each starting with a line '{marker} N' where N is its number."),
        lambda rng, _: {"n": rng.choice((2, 3)), "marker": rng.choice(("Section", "Part"))},
        lambda p: {"section_spliter": p["marker"], "num_sections": p["n"]}),
    "placeholders": ConstraintKind(
        "detectable_content:number_placeholders",
        ("Include at least {n} placeholders in square brackets, like [name].",
         "Leave at least {n} fill-in fields written in square brackets, for example [date]."),
        lambda rng, _: {"n": rng.choice((1, 2, 3))},
        lambda p: {"num_placeholders": p["n"]}),
    "postscript": ConstraintKind(
        "detectable_content:postscript",
        ("End with a postscript that starts with {marker}", "Add a postscript at the end, beginning with {marker}"),
        lambda rng, _: {"marker": rng.choice(("P.S.", "P.P.S"))},
        lambda p: {"postscript_marker": p["marker"]}),
    "end_phrase": ConstraintKind(
        "startend:end_checker",
        ('Finish your response with the exact phrase "{phrase}" and nothing after it.',
         'The last words of your answer must be "{phrase}"'),
        lambda rng, _: {"phrase": rng.choice(_ENDINGS)},
        lambda p: {"end_phrase": p["phrase"]}),
    "quotation": ConstraintKind(
        "startend:quotation",
        ("Enclose the whole reply in double quotes.", "Put the whole answer inside double quotes."),
        lambda rng, _: {},
        lambda p: {}),
    "no_commas": ConstraintKind(
        "punctuation:no_comma",
        ("Do not use any commas.", "Your response must contain no commas at all."),
        lambda rng, _: {},
        lambda p: {}),
}
"""Constraint kind name -> its definition (the one list of kinds)."""

# Pairs no single answer can satisfy together, or that fight over the same spot, beyond if-verifiable's own
# conflict table: how the text ends, and its top-level layout.
_EXTRA_CONFLICTS = ({"startend:end_checker", "startend:quotation", "detectable_content:postscript"},
                    {"detectable_format:number_bullet_lists", "length_constraints:number_paragraphs",
                     "detectable_format:multiple_sections"})


@functools.cache
def _conflicts() -> dict[str, frozenset[str]]:
    """Checker id -> checker ids it cannot be combined with (symmetric, itself included)."""
    import copy

    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, conflict_make

    table = conflict_make(copy.deepcopy(INSTRUCTION_CONFLICTS))
    for group in _EXTRA_CONFLICTS:
        for checker in group:
            table[checker] |= group
    return {k: frozenset(v) for k, v in table.items()}


def compatible(kinds: Sequence[str]) -> bool:
    """Whether the constraint kinds can hold in one answer (their checkers do not conflict)."""
    checkers = [KINDS[k].checker for k in kinds]
    return all(b not in _conflicts()[a] for i, a in enumerate(checkers) for b in checkers[i + 1:])


def _listed(words: Sequence[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def phrase(kind: str, params: dict[str, Any], rng: random.Random) -> str:
    """One phrasing of constraint ``kind`` with ``params``."""
    extra = {"listed": _listed(params["words"])} if "words" in params else {}
    return rng.choice(KINDS[kind].templates).format(**params, **extra)


def sample_constraints(instruction: str, rng: random.Random, allowed: Sequence[str], max_count: int = 3) -> list[dict]:
    """One to ``max_count`` compatible constraints for ``instruction``, kinds drawn from ``allowed``:
    ``[{"kind", "params", "text"}]``."""
    unknown = sorted(set(allowed) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown constraint kind(s) {unknown}; known: {', '.join(KINDS)}")
    wanted = rng.randint(1, max(1, min(max_count, len(allowed))))
    kinds: list[str] = []
    for kind in rng.sample(list(allowed), len(allowed)):
        if len(kinds) < wanted and compatible([*kinds, kind]):
            kinds.append(kind)
    out = []
    for kind in kinds:
        params = KINDS[kind].sample(rng, instruction)
        out.append({"kind": kind, "params": params, "text": phrase(kind, params, rng)})
    return out


def constrained_instruction(instruction: str, constraints: Sequence[dict]) -> str:
    """The instruction with its constraints' phrasings appended."""
    return " ".join([instruction.rstrip(), *(c["text"] for c in constraints)])


def dump(constraints: Sequence[dict]) -> str:
    """The record field's value (``NO_CONSTRAINTS`` when empty)."""
    return json.dumps([{"kind": c["kind"], "params": c["params"], "text": c["text"]} for c in constraints],
                      sort_keys=True) if constraints else NO_CONSTRAINTS


def record_constraints(record: dict) -> list[dict]:
    """The constraints a record carries (none when it has no ``constraints`` field)."""
    raw = record.get("constraints") or NO_CONSTRAINTS
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"record {record.get('id')!r}: `constraints` is not JSON ({exc}); it must be the list "
                         "critique.constraints.dump writes") from exc
    unknown = sorted({c.get("kind") for c in items} - set(KINDS))
    if unknown:
        raise ValueError(f"record {record.get('id')!r}: unknown constraint kind(s) {unknown}; known: {', '.join(KINDS)}")
    return items


def check(response: str, constraints: Sequence[dict]) -> list[bool]:
    """Whether ``response`` satisfies each constraint (IFEval's strict rule: the text as written)."""
    from critique.ifeval import check_response

    if not constraints:
        return []
    verdicts = check_response(response, [KINDS[c["kind"]].checker for c in constraints],
                              [KINDS[c["kind"]].arguments(c["params"]) for c in constraints])
    return verdicts["strict"]
