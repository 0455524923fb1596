"""Single-Scale RMSNorm (Park et al. 2025, "Outlier-Safe Pre-Training", OSP): one learnable gain per norm.

RMSNorm's per-channel gain lets training grow a few channels of every token
without bound, which OSP identifies as one source of channel-wise outliers;
SSNorm keeps the normalisation and replaces the [hidden] gain by ONE scalar
per norm: ``y = scale * x / sqrt(mean(x^2) + eps)``. Replaced: each decoder
layer's input and post-attention norms and the final norm (the norms DyT
replaces, ``dyt.norm_paths``); Gemma's branch-output norms and q/k norms stay.

Initialisation: ``scale`` is the mean of the old norm's per-channel gain (read
off the module as its output for a constant input of 2^10, whose RMS normalises
exactly to 1 with eps far below float32's resolution, so Gemma's ``1 + weight``
counts too), and ``eps`` is the old norm's. A freshly initialised model (gain 1
everywhere, ``from_scratch``) is therefore unchanged bit for bit; a trained
model with unequal gains changes (the per-channel spread is what SSNorm removes).

The parameter is named ``weight`` (shape [1]) so that it broadcasts where a
norm's weight is read; folding a per-channel scale into it is refused by
shape, never silently wrong.
"""

from __future__ import annotations

import torch
from torch import nn

from massquant.mitigations import Mitigation
from massquant.mitigations.dyt import norm_paths

MITIGATION = Mitigation(
    name="ssnorm",
    kind="training",
    description="single-scale RMSNorm (OSP): each norm's per-channel gain becomes one learnable scalar (its mean gain)",
    requires=("rmsnorm",),
)


class SingleScaleRMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2, -1) + eps)`` with a scalar ``weight`` ([1]); x: [..., hidden].

    The statistic is taken in float32 and the result cast back, as transformers' LlamaRMSNorm does.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, scale: float = 1.0, dtype=None, device=None):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.full((1,), float(scale), dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


@torch.no_grad()
def read_gain(norm: nn.Module, hidden_size: int, like: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's per-channel gain ([hidden]), exactly: its output for a constant input of 2^10 (RMS 2^10)."""
    return norm(torch.full((1, hidden_size), 1024.0, dtype=like.dtype, device=like.device))[0]


def _eps(norm: nn.Module, config) -> float:
    for name in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm, name, None), float):
            return getattr(norm, name)
    return float(getattr(config, "rms_norm_eps", 1e-6))


@torch.no_grad()
def surgery(model, params: dict) -> dict:
    """Replace the residual-stream RMSNorms; returns each norm's starting scale and the spread it dropped."""
    hidden_size = model.config.hidden_size
    scales, spread = {}, {}
    for path in norm_paths(model):
        old = model.get_submodule(path)
        like = next(old.parameters())
        if like.is_meta:  # a checkpoint being rebuilt: its weights load next
            model.set_submodule(path, SingleScaleRMSNorm(hidden_size, _eps(old, model.config), dtype=like.dtype, device=like.device))
            continue
        gain = read_gain(old, hidden_size, like).float()
        new = SingleScaleRMSNorm(hidden_size, _eps(old, model.config), float(gain.mean()), dtype=like.dtype, device=like.device)
        model.set_submodule(path, new)
        scales[path], spread[path] = float(new.weight.detach()), float(gain.std(unbiased=False))
    if not scales:
        return None
    return {"initialised": "each norm's scale = the mean of its per-channel gain", "scale": scales, "gain_std_dropped": spread}
