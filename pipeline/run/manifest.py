"""A stage's manifest (``RUN_DIR/stages/<stage>/manifest.json``) as a typed record.

The JSON keys are the field names (ARCHITECTURE.md lists them). Manifests written by other versions of
posttrain read back: missing keys take their defaults and unknown keys are kept and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["running", "done", "failed", "stale"]
"""``running`` is also what a killed run leaves behind."""


@dataclass
class StageManifest:
    """State, fingerprint, inputs, outputs, counts, timings and metrics of one stage of a run."""

    stage: str
    state: State = "running"
    fingerprint: str | None = None
    """Hash of ``fingerprint_parts``: a ``done`` stage whose fingerprint matches is skipped."""
    fingerprint_parts: dict[str, Any] = field(default_factory=dict)
    """stage, config, code (a hash per file the stage uses), seed, inputs, pools."""
    reason: str | None = None
    """Why the runner ran it (the plan's reason)."""
    config: dict[str, Any] = field(default_factory=dict)
    declared_inputs: list[str] = field(default_factory=list)
    declared_outputs: list[str] = field(default_factory=list)
    inputs: dict[str, dict] = field(default_factory=dict)
    """input name -> {fingerprint, stage that wrote it}."""
    outputs: dict[str, dict] = field(default_factory=dict)
    """output name -> {kind, path, records, shards, fingerprint} (models: files and bytes instead of records)."""
    intermediates: dict[str, dict] = field(default_factory=dict)
    maps: dict[str, dict] = field(default_factory=dict)
    """``ctx.map`` bookkeeping per name: shards, done, resumed, retries, records_in."""
    metrics: dict[str, Any] = field(default_factory=dict)
    pools_used: dict[str, str] = field(default_factory=dict)
    """model role -> model, for every pool the stage used."""
    attempts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    previous_duration_s: float = 0.0
    """Seconds spent by earlier, interrupted attempts."""
    elapsed_s: float = 0.0
    pid: int | None = None
    host: str | None = None
    error: str | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    ray: dict | None = None
    stale_reason: str | None = None
    """Set when an upstream stage reran (only written when set)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know (kept, so a rewrite loses nothing)."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageManifest:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if out["stale_reason"] is None:
            del out["stale_reason"]
        out.update(self.extra)
        return json.loads(json.dumps(out, default=str))
