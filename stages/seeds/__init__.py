"""Stage `seeds`: read the seed corpora, chunk them to a token budget, dedup, give each chunk a stable id.

The embedded default reads only real text that installs with the packages this project already
needs (nothing hand-written):

- web: CPython's IDLE documentation page (``idlelib/help.html``, the docs.python.org page that
  ships in the standard library, with its navigation, sidebar and footer still in the HTML);
- web_qa: no package we install ships web QA pairs, so the closest real one: the XZ Utils FAQ
  (``/usr/share/doc/xz-utils/faq.txt.gz``, Debian package xz-utils, priority standard), read with the
  plain-text FAQ reader ('Q:'/'A:' blocks). JSONL/Parquet/`datasets` QA sources use the same path;
- code: modules of CPython's standard library (``{stdlib}/*.py``);
- book: CPython's language-reference topics (``pydoc_data.topics``, the text ``help()`` shows).

Bad input never stops a run and nothing is read twice: each real file once however many links lead to it,
any encoding (BOM, declared charset, UTF-8, detection), files of records streamed; what is skipped is counted
under a fixed list of reasons with a few examples each, and a source with broken input gets one console warning.

Modules: ``config`` (SeedSource, SeedsConfig), ``paths`` (globs, links), ``text`` (bytes to text), ``records``
(streamed rows), ``skips`` (reasons), ``loaders`` (documents per kind and file), ``chunking`` (token-budget chunks
at natural bounds), ``build`` (chunk, dedup, sample, ids), ``ray_reader`` (the same on Ray Data); this module
wires the stage.
"""

from __future__ import annotations

from pipeline.run.stage import Stage, StageContext
from stages.seeds.build import build_seeds, chunk_documents, dedup, seed_id
from stages.seeds.config import LANGUAGE_EXTENSIONS, SeedsConfig, SeedSource, default_sources
from stages.seeds.loaders import Document, load_documents
from stages.seeds.skips import SeedSourceError, SkipLog

__all__ = ["LANGUAGE_EXTENSIONS", "STAGE", "Document", "SeedSource", "SeedSourceError", "SeedsConfig", "SkipLog",
           "build_seeds", "chunk_documents", "dedup", "default_sources", "load_documents", "run", "seed_id"]


def run(ctx: StageContext) -> None:
    cfg: SeedsConfig = ctx.config
    records, metrics = build_seeds(cfg, seed=ctx.seed)
    ctx.write("seeds", records)
    ctx.metrics.update(metrics)
    ctx.log.info("seeds: %d records (%s); skipped %d inputs", len(records), metrics["seeds_by_kind"], metrics["skipped"])


STAGE = Stage(name="seeds", inputs=(), outputs=("seeds",), config_cls=SeedsConfig, run=run)
