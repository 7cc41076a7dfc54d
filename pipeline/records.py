"""Record schemas of the run's datasets and the kinds of seed source, defined once.

Every stage that writes or copies records imports its field list from here, so a field added to a
schema reaches every stage that carries it. ARCHITECTURE.md ("Dataset names and record formats")
describes each field.
"""

from __future__ import annotations

from typing import Literal, get_args

SourceKind = Literal["web", "web_qa", "code", "book"]
"""Kinds of seed source: web pages, web question/answer pairs, code repositories, books."""
SOURCE_KINDS: tuple[str, ...] = get_args(SourceKind)

SEED_FIELDS: tuple[str, ...] = ("id", "text", "source_kind", "source", "license", "n_tokens", "title", "language",
                                "question", "answer", "encoding")
"""Fields of a `seeds` record (question/answer are set for web QA only; encoding: the codec the document was
read with, None for text that came as strings)."""

INSTRUCTION_FIELDS: tuple[str, ...] = ("id", "instruction", "domain", "task_type", "seed_id", "source_kind",
                                       "parent_id", "operator", "round", "model", "template", "constraints")
"""Fields of an `instructions` / `evolved` record, and the instruction part of an `answers` record."""

LINEAGE_FIELDS: tuple[str, ...] = ("instruction", "domain", "task_type", "seed_id", "source_kind", "parent_id",
                                   "operator", "round", "model", "template", "answer_role", "objective",
                                   "constraints")
"""Instruction fields the filter copies onto every `sft` and `preferences` row (those present in the input)."""

PAIR_FIELDS: tuple[str, ...] = ("prompt", "chosen", "rejected")
"""The TRL conversational preference fields of `preferences` and `online_pairs` rows."""


def source_item(row: dict) -> str:
    """The source item a record comes from: its seed chunk (``seed_id``), else its own ``id``. An instruction, its
    evolutions, its answers, SFT rows and preference pairs share their seed's item; data splits that must not leak
    (reward-model training, DPO training, held-out prompts) are kept apart by item, not by record."""
    if row.get("seed_id"):
        return f"seed:{row['seed_id']}"
    if row.get("id"):
        return f"id:{row['id']}"
    raise ValueError(f"record has neither seed_id nor id, so its source item is unknown: {sorted(row)[:8]}")


def check_disjoint(sets: dict[str, set[str]]) -> None:
    """Raise ValueError naming the first shared items when two of the named item sets overlap."""
    names = list(sets)
    problems = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(sets[a] & sets[b])
            if shared:
                problems.append(f"{a} and {b} share {len(shared)} source item(s), e.g. {', '.join(shared[:3])}")
    if problems:
        raise ValueError("data that must stay apart overlaps: " + "; ".join(problems))


def pair_items(row: dict) -> set[str]:
    """Source items a preference pair uses: its prompt's item, and the item of a rejected response taken from
    another item's data (``rejected_seed_id``), when it says so."""
    items = {source_item(row)}
    if row.get("rejected_seed_id"):
        items.add(source_item({"seed_id": row["rejected_seed_id"]}))
    return items
