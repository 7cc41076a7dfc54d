"""Seed records from documents: chunk each source to the token budget, drop exact and near duplicates across
sources, sample each source's share, give each chunk a stable id."""

from __future__ import annotations

import hashlib
import logging
import random
import re
from typing import Any

from pipeline.records import SEED_FIELDS, SOURCE_KINDS
from stages.seeds.chunking import chunk_code, chunk_prose, fit_qa, token_counter
from stages.seeds.config import SeedsConfig, SeedSource
from stages.seeds.files import Document, SeedSourceError, SkipLog
from stages.seeds.loaders import load_documents

log = logging.getLogger(__name__)


def seed_id(kind: str, text: str) -> str:
    """Stable, content-derived id: the same chunk text of the same kind always gets the same id."""
    return "seed-" + hashlib.sha256(f"{kind}\n{text.strip()}".encode()).hexdigest()[:16]


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def chunk_documents(docs: list[Document], source: SeedSource, cfg: SeedsConfig, skips: SkipLog) -> list[dict]:
    """Seed records (not yet deduped) for one source's documents."""
    count = token_counter(cfg.tokenizer)
    records = []
    for doc in docs:
        if source.kind == "web_qa":
            text, answer = fit_qa(doc.question or "", doc.answer or "", cfg.chunk_tokens, count)
            if not answer:
                skips.skip(doc.source, f"question alone exceeds chunk_tokens ({cfg.chunk_tokens})")
                continue
            pieces = [(text, None, count([text])[0], doc.question, answer)]
        else:
            chunker = chunk_code if source.kind == "code" else chunk_prose
            pieces = [(c.text, c.title or doc.title, c.n_tokens, None, None)
                      for c in chunker(doc.text, cfg.chunk_tokens, count)]
        for k, (text, title, _, question, answer) in enumerate(pieces):
            records.append({
                "text": text, "source_kind": source.kind,
                "source": doc.source if len(pieces) == 1 else f"{doc.source}#chunk{k}",
                "license": source.license, "title": title or doc.title, "language": doc.language,
                "question": question, "answer": answer,
            })
    if records:  # exact counts, after joining units
        for rec, n in zip(records, count([r["text"] for r in records]), strict=True):
            rec["n_tokens"] = n
    kept = []
    for rec in records:
        if rec["n_tokens"] < cfg.min_chunk_tokens:
            skips.skip(rec["source"], f"chunk shorter than min_chunk_tokens ({rec['n_tokens']} < {cfg.min_chunk_tokens})")
            continue
        rec["id"] = seed_id(source.kind, rec["text"])
        kept.append({k: rec[k] for k in SEED_FIELDS})
    return kept


def dedup(records: list[dict], threshold: float | None) -> tuple[list[dict], int, int]:
    """Drop exact (normalized text) and near duplicates, keeping the first; returns (kept, exact, near).

    Near duplicates use datasketch's MinHash LSH (a maintained implementation of the standard
    method) over word 3-grams.
    """
    seen: set[str] = set()
    unique = []
    exact = 0
    for rec in records:
        key = hashlib.sha256(_normalized(rec["text"]).encode()).hexdigest()
        if key in seen:
            exact += 1
            continue
        seen.add(key)
        unique.append(rec)
    if threshold is None:
        return unique, exact, 0
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    kept = []
    near = 0
    for i, rec in enumerate(unique):
        words = _normalized(rec["text"]).split()
        shingles = {" ".join(words[j:j + 3]).encode() for j in range(max(1, len(words) - 2))}
        mh = MinHash(num_perm=128, seed=1)
        mh.update_batch(list(shingles))
        if lsh.query(mh):
            near += 1
            continue
        lsh.insert(str(i), mh)
        kept.append(rec)
    return kept, exact, near


def _sample(records: list[dict], k: int | None, salt: str) -> list[dict]:
    """A seeded sample of k records, kept in their original order (reruns pick the same ones)."""
    if k is None or len(records) <= k:
        return records
    picked = sorted(random.Random(salt).sample(range(len(records)), k))
    return [records[i] for i in picked]


def build_seeds(cfg: SeedsConfig, seed: int = 0) -> tuple[list[dict], dict[str, Any]]:
    """Read, chunk and dedup every source; returns (seed records, metrics for the manifest).

    Raises SeedSourceError naming the source when one source yields nothing usable.
    """
    all_skips = SkipLog()
    per_source: dict[str, dict[str, Any]] = {}
    by_source: list[tuple[SeedSource, list[dict]]] = []
    for source in cfg.sources:
        skips = SkipLog()
        docs = load_documents(source, skips)
        chunks = chunk_documents(docs, source, cfg, skips) if docs else []
        all_skips.merge(skips)
        per_source[source.label()] = {"kind": source.kind, "documents": len(docs), "chunks": len(chunks),
                                      "skipped": skips.total(), "skipped_by_reason": dict(skips.counts)}
        if not chunks:
            detail = "; ".join(skips.examples[:5]) or "no files matched"
            raise SeedSourceError(
                f"seed source {source.label()} ({source.kind}) gave no usable text from "
                f"{source.paths or source.dataset or source.module}: {detail}; "
                "fix: point it at readable files of that kind or remove it from stages.seeds.sources")
        log.info("seed source %s: %d documents, %d chunks, %d skipped", source.label(), len(docs), len(chunks),
                 skips.total())
        by_source.append((source, chunks))
    flat = [rec for _, chunks in by_source for rec in chunks]
    unique, exact, near = dedup(flat, cfg.near_dup_threshold)
    survivors = {id(r) for r in unique}  # the record objects dedup kept
    records: list[dict] = []
    for source, chunks in by_source:
        kept = [r for r in chunks if id(r) in survivors]
        sampled = _sample(kept, source.max_chunks, f"{seed}:{source.label()}")
        per_source[source.label()]["kept"] = len(sampled)
        records.extend(sampled)
    records = _sample(records, cfg.max_seeds, f"{seed}:all")
    metrics = {
        "seeds": len(records),
        "seeds_by_kind": {k: sum(r["source_kind"] == k for r in records) for k in SOURCE_KINDS},
        "duplicates_exact": exact, "duplicates_near": near,
        "skipped": all_skips.total(), "skipped_by_reason": dict(all_skips.counts),
        "skipped_examples": all_skips.examples[:20], "sources": per_source,
    }
    return records, metrics
