"""generate: templates per source kind, robust parsing, drop counting, domain labels, reproducibility.

Runs on the session engines: `instruct_pool` (the real 135M instruct model) for real output and
`tiny_pool` (a random tiny MoE, whose output is noise) to show that garbage is dropped and counted.
"""

from __future__ import annotations

import pytest

from pipeline.templates import TemplateError
from stages.generate import (
    INSTRUCTION_FIELDS,
    GenerateConfig,
    generate_candidates,
    instruction_id,
    load_templates,
    pick_templates,
    select_kept,
)
from stages.instruction_parsing import REJECT_REASONS, parse_instruction
from stages.seeds import SeedsConfig, build_seeds
from stages.taxonomy import label_domain, load_taxonomy

KINDS = ("web", "web_qa", "code", "book")


@pytest.fixture(scope="module")
def seeds():
    """Two real seeds of each kind (the embedded default sources)."""
    cfg = SeedsConfig()
    for source in cfg.sources:
        source.max_chunks = 2
    records, _ = build_seeds(cfg, seed=0)
    return records


def test_every_source_kind_and_task_type_has_templates():
    _, templates = load_templates(GenerateConfig().prompts)
    for kind in KINDS:
        assert len([t for t in templates if kind in t.source_kinds]) >= 3
    assert {t.task_type for t in templates} == {"qa", "howto", "code_write", "code_explain", "reasoning", "math",
                                                "writing"}


def test_templates_are_picked_per_seed_reproducibly(seeds):
    _, templates = load_templates(GenerateConfig().prompts)
    for seed in seeds:
        picked = pick_templates(seed, templates, 3, run_seed=0)
        assert picked == pick_templates(seed, templates, 3, run_seed=0)
        assert len({t.id for t in picked}) == 3 and all(seed["source_kind"] in t.source_kinds for t in picked)
    orders = {tuple(t.id for t in pick_templates(s, templates, 3, run_seed=r)) for s in seeds for r in range(3)}
    assert len(orders) > 3


def test_bad_template_file_fails_naming_file_and_template(tmp_path):
    bad = tmp_path / "gen.yaml"
    bad.write_text("templates:\n  - id: t1\n    task_type: qa\n    source_kinds: [web]\n"
                   "    prompt: 'Ask about {txt}'\n")
    with pytest.raises(TemplateError, match=r"gen.yaml: templates\[0\] \(t1\)\.prompt: unknown placeholder.*txt"):
        load_templates(str(bad))
    bad.write_text("templates:\n  - id: t1\n    task_type: poetry\n    source_kinds: [web]\n    prompt: x\n")
    with pytest.raises(TemplateError, match="task_type 'poetry'"):
        load_templates(str(bad))


@pytest.mark.parametrize("raw,expect,want", [
    ("Sure! Here is a question: What does IDLE do when it starts?", "question", "What does IDLE do when it starts?"),
    ('**Question:** "How do I run a file in IDLE?"\n\nAnswer: Press F5.', "question", "How do I run a file in IDLE?"),
    ("1. Write a Python function that merges two sorted lists.\n2. Write another one.", "task",
     "Write a Python function that merges two sorted lists."),
    ("Task: Write a short poem about compression.\n\n**Solution:** ...", "task", "Write a short poem about compression."),
    ("Tom has 4 boxes of 6 eggs. How many eggs does he have? Answer: 24", "question",
     "Tom has 4 boxes of 6 eggs. How many eggs does he have?"),
    ("Why does IDLE use a subprocess? The reason is that user code cannot crash the editor.", "any",
     "Why does IDLE use a subprocess?"),
    ("Write a function that sorts a list of words by length. To solve this, we use sorted().", "any",
     "Write a function that sorts a list of words by length."),
])
def test_parser_unwraps_instructions(raw, expect, want):
    assert parse_instruction(raw, expect) == (want, None)


@pytest.mark.parametrize("raw,expect,reason", [
    ("", "question", "empty"),
    ("   \n ", "task", "empty"),
    ("I'm sorry, but I cannot help with that.", "task", "refusal"),
    ("I'm here to help you with your Python code. What would you like to know?", "question", "chatter"),
    ("This code defines a function that adds two numbers.", "task", "answer_not_instruction"),
    ("The answer is 42.", "question", "answer_not_instruction"),
    ("Python is a programming language used by many people.", "question", "no_question"),
    ("Why?", "question", "too_short"),
    ("What does the text above say about sockets?", "question", "refers_to_unseen_text"),
])
def test_parser_rejects_with_a_reason(raw, expect, reason):
    text, why = parse_instruction(raw, expect)
    assert text is None and why == reason and why in REJECT_REASONS


def test_domain_labels_follow_the_taxonomy():
    tax = load_taxonomy()
    assert label_domain("Write a Python function that reverses a list.", tax, "qa") == "code"
    assert label_domain("A shop sells 3 pens for 2 dollars. How many pens for 10 dollars?", tax, "qa") == "math"
    assert label_domain("Write a short poem about the sea.", tax, "howto") == "writing"
    assert label_domain("What is a generator?", tax, "qa") == "knowledge_qa"
    assert label_domain("Is it true?", tax, "reasoning") == "reasoning"  # no keyword: the task type decides


def _check_candidates(cands, seeds, cfg):
    assert len(cands) == len(seeds) * cfg.n_per_seed
    seed_ids = {s["id"] for s in seeds}
    kinds = {s["id"]: s["source_kind"] for s in seeds}
    for c in cands:
        assert c["seed_id"] in seed_ids and c["source_kind"] == kinds[c["seed_id"]]
        assert c["parent_id"] is None and c["operator"] is None and c["round"] == 0
        if c["reject_reason"] is None:
            assert c["instruction"].strip() and c["id"] == instruction_id(c["instruction"])
        else:
            assert c["reject_reason"] in REJECT_REASONS + ("truncated",) and not c["instruction"]


@pytest.mark.slow
def test_generate_with_the_instruct_model(instruct_pool, seeds):
    cfg = GenerateConfig(n_per_seed=2, max_tokens=64)
    cands = generate_candidates(seeds, cfg, instruct_pool, run_seed=0)
    _check_candidates(cands, seeds, cfg)
    kept, metrics = select_kept(cands)
    tax = load_taxonomy()
    assert kept, "the real instruct model should give at least one usable instruction from 8 seeds"
    assert metrics["instructions"] + metrics["dropped"] == metrics["candidates"] == len(cands)
    assert sum(v["kept"] for v in metrics["yield_by_template"].values()) == len(kept)
    assert all(set(r) == set(INSTRUCTION_FIELDS) and r["domain"] in tax.domains for r in kept)
    assert all(r["model"] == "smollm2-135m-instruct" for r in kept)
    # context-attaching templates carry the seed text in the instruction
    for r in kept:
        if r["template"] == "code_explain":
            seed = next(s for s in seeds if s["id"] == r["seed_id"])
            assert seed["text"] in r["instruction"]
    # same seeds, config and run seed: the same candidates (requests are seeded per record)
    again = generate_candidates(seeds[:3], cfg, instruct_pool, run_seed=0)
    assert [c["raw"] for c in again] == [c["raw"] for c in cands[: 3 * cfg.n_per_seed]]


@pytest.mark.slow
def test_noise_is_dropped_and_counted(tiny_pool, seeds):
    """The random tiny model writes noise: nearly everything must be dropped, and every drop counted."""
    cfg = GenerateConfig(n_per_seed=3, max_tokens=32)
    cands = generate_candidates(seeds, cfg, tiny_pool, run_seed=0)
    _check_candidates(cands, seeds, cfg)
    kept, metrics = select_kept(cands)
    assert metrics["dropped"] >= 0.8 * len(cands)
    assert sum(metrics["dropped_by_reason"].values()) == metrics["dropped"] == len(cands) - len(kept)
    other = generate_candidates(seeds, cfg, tiny_pool, run_seed=1)
    assert [c["raw"] for c in other] != [c["raw"] for c in cands]  # the run seed changes the samples
