"""massquant analyze NAME: where the quantization loss comes from, rotations compared, the compression valley,
and how massive activations emerge during training (``massquant.analysis``)."""

from __future__ import annotations

from pathlib import Path

from massquant.cli import common
from massquant.data.text import load_text
from massquant.errors import UserError
from massquant.evaluation.perplexity import build_windows
from massquant.models.loading import load_model, max_sequence_length
from massquant.options import settings
from massquant.reporting.figures import save_png
from massquant.reporting.results import environment
from massquant.reporting.tables import render

NAME = "analyze"
HELP = "analyses: loss attribution by token class, per-layer sensitivity, rotation kinds, compression valley, emergence over training"

ANALYSES = {
    "attribution": "the NLL increase of each quantized row split by token class (first/BOS, massive carriers, delimiters, others)",
    "layers": "per-layer (or per-projection) sensitivity: the spec applied to one decoder layer or projection type at a time",
    "rotations": "rotation kinds (randomized Hadamard, random orthogonal, identity): quantization error on massive vs other tokens, and Δppl",
    "valley": "per-layer matrix entropy of the token representations next to the first token's norm, and their correlation",
    "dynamics": "massive-activation statistics over training checkpoints, and the fit of the top activation's trajectory",
}


def add_arguments(parser) -> None:
    from massquant.cli import analyze_dynamics, analyze_windows

    subparsers = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", parser_class=common.ArgumentParser)
    for name, text in ANALYSES.items():
        sub = subparsers.add_parser(name, help=text, description=text)
        (analyze_dynamics if name == "dynamics" else analyze_windows).add_arguments(name, sub)


def run(args) -> int:
    from massquant.cli import analyze_dynamics, analyze_windows

    if not getattr(args, "analysis", None):
        raise UserError(f"name an analysis: {', '.join(ANALYSES)} (see 'massquant analyze --help')")
    return (analyze_dynamics if args.analysis == "dynamics" else analyze_windows).run(args)


# ---- shared by the analyses that evaluate one loaded model on perplexity windows --------------------------


def load_with_windows(args, variants: list):
    """The model, the perplexity windows and (when a variant needs them) calibration sequences, as ``eval``
    builds them; every variant is checked against the model (``massquant.validation.Plan``) before any forward,
    and one that cannot run is an error (an analysis compares all of them)."""
    from massquant.validation import Plan

    model_config, ppl_config = settings.model_config(args), settings.perplexity_config(args)
    ppl_config.validate()
    model_config.validate()
    common.seed_everything(args.seed)
    text = load_text(ppl_config.data)
    needs_calibration = common.needs_calibration(variants)
    if needs_calibration:
        load_text(args.calib_data)
    plan = Plan(model_config, variants)
    reasons = plan.reasons
    if reasons is None:
        loaded = load_model(model_config)
        reasons = plan.settle(loaded)
    for variant, reason in zip(variants, reasons):
        if reason:
            raise UserError(f"{variant.name}: {reason}")
    if plan.facts is not None:
        loaded = load_model(model_config)
    windows = build_windows(loaded.tokenizer, text, ppl_config, max_sequence_length(loaded.model))
    calibration = None
    if needs_calibration:
        calibration = settings.calibration(args).batch(loaded.tokenizer, args.seed, bos=windows.bos_token_id is not None)
    payload = {
        "command": f"analyze {args.analysis}",
        "model": loaded.record(),
        "data": windows.record(ppl_config, text),
        "seed": args.seed,
        "environment": environment(),
    }
    return loaded, windows, calibration, payload


def write_figures(sink: common.ResultSink, figures: dict) -> list[Path]:
    """PNG files beside results.json (only with --out)."""
    if sink.directory is None:
        return []
    return [save_png(figure, sink.directory / name) for name, figure in figures.items()]


def tables_text(*tables: tuple[list[dict], dict[str, str]], table_format: str) -> str:
    return "\n\n".join(render(rows, columns, table_format) for rows, columns in tables)
