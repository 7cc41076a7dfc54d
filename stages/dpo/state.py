"""The work folder of the rounds, which makes a killed run resumable.

    state.json            {"key", "version"}: the config, inputs and seed the folder belongs to
    baseline.json         the SFT policy's held-out samples: {"rewards", "tokens", "finish_reasons", "grades"}
                          (written before round 1; an earlier version wrote rewards only)
    round_NNN/pairs.jsonl the round's online pairs, and samples.json its sampling figures (written before training)
    round_NNN/policy/     the policy after the round (only the latest finished round keeps it)
    round_NNN/ema.safetensors   the EMA after the round, when kept (likewise)
    round_NNN/policy_dcp/ a Ray Train run's policy and EMA shards instead (torch distributed checkpoint, likewise)
    round_NNN/metrics.json      the round's metrics: written last, it marks the round finished

Every file is written atomically (``pipeline.files``), so a kill leaves a round either finished or not.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.files import (
    atomic_write_json,
    atomic_write_jsonl,
    read_jsonl,
    state_key,
    write_folder_atomically,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1  # bump when the layout of the work folder changes, so old state is discarded


def work_key(cfg_dump: dict, sft_path: str, seed: int, prompt_ids: list[str]) -> str:
    """Key of the folder's state: the config, the starting policy, the seed and the prompts (training and held
    out, in order). Anything else in the folder is discarded."""
    return state_key(STATE_VERSION, cfg_dump, str(sft_path), seed, prompt_ids)


def open_work_folder(work: Path, key: str) -> None:
    """Create ``work``, emptying it first when it holds the state of another key."""
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / "state.json"
    if state_file.is_file() and json.loads(state_file.read_text()).get("key") != key:
        log.info("dpo: work folder holds state of another config or input; starting over")
        for child in work.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    atomic_write_json(state_file, {"key": key, "version": STATE_VERSION})


def round_dir(work: Path, r: int) -> Path:
    return work / f"round_{r:03d}"


def finished_rounds(work: Path) -> int:
    """How many rounds finished in a row from round 1 (metrics and policy written)."""
    r = 0
    while (round_dir(work, r + 1) / "metrics.json").is_file() and any(
            (round_dir(work, r + 1) / name).is_dir() for name in ("policy", "policy_dcp")):
        r += 1
    return r


def start_policy(work: Path, sft_path: str, done: int) -> Path:
    """Where the policy to continue from is: the latest finished round's, else the SFT policy."""
    return round_dir(work, done) / "policy" if done else Path(sft_path)


def saved_ema(work: Path, done: int):
    """The EMA saved by the latest finished round, or None."""
    from safetensors.torch import load_file

    ema_file = round_dir(work, done) / "ema.safetensors"
    return load_file(str(ema_file)) if done and ema_file.is_file() else None


def read_baseline(work: Path) -> dict[str, list] | None:
    path = work / "baseline.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_baseline(work: Path, samples: dict[str, list]) -> None:
    atomic_write_json(work / "baseline.json", samples)


def finished_round_records(work: Path, done: int) -> tuple[list[dict], list[dict]]:
    """(metrics of rounds 1..done, their online pairs), read back for a resumed run."""
    rounds = [json.loads((round_dir(work, r) / "metrics.json").read_text()) for r in range(1, done + 1)]
    pairs = [p for r in range(1, done + 1) for p in read_jsonl(round_dir(work, r) / "pairs.jsonl")]
    return rounds, pairs


def saved_pairs(rdir: Path) -> tuple[list[dict], dict] | None:
    """(pairs, sampling figures) a round saved before it was interrupted, or None."""
    pairs_file, stats_file = rdir / "pairs.jsonl", rdir / "samples.json"
    if pairs_file.is_file() and stats_file.is_file():
        return read_jsonl(pairs_file), json.loads(stats_file.read_text())
    return None


def save_pairs(rdir: Path, pairs: list[dict], stats: dict) -> None:
    """The round's pairs, then its sampling figures (their presence marks the pairs complete)."""
    atomic_write_jsonl(rdir / "pairs.jsonl", pairs)
    atomic_write_json(rdir / "samples.json", stats)


def save_checkpoint(rdir: Path, policy, tokenizer, ema: dict | None) -> None:
    """The policy folder (and the EMA) after the round."""
    write_folder_atomically(rdir / "policy", lambda tmp: (policy.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    if ema is not None:
        from safetensors.torch import save_file

        # save_file writes the tensors straight to a file (no in-memory copy of the EMA), hence the rename here.
        tmp = rdir / "ema.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp))
        os.replace(tmp, rdir / "ema.safetensors")


def finish_round(work: Path, r: int, metrics: dict[str, Any]) -> None:
    """Mark round ``r`` finished (its metrics) and drop the previous round's weights: only the latest finished
    round's are needed to resume."""
    atomic_write_json(round_dir(work, r) / "metrics.json", metrics)
    if r > 1:
        shutil.rmtree(round_dir(work, r - 1) / "policy", ignore_errors=True)
        shutil.rmtree(round_dir(work, r - 1) / "policy_dcp", ignore_errors=True)
        (round_dir(work, r - 1) / "ema.safetensors").unlink(missing_ok=True)
