"""One DPO training step outside TRL's Trainer, for the rounds that train on a Ray Train job (``stages.dpo.cluster``).

The loss is the one TRL's DPOTrainer computes for this stage (``trainer.ReplayDPOTrainer``), term for term:

    dpo_weight * L_type(beta) + alpha * NLL(chosen) + coef * router_aux + gamma * (NLL(replay) + coef * router_aux)

with TRL's tokenization of conversational pairs (``tokenize_pairs`` follows ``DPOTrainer._prepare_dataset``), TRL's
own collator (``DataCollatorForPreference``), TRL's "sft" term (mean NLL over the chosen completion tokens) and the
preference formulas of ``losses``; tests/test_dpo_distributed.py checks the value against TRL's on the same batch.
Why not TRL's Trainer: the workers keep one sharded policy and its optimizer across rounds and send weights
straight to the engines, which a Trainer made per round (and its accelerate wrapping) does not allow.

Reference log-probabilities are computed once per round from the frozen reference (``reference_logps``) and
read from the rows; the reference never sees the current policy's weights.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from stages.dpo import metrics as M
from stages.dpo.losses import dpo_loss


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=True)["input_ids"])


def tokenize_pairs(tokenizer, pairs: Sequence[dict], max_length: int) -> list[dict]:
    """Conversational pairs -> {prompt_ids, chosen_ids, rejected_ids} as TRL's DPOTrainer tokenizes them (the
    completion starts where the tokenized prompt and prompt + completion diverge); pairs whose prompt alone fills
    ``max_length`` are dropped, as TRL drops them."""
    rows = []
    for p in pairs:
        prompt = _ids(tokenizer, p["prompt"], True)
        chosen = _ids(tokenizer, p["prompt"] + p["chosen"], False)
        rejected = _ids(tokenizer, p["prompt"] + p["rejected"], False)
        n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
        if n < max_length:
            rows.append({"prompt_ids": prompt[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]})
    return rows


def collate_pairs(rows: Sequence[dict], pad_id: int, max_length: int, device) -> dict:
    """TRL's ``DataCollatorForPreference`` batch ([chosen; rejected] rows), every tensor on ``device``."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=pad_id, max_length=max_length)([dict(r) for r in rows])
    return {k: v.to(device) for k, v in batch.items()}


def token_logps(model, input_ids, attention_mask, labels, router_logits: bool = False) -> tuple[Any, Any, Any]:
    """(log p of each next token [B, T-1] (0 where the label is -100), its mask, the router aux loss or None)."""
    import torch

    kwargs: dict[str, Any] = {"use_cache": False}
    if router_logits:
        kwargs["output_router_logits"] = True
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    logits = out.logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return logp, mask, getattr(out, "aux_loss", None) if router_logits else None


def completion_labels(batch: dict):
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)


def reference_logps(model, rows: Sequence[dict], pad_id: int, max_length: int, batch_size: int, device
                    ) -> list[tuple[float, float]]:
    """(chosen, rejected) summed completion log-probabilities of each row under ``model`` (the frozen reference,
    or the policy with its adapters disabled), in row order."""
    import torch

    out: list[tuple[float, float]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate_pairs(rows[start:start + batch_size], pad_id, max_length, device)
            logp, _, _ = token_logps(model, batch["input_ids"], batch["attention_mask"], completion_labels(batch))
            c, r = logp.sum(1).chunk(2)
            out.extend(zip(c.tolist(), r.tolist(), strict=True))
    return out


def replay_rows(replay: Sequence[dict], batch_size: int, seed: int, step: int, micro: int) -> list[dict]:
    """The replay batch of micro-batch ``micro`` of optimizer step ``step``: a function of its position only, so
    N workers and one process with N times the accumulation draw the same batches."""
    if not replay:
        return []
    return random.Random(f"{seed}:{step}:{micro}").sample(list(replay), min(batch_size, len(replay)))


def micro_batch_loss(model, batch: dict, ref_chosen, ref_rejected, replay_batch: dict | None, cfg,
                     aux_coef: float) -> tuple[Any, dict[str, float]]:
    """The loss of one micro-batch of pairs (the module docstring's formula) and its logged terms."""
    import torch

    aux = aux_coef > 0 and hasattr(model.config.get_text_config(), "output_router_logits")
    labels = completion_labels(batch)
    logp, mask, aux_loss = token_logps(model, batch["input_ids"], batch["attention_mask"], labels, aux)
    logps = logp.sum(1)
    c, r = logps.chunk(2)
    nc, nr = batch["completion_mask"].sum(1).to(logps.dtype).chunk(2)
    pref = dpo_loss(cfg.dpo_loss_type, cfg.beta, c, r, ref_chosen, ref_rejected, nc, nr)
    cmask, _ = mask.chunk(2)
    clp, _ = logp.chunk(2)
    chosen_nll = -clp[cmask].mean()
    loss = torch.zeros((), device=logps.device)
    if cfg.dpo_weight > 0:
        loss = loss + cfg.dpo_weight * pref
    if cfg.chosen_loss_coef > 0:
        loss = loss + cfg.chosen_loss_coef * chosen_nll
    terms = {M.LOSS_DPO: float(pref.detach()), M.LOSS_CHOSEN_NLL: float(chosen_nll.detach())}
    if aux_loss is not None:
        loss = loss + aux_coef * aux_loss
        terms[M.LOSS_ROUTER_AUX] = float(aux_loss.detach())
    if replay_batch is not None and cfg.sft_replay_coef > 0:
        rlp, rmask, raux = token_logps(model, replay_batch["input_ids"], replay_batch["attention_mask"],
                                       replay_batch["labels"], aux)
        replay_nll = -rlp.sum() / rmask.sum().clamp(min=1)
        replay = replay_nll + (aux_coef * raux if raux is not None else 0.0)
        loss = loss + cfg.sft_replay_coef * replay
        terms[M.LOSS_REPLAY_NLL] = float(replay_nll.detach())
        if raux is not None:
            terms[M.LOSS_REPLAY_ROUTER_AUX] = float(raux.detach())
    with torch.no_grad():
        margin = (c - ref_chosen) - (r - ref_rejected)
        terms[M.TRL_ACCURACIES] = float((margin > 0).float().mean())
        terms[M.TRL_MARGINS] = float(cfg.beta * margin.mean())
    terms[M.LOSS_TOTAL] = float(loss.detach())
    return loss, terms


def optimizer_step(model, micro_batches: Sequence[Callable[[], tuple[Any, dict[str, float]]]], optimizer,
                   scheduler, max_grad_norm: float, clip: Callable[[Any, float], Any]) -> tuple[float, list[dict]]:
    """Accumulate the gradients of ``micro_batches`` (each a function returning (loss, terms)), each scaled by
    1 / their count, clip the global gradient norm (``clip(params, max_norm)`` -> total norm), step. Returns
    (grad norm before clipping, each micro-batch's terms)."""
    terms = []
    for run in micro_batches:
        loss, t = run()
        (loss / len(micro_batches)).backward()
        terms.append(t)
    norm = clip([p for p in model.parameters() if p.grad is not None], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm), terms
