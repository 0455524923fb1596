"""Super weights (Yu et al. 2024): single down-projection weights that create a massive activation.

A super weight shows as a spike at the down projection's input (column, an
intermediate channel) multiplied into a spike at its output (row, a residual
channel) on the same token. Finding one needs no data beyond a short prompt:
the spike appears whatever the text, so one forward pass is enough.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from massquant.massive import MassiveCriteria
from massquant.models.architectures import weight_out_in
from massquant.massive.observers import down_projections, run_without_logits
from massquant.massive.statistics import host_rows, massive_cutoff, median_magnitude, row_magnitudes, tokens_by_channels
from massquant.massive.sites import SuperWeight

# Any text works; this one is plain prose with a delimiter, like the texts spikes were reported on.
DEFAULT_PROMPT = "The museum opened in 1902. Its first director was a painter from the city."


def spike_super_weight(
    layer: int, inputs: Tensor, outputs: Tensor, weight: Tensor, criteria: MassiveCriteria
) -> SuperWeight | None:
    """The weight behind the largest output spike of one down projection, or None when that spike is not massive.

    ``inputs`` [tokens, in] and ``outputs`` [tokens, out] are the projection's
    input and output for one sequence, ``weight`` its [out, in] matrix. The
    spike is the largest |output|, at token t and channel ``row``; it must be
    massive in ``outputs`` (criteria against the median |output|). The column is
    the largest |input| of token t.
    """
    position = int(row_magnitudes(outputs).argmax())  # token first, then channel: no |outputs| copy
    spike = host_rows(outputs, np.array([position]))[0]
    row = int(np.abs(spike).argmax())
    output_value = float(spike[row])
    if abs(output_value) <= criteria.abs_threshold:  # the median costs a selection: skip it when no spike can pass
        return None
    if abs(output_value) <= massive_cutoff(criteria, median_magnitude(outputs)):
        return None
    spike_input = host_rows(inputs, np.array([position]))[0]
    col = int(np.abs(spike_input).argmax())
    input_value = float(spike_input[col])
    value = float(weight[row, col])
    return SuperWeight(
        layer=layer, row=row, col=col, value=value, input_value=input_value, output_value=output_value,
        position=position, contribution=value * input_value / output_value,
    )


class SuperWeightTracker:
    """The largest massive down-projection spike of every layer, over the sequences it is shown."""

    def __init__(self, criteria: MassiveCriteria):
        self.criteria = criteria
        self.found: dict[int, SuperWeight] = {}

    def observe(self, layer: int, inputs: Tensor, outputs: Tensor, weight: Tensor) -> None:
        candidate = spike_super_weight(layer, inputs, outputs, weight, self.criteria)
        best = self.found.get(layer)
        if candidate is not None and (best is None or abs(candidate.output_value) > abs(best.output_value)):
            self.found[layer] = candidate

    def super_weights(self) -> list[SuperWeight]:
        return [self.found[layer] for layer in sorted(self.found)]


@torch.inference_mode()
def find_super_weights(
    model, tokenizer, prompt: str = DEFAULT_PROMPT, criteria: MassiveCriteria | None = None, bos: bool = True
) -> list[SuperWeight]:
    """Super weights of ``model``, data-free: one forward pass of a short prompt (BOS first when asked and available)."""
    criteria = (criteria or MassiveCriteria()).validate()
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    tracker = SuperWeightTracker(criteria)

    def hook_for(index: int, module: torch.nn.Module):
        weight = weight_out_in(module)

        def hook(_, args, output):
            tracker.observe(index, tokens_by_channels(args[0]), tokens_by_channels(output), weight)

        return hook

    handles = [module.register_forward_hook(hook_for(index, module)) for index, module in enumerate(down_projections(model))]
    try:
        run_without_logits(model, torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return tracker.super_weights()

