"""Which linear layers a spec quantizes (fake quantization and every real backend)."""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from massquant.errors import UserError


def select_linears(model: nn.Module, spec, types: tuple[type, ...] = (nn.Linear,)) -> list[tuple[str, nn.Module]]:
    """Every linear layer of ``types`` the spec selects, in model order.

    Real backends replace ``nn.Linear`` only; fake quantization also takes
    GPT-2's ``Conv1D`` (a linear layer storing its weight as [in, out]).

    The output embedding stays in full precision unless ``spec.quantize_lm_head``;
    ``spec.include`` (when non-empty) keeps names matching any regex, ``spec.exclude``
    then drops names matching any regex (``re.search`` on the dotted module name).
    A spec that selects nothing is a mistake (a mistyped regex), so it raises UserError.
    """
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    selected = []
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        if module is output_embeddings and not spec.quantize_lm_head:
            continue
        if spec.include and not any(re.search(pattern, name) for pattern in spec.include):
            continue
        if any(re.search(pattern, name) for pattern in spec.exclude):
            continue
        selected.append((name, module))
    if not selected and types == (nn.Linear,) and any(isinstance(m, Conv1D) for m in model.modules()):
        raise UserError(
            f"spec '{spec.name}': this model's linear layers are GPT-2-style Conv1D, which only --backend fake quantizes"
        )
    if not selected:
        raise UserError(
            f"spec '{spec.name}' selects no linear layer (include={list(spec.include)}, exclude={list(spec.exclude)}); "
            "include/exclude are regexes searched in module names such as 'model.layers.0.mlp.up_proj'"
        )
    return selected


def check_group_divides(spec, selected: list[tuple[str, nn.Linear]], group_size: int | None, hint: str) -> None:
    """Real grouped kernels need the group size to divide every selected input width (fake quantization does not)."""
    if not group_size or group_size <= 0:
        return
    widths = sorted({linear.in_features for _, linear in selected})
    bad = [width for width in widths if width % group_size]
    if bad:
        raise UserError(
            f"spec '{spec.name}': group size {group_size} does not divide the input width of every selected layer "
            f"(widths {widths}, not divisible: {bad}); {hint}"
        )
