"""Exact and near-duplicate detection across a whole dataset (MinHash + LSH from datasketch).

``duplicate_groups(texts, cfg)`` clusters texts that are equal after normalization, or whose
estimated Jaccard similarity of word shingles reaches the threshold; the caller keeps the
best-scored member of each group and drops the rest (see ``keep_best``).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class DedupConfig(BaseModel):
    """Duplicate instructions and responses across the whole dataset."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    instructions: bool = True
    """Drop records whose instruction duplicates another record's (the best-scored record stays)."""
    responses: bool = True
    """Drop responses that duplicate another kept response anywhere in the dataset (best-scored stays)."""
    near: bool = True
    """Also near-duplicates (MinHash/LSH); False: exact duplicates after normalization only."""
    threshold: float = Field(0.8, gt=0, le=1)
    """Estimated Jaccard similarity of word shingles at or above which two texts are near-duplicates."""
    shingle_words: int = Field(3, ge=1)
    """Words per shingle. Texts shorter than this are one shingle."""
    num_perm: int = Field(128, ge=16)
    """MinHash permutations (more: a more exact similarity estimate, slower)."""
    seed: int = 1
    """MinHash seed (fixed, so the same data gives the same groups on every run)."""


_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalize(text: str) -> str:
    """Text compared for exact duplicates: NFKC, case-folded, punctuation dropped, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def shingles(text: str, n: int) -> set[str]:
    words = normalize(text).split()
    if len(words) <= n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def duplicate_groups(texts: Sequence[str], cfg: DedupConfig) -> list[list[int]]:
    """Groups (index lists, each of 2+ members, in index order) of duplicate texts."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        key = hashlib.blake2b(normalize(text).encode(), digest_size=16).hexdigest()
        if key in first:
            union(first[key], i)
        else:
            first[key] = i
    if cfg.near and len(first) > 1:
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        hashes: dict[int, Any] = {}
        reps = sorted(first.values())  # one representative per exact group
        # bulk() draws the permutations once for all texts (a MinHash per text would redraw them).
        sigs = MinHash.bulk([[s.encode() for s in shingles(texts[i], cfg.shingle_words)] for i in reps],
                            num_perm=cfg.num_perm, seed=cfg.seed)
        for i, m in zip(reps, sigs, strict=True):
            for j in lsh.query(m):
                # LSH returns candidates; confirm with the estimated similarity to cut false positives.
                if m.jaccard(hashes[j]) >= cfg.threshold:
                    union(j, i)
            lsh.insert(i, m)
            hashes[i] = m
    groups: dict[int, list[int]] = {}
    for i in range(len(texts)):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def duplicate_groups_within(texts: Sequence[str], keys: Sequence[Any], cfg: DedupConfig) -> list[list[int]]:
    """``duplicate_groups`` among the texts that share a key (e.g. a thinking mode): a text is never a duplicate of
    one with another key."""
    by_key: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    groups = []
    for members in by_key.values():
        groups += [[members[g] for g in group] for group in duplicate_groups([texts[i] for i in members], cfg)]
    return sorted(groups)


def keep_best(groups: list[list[int]], key: Callable[[int], Any]) -> dict[int, int]:
    """For each group, the members to drop -> the member kept (highest ``key``; ties: lowest index)."""
    dropped: dict[int, int] = {}
    for group in groups:
        best = max(group, key=lambda i: (key(i), -i))
        for i in group:
            if i != best:
                dropped[i] = best
    return dropped
