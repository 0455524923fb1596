"""Where a quantized row's loss comes from: the NLL increase split by token class, and per-layer sensitivity.

**Token classes.** The NLL of target ``t + 1`` is computed from the hidden state at input position ``t``, so a
scored prediction is classed by the position that makes it (the token whose activations quantization perturbs):

- ``first``: position 0 (BOS when the window starts with it);
- ``massive``: any other position that carries a massive activation in some decoder layer of the unquantized
  model (``massquant.massive.locate``'s sites on the same windows);
- ``delimiter``: punctuation, whitespace-only or newline tokens (``massquant.massive.phenomena.is_delimiter``);
- ``other``: everything else.

The classes partition the scored predictions (first has priority, then massive, then delimiter), so the classes'
ΔNLL sums to the row's total ΔNLL. Perplexity is exp(mean NLL), a monotone function of the summed NLL: each
class's share of Δppl is its share of ΔNLL (``delta_ppl_share`` = Δppl x share, which sums to Δppl), and
``isolated_delta_ppl`` says what the perplexity change would be if only that class's predictions had changed.

**Per-layer scan.** The spec restricted (``QuantSpec.include``, as ``eval --include``) to one decoder layer, or to
one projection type in every layer, at a time; each row's Δppl against full precision.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import torch

from massquant.errors import UserError
from massquant.massive.phenomena import is_delimiter
from massquant.models.architectures import decoder_layers

CLASSES = ("first", "massive", "delimiter", "other")
SCAN_UNITS = ("layer", "projection")


# ---- token classes and shares (pure) -----------------------------------------------------------------------


def position_classes(token_texts: list[list[str | None]], carriers: set[tuple[int, int]]) -> np.ndarray:
    """[windows, length] int: index into ``CLASSES`` of every input position.

    ``token_texts[w][p]``: the text of token p of window w; ``carriers``: (window, position) pairs that carry a
    massive activation. Priority first > massive > delimiter > other, so every position has exactly one class.
    """
    classes = np.empty((len(token_texts), len(token_texts[0]) if token_texts else 0), dtype=np.int64)
    for window, texts in enumerate(token_texts):
        for position, text in enumerate(texts):
            if position == 0:
                name = "first"
            elif (window, position) in carriers:
                name = "massive"
            else:
                name = "delimiter" if is_delimiter(text) else "other"
            classes[window, position] = CLASSES.index(name)
    return classes


def class_shares(baseline: torch.Tensor, quantized: torch.Tensor, scored: torch.Tensor, classes: np.ndarray) -> dict:
    """The NLL increase of ``quantized`` over ``baseline`` summed per class, with each class's share.

    ``baseline``, ``quantized``: [windows, length - 1] NLL (nats) of the target at input position 1.. (as
    ``window_token_nll`` returns them); ``scored``: the same shape, bool; ``classes``: [windows, length] from
    ``position_classes`` (the prediction of target t + 1 is classed by position t).

    Returns ``total`` (tokens, baseline and quantized mean NLL and perplexity, ``delta_nll`` summed in nats,
    ``delta_ppl``) and ``classes``: per class ``tokens``, ``delta_nll`` (summed), ``mean_delta_nll`` (per token),
    ``share`` (of the total ΔNLL), ``delta_ppl_share`` (share x Δppl) and ``isolated_delta_ppl``. Shares are
    NaN when the total ΔNLL is 0 or not finite.
    """
    if baseline.shape != quantized.shape or baseline.shape != scored.shape or classes.shape[1] != baseline.shape[1] + 1:
        raise ValueError(f"shapes disagree: baseline {tuple(baseline.shape)}, quantized {tuple(quantized.shape)}, "
                         f"scored {tuple(scored.shape)}, classes {classes.shape}")
    predicted_by = torch.from_numpy(classes[:, :-1])
    delta = (quantized - baseline).double()
    tokens = int(scored.sum())
    base_mean = float(baseline[scored].double().sum()) / tokens
    total_delta = float(delta[scored].sum())
    base_ppl = math.exp(base_mean)
    quant_ppl = math.exp(base_mean + total_delta / tokens) if math.isfinite(total_delta) else math.nan
    delta_ppl = quant_ppl - base_ppl
    usable = math.isfinite(total_delta) and total_delta != 0
    rows = []
    for index, name in enumerate(CLASSES):
        members = scored & (predicted_by == index)
        count = int(members.sum())
        summed = float(delta[members].sum())
        share = summed / total_delta if usable else math.nan
        rows.append({
            "class": name,
            "tokens": count,
            "delta_nll": summed,
            "mean_delta_nll": summed / count if count else math.nan,
            "share": share,
            "delta_ppl_share": share * delta_ppl,
            "isolated_delta_ppl": math.exp(base_mean + summed / tokens) - base_ppl if math.isfinite(summed) else math.nan,
        })
    return {
        "total": {"tokens": tokens, "baseline_mean_nll": base_mean, "baseline_ppl": base_ppl, "ppl": quant_ppl,
                  "delta_nll": total_delta, "delta_ppl": delta_ppl},
        "classes": rows,
    }


# ---- which linears one scan row quantizes ------------------------------------------------------------------


def scan_units(model, spec, unit: str) -> list[tuple[str, tuple[str, ...]]]:
    """(label, include regexes) per scan row: one per decoder layer (``layer``) or per projection type (``projection``).

    The regexes are ``QuantSpec.include`` patterns (``re.search`` on dotted module names, like ``eval
    --include``), built from the names of the linears ``spec`` selects, so they follow the model's own layout
    (``mlp.down_proj.linear`` under the hadamard rotation counts as ``mlp.down_proj``).
    """
    from massquant.wrapping.selection import select_linears
    from massquant.wrapping.quantize import QUANTIZABLE_TYPES

    if unit not in SCAN_UNITS:
        raise UserError(f"unknown scan unit '{unit}'; accepted: {', '.join(SCAN_UNITS)}")
    if spec.kv_cache is not None:
        raise UserError(
            f"spec '{spec.name}' quantizes the KV cache, which --include does not restrict (every layer's cache "
            "would be quantized in every row); scan a spec without a kv part"
        )
    names = {id(module): name for name, module in model.named_modules()}
    prefixes = [names[id(layer)] + "." for layer in decoder_layers(model)]
    selected = [name for name, _ in select_linears(model, spec, QUANTIZABLE_TYPES)]
    if unit == "layer":
        return [
            (f"layer {index}", ("^" + re.escape(prefix),))
            for index, prefix in enumerate(prefixes) if any(name.startswith(prefix) for name in selected)
        ]
    kinds: dict[str, None] = {}
    for name in selected:
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is not None:
            kinds[name[len(prefix):].removesuffix(".linear")] = None
    layer_pattern = "|".join(re.escape(prefix) for prefix in prefixes)
    return [(kind, (f"^(?:{layer_pattern}){re.escape(kind)}(?:\\.linear)?$",)) for kind in kinds]


def restricted(spec, include: tuple[str, ...]):
    """``spec`` quantizing only the linears matching ``include`` (its own include/exclude still apply after)."""
    if spec.include:
        raise UserError(f"spec '{spec.name}' already has --include; the scan sets include itself (use --exclude to narrow it)")
    return replace(spec, include=include)


# ---- the loops: per-token NLL of each row, carriers from locate, the scan -----------------------------------


def massive_carriers(model, windows, tokenizer, criteria) -> set[tuple[int, int]]:
    """(window, position) pairs with a massive activation in any decoder layer's output (locate's sites)."""
    from massquant.massive.locate import locate
    from massquant.massive.report import LocateConfig

    report = locate(model, windows.input_ids, LocateConfig(criteria=criteria), tokenizer=tokenizer)
    return {(site.sequence, site.position) for site in report.massive.sites}


def token_texts(tokenizer, input_ids: torch.Tensor) -> list[list[str]]:
    """Each window's tokens as text (one decode per token id, as locate shows them)."""
    texts = {token_id: tokenizer.decode([token_id]) for token_id in set(input_ids.reshape(-1).tolist())}
    return [[texts[token_id] for token_id in row] for row in input_ids.tolist()]


def variant_token_nll(loaded, variant, windows, calibration, batch_size: int = 1) -> torch.Tensor:
    """``window_token_nll`` with ``variant`` applied (undone afterwards)."""
    from massquant.evaluation.perplexity import window_token_nll
    from massquant.variants import apply_variant

    applied = apply_variant(loaded, variant, calibration)
    try:
        return window_token_nll(applied.model, windows, batch_size, description=variant.name)
    finally:
        applied.undo()


def attribute(loaded, variants, windows, calibration, criteria, batch_size: int = 1, on_row=None) -> dict:
    """Per variant (after the unquantized baseline), ``class_shares`` against the baseline; carriers from ``criteria``."""
    from massquant.evaluation.perplexity import scored_mask
    from massquant.variants import Variant

    baseline = variant_token_nll(loaded, Variant(), windows, calibration, batch_size)
    carriers = massive_carriers(loaded.model, windows, loaded.tokenizer, criteria)
    classes = position_classes(token_texts(loaded.tokenizer, windows.input_ids), carriers)
    scored = scored_mask(windows)
    rows = []
    for variant in variants:
        if variant.is_baseline:
            continue
        shares = class_shares(baseline, variant_token_nll(loaded, variant, windows, calibration, batch_size), scored, classes)
        rows.append({"config": variant.name, **variant.describe(), **shares})
        if on_row:
            on_row(rows)
    return {"carriers": len(carriers), "rows": rows}


def layer_scan(loaded, variant, windows, calibration, unit: str, batch_size: int = 1, baseline_ppl: float | None = None, on_row=None) -> list[dict]:
    """One row per scan unit: ``variant`` with its spec restricted to that unit, evaluated as ``eval`` does
    (``massquant.evaluation.runner.evaluate_variant``); ``delta_ppl`` against ``baseline_ppl``."""
    from tqdm.auto import tqdm

    from massquant.evaluation.runner import evaluate_variant

    rows = []
    for label, include in tqdm(scan_units(loaded.model, variant.spec, unit), desc=f"scan {variant.name} by {unit}", unit=unit):
        row = evaluate_variant(loaded, replace(variant, spec=restricted(variant.spec, include)), windows, calibration, batch_size)
        row.update(unit=label, include=list(include), scanned=variant.name)
        if baseline_ppl is not None:
            row["delta_ppl"] = row["ppl"] - baseline_ppl
        rows.append(row)
        if on_row:
            on_row(rows)
    return rows


# ---- figures ------------------------------------------------------------------------------------------------


def plot_class_shares(rows: list[dict]):
    """Stacked bars: each row's ΔNLL share per token class (percent)."""
    from massquant.reporting.figures import SERIES_COLOURS, new_figure

    figure, (axes,) = new_figure(max(5.0, 1.5 + 1.2 * len(rows)), 4.5)
    bottoms = np.zeros(len(rows))
    for index, name in enumerate(CLASSES):
        shares = np.array([100 * next(c["share"] for c in row["classes"] if c["class"] == name) for row in rows])
        axes.bar([row["config"] for row in rows], shares, bottom=bottoms, label=name, color=SERIES_COLOURS[index])
        bottoms += np.nan_to_num(shares)
    axes.set_ylabel("share of the NLL increase (%)")
    axes.set_title("Where the quantization loss comes from, by token class")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3, axis="y")
    return figure


def plot_scan(rows: list[dict]):
    """Δppl per scan unit, one series per scanned configuration."""
    from massquant.reporting.figures import new_figure, colour_of

    figure, (axes,) = new_figure(max(6.0, 0.3 * len(rows)), 4.5)
    for name in dict.fromkeys(row["scanned"] for row in rows):
        own = [row for row in rows if row["scanned"] == name]
        axes.plot([row["unit"] for row in own], [row["delta_ppl"] for row in own], marker="o", label=name, color=colour_of(name))
    axes.set_ylabel("Δppl (quantizing only this unit)")
    axes.set_yscale("symlog", linthresh=0.01)
    axes.tick_params(axis="x", labelrotation=90)
    axes.set_title("Sensitivity: one unit quantized at a time")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return figure
