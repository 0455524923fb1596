"""Shared pieces of the weight-transforming mitigations (Hadamard rotation, SmoothQuant).

- ``Edits``: every change (a new parameter, a swapped submodule, a config value)
  goes through it, so ``undo`` puts back the very objects that were there —
  bit-exact weights, and weights that were tied share one tensor again;
- norm gains: an RMSNorm's per-channel gain is measured by probing the module,
  so norms that scale by ``w`` (LLaMA) and by ``1 + w`` (Gemma) fold alike;
- pure transforms of linear weights (``[out, in]``, ``y = x W^T``), applied in float64.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from massquant.errors import UserError
from massquant.models.architectures import Architecture, architecture_of

RowMap = Callable[[torch.Tensor], torch.Tensor]  # an orthogonal map of the last dimension, x -> x @ R

# A constant input of 1024 has RMS 1024 and mean square 2^20, to which any eps
# below 0.06 adds nothing in float32: the normalized probe is exactly 1.
_PROBE_VALUE = 1024.0


class Edits:
    """Attribute changes recorded so that ``undo`` restores the original objects, last change first."""

    def __init__(self) -> None:
        self._originals: list[tuple[object, str, object]] = []

    def set(self, owner: object, name: str, value: object) -> None:
        self._originals.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def set_tensor(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        """Replace a parameter by a new one holding ``value`` in the original's dtype (never in place)."""
        original = getattr(module, name)
        self.set(module, name, nn.Parameter(value.to(original.dtype).contiguous(), requires_grad=original.requires_grad))

    def undo(self) -> None:
        while self._originals:
            owner, name, value = self._originals.pop()
            setattr(owner, name, value)


def as_float64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float64)


def rmsnorm_architecture(model: nn.Module, mitigation: str) -> Architecture:
    """The model's architecture entry, when its norms are RMSNorms (no mean subtraction, no bias)."""
    architecture = architecture_of(model)
    if architecture.norm_kind != "rmsnorm":
        raise UserError(
            f"mitigation '{mitigation}' needs RMSNorm models (LLaMA, Mistral, Qwen2/3, Gemma); "
            f"'{model.config.model_type}' uses {architecture.norm_kind}, whose mean subtraction and bias do not commute with it"
        )
    return architecture


def linear_at(layer: nn.Module, path: str | None, mitigation: str) -> nn.Linear:
    """The ``nn.Linear`` at ``path`` in a decoder layer; a missing, fused or already wrapped layer is a UserError."""
    if path is None:
        raise UserError(
            f"mitigation '{mitigation}' needs a linear layer that massquant/models/architectures.py does not name "
            "for this architecture (a fused projection?)"
        )
    module = layer.get_submodule(path)
    if not isinstance(module, nn.Linear):
        raise UserError(
            f"mitigation '{mitigation}' needs a plain linear layer at '{path}', found {type(module).__name__}; "
            "rotations wrap down_proj, so apply weight-scaling mitigations before them (e.g. smoothquant+hadamard)"
        )
    return module


def _norm_output(norm: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    probe = torch.full((1, weight.numel()), _PROBE_VALUE, dtype=torch.float32, device=weight.device)
    with torch.no_grad():
        return as_float64(functional_call(norm, {"weight": weight}, (probe,))[0])


def norm_gain_map(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(slope, offset) with per-channel gain = slope * weight + offset, measured at weights 0 and 1."""
    weight = norm.weight
    offset = _norm_output(norm, torch.zeros_like(weight))
    slope = _norm_output(norm, torch.ones_like(weight)) - offset
    return slope, offset


def norm_gain(norm: nn.Module) -> torch.Tensor:
    slope, offset = norm_gain_map(norm)
    return slope * as_float64(norm.weight) + offset


def set_norm_gain(norm: nn.Module, gain: torch.Tensor, edits: Edits) -> None:
    slope, offset = norm_gain_map(norm)
    edits.set_tensor(norm, "weight", (gain - offset) / slope)


def untie_output_embeddings(model: nn.Module, edits: Edits) -> None:
    """Give the output head its own weight when it shares the input embedding's, and tell transformers so
    (``tie_word_embeddings``), so that neither ``tie_weights`` nor ``save_pretrained`` ties them again."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embeddings.weight:
        return
    edits.set_tensor(head, "weight", head.weight.detach().clone())
    edits.set(model.config, "tie_word_embeddings", False)
    if hasattr(model, "all_tied_weights_keys"):
        edits.set(model, "all_tied_weights_keys", model.get_expanded_tied_weights_keys(all_submodels=True))


def rotate_inputs(weight: torch.Tensor, rotate: RowMap) -> torch.Tensor:
    """The weight that reads ``rotate(x) = x @ R`` and gives the same output as ``weight`` reading ``x``."""
    return rotate(weight)


def rotate_outputs(weight: torch.Tensor, rotate: RowMap) -> torch.Tensor:
    """The weight whose outputs are ``rotate(original outputs)`` (a bias: ``rotate(bias)``)."""
    return rotate(weight.T).T


def scale_inputs(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight that reads ``x / scale`` (per input channel) and gives the original output."""
    return weight * scale


def scale_outputs(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight whose output channels are divided by ``scale`` (a bias: ``bias / scale``)."""
    return weight / scale[:, None]
