"""Attention on every sink token, not only the first: Gemma 3's second sink (a lone space before a number) too.

The sink tokens of a sequence are position 0 and the later positions that carry
robust massive activations (``phenomena.beyond_typical``: values that would be
massive in the typical layer too). ``attention_share_on`` measures, per layer,
the attention probability those keys receive (Xiao et al. 2024, attention
sinks; Sun et al. 2024, Fig. 8), averaged over heads, over the queries that can
see the key, and over sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from massquant.errors import UserError
from massquant.massive.observers import as_batch
from massquant.massive.observers import eager_name, runs_eager, attention_probabilities_available, run_without_logits
from massquant.massive.phenomena import beyond_typical
from massquant.models.architectures import architecture_of, decoder_layers


def sink_positions(report, sequences: int) -> list[list[int]]:
    """Per located sequence, the positions after 0 that carry robust massive values (``beyond_typical``), sorted."""
    robust = beyond_typical(report.massive.sites, [layer.cutoff for layer in report.layers])
    positions: list[set[int]] = [set() for _ in range(sequences)]
    for site in robust:
        if site.position > 0:
            positions[site.sequence].add(site.position)
    return [sorted(found) for found in positions]


@torch.inference_mode()
def attention_share_on(model, input_ids: Tensor, keys: list[list[int]], progress: bool = False) -> list[float]:
    """``[layer]``: attention probability on the keys ``keys[s]`` of sequence s, from the queries after each key.

    ``input_ids``: ``[sequences, tokens]``. Each (sequence, key) contributes the
    mean over heads and over queries > key of the probability on that key; the
    result averages those contributions (NaN in a layer when no sequence has a
    key). Runs each sequence with eager attention (which returns the
    probabilities) and restores the implementation afterwards.
    """
    if not attention_probabilities_available(model):
        raise UserError(f"{type(model).__name__} cannot switch to eager attention at run time; load it with --attn eager")
    input_ids = as_batch(input_ids)
    attention_path = architecture_of(model).attention
    modules = [layer.get_submodule(attention_path) for layer in decoder_layers(model)]
    sums = [0.0] * len(modules)
    counts = [0] * len(modules)
    current: dict[str, list[int]] = {"keys": []}

    def hook_for(index: int):
        def hook(module, args, output):
            probabilities = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probabilities is None:
                raise UserError(f"attention module {type(module).__name__} returns no attention probabilities with eager attention")
            for key in current["keys"]:
                if key + 1 < probabilities.shape[-2]:
                    sums[index] += float(probabilities[0, :, key + 1 :, key].float().mean())
                    counts[index] += 1

        return hook

    previous = model.config._attn_implementation
    if not runs_eager(model):
        model.set_attn_implementation(eager_name(previous))
    handles = [module.register_forward_hook(hook_for(index)) for index, module in enumerate(modules)]
    try:
        for sequence, row in enumerate(tqdm(input_ids, desc="attention on sink tokens", unit="seq", leave=False, disable=not progress)):
            current["keys"] = list(keys[sequence])
            if current["keys"]:
                run_without_logits(model, row[None])
    finally:
        for handle in handles:
            handle.remove()
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
    return [total / count if count else float("nan") for total, count in zip(sums, counts)]
