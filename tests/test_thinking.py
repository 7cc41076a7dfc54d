"""Fast and slow thinking (pipeline/thinking.py, stages/sft/modes.py, the think templates): the switch detected from
three template families, answers rendered and split per mode, the SFT set's mode mix, and the assistant mask of
real tokenization (TRL's SFTTrainer) with no loss on a fast row's think markers.

Families: Qwen3 (the original template TRL ships as chat_templates/qwen3.jinja, and TRL's training copy),
Hunyuan-A13B (configs/chat_templates/hunyuan_a13b_training.jinja) and ours for SmolLM2 (chatml_think.jinja). Their
tokenizers are not here (no network): the embedded SmolLM2 tokenizer renders all three, with Hunyuan's special
tokens (<|startoftext|>, <|extra_0|>, <|extra_4|>, <|eos|>) added for its family.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.thinking import (
    MODES,
    NO_THINK,
    THINK,
    THINK_CHATML_TEMPLATE,
    apply_switch,
    detect_format,
    follows_mode,
    render_answer,
    split_reasoning,
    text_switch,
)
from stages.sft import SFTStageConfig, make_sft_trainer, training_chat_template
from stages.sft.modes import SFTThinking, mix_modes, serving_template
from stages.sft.template import fast_block_trained, think_training_template
from stages.sft.trainer import training_args

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
HUNYUAN_TRAINING = Path(__file__).resolve().parent.parent / "configs" / "chat_templates" / "hunyuan_a13b_training.jinja"
HUNYUAN_TOKENS = ["<|startoftext|>", "<|extra_0|>", "<|extra_4|>", "<|eos|>"]


def _tokenizer(path, family: str):
    tok = AutoTokenizer.from_pretrained(path)
    if family == "qwen3":
        tok.chat_template = (TRL_TEMPLATES / "qwen3.jinja").read_text()
    elif family == "hunyuan":
        tok.add_special_tokens({"additional_special_tokens": HUNYUAN_TOKENS})
        tok.chat_template = HUNYUAN_TRAINING.read_text()
    else:
        tok.chat_template = serving_template(tok)  # SmolLM2 has no think markers: ours
    return tok


FAMILIES = ["qwen3", "hunyuan", "ours"]


@pytest.fixture(scope="module")
def tiny_path(embedded_models):
    return embedded_models["tiny-moe"]


def test_switch_detected_from_the_template(tiny_path):
    plain = AutoTokenizer.from_pretrained(tiny_path)
    assert detect_format(plain) is None  # SmolLM2's ChatML knows no think markers
    assert serving_template(plain) == THINK_CHATML_TEMPLATE.read_text()
    qwen3 = detect_format(_tokenizer(tiny_path, "qwen3"))
    assert (qwen3.switch, qwen3.empty_block, qwen3.family) == ("template_arg", "<think>\n\n</think>\n\n", "chatml")
    hunyuan = detect_format(_tokenizer(tiny_path, "hunyuan"))
    assert (hunyuan.switch, hunyuan.empty_block, hunyuan.family) == ("template_arg", "<think>\n\n</think>\n", "hunyuan")
    ours = detect_format(_tokenizer(tiny_path, "ours"))
    assert (ours.switch, ours.empty_block) == ("template_arg", "<think>\n\n</think>\n\n")
    # a template that only names the markers gets the text switch
    marker_only = plain.chat_template.replace("<|im_end|>", "<|im_end|>{# <think> #}")
    assert detect_format(plain, marker_only).switch == "prompt_text"
    messages, kwargs = apply_switch([{"role": "user", "content": "Hi"}], NO_THINK, detect_format(plain, marker_only))
    assert messages[-1]["content"] == "Hi /no_think" and kwargs == {}
    assert apply_switch([{"role": "user", "content": "Hi"}], THINK, qwen3) == (
        [{"role": "user", "content": "Hi"}], {"enable_thinking": True})


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_prompt_per_mode(tiny_path, family):
    tok = _tokenizer(tiny_path, family)
    fmt = detect_format(tok)
    user = [{"role": "user", "content": "What is 2+3?"}]
    for mode in MODES:
        messages, kwargs = apply_switch(user, mode, fmt)
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        assert prompt.endswith(fmt.empty_block) == (mode == NO_THINK)
    if family == "ours":  # our template also honours the text switch
        prompt = tok.apply_chat_template(text_switch(user, NO_THINK), tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        prompt = tok.apply_chat_template(text_switch(user, THINK), tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("/think<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_render_and_split_per_mode(tiny_path, family):
    fmt = detect_format(_tokenizer(tiny_path, family))
    slow = render_answer("2 plus 3 is 5.", "5", THINK, fmt)
    fast = render_answer(None, "5", NO_THINK, fmt)
    assert slow.startswith("<think>\n2 plus 3 is 5.\n</think>\n")
    assert fast.startswith(fmt.empty_block)
    if family == "hunyuan":
        assert slow.endswith("</think>\n<answer>\n5\n</answer>") and fast.endswith("<answer>\n5\n</answer>")
    else:
        assert slow.endswith("</think>\n\n5") and fast == "<think>\n\n</think>\n\n5"
    assert split_reasoning(slow).reasoning == "2 plus 3 is 5." and split_reasoning(slow).final == "5"
    assert split_reasoning(fast).reasoning == "" and split_reasoning(fast).final == "5"
    assert follows_mode(slow, THINK) and follows_mode(fast, NO_THINK) and not follows_mode(slow, NO_THINK)
    cut = split_reasoning("<think>\nfirst, 2 plus")
    assert (cut.closed, cut.final, cut.mode) == (False, "", THINK)
    assert split_reasoning("just 5").reasoning is None and follows_mode("just 5", NO_THINK)
    with pytest.raises(ValueError, match="needs its reasoning"):
        render_answer("", "5", THINK, fmt)


def test_our_template_renders_smollm2s_conversations_unchanged(tiny_path):
    plain = AutoTokenizer.from_pretrained(tiny_path)
    ours = THINK_CHATML_TEMPLATE.read_text()
    for msgs in ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
                 [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                  {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"}]):
        for gen in (False, True):
            assert plain.apply_chat_template(msgs, chat_template=ours, tokenize=False, add_generation_prompt=gen) == \
                plain.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_qwen3_training_template_leaves_the_fast_block_out_of_the_loss(tiny_path):
    tok = _tokenizer(tiny_path, "qwen3")
    fmt = detect_format(tok)
    trl_training = training_chat_template(tok)  # TRL's qwen3_training.jinja
    assert fast_block_trained(tok, trl_training, fmt)  # as TRL ships it, the empty block is trained on
    patched = think_training_template(tok, trl_training, fmt)
    assert not fast_block_trained(tok, patched, fmt)
    for mode in MODES:  # and it renders what the original renders
        msgs = [{"role": "user", "content": "Q"},
                {"role": "assistant", "content": render_answer("R", "A", mode, fmt)}]
        assert tok.apply_chat_template(msgs, chat_template=patched, tokenize=False) == \
            tok.apply_chat_template(msgs, tokenize=False)
    with pytest.raises(ValueError, match="chat_template_path"):
        think_training_template(tok, trl_training.replace("{%- generation %}", "{%- generation %}{{- '' }}"), fmt)


def _records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "tier": 4, "messages": [{"role": "user", "content": f"What is {i} + 3?"},
                                                     {"role": "assistant", "content": f"{i + 3}"}],
             "reasoning": f"{i} plus 3 makes {i + 3}.", "final": f"{i + 3}"} for i in range(n)]


def test_mode_mix_follows_the_ratio(tiny_path):
    fmt = detect_format(_tokenizer(tiny_path, "ours"))
    rows, counts = mix_modes(_records(200), SFTThinking(think_ratio=0.3), fmt, seed=1)
    assert (counts["think_rows"], counts["no_think_rows"], counts["think_fraction"]) == (60, 140, 0.3)
    assert rows == mix_modes(_records(200), SFTThinking(think_ratio=0.3), fmt, seed=1)[0]  # seeded
    assert rows != mix_modes(_records(200), SFTThinking(think_ratio=0.3), fmt, seed=2)[0]
    # fast answers (no reasoning) beside slow ones: the ratio is met from the rows that have reasoning
    half = [{**r, "reasoning": None} if i % 2 else r for i, r in enumerate(_records(200))]
    rows, counts = mix_modes(half, SFTThinking(think_ratio=0.5), fmt, seed=1)
    assert (counts["think_rows"], counts["think_short"]) == (100, 0)
    assert all(row["reasoning"] for row in rows if row["mode"] == THINK)
    rows, counts = mix_modes(half, SFTThinking(think_ratio=0.8), fmt, seed=1)
    assert (counts["think_rows"], counts["think_short"]) == (100, 60)
    for row in rows:
        text = row["messages"][-1]["content"]
        assert row["enable_thinking"] == (row["mode"] == THINK)
        assert text.startswith("<think>\n\n</think>\n\n") == (row["mode"] == NO_THINK)
    no_reasoning = [{**r, "reasoning": None} for r in _records(4)]
    rows, counts = mix_modes(no_reasoning, SFTThinking(think_ratio=0.0), fmt, seed=1)
    assert counts["no_think_rows"] == 4
    with pytest.raises(ValueError, match="stages.answer.thinking"):
        mix_modes(no_reasoning, SFTThinking(think_ratio=0.5), fmt, seed=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_masks_no_think_markers_in_fast_rows(tiny_path, family, tmp_path):
    """TRL's SFTTrainer tokenizes the mixed set: slow rows train on their think block, fast rows on the answer only."""
    tok = _tokenizer(tiny_path, family)
    fmt = detect_format(tok)
    cfg = SFTStageConfig(model=str(tiny_path), max_length=256, thinking=SFTThinking(think_ratio=0.5),
                         chat_template_path=str(HUNYUAN_TRAINING) if family == "hunyuan" else None)
    rows, counts = mix_modes(_records(8), cfg.thinking, fmt, seed=0)
    assert counts["think_rows"] and counts["no_think_rows"]
    template = training_chat_template(tok, cfg.chat_template_path) or tok.chat_template
    tok.chat_template = think_training_template(tok, template, fmt)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    model.resize_token_embeddings(len(tok))
    args = training_args(cfg, {"use_gpu": False, "world_size": 1}, tmp_path, False, 1, 0)
    trainer = make_sft_trainer(model, tok, rows, cfg, args, None)
    for example, row in zip(trainer.train_dataset, rows, strict=True):
        ids, labels = example["input_ids"], example["labels"]
        trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != -100])
        prompt = tok.decode(ids[:next(i for i, lab in enumerate(labels) if lab != -100)])  # before the target
        if row["mode"] == THINK:
            assert trained.startswith(f"<think>\n{row['reasoning']}\n</think>\n")
        else:
            assert "think>" not in trained and prompt.endswith(fmt.empty_block)
        assert row["final"] in trained and "What is" not in trained
