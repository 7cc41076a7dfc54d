"""The domain taxonomy (``configs/taxonomy.yaml``): labels, objective domains, balancing targets.

Labels come from rules (weighted keyword patterns plus the task type an instruction was generated
for), not from the model: a 135M model cannot classify reliably, and rules are reproducible,
inspectable and cheap. The taxonomy file is the place to change domains or their keywords.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.templates import TemplateError, load_yaml_file, resolve_config_file

DEFAULT_TAXONOMY = "configs/taxonomy.yaml"


class Domain(BaseModel):
    """One domain label."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    description: str
    """What belongs here (shown to the generator by evolve's expand operator)."""
    objective: bool = False
    """Answers can be checked against each other (math, code, reasoning): answer samples k responses."""
    target_share: float = Field(0.2, ge=0, le=1)
    """Share of all instructions this domain should have; evolve's expand operator fills the gaps."""
    keywords: dict[str, float] = Field(default_factory=dict)
    """Regular expression -> weight; matched case-insensitively on word bounds."""


class Taxonomy(BaseModel):
    """Domain labels and how instructions are assigned to them."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    default: str
    """Label when no rule matches and the task type has no domain."""
    task_type_weight: float = 1.5
    """Score the task type's own domain gets before keywords are counted."""
    domains: dict[str, Domain]
    """Domain name -> definition."""
    task_types: dict[str, str] = Field(default_factory=dict)
    """Task type (of generate's templates) -> domain it aims at."""

    @model_validator(mode="after")
    def _check(self) -> Taxonomy:
        names = set(self.domains)
        if self.default not in names:
            raise ValueError(f"default {self.default!r} is not a domain; domains: {sorted(names)}")
        bad = {t: d for t, d in self.task_types.items() if d not in names}
        if bad:
            raise ValueError(f"task_types map to unknown domains {bad}; domains: {sorted(names)}")
        for name, dom in self.domains.items():
            for pattern in dom.keywords:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"domains.{name}.keywords: bad pattern {pattern!r} ({exc})") from None
        return self

    def objective_domains(self) -> set[str]:
        return {n for n, d in self.domains.items() if d.objective}


@lru_cache(maxsize=8)
def _load(path: str) -> Taxonomy:
    data = load_yaml_file(path)
    try:
        return Taxonomy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise TemplateError(f"{resolve_config_file(path)}: {where}: {first['msg']}") from None


def load_taxonomy(path: str = DEFAULT_TAXONOMY) -> Taxonomy:
    """Read and validate a taxonomy file; errors name the file and field."""
    return _load(str(resolve_config_file(path)))


@lru_cache(maxsize=8)
def _compiled(items: tuple[tuple[str, tuple[tuple[str, float], ...]], ...]):
    return [(name, [(re.compile(rf"(?<!\w)(?:{p})(?!\w)", re.IGNORECASE), w) for p, w in kws]) for name, kws in items]


def domain_scores(text: str, taxonomy: Taxonomy, task_type: str | None = None) -> dict[str, float]:
    """Score of every domain for one instruction."""
    items = tuple((n, tuple(d.keywords.items())) for n, d in taxonomy.domains.items())
    scores = dict.fromkeys(taxonomy.domains, 0.0)
    for name, patterns in _compiled(items):
        for pattern, weight in patterns:
            if pattern.search(text):
                scores[name] += weight
    prior = taxonomy.task_types.get(task_type or "")
    if prior:
        scores[prior] += taxonomy.task_type_weight
    return scores


def label_domain(text: str, taxonomy: Taxonomy, task_type: str | None = None) -> str:
    """The domain label of one instruction (highest score; ties: task type's domain, then default)."""
    scores = domain_scores(text, taxonomy, task_type)
    best = max(scores.values())
    if best <= 0:
        return taxonomy.task_types.get(task_type or "", taxonomy.default)
    winners = [n for n, s in scores.items() if s == best]
    prior = taxonomy.task_types.get(task_type or "")
    if prior in winners:
        return prior
    return taxonomy.default if taxonomy.default in winners else winners[0]


def domain_counts(domains: Iterable[str], taxonomy: Taxonomy) -> dict[str, int]:
    counts = Counter(domains)
    return {name: counts.get(name, 0) for name in taxonomy.domains}


def expansion_targets(counts: dict[str, int], taxonomy: Taxonomy, n_new: int) -> dict[str, int]:
    """How many new instructions each domain should get so shares move toward ``target_share``.

    Fills the largest deficits first (deficit = target share of the final total minus the current
    count); domains at or above target get none. Largest-remainder rounding keeps the sum exact.
    """
    if n_new <= 0:
        return dict.fromkeys(taxonomy.domains, 0)
    total_share = sum(d.target_share for d in taxonomy.domains.values()) or 1.0
    final = sum(counts.values()) + n_new
    deficit = {n: max(0.0, d.target_share / total_share * final - counts.get(n, 0))
               for n, d in taxonomy.domains.items()}
    if sum(deficit.values()) <= 0:  # already balanced: spread by target share
        deficit = {n: d.target_share for n, d in taxonomy.domains.items()}
    scale = n_new / sum(deficit.values())
    raw = {n: v * scale for n, v in deficit.items()}
    alloc = {n: math.floor(v) for n, v in raw.items()}
    for n in sorted(raw, key=lambda k: (alloc[k] - raw[k], k))[: n_new - sum(alloc.values())]:
        alloc[n] += 1
    return alloc


def underrepresented(counts: dict[str, int], taxonomy: Taxonomy) -> list[str]:
    """Domains whose share is below target, largest gap first."""
    total = sum(counts.values()) or 1
    total_share = sum(d.target_share for d in taxonomy.domains.values()) or 1.0
    gaps = {n: d.target_share / total_share - counts.get(n, 0) / total for n, d in taxonomy.domains.items()}
    return [n for n in sorted(gaps, key=lambda k: -gaps[k]) if gaps[n] > 0]
