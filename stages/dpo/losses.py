"""The loss terms of a DPO step as the trainer logs them: the configured preference loss, the chosen NLL and
the router aux loss, from the per-token log-probabilities of the forward passes TRL ran.

The step's loss is

    dpo_weight * L_type(beta) + alpha * NLL(chosen) + router_aux + gamma * (NLL(SFT replay) + router_aux)

TRL computes and trains on the first three (``DPOTrainer._compute_loss``, ``loss_type=[type, "sft"]``); TRL
logs no per-type value, so ``dpo_loss`` evaluates ``L_type`` by the formula TRL 1.16 uses for that type, and the
trainer logs it as ``loss/dpo``. To add a loss type: add its name to ``DpoLossType`` and its formula to
``_FORMULAS`` (copied from TRL's ``_compute_loss``); the loss-decomposition test then checks the two agree.

torch is imported inside the functions, so that reading the config does not import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

DpoLossType = Literal["sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                      "apo_zero", "apo_down", "sigmoid_norm"]
"""TRL's ``DPOConfig.loss_type`` values that need no setting beyond ``beta``. Left out: "exo_pair" and "robust"
(need ``label_smoothing``), "discopop" (``discopop_tau``), "sft" (the chosen NLL: ``chosen_loss_coef``)."""

TRL_DEFAULTS = {"ld_alpha": None, "f_divergence_type": "reverse_kl", "label_smoothing": 0.0, "use_weighting": False}
"""DPOConfig settings the formulas below assume (TRL's defaults; the stage sets none of them)."""


def _sigmoid(beta, c, r, rc, rr, nc, nr):
    import torch.nn.functional as F

    return -F.logsigmoid(beta * ((c - rc) - (r - rr)))


def _hinge(beta, c, r, rc, rr, nc, nr):
    import torch

    return torch.relu(1 - beta * ((c - rc) - (r - rr)))


def _ipo(beta, c, r, rc, rr, nc, nr):
    # TRL normalizes the log-ratios by the completion lengths (average per token).
    return ((c - rc) / nc - (r - rr) / nr - 1 / (2 * beta)) ** 2


def _nca_pair(beta, c, r, rc, rr, nc, nr):
    import torch.nn.functional as F

    chosen, rejected = beta * (c - rc), beta * (r - rr)
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _bco_pair(beta, c, r, rc, rr, nc, nr):
    import torch.nn.functional as F

    return -F.logsigmoid(beta * (c - rc)) - F.logsigmoid(-beta * (r - rr))


def _sppo_hard(beta, c, r, rc, rr, nc, nr):
    return ((c - rc) - 0.5 / beta) ** 2 + ((r - rr) + 0.5 / beta) ** 2


def _aot(beta, c, r, rc, rr, nc, nr):
    import torch
    import torch.nn.functional as F

    delta = torch.sort(c - r, dim=0).values - torch.sort(rc - rr, dim=0).values
    return -F.logsigmoid(beta * delta)


def _aot_unpaired(beta, c, r, rc, rr, nc, nr):
    import torch
    import torch.nn.functional as F

    delta = torch.sort(c - rc, dim=0).values - torch.sort(r - rr, dim=0).values
    return -F.logsigmoid(beta * delta)


def _apo_zero(beta, c, r, rc, rr, nc, nr):
    import torch

    return (1 - torch.sigmoid(beta * (c - rc))) + torch.sigmoid(beta * (r - rr))


def _apo_down(beta, c, r, rc, rr, nc, nr):
    import torch

    return torch.sigmoid(beta * (c - rc)) + (1 - torch.sigmoid(beta * ((c - rc) - (r - rr))))


def _sigmoid_norm(beta, c, r, rc, rr, nc, nr):
    import torch.nn.functional as F

    return -F.logsigmoid(beta * ((c - rc) / nc - (r - rr) / nr))


_FORMULAS: dict[str, Callable[..., Any]] = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "nca_pair": _nca_pair, "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard, "aot": _aot, "aot_unpaired": _aot_unpaired, "apo_zero": _apo_zero,
    "apo_down": _apo_down, "sigmoid_norm": _sigmoid_norm,
}
assert set(_FORMULAS) == set(get_args(DpoLossType)), "every allowed loss type needs its formula"


def dpo_loss(loss_type: str, beta: float, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
             chosen_tokens, rejected_tokens):
    """Mean over the batch of the preference loss ``loss_type`` (tensors of shape [pairs]: summed completion
    log-probabilities under the policy and the reference, and completion lengths in tokens)."""
    if loss_type not in _FORMULAS:
        raise ValueError(f"dpo loss type {loss_type!r} is not one of {sorted(_FORMULAS)}")
    nc, nr = chosen_tokens.clamp(min=1.0), rejected_tokens.clamp(min=1.0)
    return _FORMULAS[loss_type](beta, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                nc, nr).mean()


def preference_terms(inputs: dict, policy_out, ref_out, beta: float, loss_type: str) -> dict[str, float]:
    """``loss/dpo`` (the configured type), ``loss/chosen_nll`` and ``loss/router_aux`` of one DPO batch.

    ``inputs`` is TRL's collated batch ([chosen; rejected] rows, ``completion_mask``); ``policy_out`` and
    ``ref_out`` the outputs of the forwards TRL ran (``log_probs`` per token); ``ref_out`` None when TRL read
    precomputed reference log-probs from the batch.
    """
    import torch

    from stages.dpo.metrics import LOSS_CHOSEN_NLL, LOSS_DPO, LOSS_ROUTER_AUX

    if policy_out is None or getattr(policy_out, "log_probs", None) is None:
        return {}
    with torch.no_grad():
        mask = inputs["completion_mask"][:, 1:]
        lp = policy_out.log_probs[:, -mask.size(1):].detach()
        logps = (lp * mask).sum(1)
        if ref_out is not None:
            ref_logps = (ref_out.log_probs[:, -mask.size(1):] * mask).sum(1)
        else:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        c, r = logps.chunk(2)
        rc, rr = ref_logps.chunk(2)
        # TRL's length normalization ("ipo", "sigmoid_norm") counts the unshifted completion mask.
        nc, nr = inputs["completion_mask"].sum(1).to(logps.dtype).chunk(2)
        cmask, _ = mask.chunk(2)
        clp, _ = lp.chunk(2)
        terms = {LOSS_DPO: float(dpo_loss(loss_type, beta, c, r, rc, rr, nc, nr)),
                 LOSS_CHOSEN_NLL: float(-clp[cmask.bool()].mean())}
        if getattr(policy_out, "aux_loss", None) is not None:
            terms[LOSS_ROUTER_AUX] = float(policy_out.aux_loss)
    return terms
