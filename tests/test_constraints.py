"""The constraint library: every kind's checker on a text that follows it and one that does not, sampling that keeps
constraints compatible and reproducible, and the record field's round trip."""

from __future__ import annotations

import random

import pytest

from critique.constraints import (
    KINDS,
    NO_CONSTRAINTS,
    check,
    compatible,
    constrained_instruction,
    dump,
    record_constraints,
    sample_constraints,
)

WORDS_30 = " ".join(["word"] * 30)
# kind -> (params, a response that follows it, one that does not)
CASES = {
    "max_words": ({"n": 40}, "A short answer of a few words.", WORDS_30 + " " + WORDS_30),
    "min_words": ({"n": 30}, WORDS_30 + " more.", "Too short."),
    "max_sentences": ({"n": 2}, "One sentence here. Two sentences here.",
                      "One sentence. Two sentences. Three sentences. Four."),
    "paragraphs": ({"n": 2}, "First paragraph.\n***\nSecond paragraph.", "Only one paragraph."),
    "include_words": ({"words": ["python", "loop"]}, "In Python a loop repeats.", "In Python nothing repeats."),
    "word_frequency": ({"word": "data", "times": 2}, "Data in, data out.", "Data in, nothing out."),
    "forbidden_words": ({"words": ["very", "just"]}, "It is quite good.", "It is very good."),
    "lowercase": ({}, "all of this is lowercase.", "Not all lowercase."),
    "uppercase": ({}, "ALL OF THIS IS UPPERCASE.", "NOT ALL Uppercase."),
    "json": ({}, '{"answer": 42}', "answer: 42"),
    "bullets": ({"n": 2}, "* first\n* second", "* first\n* second\n* third"),
    "title": ({}, "<<Loops>>\nA loop repeats.", "Loops\nA loop repeats."),
    "highlights": ({"n": 2}, "This is *one* and *two*.", "This is *one* only."),
    "sections": ({"n": 2, "marker": "Part"}, "Part 1\nintro\nPart 2\nbody", "Part 1\nonly one part"),
    "placeholders": ({"n": 2}, "Dear [name], see you on [date].", "Dear [name], see you soon."),
    "postscript": ({"marker": "P.S."}, "Answer.\nP.S. one more thing.", "Answer without a postscript."),
    "end_phrase": ({"phrase": "End of answer."}, "Loops repeat. End of answer.", "End of answer. Loops repeat."),
    "quotation": ({}, '"A quoted answer."', "An unquoted answer."),
    "no_commas": ({}, "No commas here.", "Commas, here."),
}


def test_every_kind_has_a_case():
    assert set(CASES) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_checker_tells_a_following_text_from_a_violating_one(kind):
    params, good, bad = CASES[kind]
    constraint = [{"kind": kind, "params": params, "text": ""}]
    assert check(good, constraint) == [True]
    assert check(bad, constraint) == [False]


def test_samples_are_compatible_reproducible_and_phrased_with_their_parameters():
    instruction = "Explain how a binary search finds an element in a sorted array."
    draws = [sample_constraints(instruction, random.Random(seed), list(KINDS)) for seed in range(200)]
    assert all(1 <= len(d) <= 3 and compatible([c["kind"] for c in d]) for d in draws)
    assert draws[7] == sample_constraints(instruction, random.Random(7), list(KINDS))
    assert {len(d) for d in draws} == {1, 2, 3}
    assert {c["kind"] for d in draws for c in d} == set(KINDS)  # every kind gets drawn
    for c in (c for d in draws for c in d):
        for value in c["params"].values():
            for item in value if isinstance(value, list) else [value]:
                assert str(item) in c["text"], c
    words = {w for d in draws for c in d if c["kind"] == "include_words" for w in c["params"]["words"]}
    assert words <= {"binary", "search", "finds", "element", "sorted", "array"}


def test_conflicting_kinds_are_never_combined():
    assert not compatible(["lowercase", "uppercase"])
    assert not compatible(["json", "bullets"])
    assert not compatible(["end_phrase", "postscript"])
    assert not compatible(["max_words", "min_words"])  # one checker, one relation
    assert compatible(["lowercase", "no_commas", "max_words"])


def test_the_record_field_round_trips_and_bad_values_are_named():
    constraints = sample_constraints("Describe a queue.", random.Random(1), ["no_commas", "max_words"])
    record = {"id": "x", "constraints": dump(constraints)}
    assert record_constraints(record) == constraints
    assert record_constraints({"id": "y"}) == [] and dump([]) == NO_CONSTRAINTS
    assert constrained_instruction("Describe a queue.", constraints).startswith("Describe a queue. ")
    with pytest.raises(ValueError, match="record 'z'.*unknown constraint kind"):
        record_constraints({"id": "z", "constraints": '[{"kind": "rhymes", "params": {}, "text": ""}]'})
    with pytest.raises(ValueError, match="record 'w'.*not JSON"):
        record_constraints({"id": "w", "constraints": "{"})


def test_no_phrasing_shares_an_8_gram_with_ifeval():
    """Decontamination of the library itself: every phrasing of every kind, rendered with sampled parameters,
    against IFEval's 541 prompts (an earlier title phrasing did share one)."""
    from stages.eval.benchmark import benchmark_overlap

    rng = random.Random(0)
    texts = [template.format(**params, listed='"word"')
             for kind in KINDS.values() for template in kind.templates
             for params in [kind.sample(rng, "Explain how a binary search finds an element.")]]
    assert len(texts) >= 2 * len(KINDS)
    assert benchmark_overlap(texts)["texts_overlapping"] == 0
    assert benchmark_overlap(["Please write a riddle about the inverse function with a title wrapped in double "
                              "angular brackets"])["texts_overlapping"] == 1  # the check does see a copy
