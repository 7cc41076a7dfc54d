"""Seed records from documents: chunk each source to the token budget, drop exact and near duplicates across
sources, sample each source's share, give each chunk a stable id."""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections import Counter
from typing import Any

from pipeline.records import SEED_FIELDS, SOURCE_KINDS
from stages.seeds.chunking import chunk_code, chunk_prose, fit_qa, token_counter
from stages.seeds.config import SeedsConfig, SeedSource
from stages.seeds.loaders import Document, load_documents, source_files
from stages.seeds.skips import BAD_INPUT, LONG_QUESTION, SHORT_CHUNK, SeedSourceError, SkipLog, summary_line

log = logging.getLogger(__name__)

NUM_PERM = 128
"""MinHash permutations of the near-duplicate signatures."""


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
                skips.skip(doc.source, LONG_QUESTION, f"(chunk_tokens {cfg.chunk_tokens})")
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
                "question": question, "answer": answer, "encoding": doc.encoding,
            })
    if records:  # exact counts, after joining units
        for rec, n in zip(records, count([r["text"] for r in records]), strict=True):
            rec["n_tokens"] = n
    kept = []
    for rec in records:
        if rec["n_tokens"] < cfg.min_chunk_tokens:
            skips.skip(rec["source"], SHORT_CHUNK, f"({rec['n_tokens']} < {cfg.min_chunk_tokens})")
            continue
        rec["id"] = seed_id(source.kind, rec["text"])
        kept.append({k: rec[k] for k in SEED_FIELDS})
    return kept


def dedup_key(text: str) -> str:
    """Exact-duplicate key: the hash of the text with whitespace and case normalized."""
    return hashlib.sha256(_normalized(text).encode()).hexdigest()


def minhash(text: str):
    """MinHash of the text's word 3-grams (datasketch, 128 permutations, seed 1): the near-duplicate signature.
    Computed where the chunk is made (in the driver, or in a Ray Data task), compared in the driver."""
    from datasketch import MinHash

    words = _normalized(text).split()
    mh = MinHash(num_perm=NUM_PERM, seed=1)
    mh.update_batch([" ".join(words[j:j + 3]).encode() for j in range(max(1, len(words) - 2))])
    return mh


def dedup(records: list[dict], threshold: float | None, signatures: list | None = None) -> tuple[list[dict], int, int]:
    """Drop exact (normalized text) and near duplicates, keeping the first; returns (kept, exact, near).

    Near duplicates use datasketch's MinHash LSH (a maintained implementation of the standard
    method) over word 3-grams. ``signatures``: the records' MinHashes when computed elsewhere (``minhash``).
    """
    seen: set[str] = set()
    unique = []
    exact = 0
    for i, rec in enumerate(records):
        key = dedup_key(rec["text"])
        if key in seen:
            exact += 1
            continue
        seen.add(key)
        unique.append(i)
    if threshold is None:
        return [records[i] for i in unique], exact, 0
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    kept = []
    near = 0
    for n, i in enumerate(unique):
        mh = signatures[i] if signatures is not None else minhash(records[i]["text"])
        if lsh.query(mh):
            near += 1
            continue
        lsh.insert(str(n), mh)
        kept.append(records[i])
    return kept, exact, near


def _sample(records: list[dict], k: int | None, salt: str) -> list[dict]:
    """A seeded sample of k records, kept in their original order (reruns pick the same ones)."""
    if k is None or len(records) <= k:
        return records
    picked = sorted(random.Random(salt).sample(range(len(records)), k))
    return [records[i] for i in picked]


def warn_bad_input(source: SeedSource, skips: SkipLog) -> None:
    """One console warning for a source whose input was partly broken (the details are in the manifest)."""
    bad = skips.bad_input()
    if bad:
        first = next(e for r, e in skips.shown if r in BAD_INPUT)
        log.warning("seed source %s: skipped %d input(s) for bad input: %s (e.g. %s); see the seeds manifest",
                    source.label(), bad, summary_line(skips), first)


def require_chunks(source: SeedSource, chunks: list[dict], skips: SkipLog) -> list[dict]:
    """``chunks``, unless there are none: a source that gives nothing usable is an error naming it."""
    if not chunks:
        detail = "; ".join(skips.examples[:5]) or "no files matched"
        raise SeedSourceError(
            f"seed source {source.label()} ({source.kind}) gave no usable text from "
            f"{source.paths or source.dataset or source.module}: {detail}; "
            "fix: point it at readable files of that kind or remove it from stages.seeds.sources")
    return chunks


def read_in_driver(cfg: SeedsConfig) -> list[tuple[SeedSource, list[dict], SkipLog, int]]:
    """Every source read and chunked in this process: (source, chunk records, skips, documents)."""
    out = []
    for source in cfg.sources:
        skips = SkipLog()
        docs = load_documents(source, skips)
        chunks = chunk_documents(docs, source, cfg, skips) if docs else []
        out.append((source, require_chunks(source, chunks, skips), skips, len(docs)))
    return out


def use_ray_data(cfg: SeedsConfig) -> bool:
    """Whether the sources are read on Ray Data: ``reader``, or for auto the matched files' total size."""
    if cfg.reader != "auto":
        return cfg.reader == "ray_data"
    total = 0
    for source in cfg.sources:
        for path in source_files(source, SkipLog()):
            try:
                total += path.stat().st_size
            except OSError:
                continue
            if total >= cfg.ray_data_min_bytes:
                return True
    return False


def build_seeds(cfg: SeedsConfig, seed: int = 0) -> tuple[list[dict], dict[str, Any]]:
    """Read, chunk and dedup every source; returns (seed records, metrics for the manifest).

    Reading and chunking run in this process or on Ray Data (``SeedsConfig.reader``); both give the same records
    in the same order, so dedup, sampling and ids are the same. Raises SeedSourceError naming the source when one
    source yields nothing usable.
    """
    signatures = None
    if use_ray_data(cfg):
        from stages.seeds.ray_reader import read_on_ray_data

        by_source, signatures = read_on_ray_data(cfg)
        reader = "ray_data"
    else:
        by_source = read_in_driver(cfg)
        reader = "driver"
    all_skips = SkipLog()
    per_source: dict[str, dict[str, Any]] = {}
    for source, chunks, skips, n_docs in by_source:
        all_skips.merge(skips)
        warn_bad_input(source, skips)
        per_source[source.label()] = {"kind": source.kind, "documents": n_docs, "chunks": len(chunks),
                                      "skipped": skips.total(), "skipped_by_reason": dict(skips.counts),
                                      "skipped_examples": skips.examples_by_reason(),
                                      "encodings": dict(Counter(str(r["encoding"]) for r in chunks))}
        log.info("seed source %s: %d documents, %d chunks, %d skipped", source.label(), n_docs, len(chunks),
                 skips.total())
    flat = [rec for _, chunks, _, _ in by_source for rec in chunks]
    unique, exact, near = dedup(flat, cfg.near_dup_threshold, signatures)
    survivors = {id(r) for r in unique}  # the record objects dedup kept
    records: list[dict] = []
    for source, chunks, _, _ in by_source:
        kept = [r for r in chunks if id(r) in survivors]
        sampled = _sample(kept, source.max_chunks, f"{seed}:{source.label()}")
        per_source[source.label()]["kept"] = len(sampled)
        records.extend(sampled)
    records = _sample(records, cfg.max_seeds, f"{seed}:all")
    metrics = {
        "seeds": len(records), "reader": reader,
        "seeds_by_kind": {k: sum(r["source_kind"] == k for r in records) for k in SOURCE_KINDS},
        "duplicates_exact": exact, "duplicates_near": near,
        "skipped": all_skips.total(), "skipped_by_reason": dict(all_skips.counts),
        "bad_inputs": all_skips.bad_input(), "skipped_examples": all_skips.examples_by_reason(),
        "sources": per_source,
    }
    return records, metrics
