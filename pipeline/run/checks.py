"""Pre-flight checks of a run, before any stage starts: every input has a source, every model folder exists.

Each check collects every problem and raises one ``RunError`` listing them with their fixes, so a
config with three mistakes is fixed in one edit, not three runs.
"""

from __future__ import annotations

from pipeline.run.artifacts import ArtifactStore
from pipeline.run.config import RunConfig
from pipeline.run.errors import RunError
from pipeline.run.graph import producers
from pipeline.run.stage import Stage, roles_named


def disk_sources(store: ArtifactStore) -> dict[str, dict]:
    """Outputs of finished stages on disk (for inputs no enabled stage produces): name -> {stage, fingerprint,
    state}."""
    found: dict[str, dict] = {}
    for n, m in store.manifests().items():
        if m.get("state") not in ("done", "stale"):
            continue
        for out, desc in (m.get("outputs") or {}).items():
            found[out] = {"stage": n, "fingerprint": desc.get("fingerprint"), "state": m["state"]}
    return found


def check_inputs(store: ArtifactStore, stages: dict[str, Stage], names: list[str], only: str | None) -> None:
    """Every input of the stages to run comes from an enabled stage or a finished one on disk."""
    made_by = producers(stages)
    disk = disk_sources(store)
    problems = []
    for n in names:
        for inp in stages[n].inputs:
            src = made_by.get(inp)
            if src is not None and (only is None or src == n):
                continue
            if src is not None:  # `posttrain stage`: the producer must already be done
                m = store.read_manifest(src)
                state = m.get("state") if m else "never run"
                if state == "done" or (state == "stale" and inp in disk):
                    continue
                problems.append(f"stage {n} reads {inp!r} from stage {src}, which is not done (state: {state}); "
                                f"fix: posttrain run CONFIG (or posttrain stage {src} CONFIG) first")
            elif inp not in disk or not store.artifact_exists(inp):
                problems.append(f"stage {n} reads {inp!r}, which no enabled stage writes and {store.root} "
                                "does not hold; fix: add the stage that writes it to graph")
    if problems:
        raise RunError("\n".join(problems))


def check_model_folders(cfg: RunConfig, names: list[str]) -> None:
    """Every model folder a stage to run names (through a role) exists and holds a model. Otherwise a missing
    folder would surface only when that stage starts, after the earlier stages ran. Embedded names are skipped:
    they are built on first use."""
    from pipeline.models.catalog import EMBEDDED, ModelError, resolve_model

    users: dict[str, list[str]] = {}
    for name in names:
        section = cfg.stage_config(name)
        for _, role in roles_named(section) if section is not None else ():
            users.setdefault(role, []).append(name)
    problems = []
    for role, stages in sorted(users.items()):
        model = cfg.models[role].model if role in cfg.models else None
        if model is None or model in EMBEDDED:
            continue
        try:
            resolve_model(model)
        except ModelError as exc:
            problems.append(f"models.{role}.model (used by {', '.join(dict.fromkeys(stages))}): {exc}")
    if problems:
        raise RunError("\n".join(problems))
