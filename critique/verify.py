"""Verification of responses against their instruction's verifiable constraints (``critique.constraints``).

Runs in the filter after the rules and self-consistency: every response still standing to an instruction with
constraints gets ``constraint_verdicts`` (kind -> followed, in the record's order) and, when any constraint is
not followed, ``rejected_by: "constraints"`` with the kinds it broke in ``rule_reasons``. Such responses stay
available as the rejected side of preference pairs: a verifier's verdict is the most reliable preference signal a
small pipeline has.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from critique.constraints import check, record_constraints

STEP = "constraints"
"""The filter step name (``rejected_by`` value and funnel row) of this check."""


def apply_constraints(records: Iterable[dict]) -> list[dict]:
    """The records with each standing response of a constrained instruction checked (see the module docstring);
    responses already rejected and records without constraints pass through unchanged."""
    out = []
    for rec in records:
        constraints = record_constraints(rec)
        if not constraints:
            out.append(rec)
            continue
        responses = []
        for resp in rec["responses"]:
            if resp.get("rejected_by"):
                responses.append(resp)
                continue
            verdicts = check(resp["text"], constraints)
            broken = [c["kind"] for c, ok in zip(constraints, verdicts, strict=True) if not ok]
            resp = {**resp, "constraint_verdicts": {c["kind"]: ok for c, ok in zip(constraints, verdicts, strict=True)}}
            if broken:
                resp["rejected_by"] = STEP
                resp["rule_reasons"] = [*resp.get("rule_reasons", []), f"{STEP}: not followed: {', '.join(broken)}"]
            responses.append(resp)
        out.append({**rec, "responses": responses})
    return out


def verification_metrics(records: Iterable[dict]) -> dict:
    """Responses checked and passed, and the pass rate per constraint kind (for the filter's manifest)."""
    checked, passed = 0, 0
    by_kind: dict[str, Counter] = {}
    for rec in records:
        for resp in rec["responses"]:
            # Stored as a Parquet struct, the verdicts of one response carry every kind of the shard: None where
            # the response's instruction did not ask for that kind.
            verdicts = {k: v for k, v in (resp.get("constraint_verdicts") or {}).items() if v is not None}
            if not verdicts:
                continue
            checked += 1
            passed += all(verdicts.values())
            for kind, ok in verdicts.items():
                by_kind.setdefault(kind, Counter()).update(checked=1, passed=int(ok))
    return {"responses_checked": checked, "responses_passed": passed,
            "pass_rate": round(passed / checked, 4) if checked else None,
            "by_kind": {k: {"checked": c["checked"], "passed": c["passed"],
                            "pass_rate": round(c["passed"] / c["checked"], 4)} for k, c in sorted(by_kind.items())}}


def code_test_metrics(records: Iterable[dict]) -> dict:
    """Code instructions with tests, and their responses run against them in the sandbox and passed (the verdicts
    self-consistency wrote as each response's ``answer``)."""
    from critique.consistency import record_tests

    records = list(records)
    ran = [r["answer"] for rec in records if rec.get("answer_kind") == "code" for r in rec["responses"]
           if r.get("answer") in ("pass", "fail")]
    return {"records_with_tests": sum(bool(record_tests(rec)) for rec in records), "responses_run": len(ran),
            "responses_passed": ran.count("pass")}
