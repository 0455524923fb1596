"""One hook point inside attention, after RoPE, for key/value transforms.

transformers routes attention through ``AttentionInterface``; massquant
registers a wrapper around sdpa/eager that first applies the transforms an
attention module carries (KV-cache quantization, KV bias, ...). Works for
every architecture that uses the interface, with no per-model code.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from massquant.errors import UserError

# transform(module, key, value, attention_mask) -> (key, value, attention_mask)
KVTransform = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple]
TRANSFORMS_ATTRIBUTE = "massquant_kv_transforms"
PREFIX = "massquant_"


def _inner_attention(module: torch.nn.Module, implementation: str):
    if implementation == "eager":  # eager lives in each modeling file, not in the global registry
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _wrapped(implementation: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        for transform in getattr(module, TRANSFORMS_ATTRIBUTE, ()):
            key, value, attention_mask = transform(module, key, value, attention_mask)
        return _inner_attention(module, implementation)(module, query, key, value, attention_mask, **kwargs)

    return attention


for _implementation in ("sdpa", "eager"):
    AttentionInterface.register(PREFIX + _implementation, _wrapped(_implementation))
    AttentionMaskInterface.register(PREFIX + _implementation, ALL_MASK_ATTENTION_FUNCTIONS[_implementation])


def attach_kv_transform(model, attention_modules: list[torch.nn.Module], make_transform) -> Callable[[], None]:
    """Route ``model``'s attention through the hook and add one transform per module.

    ``make_transform(index, module)`` builds the transform for the index-th
    attention module. Returns the undo function.
    """
    current = model.config._attn_implementation
    base = current.removeprefix(PREFIX)
    if base not in ("sdpa", "eager") or not model._can_set_attn_implementation():
        raise UserError(
            f"key/value transforms need sdpa or eager attention through transformers' AttentionInterface; "
            f"this model uses '{current}'"
        )
    if current != PREFIX + base:
        model.set_attn_implementation(PREFIX + base)
    added = []
    for index, module in enumerate(attention_modules):
        transform = make_transform(index, module)
        transforms = getattr(module, TRANSFORMS_ATTRIBUTE, None)
        if transforms is None:
            transforms = []
            setattr(module, TRANSFORMS_ATTRIBUTE, transforms)
        transforms.append(transform)
        added.append((module, transform))

    def undo() -> None:
        for module, transform in added:
            getattr(module, TRANSFORMS_ATTRIBUTE).remove(transform)
        if not any(getattr(m, TRANSFORMS_ATTRIBUTE, None) for m in model.modules()):
            model.set_attn_implementation(base)

    return undo
