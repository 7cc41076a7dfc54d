"""Stage `answer`: specialized models write the responses.

A mapping domain -> model role (``routes``) sends, say, math to one model and code to another;
each role is its own worker pool (``models.<role>`` in the run config). Domains without a route go
to ``model``. Objective domains (taxonomy ``objective: true``, or ``objective_domains``) get ``k``
sampled responses, for the self-consistency check downstream; so do instructions with verifiable constraints
(``constrained_k``), whose responses the filter's verifiers rank into preference pairs; the others get one. Every response
keeps its text, the model that wrote it, its finish reason and its token count. With ``thinking`` each instruction is
answered per mode (slow and/or fast, ``stages/answer_modes.py``): one record per mode, each response with its
reasoning, final answer and rendered text.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from critique.consistency import record_tests
from critique.constraints import record_constraints
from pipeline.records import INSTRUCTION_FIELDS
from pipeline.run.stage import ModelRole, Stage, StageContext, record_seed
from pipeline.templates import TemplateError, chat_messages, load_yaml_file
from pipeline.thinking import MODE_FIELD, THINK, ThinkFormat, detect_format
from stages.answer_modes import AnswerThinking, mode_request, mode_response, mode_role
from stages.code_tests import CodeTestsConfig, write_tests
from stages.taxonomy import DEFAULT_TAXONOMY, load_taxonomy


class AnswerConfig(BaseModel):
    """Responses from specialized models, k samples for objective domains."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: ModelRole = "policy"
    """Default model role (a `models.<role>` entry of the run config) for domains without a route."""
    routes: dict[str, ModelRole] = Field(default_factory=dict)
    """Domain -> model role, e.g. {math: math_answerer, code: code_answerer}; each role is its own pool."""
    prompts: str = "configs/prompts/answer.yaml"
    """Answer prompt file: optional system message and per-domain suffixes."""
    taxonomy: str = DEFAULT_TAXONOMY
    """Domain taxonomy file (which domains are objective)."""
    k: int = Field(3, ge=1, le=64)
    """Responses per instruction in objective domains (1 elsewhere)."""
    objective_domains: list[str] | None = None
    """Domains that get k responses; None: those marked `objective: true` in the taxonomy."""
    constrained_k: bool = True
    """Instructions with verifiable constraints (`constraints`, from evolve's `constrain`) also get k responses:
    the filter checks each one, and a follower against a violator is an in-domain preference pair."""
    temperature: float = Field(0.7, ge=0)
    """Sampling temperature (k > 1 needs > 0 for different samples)."""
    top_p: float = Field(0.95, gt=0, le=1)
    """Nucleus sampling threshold."""
    max_tokens: int = Field(256, ge=8)
    """Longest response in tokens (a response cut here has finish_reason 'length')."""
    code_tests: CodeTestsConfig = Field(default_factory=CodeTestsConfig)
    """Unit tests for code-writing instructions, kept on the answer record (`tests`) for the filter to run."""
    thinking: AnswerThinking | None = None
    """Answers in both thinking modes (slow: reasoning then the final answer; fast: the answer), one record per
    instruction and mode with `mode`, and per response `reasoning`, `final` and the rendered `text`. None: one
    answer record per instruction, as the model answers (the default)."""


def load_answer_prompts(path: str) -> tuple[str | None, dict[str, str]]:
    """(system message, domain -> suffix); errors name the file."""
    data = load_yaml_file(path)
    domains = data.get("domains") or {}
    if not isinstance(domains, dict):
        raise TemplateError(f"{path}: `domains` must be a mapping of domain -> {{suffix: ...}}")
    suffixes = {}
    for name, entry in domains.items():
        if not isinstance(entry, dict) or set(entry) - {"suffix"}:
            raise TemplateError(f"{path}: domains.{name} must be a mapping with only `suffix`")
        suffixes[name] = str(entry.get("suffix") or "").strip()
    return data.get("system"), suffixes


def route(domain: str, cfg: AnswerConfig) -> str:
    """Model role that answers a domain."""
    return cfg.routes.get(domain, cfg.model)


def check_routes(cfg: AnswerConfig, roles: set[str] | None = None) -> None:
    """Fail early on routes to unknown domains or roles."""
    taxonomy = load_taxonomy(cfg.taxonomy)
    unknown = set(cfg.routes) - set(taxonomy.domains)
    if unknown:
        raise ValueError(f"stages.answer.routes: unknown domain(s) {sorted(unknown)}; taxonomy {cfg.taxonomy} has "
                         f"{sorted(taxonomy.domains)}")
    if roles is not None:
        used = {cfg.model} | set(cfg.routes.values())
        if cfg.thinking is not None:
            used |= {r for r in (cfg.thinking.think_role, cfg.thinking.no_think_role) if r}
        missing = used - roles
        if missing:
            raise ValueError(f"stages.answer: model role(s) {sorted(missing)} are not defined under `models:` "
                             f"(defined: {sorted(roles)}); fix: add them or change stages.answer.routes/model/"
                             "thinking")


def wants_k(rec: dict, objective: set[str], cfg: AnswerConfig) -> bool:
    """Whether an instruction gets k responses: an objective domain, or checkable constraints."""
    return rec["domain"] in objective or (cfg.constrained_k and bool(record_constraints(rec)))


def answer_instructions(records: list[dict], cfg: AnswerConfig, get_pool: Callable[[str], Any],
                        run_seed: int = 0) -> list[dict]:
    """Answer every instruction with the pool of its domain's role; output in input order (with ``thinking``: one
    record per instruction and mode, the modes in their configured order)."""
    from pipeline.engines.pool import ChatRequest

    system, suffixes = load_answer_prompts(cfg.prompts)
    taxonomy = load_taxonomy(cfg.taxonomy)
    objective = set(cfg.objective_domains) if cfg.objective_domains is not None else taxonomy.objective_domains()
    modes: list[str | None] = list(cfg.thinking.modes) if cfg.thinking is not None else [None]
    out: list[dict | None] = [None] * (len(records) * len(modes))
    for m, mode in enumerate(modes):
        by_role: dict[str, list[int]] = {}
        for i, rec in enumerate(records):
            role = route(rec["domain"], cfg)
            by_role.setdefault(role if mode is None else mode_role(mode, role, cfg.thinking), []).append(i)
        for role, indices in by_role.items():
            pool = get_pool(role)
            fmt = _think_format(pool.model_path) if mode is not None else None
            requests = []
            for i in indices:
                rec = records[i]
                suffix = suffixes.get(rec["domain"], "")
                content = f"{rec['instruction']}\n\n{suffix}" if suffix else rec["instruction"]
                messages, kwargs = chat_messages(system, content), None
                if mode is not None:
                    messages, kwargs = mode_request(messages, mode, fmt, cfg.thinking)
                requests.append(ChatRequest(
                    messages=messages, n=cfg.k if wants_k(rec, objective, cfg) else 1,
                    temperature=cfg.temperature, top_p=cfg.top_p,
                    max_tokens=cfg.thinking.think_max_tokens if mode == THINK else cfg.max_tokens,
                    seed=record_seed(run_seed, rec["id"], "answer" if mode is None else f"answer:{mode}"),
                    chat_template_kwargs=kwargs or None))
            results = pool.generate(requests)
            model = pool.config.model
            for i, result in zip(indices, results, strict=True):
                rec = records[i]
                responses = [{"text": c.text, "model": model, "finish_reason": c.finish_reason,
                              "n_tokens": len(c.token_ids)} for c in result.completions]
                if mode is not None:
                    responses = [{**r, **mode_response(r["text"], mode, fmt)} for r in responses]
                out[i * len(modes) + m] = {
                    **{k: rec.get(k) for k in INSTRUCTION_FIELDS}, **({MODE_FIELD: mode} if mode else {}),
                    "responses": responses, "answer_model": model, "answer_role": role,
                    "objective": rec["domain"] in objective}
    tests = write_tests(records, [route(r["domain"], cfg) for r in records], cfg.code_tests, get_pool, run_seed)
    for j, rec in enumerate(out):
        rec["tests"] = tests[j // len(modes)]  # type: ignore[index]
    return out  # type: ignore[return-value]


@functools.cache
def _think_format(model_path: str) -> ThinkFormat | None:
    """The think format of a served model's chat template (None: no think markers)."""
    from transformers import AutoTokenizer

    return detect_format(AutoTokenizer.from_pretrained(model_path))


def answer_metrics(answers: list[dict]) -> dict[str, Any]:
    responses = [r for a in answers for r in a["responses"]]
    return {
        "answered": len(answers), "responses": len(responses),
        "response_tokens": sum(r["n_tokens"] for r in responses),
        "finish_reasons": dict(Counter(r["finish_reason"] for r in responses)),
        "by_role": dict(Counter(a["answer_role"] for a in answers)),
        "by_model": dict(Counter(a["answer_model"] for a in answers)),
        "objective": sum(bool(a["objective"]) for a in answers),
        "empty_responses": sum(not r["text"].strip() for r in responses),
        "code_tests_written": sum(bool(record_tests(a)) for a in answers),
        **({"by_mode": dict(Counter(a[MODE_FIELD] for a in answers)),
            "mode_tokens": {m: sum(r["n_tokens"] for a in answers if a[MODE_FIELD] == m for r in a["responses"])
                            for m in sorted({a[MODE_FIELD] for a in answers})}}
           if answers and MODE_FIELD in answers[0] else {}),
    }


def run(ctx: StageContext) -> None:
    cfg: AnswerConfig = ctx.config
    check_routes(cfg, set(ctx.run_config.models))
    load_answer_prompts(cfg.prompts)
    records = ctx.read("evolved").to_list()
    answers = ctx.map("answers", records, lambda shard: answer_instructions(shard, cfg, ctx.pool, ctx.seed),
                      desc="answer")
    ctx.metrics.update(answer_metrics(answers))
    ctx.log.info("answer: %d instructions, %d responses", len(answers), sum(len(a["responses"]) for a in answers))


STAGE = Stage(name="answer", inputs=("evolved",), outputs=("answers",), config_cls=AnswerConfig, run=run)
