"""One hook point inside attention, after RoPE, for key/value transforms.

transformers routes attention through ``AttentionInterface``; massquant
registers a wrapper around sdpa/eager that first applies the transforms an
attention module carries (KV-cache quantization, KV bias, ...). Works for
every architecture that uses the interface, with no per-model code.

Transforms run in stage order: ``TOKEN_STAGE`` transforms change the
sequence's own keys and values (KV-cache quantization, recording), then
``PREPEND_STAGE`` transforms put extra positions in front of them (an explicit
attention sink, a prefilled prefix). So prepended positions are never
quantized, whichever was attached first. Prepended positions sit at positions
0..p-1 of the sequence; ``attach_position_offset`` moves the real tokens to
p.. so rotary embeddings see the same relative distances as if the prefix had
been real tokens.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from massquant.errors import UserError
from massquant.models.architectures import architecture_of, decoder_layers

# transform(module, key, value, attention_mask) -> (key, value, attention_mask)
KVTransform = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple]
TRANSFORMS_ATTRIBUTE = "massquant_kv_transforms"  # list of (stage, transform), in run order
# output_transform(module, attn_output [batch, queries, heads, head_dim]) -> attn_output, before o_proj
OUTPUT_TRANSFORMS_ATTRIBUTE = "massquant_output_transforms"
PREFIX = "massquant_"
TOKEN_STAGE = 0
PREPEND_STAGE = 1


def _inner_attention(module: torch.nn.Module, implementation: str):
    if implementation == "eager":  # eager lives in each modeling file, not in the global registry
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def implicit_causal_mask(
    query_length: int, key_length: int, causal: bool, implementation: str, dtype: torch.dtype, device
) -> torch.Tensor | None:
    """The mask transformers means by ``None``, made explicit so columns can be added in front.

    sdpa reads ``None`` as ``is_causal`` (upper-left aligned) when more than one
    query attends causally, and as "attend to everything" otherwise; ``None``
    keeps that second meaning after positions are prepended.
    """
    if query_length == 1 or not causal:
        return None
    allowed = torch.ones(query_length, key_length, dtype=torch.bool, device=device).tril()[None, None]
    if implementation == "sdpa":
        return allowed
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)


def prepend_key_values(
    key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    prefix_key: torch.Tensor, prefix_value: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys/values ``[batch, kv_heads, tokens, head_dim]`` with ``[kv_heads, p, head_dim]`` in front of every sequence.

    The mask (boolean for sdpa, additive float for eager, ``[batch, 1|heads,
    queries, keys]``) gains p visible columns: every query sees the prefix.
    """
    batch = key.shape[0]
    prefix_key = prefix_key.to(key.dtype)[None].expand(batch, -1, -1, -1)
    prefix_value = prefix_value.to(value.dtype)[None].expand(batch, -1, -1, -1)
    if attention_mask is not None:
        visible = True if attention_mask.dtype == torch.bool else 0.0
        columns = attention_mask.new_full((*attention_mask.shape[:-1], prefix_key.shape[2]), visible)
        attention_mask = torch.cat([columns, attention_mask], dim=-1)
    return torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2), attention_mask


class PrependedKeyValues(nn.Module):
    """Keys and values of positions in front of every sequence (``[kv_heads, p, head_dim]``); a PREPEND_STAGE transform.

    ``trainable``: ``key``/``value`` are parameters (in ``state_dict``),
    otherwise non-persistent buffers.
    """

    def __init__(self, key: torch.Tensor, value: torch.Tensor, trainable: bool = False):
        super().__init__()
        if trainable:
            self.key, self.value = nn.Parameter(key.clone()), nn.Parameter(value.clone())
        else:
            self.register_buffer("key", key.clone(), persistent=False)
            self.register_buffer("value", value.clone(), persistent=False)

    @property
    def positions(self) -> int:
        return self.key.shape[1]

    def forward(self, module, key, value, attention_mask):
        return prepend_key_values(key, value, attention_mask, self.key, self.value)

    def extra_repr(self) -> str:
        heads, positions, head_dim = self.key.shape
        return f"kv_heads={heads}, positions={positions}, head_dim={head_dim}"


def _wrapped(implementation: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        transforms = getattr(module, TRANSFORMS_ATTRIBUTE, ())
        if attention_mask is None and any(stage == PREPEND_STAGE for stage, _ in transforms):
            causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
            attention_mask = implicit_causal_mask(
                query.shape[2], key.shape[2], causal, implementation, query.dtype, query.device
            )
        for _, transform in transforms:
            key, value, attention_mask = transform(module, key, value, attention_mask)
        output, weights = _inner_attention(module, implementation)(module, query, key, value, attention_mask, **kwargs)
        for transform in getattr(module, OUTPUT_TRANSFORMS_ATTRIBUTE, ()):
            output = transform(module, output)
        return output, weights

    return attention


for _implementation in ("sdpa", "eager"):
    AttentionInterface.register(PREFIX + _implementation, _wrapped(_implementation))
    AttentionMaskInterface.register(PREFIX + _implementation, ALL_MASK_ATTENTION_FUNCTIONS[_implementation])


def attach_kv_transform(
    model, attention_modules: list[torch.nn.Module], make_transform, stage: int = TOKEN_STAGE
) -> Callable[[], None]:
    """Route ``model``'s attention through the hook and add one transform per module.

    ``make_transform(index, module)`` builds the transform for the index-th
    attention module; it runs after every transform of an earlier or the same
    stage already attached, before those of later stages. Returns the undo
    function.
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
        entry = (stage, make_transform(index, module))
        transforms = getattr(module, TRANSFORMS_ATTRIBUTE, None)
        if transforms is None:
            transforms = []
            setattr(module, TRANSFORMS_ATTRIBUTE, transforms)
        later = [i for i, (other, _) in enumerate(transforms) if other > stage]
        transforms.insert(later[0] if later else len(transforms), entry)
        added.append((module, entry))

    def undo() -> None:
        for module, entry in added:
            transforms = getattr(module, TRANSFORMS_ATTRIBUTE)
            transforms.pop(next(i for i, other in enumerate(transforms) if other is entry))
        _unroute_when_unused(model, base)

    return undo


def _unroute_when_unused(model, base: str) -> None:
    if not any(getattr(m, TRANSFORMS_ATTRIBUTE, None) or getattr(m, OUTPUT_TRANSFORMS_ATTRIBUTE, None) for m in model.modules()):
        model.set_attn_implementation(base)


def attach_output_transform(model, attention_modules: list[torch.nn.Module], make_transform) -> Callable[[], None]:
    """Route ``model``'s attention through the hook and transform each module's attention output
    (``[batch, queries, heads, head_dim]``, before o_proj) with ``make_transform(index, module)``. Returns the undo."""
    current = model.config._attn_implementation
    base = current.removeprefix(PREFIX)
    if base not in ("sdpa", "eager") or not model._can_set_attn_implementation():
        raise UserError(f"attention output transforms need sdpa or eager attention; this model uses '{current}'")
    if current != PREFIX + base:
        model.set_attn_implementation(PREFIX + base)
    added = []
    for index, module in enumerate(attention_modules):
        if not hasattr(module, OUTPUT_TRANSFORMS_ATTRIBUTE):
            setattr(module, OUTPUT_TRANSFORMS_ATTRIBUTE, [])
        transform = make_transform(index, module)
        getattr(module, OUTPUT_TRANSFORMS_ATTRIBUTE).append(transform)
        added.append((module, transform))

    def undo() -> None:
        for module, transform in added:
            transforms = getattr(module, OUTPUT_TRANSFORMS_ATTRIBUTE)
            transforms.pop(next(i for i, other in enumerate(transforms) if other is transform))
        _unroute_when_unused(model, base)

    return undo


def _shift_positions(offset: int):
    def hook(module, args, kwargs):
        positions = kwargs.get("position_ids")
        if positions is None:
            inputs = kwargs.get("input_ids", args[0] if args else None)
            if inputs is None:
                inputs = kwargs["inputs_embeds"]
            cache = kwargs.get("past_key_values")
            seen = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(seen, seen + inputs.shape[1], device=inputs.device)[None]
        kwargs["position_ids"] = positions + offset
        return args, kwargs

    return hook


def attach_position_offset(model: torch.nn.Module, offset: int) -> Callable[[], None]:
    """Every forward of ``model`` sees its tokens ``offset`` positions later (explicit ``position_ids`` too).

    Offsets attached several times add up. Returns the undo function.
    """
    handle = model.register_forward_pre_hook(_shift_positions(offset), with_kwargs=True)
    return handle.remove


def attention_modules(model) -> list[torch.nn.Module]:
    """Each decoder layer's attention module, in layer order."""
    path = architecture_of(model).attention
    return [layer.get_submodule(path) for layer in decoder_layers(model)]


@torch.no_grad()
def capture_key_values(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys and values ``[batch, kv_heads, tokens, head_dim]`` that attention sees for ``input_ids``:
    after RoPE and the TOKEN_STAGE transforms already attached, without prepended positions."""
    modules = attention_modules(model)
    captured: list = [None] * len(modules)

    def recorder(index, _):
        def record(module, key, value, attention_mask):
            captured[index] = (key.clone(), value.clone())
            return key, value, attention_mask

        return record

    undo = attach_kv_transform(model, modules, recorder)
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        undo()
    return captured
