"""massquant across: the refined massive-activation analysis on several models, one table with a column per model."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from massquant import options
from massquant.cli import common
from massquant.data.calibration import calibration_batch
from massquant.data.text import load_text
from massquant.evaluation.across_models import AnalysisSettings, analyze
from massquant.evaluation.perplexity import PerplexityConfig, build_windows
from massquant.massive import MassiveCriteria
from massquant.massive.plots import write_plots
from massquant.models.architectures import architecture_of
from massquant.models.loading import ModelConfig, load_model, max_sequence_length
from massquant.reporting.results import environment
from massquant.reporting.tables import format_cell, format_delta, render
from massquant.validation import model_facts

NAME = "across"
DEFAULT_MODELS = ["smollm2-135m", "gemma3-270m"]
HELP = "the refined massive-activation analysis on several models: phenomena, tokens, sinks, kurtosis, interventions, W8A8"


def add_arguments(parser) -> None:
    parser.add_argument("--model", action="append", default=[], metavar="MODEL",
                        help=f"a model (alias, directory or hub id); repeat or comma-separate (default: {','.join(DEFAULT_MODELS)})")
    options.add_arguments(
        parser, "text", "calibration", "run",
        only=("data", "n_seqs", "seq_len", "max_tokens", "calib_data", "calib_samples", "calib_seq_len", "seed"),
        defaults={"n_seqs": 2, "seq_len": 512, "max_tokens": 1024, "calib_samples": 4, "calib_seq_len": 256},
    )
    parser.add_argument("--no-quantized", action="store_true", help="leave out the per-tensor W8A8 rows (the costliest part)")
    common.add_output_arguments(parser)


def model_names(args) -> list[str]:
    names = [name.strip() for option in args.model for name in option.split(",") if name.strip()]
    return list(dict.fromkeys(names or DEFAULT_MODELS))


def _short(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _share(shares: list[float] | None) -> str:
    """Attention share per layer, as its range over layers and where it is largest."""
    if not shares:
        return "no sink token"
    finite = [(value, index) for index, value in enumerate(shares) if math.isfinite(value)]
    if not finite:
        return "no sink token"
    largest, at = max(finite)
    return f"{min(v for v, _ in finite):.2f}–{largest:.2f} (max at layer {at})"


def table_rows(results: dict[str, dict]) -> list[dict]:
    """Rows = what is measured, one column per model (the keys of ``results``)."""
    rows: list[dict] = []

    def add(metric: str, cell) -> None:
        rows.append({"metric": metric, **{name: cell(result) for name, result in results.items()}})

    add("layers, hidden", lambda r: f"{r['layers']}, {r['hidden_size']}")
    for rank in range(max(len(r["phenomena"][:3]) for r in results.values())):
        add(f"phenomenon {rank + 1}", lambda r, rank=rank: (
            f"{p['name']}: max {_short(p['value'])} ({_short(p['ratio'])}× median), {p['values']} values on {p['carriers']} tokens"
            if (p := (r["phenomena"][rank] if rank < len(r["phenomena"]) else None)) else ""
        ))
    add("blind spots", lambda r: "; ".join(sorted({f"{s['kind']} layer {s['layer']}" for s in r["blind_spots"]})[:4]) or "none")
    add("tokens carrying massive values", lambda r: ", ".join(
        f"{t['token']!r} {t['carriers']}/{t['occurrences']}" for t in r["tokens"][:4]))
    add("sink tokens after position 0 (> typical cutoff)", lambda r: ", ".join(
        f"{text!r} ×{count}" for text, count in r["sink_tokens"].items()) or "none")
    add("super weights", lambda r: "; ".join(
        f"layer {w['layer']} down_proj[{w['row']}, {w['col']}]" for w in r["super_weights"]) or "none")
    add("attention on the first token (per layer, mean over heads)", lambda r: _share(r["attention_first"]))
    add("attention on the other sink tokens", lambda r: _share(r["attention_other_sinks"]))
    add("excess kurtosis: max (layer), mean over layers", lambda r: (
        f"{_short(r['max_kurtosis'][0])} ({r['max_kurtosis'][1]}), {_short(r['mean_kurtosis'])}"))
    add("perplexity, unchanged", lambda r: format_cell(r["baseline_ppl"]))
    names = list(dict.fromkeys(row["name"] for r in results.values() for row in r["interventions"]))
    for name in names:
        add(f"Δppl {name}", lambda r, name=name: _intervention(r, name))
    spec = next(iter(results.values()))["quantized_spec"]
    for label in dict.fromkeys(row["name"] for r in results.values() for row in r["quantized"]):
        add(f"Δppl {spec} {label}", lambda r, label=label: _quantized(r, label))
    return rows


def _intervention(result: dict, name: str) -> str:
    row = next((row for row in result["interventions"] if row["name"] == name), None)
    if row is None:
        return ""
    if "skipped" in row:
        return "not massive on the calibration text"
    return f"{format_delta(row['delta_ppl'])} ({row['values_changed']} values; {row['where']})"


def _quantized(result: dict, label: str) -> str:
    row = next((row for row in result["quantized"] if row["name"] == label), None)
    if row is None:
        return ""
    massive = row["massive"]
    extra = f"; kept {massive['kept_values']}" if "kept_values" in massive else ""
    extra += f"; {massive['values_changed']} changed at {massive['intervention']}" if massive.get("intervention") else ""
    return f"{format_delta(row['delta_ppl'])}{extra}"


def run(args) -> int:
    # Everything a user can get wrong is checked before any model loads.
    sink = common.ResultSink(args)
    names = model_names(args)
    configs = [ModelConfig(model=name) for name in names]
    for config in configs:
        config.validate()
        facts = model_facts(config)
        if facts is not None:
            architecture_of(facts.model)
    text = load_text(args.data)
    load_text(args.calib_data)
    common.seed_everything(args.seed)
    ppl_config = PerplexityConfig(data=args.data, seq_len=args.seq_len, max_tokens=args.max_tokens)
    ppl_config.validate()
    settings = AnalysisSettings(MassiveCriteria(), quantized=not args.no_quantized)
    payload = {
        "command": "across", "models": {}, "data": args.data, "n_seqs": args.n_seqs, "seq_len": args.seq_len,
        "max_tokens": args.max_tokens,
        "calibration": {"data": args.calib_data, "samples": args.calib_samples, "seq_len": args.calib_seq_len},
        "seed": args.seed, "environment": environment(),
    }
    results: dict[str, dict] = {}
    for name, config in zip(names, configs):
        print(f"massquant: {name}", file=sys.stderr)
        loaded = load_model(config)
        located = common.sampled_sequences(args, loaded, args.n_seqs, bos=loaded.tokenizer.bos_token_id is not None)
        windows = build_windows(loaded.tokenizer, text, ppl_config, max_sequence_length(loaded.model))
        calibration = calibration_batch(
            loaded.tokenizer, args.calib_data, args.calib_samples, args.calib_seq_len, args.seed,
            bos=windows.bos_token_id is not None,
        )
        result = analyze(loaded, located, windows, calibration, settings)
        if sink.directory is not None:
            directory = sink.directory / Path(name.rstrip("/")).name  # an alias, or a model directory's own name
            directory.mkdir(parents=True, exist_ok=True)
            result["plots"] = [str(path.relative_to(sink.directory)) for path in write_plots(result["locate"], directory)]
        results[name] = result
        payload["models"][name] = {"model": loaded.record(), **result}
        sink.save(payload)
        del loaded
    columns = {"metric": "", **{name: name for name in names}}
    payload["table"] = table_rows(results)
    sink.finish(payload, render(payload["table"], columns, args.table_format))
    return 0
