"""Per-layer quantization error of one spec, measured on the unmodified model's real inputs.

Each selected linear gets its input ``X`` from forward hooks. Inside the hook
the layer's statistics are added up and ``X`` is dropped, so memory holds one
layer's input at a time, never the inputs of every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from massquant.wrapping.selection import select_linears
from massquant.errors import UserError
from massquant.models.passes import run_sequences
from massquant.quantizers.functional import energy_ratio_db, sqnr_db
from massquant.quantizers.spec import QuantSpec
from massquant.quantizers.tensors import quantize_activation, quantize_weight


def check_measurable(spec: QuantSpec) -> None:
    """What the measurement supports, checked before any model is loaded."""
    if spec.weights is None and spec.activations is None:
        raise UserError(f"spec '{spec.name}' quantizes no linear layer input or weight; errors measures linear layers")
    if spec.activations is not None and not spec.activations.dynamic:
        raise UserError(
            f"spec '{spec.name}' has static activation ranges; errors uses dynamic ranges "
            "(drop '-static'/'-pNN' from the activation part)"
        )
    if spec.backend != "fake":
        raise UserError(
            f"spec '{spec.name}': errors measures the reference (fake) quantization; backend '{spec.backend}' is not supported"
        )


@dataclass
class _ErrorEnergy:
    """Summed squares of a reference and of its approximation's error, added up over forward passes."""

    signal: float = 0.0
    noise: float = 0.0

    def add(self, reference: Tensor, approx: Tensor) -> None:
        self.signal += reference.square().sum(dtype=torch.float64).item()
        self.noise += (approx - reference).square().sum(dtype=torch.float64).item()

    def sqnr_db(self) -> float:
        return energy_ratio_db(self.signal, self.noise)

    def relative_error(self) -> float:
        if self.noise == 0:
            return 0.0
        return math.sqrt(self.noise / self.signal) if self.signal else math.inf


class _LayerStatistics:
    """One linear's running statistics; its hook sees the layer's input on every forward."""

    def __init__(self, name: str, linear: nn.Linear, spec: QuantSpec):
        self.name = name
        self.linear = linear
        self.activation_part = spec.activations
        weight = linear.weight.detach()
        # Quantized once, like a quantized model's weight, and kept in the model's dtype:
        # float32 copies of every layer would multiply the memory of a bf16 model.
        self.quantized_weight = quantize_weight(weight, spec.weights) if spec.weights else weight
        self.weight_sqnr_db = sqnr_db(weight, self.quantized_weight) if spec.weights else None
        self.activation = _ErrorEnergy()
        self.output = _ErrorEnergy()
        self.max_abs_input: float | None = None

    def hook(self, module, inputs, output) -> None:
        x = inputs[0].detach()
        if x.numel() == 0:  # e.g. an MoE expert that received no tokens
            return
        # Quantized in the model's own dtype, as a quantized model would see it; the error math runs in float32.
        quantized_x = quantize_activation(x, self.activation_part) if self.activation_part else x
        x, quantized_x = x.float(), quantized_x.float()
        self.activation.add(x, quantized_x)
        largest = x.abs().max().item()
        self.max_abs_input = largest if self.max_abs_input is None else max(self.max_abs_input, largest)
        bias = self.linear.bias.detach().float() if self.linear.bias is not None else None
        reference_output = F.linear(x, self.linear.weight.detach().float(), bias)
        self.output.add(reference_output, F.linear(quantized_x, self.quantized_weight.float(), bias))

    def row(self) -> dict:
        seen_input = self.max_abs_input is not None  # a layer the forward never reached has no input statistics
        return {
            "layer": self.name,
            "in_features": self.linear.in_features,
            "out_features": self.linear.out_features,
            "weight_sqnr_db": self.weight_sqnr_db,
            "act_sqnr_db": self.activation.sqnr_db() if self.activation_part and seen_input else None,
            "max_abs_input": self.max_abs_input,
            "rel_output_error": self.output.relative_error() if seen_input else None,
        }


@torch.inference_mode()
def layer_errors(model: nn.Module, spec: QuantSpec, batch: Tensor) -> list[dict]:
    """One row per linear ``spec`` selects, in model order, for the token ids ``batch`` ``[n, seq]``.

    Rows: ``layer``, ``in_features``, ``out_features``, ``weight_sqnr_db`` (quantized
    vs full-precision weight; None without weight quantization), ``act_sqnr_db``
    (quantized vs real input; None without activation quantization),
    ``max_abs_input`` and ``rel_output_error`` = ||Y_q - Y|| / ||Y|| with
    Y = X Wᵀ + b and Y_q from the quantized X and W. Sums run over all rows of
    ``batch``; each row is its own forward pass, so a per-tensor activation scale
    covers one sequence, as in ``eval`` with batch size 1. The KV-cache part of a
    spec is not a linear layer and is not measured. The model is left unchanged.
    """
    check_measurable(spec)
    layers = [_LayerStatistics(name, linear, spec) for name, linear in select_linears(model, spec)]
    run_sequences(model, batch, [(layer.linear, "forward", layer.hook) for layer in layers], f"errors {spec.name}")
    return [layer.row() for layer in layers]
