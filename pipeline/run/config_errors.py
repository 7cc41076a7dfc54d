"""Readable config errors: one line per problem, naming the file (or the ``--set`` that caused it), the full
field path, what is allowed, and a close match for a misspelt name."""

from __future__ import annotations

import difflib
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError


def _unwrap(tp: Any) -> Any:
    """The model / dict / list type inside Optional, Union and Annotated wrappers."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(tp):
            inner = _unwrap(arg)
            if (isinstance(inner, type) and issubclass(inner, BaseModel)) or typing.get_origin(inner) in (dict, list):
                return inner
    return tp


def _walk(root: type[BaseModel], loc: tuple) -> tuple[list, type[BaseModel] | None]:
    """Field path of a pydantic error location (union branch tags dropped) and the model that
    holds the last field."""
    parts: list = []
    parent: type[BaseModel] | None = None
    cur: Any = root
    for item in loc:
        t = _unwrap(cur)
        if isinstance(t, type) and issubclass(t, BaseModel):
            parent = t
            parts.append(item)
            cur = t.model_fields[item].annotation if item in t.model_fields else None
        elif typing.get_origin(t) is dict:
            parts.append(item)
            cur = typing.get_args(t)[1]
        elif typing.get_origin(t) in (list, tuple) and isinstance(item, int):
            parts.append(item)
            cur = typing.get_args(t)[0] if typing.get_args(t) else None
        elif cur is None or t is Any:
            parts.append(item)
        # else: a union-branch tag such as "int" or "function-after[...]": not part of the path
    return parts, parent


def _fmt_path(parts: list) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def source_of(parts: tuple | list, source: str, origins: dict[tuple, str]) -> str:
    key = tuple(str(p) for p in parts)
    for path, text in origins.items():
        n = min(len(path), len(key))
        if n and path[:n] == key[:n]:
            return text
    return source


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _did_you_mean(name: Any, parent: type[BaseModel] | None) -> str:
    """' (did you mean 'rounds'?)' for a near miss among the parent's fields: a typo reads as one."""
    close = difflib.get_close_matches(str(name), list(parent.model_fields), n=1) if parent else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def format_errors(exc: ValidationError, root: type[BaseModel], source: str, origins: dict) -> list[str]:
    seen: dict[str, str] = {}
    for err in exc.errors():
        parts, parent = _walk(root, err["loc"])
        path = _fmt_path(parts)
        if path in seen:
            continue
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = ", ".join(parent.model_fields) if parent else "?"
            if parent is not None and parent.__name__ in ("StagesConfig", "ResourcesConfig"):
                msg = f"unknown stage {parts[-1]!r}{_did_you_mean(parts[-1], parent)}; known stages: {allowed} " \
                      "(add others with plugins:)"
            else:
                msg = f"unknown field {parts[-1]!r}{_did_you_mean(parts[-1], parent)}; allowed fields: {allowed}"
        elif kind == "missing":
            msg = "required field is missing"
        else:
            msg = f"{err['msg']} (got {_short(err.get('input'))})"
            info = parent.model_fields.get(parts[-1]) if parent is not None and parts else None
            doc = (info.description or "").strip().split("\n")[0] if info is not None else ""
            if doc:
                msg += f"; the field: {doc}"
        seen[path] = f"{source_of(parts, source, origins)}: {path}: {msg}"
    return list(seen.values())
