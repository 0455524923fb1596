"""Simulated quantization with massquant's own modules (every format, granularity, KV cache)."""

from __future__ import annotations

import torch
from torch import nn

from massquant.backends import AppliedQuantization
from massquant.wrapping.selection import select_linears
from massquant.errors import UserError
from massquant.models.architectures import attention_geometry, weight_out_in
from massquant.quantizers.tensors import quantize_activation, quantize_kv, quantize_weight
from massquant.wrapping.quantize import QUANTIZABLE_TYPES, quantize_


def _input_width(module: nn.Module) -> int:
    return weight_out_in(module).shape[1]


def kv_shape(model: nn.Module) -> tuple[int, int]:
    """(key/value heads, head_dim) of the states the KV hook sees: [batch, heads, tokens, head_dim]."""
    return attention_geometry(model)[1:]


def check(loaded, spec) -> None:
    """The spec against the model's real shapes, refused before any work: every selected layer's input width
    (groups, mx/nv blocks) and the KV heads. Each width is probed with the quantizers themselves on a
    one-row tensor, so the rules (ragged int groups allowed, hardware blocks must divide) live in one place."""
    if spec.weights is not None or spec.activations is not None:
        widths: dict[int, str] = {}
        for name, module in select_linears(loaded.model, spec, QUANTIZABLE_TYPES):
            widths.setdefault(_input_width(module), name)
        for width, name in sorted(widths.items()):
            probe = torch.ones(1, width)
            for part, quantize in ((spec.weights, quantize_weight), (spec.activations, quantize_activation)):
                if part is None:
                    continue
                try:
                    quantize(probe, part)
                except UserError as error:
                    raise UserError(f"spec '{spec.name}' on {name} ({width} inputs): {error}") from None
    if spec.kv_cache is not None:
        heads, head_dim = kv_shape(loaded.model)
        try:
            quantize_kv(torch.ones(1, heads, 1, head_dim), spec.kv_cache)
        except UserError as error:
            raise UserError(f"spec '{spec.name}' on the KV cache ({heads} heads of {head_dim} channels): {error}") from None


def apply(loaded, spec, calibration) -> AppliedQuantization:
    handle = quantize_(loaded.model, spec, calibration)
    return AppliedQuantization(loaded.model, handle.undo, handle.summary())
