"""The critique text format: the parser never raises (fuzzed with hypothesis), reads what it wrote
and the usual drifts of real models, reports what it cannot read; and the unparseable-critique
policies (retry, drop, lowest tier) on a real engine whose output never parses (the random tiny MoE)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from critique.grade import CritiqueConfig, grade_pairs, parse_rate
from critique.parse import critique_regex, format_critique, parse_critique
from critique.prompts import critique_messages, load_prompts
from critique.rubric import DIMENSIONS, tier_from_scores

score = st.integers(1, 4)
scores_st = st.fixed_dictionaries({d: score for d in DIMENSIONS})


def _norm(reason: str) -> str:
    return " ".join(reason.replace("*", " ").split()).strip(" \"'`-")


reason_st = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=80).filter(
    lambda s: _norm(s) and not (_norm(s).startswith("<") and _norm(s).endswith(">")))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=400), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                 st.none(), st.integers(), st.lists(st.text(max_size=20), max_size=5)))
def test_parser_never_raises_and_results_are_well_formed(text):
    p = parse_critique(text)
    assert p.status in ("ok", "partial", "unparseable")
    assert set(p.scores) == set(DIMENSIONS)
    assert all(v is None or 1 <= v <= 4 for v in p.scores.values())
    if p.status == "unparseable":
        assert p.tier is None and p.problem
    else:
        assert 1 <= p.tier <= 4
    if p.status == "ok":
        assert p.reason and all(v is not None for v in p.scores.values()) and not p.problem


@settings(max_examples=200, deadline=None)
@given(scores_st, score, reason_st, st.text(max_size=60), st.text(max_size=60))
# reasons that begin with markdown's bold marker once lost it (or all of it) to the bold-stripping of the key
@example(dict.fromkeys(DIMENSIONS, 1), 1, "__0", "", "")
@example(dict.fromkeys(DIMENSIONS, 2), 2, "__", "", "")
def test_what_is_written_is_read_back_even_inside_chatter(scores, tier, reason, before, after):
    text = format_critique(scores, tier, reason)
    # Chatter before and after, on lines of their own (a model that talks around its grades);
    # chatter that itself has "Field: value" lines or a JSON object would be a grade.
    def chatter(s: str) -> str:
        return s.translate(str.maketrans(":={", "   "))

    noisy = f"{chatter(before)}\n{text}\n\n{chatter(after)}"
    for candidate in (text, noisy):
        p = parse_critique(candidate)
        assert (p.status, p.tier, p.scores) == ("ok", tier, scores)
        assert p.reason == _norm(reason)


@settings(max_examples=100, deadline=None)
@given(scores_st, score)
def test_common_drifts_of_real_models_parse(scores, tier):
    bold = "\n".join([f"- **{d.capitalize()}:** {v}/4" for d, v in scores.items()]
                     + [f"**Overall tier**: {tier}", "**Explanation:**", "It is fine."])
    js = json.dumps({**{d.capitalize(): str(v) for d, v in scores.items()}, "tier": tier, "reason": "ok"})
    prose = f"Here is my grading.\n```json\n{js}\n```\nThanks!"
    for text in (bold, js, prose):
        p = parse_critique(text)
        assert (p.tier, p.scores) == (tier, scores), text
    assert parse_critique(bold).reason == "It is fine."


def test_unreadable_and_ambiguous_outputs_are_reported_not_guessed():
    for text in ["", "   ", "I think this response is quite good overall.", "Tier: <1-4>", "Tier: 1-4",
                 "Accuracy: 3.5\nTier: 7", "Accuracy: 7/10\nRelevance: 3 out of 5", "Usefulness: 3\nUsefulness: 1"]:
        p = parse_critique(text)
        assert p.status == "unparseable" and p.tier is None, text
    # Scores without a tier: the tier is derived (never above the accuracy score) and flagged.
    p = parse_critique("Accuracy: 2\nRelevance: 4\nCompleteness: 4\nClarity: 4")
    assert (p.status, p.tier, p.tier_derived) == ("partial", 2, True)
    assert tier_from_scores({"accuracy": 4, "relevance": 3, "completeness": 3}) == 3
    # The format's own placeholder copied back is not a reason.
    p = parse_critique(format_critique(dict.fromkeys(DIMENSIONS, 3), 3, "<one short sentence>"))
    assert (p.status, p.reason, p.problem) == ("partial", "", "no reason")


def test_regex_of_the_format_accepts_exactly_canonical_critiques():
    import re

    rx = re.compile(critique_regex())
    good = format_critique({d: 3 for d in DIMENSIONS}, 3, "Mostly correct, misses one case.")
    assert rx.fullmatch(good)
    assert not rx.fullmatch(good.replace("Tier: 3", "Tier: 5"))


def test_prompts_render_from_the_config_file_with_rotated_examples():
    prompts = load_prompts()
    a = critique_messages("What does len('ab') return?", "2", prompts, rotation=0)
    b = critique_messages("What does len('ab') return?", "2", prompts, rotation=1)
    n = len(prompts.examples)
    assert n >= 2 and len(a) == 1 + 2 * n + 1 and a[0]["role"] == "system"
    assert "Tier is the overall grade" in a[0]["content"]  # the rubric from the file
    assert a[-1]["content"] == b[-1]["content"] and "What does len('ab') return?" in a[-1]["content"]
    assert a[-2]["content"] != b[-2]["content"]  # another example answered last
    # Every example answer is itself a critique that parses to the example's grades.
    for ex, msg in zip(prompts.examples, a[2:-1:2], strict=True):
        p = parse_critique(msg["content"])
        assert (p.status, p.tier, p.scores) == ("ok", ex.tier, ex.scores)
    bare = critique_messages("q", "r", prompts, few_shot=False)
    assert [m["role"] for m in bare] == ["system", "user"]


def test_bad_prompt_file_is_named_with_the_field(tmp_path):
    from pipeline.templates import TemplateError

    path = tmp_path / "critique.yaml"
    path.write_text("rubric: r\ntemplate: '{instruction} {response} {oops}'\n")
    with pytest.raises(TemplateError, match=r"critique.yaml: template: unknown placeholder\(s\) \['oops'\]"):
        load_prompts(str(path))
    path.write_text("rubric: r\ntemplate: '{instruction} {response}'\nexamples: [{instruction: q, response: r, "
                    "scores: {accuracy: 9}, tier: 2, reason: x}]\n")
    with pytest.raises(TemplateError, match=r"critique.yaml: examples.0.scores"):
        load_prompts(str(path))


@pytest.fixture(scope="module")
def garbage_pairs():
    """Real instruction/response text (CPython's documentation topics)."""
    from pydoc_data.topics import topics

    names = sorted(topics)[:3]
    return [(f"Explain the Python topic '{n}'.", topics[n][:300]) for n in names]


@pytest.mark.slow
def test_unparseable_policies_on_a_real_engine(tiny_pool, garbage_pairs):
    """The random tiny MoE never writes the format: each policy does what it says, and the parse
    rate is measured as 0."""
    seeds = [11, 12, 13]
    fast = {"max_tokens": 16, "max_chars": 300}
    _, probe = grade_pairs(garbage_pairs, seeds, CritiqueConfig(on_unparseable="drop", **fast), tiny_pool)
    if probe["unparseable_first"] != len(garbage_pairs):
        pytest.fail(f"the random tiny model wrote a parseable critique; pick other seeds ({probe})")

    crits, stats = grade_pairs(garbage_pairs, seeds, CritiqueConfig(on_unparseable="drop", **fast), tiny_pool)
    assert [c.status for c in crits] == ["dropped"] * 3 and all(c.tier is None for c in crits)
    assert (stats["requests"], stats["dropped"], parse_rate(stats)) == (3, 3, 0.0)

    crits, stats = grade_pairs(garbage_pairs, seeds, CritiqueConfig(on_unparseable="lowest_tier", **fast), tiny_pool)
    assert [(c.status, c.tier) for c in crits] == [("lowest_tier", 1)] * 3 and stats["lowest_tier"] == 3

    cfg = CritiqueConfig(on_unparseable="retry", max_retries=2, after_retries="lowest_tier", **fast)
    crits, stats = grade_pairs(garbage_pairs, seeds, cfg, tiny_pool)
    unrecovered = [c for c in crits if c.status == "lowest_tier"]
    assert stats["requests"] == 3 + stats["retried"] and stats["retried"] >= 3
    assert all(c.attempts == 3 for c in unrecovered)  # first try + 2 retries
    assert stats["recovered"] + stats["lowest_tier"] == 3


def _topic_pairs(k: int):
    """(instruction, response, matched) from CPython's documentation topics: a topic's own first
    paragraph answers the question about it; another topic's paragraph does not."""
    import re
    from pydoc_data.topics import topics

    paras = {}
    for name in sorted(topics):
        for p in re.split(r"\n\s*\n", topics[name]):
            p = " ".join(p.split())
            if not p.startswith(("*", "=", "|")) and len(p.split()) > 12 and p.endswith("."):
                paras[name] = p[:400]
                break
    names = sorted(paras)[: 2 * k]
    out = []
    for i, name in enumerate(names):
        other = names[(i + len(names) // 2) % len(names)]
        out.append((f"What does the Python documentation say about '{name}'?", paras[name], name, name))
        out.append((f"What does the Python documentation say about '{name}'?", paras[other], name, other))
    return out


@pytest.mark.slow
def test_fine_tuning_teaches_a_critic_the_format(tmp_path, embedded_models):
    """stages/sft/critic.py through the SFT stage's trainer: the random tiny dense model, fine-tuned on
    graded examples (labels derived from real documentation text: a topic's own paragraph is tier 4,
    another topic's is tier 1), goes from never writing a parseable critique to writing them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.sft.critic import (
        CritiqueDataError,
        CritiqueTrainConfig,
        critique_training_records,
        train_critique_model,
    )

    graded = [{"instruction": q, "response": r, "tier": 4 if a == b else 1,
               "scores": dict.fromkeys(DIMENSIONS, 4 if a == b else 1),
               "reason": f"It is about '{b}'." if a == b else f"It is about '{b}', not '{a}'."}
              for q, r, a, b in _topic_pairs(10)]
    train, held = graded[:-4], graded[-4:]
    # Small on purpose (TRL takes ~8 s per step of 4 x 300 tokens on this 2-core machine, mostly the
    # 49k-vocabulary logits): a compact prompt file, short sequences, a fixed number of steps.
    compact = tmp_path / "compact.yaml"
    compact.write_text("rubric: Scores and tier are 1-4, 4 best.\ntemplate: \"{instruction}\\n---\\n{response}\\n---\\nGrade:\"\n")
    cfg = CritiqueTrainConfig(base_model="tiny-dense", backend="local", prompts=str(compact), learning_rate=5e-3,
                              min_learning_rate=5e-4, max_steps=90, per_device_train_batch_size=2, max_length=192,
                              max_chars=200, heldout_fraction=0.15)
    records = critique_training_records(train, cfg)
    assert records[0]["messages"][-1]["role"] == "assistant"
    assert parse_critique(records[0]["messages"][-1]["content"]).status == "ok"
    with pytest.raises(CritiqueDataError, match=r"graded example 0 \(id=\?\): field `tier` must be 1-4"):
        critique_training_records([{**train[0], "tier": 7}], cfg)

    prompts = [critique_messages(g["instruction"], g["response"], load_prompts(str(compact)), few_shot=False,
                                 max_chars=cfg.max_chars) for g in held]

    def parse_statuses(model_dir) -> list[str]:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        out = []
        for msgs in prompts:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                gen = model.generate(**ids, max_new_tokens=48, do_sample=False, pad_token_id=tok.eos_token_id)
            out.append(parse_critique(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)).status)
        return out

    before = parse_statuses(embedded_models["tiny-dense"])
    metrics = train_critique_model(train, cfg, tmp_path / "critic", tmp_path / "work")
    after = parse_statuses(tmp_path / "critic")
    print("critic fine-tuning:", {k: metrics[k] for k in ("examples", "heldout_nll_before", "heldout_nll_after",
                                                           "train_tokens_per_s")}, before, after)
    assert metrics["heldout_nll_after"] < metrics["heldout_nll_before"]
    assert before.count("unparseable") == len(prompts)
    assert after.count("unparseable") < len(prompts)


def test_critic_train_cli_names_bad_input(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["critic", "train", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "no graded examples found" in result.output
    bad = tmp_path / "graded.jsonl"
    bad.write_text(json.dumps({"instruction": "q", "response": "r", "tier": 9, "reason": "x"}) + "\n")
    result = CliRunner().invoke(app, ["critic", "train", str(bad), str(tmp_path / "out"), "--backend", "local"])
    assert result.exit_code == 2 and "field `tier` must be 1-4" in result.output


def test_several_sampled_critiques_give_the_median_tier_and_scores():
    from critique.grade import _median_critique

    def text(tier: int, accuracy: int, reason: str) -> str:
        return format_critique(dict(dict.fromkeys(DIMENSIONS, 2), accuracy=accuracy), tier, reason)

    texts = [text(2, 1, "weak"), "no grade here", text(4, 4, "great"), text(3, 3, "fine")]
    raw, parsed = _median_critique(texts)
    assert parsed.tier == 3 and raw == texts[3] and parsed.reason == "fine"
    assert parsed.scores["accuracy"] == 3 and parsed.scores["clarity"] == 2
    raw, parsed = _median_critique([text(1, 1, "a"), text(4, 4, "b")])  # even count: the lower median
    assert parsed.tier == 1 and parsed.reason == "a"
    assert _median_critique(["nothing", "still nothing"])[1].status == "unparseable"
    assert _median_critique([texts[2]])[1].tier == 4
