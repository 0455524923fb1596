"""``massquant analyze attribution|layers|rotations|valley``: analyses of one loaded model on perplexity windows."""

from __future__ import annotations

from massquant import options
from massquant.cli import common
from massquant.cli.analyze import load_with_windows, tables_text, write_figures
from massquant.errors import UserError
from massquant.options import settings

ATTRIBUTION_COLUMNS = {
    "config": "config",
    "class": "token class",
    "tokens": "tokens",
    "delta_nll": "ΔNLL (nats, summed)",
    "mean_delta_nll": "ΔNLL / token",
    "share_percent": "share %",
    "delta_ppl_share": "Δppl share",
    "isolated_delta_ppl": "Δppl if only this class",
}
SCAN_COLUMNS = {"scanned": "config", "unit": "quantized", "ppl": "perplexity", "delta_ppl": "Δppl", "share_percent": "% of full Δppl"}
ROTATION_COLUMNS = {"rotation": "rotation", "sqnr_massive": "SQNR massive tokens (dB)", "sqnr_other": "SQNR other tokens (dB)"}
VALLEY_COLUMNS = {
    "layer": "layer", "von_neumann": "von Neumann entropy (nats)", "renyi2": "Rényi-2 entropy (nats)",
    "first_token_norm": "‖first token‖", "token_norm": "‖other tokens‖ (median)",
}
DEFAULT_ROTATION_SPECS = ("w4a4", "w8a8", "kv4")


def add_arguments(name: str, parser) -> None:
    groups = ["model", "text"] + (["quantization", "calibration"] if name != "valley" else [])
    groups += ["massive", "mitigation"] if name in ("attribution", "layers") else []
    options.add_arguments(parser, *groups, "run", skip=("n_seqs",))
    if name == "rotations":  # massive tokens of the error split: the criterion's threshold and ratio only
        options.add_arguments(parser, "massive", only=("massive_threshold", "massive_ratio"))
    if name == "layers":
        parser.add_argument("--unit", default="layer", choices=["layer", "projection"],
                            help="quantize one decoder layer, or one projection type in every layer, at a time (default: layer)")
    if name == "rotations":
        group = parser.add_argument_group("rotations")
        group.add_argument("--kinds", default="hadamard,orthogonal,identity", help="rotation kinds of the hadamard mitigation, comma-separated (default: all three)")
        group.add_argument("--seeds", default="0", help="rotation seeds, comma-separated; identity runs once (default: 0)")
        group.add_argument("--error-spec", default="a4", help="activation quantizer of the error measurement (default: a4, per-token int4)")
    common.add_output_arguments(parser)


def run(args) -> int:
    return {"attribution": run_attribution, "layers": run_layers, "rotations": run_rotations, "valley": run_valley}[args.analysis](args)


def _quantized_variants(args):
    specs = settings.quant_specs(args)
    if not specs:
        raise UserError(f"analyze {args.analysis} needs a quantization spec (--spec, e.g. --spec w8a8-tensor)")
    return [variant for variant in settings.variants(args) if not variant.is_baseline]


def run_attribution(args) -> int:
    from massquant.analysis.attribution import attribute, plot_class_shares

    sink = common.ResultSink(args)
    variants = _quantized_variants(args)
    criteria = settings.massive_criteria(args)
    loaded, windows, calibration, payload = load_with_windows(args, variants)
    payload["criteria"] = vars(criteria)

    def save(rows):
        payload["rows"] = rows
        sink.save(payload)

    result = attribute(loaded, variants, windows, calibration, criteria, args.batch_size, on_row=save)
    payload.update(carriers=result["carriers"], rows=result["rows"])
    table = []
    for row in result["rows"]:
        for entry in row["classes"]:
            table.append({"config": row["config"], **entry, "share_percent": 100 * entry["share"]})
        total = row["total"]
        table.append({"config": row["config"], "class": "total", "tokens": total["tokens"], "delta_nll": total["delta_nll"],
                      "mean_delta_nll": total["delta_nll"] / total["tokens"], "share_percent": 100.0,
                      "delta_ppl_share": total["delta_ppl"], "isolated_delta_ppl": total["delta_ppl"]})
    payload["figures"] = [str(path) for path in write_figures(sink, {"attribution.png": plot_class_shares(result["rows"])})]
    sink.finish(payload, tables_text((table, ATTRIBUTION_COLUMNS), table_format=args.table_format))
    return 0


def run_layers(args) -> int:
    from massquant.analysis.attribution import layer_scan, plot_scan, scan_units
    from massquant.evaluation.runner import evaluate_variant
    from massquant.variants import Variant

    sink = common.ResultSink(args)
    variants = _quantized_variants(args)
    for variant in variants:
        if variant.spec.include:
            raise UserError("analyze layers sets --include itself, one unit at a time; use --exclude to narrow the scan")
    loaded, windows, calibration, payload = load_with_windows(args, variants)
    for variant in variants:
        scan_units(loaded.model, variant.spec, args.unit)  # a KV spec is refused before any forward
    baseline = evaluate_variant(loaded, Variant(), windows, calibration, args.batch_size)
    payload.update(baseline=baseline, unit=args.unit, full=[], rows=[])
    for variant in variants:
        full = evaluate_variant(loaded, variant, windows, calibration, args.batch_size)
        full["delta_ppl"] = full["ppl"] - baseline["ppl"]
        payload["full"].append(full)
        done = list(payload["rows"])

        def save(rows, done=done):
            payload["rows"] = done + rows
            sink.save(payload)

        rows = layer_scan(loaded, variant, windows, calibration, args.unit, args.batch_size, baseline["ppl"], on_row=save)
        for row in rows:
            row["share_percent"] = 100 * row["delta_ppl"] / full["delta_ppl"] if full["delta_ppl"] else None
        rows.append({"scanned": variant.name, "unit": "all (the full spec)", "ppl": full["ppl"], "delta_ppl": full["delta_ppl"],
                     "share_percent": 100.0})
        payload["rows"] = done + rows
    payload["figures"] = [str(path) for path in write_figures(sink, {"layers.png": plot_scan([r for r in payload["rows"] if "include" in r])})]
    sink.finish(payload, tables_text((payload["rows"], SCAN_COLUMNS), table_format=args.table_format))
    return 0


def run_rotations(args) -> int:
    from massquant.analysis.attribution import massive_carriers
    from massquant.analysis.rotations import compare_rotations, kind_summary, plot_rotations, with_activation_part
    from massquant.mitigations.hadamard import ROTATION_KINDS

    sink = common.ResultSink(args)
    if not args.spec and not any((args.bits, args.act_bits, args.kv_bits)):
        args.spec = list(DEFAULT_ROTATION_SPECS)
    specs = settings.quant_specs(args)
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in ROTATION_KINDS]
    if unknown or not kinds:
        raise UserError(f"--kinds: unknown rotation {', '.join(unknown) or '(none given)'}; accepted: {', '.join(ROTATION_KINDS)}")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError:
        raise UserError(f"--seeds expects comma-separated integers, got '{args.seeds}'") from None
    if not seeds or min(seeds) < 0:
        raise UserError(f"--seeds expects non-negative integers, got '{args.seeds}'")
    error_part = with_activation_part(args.error_spec)
    criteria = settings.massive_criteria(args)
    from massquant.variants import Variant

    loaded, windows, calibration, payload = load_with_windows(args, [Variant(spec) for spec in specs])
    carriers = massive_carriers(loaded.model, windows, loaded.tokenizer, criteria)

    def save(rows):
        payload["rows"] = rows
        sink.save(payload)

    result = compare_rotations(loaded, windows, calibration, kinds, seeds, specs, error_part, carriers, args.batch_size, on_row=save)
    names = [spec.name for spec in specs]
    payload.update(result, carriers=len(carriers), error_spec=error_part.label("a"), summary=kind_summary(result["rows"], names))
    columns = {**ROTATION_COLUMNS, **{f"delta_{name}": f"Δppl {name}" for name in names}}
    table = [{"rotation": row["rotation"], "sqnr_massive": row["errors"]["sqnr_db"]["massive"], "sqnr_other": row["errors"]["sqnr_db"]["other"],
              **{f"delta_{name}": row["delta_ppl"][name] for name in names}} for row in result["rows"]]
    payload["figures"] = [str(path) for path in write_figures(sink, {"rotations.png": plot_rotations(result["rows"], names)})]
    sink.finish(payload, tables_text((table, columns), by_linear_table(result["rows"]), table_format=args.table_format))
    return 0


def by_linear_table(rows: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """SQNR per linear kind, "massive / other tokens" (dB): the residual stream's readers (q/k/v, gate/up) see the
    rotation kind, o_proj and down_proj inputs the per-head and online Hadamard that every kind shares."""
    kinds = list(rows[0]["errors"]["by_linear"]) if rows else []
    table = [{"rotation": row["rotation"], **{kind: f"{row['errors']['by_linear'][kind]['massive']:.2f} / "
                                                    f"{row['errors']['by_linear'][kind]['other']:.2f}" for kind in kinds}}
             for row in rows]
    return table, {"rotation": "SQNR dB (massive / other tokens) at the input of", **{kind: kind for kind in kinds}}


def run_valley(args) -> int:
    from massquant.analysis.valley import compression_valley, plot_valley

    sink = common.ResultSink(args)
    loaded, windows, _, payload = load_with_windows(args, [])
    result = compression_valley(loaded.model, windows.input_ids)
    payload.update(result)
    correlation = result["correlation"]
    payload["figures"] = [str(path) for path in write_figures(sink, {"valley.png": plot_valley(result)})]
    summary = [{"measure": f"{name} vs log ‖first token‖", "pearson": values["pearson"], "spearman": values["spearman"]}
               for name, values in correlation.items()]
    sink.finish(payload, tables_text((result["layers"], VALLEY_COLUMNS),
                                     (summary, {"measure": "correlation across layers", "pearson": "Pearson r", "spearman": "Spearman ρ"}),
                                     table_format=args.table_format))
    return 0
