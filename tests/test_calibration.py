"""The critic's known-quality set and the calibration figures (computed on tiers given here, so the figures'
arithmetic is checked; the filter's test grades the set with the real critic)."""

from __future__ import annotations

from collections import Counter

from critique.calibration import CORRUPTIONS, KINDS, calibration_figures, known_quality_set
from critique.constraints import check


def test_the_known_quality_set_has_every_kind_and_real_corruptions():
    answers = known_quality_set(12, seed=3)
    assert Counter(a["kind"] for a in answers) == dict.fromkeys(KINDS, 12)
    assert known_quality_set(12, seed=3) == answers
    by_item: dict[str, dict[str, dict]] = {}
    for a in answers:
        by_item.setdefault(a["item"], {})[a["kind"]] = a
    module = lambda name: name.rsplit(".", 1)[0]  # noqa: E731
    for name, kinds in by_item.items():
        ref = kinds["reference"]["response"]
        assert f"`{name}`" in kinds["reference"]["instruction"]
        assert ref.startswith(kinds["truncated"]["response"]) and len(kinds["truncated"]["response"]) < len(ref)
        assert kinds["wrong_facts"]["response"] != ref and kinds["off_topic"]["response"] != ref
        violating = kinds["constraint_violating"]
        assert violating["response"] == ref and violating["instruction"] != kinds["reference"]["instruction"]
    # wrong facts come from the same module, off-topic answers from another one
    from reward.stdlib_pairs import stdlib_docs

    owner = {text: name for name, text in stdlib_docs()}
    for name, kinds in by_item.items():
        assert module(owner[kinds["wrong_facts"]["response"]]) == module(name)
        assert module(owner[kinds["off_topic"]["response"]]) != module(name)


def test_the_violated_constraint_is_really_violated():
    from critique.constraints import KINDS as CONSTRAINT_KINDS

    for a in (a for a in known_quality_set(8) if a["kind"] == "constraint_violating"):
        added = a["instruction"].split("?", 1)[1].strip()
        # the phrasing added to the question is one of the library's, and the reference breaks it
        matches = [(kind, t) for kind, c in CONSTRAINT_KINDS.items() for t in c.templates
                   if t.split("{")[0] and added.startswith(t.split("{")[0])]
        assert matches, added
        assert not any(check(a["response"], [{"kind": k, "params": _params(k, added), "text": added}]) == [True]
                       for k, _ in matches if _params(k, added) is not None)


def _params(kind: str, text: str) -> dict | None:
    import re

    if kind in ("lowercase", "no_commas"):
        return {}
    if kind == "max_words":
        return {"n": int(re.search(r"\d+", text).group())}
    if kind == "bullets":
        return {"n": int(re.search(r"\d+", text).group())}
    if kind == "end_phrase":
        return {"phrase": re.search(r'"([^"]+)"', text).group(1)}
    return None


def _graded(tiers: dict[str, list[int | None]]) -> list[dict]:
    return [{"kind": k, "tier": t} for k, ts in tiers.items() for t in ts]


def test_figures_of_a_perfect_a_reversed_and_a_blind_critic():
    perfect = calibration_figures(_graded({"reference": [4, 4], **{k: [1, 2] for k in CORRUPTIONS}}))
    assert perfect["auc"] == 1.0 and set(perfect["auc_by_corruption"].values()) == {1.0}
    reversed_ = calibration_figures(_graded({"reference": [1, 1], **{k: [3, 4] for k in CORRUPTIONS}}))
    assert reversed_["auc"] == 0.0
    blind = calibration_figures(_graded({"reference": [2, 2, None], **{k: [2] for k in CORRUPTIONS}}))
    assert blind["auc"] == 0.5 and blind["ungraded"] == 1 and blind["answers"] == 7
    assert blind["tiers_by_kind"]["reference"] == {"1": 0, "2": 2, "3": 0, "4": 0}
    mixed = calibration_figures(_graded({"reference": [4, 2], "truncated": [3], "wrong_facts": [2],
                                         "off_topic": [1], "constraint_violating": []}))
    # reference vs truncated: (4>3) 1 + (2<3) 0 -> 0.5; vs wrong_facts: 1 + tie 0.5 -> 0.75
    assert mixed["auc_by_corruption"] == {"truncated": 0.5, "wrong_facts": 0.75, "off_topic": 1.0,
                                          "constraint_violating": None}
    assert mixed["auc"] == round((1 + 0 + 1 + 0.5 + 1 + 1) / 6, 4)
    assert mixed["mean_tier"]["reference"] == 3.0


def test_critic_training_examples_avoid_the_calibration_items_and_are_labelled_by_kind(tmp_path):
    """`posttrain critic known-quality` writes graded examples that `posttrain critic train` accepts, on functions the
    filter's calibration set never uses; a reference is graded above every corruption of it."""
    import json

    from typer.testing import CliRunner

    from critique.calibration import CalibrationConfig, critic_training_set
    from pipeline.cli import app
    from stages.sft.critic import CritiqueTrainConfig, critique_training_records

    calibration = {a["item"] for a in known_quality_set(CalibrationConfig().items, CalibrationConfig().seed)}
    out = tmp_path / "graded.jsonl"
    result = CliRunner().invoke(app, ["critic", "known-quality", str(out), "--items", "20"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["item"] for r in rows}) == 20 and not {r["item"] for r in rows} & calibration
    assert set(Counter(r["kind"] for r in rows)) == set(KINDS)
    for item in {r["item"] for r in rows}:
        tiers = {r["kind"]: r["tier"] for r in rows if r["item"] == item}
        assert all(tiers["reference"] > t for k, t in tiers.items() if k != "reference")
    records = critique_training_records(rows, CritiqueTrainConfig())
    assert len(records) == len(rows) and records[0]["messages"][-1]["role"] == "assistant"
    everything = critic_training_set(None, CalibrationConfig())
    assert not {r["item"] for r in everything} & calibration
    result = CliRunner().invoke(app, ["critic", "known-quality", str(out), "--items", "100000"])
    assert result.exit_code != 0 and "calibration items" in result.output
