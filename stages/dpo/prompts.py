"""The prompts of online DPO: rows from `evolved` and from stdlib docstrings, the seeded split into training
and held-out prompts, and each round's batch."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence, Set
from dataclasses import dataclass

from critique.constraints import NO_CONSTRAINTS
from pipeline.records import check_disjoint, source_item
from pipeline.run.stage import record_seed
from pipeline.thinking import (
    MODE_FIELD,
    NO_THINK,
    THINK,
    ThinkFormat,
    apply_switch,
    render_answer,
    split_reasoning,
)
from stages.dpo.config import OnlineDPOConfig


def prompt_rows(evolved: Sequence[dict], source: str = "evolved") -> list[dict]:
    """{id, messages, source, item, constraints} per unique instruction of `evolved` (the first record of a
    duplicate wins); ``item`` is its source item (``pipeline.records.source_item``: the seed it grew from),
    ``constraints`` its verifiable constraints (``critique.constraints``; ``"[]"`` when none)."""
    out, seen = [], set()
    for i, row in enumerate(evolved):
        text = row.get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"evolved record {row.get('id', i)!r}: field 'instruction' is missing or empty; "
                             "fix: rerun the evolve stage (posttrain stage evolve ... --force)")
        if text in seen:
            continue
        seen.add(text)
        rid = str(row.get("id") or hashlib.sha1(text.encode()).hexdigest()[:16])
        out.append({"id": rid, "messages": [{"role": "user", "content": text}], "source": source,
                    "item": source_item({"seed_id": row.get("seed_id"), "id": rid}),
                    "constraints": row.get("constraints") or NO_CONSTRAINTS})
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


@dataclass
class PromptSplit:
    """The prompts of online DPO, kept apart by source item from each other and from the reward model's data."""

    train: list[dict]
    """Training prompts, in the seeded order rounds draw them."""
    held_out: list[dict]
    """Held-out prompts: no item of theirs is trained on (reward model, DPO prompts, offline pairs, SFT replay)."""
    excluded: int
    """Prompts dropped because the reward model trained on their item."""


def split_prompts(prompts: Sequence[dict], cfg: OnlineDPOConfig, seed: int, reward_items: Set[str] = frozenset(),
                  trained_items: Set[str] = frozenset()) -> PromptSplit:
    """Training and held-out prompts, split by source item in a seeded order.

    Prompts whose item the reward model trained on (``reward_items``) are dropped: the policy would be rewarded
    for what the reward model memorized. Held-out prompts come from whole items that nothing trains on: not the
    reward model, not another DPO prompt, not ``trained_items`` (the offline pairs and SFT replay rows the policy
    trains on in the rounds); the split is checked with ``pipeline.records.check_disjoint``. Rejects a config
    that would reuse prompts.
    """
    usable = [p for p in prompts if p["item"] not in reward_items]
    groups: dict[str, list[dict]] = {}
    for p in sorted(usable, key=lambda p: record_seed(seed, p["id"], "dpo-prompt-order")):
        groups.setdefault(p["item"], []).append(p)
    held: list[dict] = []
    for item in sorted(groups, key=lambda i: record_seed(seed, i, "dpo-item-order")):
        if item not in trained_items and len(held) + len(groups[item]) <= cfg.eval_prompts:
            held.extend(groups.pop(item))
    train = sorted((p for g in groups.values() for p in g), key=lambda p: record_seed(seed, p["id"], "dpo-prompt-order"))
    held_items = {p["item"] for p in held}
    check_disjoint({"reward-model training data": set(reward_items), "DPO training prompts": {p["item"] for p in train},
                    "held-out prompts": held_items})
    check_disjoint({"offline pairs and SFT replay": set(trained_items), "held-out prompts": held_items})
    need = cfg.rounds * cfg.prompts_per_round
    where = (f"{len(prompts)} distinct prompts, {len(prompts) - len(usable)} of them on items the reward model "
             f"trained on")
    if not train:
        raise ValueError(f"dpo has no training prompt left ({where}, {len(held)} held out); fix: lower "
                         "dpo.eval_prompts or give the DPO stage prompts the reward model did not train on")
    if need > len(train) and not cfg.reuse_prompts:
        raise ValueError(
            f"dpo needs {need} fresh prompts (rounds={cfg.rounds} x prompts_per_round={cfg.prompts_per_round}) but "
            f"has {len(train)} training prompts ({where}, {len(held)} held out); fix: lower dpo.rounds or "
            "dpo.prompts_per_round, generate more instructions, or set dpo.reuse_prompts: true")
    return PromptSplit(train=train, held_out=held, excluded=len(prompts) - len(usable))


def round_prompts(train: Sequence[dict], round_index: int, k: int) -> list[dict]:
    """The k prompts of round ``round_index`` (1-based): consecutive, wrapping around only when reuse is allowed
    (``split_prompts`` has checked that)."""
    start = (round_index - 1) * k
    return [train[(start + i) % len(train)] for i in range(min(k, len(train)))]


def assign_modes(prompts: Sequence[dict], think_ratio: float, fmt: ThinkFormat, seed: int) -> list[dict]:
    """Each prompt with its thinking ``mode`` (think when a seeded hash of its id falls under ``think_ratio``), the
    ``switch`` of the policy's template that the rollout applies and the template's ``empty_block`` (a fast sample
    asked through the template argument follows it, so its pair's answers are stored after it)."""
    out = []
    for p in prompts:
        unit = int.from_bytes(hashlib.sha256(f"{seed}:dpo-mode:{p['id']}".encode()).digest()[:8], "big") / 2**64
        out.append({**p, MODE_FIELD: THINK if unit < think_ratio else NO_THINK, "switch": fmt.switch,
                    "empty_block": fmt.empty_block})
    return out


def pair_in_mode(pair: dict, fmt: ThinkFormat) -> dict:
    """An offline pair of a thinking-mode answer record (it has ``mode``) as the policy's template writes that mode:
    the switch in the prompt when the template takes the text switch, each answer rendered for ``fmt`` (a fast one
    after the empty think block, as online fast samples are stored; a slow one's reasoning in think markers; a slow
    one without reasoning, a rejected side, as it is). A pair without a mode is returned as is."""
    mode = pair.get(MODE_FIELD)
    if not mode:
        return pair

    def render(messages: list[dict]) -> list[dict]:
        split = split_reasoning(messages[-1]["content"])
        if mode == THINK and not split.reasoning:
            return messages
        text = render_answer(split.reasoning if mode == THINK else None, split.final, mode, fmt)
        return [*messages[:-1], {**messages[-1], "content": text}]

    return {**pair, "prompt": apply_switch(pair["prompt"], mode, fmt)[0], "chosen": render(pair["chosen"]),
            "rejected": render(pair["rejected"])}
