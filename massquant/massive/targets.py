"""Which massive activations an intervention or a ``--massive`` policy acts on (``--massive-target``).

Sites located on calibration data are grouped into phenomena
(``massquant.massive.phenomena.group_phenomena``: one channel on some token
classes over a span of layers). A target picks among them:

- ``first-layer`` (default): the first layer with any massive value, and every
  channel massive there — the behaviour before targets existed. On SmolLM2 it
  is layer 11, channels 247 and 507; on Gemma 3 it is layer 0, channel 400 on
  thousands of ordinary tokens, and Gemma's dominant channel 163 is never seen;
- ``dominant``: the phenomenon with the largest |value|, at its first layer
  (SmolLM2: channel 507 at layer 11; Gemma 3: channel 163 at layer 3);
- ``all``: every phenomenon, each at its own first layer;
- ``channel:N``: the phenomena of residual channel N, at the first layer where
  N is massive (calibrated), or per forward at the first layer where it is
  (dynamic detection).

In every case a value is changed only where it meets the massive criteria in
that forward, at that layer, in a targeted channel. For ``keep``, which acts at
every quantized linear rather than at one layer, the target filters channels:
``first-layer`` and ``all`` keep every located channel, ``dominant`` and
``channel:N`` that channel's values at the linears reading the residual stream
and, at down projections, the input channels of the super weights that write
it (Yu et al. 2024: down_proj weight[row = that channel, col]).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from massquant.errors import UserError
from massquant.models.passes import run_sequences
from massquant.massive import DEFAULT_TARGET, MassiveCriteria, target_channel
from massquant.massive.intervene import ResidualTarget, first_layer_target
from massquant.massive.observers import run_without_logits
from massquant.massive.statistics import entries_above, magnitude_profile, massive_cutoff, tokens_by_channels
from massquant.massive.phenomena import group_phenomena
from massquant.massive.sites import MassiveSites
from massquant.models.architectures import architecture_of, decoder_layers


def targeted_phenomena(sites: MassiveSites, target: str) -> list[dict]:
    """The phenomena (``group_phenomena``) ``target`` selects; ``first-layer`` selects those present at the first layer.

    Raises UserError for ``channel:N`` when channel N carries no massive value
    on the calibration data (naming the channels that do).
    """
    phenomena = group_phenomena(sites.sites)
    channel = target_channel(target)
    if target == "dominant":
        return phenomena[:1]
    if target == "all":
        return phenomena
    if channel is not None:
        chosen = [phenomenon for phenomenon in phenomena if phenomenon["channel"] == channel]
        if not chosen:
            found = ", ".join(str(c) for c in dict.fromkeys(p["channel"] for p in phenomena)) or "none"
            raise UserError(
                f"massive target 'channel:{channel}': channel {channel} carries no massive activation on the "
                f"calibration sequences; channels that do: {found}"
            )
        return chosen
    first = sites.first_layer
    return [phenomenon for phenomenon in phenomena if phenomenon["first_layer"] == first]


def residual_targets(
    sites: MassiveSites | None, target: str, criteria: MassiveCriteria, detection: str = "calibrated"
) -> list[ResidualTarget]:
    """Where an intervention acts for ``target``: one ``ResidualTarget`` per layer, in layer order.

    Dynamic detection (``sites`` None): ``first-layer`` is every channel at the
    first massive layer of each forward, ``channel:N`` channel N at the first
    layer where it is massive in each forward. Empty when nothing was located.
    """
    channel = target_channel(target)
    if detection == "dynamic":
        return [ResidualTarget(criteria, None, None if channel is None else (channel,))]
    if not sites:
        return []
    if target == DEFAULT_TARGET:
        return [first_layer_target(sites, criteria)]
    by_layer: dict[int, set[int]] = {}
    for phenomenon in targeted_phenomena(sites, target):
        by_layer.setdefault(phenomenon["first_layer"], set()).add(phenomenon["channel"])
    return [ResidualTarget(criteria, layer, tuple(sorted(channels))) for layer, channels in sorted(by_layer.items())]


def kept_channel(sites: MassiveSites | None, target: str) -> int | None:
    """For ``keep``: the one residual channel ``target`` keeps (dominant, channel:N), None for every channel."""
    if target in (DEFAULT_TARGET, "all"):
        return None
    if sites is None:  # dynamic detection: channel:N only (check_target refuses dominant)
        return target_channel(target)
    return targeted_phenomena(sites, target)[0]["channel"]


# ---- what reaches each linear's input --------------------------------------------------------------


def residual_reader_groups(model) -> list[tuple[str, ...]]:
    """Paths (within a decoder layer) of the linears that read the normed residual stream, grouped by shared input.

    Attention projections read the input norm's output, the MLP's up
    projections the post-attention (Gemma 2/3: pre-feed-forward) norm's output.
    """
    architecture = architecture_of(model)
    groups = [tuple(path for path in (architecture.query, architecture.key, architecture.value) if path)]
    groups.append(tuple(architecture.up_proj))
    return [group for group in groups if group]


@torch.inference_mode()
def linear_input_channels(model, calibration: Tensor, criteria: MassiveCriteria, progress: bool = False) -> dict[tuple[int, str], list[int]]:
    """Channels of each residual-reading linear's input (after its norm) that carry massive values on ``calibration``.

    ``calibration``: ``[sequences, tokens]`` token ids, run one sequence at a
    time. Returns ``{(layer, path): sorted channels}`` for every linear whose
    input has a value with |x| > ``criteria.abs_threshold`` and >
    ``criteria.median_ratio`` x that input's median |x| (Sun et al. 2024), per
    sequence. A norm rescales each token to unit RMS and multiplies by its
    weight, so which channels are massive there is not which are massive in
    the residual stream: this looks at the tensor the quantizer sees.
    """
    found: dict[tuple[int, str], set[int]] = {}

    def hook_for(key: tuple[int, str]):
        def hook(module, args):
            x = tokens_by_channels(args[0])
            row_maxima, median = magnitude_profile(x)
            cutoff = massive_cutoff(criteria, median)
            if float(row_maxima.max()) > cutoff:
                found.setdefault(key, set()).update(entries_above(x, row_maxima, cutoff)[2])

        return hook

    hooks = [
        (layer.get_submodule(group[0]), "pre", hook_for((index, group[0])))
        for index, layer in enumerate(decoder_layers(model)) for group in residual_reader_groups(model)
    ]
    run_sequences(model, calibration, hooks, "linear inputs", progress=progress, forward=run_without_logits)
    channels = {}
    for (index, first_path), values in found.items():
        group = next(g for g in residual_reader_groups(model) if g[0] == first_path)
        for path in group:
            channels[(index, path)] = sorted(int(value) for value in np.unique(list(values)))
    return channels
