"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, one scale per input channel.

A linear layer computes ``x W^T = (x / s) (W diag(s))^T`` for any positive
per-channel ``s``; where the producer of ``x`` can absorb the ``1 / s`` exactly,
the smoothed model computes the same function with tamer inputs:

- ``qkv``: q/k/v read the input norm, whose gain is divided by ``s``;
- ``up``: the MLP's up projections read the post-attention norm: the same;
- ``o``: o_proj reads attention outputs, which are linear in the values:
  v_proj's output channels are divided by ``s`` (one scale per KV channel,
  shared by the query heads of its group);
- ``down``: down_proj reads ``act(gate) * up``: the linear up branch's output
  channels are divided by ``s``.

``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``: ``max|X_j|`` over the
calibration sequences (the channels of massive activations set it), ``max|W_j|``
over every linear reading channel ``j``. ``alpha = 0.5`` splits the range
evenly; higher moves more of it into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from massquant.errors import UserError
from massquant.mitigations import Mitigation
from massquant.mitigations.folding import (
    Edits, as_float64, linear_at, norm_gain, rmsnorm_architecture, scale_inputs, scale_outputs, set_norm_gain,
)
from massquant.models.passes import run_sequences
from massquant.models.architectures import decoder_layers

PROJECTIONS = ("qkv", "up", "o", "down")

MITIGATION = Mitigation(
    name="smoothquant",
    kind="post-hoc",
    description="SmoothQuant: per-channel scales max|X|^alpha / max|W|^(1-alpha) move activation outliers into the weights",
    parameters={"alpha": 0.5, "projections": PROJECTIONS},
    requires=("rmsnorm", "separate-qkv"),
    needs_calibration=True,
)


def smoothing_scales(activation_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|X_j|^alpha / max|W_j|^(1-alpha)``; 1 for a channel that never fired or has no weight (nothing to balance)."""
    balanced = activation_max.pow(alpha) / weight_max.pow(1 - alpha)
    return torch.where((activation_max > 0) & (weight_max > 0), balanced, torch.ones_like(balanced))


def input_column_max(weights: list[torch.Tensor]) -> torch.Tensor:
    """max |W[:, j]| over every weight reading input channel j."""
    return torch.stack([weight.abs().amax(0) for weight in weights]).amax(0)


def _smooth_norm_readers(norm: nn.Module, readers: list[nn.Linear], alpha: float, activation_max: torch.Tensor, edits: Edits) -> None:
    weights = [as_float64(linear.weight) for linear in readers]
    scales = smoothing_scales(activation_max, input_column_max(weights), alpha)
    set_norm_gain(norm, norm_gain(norm) / scales, edits)
    for linear, weight in zip(readers, weights):
        edits.set_tensor(linear, "weight", scale_inputs(weight, scales))


def _divide_outputs(linear: nn.Linear, scales: torch.Tensor, edits: Edits) -> None:
    edits.set_tensor(linear, "weight", scale_outputs(as_float64(linear.weight), scales))
    if linear.bias is not None:
        edits.set_tensor(linear, "bias", as_float64(linear.bias) / scales)


def _smooth_attention_output(
    value: nn.Linear, out_proj: nn.Linear, head_dim: int, alpha: float, activation_max: torch.Tensor, edits: Edits
) -> None:
    """o_proj's input channel (head h, d) is value channel (kv head of h, d): one scale per value channel."""
    kv_heads = value.out_features // head_dim
    group = out_proj.in_features // value.out_features  # query heads sharing one KV head

    def per_kv_channel(per_input: torch.Tensor) -> torch.Tensor:
        return per_input.view(kv_heads, group, head_dim).amax(1).flatten()

    out_weight = as_float64(out_proj.weight)
    kv_scales = smoothing_scales(per_kv_channel(activation_max), per_kv_channel(out_weight.abs().amax(0)), alpha)
    _divide_outputs(value, kv_scales, edits)
    input_scales = kv_scales.view(kv_heads, 1, head_dim).expand(kv_heads, group, head_dim).flatten()
    edits.set_tensor(out_proj, "weight", scale_inputs(out_weight, input_scales))


def _smooth_down_proj(up: nn.Linear, down: nn.Linear, alpha: float, activation_max: torch.Tensor, edits: Edits) -> None:
    down_weight = as_float64(down.weight)
    scales = smoothing_scales(activation_max, down_weight.abs().amax(0), alpha)
    _divide_outputs(up, scales, edits)
    edits.set_tensor(down, "weight", scale_inputs(down_weight, scales))


@dataclass(frozen=True)
class SmoothingSite:
    """One smoothed input: the linear whose input channels are measured, and how scales are folded for it."""

    measured: nn.Linear
    fold: Callable[[torch.Tensor, Edits], None]  # (max |x| per input channel, edits)


def smoothing_sites(model: nn.Module, projections: tuple[str, ...], alpha: float) -> list[SmoothingSite]:
    """Every site of ``projections`` in every decoder layer; missing or non-linear layers fail here, before calibration."""
    architecture = rmsnorm_architecture(model, MITIGATION.name)
    if "down" in projections and architecture.linear_up_proj is None:
        raise UserError(
            f"smoothquant 'down' needs a gated MLP with a linear up branch, which '{model.config.model_type}' "
            f"does not have; choose projections from {':'.join(p for p in PROJECTIONS if p != 'down')}"
        )
    name = MITIGATION.name
    sites = []
    for layer in decoder_layers(model):
        # o and down first: they rescale v_proj's and up's outputs, which changes the column maxima that
        # qkv and up balance against; folded the other way round, those balances would be off
        if "o" in projections:
            value, out_proj = linear_at(layer, architecture.value, name), linear_at(layer, architecture.out_proj, name)
            head_dim = layer.get_submodule(architecture.attention).head_dim
            sites.append(SmoothingSite(out_proj, partial(_smooth_attention_output, value, out_proj, head_dim, alpha)))
        if "down" in projections:
            up, down = linear_at(layer, architecture.linear_up_proj, name), linear_at(layer, architecture.down_proj, name)
            sites.append(SmoothingSite(down, partial(_smooth_down_proj, up, down, alpha)))
        if "qkv" in projections:
            readers = [linear_at(layer, path, name) for path in (architecture.query, architecture.key, architecture.value)]
            norm = layer.get_submodule(architecture.input_norm)
            sites.append(SmoothingSite(readers[0], partial(_smooth_norm_readers, norm, readers, alpha)))
        if "up" in projections:
            readers = [linear_at(layer, path, name) for path in architecture.up_proj]
            norm = layer.get_submodule(architecture.post_attention_norm)
            sites.append(SmoothingSite(readers[0], partial(_smooth_norm_readers, norm, readers, alpha)))
    return sites


@torch.no_grad()
def input_channel_maxima(model: nn.Module, modules: list[nn.Module], calibration: torch.Tensor) -> list[torch.Tensor]:
    """max |x| per input channel of each module over the calibration sequences (float64)."""
    maxima: list[torch.Tensor | None] = [None] * len(modules)

    def recorder(index: int):
        def record(module, args) -> None:
            current = args[0].detach().abs().flatten(0, -2).amax(0).to(torch.float64)
            maxima[index] = current if maxima[index] is None else torch.maximum(maxima[index], current)

        return record

    run_sequences(model, calibration, [(module, "pre", recorder(index)) for index, module in enumerate(modules)], "smoothquant calibration")
    return maxima


def _checked(params: dict) -> tuple[float, tuple[str, ...]]:
    alpha, projections = params["alpha"], params["projections"]
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"smoothquant: alpha must be in [0, 1]; got {alpha}")
    unknown = [p for p in projections if p not in PROJECTIONS]
    if unknown or not projections:
        raise UserError(
            f"smoothquant: projections must be ':'-separated names from {', '.join(PROJECTIONS)}; got {':'.join(projections) or 'none'}"
        )
    return alpha, projections


def apply(loaded, params: dict, calibration: torch.Tensor | None) -> Callable[[], None]:
    """Smooth ``loaded.model`` in place from ``calibration`` ([samples, seq_len] token ids); returns the exact undo."""
    alpha, projections = _checked(params)
    if calibration is None:
        raise UserError("smoothquant needs calibration sequences (--calib-data, --calib-samples)")
    sites = smoothing_sites(loaded.model, projections, alpha)
    maxima = input_channel_maxima(loaded.model, [site.measured for site in sites], calibration)
    edits = Edits()
    try:
        for site, activation_max in zip(sites, maxima):
            site.fold(activation_max, edits)
    except BaseException:
        edits.undo()
        raise
    return edits.undo
