"""An exponential moving average of the policy weights: kept beside the raw weights, updated after every
optimizer step, swapped in (without a copy) whenever the engines are synced or the policy is published."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def init_ema(model) -> dict:
    """EMA tensors (name -> float32 copy of the parameter, on its device) starting at the model's weights: a
    bfloat16 average would drop the small steps it adds up."""
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}


def ema_callback(ema: dict, decay: float):
    """A transformers callback that updates ``ema`` in place after every optimizer step."""
    from transformers import TrainerCallback

    class EMACallback(TrainerCallback):
        """ema = decay * ema + (1 - decay) * weights after every optimizer step."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            import torch

            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in ema:
                        # The EMA may live on another device than the weights (e.g. host memory).
                        ema[name].mul_(decay).add_(p.detach().to(ema[name].device), alpha=1 - decay)

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
