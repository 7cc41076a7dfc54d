"""Unit tests for code-writing instructions, written by a model from the instruction alone and kept on the answer
record (``tests``), so the filter's self-consistency runs every response's code against them in the sandbox.

Only ``assert`` statements that parse are kept (at most ``max_tests``); an instruction whose model output yields
none gets no tests, and its responses are then not checked by running (the check needs tests). The record field
is a JSON list of strings (one Arrow type whatever the count): ``critique.consistency.record_tests`` reads it.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from critique.consistency import NO_TESTS
from pipeline.run.stage import OptionalModelRole, record_seed
from pipeline.templates import TemplateError, chat_messages, load_yaml_file, render

_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


class CodeTestsConfig(BaseModel):
    """Unit tests written for code instructions (run by the filter's self-consistency in the sandbox)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    enabled: bool = True
    """Write tests for the instructions of ``task_types``."""
    model: OptionalModelRole = None
    """Model role that writes the tests; None: the role that answers the instruction."""
    task_types: list[str] = Field(default_factory=lambda: ["code_write"])
    """Instruction task types that get tests (taxonomy task types; code explanations have nothing to run)."""
    prompts: str = "configs/prompts/code_tests.yaml"
    """Test prompt file: `system` and `prompt` with {instruction} and {n}."""
    n: int = Field(3, ge=1, le=10)
    """Assert statements asked for."""
    max_tests: int = Field(5, ge=1)
    """Most assert statements kept per instruction."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature (0: greedy)."""
    max_tokens: int = Field(192, ge=16)
    """Longest test output in tokens."""


def load_test_prompt(path: str) -> tuple[str | None, str]:
    """(system, prompt) of the test prompt file; errors name the file."""
    data = load_yaml_file(path)
    if not isinstance(data.get("prompt"), str) or "{instruction}" not in data["prompt"]:
        raise TemplateError(f"{path}: needs a `prompt` string with the placeholder {{instruction}}")
    return data.get("system"), data["prompt"]


def parse_tests(text: str, max_tests: int) -> list[str]:
    """The distinct ``assert`` statements of a model's output that parse as Python and call something (from its
    code blocks, or the whole text when it has none), in order, at most ``max_tests``."""
    blocks = _BLOCK.findall(text) or [text]
    out: list[str] = []
    for line in (ln.strip() for b in blocks for ln in b.splitlines()):
        if not line.startswith("assert ") or line in out:
            continue
        try:
            tree = ast.parse(line)
        except SyntaxError:
            continue
        # an assert that calls nothing (``assert a + b == 3``) cannot test a solution: not kept
        if len(tree.body) == 1 and isinstance(tree.body[0], ast.Assert) and any(
                isinstance(node, ast.Call) for node in ast.walk(tree.body[0].test)):
            out.append(line)
        if len(out) == max_tests:
            break
    return out


def write_tests(records: Sequence[dict], roles: Sequence[str], cfg: CodeTestsConfig,
                get_pool: Callable[[str], Any], run_seed: int = 0) -> list[str]:
    """The ``tests`` field of each record (``NO_TESTS`` for those not in ``task_types``); ``roles[i]`` answers
    record i (and writes its tests unless ``cfg.model`` is set)."""
    from pipeline.engines.pool import ChatRequest

    out = [NO_TESTS] * len(records)
    if not cfg.enabled:
        return out
    system, prompt = load_test_prompt(cfg.prompts)
    by_role: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        if rec.get("task_type") in cfg.task_types:
            by_role.setdefault(cfg.model or roles[i], []).append(i)
    for role, indices in by_role.items():
        requests = [ChatRequest(messages=chat_messages(system, render(prompt, instruction=records[i]["instruction"],
                                                                      n=str(cfg.n))),
                                n=1, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                                seed=record_seed(run_seed, records[i]["id"], "code_tests"))
                    for i in indices]
        for i, result in zip(indices, get_pool(role).generate(requests), strict=True):
            text = result.completions[0].text if result.completions else ""
            out[i] = json.dumps(parse_tests(text, cfg.max_tests))
    return out
