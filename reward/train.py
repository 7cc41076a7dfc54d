"""Bradley-Terry reward model from preference pairs, trained with TRL's RewardTrainer.

Pairs are TRL's conversational form (``prompt`` / ``chosen`` / ``rejected`` lists of messages).
The base is a causal LM given a scalar head (``AutoModelForSequenceClassification``, num_labels=1):
by default the embedded dense SmolLM2-135M-Instruct. Pairwise accuracy on held-out pairs is
measured with the same scorer the DPO stage uses (``reward.score.RewardScorer``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.records import PAIR_FIELDS, source_item
from pipeline.tracking import attach, report_to
from reward.score import RewardPoolConfig, ScoringDtype

log = logging.getLogger(__name__)

TRAINING_ITEMS = "posttrain_training_items.json"
"""File the reward stage writes in the reward model folder: {"items": source items of the training pairs
(``pipeline.records.pair_items``), "known": false for a pretrained model whose training data the run does not
know}. The DPO stage keeps its prompts apart from these items."""


class RewardModelConfig(BaseModel):
    """Reward model: train one from preference pairs, or use an existing one."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    base_model: str = "smollm2-135m-instruct"
    """Causal LM (embedded name or folder) that gets a scalar head and is trained as the reward model."""
    pretrained: str | None = None
    """Folder of an existing reward model (sequence classification, num_labels=1): used as is, no training."""
    extra_pairs: list[str] = Field(default_factory=list)
    """User-given preference files (.jsonl/.json/.parquet) with prompt/chosen/rejected, added to the training pairs."""
    stdlib_pairs: int = Field(0, ge=0)
    """Pairs derived from CPython's standard-library docstrings (reward/stdlib_pairs.py: chosen = a function's
    docstring paragraph, rejected = another function's, or the same one cut short) added to the training and
    held-out pairs, at most this many. Real text that ships with Python: the embedded default uses it because a
    demo-sized filter stage yields only a handful of pairs. 0: none."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of source items whose pairs are held out (a hash of the item, so stable across reruns) to measure accuracy."""
    learning_rate: float = Field(1e-5, gt=0)
    """AdamW learning rate."""
    num_epochs: float = Field(1.0, gt=0)
    """Passes over the training pairs."""
    batch_size: int = Field(8, ge=1)
    """Pairs per optimizer step (per gradient-accumulation micro-batch)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Share of steps with a linearly rising learning rate."""
    max_length: int = Field(1024, ge=16)
    """Longest tokenized conversation trained on; longer pairs are dropped by TRL."""
    center_rewards_coefficient: float | None = 0.01
    """Pulls rewards towards zero mean (TRL's option): keeps scores on a stable scale across runs."""
    seed: int = 0
    """Seed of the head's initialization and of the data order."""
    num_gpus: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = "auto"
    """GPUs the training task requests from Ray: 0 trains on CPU; above 0 (a fraction shares a GPU) on the GPU
    Ray assigns (TRL's RewardTrainer trains in one process on one device, so at most 1). auto: 1 when the Ray
    cluster has GPUs, else 0."""
    dtype: ScoringDtype = "auto"
    """Training precision. auto or bfloat16: bf16 mixed precision when training on a GPU; float32 on CPU either
    way (CPUs without bf16 units emulate it, slowly). float32: float32 everywhere."""
    scoring: RewardPoolConfig = Field(default_factory=RewardPoolConfig)
    """Ray actors that score with the model (the DPO stage uses the same settings)."""


def uses_bf16(dtype: ScoringDtype, cuda: bool) -> bool:
    """Whether reward training runs in bf16 mixed precision: on a CUDA device unless ``dtype`` is float32."""
    return cuda and dtype != "float32"


def _as_messages(value: Any, role: str, where: str, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise ValueError(
        f"{where}: field '{field}' must be a string or a list of {{role, content}} messages, got "
        f"{type(value).__name__}; fix: write pairs in TRL's form (prompt/chosen/rejected)")


def normalize_pair(row: dict, where: str) -> dict:
    """A pair in conversational form (strings become one message), keeping its other fields."""
    missing = [f for f in PAIR_FIELDS if f not in row or row[f] in (None, "", [])]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}; fix: every pair needs prompt, chosen "
                         "and rejected")
    out = dict(row)
    out["prompt"] = _as_messages(row["prompt"], "user", where, "prompt")
    out["chosen"] = _as_messages(row["chosen"], "assistant", where, "chosen")
    out["rejected"] = _as_messages(row["rejected"], "assistant", where, "rejected")
    if "id" not in out or not out["id"]:
        out["id"] = hashlib.sha1(json.dumps([out[f] for f in PAIR_FIELDS], sort_keys=True).encode()).hexdigest()[:16]
    return out


def load_pairs_file(path: str | os.PathLike) -> list[dict]:
    """Read user-given preference pairs; errors name the file, row and field."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"preference file {p} does not exist; fix: correct reward.extra_pairs")
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            import datasets

            rows = datasets.Dataset.from_parquet(str(p)).to_list()
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        elif suffix == ".json":
            rows = json.loads(p.read_text())
        else:
            raise ValueError(f"{p}: unknown file type '{suffix}'; fix: use .jsonl, .json or .parquet")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc}); fix: one JSON object per line for .jsonl") from None
    if not isinstance(rows, list):
        raise ValueError(f"{p}: expected a list of pairs, got {type(rows).__name__}")
    return [normalize_pair({**r, "source": r.get("source", "user")}, f"{p} row {i}") for i, r in enumerate(rows)]


def split_pairs(pairs: Sequence[dict], eval_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train / held-out split by a hash of each pair's source item (``pipeline.records.source_item``: its seed
    chunk, else its id), stable when pairs are added or reordered. All pairs of one item fall on one side, so the
    held-out accuracy is measured on instructions the model never trained on, and their prompts stay usable by
    the DPO stage (which drops prompts of items the reward model trained on)."""
    if eval_fraction <= 0:
        return list(pairs), []

    def bucket(pair: dict) -> float:
        h = hashlib.sha1(f"{seed}:{source_item(pair)}".encode()).hexdigest()
        return int(h[:8], 16) / 0xFFFFFFFF

    train = [p for p in pairs if bucket(p) >= eval_fraction]
    held = [p for p in pairs if bucket(p) < eval_fraction]
    if not held and len({source_item(p) for p in train}) > 1:  # tiny sets: still hold out one item's pairs
        last = source_item(train[-1])
        held = [p for p in train if source_item(p) == last]
        train = [p for p in train if source_item(p) != last]
    return train, held


def pairwise_accuracy(score: Callable[[list[list[dict]]], list[float]], pairs: Sequence[dict]) -> dict[str, float]:
    """Share of pairs whose chosen reply scores above the rejected one (ties count half), and the mean margin."""
    if not pairs:
        return {"accuracy": float("nan"), "margin": float("nan"), "pairs": 0}
    convs = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    s = score(convs)
    chosen, rejected = s[: len(pairs)], s[len(pairs):]
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True))
    margin = sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)
    return {"accuracy": wins / len(pairs), "margin": margin, "pairs": len(pairs)}


def trivially_separable(pair: dict) -> str | None:
    """Why a pair can be told apart without judging meaning, or None: "empty" (the rejected response is blank) or
    "prefix" (it is the chosen response cut short). A reward model that learns only these learns "complete and
    not cut off"; the reward stage reports its accuracy without them."""
    chosen = " ".join(m["content"] for m in pair["chosen"]).split()
    rejected = " ".join(m["content"] for m in pair["rejected"]).split()
    if not rejected:
        return "empty"
    if len(rejected) < len(chosen) and chosen[:len(rejected)] == rejected:
        return "prefix"
    return None


def train_reward_model(train_pairs: Sequence[dict], cfg: RewardModelConfig, output_dir: str | os.PathLike,
                       log_metrics: Callable[[dict, int], None] | None = None) -> dict[str, float]:
    """Train a scalar-head reward model with TRL's RewardTrainer and save it (model + tokenizer) to ``output_dir``.

    Returns the last logged training figures. ``log_metrics(dict, step)`` receives every logged step.
    """
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from pipeline.files import write_folder_atomically
    from pipeline.memory import large_buffers_on_heap
    from pipeline.models.catalog import resolve_model

    if not train_pairs:
        raise ValueError("no preference pairs to train the reward model on; fix: check the filter stage's "
                         "`preferences` output or give reward.extra_pairs")
    base = resolve_model(cfg.base_model)
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(cfg.seed)  # the head is initialized randomly
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    data = datasets.Dataset.from_list([{f: p[f] for f in PAIR_FIELDS} for p in train_pairs])
    out = Path(output_dir)
    history: list[dict] = []

    class _Relay(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                row = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
                history.append(row)
                if log_metrics is not None:
                    log_metrics(row, state.global_step)

    with tempfile.TemporaryDirectory(prefix="reward-trainer-") as scratch:
        args = RewardConfig(
            output_dir=scratch, learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_epochs,
            per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            warmup_steps=cfg.warmup_ratio, max_length=cfg.max_length, seed=cfg.seed,
            center_rewards_coefficient=cfg.center_rewards_coefficient,
            # CPU facts (PLATFORM.md): CPUs without bf16 units run float32 faster; checkpointing only costs
            # time at these sizes. On a GPU: bf16 autocast over the float32 weights.
            bf16=uses_bf16(cfg.dtype, torch.cuda.is_available()), use_cpu=not torch.cuda.is_available(),
            gradient_checkpointing=False,
            logging_steps=1, save_strategy="no", report_to=report_to(), disable_tqdm=True,
        )
        trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                callbacks=[_Relay()])
        attach(trainer, "reward")
        if len(trainer.train_dataset) == 0:
            raise ValueError(f"every training pair is longer than reward.max_length={cfg.max_length} tokens; "
                             "fix: raise reward.max_length")
        with large_buffers_on_heap():
            trainer.train()
    write_folder_atomically(out, lambda tmp: (trainer.model.save_pretrained(tmp), tok.save_pretrained(tmp)),
                            {"kind": "reward_model", "base": str(base), "train_pairs": len(data)})
    # Means over the last epoch's steps: the very last step may hold a single pair (its accuracy is 0 or 1).
    steps = [h for h in history if "loss" in h and "epoch" in h]
    final = max((h["epoch"] for h in steps), default=0.0)
    tail = [h for h in steps if h["epoch"] > final - 1] or steps

    def mean(key: str) -> float:
        vals = [float(h[key]) for h in tail if key in h]
        return sum(vals) / len(vals) if vals else float("nan")

    return {"train_loss": mean("loss"), "train_accuracy": mean("accuracy"),
            "train_steps": float(trainer.state.global_step), "train_pairs": float(len(data))}


def check_reward_model(path: str | os.PathLike) -> Path:
    """A configured existing reward model: a folder with a sequence-classification config and num_labels=1."""
    from transformers import AutoConfig

    from pipeline.models.catalog import ModelError, resolve_model

    p = resolve_model(path)
    cfg = AutoConfig.from_pretrained(p)
    archs = cfg.architectures or []
    if cfg.num_labels != 1 or not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ModelError(
            f"{p} is not a reward model (architectures {archs}, num_labels {cfg.num_labels}); fix: give a "
            "sequence-classification folder with num_labels=1, or leave reward.pretrained empty to train one")
    return p
