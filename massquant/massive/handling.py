"""The ``--massive`` policies: what quantization does with massive activations.

- ``keep``: massive values of every quantized linear's input bypass activation
  quantization (left out of the scale, passed through unquantized) and super
  weights get their full-precision value back after weight quantization. Needs
  the fake backend, whose activation quantizers carry the keep rules.
- ``suppress-zero`` / ``suppress-mean``: at the targeted layers (``--massive-target``,
  ``massquant.massive.targets``; default: the first massive layer) the values
  are set to zero / to their calibrated mean, then the model is quantized;
- ``clip``: the same, clamping them to the massive threshold instead.

Calibrated ``keep`` inspects, at each linear reading the residual stream, the
channels massive in the stream entering its layer *and* those massive in the
linear's own input after its norm (Gemma's norms turn a residual value of 1e5
into an ordinary one and can make other channels massive); the target filters
them. Each row records which (layer or linear, channel, token) values were
changed or kept.

Detection is ``calibrated`` (layer, channels and super weights located once on
calibration sequences; in those channels a value still has to meet the
criteria in each forward) or ``dynamic`` (every channel, every forward, with
the same criteria; super weights found data-free from one short prompt).
Suppression works with any backend: its hooks are installed before
quantizing, so calibrated ranges see the suppressed activations.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from massquant.backends import AppliedQuantization
from massquant.errors import UserError
from massquant.massive import MassiveCriteria, MassivePolicy
from massquant.massive.intervene import (
    InterventionCounts, TokenIds, describe_targets, down_projection, intervene_targets, mean_tables,
    set_super_weights, site_counts,
)
from massquant.massive.locate import locate
from massquant.massive.report import LocateConfig
from massquant.massive.sites import MassiveSites, SuperWeight
from massquant.massive.super_weights import find_super_weights
from massquant.massive.targets import kept_channel, linear_input_channels, residual_reader_groups, residual_targets
from massquant.models.architectures import architecture_of, decoder_layers
from massquant.quantizers.tensors import KeepRule
from massquant.wrapping.modules import QuantLinear
from massquant.wrapping.quantize import calibrate

INTERVENTION_OF_POLICY = {"suppress-zero": "zero", "suppress-mean": "mean", "clip": "clip"}


def locate_sites(model, calibration: torch.Tensor, criteria: MassiveCriteria) -> MassiveSites:
    """Massive sites and super weights of ``model`` on ``calibration`` ([samples, seq_len] token ids)."""
    return locate(model, calibration, LocateConfig(criteria=criteria), progress=False).massive


def sites_summary(sites: MassiveSites | None) -> dict | None:
    """What a result records about the located sites (not every site: they can number thousands)."""
    if sites is None:
        return None
    return {
        "sites": len(sites.sites),
        "first_layer": sites.first_layer,
        "layers": sites.layers,
        "channels": sites.channels,
        "positions": sites.positions,
        "down_proj_channels": {str(layer): channels for layer, channels in sites.down_proj_channels.items()},
        "super_weights": [vars(weight) for weight in sites.super_weights],
    }


def _needs_sites(policy: MassivePolicy) -> bool:
    return policy.detection == "calibrated" or policy.mode == "suppress-mean"


def _residual_readers(model) -> list[str]:
    """Paths (within a decoder layer) of the linears that read the normed residual stream."""
    return [path for group in residual_reader_groups(model) for path in group]


def keep_rules(
    model, policy: MassivePolicy, sites: MassiveSites | None,
    linear_inputs: dict[tuple[int, str], list[int]] | None = None, super_weights: list[SuperWeight] = (),
) -> dict[QuantLinear, KeepRule]:
    """The keep rule of each quantized linear whose input is quantized.

    Dynamic: every channel of every such linear. Calibrated: the linears that
    read the residual stream inspect the channels massive in the stream that
    enters their layer and those massive in their own input
    (``linear_inputs``, from ``targets.linear_input_channels``); down
    projections inspect their located input channels. A ``dominant`` or
    ``channel:N`` target narrows readers to that channel and down projections
    to the input channels of the super weights writing it.
    """
    criteria = policy.criteria
    quantized = {module for module in model.modules() if isinstance(module, QuantLinear) and module.input_quantizer is not None}
    only = kept_channel(sites, policy.target)
    writers: dict[int, set[int]] = {}  # layer -> down_proj input channels of super weights writing `only`
    for weight in super_weights:
        if weight.row == only:
            writers.setdefault(weight.layer, set()).add(weight.col)
    readers, down_proj = _residual_readers(model), architecture_of(model).down_proj
    if policy.detection == "dynamic":
        if only is None:
            return {module: KeepRule(criteria.abs_threshold, criteria.median_ratio) for module in quantized}
        channels_at = lambda index, path: (only,) if path in readers else writers.get(index, ())  # noqa: E731
    else:
        channels_by_layer: dict[int, set[int]] = {}
        for site in sites.sites:
            channels_by_layer.setdefault(site.layer, set()).add(site.channel)

        def channels_at(index: int, path: str):
            if path == down_proj:
                return writers.get(index, ()) if only is not None else sites.down_proj_channels.get(index, ())
            found = set(channels_by_layer.get(index - 1, ())) | set((linear_inputs or {}).get((index, path), ()))
            return found & {only} if only is not None else found

    rules = {}
    for index, layer in enumerate(decoder_layers(model)):
        for path in (*readers, down_proj):
            module = layer.get_submodule(path)
            channels = channels_at(index, path)
            if module in quantized and channels:
                rules[module] = KeepRule(criteria.abs_threshold, criteria.median_ratio, tuple(sorted(channels)))
    return rules


def _super_weights_to_keep(loaded, policy: MassivePolicy, sites: MassiveSites | None) -> list[SuperWeight]:
    """Located with the sites when calibrated; dynamic detection finds them data-free, with one short prompt."""
    if sites is not None:
        return sites.super_weights
    return find_super_weights(loaded.model, loaded.tokenizer, criteria=policy.criteria)


def _keep(
    loaded, model, policy: MassivePolicy, sites: MassiveSites | None, super_weights: list[SuperWeight],
    calibration: torch.Tensor | None, record: dict, linear_inputs: dict | None,
):
    """Set the keep rules and restore super weights; returns the undo steps and a function that records the counts."""
    rules = keep_rules(model, policy, sites, linear_inputs, super_weights)
    token_ids = TokenIds(model)
    kept_at: Counter = Counter()  # (linear, channel, token id, first) -> values kept
    names = {module: name for name, module in model.named_modules() if module in rules}
    for module, rule in rules.items():
        module.input_quantizer.keep = rule
        module.input_quantizer.on_kept = lambda mask, name=names[module]: token_ids.count(kept_at, name, mask)

    def drop_rules() -> None:
        token_ids.remove()
        for module in rules:
            module.input_quantizer.keep = None
            module.input_quantizer.on_kept = None

    undo_steps: list[Callable[[], None]] = [drop_rules]
    # Static ranges were calibrated with the massive values in them; calibrate again without them.
    static = [
        module.input_quantizer for module in model.modules()
        if isinstance(module, QuantLinear) and module.input_quantizer is not None and not module.input_quantizer.part.dynamic
    ]
    if static and rules:
        calibrate(model, static, calibration)
    only = kept_channel(sites, policy.target)
    quantized_weights = [
        w for w in super_weights
        if isinstance(down_projection(model, w.layer), QuantLinear) and (only is None or w.row == only)
    ]
    undo_steps.append(
        set_super_weights(
            model, quantized_weights,
            lambda weight, _: down_projection(model, weight.layer).original_weight()[weight.row, weight.col],
        )
    )
    record.update(
        keep_rules=len(rules),
        keep_channels={names[module]: list(rule.channels) if rule.channels is not None else "all" for module, rule in rules.items()},
        super_weights_restored=[{"layer": w.layer, "row": w.row, "col": w.col} for w in quantized_weights],
    )

    def record_counts() -> None:
        kept = sum(module.input_quantizer.kept_values for module in rules)
        inspected = sum(module.input_quantizer.inspected_values for module in rules)
        record.update(
            kept_values=kept, inspected_values=inspected, kept_fraction=kept / inspected if inspected else 0.0,
            kept=site_counts(kept_at, loaded.tokenizer),
        )

    return undo_steps, record_counts


def handle_massive(
    loaded, policy: MassivePolicy, calibration: torch.Tensor | None, quantize: Callable[[], AppliedQuantization]
) -> AppliedQuantization:
    """Detect (when calibrated), install the suppression, ``quantize()``, then apply ``keep``.

    The returned summary has a ``massive`` entry (policy, detection, criteria,
    located sites); what happens during evaluation (values kept or changed) is
    added to it when ``undo`` runs, so a result row written after the undo has it.
    """
    policy.validate()
    model = loaded.model
    if _needs_sites(policy) and calibration is None:
        raise UserError(f"--massive {policy.label} needs calibration sequences to locate massive activations")
    sites = locate_sites(model, calibration, policy.criteria) if _needs_sites(policy) else None
    super_weights = _super_weights_to_keep(loaded, policy, sites) if policy.mode == "keep" else []
    keep_calibrated = policy.mode == "keep" and policy.detection == "calibrated"
    linear_inputs = linear_input_channels(model, calibration, policy.criteria) if keep_calibrated else None
    record = {
        "policy": policy.mode, "detection": policy.detection, "criteria": vars(policy.criteria),
        "target": policy.target, "located": sites_summary(sites),
    }
    undo_steps: list[Callable[[], None]] = []
    record_steps: list[Callable[[], None]] = []

    def undo() -> None:
        for step in record_steps:
            step()
        while undo_steps:
            undo_steps.pop()()

    try:
        targets = (
            residual_targets(sites, policy.target, policy.criteria, policy.detection)
            if policy.mode in INTERVENTION_OF_POLICY else []
        )
        counts = InterventionCounts()
        means = mean_tables(sites, model.config.hidden_size) if policy.mode == "suppress-mean" else None

        def suppress(on_model) -> None:
            undo_steps.append(intervene_targets(on_model, INTERVENTION_OF_POLICY[policy.mode], targets, means, counts))

        if targets:
            suppress(model)
            record.update(intervention=describe_targets(targets))
            record_steps.append(lambda: record.update(counts.as_dict(loaded.tokenizer)))
        applied = quantize()
        undo_steps.append(applied.undo)
        counts.clear()  # calibration passes inside quantize() are not part of the evaluation
        if targets and applied.model is not model:  # a backend that builds a new model (GPTQ)
            suppress(applied.model)
        if policy.mode == "keep":
            backend = applied.summary.get("backend", "fake")
            if backend != "fake":
                raise UserError(
                    f"--massive keep needs --backend fake (its activation quantizers hold the keep rules); "
                    f"got '{backend}'. suppress-zero, suppress-mean and clip work with every backend"
                )
            steps, record_counts = _keep(
                loaded, applied.model, policy, sites, super_weights, calibration, record, linear_inputs
            )
            undo_steps.extend(steps)
            record_steps.append(record_counts)
    except BaseException:
        undo()
        raise
    return AppliedQuantization(applied.model, undo, {**applied.summary, "massive": record})
