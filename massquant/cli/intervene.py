"""massquant intervene: perplexity with targeted massive activations (``--massive-target``; default: the first
massive layer's) zeroed, set to their mean or clipped, and with the super weights zeroed, against the unchanged model.
Each row records which (layer, channel, token) values it changed."""

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
    INTERVENTIONS, InterventionCounts, describe_targets, intervene_targets, mean_tables, zero_super_weights,
)
from massquant.massive.targets import residual_targets
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


def changed_tokens(changed: list[dict], shown: int = 3) -> str:
    """The tokens whose values a row changed, most values first: "'<bos>' (first) 16, ' ' 8, …"."""
    by_token: dict[str, int] = {}
    for entry in changed:
        text = repr(entry.get("token", entry["token_id"])) + (" (first)" if entry["position"] == "first" else "")
        by_token[text] = by_token.get(text, 0) + entry["values"]
    ranked = sorted(by_token.items(), key=lambda item: -item[1])
    return ", ".join(f"{text} {count}" for text, count in ranked[:shown]) + (", …" if len(ranked) > shown else "")


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
    targets = settings.massive_targets(args)
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
    where_of = {target: residual_targets(sites, target, criteria, args.massive_detection) for target in targets}
    means = mean_tables(sites, model.config.hidden_size)
    payload = {
        "command": "intervene",
        "model": loaded.record(),
        "data": windows.record(ppl_config, text),
        "calibration": dataclasses.asdict(settings.calibration(args)),
        "detection": args.massive_detection,
        "criteria": vars(criteria),
        "targets": targets,
        "located": sites_summary(sites),
        "seed": args.seed,
        "environment": environment(),
        "rows": [],
    }

    def measure(name: str, install, where: str, target: str | None = None) -> dict:
        counts = InterventionCounts()
        undo = install(counts)
        try:
            result = perplexity(model, windows, ppl_config.batch_size, description=name)
        finally:
            undo()
        row = {"intervention": name, "target": target, "where": where, **result.as_dict(), **counts.as_dict(loaded.tokenizer)}
        row["changed_tokens"] = changed_tokens(row["changed"])
        if counts.layers and args.massive_detection == "dynamic":
            row["where"] += f" (found per forward: layer {', '.join(map(str, sorted(counts.layers)))})"
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
            for target in targets:
                chosen = where_of[target]
                label = name if len(targets) == 1 else f"{name} {target}"
                measure(label, lambda counts, name=name, chosen=chosen: intervene_targets(model, name, chosen, means, counts),
                        describe_targets(chosen), target)
        elif sites.super_weights:
            where = "; ".join(f"layer {w.layer} down_proj[{w.row}, {w.col}]" for w in sites.super_weights)
            measure(name, zero_weights, where)
        else:
            print("massquant: no super weight located; the super-weights row is left out", file=sys.stderr)
    table_rows = [{**row, "delta_ppl_text": format_delta(row["delta_ppl"])} for row in rows]
    sink.finish(payload, render(table_rows, INTERVENE_COLUMNS, args.table_format))
    return 0
