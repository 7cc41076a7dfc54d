"""Test-only stages for the runner tests, loaded through ``plugins:`` in test run configs.

They do real work on real text that ships with Python (CPython's documentation topics,
``pydoc_data.topics``): ``docs`` collects topics, ``tokenize`` tokenizes them with the embedded
models' tokenizer through ``ctx.map`` (resumable shards), ``stats`` aggregates, ``lengths``
measures on Ray tasks (and can kill its own worker to test retries), ``gen`` generates with a
worker pool. The ``delay_s``/``crash_*``/``fail_*`` fields are test hooks, documented as such.

This module imports only light modules at the top so Ray workers that unpickle its functions
start fast.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from pipeline.run.stage import ModelRole, Stage, StageContext, record_seed


def _doc_id(topic: str) -> str:
    return hashlib.blake2b(topic.encode(), digest_size=8).hexdigest()


# -- docs: real text -------------------------------------------------------------------------------

class DocsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    limit: int = 40
    """Number of CPython documentation topics to take (in sorted order)."""
    max_chars: int = 2000
    """Characters kept per topic."""


def run_docs(ctx: StageContext) -> None:
    from pydoc_data.topics import topics

    names = sorted(topics)[: ctx.config.limit]
    ctx.write("docs", [{"id": _doc_id(n), "topic": n, "text": topics[n][: ctx.config.max_chars],
                        "source": f"pydoc_data.topics[{n!r}]"} for n in names])


DOCS_STAGE = Stage(name="docs", inputs=(), outputs=("docs",), config_cls=DocsConfig, run=run_docs)


# -- tokenize: resumable ctx.map -------------------------------------------------------------------

class TokenizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str = "tiny-moe"
    """Embedded model whose tokenizer is used."""
    head_tokens: int = 16
    """Token ids kept per record."""
    delay_s: float = 0.0
    """Test hook: seconds to wait after each shard, so a test can kill the run mid-stage."""
    fail_on_topic: str | None = None
    """Test hook: raise an error in the shard that holds this topic."""


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenize_shard(shard: list[dict], model_dir: str, head_tokens: int, seed: int, delay_s: float,
                   fail_on_topic: str | None) -> list[dict]:
    tok = _tokenizer(model_dir)
    out = []
    for r in shard:
        if r["topic"] == fail_on_topic:
            raise ValueError(f"test hook: failing on topic {fail_on_topic!r}")
        ids = tok(r["text"], add_special_tokens=False)["input_ids"]
        pick = ids[record_seed(seed, r["id"], "pick") % len(ids)] if ids else None
        out.append({"id": r["id"], "topic": r["topic"], "n_tokens": len(ids), "head": ids[:head_tokens],
                    "seeded_pick": pick})
    time.sleep(delay_s)
    return out


def run_tokenize(ctx: StageContext) -> None:
    from pipeline.models.catalog import resolve_model

    cfg: TokenizeConfig = ctx.config
    docs = ctx.read("docs").to_list()
    fn = functools.partial(tokenize_shard, model_dir=str(resolve_model(cfg.model)), head_tokens=cfg.head_tokens,
                           seed=ctx.seed, delay_s=cfg.delay_s, fail_on_topic=cfg.fail_on_topic)
    out = ctx.map("tokens", docs, fn, desc="tokenize")
    ctx.metrics["tokens"] = sum(r["n_tokens"] for r in out)


TOKENIZE_STAGE = Stage(name="tokenize", inputs=("docs",), outputs=("tokens",), config_cls=TokenizeConfig,
                       run=run_tokenize)


# -- stats: a downstream stage -----------------------------------------------------------------------

class StatsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    top: int = 3
    """Longest topics listed."""
    write: bool = True
    """Test hook: False returns without writing the declared output."""


def run_stats(ctx: StageContext) -> None:
    rows = ctx.read("tokens").to_list()
    if not ctx.config.write:
        return
    longest = sorted(rows, key=lambda r: -r["n_tokens"])[: ctx.config.top]
    ctx.write("token_stats", [{"records": len(rows), "tokens": sum(r["n_tokens"] for r in rows),
                               "longest": [r["topic"] for r in longest]}])
    ctx.log_metrics({"records": len(rows)}, step=0)


STATS_STAGE = Stage(name="stats", inputs=("tokens",), outputs=("token_stats",), config_cls=StatsConfig,
                    run=run_stats)


# -- lengths: shards on Ray tasks, optionally killing their own worker -------------------------------------

class LengthsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    crash_shard: int = 1
    """Test hook: index of the shard whose Ray worker kills itself (SIGKILL) ..."""
    crash_times: int = 0
    """... this many times before the shard succeeds (0: never)."""


def lengths_shard(shard: list[dict], marker_dir: str, crash_id: str | None, crash_times: int, seed: int) -> list[dict]:
    if crash_id is not None and shard[0]["id"] == crash_id:
        done = len(list(Path(marker_dir).glob("crash-*")))
        if done < crash_times:
            Path(marker_dir, f"crash-{done}").write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # a real worker death, not an exception
    return [{"id": r["id"], "chars": len(r["text"]), "lines": r["text"].count("\n") + 1,
             "seed": record_seed(seed, r["id"]), "worker_pid": os.getpid()} for r in shard]


def run_lengths(ctx: StageContext) -> None:
    cfg: LengthsConfig = ctx.config
    docs = ctx.read("docs").to_list()
    size = ctx.resources.shard_size or ctx.run_config.shard_size
    crash_at = cfg.crash_shard * size
    crash_id = docs[crash_at]["id"] if cfg.crash_times and crash_at < len(docs) else None
    fn = functools.partial(lengths_shard, marker_dir=str(ctx.work_dir), crash_id=crash_id,
                           crash_times=cfg.crash_times, seed=ctx.seed)
    ctx.map("lengths", docs, fn)
    ctx.metrics["driver_pid"] = os.getpid()
    ctx.metrics["call_pid"] = ctx.call(os.getpid)  # where ctx.call runs (a Ray task when remote)


LENGTHS_STAGE = Stage(name="lengths", inputs=("docs",), outputs=("lengths",), config_cls=LengthsConfig,
                      run=run_lengths)


# -- gen: worker pools through ctx.pool -------------------------------------------------------------------

class GenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: ModelRole = "tiny"
    """Model role that generates."""
    same_model: ModelRole = "tiny_again"
    """A second role (configured like the first in the tests: it must get the same pool)."""
    records: int = 6
    """Docs to generate for."""
    max_tokens: int = 8
    """Tokens per completion."""
    fail_times: int = 0
    """Test hook: the second shard raises an error this many times (counted in the work folder)."""


def run_gen(ctx: StageContext) -> None:
    from pipeline.engines.pool import ChatRequest

    cfg: GenConfig = ctx.config
    pool = ctx.pool(cfg.model)
    ctx.metrics["shared_pool"] = ctx.pool(cfg.same_model) is pool
    docs = ctx.read("docs").to_list()[: cfg.records]
    size = ctx.resources.shard_size or ctx.run_config.shard_size
    fail_id = docs[size]["id"] if len(docs) > size else None
    markers = ctx.work_dir

    def gen(shard: list[dict]) -> list[dict]:
        if shard[0]["id"] == fail_id and len(list(markers.glob("fail-*"))) < cfg.fail_times:
            (markers / f"fail-{len(list(markers.glob('fail-*')))}").touch()
            raise RuntimeError("test hook: failing the second shard")
        reqs = [ChatRequest(messages=[{"role": "user", "content": f"Explain {r['topic']}."}], max_tokens=cfg.max_tokens,
                            temperature=1.0, seed=record_seed(ctx.seed, r["id"])) for r in shard]
        return [{"id": r["id"], "text": res.completions[0].text, "tokens": res.completions[0].token_ids}
                for r, res in zip(shard, pool.generate(reqs), strict=True)]

    ctx.map("gens", docs, gen)
    ctx.metrics["pool_actors"] = len(pool.actors)


GEN_STAGE = Stage(name="gen", inputs=("docs",), outputs=("gens",), config_cls=GenConfig, run=run_gen)

ALL = [DOCS_STAGE, TOKENIZE_STAGE, STATS_STAGE, LENGTHS_STAGE, GEN_STAGE]
