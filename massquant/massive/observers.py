"""The hooks ``locate`` attaches: running statistics of each decoder layer's output and of its down projection's
input, fed one sequence at a time; and the eager-attention passes for the attention share on chosen keys."""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from torch import Tensor

from massquant.errors import UserError
from massquant.massive.intervene import down_projection
from massquant.massive.sites import MassiveSite
from massquant.massive.report import LocateConfig, Peak
from massquant.massive.statistics import (
    channel_magnitudes, criterion_cutoff, entries_above, gram_entropy, host_rows, keep_largest, largest, magnitude_profile,
    massive_cutoff, median_magnitude, power_sums, ratio_to, row_magnitudes, token_norms, tokens_by_channels,
)
from massquant.models.architectures import architecture_of, decoder_layers, layer_hidden, weight_out_in
from massquant.models.passes import run_sequences
from massquant.wrapping.attention import PREFIX as ATTENTION_PREFIX


def as_batch(input_ids: Tensor) -> Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise UserError(f"locate needs token ids shaped [sequences, tokens] with at least 2 tokens; got {tuple(input_ids.shape)}")
    return input_ids.cpu()


def down_projections(model) -> list[torch.nn.Module]:
    return [down_projection(model, index) for index in range(len(decoder_layers(model)))]


def run_without_logits(model, input_ids: Tensor) -> None:
    """One forward of ``input_ids`` [batch, tokens] for its hooks: logits only for the last token, where the model allows."""
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    model(input_ids=input_ids.to(model.get_input_embeddings().weight.device), use_cache=False, **kwargs)


TOP_MEANS = 3  # the curves of the magnitude plot


class ResidualStreamObserver:
    """Running statistics of one decoder layer's output."""

    def __init__(self, layer: int, config: LocateConfig):
        self.layer = layer
        self.config = config
        self.top: list[Peak] = []
        self.top_sums = [0.0] * TOP_MEANS
        self.medians: list[float] = []
        self.sums = [0.0] * 5
        self.first_norms: list[float] = []
        self.token_norms: list[float] = []
        self.entropies: list[float] = []
        self.sites: list[MassiveSite] = []
        # per sequence, for the blind spots: the cutoff, its reference, |a| of the first token, max |a| of the others
        self.cutoffs: list[float] = []
        self.references: list[float] = []
        self.first: list[np.ndarray] = []
        self.others: list[np.ndarray] = []

    def observe(self, x: Tensor, sequence: int) -> None:
        row_maxima, median = magnitude_profile(x)
        self.medians.append(median)
        criteria = self.config.criteria
        ranked = max(self.config.top_k, TOP_MEANS, criteria.k + 1 if criteria.rule == "top-k" else 0)
        values, positions, channels = largest(x, row_maxima, ranked)
        self.top = keep_largest(
            self.top + [Peak(v, sequence, p, c, ratio_to(v, median)) for v, p, c in zip(values, positions, channels)],
            self.config.top_k,
        )
        self.top_sums = [total + abs(value) for total, value in zip(self.top_sums, values)]
        reference, cutoff = criterion_cutoff(criteria, median, row_maxima, values)
        self.references.append(reference)
        self.cutoffs.append(cutoff)
        self.first.append(np.abs(host_rows(x, np.zeros(1, dtype=np.int64))[0]))
        self.others.append(channel_magnitudes(x[1:]))
        if abs(values[0]) > cutoff:
            for v, p, c in zip(*entries_above(x, row_maxima, cutoff)):
                self.sites.append(MassiveSite(self.layer, sequence, p, c, v, ratio_to(v, median)))
        self.sums = [total + part for total, part in zip(self.sums, power_sums(x))]
        first, others = token_norms(x)
        self.first_norms.append(first)
        self.token_norms.append(others)
        if self.config.entropy:
            self.entropies.append(gram_entropy(x))


class DownProjectionObserver:
    """Largest inputs of one down projection, its massive input channels, and its super-weight spike."""

    def __init__(self, layer: int, module: torch.nn.Module, config: LocateConfig, super_weights):
        self.layer = layer
        self.weight = weight_out_in(module)
        self.config = config
        self.super_weights = super_weights
        self.top: list[Peak] = []
        self.massive_channels: set[int] = set()

    def observe(self, inputs: Tensor, outputs: Tensor, sequence: int) -> None:
        row_maxima = row_magnitudes(inputs)
        values, positions, channels = largest(inputs, row_maxima, self.config.top_k)
        # Most down projections never reach the absolute threshold: their median is not needed.
        median = median_magnitude(inputs) if abs(values[0]) > self.config.criteria.abs_threshold else math.nan
        self.top = keep_largest(
            self.top + [Peak(v, sequence, p, c, ratio_to(v, median)) for v, p, c in zip(values, positions, channels)],
            self.config.top_k,
        )
        if not math.isnan(median):
            self.massive_channels.update(entries_above(inputs, row_maxima, massive_cutoff(self.config.criteria, median))[2])
        self.super_weights.observe(self.layer, inputs, outputs, self.weight)


def eager_name(implementation: str) -> str:
    """Eager attention, through massquant's key/value hook when the model is routed through it."""
    return ATTENTION_PREFIX + "eager" if implementation.startswith(ATTENTION_PREFIX) else "eager"


def runs_eager(model) -> bool:
    return model.config._attn_implementation.removeprefix(ATTENTION_PREFIX) == "eager"


def attention_probabilities_available(model) -> bool:
    """Whether attention probabilities can be read: the model runs eager attention or can switch to it at run time."""
    return runs_eager(model) or model._can_set_attn_implementation()


@torch.inference_mode()
def attention_sink_share(model, input_ids: Tensor, progress: bool = True) -> list[list[float]]:
    """[layer][head]: attention probability on key position 0, averaged over queries 1.. and sequences.

    Runs each sequence once with eager attention, whose attention modules return
    their probabilities; a hook reduces each layer's [heads, queries, keys] to
    [heads] at once and the implementation is restored afterwards.
    """
    if not attention_probabilities_available(model):
        raise UserError(
            f"{type(model).__name__} cannot switch to eager attention at run time; "
            "load it with --attn-implementation eager to measure attention on the first token"
        )
    input_ids = as_batch(input_ids)
    attention_path = architecture_of(model).attention
    modules = [layer.get_submodule(attention_path) for layer in decoder_layers(model)]
    totals = [None] * len(modules)

    def hook_for(index: int):
        def hook(module, args, output):
            probabilities = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probabilities is None:
                raise UserError(f"attention module {type(module).__name__} returns no attention probabilities with eager attention")
            share = probabilities[0, :, 1:, 0].float().mean(dim=-1)
            totals[index] = share if totals[index] is None else totals[index] + share

        return hook

    previous = model.config._attn_implementation
    if not runs_eager(model):
        model.set_attn_implementation(eager_name(previous))
    try:
        hooks = [(module, "forward", hook_for(index)) for index, module in enumerate(modules)]
        run_sequences(model, input_ids, hooks, "attention on the first token", progress=progress, forward=run_without_logits)
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
    return [(total / len(input_ids)).tolist() for total in totals]


@torch.inference_mode()
def layer_output(model, input_ids: Tensor, layer: int) -> Tensor:
    """One decoder layer's output for one sequence ``[tokens]``: ``[tokens, hidden]`` float32 (for a heat-map)."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise UserError(f"layer {layer} does not exist; this model has layers 0..{len(layers) - 1}")
    captured = {}

    def hook(module, args, output):
        captured["output"] = tokens_by_channels(layer_hidden(output)).cpu()

    handle = layers[layer].register_forward_hook(hook)
    try:
        run_without_logits(model, input_ids.reshape(1, -1))
    finally:
        handle.remove()
    return captured["output"]
