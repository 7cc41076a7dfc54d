"""Stage `generate`: instructions from seed chunks, with diverse prompt templates, via the vLLM pool.

Each seed gets ``n_per_seed`` requests, each from a different template for its source kind
(``configs/prompts/generate.yaml``), each asking for ONE instruction. The output is parsed
robustly (``stages.instruction_parsing``); malformed, empty, refused or duplicated candidates are
dropped and counted by reason. Every kept instruction gets a domain label from the taxonomy
(``configs/taxonomy.yaml``).

All candidates (kept and dropped, with the raw model output and the reason) are written to the
stage-internal dataset ``generate_candidates``, so drop counts survive a resume and can be
inspected; ``instructions`` holds the kept ones.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from critique.constraints import NO_CONSTRAINTS
from pipeline.records import INSTRUCTION_FIELDS, SOURCE_KINDS
from pipeline.run.stage import ModelRole, Stage, StageContext, record_seed
from pipeline.templates import TemplateError, chat_messages, check_template, load_yaml_file, render
from stages.instruction_parsing import instruction_key, parse_instruction
from stages.taxonomy import DEFAULT_TAXONOMY, label_domain, load_taxonomy

TASK_TYPES = ("qa", "howto", "code_write", "code_explain", "reasoning", "math", "writing")
PROMPT_FIELDS = {"text", "title", "question", "answer", "language"}
LANGUAGE_NAMES = {"python": "Python", "c": "C", "cpp": "C++", "javascript": "JavaScript", "typescript": "TypeScript",
                  "rust": "Rust", "go": "Go", "java": "Java", "shell": "shell", "ruby": "Ruby", "perl": "Perl"}


class GenerateConfig(BaseModel):
    """Instruction generation from seed chunks."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: ModelRole = "policy"
    """Model role (a `models.<role>` entry of the run config) that writes the instructions."""
    prompts: str = "configs/prompts/generate.yaml"
    """Prompt-template file (relative paths: current folder, then this repository)."""
    taxonomy: str = DEFAULT_TAXONOMY
    """Domain taxonomy file used to label every instruction."""
    n_per_seed: int = Field(2, ge=1, le=32)
    """Instructions requested per seed chunk (each from a different template when there are enough)."""
    task_types: list[Literal["qa", "howto", "code_write", "code_explain", "reasoning", "math", "writing"]] | None = None
    """Only use templates of these task types (None: all)."""
    temperature: float = Field(0.7, ge=0)
    """Sampling temperature of the generator."""
    top_p: float = Field(0.9, gt=0, le=1)
    """Nucleus sampling threshold."""
    max_tokens: int = Field(96, ge=8)
    """Longest generator output in tokens (an instruction is short; longer output is chatter)."""
    max_words: int = Field(120, ge=5)
    """Parsed instructions longer than this (without attached context) are dropped as too_long."""


@dataclass
class Template:
    """One instruction-generation template (see configs/prompts/generate.yaml)."""

    id: str
    task_type: str
    source_kinds: tuple[str, ...]
    expect: Literal["question", "task"]
    prompt: str
    instruction: str = "{instruction}"


def load_templates(path: str) -> tuple[str | None, list[Template]]:
    """(system prompt, templates) from a generate prompt file; every error names the file and entry."""
    data = load_yaml_file(path)
    system = data.get("system")
    entries = data.get("templates")
    if not isinstance(entries, list) or not entries:
        raise TemplateError(f"{path}: needs a non-empty list `templates`")
    templates, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"{path}: templates[{i}]"
        if not isinstance(entry, dict):
            raise TemplateError(f"{where}: must be a mapping")
        unknown = set(entry) - {"id", "task_type", "source_kinds", "expect", "prompt", "instruction"}
        missing = {"id", "task_type", "source_kinds", "prompt"} - set(entry)
        if unknown or missing:
            raise TemplateError(f"{where}: unknown keys {sorted(unknown)} / missing keys {sorted(missing)}")
        tid = str(entry["id"])
        if tid in seen:
            raise TemplateError(f"{where}: duplicate id {tid!r}")
        seen.add(tid)
        if entry["task_type"] not in TASK_TYPES:
            raise TemplateError(f"{where} ({tid}): task_type {entry['task_type']!r} not in {list(TASK_TYPES)}")
        kinds = tuple(entry["source_kinds"] or ())
        if not kinds or set(kinds) - set(SOURCE_KINDS):
            raise TemplateError(f"{where} ({tid}): source_kinds {list(kinds)} must be a subset of {list(SOURCE_KINDS)}")
        expect = entry.get("expect", "question")
        if expect not in ("question", "task"):
            raise TemplateError(f"{where} ({tid}): expect must be 'question' or 'task'")
        check_template(entry["prompt"], PROMPT_FIELDS, f"{where} ({tid}).prompt")
        instruction = entry.get("instruction") or "{instruction}"
        check_template(instruction, PROMPT_FIELDS | {"instruction"}, f"{where} ({tid}).instruction")
        if "instruction" not in {n for n in re.findall(r"{(\w+)}", instruction)}:
            raise TemplateError(f"{where} ({tid}).instruction must contain {{instruction}}")
        templates.append(Template(tid, entry["task_type"], kinds, expect, entry["prompt"], instruction))
    return system, templates


def instruction_id(text: str) -> str:
    """Stable, content-derived id of an instruction."""
    return "ins-" + hashlib.sha256(text.strip().encode()).hexdigest()[:16]


def _prompt_values(seed: dict) -> dict[str, str]:
    lang = seed.get("language") or ""
    return {"text": seed.get("text") or "", "title": seed.get("title") or "", "question": seed.get("question") or "",
            "answer": seed.get("answer") or "", "language": LANGUAGE_NAMES.get(lang, lang or "Python")}


def pick_templates(seed: dict, templates: list[Template], n: int, run_seed: int) -> list[Template]:
    """n templates for one seed: a seeded shuffle of those for its kind, cycled if n is larger."""
    eligible = [t for t in templates if seed["source_kind"] in t.source_kinds]
    if not eligible:
        return []
    order = random.Random(record_seed(run_seed, seed["id"], "templates")).sample(eligible, len(eligible))
    return [order[j % len(order)] for j in range(n)]


def generate_candidates(seeds: list[dict], cfg: GenerateConfig, pool, run_seed: int = 0) -> list[dict]:
    """Every candidate instruction for ``seeds``: kept ones have ``reject_reason`` None.

    Deterministic given the seeds, the config and the run seed (each request carries a seed).
    """
    from pipeline.engines.pool import ChatRequest

    system, templates = load_templates(cfg.prompts)
    if cfg.task_types:
        templates = [t for t in templates if t.task_type in cfg.task_types]
    taxonomy = load_taxonomy(cfg.taxonomy)
    plan: list[tuple[dict, Template, int]] = []
    for seed in seeds:
        for j, template in enumerate(pick_templates(seed, templates, cfg.n_per_seed, run_seed)):
            plan.append((seed, template, j))
    requests = [
        ChatRequest(messages=chat_messages(system, render(t.prompt, **_prompt_values(s))), n=1,
                    temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                    seed=record_seed(run_seed, s["id"], f"generate:{t.id}:{j}"))
        for s, t, j in plan
    ]
    results = pool.generate(requests)
    model = pool.config.model
    out = []
    seen: set[str] = set()
    for (seed, template, _), result in zip(plan, results, strict=True):
        raw = result.completions[0].text if result.completions else ""
        values = _prompt_values(seed)
        static_prompt = render(template.prompt, **dict.fromkeys(PROMPT_FIELDS, ""))
        attaches_context = "{text}" in template.instruction
        text, reason = parse_instruction(
            raw, template.expect, max_words=cfg.max_words, copy_of=seed.get("question"), prompt=static_prompt,
            allow_unseen_refs=attaches_context)
        if text is not None and not attaches_context and len(instruction_key(text)) > 20 and \
                instruction_key(text) in instruction_key(values["text"]):
            text, reason = None, "copy"  # a sentence lifted from the seed is not a new instruction
        if text is not None and result.completions and result.completions[0].finish_reason == "length" \
                and template.expect == "task" and not text.rstrip().endswith((".", "?", "!")):
            text, reason = None, "truncated"
        instruction = render(template.instruction, instruction=text, **values) if text is not None else None
        if instruction is not None:
            key = instruction_key(instruction)
            if key in seen:
                instruction, reason = None, "duplicate"
            else:
                seen.add(key)
        out.append({
            "id": instruction_id(instruction) if instruction else f"rejected-{seed['id']}-{template.id}-{len(out)}",
            "instruction": instruction or "",
            "domain": label_domain(text, taxonomy, template.task_type) if text is not None else "",
            "task_type": template.task_type, "seed_id": seed["id"], "source_kind": seed["source_kind"],
            "parent_id": None, "operator": None, "round": 0, "model": model, "template": template.id,
            "constraints": NO_CONSTRAINTS, "raw": raw, "reject_reason": reason,
        })
    return out


def select_kept(candidates: list[dict]) -> tuple[list[dict], dict[str, Any]]:
    """Kept instructions (duplicates across shards dropped) and the drop counts for the manifest."""
    reasons: Counter = Counter()
    by_template: dict[str, Counter] = {}
    kept, seen = [], set()
    for c in candidates:
        reason = c["reject_reason"]
        if reason is None and instruction_key(c["instruction"]) in seen:
            reason = "duplicate"
        stats = by_template.setdefault(c["template"], Counter())
        stats["requested"] += 1
        if reason is None:
            seen.add(instruction_key(c["instruction"]))
            kept.append({k: c[k] for k in INSTRUCTION_FIELDS})
            stats["kept"] += 1
        else:
            reasons[reason] += 1
    metrics = {
        "candidates": len(candidates), "instructions": len(kept),
        "yield": round(len(kept) / len(candidates), 4) if candidates else 0.0,
        "dropped": sum(reasons.values()), "dropped_by_reason": dict(reasons),
        "yield_by_template": {t: {"requested": s["requested"], "kept": s["kept"]} for t, s in sorted(by_template.items())},
        "domains": dict(Counter(r["domain"] for r in kept)),
    }
    return kept, metrics


def generate_instructions(seeds: list[dict], cfg: GenerateConfig, pool, run_seed: int = 0) -> tuple[list[dict], dict]:
    """Core of the stage without the runner: (kept instructions, metrics)."""
    return select_kept(generate_candidates(seeds, cfg, pool, run_seed))


def run(ctx: StageContext) -> None:
    cfg: GenerateConfig = ctx.config
    load_templates(cfg.prompts)  # fail on a bad template file before any engine starts
    load_taxonomy(cfg.taxonomy)
    seeds = ctx.read("seeds").to_list()
    pool = ctx.pool(cfg.model)
    candidates = ctx.map("generate_candidates", seeds,
                         lambda shard: generate_candidates(shard, cfg, pool, ctx.seed), desc="generate")
    kept, metrics = select_kept(candidates)
    ctx.write("instructions", kept)
    ctx.metrics.update(metrics)
    ctx.log.info("generate: %d of %d candidates kept; dropped %s", len(kept), len(candidates),
                 metrics["dropped_by_reason"])


STAGE = Stage(name="generate", inputs=("seeds",), outputs=("instructions",), config_cls=GenerateConfig, run=run)
