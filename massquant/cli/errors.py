"""massquant errors: per-layer quantization error of one spec, to find the layers that break."""

from __future__ import annotations

from massquant.cli import common
from massquant.errors import UserError
from massquant.evaluation.layer_errors import check_measurable, layer_errors
from massquant.models.loading import load_model
from massquant.validation import Plan
from massquant.variants import Variant
from massquant.reporting.results import environment
from massquant.reporting.tables import render

NAME = "errors"
HELP = "per-layer quantization error of a spec: which layers break"
COLUMNS = {
    "layer": "layer",
    "weight_sqnr_db": "W SQNR dB",
    "act_sqnr_db": "A SQNR dB",
    "max_abs_input": "max|x|",
    "rel_output_error": "rel. out err",
}


def add_arguments(parser) -> None:
    common.add_model_arguments(parser)
    group = common.add_sampled_sequence_arguments(parser, "input sequences", "--samples", 4)
    group.add_argument(
        "--top", type=common.positive_int, metavar="N",
        help="print only the N layers with the largest relative output error, worst first (the JSON keeps every layer)",
    )
    common.add_quantization_arguments(parser)
    common.add_output_arguments(parser)


def single_spec(args):
    specs = common.quant_specs(args)
    if len(specs) != 1:
        named = ", ".join(spec.name for spec in specs) or "none"
        raise UserError(f"errors measures exactly one spec; the flags give {len(specs)} ({named})")
    check_measurable(specs[0])
    return specs[0]


def worst_rows(rows: list[dict], count: int) -> list[dict]:
    """The ``count`` rows with the largest relative output error; layers never reached sort last."""
    ranked = sorted(rows, key=lambda row: -1.0 if row["rel_output_error"] is None else row["rel_output_error"], reverse=True)
    return ranked[:count]


def run(args) -> int:
    # Everything a user can get wrong is checked before the model loads.
    sink = common.ResultSink(args)
    model_config = common.model_config(args)
    model_config.validate()
    spec = single_spec(args)
    common.seed_everything(args.seed)
    plan = Plan(model_config, [Variant(spec)])  # the spec against the model's shapes, before its weights load
    loaded = load_model(model_config)
    plan.settle(loaded)
    batch = common.sampled_sequences(args, loaded, args.samples)
    rows = layer_errors(loaded.model, spec, batch)
    payload = {
        "command": "errors",
        "model": loaded.record(),
        "spec": spec.name,
        "data": {"data": args.data, "samples": args.samples, "seq_len": args.seq_len},
        "seed": args.seed,
        "environment": environment(),
        "rows": rows,
    }
    shown = worst_rows(rows, args.top) if args.top else rows
    sink.finish(payload, render(shown, COLUMNS, args.table_format))
    return 0
