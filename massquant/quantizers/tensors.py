"""Spec-aware quantization of the three kinds of tensor: weights, activations, KV states.

Pure functions: they translate a TensorQuantSpec into calls of ``fake_quantize``.

Activations and KV states come in batches of sequences (dim 0). "Per tensor"
means per sequence, over its real tokens: one scale for each sequence, taken
from its own real tokens, so neither the other sequences of a batch nor
padding (``real``: ``[batch, tokens]`` bool, True at real tokens) change a
number. Padding positions pass through unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from massquant.quantizers.formats import get_format
from massquant.quantizers.functional import (
    compute_amax, compute_amin, fake_quantize, outlier_mask, search_clip_ratio, token_mask_like,
)
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


def keep_mask(x: Tensor, rule: KeepRule, real: Tensor | None = None) -> Tensor | None:
    """The values of ``x`` ``[batch, tokens, features]`` that ``rule`` keeps in high precision; None when there are none.

    The median of the rule is each sequence's own, over its real tokens (``real``).
    """
    return outlier_mask(x, rule.abs_threshold, rule.median_ratio, rule.channels, real)


def _padding(real: Tensor | None, x: Tensor, token_dim: int = 1) -> Tensor | None:
    """Shaped like ``x``: True at the positions of padding tokens (``real`` is False there); None without a mask."""
    return None if real is None else ~token_mask_like(real, x, token_dim).expand_as(x)


def _outside(keep: Tensor | None, padding: Tensor | None) -> Tensor | None:
    if padding is None:
        return keep
    return padding if keep is None else keep | padding


def _quantize_sequences(
    x: Tensor, part: TensorQuantSpec, granularity: str, amax: Tensor | None, amin: Tensor | None, keep: Tensor | None
) -> Tensor:
    """``fake_quantize`` on ``x`` whose dim 0 indexes sequences: a per-tensor scale is one per sequence.

    ``keep`` (shaped like ``x``) bypasses quantization and every scale.
    """
    common = dict(fmt=part.format, bits=part.bits, group_size=part.group_size, symmetric=part.symmetric, amax=amax, amin=amin)
    if x.dim() < 3:  # one sequence
        return fake_quantize(x, granularity=granularity, keep=keep, **common)
    if get_format(part.format).tensor_scale:  # blocks coupled through the tensor: one sequence at a time
        kept = [None] * len(x) if keep is None else keep
        return torch.cat([fake_quantize(s[None], granularity=granularity, keep=k if k is None else k[None], **common) for s, k in zip(x, kept)])
    if granularity != "tensor":  # rows and groups never span sequences
        return fake_quantize(x, granularity=granularity, keep=keep, **common)
    by_sequence = x.reshape(x.shape[0], -1)
    kept = None if keep is None else keep.reshape(x.shape[0], -1)
    return fake_quantize(by_sequence, granularity="row", keep=kept, **common).reshape(x.shape)


def quantize_activation(
    x: Tensor, part: TensorQuantSpec, amax: Tensor | None = None, amin: Tensor | None = None,
    keep: Tensor | None = None, real: Tensor | None = None,
) -> Tensor:
    """``[batch, tokens, features]`` (or one sequence ``[tokens, features]``) per sequence or per token.

    ``amax``/``amin`` are calibrated ranges (static). ``keep`` (boolean, shaped
    like ``x``) marks values passed through unquantized and left out of every
    scale; so are padding positions (``real``, ``[batch, tokens]``, False there).
    """
    padding = _padding(real, x)
    return _quantize_sequences(x, part, _ACTIVATION_GRANULARITY[part.granularity], amax, amin, _outside(keep, padding))


def quantize_kv(
    states: Tensor, part: TensorQuantSpec, amax: Tensor | None = None, amin: Tensor | None = None,
    real: Tensor | None = None,
) -> Tensor:
    """Keys or values ``[batch, heads, tokens, head_dim]``; ``real`` ``[batch, tokens]`` marks real tokens.

    head: one scale per head and token; token: one per token across heads;
    group: groups of ``group_size`` within a head; tensor: one per sequence,
    over its real tokens. Padding positions pass through unquantized.
    """
    if part.granularity == "token":
        by_token = states.transpose(1, 2).reshape(*states.shape[:1], states.shape[2], -1)
        quantized = _quantize_sequences(by_token, part, "row", amax, amin, _padding(real, by_token))
        return quantized.reshape(states.shape[0], states.shape[2], states.shape[1], -1).transpose(1, 2)
    granularity = {"head": "row", "group": "group", "tensor": "tensor"}[part.granularity]
    return _quantize_sequences(states, part, granularity, amax, amin, _padding(real, states, token_dim=2))


def real_rows(x: Tensor, real: Tensor | None, token_dim: int = 1) -> list[Tensor]:
    """Each sequence of ``x`` (dim 0) restricted to its real tokens (``real``, ``[batch, tokens]``), tokens first."""
    if x.dim() < 3:
        return [x]
    sequences = x.movedim(token_dim, 1)
    if real is None:
        return list(sequences)
    return [sequence[mask] for sequence, mask in zip(sequences, real)]


def observed_range(x: Tensor, part: TensorQuantSpec) -> tuple[Tensor, Tensor]:
    """(amax, amin) of one calibration sequence's real values for a static per-tensor range: min-max or a percentile of |x|."""
    if part.calibration.startswith("p"):
        flat = x.detach().float().flatten()
        q = float(part.calibration[1:]) / 100
        if part.symmetric:
            high = torch.quantile(flat.abs()[: 1 << 24], q)
            return high, -high
        return torch.quantile(flat[: 1 << 24], q), torch.quantile(flat[: 1 << 24], 1 - q)
    amax = compute_amax(x, "tensor", fmt=part.format, symmetric=part.symmetric)
    return amax, (-amax if part.symmetric else compute_amin(x, "tensor", fmt=part.format))
