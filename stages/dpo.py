"""Stage `dpo`: iterative online DPO with a chosen-response loss and SFT replay (Hunyuan-Large's RLHF).

Rounds r = 1..R. Each round draws a fresh batch of prompts (from `evolved`, never reused unless
``reuse_prompts``); the current policy, served by this stage's vLLM engines, samples n responses per
prompt; the reward model (Ray actors) scores them; best vs worst becomes a pair (a gap under
``min_reward_gap`` is a tie, skipped and counted); the policy trains on the round's pairs mixed with
offline pairs (`preferences`) and the new weights are pushed into the running engines in memory.

The loss of a step is

    dpo_weight * DPO_sigmoid(beta) + alpha * NLL(chosen) + router_aux + gamma * (NLL(SFT replay) + router_aux)

TRL's DPOTrainer computes the first two (``loss_type=["sigmoid", "sft"]``, ``loss_weights=[dpo_weight,
alpha]``) and the router aux loss (``router_aux_loss_coef``, wired by ``pipeline.training`` as in SFT);
the replay term is ours: each step also runs the policy on a random batch of `sft` conversations.
The reference model is the SFT policy. With ``ema_decay`` an exponential moving average of the
weights is kept (the report's guard against reward hacking): it is what the engines serve and what
is published, while the raw weights keep training.

Per round (``metrics.jsonl`` with step = round, and the manifest): reward mean/std of the samples,
chosen-rejected reward margin, ties, DPO accuracy and margin, each loss term, a KL estimate to the
reference from the sampled tokens (sum over a sample of log pi(y_t) - log pi_ref(y_t), pi's logprobs
from vLLM, pi_ref's from a forward of the reference model), and on held-out prompts the mean reward
and win rate against the SFT policy (same prompts, same request seeds; the reward model judges).

Resume: every round leaves ``work/round_NNN/`` with its pairs (written before training) and, when it
finishes, the policy checkpoint and ``metrics.json``. A rerun loads the latest finished round's
policy, syncs it into the engines and goes on with the next round, reusing its pairs if they exist.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.run.stage import ModelRole
from pipeline.training.moe_config import MoETrainingConfig
from reward.score import RewardPoolConfig, conversation

log = logging.getLogger(__name__)

STATE_VERSION = 1  # bump when the layout of the work folder changes, so old state is discarded


class OnlineDPOConfig(BaseModel):
    """Iterative online DPO of the SFT policy against the reward model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    pool_role: ModelRole = "policy"
    """Model role whose engine settings (workers, KV cache, max_model_len, dtype) serve the policy. The engines
    load this stage's `sft_model` input, not the role's model, and belong to this stage: their weights change
    every round."""
    rounds: int = Field(2, ge=1)
    """Online rounds (sample, score, pair, train, sync)."""
    prompts_per_round: int = Field(8, ge=1)
    """Fresh prompts drawn from `evolved` each round."""
    reuse_prompts: bool = False
    """Cycle through the prompts again when rounds x prompts_per_round exceeds them. False: such a config is
    rejected before any work starts."""
    samples_per_prompt: int = Field(4, ge=2)
    """Responses the policy samples per prompt; the best and the worst make the pair."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature. 1.0 samples the policy itself, which keeps the KL estimate unbiased."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold."""
    max_tokens: int = Field(128, ge=1)
    """Longest sampled response, in tokens."""
    min_reward_gap: float = Field(0.1, ge=0)
    """A prompt whose best and worst samples score closer than this is a tie: no pair, counted in `ties`."""
    offline_ratio: float = Field(0.5, ge=0)
    """Offline pairs (the `preferences` input) mixed into a round, per online pair (drawn at random)."""
    beta: float = Field(0.1, gt=0)
    """DPO temperature: higher keeps the policy closer to the reference."""
    dpo_weight: float = Field(1.0, ge=0)
    """Weight of the DPO (sigmoid) term; 0 turns it off."""
    chosen_loss_coef: float = Field(0.2, ge=0)
    """alpha: weight of the NLL of the chosen response (TRL's "sft" loss type), so DPO cannot win by lowering
    both responses' likelihood; 0 turns it off."""
    sft_replay_coef: float = Field(0.1, ge=0)
    """gamma: weight of the SFT loss on a random batch of the `sft` dataset each step (keeps language ability);
    0 turns it off (no replay forward at all)."""
    replay_batch_size: int = Field(2, ge=1)
    """SFT conversations per step for the replay term."""
    learning_rate: float = Field(5e-6, gt=0)
    """AdamW learning rate (MoE parameter groups from `moe`: routed experts get a scaled LR)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule inside a round (each round starts a new optimizer)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    optim: str = "adamw_torch"
    """Optimizer, by its transformers name (`TrainingArguments.optim`), with the MoE parameter groups. "adafactor"
    keeps factored second moments and no first moment: for the 413M embedded policy that is ~3.3 GB less than
    AdamW, which is what lets the policy, its reference and the engine share a 24 GiB CPU machine."""
    epochs_per_round: float = Field(1.0, gt=0)
    """Passes over the round's pairs."""
    batch_size: int = Field(4, ge=1)
    """Pairs per micro-batch."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    max_length: int = Field(512, ge=32)
    """Longest prompt + response in tokens for training (longer sequences are truncated)."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """EMA of the policy weights, updated after every optimizer step: ema = d * ema + (1 - d) * weights. When
    set, the EMA is what the engines serve (sampling, held-out evaluation) and what `dpo_model` holds; the raw
    weights keep training. None: no EMA."""
    stdlib_prompts: int = Field(0, ge=0)
    """Prompts added to `evolved`'s: questions about the last N public functions of
    `reward.stdlib_pairs.stdlib_docs()` ("What does the Python function `json.dumps` do?"; the reward stage's
    `stdlib_pairs` use the first ones, so the reward model never saw these). A demo-sized evolve stage yields
    a few dozen prompts, and a reward model trained mostly on docstring pairs judges these best. Held-out
    figures are also reported per prompt source (`eval_reward_gain_evolved`, `eval_reward_gain_stdlib`)."""
    eval_prompts: int = Field(8, ge=0)
    """Held-out prompts (never trained on) for the per-round reward and win rate against the SFT policy."""
    eval_samples: int = Field(2, ge=1)
    """Samples per held-out prompt (the same request seeds for the SFT policy and every round)."""
    moe: MoETrainingConfig = Field(
        default_factory=lambda: MoETrainingConfig(attention_dropout=0.0, hidden_dropout=0.0))
    """MoE settings (router aux-loss coefficient, routed-expert LR scale, expert-load logging). Dropout is off
    by default: DPO compares the policy with a reference and dropout would bias the log-ratios."""
    reward: RewardPoolConfig = Field(default_factory=RewardPoolConfig)
    """Ray actors that score samples with the `reward_model` input."""

    @model_validator(mode="after")
    def _some_preference_loss(self) -> OnlineDPOConfig:
        if self.dpo_weight == 0 and self.chosen_loss_coef == 0:
            raise ValueError("dpo_weight and chosen_loss_coef are both 0, so the preference pairs would not be "
                             "trained on; fix: set at least one above 0")
        return self


# --------------------------------------------------------------------------------------------------
# Prompts


def prompt_rows(evolved: Sequence[dict], source: str = "evolved") -> list[dict]:
    """{id, messages, source} per unique instruction of `evolved` (the first record of a duplicate wins)."""
    out, seen = [], set()
    for i, row in enumerate(evolved):
        text = row.get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"evolved record {row.get('id', i)!r}: field 'instruction' is missing or empty; "
                             "fix: rerun the evolve stage (posttrain stage evolve ... --force)")
        if text in seen:
            continue
        seen.add(text)
        out.append({"id": str(row.get("id") or hashlib.sha1(text.encode()).hexdigest()[:16]),
                    "messages": [{"role": "user", "content": text}], "source": source})
    return out


def stdlib_prompt_rows(n: int) -> list[dict]:
    """Prompt rows about the last ``n`` functions of ``stdlib_docs()`` (see `OnlineDPOConfig.stdlib_prompts`)."""
    from reward.stdlib_pairs import prompt_records, stdlib_docs

    if n == 0:
        return []
    docs = stdlib_docs()
    if n > len(docs):
        raise ValueError(f"dpo.stdlib_prompts={n} but this Python has {len(docs)} documented stdlib functions; "
                         f"fix: set dpo.stdlib_prompts <= {len(docs)}")
    return prompt_rows(prompt_records([name for name, _ in docs[-n:]]), source="stdlib")


def split_prompts(prompts: Sequence[dict], cfg: OnlineDPOConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(training prompts, held-out prompts) in a seeded order; rejects a config that would reuse prompts."""
    from pipeline.run.stage import record_seed

    order = sorted(prompts, key=lambda p: record_seed(seed, p["id"], "dpo-prompt-order"))
    held, train = order[:cfg.eval_prompts], order[cfg.eval_prompts:]
    need = cfg.rounds * cfg.prompts_per_round
    if not train:
        raise ValueError(f"evolved has {len(prompts)} distinct instructions and dpo.eval_prompts={cfg.eval_prompts} "
                         "holds them all out; fix: lower dpo.eval_prompts")
    if need > len(train) and not cfg.reuse_prompts:
        raise ValueError(
            f"dpo needs {need} fresh prompts (rounds={cfg.rounds} x prompts_per_round={cfg.prompts_per_round}) but "
            f"evolved has {len(prompts)} distinct instructions, {len(train)} after holding out "
            f"eval_prompts={cfg.eval_prompts}; fix: lower dpo.rounds or dpo.prompts_per_round, generate more "
            "instructions, or set dpo.reuse_prompts: true")
    return train, held


def round_prompts(train: Sequence[dict], round_index: int, k: int) -> list[dict]:
    """The k prompts of round ``round_index`` (1-based): consecutive, wrapping around only when reuse is allowed
    (``split_prompts`` has checked that)."""
    start = (round_index - 1) * k
    return [train[(start + i) % len(train)] for i in range(min(k, len(train)))]


# --------------------------------------------------------------------------------------------------
# Sampling, scoring, pairs


def sample(pool, prompts: Sequence[dict], n: int, cfg: OnlineDPOConfig, seed: int, salt: str,
           logprobs: bool = False) -> list:
    """n samples per prompt from the pool; each request's seed comes from the run seed, the prompt id and salt."""
    from pipeline.engines.pool import ChatRequest
    from pipeline.run.stage import record_seed

    return pool.generate([
        ChatRequest(messages=p["messages"], n=n, temperature=cfg.temperature, top_p=cfg.top_p,
                    max_tokens=cfg.max_tokens, seed=record_seed(seed, p["id"], salt), logprobs=logprobs)
        for p in prompts])


def score_results(scorer, prompts: Sequence[dict], results: Sequence) -> list[list[float]]:
    """Reward of every sample, shaped like the results (one list per prompt)."""
    convs = [conversation(p["messages"], c.text) for p, r in zip(prompts, results, strict=True) for c in r.completions]
    flat = scorer.score(convs)
    out, i = [], 0
    for r in results:
        out.append(flat[i:i + len(r.completions)])
        i += len(r.completions)
    return out


def best_worst_pairs(prompts: Sequence[dict], results: Sequence, scores: Sequence[Sequence[float]],
                     min_gap: float, round_index: int) -> tuple[list[dict], int]:
    """One pair per prompt (best vs worst sample); prompts whose gap is under ``min_gap`` are ties (counted)."""
    pairs, ties = [], 0
    for p, r, s in zip(prompts, results, scores, strict=True):
        best = max(range(len(s)), key=lambda j: (s[j], -j))
        worst = min(range(len(s)), key=lambda j: (s[j], j))
        if s[best] - s[worst] < min_gap or best == worst:
            ties += 1
            continue
        pairs.append({
            "id": hashlib.sha1(f"{p['id']}:online:{round_index}".encode()).hexdigest()[:16],
            "prompt": p["messages"],
            "chosen": [{"role": "assistant", "content": r.completions[best].text}],
            "rejected": [{"role": "assistant", "content": r.completions[worst].text}],
            "source": f"online_round_{round_index}",
            "chosen_score": float(s[best]), "rejected_score": float(s[worst]),
            "instruction_id": p["id"], "round": round_index, "n_samples": len(s),
            "chosen_finish_reason": r.completions[best].finish_reason,
            "rejected_finish_reason": r.completions[worst].finish_reason,
        })
    return pairs, ties


def sequence_logprobs(model, items: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 4) -> list[float]:
    """Sum of log p(completion token) under ``model`` for each (prompt_ids, completion_ids), teacher forced."""
    import torch

    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    out = [0.0] * len(items)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seqs = [list(items[i][0]) + list(items[i][1]) for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, s in enumerate(seqs):
                ids[row, :len(s)] = torch.tensor(s)
                mask[row, :len(s)] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            for row, i in enumerate(idx):
                p_len, c_len = len(items[i][0]), len(items[i][1])
                if c_len == 0:
                    continue
                lp = torch.log_softmax(logits[row, p_len - 1:p_len - 1 + c_len], dim=-1)
                tok = torch.tensor(list(items[i][1]))
                out[i] = float(lp.gather(-1, tok[:, None]).sum())
    finally:
        model.train(was_training)
    return out


def kl_estimate(results: Sequence, ref_model) -> dict[str, float]:
    """KL(policy || reference) estimated on the policy's own samples: mean over samples of
    sum_t [log pi(y_t) - log pi_ref(y_t)] (pi's logprobs as vLLM sampled them, pi_ref by a forward pass)."""
    items, policy_lp, tokens = [], [], 0
    for r in results:
        for c in r.completions:
            if c.logprobs is None:
                raise ValueError("samples carry no logprobs; sample with logprobs=True to estimate the KL")
            items.append((r.prompt_token_ids, c.token_ids))
            policy_lp.append(sum(c.logprobs))
            tokens += len(c.token_ids)
    if not items:
        return {"kl": float("nan"), "kl_per_token": float("nan")}
    ref_lp = sequence_logprobs(ref_model, items)
    diffs = [p - q for p, q in zip(policy_lp, ref_lp, strict=True)]
    return {"kl": sum(diffs) / len(diffs), "kl_per_token": sum(diffs) / max(1, tokens)}


# --------------------------------------------------------------------------------------------------
# Training: TRL DPOTrainer + MoE settings + SFT replay


def tokenize_replay(tokenizer, rows: Sequence[dict], max_length: int) -> list[dict]:
    """SFT conversations -> {input_ids, labels} with the loss on the last assistant turn only."""
    out = []
    for i, row in enumerate(rows):
        msgs = row.get("messages")
        if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            raise ValueError(f"sft record {row.get('id', i)!r}: 'messages' must be a chat ending with an assistant "
                             "turn; fix: rerun the filter stage")
        prompt = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        full = list(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
        n = 0
        while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
            n += 1
        full = full[:max_length]
        labels = [-100] * min(n, len(full)) + full[n:]
        if any(t != -100 for t in labels[1:]):
            out.append({"input_ids": full, "labels": labels})
    return out


def _collate_replay(rows: Sequence[dict], pad_id: int) -> dict:
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _plain_head_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                        **kwargs):
    """Stand-in for TRL's fused-LM-head forward on devices without Triton (CPU).

    TRL's fused head (``trl.trainer.utils.add_fused_lm_head``) tiles the LM head to avoid materializing logits;
    without Triton its fallback runs many elementwise passes over every [token, vocab] tile and is, measured
    here on the tiny MoE (vocab 49152), about 5x slower per DPO step than taking ``log_softmax`` of the plain
    logits. At these batch sizes the logits fit in memory, so on CPU we compute the same fields
    (``log_probs``, ``entropy``, ``mean_logits``, ``is_top1``, ``aux_loss``, ``loss``) from them.
    """
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    forward = type(self).forward
    if not fused_lm_head:
        for key, value in (("labels", labels), ("shift_labels", shift_labels), ("num_items_in_batch", num_items_in_batch)):
            if value is not None:
                kwargs[key] = value
        return forward(self, *args, **kwargs)
    kwargs["use_cache"] = False
    out = forward(self, *args, **kwargs)
    logits = out.logits.float()
    if shift_labels is None:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    mask = targets != -100
    logp = torch.log_softmax(logits, dim=-1)
    log_probs = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1) * mask
        mean_logits = logits.mean(-1) * mask
        is_top1 = (logits.argmax(-1) == targets) & mask
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        loss = loss + getattr(self.config.get_text_config(), "router_aux_loss_coef", 0.0) * aux
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=None,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=mask, aux_loss=aux)


@functools.cache
def replay_dpo_trainer_class() -> type:
    """TRL's DPOTrainer with the MoE settings of SFT (``pipeline.training``) and our SFT-replay term.

    Built on first use so that importing this module (to read its config) does not import TRL.
    """
    import torch
    import torch.nn.functional as F
    from trl import DPOTrainer

    from pipeline.training.moe_trainer import MoETrainerMixin

    class ReplayDPOTrainer(MoETrainerMixin, DPOTrainer):
        """DPO + chosen NLL (TRL) + gamma * SFT loss on a replay batch (ours); logs every term.

        The terms are logged as ``loss/dpo``, ``loss/chosen_nll``, ``loss/router_aux``, ``loss/replay_nll`` (the
        unweighted values) and ``loss/total``. The DPO and chosen values are recomputed from the per-token
        log-probabilities of the very forward passes TRL ran (read by forward hooks), not by extra passes.
        """

        def __init__(self, *args: Any, replay: Sequence[dict] = (), replay_coef: float = 0.0,
                     replay_batch_size: int = 2, replay_seed: int = 0, dpo_weight: float = 1.0,
                     chosen_coef: float = 0.0, plain_head: bool = True, **kwargs: Any):
            self.replay_rows = list(replay)
            self.replay_coef = replay_coef
            self.replay_batch_size = replay_batch_size
            self.replay_rng = random.Random(replay_seed)
            self.dpo_weight = dpo_weight
            self.chosen_coef = chosen_coef
            super().__init__(*args, **kwargs)
            self.pad_id = self.processing_class.pad_token_id or 0
            from trl.kernels.chunked_logprob import _use_triton

            if plain_head and not _use_triton(self.accelerator.device) and not self.use_weighting:
                import types

                for m in (self.accelerator.unwrap_model(self.model), self.ref_model):
                    if m is not None:
                        m.forward = types.MethodType(_plain_head_forward, m)

        def replay_batch(self) -> dict:
            rows = self.replay_rng.sample(self.replay_rows, min(self.replay_batch_size, len(self.replay_rows)))
            return _collate_replay(rows, self.pad_id)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            captured: dict[str, Any] = {}
            policy = self.accelerator.unwrap_model(model)
            hooks = [policy.register_forward_hook(lambda m, a, o: captured.setdefault("policy", o))]
            if self.ref_model is not None:
                hooks.append(self.ref_model.register_forward_hook(lambda m, a, o: captured.setdefault("ref", o)))
            try:
                loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
            finally:
                for h in hooks:
                    h.remove()
            terms = self._preference_terms(inputs, captured)
            if self.replay_coef > 0 and self.replay_rows:
                batch = {k: v.to(self.accelerator.device) for k, v in self.replay_batch().items()}
                kwargs: dict[str, Any] = {"use_cache": False}
                if self.aux_loss_enabled:
                    kwargs["output_router_logits"] = True
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"], fused_lm_head=True, **kwargs)
                n_tokens = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
                replay_nll = -out.log_probs.sum() / n_tokens
                replay_loss = replay_nll
                if self.aux_loss_enabled and out.aux_loss is not None:
                    replay_loss = replay_loss + self.router_aux_loss_coef * out.aux_loss
                loss = loss + self.replay_coef * replay_loss
                terms["loss/replay_nll"] = float(replay_nll.detach())
                if self.aux_loss_enabled and out.aux_loss is not None:
                    terms["loss/replay_router_aux"] = float(out.aux_loss.detach())
            terms["loss/total"] = float(loss.detach())
            for key, value in terms.items():
                self._metrics[mode][key].append(value)
            return loss

        @torch.no_grad()
        def _preference_terms(self, inputs, captured) -> dict[str, float]:
            """Unweighted DPO sigmoid loss, chosen NLL and router aux loss of this batch."""
            out = captured.get("policy")
            if out is None or getattr(out, "log_probs", None) is None:
                return {}
            mask = inputs["completion_mask"][:, 1:]
            lp = out.log_probs[:, -mask.size(1):].detach()
            logps = (lp * mask).sum(1)
            if "ref" in captured:
                ref_logps = (captured["ref"].log_probs[:, -mask.size(1):] * mask).sum(1)
            else:
                ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
            c, r = logps.chunk(2)
            rc, rr = ref_logps.chunk(2)
            delta = (c - rc) - (r - rr)
            cmask, _ = mask.chunk(2)
            clp, _ = lp.chunk(2)
            terms = {"loss/dpo": float(-F.logsigmoid(self.beta * delta).mean()),
                     "loss/chosen_nll": float(-clp[cmask.bool()].mean())}
            if getattr(out, "aux_loss", None) is not None:
                terms["loss/router_aux"] = float(out.aux_loss)
            return terms

    return ReplayDPOTrainer


def _ema_callback(ema: dict, decay: float):
    from transformers import TrainerCallback

    class EMACallback(TrainerCallback):
        """ema = decay * ema + (1 - decay) * weights after every optimizer step."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            import torch

            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in ema:
                        ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)

    return EMACallback()


@contextlib.contextmanager
def swapped_weights(model, ema: dict | None) -> Iterator[None]:
    """Inside the block the model's parameters point at the EMA tensors (no copy); restored after."""
    if not ema:
        yield
        return
    saved = {}
    for name, p in model.named_parameters():
        if name in ema:
            saved[name] = p.data
            p.data = ema[name]
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            if name in saved:
                p.data = saved[name]


def init_ema(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def dpo_training_args(cfg: OnlineDPOConfig, output_dir: str, seed: int):
    import torch
    from trl import DPOConfig

    loss_type, weights = [], []
    if cfg.dpo_weight > 0:
        loss_type.append("sigmoid")
        weights.append(cfg.dpo_weight)
    if cfg.chosen_loss_coef > 0:
        loss_type.append("sft")
        weights.append(cfg.chosen_loss_coef)
    return DPOConfig(
        output_dir=output_dir, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay, num_train_epochs=cfg.epochs_per_round,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        beta=cfg.beta, loss_type=loss_type, loss_weights=weights, max_length=cfg.max_length, seed=seed,
        optim=cfg.optim,
        # CPU facts (PLATFORM.md): float32 is 3x faster than bf16 here; activation checkpointing only costs time
        # at these sequence lengths.
        bf16=False, use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )


def train_round(policy, ref_model, tokenizer, pairs: Sequence[dict], replay: Sequence[dict], cfg: OnlineDPOConfig,
                seed: int, scratch: str | os.PathLike, ema: dict | None = None, plain_head: bool = True) -> dict[str, float]:
    """Train the policy in place on ``pairs`` (one DPOTrainer, fresh optimizer); returns the round's means of the
    logged figures (loss terms, DPO accuracy and margins, router aux loss, expert load). ``plain_head=False``
    keeps TRL's fused LM head on CPU too (benchmarks/dpo.py compares the two)."""
    import datasets
    from transformers.trainer_callback import PrinterCallback

    from pipeline.memory import large_buffers_on_heap

    data = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    cls = replay_dpo_trainer_class()
    callbacks = [_ema_callback(ema, cfg.ema_decay)] if ema is not None and cfg.ema_decay else []
    trainer = cls(
        model=policy, ref_model=ref_model, args=dpo_training_args(cfg, str(scratch), seed), train_dataset=data,
        processing_class=tokenizer, callbacks=callbacks, moe_config=cfg.moe, replay=replay,
        replay_coef=cfg.sft_replay_coef, replay_batch_size=cfg.replay_batch_size, replay_seed=seed,
        dpo_weight=cfg.dpo_weight, chosen_coef=cfg.chosen_loss_coef, plain_head=plain_head)
    trainer.remove_callback(PrinterCallback)
    try:
        with large_buffers_on_heap():
            trainer.train()
    finally:
        _unpatch(policy, ref_model)
    rows = [h for h in trainer.state.log_history if "loss" in h]
    keys = ("loss/total", "loss/dpo", "loss/chosen_nll", "loss/replay_nll", "loss/router_aux", "loss/replay_router_aux",
            "rewards/accuracies",
            "rewards/margins", "rewards/chosen", "rewards/rejected", "expert_load/max_load_ratio", "grad_norm")
    out = {k: statistics.fmean(float(h[k]) for h in rows if k in h) for k in keys if any(k in h for h in rows)}
    out["train_steps"] = float(trainer.state.global_step)
    policy.eval()
    return out


def _unpatch(*models) -> None:
    """Undo TRL's fused-LM-head patch (an instance attribute over ``forward``), so the next round's trainer
    patches the plain forward again instead of stacking wrappers."""
    for m in models:
        if m is not None:
            m.__dict__.pop("forward", None)


# --------------------------------------------------------------------------------------------------
# The loop


@dataclass
class OnlineDPOResult:
    policy: Any
    """The trained policy (raw weights)."""
    ema: dict | None
    """EMA weights (name -> tensor) when ``ema_decay`` is set."""
    rounds: list[dict]
    """Per-round metrics, round 1 first (resumed rounds included, read back from their metrics.json)."""
    pairs: list[dict]
    """Every round's online pairs."""
    baseline: dict
    """Held-out rewards of the SFT policy."""
    timings: dict = field(default_factory=dict)
    """Seconds spent outside the rounds: load (models), start_sync, baseline."""


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _save_model_atomically(model, tokenizer, dest: Path) -> None:
    from pipeline.files import write_folder_atomically

    write_folder_atomically(dest, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def _round_dir(work: Path, r: int) -> Path:
    return work / f"round_{r:03d}"


def _finished_rounds(work: Path) -> int:
    r = 0
    while (_round_dir(work, r + 1) / "metrics.json").is_file() and (_round_dir(work, r + 1) / "policy").is_dir():
        r += 1
    return r


class _Clock:
    """Accumulates wall time per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def _state_key(cfg: OnlineDPOConfig, sft_path: str, seed: int, prompts: Sequence[dict]) -> str:
    blob = json.dumps([STATE_VERSION, cfg.model_dump(mode="json"), str(sft_path), seed, [p["id"] for p in prompts]],
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def _eval_rewards(pool, scorer, prompts, cfg, seed) -> tuple[list[float], int]:
    results = sample(pool, prompts, cfg.eval_samples, cfg, seed, "dpo-eval")
    flat = [s for row in score_results(scorer, prompts, results) for s in row]
    return flat, sum(len(c.token_ids) for r in results for c in r.completions)


def paired_gain(rewards: Sequence[float], baseline: Sequence[float], samples_per_prompt: int) -> dict[str, float]:
    """Held-out figures of a round against the SFT policy: both lists are flat, prompt-major, same request seeds.

    The gain's standard error treats prompts as the independent units (the samples of one prompt share it), so
    ``eval_reward_gain / eval_reward_gain_se`` says whether the gain stands out of the sampling noise.
    """
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline, strict=True)]
    diffs = [a - b for a, b in zip(rewards, baseline, strict=True)]
    per_prompt = [statistics.fmean(diffs[i:i + samples_per_prompt]) for i in range(0, len(diffs), samples_per_prompt)]
    se = statistics.stdev(per_prompt) / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else float("nan")
    return {"eval_reward_mean": statistics.fmean(rewards), "eval_reward_sft_mean": statistics.fmean(baseline),
            "eval_reward_gain": statistics.fmean(diffs), "eval_reward_gain_se": se,
            "eval_win_rate": statistics.fmean(wins)}


def held_out_metrics(prompts: Sequence[dict], rewards: Sequence[float], baseline: Sequence[float],
                     samples_per_prompt: int) -> dict[str, float]:
    """``paired_gain`` over all held-out prompts, and per prompt source (suffixed keys) when there are several."""
    out = paired_gain(rewards, baseline, samples_per_prompt)
    sources = sorted({p.get("source", "evolved") for p in prompts})
    if len(sources) > 1:
        for src in sources:
            idx = [i * samples_per_prompt + j for i, p in enumerate(prompts) if p.get("source", "evolved") == src
                   for j in range(samples_per_prompt)]
            part = paired_gain([rewards[i] for i in idx], [baseline[i] for i in idx], samples_per_prompt)
            out.update({f"{k}_{src}": v for k, v in part.items() if k != "eval_reward_sft_mean"})
            out[f"eval_prompts_{src}"] = len(idx) // samples_per_prompt
    return out


def online_dpo(sft_path: str | os.PathLike, pool, scorer, train_prompts: Sequence[dict], eval_prompts: Sequence[dict],
               offline_pairs: Sequence[dict], sft_rows: Sequence[dict], cfg: OnlineDPOConfig, work_dir: str | os.PathLike,
               seed: int = 0, log_metrics: Callable[[dict, int], None] | None = None,
               on_round: Callable[[int, dict], None] | None = None) -> OnlineDPOResult:
    """Run (or resume) the online rounds. ``pool`` serves the policy (its weights are replaced: first by the
    starting policy, then after every round); ``scorer.score(conversations)`` gives rewards.

    ``train_prompts`` come from ``split_prompts``; ``work_dir`` keeps the per-round state (see module doc).
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models.catalog import resolve_model

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sft_path = str(resolve_model(sft_path))
    key = _state_key(cfg, sft_path, seed, list(train_prompts) + list(eval_prompts))
    state_file = work / "state.json"
    if state_file.is_file() and json.loads(state_file.read_text()).get("key") != key:
        log.info("dpo: work folder holds state of another config or input; starting over")
        for child in work.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    _write_json(state_file, {"key": key, "version": STATE_VERSION})

    setup = _Clock()
    done = _finished_rounds(work)
    with setup("load"):
        start = _round_dir(work, done) / "policy" if done else Path(sft_path)
        tokenizer = AutoTokenizer.from_pretrained(sft_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        policy = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
        ref_model = AutoModelForCausalLM.from_pretrained(sft_path, dtype=torch.float32).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
        ema = None
        if cfg.ema_decay:
            ema_file = _round_dir(work, done) / "ema.safetensors"
            ema = load_file(str(ema_file)) if done and ema_file.is_file() else init_ema(policy)
        replay = tokenize_replay(tokenizer, sft_rows, cfg.max_length) if cfg.sft_replay_coef > 0 else []
        if cfg.sft_replay_coef > 0 and not replay:
            raise ValueError("dpo.sft_replay_coef > 0 but the `sft` dataset has no usable conversation; fix: set "
                             "dpo.sft_replay_coef: 0 or check the filter stage's output")
    if done:
        log.info("dpo: resuming after round %d (policy from %s)", done, start)
    with setup("start_sync"), swapped_weights(policy, ema):
        pool.sync_weights(policy)

    baseline_file = work / "baseline.json"
    with setup("baseline"):
        if eval_prompts and not baseline_file.is_file():
            if done:  # cannot happen with an intact work folder: the baseline is written before round 1
                raise RuntimeError(f"{baseline_file} is missing though round {done} finished; fix: delete {work}")
            rewards, _ = _eval_rewards(pool, scorer, eval_prompts, cfg, seed)
            _write_json(baseline_file, {"rewards": rewards})
    baseline = json.loads(baseline_file.read_text()) if baseline_file.is_file() else {"rewards": []}

    rounds = [json.loads((_round_dir(work, r) / "metrics.json").read_text()) for r in range(1, done + 1)]
    pairs_all = [p for r in range(1, done + 1) for p in _read_jsonl(_round_dir(work, r) / "pairs.jsonl")]
    for r in range(done + 1, cfg.rounds + 1):
        clock = _Clock()
        t_round = time.perf_counter()
        rdir = _round_dir(work, r)
        rdir.mkdir(exist_ok=True)
        prompts = round_prompts(train_prompts, r, cfg.prompts_per_round)
        pairs_file = rdir / "pairs.jsonl"
        sample_stats_file = rdir / "samples.json"
        if pairs_file.is_file() and sample_stats_file.is_file():
            pairs = _read_jsonl(pairs_file)
            stats = json.loads(sample_stats_file.read_text())
            log.info("dpo round %d: reusing its %d pairs from before the interruption", r, len(pairs))
        else:
            with clock("sample"):
                results = sample(pool, prompts, cfg.samples_per_prompt, cfg, seed, f"dpo-round-{r}", logprobs=True)
            with clock("score"):
                scores = score_results(scorer, prompts, results)
            with clock("kl"):
                kl = kl_estimate(results, ref_model)
            pairs, ties = best_worst_pairs(prompts, results, scores, cfg.min_reward_gap, r)
            flat = [s for row in scores for s in row]
            stats = {
                "prompts": len(prompts), "samples": len(flat), "ties": ties,
                "sample_tokens": sum(len(c.token_ids) for res in results for c in res.completions),
                "reward_mean": statistics.fmean(flat), "reward_std": statistics.pstdev(flat),
                "reward_margin": statistics.fmean(p["chosen_score"] - p["rejected_score"] for p in pairs)
                if pairs else float("nan"),
                **kl,
            }
            _write_jsonl(pairs_file, pairs)
            _write_json(sample_stats_file, stats)
        k_off = min(len(offline_pairs), int(round(cfg.offline_ratio * len(pairs))))
        offline = random.Random(f"{seed}:{r}").sample(list(offline_pairs), k_off) if k_off else []
        train_pairs = pairs + offline
        # Seeded per round (not one generator across rounds), so a resumed round trains exactly as it would have.
        random.Random(f"{seed}:{r}:order").shuffle(train_pairs)
        train_metrics: dict[str, float] = {}
        if train_pairs:
            with clock("train"), tempfile.TemporaryDirectory(prefix="dpo-trainer-", dir=work) as scratch:
                train_metrics = train_round(policy, ref_model, tokenizer, train_pairs, replay, cfg,
                                            seed * 1000 + r, scratch, ema)
        else:
            log.warning("dpo round %d: every prompt was a tie and there are no offline pairs; no training", r)
        with clock("sync"), swapped_weights(policy, ema):
            sync = pool.sync_weights(policy)
        eval_metrics: dict[str, float] = {}
        if eval_prompts:
            with clock("eval_sample"):
                results = sample(pool, eval_prompts, cfg.eval_samples, cfg, seed, "dpo-eval")
            with clock("eval_score"):
                ev = [s for row in score_results(scorer, eval_prompts, results) for s in row]
            eval_metrics = held_out_metrics(eval_prompts, ev, baseline["rewards"], cfg.eval_samples)
        with clock("checkpoint"):
            _save_model_atomically(policy, tokenizer, rdir / "policy")
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.items()}, str(rdir / "ema.safetensors.tmp"))
                os.replace(rdir / "ema.safetensors.tmp", rdir / "ema.safetensors")
        metrics = {"round": r, **stats, "pairs_online": len(pairs), "pairs_offline": len(offline),
                   **{k.replace("/", "_"): v for k, v in train_metrics.items()}, **eval_metrics,
                   "sync_bytes": sync.get("bytes", 0)}
        metrics.update({f"time_{k}": v for k, v in clock.seconds.items()})
        metrics["time_total"] = time.perf_counter() - t_round
        _write_json(rdir / "metrics.json", metrics)
        # Only the latest finished round's weights are needed to resume; older ones are 1 model each.
        if r > 1:
            shutil.rmtree(_round_dir(work, r - 1) / "policy", ignore_errors=True)
            (_round_dir(work, r - 1) / "ema.safetensors").unlink(missing_ok=True)
        rounds.append(metrics)
        pairs_all.extend(pairs)
        if log_metrics is not None:
            log_metrics(metrics, r)
        if on_round is not None:
            on_round(r, metrics)
        log.info("dpo round %d: %d pairs (%d ties), reward %.3f, kl %.3f, held-out win rate %s", r, len(pairs),
                 stats["ties"], stats["reward_mean"], stats.get("kl", math.nan),
                 f"{eval_metrics['eval_win_rate']:.2f}" if eval_metrics else "-")
    return OnlineDPOResult(policy=policy, ema=ema, rounds=rounds, pairs=pairs_all, baseline=baseline,
                           timings=setup.seconds)


def save_policy(result: OnlineDPOResult, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the published policy (the EMA weights when kept) as a plain transformers folder vLLM serves."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    with swapped_weights(result.policy, result.ema):
        result.policy.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------
# Stage


SHAPE_KEYS = ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
              "moe_intermediate_size", "shared_expert_intermediate_size", "tie_word_embeddings")


def same_shapes(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two model folders have the same architecture and parameter shapes (so one's weights load into
    an engine serving the other)."""
    ca, cb = (json.loads((Path(p) / "config.json").read_text()) for p in (a, b))
    return all(ca.get(k) == cb.get(k) for k in SHAPE_KEYS)


def run(ctx) -> None:
    """Stage entry: read the inputs, check the prompt budget, get engines and reward actors, run the rounds,
    write `dpo_model` and `online_pairs`.

    The policy is served by the engines of ``pool_role`` (already running when earlier stages used them) with
    the SFT weights synced in, when the role's model has the SFT model's shapes; otherwise by engines of this
    stage that load `sft_model`. Afterwards the pools are released: their engines hold the trained weights.
    """
    from pipeline.engines.pool import WorkerPool
    from pipeline.models.catalog import resolve_model
    from reward.score import RewardPool

    cfg: OnlineDPOConfig = ctx.config
    sft_path = ctx.input_path("sft_model")
    reward_path = ctx.input_path("reward_model")
    prompts = prompt_rows(ctx.read("evolved").to_list()) + stdlib_prompt_rows(cfg.stdlib_prompts)
    train_p, eval_p = split_prompts(prompts, cfg, ctx.seed)
    offline = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in ctx.read("preferences").to_list()]
    sft_rows = ctx.read("sft").to_list() if cfg.sft_replay_coef > 0 else []
    role_cfg = ctx.run_config.models[cfg.pool_role]
    work = Path(ctx.work_dir) / "rounds"
    bar = ctx.progress(cfg.rounds, "dpo rounds")
    bar.advance(_finished_rounds(work))
    with contextlib.ExitStack() as stack:
        if same_shapes(resolve_model(role_cfg.model), sft_path):
            pool = ctx.pool(cfg.pool_role)
        else:
            ctx.log.info("dpo: role %s serves %s, whose shapes differ from sft_model; starting engines for "
                         "sft_model", cfg.pool_role, role_cfg.model)
            ctx.ensure_ray()
            pool = stack.enter_context(WorkerPool(role_cfg.model_copy(update={"model": str(sft_path)})))
        ctx.used_ray = True
        scorer = stack.enter_context(RewardPool(reward_path, cfg.reward))
        try:
            result = online_dpo(sft_path, pool, scorer, train_p, eval_p, offline, sft_rows, cfg, work,
                                seed=ctx.seed, log_metrics=lambda m, r: ctx.log_metrics(m, step=r),
                                on_round=lambda r, m: bar.advance(1))
        finally:
            bar.close()
            ctx.release_pools()  # their engines now hold trained weights, not their role's model
    save_policy(result, sft_path, ctx.output_path("dpo_model"))
    ctx.write("online_pairs", result.pairs)
    last = result.rounds[-1] if result.rounds else {}
    ctx.metrics.update({
        "rounds": [{k: v for k, v in m.items() if not k.startswith("expert_load")} for m in result.rounds],
        "online_pairs": len(result.pairs), "ties": sum(m.get("ties", 0) for m in result.rounds),
        "final_eval_win_rate": last.get("eval_win_rate"), "final_eval_reward_gain": last.get("eval_reward_gain"),
        "final_eval_reward_gain_se": last.get("eval_reward_gain_se"),
        **{f"final_{k}": v for k, v in last.items() if k.startswith(("eval_reward_gain_", "eval_win_rate_"))
           and k != "eval_reward_gain_se"},
        "final_kl": last.get("kl"), "ema": cfg.ema_decay is not None,
    })


def _make_stage():
    from pipeline.run.stage import Stage

    return Stage(name="dpo", inputs=("sft_model", "reward_model", "sft", "preferences", "evolved"),
                 outputs=("dpo_model", "online_pairs"), config_cls=OnlineDPOConfig, run=run)


STAGE = _make_stage()
