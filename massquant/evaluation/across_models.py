"""The refined massive-activation analysis of one model, as the numbers a cross-model table compares.

For one loaded model: the phenomena (Sun et al. 2024's existence question, per
channel and token class), which tokens carry them, the attention share on each
sink token, excess kurtosis, what zeroing or mean-setting each phenomenon does
to perplexity (Sun et al.'s intervention, refined per phenomenon as in Owen et
al. 2025), and per-tensor W8A8 with the massive values kept or suppressed.
``massquant across`` runs it on several models and prints one column per model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from massquant.errors import UserError
from massquant.evaluation.perplexity import TokenWindows, perplexity
from massquant.massive import MassiveCriteria, MassivePolicy
from massquant.massive.intervene import InterventionCounts, describe_targets, intervene_targets, mean_tables
from massquant.massive.locate import locate
from massquant.massive.observers import attention_probabilities_available
from massquant.massive.report import LocateConfig
from massquant.massive.phenomena import typical_cutoff
from massquant.massive.sinks import attention_share_on, sink_positions
from massquant.massive.targets import residual_targets
from massquant.quantizers.spec import parse_spec
from massquant.variants import Variant, apply_variant

PHENOMENA_SHOWN = 3  # phenomena per model in the table (intervened on one by one)
QUANTIZED_SPEC = "w8a8-tensor"
# (label, --massive policy, target) of the quantized rows
QUANTIZED_ROWS = (
    ("none", "none", "first-layer"),
    ("keep", "keep", "first-layer"),
    ("suppress-mean first-layer", "suppress-mean", "first-layer"),
    ("suppress-mean dominant", "suppress-mean", "dominant"),
    ("suppress-zero dominant", "suppress-zero", "dominant"),
)


@dataclass(frozen=True)
class AnalysisSettings:
    criteria: MassiveCriteria = MassiveCriteria()
    quantized: bool = True  # the per-tensor W8A8 rows (the costliest part)


def _ppl_row(name: str, ppl: float, baseline: float, **extra) -> dict:
    return {"name": name, "ppl": ppl, "delta_ppl": ppl - baseline, **extra}


def analyze(loaded, located_ids: torch.Tensor, windows: TokenWindows, calibration: torch.Tensor,
            settings: AnalysisSettings = AnalysisSettings(), progress: bool = True) -> dict:
    """Every number of the cross-model table for one model (``ids`` ``[sequences, tokens]`` for locate, ``windows``
    for perplexity, ``calibration`` for means and the quantized rows). Returns a JSON-ready dict."""
    model, tokenizer = loaded.model, loaded.tokenizer
    config = LocateConfig(criteria=settings.criteria, entropy=False, attention_sink=attention_probabilities_available(model))
    report = locate(model, located_ids, config, tokenizer=tokenizer, progress=progress)
    located = report.as_dict()
    sinks = sink_positions(report, len(located_ids))
    sink_tokens: dict[str, int] = {}
    for sequence, positions in enumerate(sinks):
        for position in positions:
            text = tokenizer.decode([int(located_ids[sequence, position])])
            sink_tokens[text] = sink_tokens.get(text, 0) + 1
    first_share = [float(np.mean(heads)) for heads in report.attention_sink] if report.attention_sink else None
    other_share = attention_share_on(model, located_ids, sinks) if config.attention_sink and any(sinks) else None
    kurtosis = [layer.kurtosis for layer in report.layers]
    finite = [(value, index) for index, value in enumerate(kurtosis) if math.isfinite(value)]

    # Interventions: targets located on the calibration sequences, as `massquant intervene` does.
    sites = locate(model, calibration, LocateConfig(criteria=settings.criteria), progress=False).massive
    means = mean_tables(sites, model.config.hidden_size)
    baseline = perplexity(model, windows, description="unchanged").ppl
    interventions = []
    targets = ["first-layer", "dominant"] + [
        f"channel:{channel}" for channel in dict.fromkeys(p["channel"] for p in report.phenomena[:PHENOMENA_SHOWN])
    ]
    for target in dict.fromkeys(targets):
        try:
            chosen = residual_targets(sites, target, settings.criteria)
        except UserError as error:  # a channel massive on the located text but not on the calibration text
            interventions.append({"name": target, "skipped": str(error)})
            continue
        for kind in ("zero", "mean"):
            counts = InterventionCounts()
            undo = intervene_targets(model, kind, chosen, means, counts)
            try:
                ppl = perplexity(model, windows, description=f"{kind} {target}").ppl
            finally:
                undo()
            interventions.append(_ppl_row(f"{kind} {target}", ppl, baseline, where=describe_targets(chosen),
                                          **counts.as_dict(tokenizer)))

    quantized = []
    if settings.quantized:
        for label, mode, target in QUANTIZED_ROWS:
            policy = MassivePolicy(mode, "calibrated", settings.criteria, target)
            applied = apply_variant(loaded, Variant(parse_spec(QUANTIZED_SPEC), policy), calibration)
            try:
                ppl = perplexity(applied.model, windows, description=f"{QUANTIZED_SPEC} {label}").ppl
            finally:
                applied.undo()
            massive = applied.summary.get("massive") or {}
            quantized.append(_ppl_row(label, ppl, baseline, massive={
                key: massive.get(key) for key in ("intervention", "values_changed", "kept_values", "kept_fraction", "changed", "kept")
                if key in massive
            }))
    return {
        "layers": len(report.layers),
        "hidden_size": model.config.hidden_size,
        "phenomena": report.phenomena,
        "blind_spots": report.blind_spots,
        "typical_cutoff": typical_cutoff([layer.cutoff for layer in report.layers]),
        "tokens": located["tokens"],
        "super_weights": located["massive"]["super_weights"],
        "sink_tokens": sink_tokens,
        "attention_first": first_share,
        "attention_other_sinks": other_share,
        "kurtosis": kurtosis,
        "max_kurtosis": max(finite, default=(math.nan, None)),
        "mean_kurtosis": float(np.mean([value for value, _ in finite])) if finite else math.nan,
        "baseline_ppl": baseline,
        "interventions": interventions,
        "quantized_spec": QUANTIZED_SPEC,
        "quantized": quantized,
        "locate": located,
    }
