"""Self-consistency for objective questions: the k responses to one instruction should agree.

For a record of an objective domain (math, short-answer reasoning, code), the final answer of
every response is extracted (numbers and expressions with math-verify, choice letters and short
answers by pattern, code by running the record's tests when it has any), the answers are grouped
(math-verify decides equivalence: ``1/2`` equals ``0.5``), and the largest group is the majority.
Its share of all responses is the record's **agreement**. With agreement at or above the
threshold, responses outside the majority are rejected; below it, the question has no reliable
answer and (by default) all its responses are rejected.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from critique.sandbox import MiB, SandboxLimits, run_python

AnswerKind = Literal["math", "choice", "short", "code"]


class ConsistencyConfig(BaseModel):
    """Self-consistency checks on the k responses of objective questions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enabled: bool = True
    """Run the check (False: every record's agreement is None and nothing is dropped here)."""
    kinds: dict[str, AnswerKind] = Field(default_factory=lambda: {
        "math": "math", "reasoning": "short", "code": "code"})
    """Record `domain` (or, when the domain is not listed, `task_type`) -> how its final answers are
    extracted: math (numbers/expressions, math-verify), choice (a letter A-E), short (a short final
    answer after "answer is"/"Answer:", or yes/no), code (passes the record's `tests`)."""
    min_responses: int = Field(2, ge=2)
    """Records with fewer responses are not checked (agreement None)."""
    min_agreement: float = Field(0.5, gt=0, le=1)
    """Share of all responses that must give the majority answer. At or above it, responses with
    another (or no) answer are rejected; below it, see `on_no_majority`."""
    min_extracted: float = Field(0.5, ge=0, le=1)
    """If fewer responses than this share yield an answer at all, the question is not one this
    check understands (e.g. an open "why" question): not checked, agreement None, nothing dropped."""
    on_no_majority: Literal["drop_all", "keep_all"] = "drop_all"
    """Agreement below `min_agreement`: drop every response of the record (no reliable answer), or
    keep them all for the critique model to judge."""
    short_answer_max_words: int = Field(6, ge=1)
    """Short answers longer than this are not short answers (not extracted)."""
    code_timeout_s: float = Field(10.0, gt=0)
    """Seconds a response's code and the record's tests may run (wall clock; also their CPU seconds)."""
    code_memory_mb: int = Field(512, ge=64)
    """Address space the code may use (RLIMIT_AS, MiB): a larger allocation raises MemoryError."""
    code_max_processes: int = Field(32, ge=1)
    """Processes and threads the code may have at once (stops fork bombs)."""


NO_TESTS = "[]"
"""The ``tests`` value of a record without tests (the field is a JSON list of assert statements)."""


def record_tests(record: dict) -> list[str]:
    """The tests a record carries (a JSON list, or a list; none when the field is absent)."""
    raw = record.get("tests")
    if raw is None:
        return []
    tests = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"record {record.get('id')!r}: `tests` must be a JSON list of assert statements, "
                         f"got {raw!r:.80}")
    return tests


# -- extraction -----------------------------------------------------------------------------------
_log = logging.getLogger(__name__)
_CHOICE = [
    re.compile(r"\banswer\s*(?:is|:)?\s*(?:option\s*)?[(\[]?([A-E])[)\]]?(?![\w'])", re.IGNORECASE),
    re.compile(r"\b(?:option|choice)\s*[(\[]?([A-E])[)\]]?(?![\w'])", re.IGNORECASE),
    re.compile(r"^\s*[(\[]?([A-E])[)\].:](?:\s|$)", re.MULTILINE),
]
_FINAL = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|would be|will be|:)\s*[*_]*\s*(?P<a>[^\n]+)", re.IGNORECASE)
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def extract_math(text: str) -> list | None:
    """math-verify's parse of the final answer (boxed, "the answer is", or the last number)."""
    from math_verify import parse

    # math-verify's timeout uses SIGALRM, which only works in the main thread.
    timeout = 5 if _in_main_thread() else None
    try:
        found = parse(text, parsing_timeout=timeout)
    except Exception as exc:  # a parser bug on odd input must not stop the stage
        _log.debug("math-verify could not parse %r: %s", text[:80], exc)
        return None
    return found or None


def _normalize_short(answer: str) -> str:
    answer = answer.casefold().strip()
    answer = re.sub(r"[*_`\"'“”‘’]", "", answer)
    answer = _ARTICLES.sub(" ", answer)
    answer = re.sub(r"[^\w\s.-]", " ", answer)
    return " ".join(answer.split()).strip(" .")


def extract_choice(text: str) -> str | None:
    for rx in _CHOICE:
        found = rx.findall(text)
        if found:
            return found[-1].upper()
    return None


def extract_short(text: str, max_words: int) -> str | None:
    """A short final answer: after "the answer is" / "Answer:" (last one), else a leading yes/no."""
    finals = list(_FINAL.finditer(text))
    if finals:
        answer = re.split(r"(?<=[^\d])[.;](?:\s|$)|,\s", finals[-1].group("a"))[0]
        answer = _normalize_short(answer)
        if answer and len(answer.split()) <= max_words:
            return answer
    m = _YES_NO.match(text)
    return m.group(1).lower() if m else None


def run_code_tests(text: str, tests: list[str], timeout_s: float,
                   limits: SandboxLimits | None = None) -> str | None:
    """"pass" / "fail" for the response's Python code blocks run with the tests; None without code
    (or when the sandbox itself could not run it: that says nothing about the code).

    The code runs in ``critique.sandbox``, never in this process: separate interpreter, throwaway
    folder, CPU/memory/file/process limits, no network. ``limits`` (default: the sandbox's) gets
    ``timeout_s`` as its wall and CPU time.
    """
    blocks = _CODE_BLOCK.findall(text)
    if not blocks or not tests:
        return None
    program = "\n\n".join(blocks) + "\n\n" + "\n".join(tests) + "\n"
    limits = (limits or SandboxLimits()).model_copy(
        update={"wall_seconds": timeout_s, "cpu_seconds": max(1, math.ceil(timeout_s))})
    result = run_python(program, limits)
    if result.status == "error":
        _log.warning("the code sandbox could not run a program: %s", result.stderr[-500:])
        return None
    return "pass" if result.status == "passed" else "fail"


def extract_answer(text: str, kind: AnswerKind, cfg: ConsistencyConfig, tests: list[str] | None = None):
    """The final answer of one response (None when it gives none); comparable with ``same_answer``."""
    if not isinstance(text, str) or not text.strip():
        return None
    if kind == "math":
        return extract_math(text)
    if kind == "choice":
        return extract_choice(text)
    if kind == "short":
        return extract_short(text, cfg.short_answer_max_words)
    if kind == "code":
        limits = SandboxLimits(memory_bytes=cfg.code_memory_mb * MiB, processes=cfg.code_max_processes)
        return run_code_tests(text, tests or [], cfg.code_timeout_s, limits)
    raise ValueError(f"consistency.kinds: unknown answer kind {kind!r}; use one of math, choice, short, code")


def same_answer(a, b, kind: AnswerKind) -> bool:
    if a is None or b is None:
        return False
    if kind == "math":
        from math_verify import verify

        timeout = 5 if _in_main_thread() else None
        try:
            return bool(verify(a, b, timeout_seconds=timeout))
        except Exception:
            return False
    return a == b


def answer_label(answer, kind: AnswerKind) -> str | None:
    """A readable form of an extracted answer (for records and reasons)."""
    if answer is None:
        return None
    if kind == "math":
        return str(answer[-1]) if isinstance(answer, list) and answer else str(answer)
    return str(answer)


# -- voting ---------------------------------------------------------------------------------------
def answer_kind(record: dict, cfg: ConsistencyConfig) -> AnswerKind | None:
    """How this record's answers are checked, or None when it is not an objective question."""
    for key in ("domain", "task_type"):
        kind = cfg.kinds.get(str(record.get(key)))
        if kind:
            return kind
    return None


def vote(texts: list[str | None], kind: AnswerKind, cfg: ConsistencyConfig, tests: list[str] | None = None) -> dict:
    """Majority vote over the responses' final answers.

    Returns ``answers`` (readable answer per response, None where none), ``majority`` (readable),
    ``agrees`` (per response), ``agreement`` (majority share of all responses, or None when fewer
    than ``min_extracted`` of them gave an answer) and ``checked``.
    """
    answers = [extract_answer(t, kind, cfg, tests) for t in texts]
    labels = [answer_label(a, kind) for a in answers]
    n = len(texts)
    n_extracted = sum(a is not None for a in answers)
    out = {"answers": labels, "majority": None, "agrees": [None] * n, "agreement": None, "checked": False}
    if n < cfg.min_responses or n_extracted == 0 or n_extracted / n < cfg.min_extracted:
        return out
    if kind == "code":
        # With tests the "majority" is the tests' verdict: responses agree when they pass.
        passing = [a == "pass" for a in answers]
        out.update(majority="pass", agrees=passing, agreement=sum(passing) / n, checked=True)
        return out
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if same_answer(answers[g[0]], a, kind):
                g.append(i)
                break
        else:
            groups.append([i])
    best = max(groups, key=lambda g: (len(g), -g[0]))
    members = set(best)
    out.update(majority=labels[best[0]], agrees=[i in members for i in range(n)],
               agreement=len(best) / n, checked=True)
    return out


def apply_consistency(records: Iterable[dict], cfg: ConsistencyConfig) -> tuple[list[dict], dict[str, int]]:
    """Vote on every objective record. Each response gets ``answer`` and ``agrees``; a response the
    check rejects gets ``rejected_by="consistency"`` and a reason (responses already rejected by a
    rule keep their first rejection; they still vote, except truncated ones, which count as giving
    no answer).
    Each record gets ``agreement`` and ``majority_answer``. Returns (records, counts)."""
    counts = {"records_checked": 0, "records_unchecked": 0, "records_no_majority": 0, "rejected": 0}
    out = []
    for rec in records:
        rec = {**rec, "agreement": None, "majority_answer": None, "answer_kind": None}
        responses = [dict(r) for r in rec.get("responses") or []]
        kind = answer_kind(rec, cfg) if cfg.enabled else None
        if kind is None:
            out.append({**rec, "responses": responses})
            continue
        # A cut-off response has no final answer (its last number is an intermediate one): it votes as
        # "no answer", which never agrees.
        texts = [None if r.get("rejected_by") == "truncation" else r.get("text") for r in responses]
        result = vote(texts, kind, cfg, record_tests(rec))
        rec.update(answer_kind=kind)
        for r, answer, agrees in zip(responses, result["answers"], result["agrees"], strict=True):
            r["answer"], r["agrees"] = answer, agrees
        if not result["checked"]:
            counts["records_unchecked"] += 1
            out.append({**rec, "responses": responses})
            continue
        counts["records_checked"] += 1
        rec.update(agreement=result["agreement"], majority_answer=result["majority"])
        no_majority = result["agreement"] < cfg.min_agreement
        if no_majority:
            counts["records_no_majority"] += 1
        for r in responses:
            if r.get("rejected_by"):
                continue
            if no_majority and cfg.on_no_majority == "drop_all":
                reason = (f"consistency: no majority answer (agreement {result['agreement']:.2f} "
                          f"< {cfg.min_agreement})")
            elif not no_majority and not r["agrees"]:
                reason = f"consistency: answer {r['answer']!r} disagrees with the majority {result['majority']!r}"
            else:
                continue
            r["rejected_by"] = "consistency"
            r["rule_reasons"] = [*r.get("rule_reasons", []), reason]
            counts["rejected"] += 1
        out.append({**rec, "responses": responses})
    return out, counts
