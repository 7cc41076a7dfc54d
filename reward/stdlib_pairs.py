"""Prompts, SFT rows and preference pairs derived from CPython's standard-library docstrings.

Tests and benchmarks of the reward model and online DPO need data without running the upstream
stages; this is real text that installs with every Python, not a hand-written corpus. Each
public function of a fixed list of pure-Python stdlib modules gives a question ("What does the
Python function `json.dumps` do?") whose good answer is the first paragraph of its docstring.
A rejected answer is either another function's paragraph (wrong) or the good one cut short
(truncated), so a reward model can learn both relevance and completeness.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import re

from pipeline.records import source_item

MODULES = (
    "json", "os.path", "re", "string", "textwrap", "itertools", "functools", "collections", "shutil",
    "statistics", "heapq", "bisect", "difflib", "fnmatch", "glob", "base64", "copy", "pprint", "inspect",
    "operator", "calendar", "tempfile", "html", "urllib.parse", "csv", "gzip", "zipfile", "tarfile",
    "random", "uuid", "secrets", "dataclasses", "enum", "typing", "argparse", "logging", "pathlib",
    "datetime", "fractions", "decimal", "ipaddress", "shlex", "locale", "gettext", "codecs", "struct",
    "contextlib", "abc", "numbers", "types", "weakref", "queue", "threading", "subprocess", "platform",
    "sysconfig", "importlib", "pkgutil", "zipimport", "tokenize", "ast", "dis", "pickle", "copyreg",
    "shelve", "dbm", "sqlite3", "hashlib", "hmac", "mimetypes", "email.utils", "http.cookies", "wave",
    "colorsys", "timeit", "trace", "traceback", "warnings", "unittest", "doctest", "getpass", "netrc",
)


def _first_paragraph(doc: str, max_chars: int) -> str:
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    text = " ".join(para.split())
    if len(text) > max_chars:  # cut at a sentence end when there is one
        cut = text[:max_chars]
        end = cut.rfind(". ")
        text = cut[: end + 1] if end > max_chars // 3 else cut
    return text


def stdlib_docs(min_chars: int = 60, max_chars: int = 400) -> list[tuple[str, str]]:
    """(qualified name, first docstring paragraph) of public stdlib functions, deterministic order."""
    out, seen = [], set()
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:  # a Python built without e.g. sqlite3
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            text = _first_paragraph(doc, max_chars)
            if len(text) < min_chars or text in seen:
                continue
            seen.add(text)
            out.append((f"{mod_name}.{name}", text))
    return out


def _id(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


def item(name: str) -> str:
    """The source item (``pipeline.records.source_item``) of every record about function ``name``."""
    return source_item({"seed_id": _id("seed", name)})


def question(name: str) -> str:
    return f"What does the Python function `{name}` do?"


def prompt_records(names: list[str]) -> list[dict]:
    """`evolved`-style instruction rows (the fields online DPO reads)."""
    return [{"id": _id("prompt", n), "instruction": question(n), "domain": "code", "task_type": "explain",
             "seed_id": _id("seed", n), "source_kind": "code", "parent_id": None, "operator": None,
             "round": 0, "model": "cpython-docstrings"} for n in names]


def sft_records(docs: list[tuple[str, str]]) -> list[dict]:
    """`sft`-style rows: the docstring paragraph answers the question."""
    return [{"id": _id("sft", n), "messages": [{"role": "user", "content": question(n)},
                                               {"role": "assistant", "content": text}], "tier": 4,
             "seed_id": _id("seed", n)}
            for n, text in docs]


def preference_records(docs: list[tuple[str, str]], seed: int = 0, truncated_share: float = 0.5) -> list[dict]:
    """TRL conversational pairs: chosen = the function's paragraph; rejected = another function's
    paragraph, or (a ``truncated_share`` of the pairs) the chosen one cut to its first few words. ``seed_id`` is
    the function's item, ``rejected_seed_id`` the other function's (None for a truncated rejection)."""
    rng = random.Random(seed)
    out = []
    for i, (name, text) in enumerate(docs):
        other = None
        if rng.random() < truncated_share:
            words = text.split()
            bad, kind = " ".join(words[: max(2, min(6, len(words) // 4))]), "truncated"
        else:
            j = rng.randrange(len(docs) - 1)
            other = docs[j + (j >= i)][0]
            bad, kind = docs[j + (j >= i)][1], "other_function"
        out.append({
            "id": _id("pair", name, kind),
            "prompt": [{"role": "user", "content": question(name)}],
            "chosen": [{"role": "assistant", "content": text}],
            "rejected": [{"role": "assistant", "content": bad}],
            "source": "critique", "chosen_score": 1.0, "rejected_score": 0.0, "rejected_kind": kind,
            "seed_id": _id("seed", name),
            # the rejected text is another function's docstring: that function's item is used by the pair too
            "rejected_seed_id": _id("seed", other) if other else None,
        })
    return out
