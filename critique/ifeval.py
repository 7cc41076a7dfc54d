"""IFEval scoring with Google's instruction checkers (from the maintained ``if-verifiable`` package).

``CHECKERS`` maps an instruction id (``"punctuation:no_comma"``, ``"length_constraints:number_words"``, ...) to
its checker class; ``check_response`` runs the checkers of one prompt on one response, strict and loose, exactly as
Google's ``evaluation_lib`` does (loose: the response also passes when it passes after dropping its first line,
its last line, both, and/or every ``*``; an empty response follows nothing). The registry is usable outside IFEval:
any record that carries instruction ids and their arguments can be checked with it.

Two deliberate differences from the published setup, both so that figures are the same on every machine:

- Sentence splitting. Two checkers need NLTK's Punkt sentence splitter: ``length_constraints:number_sentences``
  (Punkt's sentence count) and ``change_case:capital_word_frequency`` (NLTK's ``word_tokenize``, which splits
  sentences first). Published IFEval figures use Punkt's English model (the ``punkt``/``punkt_tab`` data), which
  cannot be downloaded here. Both checkers here use NLTK's ``PunktSentenceTokenizer()`` untrained, whether or not
  the data is installed: it knows no abbreviations, so it splits after "Mr.", "e.g." or "U.S." followed by a
  space where the trained model does not, and a response can count more sentences than it would in published
  figures (a "less than N sentences" instruction can fail, an "at least N" one pass, where they would not). The
  capital-word count is unaffected in practice: the splitter only decides where a period is cut off a word,
  which does not change whether the word is upper case.
- Language detection. ``langdetect`` is random unless seeded; it is seeded with 0 (as Google's current code does),
  so ``language:response_language`` and the English-casing checkers give the same verdict every run.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

SENTENCE_SPLITTER = "nltk PunktSentenceTokenizer, untrained"
"""What splits sentences for the checkers that count sentences (see the module docstring)."""


@functools.lru_cache(maxsize=1)
def _punkt():
    from nltk.tokenize import PunktSentenceTokenizer

    return PunktSentenceTokenizer()


def count_sentences(text: str) -> int:
    """Sentences in ``text`` by the untrained Punkt splitter."""
    return len(_punkt().tokenize(text))


def word_tokens(text: str) -> list[str]:
    """NLTK's ``word_tokenize`` (its Treebank-style word tokenizer on each sentence) over the untrained Punkt
    splitter instead of the trained English model."""
    from nltk.tokenize import NLTKWordTokenizer

    words = NLTKWordTokenizer()
    return [tok for sentence in _punkt().tokenize(text) for tok in words.tokenize(sentence)]


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, type]:
    import langdetect
    from if_verifiable.ifeval import instructions
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    langdetect.DetectorFactory.seed = 0
    less_than, at_least = instructions._COMPARISON_RELATION

    # The two checkers that load Punkt's trained model, with the untrained splitter; their comparisons are the
    # library's, restated here because the library calls NLTK inside check_following.
    class NumberOfSentences(instructions.NumberOfSentences):
        def check_following(self, value: str) -> bool:
            n = count_sentences(value)
            if self._comparison_relation == less_than:
                return n < self._num_sentences_threshold
            return n >= self._num_sentences_threshold

    class CapitalWordFrequency(instructions.CapitalWordFrequencyChecker):
        def check_following(self, value: str) -> bool:
            n = sum(word.isupper() for word in word_tokens(value))
            if self._comparison_relation == less_than:
                return n < self._frequency
            return n >= self._frequency

    registry = dict(INSTRUCTION_DICT)
    for name, cls in (("length_constraints:number_sentences", NumberOfSentences),
                      ("change_case:capital_word_frequency", CapitalWordFrequency)):
        if registry[name] is not cls.__mro__[1]:
            raise RuntimeError(f"if-verifiable maps {name} to {registry[name].__name__}, not the checker this module "
                               "replaces; fix: install the if-verifiable version in pyproject.toml")
        registry[name] = cls
    return registry


def checkers() -> dict[str, type]:
    """Instruction id -> checker class (IFEval's registry with the sentence splitter above). Build one with
    ``cls(instruction_id)``, then ``build_description(**kwargs)`` and ``check_following(text)``."""
    return dict(_registry())


def unknown_instructions(instruction_ids: Iterable[str]) -> list[str]:
    """The ids among ``instruction_ids`` that no checker handles, sorted."""
    return sorted(set(instruction_ids) - set(_registry()))


def check_response(response: str, instruction_ids: Sequence[str], kwargs: Sequence[dict[str, Any]],
                   prompt: str = "") -> dict[str, list[bool]]:
    """Whether ``response`` follows each instruction: ``{"strict": [...], "loose": [...]}``, one verdict per
    instruction in order. ``kwargs`` are the instructions' arguments; ``prompt`` is needed by the checkers that
    compare the response with it (``combination:repeat_prompt`` takes it from its arguments in IFEval).

    Uses ``if_verifiable.common.evaluate_instructions`` (Google's strict and loose rules); a response that is empty
    after dropping a reasoning model's ``<think>`` block follows no instruction, as in Google's code."""
    from if_verifiable.common import evaluate_instructions

    unknown = unknown_instructions(instruction_ids)
    if unknown:
        raise ValueError(f"no checker for instruction(s) {unknown}; known: {', '.join(sorted(_registry()))}")
    if len(kwargs) != len(instruction_ids):
        raise ValueError(f"{len(instruction_ids)} instructions but {len(kwargs)} kwargs dicts; give one per instruction")
    results, _ = evaluate_instructions(response=response, instruction_id_list=list(instruction_ids),
                                       kwargs_list=[dict(k) for k in kwargs], prompt=prompt,
                                       instruction_registry=_registry())
    if not results:  # empty response: the library returns no verdicts, Google's code counts each as not followed
        return {"strict": [False] * len(instruction_ids), "loose": [False] * len(instruction_ids)}
    return {"strict": [r.strict_pass for r in results], "loose": [r.loose_pass for r in results]}


def score_prompt(row: dict[str, Any], response: str) -> dict[str, Any]:
    """Verdicts of one benchmark prompt (``{key, prompt, instruction_id_list, kwargs}``) on ``response``: the
    per-instruction lists plus the prompt-level verdicts (every instruction followed)."""
    verdicts = check_response(response, row["instruction_id_list"], row["kwargs"], row["prompt"])
    return {**verdicts, "prompt_strict": all(verdicts["strict"]), "prompt_loose": all(verdicts["loose"])}
