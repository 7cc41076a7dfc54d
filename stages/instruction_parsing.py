"""Robust parsing of model output that should be one instruction, and the reasons to reject it.

Small models wrap the instruction in chatter ("Sure! Here is a question: ..."), number it, put it
in quotes or bold, follow it with an answer, refuse, or echo the prompt. ``parse_instruction``
peels the wrapping off and returns either the instruction or the reason it was rejected (one of
``REJECT_REASONS``), so stages can count drops by reason.
"""

from __future__ import annotations

import difflib
import re
from typing import Literal

Expect = Literal["question", "task", "any"]

REJECT_REASONS = ("empty", "refusal", "chatter", "answer_not_instruction", "no_question", "too_short", "too_vague",
                  "too_long", "copy", "prompt_echo", "refers_to_unseen_text", "duplicate")

# Leading labels the model puts before the instruction.
LABEL = re.compile(
    r"^(?:#+\s*)?(?:\*\*|__)?\s*(?:(?:here(?:'s| is)|this is)\s+(?:a|an|one|the|my|your)?\s*[\w\s,-]{0,40}?"
    r"|(?:the\s+)?(?:new|rewritten|improved|evolved|harder|clearer|final|revised|generated|example)?\s*"
    r"(?:question|task|instruction|problem|prompt|exercise|request|query|q|word problem))\s*(?:\d+)?\s*"
    r"(?:\*\*|__)?\s*[:：]\s*(?:\*\*|__)?\s*",
    re.IGNORECASE,
)
NUMBERING = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+")
REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i (?:can ?not|can't|cannot|won't|am unable|'m unable|"
    r"am not able|'m not able|don't have|do not have)|as an ai|unfortunately,? i|no, i'?m not)",
    re.IGNORECASE,
)
CHATTER = re.compile(
    r"^(?:i'?m (?:here|ready|happy|glad|a new|an ai|a helpful|smollm)|i am (?:here|ready|happy|an ai)|"
    r"(?:sure|certainly|of course|absolutely|great|okay|ok)\b[!,.]|let'?s |hello|hi\b|thank you|"
    r"what (?:would|can|do) (?:you|i) (?:like|help|want|need)|how can i (?:help|assist)|david,|"
    r"i'?m (?:not sure|not an ai|afraid)|i am not sure|what a\b|what's your|what is your (?:task|question))",
    re.IGNORECASE,
)
ANSWER_START = re.compile(
    r"^(?:answer\s*[:：]|the answer(?: is)?\b|solution\s*[:：]|yes[,.!]|no[,.!]|this (?:code|function|program|"
    r"python function|text|script) (?:defines|is|calculates|does|returns|implements|uses|describes|"
    r"explains)|the (?:code|function|text|script) (?:above )?(?:defines|is|calculates|returns|describes)|"
    r"to (?:solve|answer) this)",
    re.IGNORECASE,
)
ANSWER_MARKERS = re.compile(r"^(?:answer|solution|output|response|a)\s*[:：]", re.IGNORECASE | re.MULTILINE)
UNSEEN_TEXT = re.compile(
    r"\b(?:the|this|above|given|following|provided) (?:text|passage|article|document|excerpt|snippet|"
    r"code(?: snippet)?|paragraph)(?: above| below)?\b|\bthe above\b|\b(?:mentioned|shown|described) (?:above|below)\b",
    re.IGNORECASE,
)
# How requests start: a question word, or an imperative verb (optionally after "Your task is to").
QUESTION_START = re.compile(
    r"^(?:how|what|what's|why|when|where|which|who|whom|whose|is|are|can|could|should|would|does|do|did|"
    r"will|has|have)\b", re.IGNORECASE)
IMPERATIVE_START = re.compile(
    r"^(?:(?:please|now|then|also)\s*,?\s+)?(?:(?:your|the) task is to\s+|you (?:are asked|need|have) to\s+)?"
    r"(?:write|explain|describe|create|implement|compose|draft|list|give|calculate|compute|find|solve|"
    r"determine|show|summari[sz]e|rewrite|compare|design|build|develop|make|generate|suggest|provide|"
    r"outline|identify|define|translate|convert|prove|estimate|imagine|plan|discuss|analy[sz]e|evaluate|"
    r"modify|fix|debug|refactor|add|use|tell|name|predict|classify|complete|fill|sort|count|convince|"
    r"argue|recommend|propose|given|suppose|consider|assume|read|look|check|test|print|return|remove|"
    r"replace|reverse|merge|split|parse|format|read|simplify|expand|factor|graph|draw|rank|choose|select|"
    r"describe)\b", re.IGNORECASE)


def _is_request(text: str) -> bool:
    """An imperative or a question, or a setup whose last sentence is a question ('Tom has 3 pens. How
    many ...?'). Statements ('A list comprehension is ...', 'To do this, use ...') are not."""
    text = text.strip()
    sentences = SENTENCE_SPLIT.split(text)
    if IMPERATIVE_START.match(text):
        return True
    if QUESTION_START.match(text):  # "When running X, you can ..." is a statement, "When does X ...?" is not
        return sentences[0].rstrip().endswith("?")
    last = sentences[-1]
    return last.rstrip().endswith("?") and bool(QUESTION_START.match(last) or IMPERATIVE_START.match(last))


VAGUE_WORDS = frozenset(
    "what which who whom whose why when where how is are was were the this that these those it its can could "
    "does did will would should about there here you your one thing things next step answer question".split())
ANSWER_SENTENCE = re.compile(
    r"^(?:to solve|to answer|to do this|we (?:need|can|will|first)|the answer|the solution|here(?:'s| is)|"
    r"this (?:function|code|program|is)|first,|step 1|solution|sure|i (?:will|would|can))", re.IGNORECASE)
LEAD_IN = re.compile(r"^[^?:\"“]{3,60}?[:：]\s+")
SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“])")
META_SENTENCE = re.compile(r"\b(?:question|the text|this text|task|answer|problem|here is|here's)\b", re.IGNORECASE)


def _strip_wrapping(text: str) -> str:
    text = text.strip()
    for _ in range(3):  # labels can nest: "**Task 1:** Question: ..."
        new = NUMBERING.sub("", LABEL.sub("", text, count=1), count=1).strip()
        if new == text:
            break
        text = new
    text = text.strip().strip("*_").strip()
    if len(text) >= 2 and text[0] in "\"'“‘`" and text[-1] in "\"'”’`" and text.count(text[0]) <= 2:
        text = text[1:-1].strip()
    return text


def _blocks(text: str, limit: int = 4) -> list[str]:
    """Candidate blocks: paragraphs (lines joined) before the first code fence, at most ``limit``.

    A numbered list item or an 'Answer:' line ends a paragraph; an answer on the same line
    ("... how many are left? Answer: 8") is cut off.
    """
    blocks: list[str] = []
    lines: list[str] = []

    def flush() -> None:
        if lines:
            block = " ".join(lines).strip()
            blocks.append(re.split(r"\s(?:answer|solution)\s*[:：]", block, maxsplit=1, flags=re.IGNORECASE)[0].strip())
            lines.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            break
        if not stripped or (lines and (ANSWER_MARKERS.match(stripped) or NUMBERING.match(line))):
            flush()
            if not stripped:
                continue
        lines.append(stripped)
    flush()
    return [b for b in blocks if b][:limit]


def _unlabel(block: str) -> str:
    """Drop wrapping and a short lead-in label ('A related question would be: ...')."""
    block = _strip_wrapping(block)
    m = LEAD_IN.match(block)
    if m and _is_request(_strip_wrapping(block[m.end():])):
        block = _strip_wrapping(block[m.end():])
    return block


def _question_in(block: str) -> str | None:
    """The question a block asks: a quoted question, else the text up to the first '?', without
    leading meta sentences ('The text asks for a question.')."""
    quoted = re.search(r"[\"“]([^\"”]{8,}?\?)[\"”]", block)
    if quoted:
        return quoted.group(1).strip()
    idx = block.find("?")
    if idx < 0:
        return None
    text = block[: idx + 1]
    sentences = SENTENCE_SPLIT.split(text)
    while len(sentences) > 1 and META_SENTENCE.search(sentences[0]):
        sentences = sentences[1:]
    return " ".join(sentences).strip()


def instruction_key(text: str) -> str:
    """Text with case, punctuation and spacing folded: two instructions with the same key are duplicates."""
    return re.sub(r"\W+", " ", text).strip().casefold()


def similarity(a: str, b: str) -> float:
    """Similarity of two texts after normalizing case and whitespace (difflib ratio, 0..1)."""
    na, nb = (re.sub(r"\W+", " ", x).strip().casefold() for x in (a, b))
    if not na or not nb:
        return 0.0
    return difflib.SequenceMatcher(None, na, nb, autojunk=False).ratio()


def parse_instruction(raw: str, expect: Expect = "any", *, min_words: int = 3, max_words: int = 120,
                      copy_of: str | None = None, copy_threshold: float = 0.9, prompt: str | None = None,
                      allow_unseen_refs: bool = False) -> tuple[str | None, str | None]:
    """(instruction, None) if ``raw`` holds a usable instruction, else (None, reason).

    expect: 'question' keeps the first sentence ending in '?'; 'task' and 'any' keep the first
    block (paragraph before a blank line, code fence or 'Answer:' marker).
    copy_of: text the instruction must not copy (the parent instruction, the seed question).
    prompt: the prompt that produced ``raw``; an output that mostly repeats it is 'prompt_echo'.
    allow_unseen_refs: False drops instructions that mention "the text above" and the like, which a
    reader of the instruction alone cannot see.
    """
    if not raw or not raw.strip():
        return None, "empty"
    head = _strip_wrapping(raw.strip())
    if REFUSAL.match(head):
        return None, "refusal"
    first_reason = None
    for block in _blocks(head):
        if copy_of and similarity(_unlabel(block), copy_of) >= copy_threshold:
            return None, "copy"
        text, reason = _check_block(_unlabel(block), expect)
        if text is not None:
            return _final_checks(text, min_words=min_words, max_words=max_words, copy_of=copy_of,
                                 copy_threshold=copy_threshold, prompt=prompt, allow_unseen_refs=allow_unseen_refs)
        first_reason = first_reason or reason
    return None, first_reason or "empty"


def _cut_answer(block: str) -> str:
    """Drop an answer that follows the request in the same paragraph ('... To solve this, we ...')."""
    sentences = SENTENCE_SPLIT.split(block)
    for i, sentence in enumerate(sentences[1:], start=1):
        if ANSWER_SENTENCE.match(sentence):
            return " ".join(sentences[:i]).strip()
    return block


def _check_block(block: str, expect: Expect) -> tuple[str | None, str | None]:
    if not block:
        return None, "empty"
    if REFUSAL.match(block):
        return None, "refusal"
    if CHATTER.match(block):
        # "Sure! Here is the question: ..." keeps what follows the chatter on the same line.
        rest = re.split(r"[:!]\s+", block, maxsplit=1)
        block = _unlabel(rest[1]) if len(rest) == 2 else ""
        if not block or CHATTER.match(block) or REFUSAL.match(block):
            return None, "chatter"
    if ANSWER_START.match(block):
        return None, "answer_not_instruction"
    if expect == "question":
        question = _question_in(block)
        if question is None:
            return None, "no_question"
        question = _unlabel(question)
        last = SENTENCE_SPLIT.split(question)[-1]
        if not (_is_request(question) or QUESTION_START.match(last)) or CHATTER.match(question):
            return None, "no_question"
        return question, None
    if IMPERATIVE_START.match(block):
        return _cut_answer(block), None
    if QUESTION_START.match(block) and _is_request(block):
        return block[: block.rfind("?") + 1], None  # statements after the question answer it
    question = _question_in(block)  # a setup followed by its question, without what follows it
    if question is not None and _is_request(_unlabel(question)):
        return _unlabel(question), None
    return None, "answer_not_instruction"


def _final_checks(block: str, *, min_words: int, max_words: int, copy_of: str | None, copy_threshold: float,
                  prompt: str | None, allow_unseen_refs: bool) -> tuple[str | None, str | None]:
    words = block.split()
    if len(words) < min_words:
        return None, "too_short"
    if not [w for w in re.findall(r"[A-Za-z0-9_]{3,}", block) if w.lower() not in VAGUE_WORDS]:
        return None, "too_vague"  # "What is this?", "Which is it?": nothing to answer about
    if len(words) > max_words:
        return None, "too_long"
    if copy_of and similarity(block, copy_of) >= copy_threshold:
        return None, "copy"
    if prompt:
        if similarity(block, prompt[: max(len(block) * 2, 200)]) >= 0.6:
            return None, "prompt_echo"
        quoted = [q.lower() for q in re.findall(r"[\"“]([^\"”]{2,40})[\"”]", prompt)]
        if re.search(r"\b(?:reply with|only write|write only|the (?:question|task|instruction) only|starts? with)\b",
                     block, re.IGNORECASE) or any(f'"{q}"' in block.lower() for q in quoted):
            return None, "prompt_echo"
    if not allow_unseen_refs and UNSEEN_TEXT.search(block):
        return None, "refers_to_unseen_text"
    return block, None
