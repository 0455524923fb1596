"""Which positions of the batch in flight are real tokens, so padding never enters a scale or a statistic.

A forward pre-hook on the top-level model reads the 2-D ``attention_mask`` it
is called with (1 = real token, 0 = padding, as transformers and HFLM's
generation pass it) and publishes it for the quantizers and hooks inside that
forward; ``real_tokens`` hands each of them the columns that match its
tensor. Without a mask (or with no padding in it) every position is real.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Callable

import torch
from torch import Tensor

_MASK: ContextVar[Tensor | None] = ContextVar("massquant_real_tokens", default=None)
_ATTACHED = "_massquant_padding_hooks"  # (users, handles) on the model


def real_tokens(batch: int, tokens: int) -> Tensor | None:
    """``[batch, tokens]`` bool, True at real tokens, for a tensor of ``tokens`` positions in the forward in flight.

    The mask's last ``tokens`` columns: linear inputs cover the new tokens,
    keys and values the cached ones too. None when every position is real or
    the tensor does not line up with the mask (e.g. an MoE expert's gathered rows).
    """
    mask = _MASK.get()
    if mask is None or mask.shape[0] != batch or mask.shape[1] < tokens:
        return None
    return mask[:, mask.shape[1] - tokens :]


def _publish(module, args, kwargs):
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    padded = mask is not None and mask.dim() == 2 and not bool(mask.all())
    _MASK.set(mask.bool() if padded else None)


def _clear(module, args, kwargs, output):
    _MASK.set(None)


def attach_padding_mask(model: torch.nn.Module) -> Callable[[], None]:
    """Publish ``model``'s attention mask during each of its forwards; returns the undo.

    Several users (quantization, massive-value hooks) share one pair of hooks;
    the last undo removes them.
    """
    users, handles = getattr(model, _ATTACHED, (0, None))
    if handles is None:
        handles = (
            model.register_forward_pre_hook(_publish, with_kwargs=True),
            model.register_forward_hook(_clear, with_kwargs=True, always_call=True),
        )
    setattr(model, _ATTACHED, (users + 1, handles))

    def undo() -> None:
        remaining, current = getattr(model, _ATTACHED)
        if remaining == 1:
            for handle in current:
                handle.remove()
            delattr(model, _ATTACHED)
        else:
            setattr(model, _ATTACHED, (remaining - 1, current))

    return undo
