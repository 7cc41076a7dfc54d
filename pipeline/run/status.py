"""``posttrain status``: one row per stage of a run directory, read from its manifests."""

from __future__ import annotations

import contextlib
import os
import socket

from pipeline.run.artifacts import ArtifactStore
from pipeline.run.errors import RunError


def _alive(pid: int | None, host: str | None) -> bool:
    """Whether the process that owns a ``running`` manifest still runs (another host: assume so)."""
    if host != socket.gethostname():
        return True
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def status_rows(run_dir: str | os.PathLike) -> list[dict]:
    """One row per stage of a run directory: state, record counts, time, note."""
    import yaml

    store = ArtifactStore(run_dir)
    if not store.root.is_dir():
        raise RunError(f"{store.root} is not a run directory (it does not exist)")
    manifests = store.manifests()
    graph: list[str] = []
    cfg_path = store.root / "config.yaml"
    if cfg_path.exists():
        with contextlib.suppress(Exception):
            graph = list(yaml.safe_load(cfg_path.read_text()).get("graph") or [])
    # Dependency order from the manifests' declared inputs/outputs; ties: graph order, then start time.
    rank = {n: (graph.index(n) if n in graph else len(graph), manifests[n].get("started_at") or "") for n in manifests}
    producers = {o: n for n, m in manifests.items() for o in m.get("declared_outputs", [])}
    deps = {n: {producers[i] for i in m.get("declared_inputs", []) if i in producers} - {n}
            for n, m in manifests.items()}
    ordered: list[str] = []
    remaining = sorted(manifests, key=lambda n: rank[n])
    while remaining:
        ready = [n for n in remaining if deps[n] <= set(ordered)] or remaining[:1]
        ordered.append(ready[0])
        remaining.remove(ready[0])
    rows = []
    for n in ordered:
        m = manifests[n]
        state = m.get("state", "?")
        if state == "running" and not _alive(m.get("pid"), m.get("host")):
            state = "interrupted"
        if m.get("outputs"):
            counts = ", ".join(f"{o}={d['records']}" if d.get("kind") == "dataset" else f"{o}=model"
                               for o, d in m["outputs"].items())
        else:
            counts = ", ".join(f"{k}: {v.get('done', 0)}/{v.get('shards', 0)} shards"
                               for k, v in (m.get("maps") or {}).items())
        seconds = m.get("duration_s") if state == "done" else m.get("elapsed_s")
        note = m.get("error") if state == "failed" else m.get("stale_reason") if state == "stale" else ""
        if state in ("interrupted", "failed"):
            note = (note + "; " if note else "") + "rerun `posttrain run` to resume"
        rows.append({"stage": n, "state": state, "records": counts, "time": _fmt_s(seconds),
                     "finished": m.get("finished_at") or "-", "attempts": m.get("attempts", 1), "note": note or ""})
    for n in graph:
        if n not in manifests:
            rows.append({"stage": n, "state": "pending", "records": "", "time": "-", "finished": "-",
                         "attempts": 0, "note": ""})
    return rows
