"""The prompts of online DPO: rows from `evolved` and from stdlib docstrings, the seeded split into training
and held-out prompts, and each round's batch."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from pipeline.run.stage import record_seed
from stages.dpo.config import OnlineDPOConfig


def prompt_rows(evolved: Sequence[dict], source: str = "evolved") -> list[dict]:
    """{id, messages, source} per unique instruction of `evolved` (the first record of a duplicate wins)."""
    out, seen = [], set()
    for i, row in enumerate(evolved):
        text = row.get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"evolved record {row.get('id', i)!r}: field 'instruction' is missing or empty; "
                             "fix: rerun the evolve stage (posttrain stage evolve ... --force)")
        if text in seen:
            continue
        seen.add(text)
        out.append({"id": str(row.get("id") or hashlib.sha1(text.encode()).hexdigest()[:16]),
                    "messages": [{"role": "user", "content": text}], "source": source})
    return out


def stdlib_prompt_rows(n: int) -> list[dict]:
    """Prompt rows about the last ``n`` functions of ``stdlib_docs()`` (see `OnlineDPOConfig.stdlib_prompts`)."""
    from reward.stdlib_pairs import prompt_records, stdlib_docs

    if n == 0:
        return []
    docs = stdlib_docs()
    if n > len(docs):
        raise ValueError(f"dpo.stdlib_prompts={n} but this Python has {len(docs)} documented stdlib functions; "
                         f"fix: set dpo.stdlib_prompts <= {len(docs)}")
    return prompt_rows(prompt_records([name for name, _ in docs[-n:]]), source="stdlib")


def split_prompts(prompts: Sequence[dict], cfg: OnlineDPOConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(training prompts, held-out prompts) in a seeded order; rejects a config that would reuse prompts."""
    order = sorted(prompts, key=lambda p: record_seed(seed, p["id"], "dpo-prompt-order"))
    held, train = order[:cfg.eval_prompts], order[cfg.eval_prompts:]
    need = cfg.rounds * cfg.prompts_per_round
    if not train:
        raise ValueError(f"evolved has {len(prompts)} distinct instructions and dpo.eval_prompts={cfg.eval_prompts} "
                         "holds them all out; fix: lower dpo.eval_prompts")
    if need > len(train) and not cfg.reuse_prompts:
        raise ValueError(
            f"dpo needs {need} fresh prompts (rounds={cfg.rounds} x prompts_per_round={cfg.prompts_per_round}) but "
            f"evolved has {len(prompts)} distinct instructions, {len(train)} after holding out "
            f"eval_prompts={cfg.eval_prompts}; fix: lower dpo.rounds or dpo.prompts_per_round, generate more "
            "instructions, or set dpo.reuse_prompts: true")
    return train, held


def round_prompts(train: Sequence[dict], round_index: int, k: int) -> list[dict]:
    """The k prompts of round ``round_index`` (1-based): consecutive, wrapping around only when reuse is allowed
    (``split_prompts`` has checked that)."""
    start = (round_index - 1) * k
    return [train[(start + i) % len(train)] for i in range(min(k, len(train)))]
