"""Stage `evolve`: the recipe's three evolution operators, over configurable rounds and mix.

- clarity: rewrite an instruction to be clearer and more informative;
- harder: make it more difficult;
- expand: self-instruct augmentation for the domains that the taxonomy counts show are
  under-represented (their share below ``target_share``): a new instruction written from a few
  examples of that domain (or its description when it has none yet);
- constrain: add one to three verifiable constraints (``critique.constraints``: length, case, format,
  keywords, ...) to an instruction, written by code, not the model, and kept on the record
  (``constraints``) so the filter can check every answer against them. A constrained instruction is not
  evolved further (a model rewrite could drop a constraint the record still lists).

Round 1 evolves the generated instructions; round r evolves what round r-1 produced, so
instructions can get harder twice. Every evolved instruction records its lineage (parent id,
operator, round). Failed evolutions are eliminated and counted by reason: a copy of the parent,
empty output, a refusal or chatter, an answer instead of an instruction, a duplicate.

Each round is planned up front (operator per parent, target domains and few-shot examples for
expand), then the plan runs through the pool in resumable shards (``evolve_round_<r>``).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from critique import constraints as constraint_library
from pipeline.records import INSTRUCTION_FIELDS
from pipeline.run.stage import ModelRole, Stage, StageContext, record_seed
from pipeline.templates import TemplateError, chat_messages, check_template, load_yaml_file, render
from stages.generate import instruction_id
from stages.instruction_parsing import instruction_key, parse_instruction
from stages.taxonomy import DEFAULT_TAXONOMY, Taxonomy, domain_counts, expansion_targets, load_taxonomy

OPERATORS = ("clarity", "expand", "harder", "constrain")
MODEL_OPERATORS = ("clarity", "expand", "harder")
"""The operators the model runs (each has a prompt in the operator prompt file)."""
OPERATOR_FIELDS = {"instruction", "kind", "Kind", "domain", "description", "examples"}


class EvolveConfig(BaseModel):
    """Instruction evolution: clarity, low-resource domain expansion, difficulty."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: ModelRole = "policy"
    """Model role (a `models.<role>` entry of the run config) that rewrites instructions."""
    prompts: str = "configs/prompts/evolve.yaml"
    """Operator prompt file (relative paths: current folder, then this repository)."""
    taxonomy: str = DEFAULT_TAXONOMY
    """Domain taxonomy file: expand aims at its under-represented domains."""
    rounds: int = Field(1, ge=0, le=10)
    """Evolution rounds; round r evolves the instructions round r-1 produced (0: pass through)."""
    mix: dict[str, float] = Field(default_factory=lambda: {"clarity": 0.35, "harder": 0.35, "expand": 0.3})
    """Relative weight of each operator (clarity, harder, expand, constrain); 0 (or absent) disables one."""
    constraint_kinds: list[str] = Field(default_factory=lambda: list(constraint_library.KINDS))
    """Constraint kinds the constrain operator draws from (``critique.constraints.KINDS``)."""
    max_constraints: int = Field(3, ge=1, le=5)
    """Most constraints the constrain operator adds to one instruction (it draws 1..this many)."""
    fraction: float = Field(1.0, gt=0, le=1)
    """Share of each round's input instructions that get evolved (a seeded choice per instruction)."""
    examples: int = Field(3, ge=0, le=10)
    """Few-shot examples of the target domain shown to the expand operator."""
    max_input_words: int = Field(80, ge=5)
    """Instructions longer than this (e.g. with attached code or text) are kept but not evolved."""
    temperature: float = Field(0.7, ge=0)
    """Sampling temperature."""
    top_p: float = Field(0.9, gt=0, le=1)
    """Nucleus sampling threshold."""
    max_tokens: int = Field(128, ge=8)
    """Longest output in tokens."""
    max_words: int = Field(150, ge=5)
    """Evolved instructions longer than this are dropped as too_long."""
    copy_threshold: float = Field(0.9, gt=0, le=1)
    """Similarity to the parent (0..1, difflib ratio on normalized text) at which a rewrite counts as a copy."""

    @field_validator("mix")
    @classmethod
    def _check_mix(cls, mix: dict[str, float]) -> dict[str, float]:
        unknown = set(mix) - set(OPERATORS)
        if unknown:
            raise ValueError(f"unknown operator(s) {sorted(unknown)}; allowed: {list(OPERATORS)}")
        if any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        return mix

    @field_validator("constraint_kinds")
    @classmethod
    def _check_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = sorted(set(kinds) - set(constraint_library.KINDS))
        if unknown or not kinds:
            raise ValueError(f"unknown or no constraint kinds {unknown}; known: {list(constraint_library.KINDS)}")
        return kinds


def load_operator_prompts(path: str) -> tuple[str | None, dict[str, dict[str, str]]]:
    """(system prompt, operator -> {prompt, prompt_no_examples}); errors name the file and entry."""
    data = load_yaml_file(path)
    ops = data.get("operators")
    if not isinstance(ops, dict):
        raise TemplateError(f"{path}: needs a mapping `operators` with {list(MODEL_OPERATORS)}")
    missing = set(MODEL_OPERATORS) - set(ops)
    if missing:
        raise TemplateError(f"{path}: operators {sorted(missing)} missing")
    out: dict[str, dict[str, str]] = {}
    for name in MODEL_OPERATORS:
        entry = ops[name]
        if not isinstance(entry, dict) or "prompt" not in entry:
            raise TemplateError(f"{path}: operators.{name} needs a `prompt`")
        for key, value in entry.items():
            if key not in ("prompt", "prompt_no_examples"):
                raise TemplateError(f"{path}: operators.{name}: unknown key {key!r}")
            check_template(value, OPERATOR_FIELDS, f"{path}: operators.{name}.{key}")
        out[name] = {"prompt": entry["prompt"], "prompt_no_examples": entry.get("prompt_no_examples", entry["prompt"])}
    return data.get("system"), out


def _kind(instruction: str) -> str:
    return "question" if instruction.rstrip().endswith("?") else "task"


def _task_type_for(domain: str, taxonomy: Taxonomy) -> str:
    """The task type an expand instruction counts as: the first one the taxonomy maps to its domain."""
    return next((t for t, d in taxonomy.task_types.items() if d == domain), "qa")


def plan_round(inputs: list[dict], everything: list[dict], cfg: EvolveConfig, taxonomy: Taxonomy,
               run_seed: int, round_no: int) -> tuple[list[dict], dict[str, int]]:
    """The jobs of one round, decided before any generation (so shards are deterministic).

    ``inputs``: instructions this round evolves; ``everything``: all instructions so far (for the
    domain counts and the expand examples). Returns (jobs, counts of inputs not evolved by reason).
    """
    ops = [op for op in OPERATORS if cfg.mix.get(op, 0) > 0]
    weights = [cfg.mix[op] for op in ops]
    skipped: Counter = Counter()
    chosen: list[tuple[dict, str]] = []
    for rec in inputs:
        rng = random.Random(record_seed(run_seed, rec["id"], f"evolve:{round_no}"))
        if constraint_library.record_constraints(rec):
            skipped["constrained"] += 1
            continue
        if rng.random() >= cfg.fraction:
            skipped["not_selected"] += 1
            continue
        op = rng.choices(ops, weights)[0]
        if op != "expand" and len(rec["instruction"].split()) > cfg.max_input_words:
            skipped["too_long_to_evolve"] += 1
            continue
        chosen.append((rec, op))
    n_expand = sum(op == "expand" for _, op in chosen)
    targets = expansion_targets(domain_counts((r["domain"] for r in everything), taxonomy), taxonomy, n_expand)
    target_list = [d for d in sorted(targets, key=lambda d: -targets[d]) for _ in range(targets[d])]
    short = [r for r in everything if len(r["instruction"].split()) <= cfg.max_input_words]
    jobs = []
    expand_i = 0
    for rec, op in chosen:
        job = {"operator": op, "round": round_no, "parent": {k: rec.get(k) for k in INSTRUCTION_FIELDS},
               "target_domain": rec["domain"], "examples": [], "example_ids": []}
        if op == "expand":
            domain = target_list[expand_i]
            expand_i += 1
            pool = [r for r in short if r["domain"] == domain]
            rng = random.Random(record_seed(run_seed, rec["id"], f"expand-examples:{round_no}"))
            examples = rng.sample(pool, min(cfg.examples, len(pool)))
            job.update(target_domain=domain, examples=[e["instruction"] for e in examples],
                       example_ids=[e["id"] for e in examples])
        if op == "constrain":
            rng = random.Random(record_seed(run_seed, rec["id"], f"constrain:{round_no}"))
            job["constraints"] = constraint_library.sample_constraints(rec["instruction"], rng, cfg.constraint_kinds,
                                                                       cfg.max_constraints)
        jobs.append(job)
    return jobs, dict(skipped)


def _job_prompt(job: dict, prompts: dict[str, dict[str, str]], taxonomy: Taxonomy) -> str:
    parent = job["parent"]["instruction"]
    kind = _kind(parent)
    domain = job["target_domain"]
    description = taxonomy.domains[domain].description if domain in taxonomy.domains else domain
    examples = "\n".join(f"{i}. {e}" for i, e in enumerate(job["examples"], start=1))
    key = "prompt" if job["operator"] != "expand" or job["examples"] else "prompt_no_examples"
    return render(prompts[job["operator"]][key], instruction=parent, kind=kind, Kind=kind.capitalize(),
                  domain=domain, description=description, examples=examples)


def constrain_candidate(job: dict) -> dict:
    """The constrain operator's candidate: the parent with its job's constraints appended (no model call)."""
    parent = job["parent"]
    text = constraint_library.constrained_instruction(parent["instruction"], job["constraints"])
    return {**{k: parent.get(k) for k in INSTRUCTION_FIELDS}, "id": instruction_id(text), "instruction": text,
            "parent_id": parent["id"], "operator": "constrain", "round": job["round"], "model": None,
            "template": "evolve:constrain", "constraints": constraint_library.dump(job["constraints"]), "raw": "",
            "reject_reason": None}


def evolve_jobs(jobs: list[dict], cfg: EvolveConfig, pool, run_seed: int = 0) -> list[dict]:
    """Run planned jobs (the model's through the pool); one candidate per job, in job order (``reject_reason``
    None when kept)."""
    from pipeline.engines.pool import ChatRequest

    by_model = [job for job in jobs if job["operator"] != "constrain"]
    done = {id(job): constrain_candidate(job) for job in jobs if job["operator"] == "constrain"}
    if not by_model:
        return [done[id(job)] for job in jobs]
    system, prompts = load_operator_prompts(cfg.prompts)
    taxonomy = load_taxonomy(cfg.taxonomy)
    texts = [_job_prompt(job, prompts, taxonomy) for job in by_model]
    requests = [ChatRequest(messages=chat_messages(system, text), n=1, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_tokens=cfg.max_tokens,
                            seed=record_seed(run_seed, job["parent"]["id"], f"evolve:{job['round']}:{job['operator']}"))
                for job, text in zip(by_model, texts, strict=True)]
    results = pool.generate(requests)
    model = pool.config.model
    for job, result in zip(by_model, results, strict=True):
        parent = job["parent"]
        op = job["operator"]
        raw = result.completions[0].text if result.completions else ""
        static = render(prompts[op]["prompt"], **dict.fromkeys(OPERATOR_FIELDS, ""))
        text, reason = parse_instruction(
            raw, "any", max_words=cfg.max_words, prompt=static, allow_unseen_refs=False,
            copy_of=parent["instruction"] if op != "expand" else None, copy_threshold=cfg.copy_threshold)
        if text is not None and op == "expand":
            # self-instruct must not hand back one of its examples
            if any(instruction_key(text) == instruction_key(e) for e in job["examples"]):
                text, reason = None, "copy"
        done[id(job)] = {
            "id": instruction_id(text) if text else f"rejected-{parent['id']}-{op}-r{job['round']}",
            "instruction": text or "",
            "domain": job["target_domain"],
            "task_type": _task_type_for(job["target_domain"], taxonomy) if op == "expand" else parent["task_type"],
            "seed_id": parent["seed_id"], "source_kind": parent["source_kind"],
            "parent_id": (job["example_ids"][0] if op == "expand" and job["example_ids"] else parent["id"]),
            "operator": op, "round": job["round"], "model": model,
            "template": f"evolve:{op}", "constraints": constraint_library.NO_CONSTRAINTS, "raw": raw,
            "reject_reason": reason,
        }
    return [done[id(job)] for job in jobs]


def select_round(candidates: list[dict], existing: set[str]) -> tuple[list[dict], Counter]:
    """Kept evolved instructions of one round (not a duplicate of anything so far) and drop reasons."""
    kept, reasons = [], Counter()
    for c in candidates:
        reason = c["reject_reason"]
        if reason is None and instruction_key(c["instruction"]) in existing:
            reason = "duplicate"
        if reason is None:
            existing.add(instruction_key(c["instruction"]))
            kept.append({k: c[k] for k in INSTRUCTION_FIELDS})
        else:
            reasons[f"{c['operator']}:{reason}"] += 1
    return kept, reasons


MapFn = Callable[[str, list[dict], Callable[[list[dict]], list[dict]]], list[dict]]


def evolve_all(instructions: list[dict], cfg: EvolveConfig, pool, run_seed: int = 0,
               map_fn: MapFn | None = None) -> tuple[list[dict], dict[str, Any]]:
    """All rounds: (originals + kept evolved instructions, metrics).

    ``map_fn(name, jobs, fn)`` runs ``fn`` over the jobs (the stage passes ``ctx.map`` for
    resumable shards; default: one call).
    """
    taxonomy = load_taxonomy(cfg.taxonomy)
    load_operator_prompts(cfg.prompts)
    everything = [dict(r) for r in instructions]
    existing = {instruction_key(r["instruction"]) for r in everything}
    current = everything
    metrics: dict[str, Any] = {"instructions_in": len(instructions), "rounds": []}
    total_reasons: Counter = Counter()
    by_op: dict[str, Counter] = {op: Counter() for op in OPERATORS}
    for round_no in range(1, cfg.rounds + 1):
        if not current:
            break
        jobs, skipped = plan_round(current, everything, cfg, taxonomy, run_seed, round_no)

        def run_jobs(shard: list[dict]) -> list[dict]:
            return evolve_jobs(shard, cfg, pool, run_seed)

        if not jobs:
            candidates = []
        else:
            candidates = map_fn(f"evolve_round_{round_no}", jobs, run_jobs) if map_fn else run_jobs(jobs)
        kept, reasons = select_round(candidates, existing)
        for c in candidates:
            by_op[c["operator"]]["attempted"] += 1
        for r in kept:
            by_op[r["operator"]]["kept"] += 1
        total_reasons.update(reasons)
        metrics["rounds"].append({"round": round_no, "jobs": len(jobs), "kept": len(kept),
                                  "not_evolved": skipped, "failed_by_reason": dict(reasons),
                                  "expand_targets": dict(Counter(j["target_domain"] for j in jobs
                                                                 if j["operator"] == "expand"))})
        everything.extend(kept)
        current = kept
    counts = domain_counts((r["domain"] for r in everything), taxonomy)
    metrics.update({
        "evolved": len(everything) - len(instructions), "records_out": len(everything),
        "failed": sum(total_reasons.values()), "failed_by_reason": dict(total_reasons),
        "by_operator": {op: {"attempted": c["attempted"], "kept": c["kept"]} for op, c in by_op.items()},
        "domains_before": domain_counts((r["domain"] for r in instructions), taxonomy),
        "domains_after": counts,
        "constraints_by_kind": dict(sorted(Counter(c["kind"] for r in everything
                                                   for c in constraint_library.record_constraints(r)).items())),
    })
    return everything, metrics


def run(ctx: StageContext) -> None:
    cfg: EvolveConfig = ctx.config
    load_operator_prompts(cfg.prompts)  # fail on a bad prompt file before any engine starts
    instructions = ctx.read("instructions").to_list()
    model_ops = any(cfg.mix.get(op, 0) > 0 for op in MODEL_OPERATORS)
    pool = ctx.pool(cfg.model) if cfg.rounds > 0 and model_ops else None
    evolved, metrics = evolve_all(instructions, cfg, pool, ctx.seed,
                                  map_fn=lambda name, jobs, fn: ctx.map(name, jobs, fn, desc=f"evolve {name}"))
    ctx.write("evolved", evolved)
    ctx.metrics.update(metrics)
    from stages.eval.benchmark import benchmark_overlap

    ctx.metrics["decontamination"] = benchmark_overlap([r["instruction"] for r in evolved])
    ctx.log.info("evolve: %d in, %d evolved kept, %d failed %s", len(instructions), metrics["evolved"],
                 metrics["failed"], metrics["failed_by_reason"])


STAGE = Stage(name="evolve", inputs=("instructions",), outputs=("evolved",), config_cls=EvolveConfig, run=run)
