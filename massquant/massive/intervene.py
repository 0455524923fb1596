"""Interventions on massive activations: pure tensor functions, and the hooks that apply them to a model.

At chosen decoder layers' outputs (the residual stream; by default the first
layer that carries massive values, see ``massquant.massive.targets`` for the
others) the massive values of chosen channels are set to zero, to their
calibrated mean, or clipped to the massive threshold; separately, super weights
(Yu et al. 2024) can be zeroed. What was changed is counted per (layer,
channel, token).
Means are measured on calibration sequences separately for the first position
and for the others, as in the refined analysis of Owen et al. (2025): the
first token's massive values differ from a delimiter's. Every installer
returns an undo that restores the model exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from massquant.massive import MassiveCriteria
from massquant.massive.sites import MassiveSites, SuperWeight
from massquant.models.architectures import (
    architecture_of, decoder_layers, layer_hidden, weight_out_in, with_layer_hidden,
)
from massquant.quantizers.functional import outlier_cutoff, outlier_mask
from massquant.wrapping.padding import attach_padding_mask, real_tokens

INTERVENTIONS = ("zero", "mean", "clip")
FIRST, OTHER = 0, 1  # position classes: row of a mean table


@dataclass(frozen=True)
class ResidualTarget:
    """Where an intervention looks for massive values in the residual stream."""

    criteria: MassiveCriteria
    layer: int | None = None  # None: per forward, the first layer whose output has massive values
    channels: tuple[int, ...] | None = None  # None: every channel

    def describe(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else "first massive layer of each forward"
        return where + (f", channels {','.join(map(str, self.channels))}" if self.channels is not None else "")


@dataclass
class InterventionCounts:
    """What an installed intervention did, summed over forwards."""

    values: int = 0  # activation values changed
    without_mean: int = 0  # massive values left as they were: no calibrated mean for their layer/position/channel
    layers: Counter = field(default_factory=Counter)  # layer -> forwards in which it was intervened on
    # (layer, channel, token id or -1 when unknown, at position 0) -> values changed there
    changed: Counter = field(default_factory=Counter)

    def clear(self) -> None:
        self.values = self.without_mean = 0
        self.layers.clear()
        self.changed.clear()

    def as_dict(self, tokenizer=None) -> dict:
        """``values_changed``, ``values_without_mean``, ``layers`` and ``changed``: one entry per (layer, channel, token)."""
        return {
            "values_changed": self.values, "values_without_mean": self.without_mean, "layers": dict(self.layers),
            "changed": site_counts(self.changed, tokenizer),
        }


def site_counts(counter: Counter, tokenizer=None) -> list[dict]:
    """``{(layer or path, channel, token id, first): values}`` as rows, most values first; token texts with a tokenizer."""
    rows = []
    for (where, channel, token_id, first), values in sorted(counter.items(), key=lambda item: (-item[1], str(item[0]))):
        row = {"layer" if isinstance(where, int) else "linear": where, "channel": channel, "token_id": token_id,
               "position": "first" if first else "other", "values": values}
        if tokenizer is not None and token_id >= 0:
            row["token"] = tokenizer.decode([token_id])
        rows.append(row)
    return rows


class TokenIds:
    """The ``input_ids`` of the forward in flight (``[batch, tokens]``), read by a pre-hook on the top-level model."""

    def __init__(self, model: torch.nn.Module):
        self.ids: Tensor | None = None
        self._handle = model.register_forward_pre_hook(self._read, with_kwargs=True)

    def _read(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.ids = ids if isinstance(ids, Tensor) and ids.dim() == 2 else None

    def count(self, counter: Counter, where, mask: Tensor) -> None:
        """Add the True entries of ``mask`` ``[batch, tokens, channels]`` to ``counter`` by (where, channel, token, first)."""
        mask = mask.reshape(-1, *mask.shape[-2:])
        batch, token, channel = mask.nonzero(as_tuple=True)
        ids, tokens = self.ids, mask.shape[1]
        token_ids = [-1] * len(batch)
        if ids is not None and ids.shape[0] == mask.shape[0] and ids.shape[1] >= tokens:
            token_ids = ids[:, ids.shape[1] - tokens :][batch.to(ids.device), token.to(ids.device)].tolist()
        for token_id, position, index in zip(token_ids, token.tolist(), channel.tolist()):
            counter[(where, index, token_id, position == 0)] += 1

    def remove(self) -> None:
        self._handle.remove()


# ---- pure functions on tensors ----------------------------------------------------------------


def position_classes(positions: Tensor) -> Tensor:
    """FIRST for position 0, OTHER elsewhere."""
    return (positions != 0).long()


def zero_values(hidden: Tensor, mask: Tensor) -> Tensor:
    return hidden.masked_fill(mask, 0)


def clip_values(hidden: Tensor, mask: Tensor, bound: Tensor | float) -> Tensor:
    """Masked values clamped to [-bound, bound], keeping their sign; ``bound`` broadcasts against ``hidden``."""
    return torch.where(mask, hidden.clamp(-bound, bound), hidden)


def mean_values(hidden: Tensor, mask: Tensor, means: Tensor, positions: Tensor) -> Tensor:
    """Masked values replaced by ``means[class, channel]`` ([2, hidden]); NaN means leave the value as it was.

    ``hidden`` is ``[..., tokens, channels]``; ``positions`` (``[tokens]`` or
    ``[batch, tokens]``) gives each token's position, hence its class.
    """
    table = means.to(hidden.dtype)[position_classes(positions)]
    return torch.where(mask & ~table.isnan(), table, hidden)


def mean_tables(sites: MassiveSites, hidden_size: int, layers: list[int] | None = None) -> dict[int, Tensor]:
    """Per layer, the mean signed value of its massive sites by position class and channel: ``[2, hidden]``, NaN where none."""
    sums: dict[int, Tensor] = {}
    counts: dict[int, Tensor] = {}
    for site in sites.sites:
        if layers is not None and site.layer not in layers:
            continue
        row = FIRST if site.position == 0 else OTHER
        sums.setdefault(site.layer, torch.zeros(2, hidden_size, dtype=torch.float64))[row, site.channel] += site.value
        counts.setdefault(site.layer, torch.zeros(2, hidden_size, dtype=torch.float64))[row, site.channel] += 1
    return {layer: (sums[layer] / counts[layer]).float() for layer in sums}  # 0/0 is NaN: no mean


def first_layer_target(sites: MassiveSites, criteria: MassiveCriteria) -> ResidualTarget | None:
    """The first massive layer and the channels massive there; None when there are no sites."""
    layer = sites.first_layer
    if layer is None:
        return None
    channels = tuple(sorted({site.channel for site in sites.sites if site.layer == layer}))
    return ResidualTarget(criteria, layer, channels)


# ---- hooks ---------------------------------------------------------------------------------------


def _positions(hidden: Tensor, kwargs: dict) -> Tensor:
    positions = kwargs.get("position_ids")
    return positions if positions is not None else torch.arange(hidden.shape[-2], device=hidden.device)


def intervene_residual(
    model, kind: str, target: ResidualTarget, means: dict[int, Tensor] | None = None,
    counts: InterventionCounts | None = None,
) -> Callable[[], None]:
    """Change massive values at a decoder layer's output on every forward: ``kind`` is zero, mean or clip.

    ``mean`` needs ``means`` (see ``mean_tables``); ``clip`` clamps to the
    massive threshold of each sequence, max(abs_threshold, median_ratio x median
    |x| over its real tokens), the smallest magnitude that still counts as
    massive. Without a target layer, each sequence is changed at the first layer
    where it has massive values. Returns the undo.
    """
    if kind not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {kind!r}; expected one of {INTERVENTIONS}")
    if kind == "mean" and means is None:
        raise ValueError("the mean intervention needs calibrated means")
    counts = counts if counts is not None else InterventionCounts()
    criteria = target.criteria
    layers = decoder_layers(model)
    # Dynamic: in each sequence, only the first layer with massive values is changed.
    changed_sequences: dict[str, Tensor | None] = {"this_forward": None}

    def real_of(hidden: Tensor) -> Tensor | None:
        return real_tokens(hidden.shape[0], hidden.shape[1])

    def massive(hidden: Tensor) -> Tensor | None:
        """The values to change in ``hidden`` ``[batch, tokens, channels]``."""
        mask = outlier_mask(hidden, criteria.abs_threshold, criteria.median_ratio, target.channels, real_of(hidden))
        if mask is None or target.layer is not None:
            return mask
        done = changed_sequences["this_forward"]
        if done is None:
            done = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        mask &= ~done[:, None, None]
        changed_sequences["this_forward"] = done | mask.flatten(1).any(dim=1)
        return mask if bool(mask.any()) else None

    def change(index: int, hidden: Tensor, positions: Tensor) -> Tensor | None:
        mask = massive(hidden)
        if mask is None:
            return None
        counts.layers[index] += 1
        if kind == "zero":
            counts.values += int(mask.sum())
            token_ids.count(counts.changed, index, mask)
            return zero_values(hidden, mask)
        if kind == "clip":
            counts.values += int(mask.sum())
            token_ids.count(counts.changed, index, mask)
            bound = outlier_cutoff(hidden, criteria.abs_threshold, criteria.median_ratio, real_of(hidden))
            return clip_values(hidden, mask, bound)
        table = means.get(index)
        if table is None:  # dynamic detection found a layer that calibration did not
            counts.without_mean += int(mask.sum())
            return hidden
        table = table.to(hidden.device)
        with_mean = mask & ~table[position_classes(positions)].isnan()
        changed = int(with_mean.sum())
        token_ids.count(counts.changed, index, with_mean)
        counts.values += changed
        counts.without_mean += int(mask.sum()) - changed
        return mean_values(hidden, mask, table, positions)

    def hook_for(index: int):
        def hook(module, args, kwargs, output):
            done = changed_sequences["this_forward"]
            if done is not None and bool(done.all()):  # every sequence changed at an earlier layer
                return None
            hidden = layer_hidden(output)
            changed = change(index, hidden, _positions(hidden, kwargs))
            return None if changed is None else with_layer_hidden(output, changed)

        return hook

    def reset(*_):
        changed_sequences["this_forward"] = None

    indices = [target.layer] if target.layer is not None else range(len(layers))
    token_ids = TokenIds(model)
    handles = [layers[index].register_forward_hook(hook_for(index), with_kwargs=True) for index in indices]
    if target.layer is None:
        handles.append(layers[0].register_forward_pre_hook(reset))
    detach_padding = attach_padding_mask(model)

    def undo() -> None:
        for handle in handles:
            handle.remove()
        token_ids.remove()
        detach_padding()

    return undo


def intervene_targets(
    model, kind: str, targets: list[ResidualTarget], means: dict[int, Tensor] | None = None,
    counts: InterventionCounts | None = None,
) -> Callable[[], None]:
    """``intervene_residual`` for each target (e.g. one per phenomenon, at its own first layer); one undo for all."""
    undos = []
    try:
        for target in targets:
            undos.append(intervene_residual(model, kind, target, means, counts))
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise

    def undo_all() -> None:
        for undo in reversed(undos):
            undo()

    return undo_all


def describe_targets(targets: list[ResidualTarget]) -> str:
    return "; ".join(target.describe() for target in targets)


# ---- super weights -------------------------------------------------------------------------------


def down_projection(model, layer: int) -> torch.nn.Module:
    """The module whose weight the down projection applies: a mitigation that wraps the linear (an online
    Hadamard rotation) exposes it as ``linear``, and only the inner module's input meets that weight."""
    module = (decoder_layers(model)[layer]).get_submodule(architecture_of(model).down_proj)
    while isinstance(getattr(module, "linear", None), torch.nn.Module):
        module = module.linear
    return module


def set_super_weights(model, super_weights: list[SuperWeight], values: Callable[[SuperWeight, Tensor], Tensor]) -> Callable[[], None]:
    """Write ``values(weight, current)`` into each super weight's down-projection entry; returns the undo."""
    previous = []
    with torch.no_grad():
        for weight in super_weights:
            matrix = weight_out_in(down_projection(model, weight.layer))
            current = matrix[weight.row, weight.col].clone()
            previous.append((matrix, weight, current))
            matrix[weight.row, weight.col] = values(weight, current)

    def undo() -> None:
        with torch.no_grad():
            for matrix, weight, value in reversed(previous):
                matrix[weight.row, weight.col] = value

    return undo


def zero_super_weights(model, super_weights: list[SuperWeight]) -> Callable[[], None]:
    """Yu et al. 2024: zeroing one such weight can wreck a model; returns the undo."""
    return set_super_weights(model, super_weights, lambda weight, current: torch.zeros_like(current))
