"""A round's rollout: sample the policy on the engines, score the samples with the reward model, make the
best-vs-worst pairs, and estimate the KL to the reference from the sampled tokens."""

from __future__ import annotations

import functools
import hashlib
import statistics
from collections.abc import Callable, Sequence

from pipeline.run.stage import record_seed
from pipeline.thinking import MODE_FIELD, NO_THINK, TEMPLATE_ARG, THINK, follows_mode, text_switch
from reward.score import conversation
from stages.dpo import metrics as M
from stages.dpo.config import OnlineDPOConfig

EVAL_SALT = "dpo-eval"
"""Request-seed salt of the held-out samples: the same for the SFT baseline and every round (paired)."""


def round_salt(round_index: int) -> str:
    """Request-seed salt of a round's training samples."""
    return f"dpo-round-{round_index}"


def sample(pool, prompts: Sequence[dict], n: int, cfg: OnlineDPOConfig, seed: int, salt: str,
           logprobs: bool = False) -> list:
    """n samples per prompt from the pool; each request's seed comes from the run seed, the prompt id and salt. A
    prompt with a thinking ``mode`` is asked for it (``prompt_request``)."""
    from pipeline.engines.pool import ChatRequest

    requests = []
    for p in prompts:
        messages, kwargs = prompt_request(p)
        requests.append(ChatRequest(messages=messages, n=n, temperature=cfg.temperature, top_p=cfg.top_p,
                                    max_tokens=cfg.max_tokens, seed=record_seed(seed, p["id"], salt),
                                    logprobs=logprobs, chat_template_kwargs=kwargs or None))
    return pool.generate(requests)


def prompt_request(prompt: dict) -> tuple[list[dict], dict]:
    """(messages, chat-template kwargs) of a prompt row: its messages, with its thinking mode's switch when it has one
    (``switch``: the policy template's kind, set by ``stages.dpo.prompts.assign_modes``)."""
    if not prompt.get(MODE_FIELD):
        return prompt["messages"], {}
    if prompt.get("switch") == "template_arg":
        return prompt["messages"], {TEMPLATE_ARG: prompt[MODE_FIELD] == THINK}
    return text_switch(prompt["messages"], prompt[MODE_FIELD]), {}


def score_results(scorer, prompts: Sequence[dict], results: Sequence) -> list[list[float]]:
    """Reward of every sample, shaped like the results (one list per prompt)."""
    convs = [conversation(p["messages"], c.text) for p, r in zip(prompts, results, strict=True) for c in r.completions]
    flat = scorer.score(convs)
    out, i = [], 0
    for r in results:
        out.append(flat[i:i + len(r.completions)])
        i += len(r.completions)
    return out


def constraint_verdicts(prompts: Sequence[dict], results: Sequence) -> list[list[bool] | None]:
    """Per prompt, whether each sample follows every verifiable constraint of the prompt (``critique.constraints``);
    None for a prompt without constraints."""
    from critique.constraints import check, record_constraints

    out: list[list[bool] | None] = []
    for p, r in zip(prompts, results, strict=True):
        constraints = record_constraints(p)
        out.append([all(check(c.text, constraints)) for c in r.completions] if constraints else None)
    return out


def best_worst_pairs(prompts: Sequence[dict], results: Sequence, scores: Sequence[Sequence[float]],
                     min_gap: float, round_index: int,
                     verdicts: Sequence[Sequence[bool] | None] | None = None) -> tuple[list[dict], int]:
    """One pair per prompt (best vs worst sample; the earlier sample wins a tie in score); prompts whose gap is
    under ``min_gap`` are ties (counted). With ``verdicts`` (``constraint_verdicts``) a sample that follows its
    prompt's constraints ranks above every sample that does not, whatever their scores (a hard preference, as in
    RL with verifiable rewards), and such a pair is kept whatever its score gap. A prompt with a thinking ``mode``
    pairs only samples in that mode (``pipeline.thinking.follows_mode``): never a slow answer against a fast one."""
    pairs, ties = [], 0
    verdicts = verdicts or [None] * len(prompts)
    for p, r, s, v in zip(prompts, results, scores, verdicts, strict=True):
        ok = v or [False] * len(s)
        mode = p.get(MODE_FIELD)
        cands = [j for j, c in enumerate(r.completions) if not mode or follows_mode(c.text, mode)]
        if not cands:
            ties += 1
            continue
        best = max(cands, key=lambda j: (ok[j], s[j], -j))
        worst = min(cands, key=lambda j: (ok[j], s[j], j))
        verified = ok[best] and not ok[worst]
        if best == worst or (not verified and s[best] - s[worst] < min_gap):
            ties += 1
            continue
        messages, kwargs = prompt_request(p)
        # a fast sample asked through the template argument came after the template's empty think block: the pair
        # keeps it in the answers, so the trainer sees the context the sample was drawn in
        before = p["empty_block"] if kwargs and mode == NO_THINK else ""
        pairs.append({
            "id": hashlib.sha1(f"{p['id']}:online:{round_index}".encode()).hexdigest()[:16],
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": before + r.completions[best].text}],
            "rejected": [{"role": "assistant", "content": before + r.completions[worst].text}],
            "source": f"online_round_{round_index}",
            "chosen_score": float(s[best]), "rejected_score": float(s[worst]), "verified": verified,
            "instruction_id": p["id"], "round": round_index, "n_samples": len(s),
            "chosen_finish_reason": r.completions[best].finish_reason,
            "rejected_finish_reason": r.completions[worst].finish_reason,
            **({MODE_FIELD: mode, "off_mode_samples": len(s) - len(cands)} if mode else {}),
        })
    return pairs, ties


def sequence_logprobs(model, items: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 4) -> list[float]:
    """Sum of log p(completion token) under ``model`` for each (prompt_ids, completion_ids), teacher forced
    (batched by length, right-padded; the tensors are made on the model's device)."""
    import torch

    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    out = [0.0] * len(items)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seqs = [list(items[i][0]) + list(items[i][1]) for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(idx), width), pad, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for row, s in enumerate(seqs):
                ids[row, :len(s)] = torch.tensor(s, device=device)
                mask[row, :len(s)] = 1
            # no_grad, not inference_mode: an FSDP2-sharded model keeps buffers that a later training step writes.
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            for row, i in enumerate(idx):
                p_len, c_len = len(items[i][0]), len(items[i][1])
                if c_len == 0:
                    continue
                lp = torch.log_softmax(logits[row, p_len - 1:p_len - 1 + c_len], dim=-1)
                tok = torch.tensor(list(items[i][1]), device=device)
                out[i] = float(lp.gather(-1, tok[:, None]).sum())
    finally:
        model.train(was_training)
    return out


def kl_from_logprobs(policy_lp: Sequence[float], ref_lp: Sequence[float], tokens: int) -> dict[str, float]:
    """KL per sample and per token from each sample's summed log-probabilities under the policy and the
    reference (``tokens``: sampled tokens in all)."""
    if not policy_lp:
        return {M.KL: float("nan"), M.KL_PER_TOKEN: float("nan")}
    diffs = [p - q for p, q in zip(policy_lp, ref_lp, strict=True)]
    return {M.KL: sum(diffs) / len(diffs), M.KL_PER_TOKEN: sum(diffs) / max(1, tokens)}


def kl_estimate(results: Sequence, ref_model=None, *, ref_logprobs: Callable[[list], list[float]] | None = None,
                max_samples: int | None = None, seed: int = 0) -> dict[str, float]:
    """KL(policy || reference) estimated on the policy's own samples: mean over samples of
    sum_t [log pi(y_t) - log pi_ref(y_t)] (pi's logprobs as vLLM sampled them, pi_ref by a forward pass of
    ``ref_model``, or by ``ref_logprobs(items)`` where the reference lives elsewhere). ``max_samples``: a seeded
    subsample of that many samples is scored (the reference forward is the cost)."""
    import random

    items, policy_lp, tokens = [], [], 0
    for r in results:
        for c in r.completions:
            if c.logprobs is None:
                raise ValueError("samples carry no logprobs; sample with logprobs=True to estimate the KL")
            items.append((r.prompt_token_ids, c.token_ids))
            policy_lp.append(sum(c.logprobs))
            tokens += len(c.token_ids)
    if max_samples is not None and len(items) > max_samples:
        keep = sorted(random.Random(f"{seed}:kl").sample(range(len(items)), max_samples))
        items, policy_lp = [items[i] for i in keep], [policy_lp[i] for i in keep]
        tokens = sum(len(c) for _, c in items)
    if ref_logprobs is None:
        ref_logprobs = functools.partial(sequence_logprobs, ref_model)
    return kl_from_logprobs(policy_lp, ref_logprobs(items) if items else [], tokens)


def rollout_round(pool, scorer, ref_logprobs: Callable[[list], list[float]], prompts: Sequence[dict],
                  cfg: OnlineDPOConfig, seed: int, round_index: int, clock: M.PhaseClock) -> tuple[list[dict], dict]:
    """Sample, score and pair the round's prompts: (pairs, the round's sampling figures including the KL, from
    ``ref_logprobs`` on ``cfg.kl_samples`` samples)."""
    with clock("sample"):
        results = sample(pool, prompts, cfg.samples_per_prompt, cfg, seed, round_salt(round_index), logprobs=True)
    with clock("score"):
        scores = score_results(scorer, prompts, results)
        verdicts = constraint_verdicts(prompts, results)
    with clock("kl"):
        kl = kl_estimate(results, ref_logprobs=ref_logprobs, max_samples=cfg.kl_samples,
                         seed=seed * 1000 + round_index)
    pairs, ties = best_worst_pairs(prompts, results, scores, cfg.min_reward_gap, round_index, verdicts)
    flat = [s for row in scores for s in row]
    checked = [ok for row in verdicts if row is not None for ok in row]
    stats = {
        M.PROMPTS: len(prompts), M.SAMPLES: len(flat), M.TIES: ties,
        M.SAMPLE_TOKENS: sum(len(c.token_ids) for res in results for c in res.completions),
        M.REWARD_MEAN: statistics.fmean(flat), M.REWARD_STD: statistics.pstdev(flat),
        M.REWARD_MARGIN: statistics.fmean(p["chosen_score"] - p["rejected_score"] for p in pairs)
        if pairs else float("nan"),
        M.VERIFIED_SAMPLES: len(checked),
        M.VERIFIED_PASS_RATE: statistics.fmean(checked) if checked else float("nan"),
        M.PAIRS_VERIFIED: sum(p["verified"] for p in pairs),
        **kl,
    }
    return pairs, stats


def held_out_samples(pool, scorer, prompts: Sequence[dict], cfg: OnlineDPOConfig, seed: int,
                     clock: M.PhaseClock | None = None,
                     judge: Callable[[Sequence[dict], Sequence], list[float | None]] | None = None) -> dict[str, list]:
    """``cfg.eval_samples`` samples per held-out prompt (same request seeds every time they are drawn): their
    ``rewards``, ``tokens``, ``finish_reasons`` and, with a ``judge``, its ``grades``; flat and prompt-major."""
    clock = clock or M.PhaseClock()
    with clock("eval_sample"):
        results = sample(pool, prompts, cfg.eval_samples, cfg, seed, EVAL_SALT)
    with clock("eval_score"):
        rewards = [s for row in score_results(scorer, prompts, results) for s in row]
    out = {"rewards": rewards, "tokens": [len(c.token_ids) for r in results for c in r.completions],
           "finish_reasons": [c.finish_reason for r in results for c in r.completions]}
    if judge is not None:
        with clock("eval_judge"):
            out["grades"] = judge(prompts, results)
    return out
