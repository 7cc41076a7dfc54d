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
                                "question", "answer")
"""Fields of a `seeds` record (question/answer are set for web QA only)."""

INSTRUCTION_FIELDS: tuple[str, ...] = ("id", "instruction", "domain", "task_type", "seed_id", "source_kind",
                                       "parent_id", "operator", "round", "model", "template")
"""Fields of an `instructions` / `evolved` record, and the instruction part of an `answers` record."""

LINEAGE_FIELDS: tuple[str, ...] = ("instruction", "domain", "task_type", "seed_id", "source_kind", "parent_id",
                                   "operator", "round", "model", "template", "answer_role", "objective")
"""Instruction fields the filter copies onto every `sft` and `preferences` row (those present in the input)."""

PAIR_FIELDS: tuple[str, ...] = ("prompt", "chosen", "rejected")
"""The TRL conversational preference fields of `preferences` and `online_pairs` rows."""
