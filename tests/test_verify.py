"""Verification in the filter: responses to a constrained instruction are checked against its constraints, the
violations are rejected and counted per kind, and preference pairs rank verdicts before critic tiers.

The critique is disabled (every response it would grade gets ``default_tier``): what is tested is the verifier's
part of the filter, with the filter's own functions."""

from __future__ import annotations

from critique.constraints import dump
from stages.filter import FilterConfig, grade_records, select_outputs

CONSTRAINTS = [{"kind": "no_commas", "params": {}, "text": "Do not use any commas."},
               {"kind": "max_words", "params": {"n": 40}, "text": "Answer in fewer than 40 words."}]
FOLLOWS = "A queue serves items in the order they arrive. The first item in is the first item out."
NO_COMMAS_BROKEN = "A queue serves items in order: first in, first out, like a line at a shop counter today."
BOTH_BROKEN = "A queue, " + " ".join(["which serves items in the order they arrive"] * 8) + "."


def _record(rid: str, responses: list[str], constraints: list[dict]) -> dict:
    return {"id": rid, "instruction": "Explain what a queue is. " + " ".join(c["text"] for c in constraints),
            "domain": "knowledge_qa", "task_type": "qa", "constraints": dump(constraints),
            "responses": [{"text": t, "model": "m", "finish_reason": "stop", "n_tokens": len(t.split())}
                          for t in responses]}


def _graded(records: list[dict], cfg: FilterConfig) -> list[dict]:
    return grade_records(records, cfg, get_pool=lambda: None, run_seed=0)


def test_violations_are_rejected_counted_per_kind_and_ranked_below_every_tier():
    cfg = FilterConfig(critique={"enabled": False, "default_tier": 4}, dedup={"responses": False},
                       preferences={"max_pairs_per_instruction": 3})
    records = [_record("q1", [BOTH_BROKEN, FOLLOWS, NO_COMMAS_BROKEN], CONSTRAINTS),
               _record("q2", [NO_COMMAS_BROKEN], [])]  # no constraints: nothing to verify
    graded = _graded(records, cfg)
    q1, q2 = graded[0]["responses"], graded[1]["responses"]
    assert [r["rejected_by"] for r in q1] == ["constraints", None, "constraints"]
    assert q1[0]["constraint_verdicts"] == {"no_commas": False, "max_words": False}
    assert q1[2]["constraint_verdicts"] == {"no_commas": False, "max_words": True}
    assert "not followed: no_commas" in q1[2]["rule_reasons"][-1]
    assert q1[1]["critique"]["tier"] == 4 and q1[0]["critique"] is None  # violations never reach the critic
    assert q2[0]["rejected_by"] is None and "constraint_verdicts" not in q2[0]

    sft, prefs, metrics = select_outputs(graded, cfg)
    assert [row["messages"][1]["content"] for row in sft] == [FOLLOWS, NO_COMMAS_BROKEN]
    assert metrics["verification"] == {
        "responses_checked": 3, "responses_passed": 1, "pass_rate": 0.3333,
        "by_kind": {"max_words": {"checked": 3, "passed": 2, "pass_rate": 0.6667},
                    "no_commas": {"checked": 3, "passed": 1, "pass_rate": 0.3333}}}
    row = next(r for r in metrics["funnel"] if r["filter"] == "constraints")
    assert (row["responses_in"], row["responses_out"]) == (4, 2)
    # The verified response is the chosen side of every pair; the violations are the rejected sides.
    assert {p["chosen"][0]["content"] for p in prefs} == {FOLLOWS}
    assert {p["rejected"][0]["content"] for p in prefs} <= {BOTH_BROKEN, NO_COMMAS_BROKEN}
    assert all(p["chosen_score"] > p["rejected_score"] == 0.0 for p in prefs)
    assert all(p["constraints"] == dump(CONSTRAINTS) for p in prefs)  # the constraints travel with the pair


def test_pass_rates_survive_the_parquet_round_trip_of_graded_records(tmp_path):
    """Graded shards are stored as Parquet (ctx.map): each response's verdicts become a struct with every kind of the
    shard, None where its instruction did not ask for that kind. The pass rates count only the kinds asked for."""
    import datasets

    cfg = FilterConfig(critique={"enabled": False, "default_tier": 4}, dedup={"responses": False})
    lowercase = [{"kind": "lowercase", "params": {}, "text": "Write in lowercase only."}]
    graded = _graded([_record("q1", [FOLLOWS], CONSTRAINTS), _record("q2", ["all in lowercase here."], lowercase)],
                     cfg)
    datasets.Dataset.from_list(graded).to_parquet(tmp_path / "graded.parquet")
    stored = datasets.load_dataset("parquet", data_files=str(tmp_path / "graded.parquet"), split="train").to_list()
    assert stored[1]["responses"][0]["constraint_verdicts"]["no_commas"] is None  # what Parquet does to the dicts
    _, _, metrics = select_outputs(stored, cfg)
    assert metrics["verification"]["responses_checked"] == 2 and metrics["verification"]["responses_passed"] == 2
    assert {k: v["checked"] for k, v in metrics["verification"]["by_kind"].items()} == {
        "no_commas": 1, "max_words": 1, "lowercase": 1}
