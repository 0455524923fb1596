"""massquant intervene: perplexity with the first layer's massive activations zeroed, set to their mean or clipped,
and with the super weights zeroed, against the unchanged model."""

from __future__ import annotations

import dataclasses
import sys

from massquant import options
from massquant.cli import common
from massquant.options import settings
from massquant.data.text import load_text
from massquant.errors import UserError
from massquant.evaluation.perplexity import build_windows, perplexity
from massquant.massive.handling import locate_sites, sites_summary
from massquant.massive.intervene import (
    INTERVENTIONS, InterventionCounts, ResidualTarget, first_layer_target, intervene_residual, mean_tables,
    zero_super_weights,
)
from massquant.models.architectures import architecture_of
from massquant.models.loading import load_model, max_sequence_length
from massquant.validation import model_facts
from massquant.reporting.results import environment
from massquant.reporting.columns import INTERVENE_COLUMNS
from massquant.reporting.tables import format_delta, render

NAME = "intervene"
HELP = "perplexity with massive activations set to zero, to their mean or clipped, and with super weights zeroed"
SUPER_WEIGHTS = "super-weights"
CHOICES = (*INTERVENTIONS, SUPER_WEIGHTS)


def add_arguments(parser) -> None:
    options.add_arguments(parser, "model", "text", "calibration", "massive", "run", skip=("n_seqs", "massive"))
    parser.add_argument(
        "--interventions", default=",".join(CHOICES), metavar="LIST",
        help=f"comma-separated, from {', '.join(CHOICES)} (default: all); the unchanged model is always the first row",
    )
    common.add_output_arguments(parser)


def chosen_interventions(text: str) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in CHOICES]
    if unknown or not chosen:
        raise UserError(f"--interventions: unknown or empty '{text}'; accepted: {', '.join(CHOICES)}")
    return list(dict.fromkeys(chosen))


def run(args) -> int:
    # Everything a user can get wrong is checked before the model loads.
    sink = common.ResultSink(args)
    model_config, ppl_config = settings.model_config(args), settings.perplexity_config(args)
    ppl_config.validate()
    model_config.validate()
    interventions = chosen_interventions(args.interventions)
    criteria = settings.massive_criteria(args)
    common.seed_everything(args.seed)
    text = load_text(ppl_config.data)
    load_text(args.calib_data)  # a missing calibration text fails now, not after the model loads
    facts = model_facts(model_config)
    if facts is not None:
        architecture_of(facts.model)  # the interventions hook decoder layers: an unknown architecture fails before loading
    loaded = load_model(model_config)
    architecture_of(loaded.model)
    model = loaded.model
    windows = build_windows(loaded.tokenizer, text, ppl_config, max_sequence_length(model))
    calibration = settings.calibration(args).batch(loaded.tokenizer, args.seed, bos=windows.bos_token_id is not None)
    sites = locate_sites(model, calibration, criteria)
    if not sites:
        raise UserError(
            f"no massive activations found on the calibration text (|a| > {criteria.abs_threshold:g} and > "
            f"{criteria.median_ratio:g} x median); lower --massive-threshold or --massive-ratio"
        )
    target = first_layer_target(sites, criteria) if args.massive_detection == "calibrated" else ResidualTarget(criteria)
    means = mean_tables(sites, model.config.hidden_size)
    payload = {
        "command": "intervene",
        "model": loaded.record(),
        "data": windows.record(ppl_config, text),
        "calibration": dataclasses.asdict(settings.calibration(args)),
        "detection": args.massive_detection,
        "criteria": vars(criteria),
        "located": sites_summary(sites),
        "seed": args.seed,
        "environment": environment(),
        "rows": [],
    }

    def measure(name: str, install, where: str) -> dict:
        counts = InterventionCounts()
        undo = install(counts)
        try:
            result = perplexity(model, windows, ppl_config.batch_size, description=name)
        finally:
            undo()
        row = {"intervention": name, "where": where, **result.as_dict(), **counts.as_dict()}
        if counts.layers and target.layer is None:
            row["where"] = f"layer {', '.join(map(str, sorted(counts.layers)))} (found per forward)"
        row["delta_ppl"] = row["ppl"] - rows[0]["ppl"] if rows else 0.0
        rows.append(row)
        payload["rows"] = rows
        sink.save(payload)

    def zero_weights(counts: InterventionCounts):
        counts.values = len(sites.super_weights)
        return zero_super_weights(model, sites.super_weights)

    rows: list[dict] = []
    measure("unchanged", lambda counts: (lambda: None), "")
    for name in interventions:
        if name != SUPER_WEIGHTS:
            measure(name, lambda counts, name=name: intervene_residual(model, name, target, means, counts), target.describe())
        elif sites.super_weights:
            where = "; ".join(f"layer {w.layer} down_proj[{w.row}, {w.col}]" for w in sites.super_weights)
            measure(name, zero_weights, where)
        else:
            print("massquant: no super weight located; the super-weights row is left out", file=sys.stderr)
    table_rows = [{**row, "delta_ppl_text": format_delta(row["delta_ppl"])} for row in rows]
    sink.finish(payload, render(table_rows, INTERVENE_COLUMNS, args.table_format))
    return 0
