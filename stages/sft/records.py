"""SFT records: the checks they must pass, the held-out split, each phase's records, the LR window of each
phase, and the training data staged in the work folder for the training processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from pipeline.thinking import MODE_FIELD
from pipeline.training.moe_config import LRWindow
from stages.sft.config import SFTStageConfig
from stages.sft.modes import ENABLE_THINKING_COLUMN

STAGED_COLUMNS = ("id", "tier", "messages", MODE_FIELD, ENABLE_THINKING_COLUMN)
"""Record fields the training processes read; lineage columns stay behind."""


class SFTDataError(ValueError):
    """The SFT records cannot be trained on; the message names the record/field and the fix."""


def check_records(records: Sequence[dict]) -> None:
    """Every record must have an id, a tier 1-4 and chat `messages` with an assistant turn."""
    for i, rec in enumerate(records):
        rid = rec.get("id", f"#{i}")
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise SFTDataError(f"sft record {rid}: field `messages` must be a non-empty list of "
                               "{role, content}; fix: re-run the filter stage")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise SFTDataError(f"sft record {rid}: every message needs string `role` and `content`, got {m!r}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise SFTDataError(f"sft record {rid}: `messages` has no assistant turn, so there is nothing to train on")
        if rec.get("tier") not in (1, 2, 3, 4):
            raise SFTDataError(f"sft record {rid}: field `tier` must be 1-4 (critique tier), got {rec.get('tier')!r}; "
                               "fix: re-run the filter stage")


def _hash_unit(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def split_heldout(records: Sequence[dict], fraction: float, max_records: int, seed: int) -> tuple[list, list]:
    """(train, heldout): held-out records are those with the smallest hash of (seed, id), a stable choice."""
    n = min(max_records, int(round(len(records) * fraction)))
    if fraction > 0 and n == 0 and len(records) >= 4 and max_records > 0:
        n = 1
    if n == 0:
        return list(records), []
    order = sorted(range(len(records)), key=lambda i: _hash_unit(f"{seed}:{records[i].get('id', i)}"))
    held = set(order[:n])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def phase_records(records: Sequence[dict], tiers: Sequence[int]) -> list[dict]:
    """The records a phase with these tiers trains on, in their order."""
    keep = set(tiers)
    return [r for r in records if r["tier"] in keep]


def lr_windows(sizes: Sequence[float], cfg: SFTStageConfig) -> list[LRWindow]:
    """Split one global schedule over the phases in proportion to their work (records x epochs)."""
    total = sum(sizes) or 1.0
    windows, start = [], 0.0
    min_rate = cfg.min_learning_rate / cfg.learning_rate
    for size in sizes:
        end = start + size / total
        windows.append(LRWindow(start=start, end=end, kind=cfg.lr_scheduler, warmup_ratio=cfg.warmup_ratio,
                                min_lr_rate=min_rate))
        start = end
    return windows


def stage_splits(work: Path, train: Sequence[dict], heldout: Sequence[dict]) -> None:
    """Write the train and held-out records (``STAGED_COLUMNS``) as Parquet in ``work/data`` for the workers."""
    from datasets import Dataset

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    Dataset.from_list([{c: r.get(c) for c in STAGED_COLUMNS} for r in train]).to_parquet(str(data / "train.parquet"))
    heldout_path = data / "heldout.parquet"
    if heldout:
        Dataset.from_list([{c: r.get(c) for c in STAGED_COLUMNS} for r in heldout]).to_parquet(str(heldout_path))
    else:
        heldout_path.unlink(missing_ok=True)


def read_splits(work: Path) -> tuple[list[dict], list[dict]]:
    """(train, heldout) as ``stage_splits`` wrote them."""
    from datasets import Dataset

    train = Dataset.from_parquet(str(work / "data" / "train.parquet")).to_list()
    heldout_path = work / "data" / "heldout.parquet"
    heldout = Dataset.from_parquet(str(heldout_path)).to_list() if heldout_path.exists() else []
    return train, heldout
