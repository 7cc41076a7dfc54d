"""Prompt-template and taxonomy files: find them, read them, fill them in.

Templates live in ``configs/prompts/*.yaml`` (not in code) so that users can change the wording
for their own models without touching the pipeline. A relative path is looked up in the current
directory first (a run started from a project folder, or ``ray job submit --working-dir``), then
in this repository, whose ``configs/`` holds the defaults.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


class TemplateError(ValueError):
    """A template or taxonomy file is missing or malformed; the message names the file and the fix."""


def resolve_config_file(path: str | Path) -> Path:
    """The file ``path`` names: as given, else relative to the repository root."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    raise TemplateError(f"{path}: file not found (looked in {Path.cwd()} and {REPO_ROOT}); "
                        "fix: give an existing YAML file, e.g. one of configs/prompts/*.yaml")


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    p = resolve_config_file(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise TemplateError(f"{p}: cannot read YAML ({exc}); fix: correct the file") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{p}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def template_fields(template: str) -> set[str]:
    """Names of the ``{placeholders}`` in a str.format template."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def check_template(template: str, allowed: set[str], where: str) -> None:
    """Fail early (at config load, not mid-run) if a template uses an unknown placeholder."""
    try:
        unknown = template_fields(template) - allowed
    except ValueError as exc:  # unbalanced braces
        raise TemplateError(f"{where}: malformed template ({exc}); fix: double literal braces as {{{{ }}}}") from None
    if unknown:
        raise TemplateError(f"{where}: unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def render(template: str, **values: Any) -> str:
    """Fill a template; surrounding whitespace is dropped (YAML block scalars end with a newline)."""
    return template.format(**values).strip()


def chat_messages(system: str | None, prompt: str) -> list[dict[str, str]]:
    """A chat request: the optional system message, then the user turn."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]
