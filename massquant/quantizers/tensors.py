"""Spec-aware quantization of the three kinds of tensor: weights, activations, KV states.

Pure functions: they translate a TensorQuantSpec into calls of ``fake_quantize``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from massquant.quantizers.functional import compute_amax, compute_amin, fake_quantize, search_clip_ratio
from massquant.quantizers.spec import TensorQuantSpec

_WEIGHT_GRANULARITY = {"tensor": "tensor", "channel": "row", "group": "group"}
_ACTIVATION_GRANULARITY = {"tensor": "tensor", "token": "row"}


def quantize_weight(weight: Tensor, part: TensorQuantSpec) -> Tensor:
    """A ``[out, in]`` weight, quantized once: per tensor, per output channel or per group of inputs."""
    granularity = _WEIGHT_GRANULARITY[part.granularity]
    arguments = dict(fmt=part.format, bits=part.bits, granularity=granularity, group_size=part.group_size, symmetric=part.symmetric)
    clip_ratio = search_clip_ratio(weight, **arguments) if part.clip_search else 1.0
    return fake_quantize(weight, clip_ratio=clip_ratio, **arguments)


def quantize_activation(x: Tensor, part: TensorQuantSpec, amax: Tensor | None = None, amin: Tensor | None = None) -> Tensor:
    """``[..., features]`` per tensor or per token; ``amax``/``amin`` are calibrated ranges (static)."""
    return fake_quantize(
        x, part.format, part.bits, _ACTIVATION_GRANULARITY[part.granularity],
        symmetric=part.symmetric, amax=amax, amin=amin,
    )


def quantize_kv(states: Tensor, part: TensorQuantSpec, amax: Tensor | None = None, amin: Tensor | None = None) -> Tensor:
    """Keys or values ``[batch, heads, tokens, head_dim]``.

    head: one scale per head and token; token: one per token across heads;
    group: groups of ``group_size`` within a head; tensor: one for all.
    """
    common = dict(fmt=part.format, bits=part.bits, symmetric=part.symmetric, amax=amax, amin=amin)
    if part.granularity == "token":
        by_token = states.transpose(1, 2).reshape(*states.shape[:1], states.shape[2], -1)
        quantized = fake_quantize(by_token, granularity="row", **common)
        return quantized.reshape(states.shape[0], states.shape[2], states.shape[1], -1).transpose(1, 2)
    granularity = {"head": "row", "group": "group", "tensor": "tensor"}[part.granularity]
    return fake_quantize(states, granularity=granularity, group_size=part.group_size, **common)


def observed_range(x: Tensor, part: TensorQuantSpec) -> tuple[Tensor, Tensor]:
    """(amax, amin) of one calibration batch for a static per-tensor range: min-max or a percentile of |x|."""
    if part.calibration.startswith("p"):
        flat = x.detach().float().flatten()
        q = float(part.calibration[1:]) / 100
        if part.symmetric:
            high = torch.quantile(flat.abs()[: 1 << 24], q)
            return high, -high
        return torch.quantile(flat[: 1 << 24], q), torch.quantile(flat[: 1 << 24], 1 - q)
    amax = compute_amax(x, "tensor", fmt=part.format, symmetric=part.symmetric)
    return amax, (-amax if part.symmetric else compute_amin(x, "tensor", fmt=part.format))
