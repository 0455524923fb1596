"""Spec-aware quantization of the three kinds of tensor: weights, activations, KV states.

Pure functions: they translate a TensorQuantSpec into calls of ``fake_quantize``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from massquant.quantizers.functional import compute_amax, compute_amin, fake_quantize, outlier_mask, search_clip_ratio
from massquant.quantizers.spec import TensorQuantSpec

_WEIGHT_GRANULARITY = {"tensor": "tensor", "channel": "row", "group": "group"}
_ACTIVATION_GRANULARITY = {"tensor": "tensor", "token": "row"}


def quantize_weight(weight: Tensor, part: TensorQuantSpec) -> Tensor:
    """A ``[out, in]`` weight, quantized once: per tensor, per output channel or per group of inputs."""
    granularity = _WEIGHT_GRANULARITY[part.granularity]
    arguments = dict(fmt=part.format, bits=part.bits, granularity=granularity, group_size=part.group_size, symmetric=part.symmetric)
    clip_ratio = search_clip_ratio(weight, **arguments) if part.clip_search else 1.0
    return fake_quantize(weight, clip_ratio=clip_ratio, **arguments)


@dataclass(frozen=True)
class KeepRule:
    """Which activation values bypass quantization (``--massive keep``).

    A value is kept when |x| > ``abs_threshold`` and > ``median_ratio`` x the
    median |x| of its tensor; only ``channels`` (None: every channel) are inspected.
    """

    abs_threshold: float
    median_ratio: float
    channels: tuple[int, ...] | None = None


def keep_mask(x: Tensor, rule: KeepRule) -> Tensor | None:
    """The values of ``x`` that ``rule`` keeps in high precision; None when there are none."""
    return outlier_mask(x, rule.abs_threshold, rule.median_ratio, rule.channels)


def quantize_activation(
    x: Tensor, part: TensorQuantSpec, amax: Tensor | None = None, amin: Tensor | None = None, keep: Tensor | None = None
) -> Tensor:
    """``[..., features]`` per tensor or per token; ``amax``/``amin`` are calibrated ranges (static).

    ``keep`` (boolean, shaped like ``x``) marks values passed through unquantized and left out of every scale.
    """
    return fake_quantize(
        x, part.format, part.bits, _ACTIVATION_GRANULARITY[part.granularity],
        symmetric=part.symmetric, amax=amax, amin=amin, keep=keep,
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
