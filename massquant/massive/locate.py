"""Find massive activations (Sun et al. 2024) and super weights (Yu et al. 2024) with streaming hooks.

Two forward hooks per decoder layer see each sequence: one on the layer's
output (the residual stream), one on its MLP down projection. Each reduces its
tensor at once to a few numbers — the top-k |a| with their token and channel,
the median |a|, power sums for the kurtosis, the first token's norm, a matrix
entropy — and keeps only the values that meet the massive criterion (|a| above
a threshold and above a cutoff of the tensor: by default a multiple of its
median |a|, Sun et al. 2024; see ``MassiveCriteria`` for the others). No hidden
state outlives its hook, so memory stays that of a plain forward pass. The
sites are then grouped into phenomena, with the criterion's blind spots per
layer (``massquant.massive.phenomena``).

This module runs the pass; ``statistics.py`` holds the pure reductions,
``observers.py`` the hooks and their state, ``report.py`` what comes back.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from massquant.massive.observers import (
    DownProjectionObserver, ResidualStreamObserver, as_batch, attention_sink_share, down_projections, run_without_logits,
)
from massquant.massive.phenomena import LayerProfiles, blind_spots, group_phenomena
from massquant.massive.report import LayerStats, LocateConfig, LocateReport, token_counts, with_tokens
from massquant.massive.sites import MassiveSites
from massquant.massive.statistics import excess_kurtosis, reference_name, tokens_by_channels
from massquant.massive.super_weights import SuperWeightTracker
from massquant.models.architectures import decoder_layers, layer_hidden
from massquant.models.passes import run_sequences


def _mean(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else math.nan


def _layer_stats(residual: ResidualStreamObserver, down: DownProjectionObserver, token_ids: list[list[int]], tokenizer) -> LayerStats:
    return LayerStats(
        layer=residual.layer,
        top=with_tokens(residual.top, token_ids, tokenizer),
        top_means=[total / len(residual.medians) for total in residual.top_sums],
        median=_mean(residual.medians),
        cutoff=_mean(residual.cutoffs),
        massive=len(residual.sites),
        kurtosis=excess_kurtosis(residual.sums),
        first_token_norm=_mean(residual.first_norms),
        token_norm=_mean(residual.token_norms),
        entropy=_mean(residual.entropies),
        down_proj_top=with_tokens(down.top, token_ids, tokenizer),
    )


@torch.inference_mode()
def locate(
    model, input_ids: Tensor, config: LocateConfig | None = None, tokenizer=None, progress: bool = True
) -> LocateReport:
    """Massive activations, super weights and outlier statistics of ``model`` on ``input_ids`` [sequences, tokens].

    Sequences run one at a time; layers are numbered from 0 (the first decoder
    layer's output is layer 0). ``tokenizer`` only adds token texts (and with
    them the delimiter token class). ``config.criteria`` decides what is
    massive in the residual stream; down-projection inputs and super weights
    always use Sun et al.'s rule (with the same absolute threshold).
    """

    config = (config or LocateConfig()).validate()
    input_ids = as_batch(input_ids)
    layers = decoder_layers(model)
    tracker = SuperWeightTracker(config.criteria.sun())
    residuals = [ResidualStreamObserver(index, config) for index in range(len(layers))]
    projections = down_projections(model)
    sun = replace(config, criteria=config.criteria.sun())
    downs = [DownProjectionObserver(index, module, sun, tracker) for index, module in enumerate(projections)]
    current = {"sequence": 0}

    def residual_hook(stream: ResidualStreamObserver):
        return lambda module, args, output: stream.observe(tokens_by_channels(layer_hidden(output)), current["sequence"])

    def down_hook(down: DownProjectionObserver):
        return lambda module, args, output: down.observe(
            tokens_by_channels(args[0]), tokens_by_channels(output), current["sequence"]
        )

    hooks = [(layer, "forward", residual_hook(stream)) for layer, stream in zip(layers, residuals)]
    hooks += [(module, "forward", down_hook(down)) for module, down in zip(projections, downs)]
    run_sequences(
        model, input_ids, hooks, "locate", lambda sequence, _: current.update(sequence=sequence), progress, run_without_logits,
    )

    token_ids = input_ids.tolist()
    sites = with_tokens([site for stream in residuals for site in stream.sites], token_ids, tokenizer)
    massive = MassiveSites(
        sites=sites,
        down_proj_channels={down.layer: sorted(down.massive_channels) for down in downs if down.massive_channels},
        super_weights=tracker.super_weights(),
    )
    profiles = LayerProfiles(
        cutoffs=np.array([stream.cutoffs for stream in residuals]),
        first=np.array([stream.first for stream in residuals]),
        others=np.array([stream.others for stream in residuals]),
        references=np.array([stream.references for stream in residuals]),
    )
    phenomena = group_phenomena(sites, getattr(tokenizer, "bos_token", None))
    return LocateReport(
        config=config,
        sequences=len(input_ids),
        seq_len=input_ids.shape[1],
        layers=[_layer_stats(residual, down, token_ids, tokenizer) for residual, down in zip(residuals, downs)],
        massive=massive,
        tokens=token_counts(sites, token_ids, tokenizer),
        attention_sink=attention_sink_share(model, input_ids, progress) if config.attention_sink else None,
        phenomena=phenomena,
        blind_spots=blind_spots(phenomena, sites, profiles, reference_name(config.criteria)),
    )
