"""massquant errors: per-layer quantization error of one spec, to find the layers that break."""

from __future__ import annotations

from massquant import options
from massquant.cli import common
from massquant.options import settings
from massquant.errors import UserError
from massquant.evaluation.layer_errors import check_measurable, layer_errors
from massquant.models.loading import load_model
from massquant.validation import Plan
from massquant.variants import Variant
from massquant.reporting.results import environment
from massquant.reporting.columns import ERRORS_COLUMNS, worst_rows
from massquant.reporting.tables import render

NAME = "errors"
HELP = "per-layer quantization error of a spec: which layers break"


def add_arguments(parser) -> None:
    options.add_arguments(
        parser, "model", "text", "quantization", "calibration", "run", only=(*options.keys("model", "quantization", "calibration", "run"), "data", "n_seqs", "seq_len"),
        defaults={"n_seqs": 4, "seq_len": 512},
    )
    parser.add_argument(
        "--top", type=common.positive_int, metavar="N",
        help="print only the N layers with the largest relative output error, worst first (the JSON keeps every layer)",
    )
    common.add_output_arguments(parser)


def single_spec(args):
    specs = settings.quant_specs(args)
    if len(specs) != 1:
        named = ", ".join(spec.name for spec in specs) or "none"
        raise UserError(f"errors measures exactly one spec; the flags give {len(specs)} ({named})")
    check_measurable(specs[0])
    return specs[0]




def run(args) -> int:
    # Everything a user can get wrong is checked before the model loads.
    sink = common.ResultSink(args)
    model_config = settings.model_config(args)
    model_config.validate()
    spec = single_spec(args)
    common.seed_everything(args.seed)
    plan = Plan(model_config, [Variant(spec)])  # the spec against the model's shapes, before its weights load
    loaded = load_model(model_config)
    plan.settle(loaded)
    batch = common.sampled_sequences(args, loaded, args.n_seqs)
    rows = layer_errors(loaded.model, spec, batch)
    payload = {
        "command": "errors",
        "model": loaded.record(),
        "spec": spec.name,
        "data": {"data": args.data, "n_seqs": args.n_seqs, "seq_len": args.seq_len},
        "seed": args.seed,
        "environment": environment(),
        "rows": rows,
    }
    shown = worst_rows(rows, args.top) if args.top else rows
    sink.finish(payload, render(shown, ERRORS_COLUMNS, args.table_format))
    return 0
