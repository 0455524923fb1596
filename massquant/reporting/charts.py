"""Charts of saved results (matplotlib figures from ``figures.new_figure``; the caller saves or embeds them)."""

from __future__ import annotations

import math
import re

from massquant.reporting.figures import SERIES_COLOURS, colour_of, integer_ticks, new_figure

LAYER_INDEX = re.compile(r"\.(\d+)\.")  # model.layers.12.mlp.down_proj -> 12
# Bars whose magnitudes span more than SPAN_FOR_LOG get a symmetric-log axis; values below NEGLIGIBLE x the
# largest count as zero there (a harmless 1e-6 next to 0.05 needs no log axis).
SPAN_FOR_LOG, NEGLIGIBLE = 100.0, 1e-4


def _finite(value) -> float:
    """A missing or non-finite value is drawn as a gap (NaN), never as a misleading zero."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else math.nan


def delta_bars(rows: list[dict], columns: dict[str, str], row_keys: list[str], title: str):
    """Horizontal bars, one group per table row and one bar per value column; the baseline is the zero line.

    ``title`` labels the value axis (with its unit). Values spanning more than two orders of magnitude (a broken
    configuration next to a harmless one) get a symmetric-log axis so that both stay readable.
    """
    series = [key for key in columns if key not in row_keys]
    labels = [" / ".join(str(row.get(key)) for key in row_keys) for row in rows]
    height = 0.8 / max(len(series), 1)
    figure, (axes,) = new_figure(8, 1.2 + 0.35 * len(rows) * max(len(series), 1) ** 0.5)
    magnitudes = []
    for index, key in enumerate(series):
        values = [_finite(row.get(key)) for row in rows]
        magnitudes += [abs(value) for value in values if value == value and value != 0]
        offsets = [position + (index - (len(series) - 1) / 2) * height for position in range(len(rows))]
        axes.barh(offsets, values, height=height, label=columns[key], color=colour_of(columns[key]) if len(series) > 1 else SERIES_COLOURS[0])
    axes.axvline(0, color="black", linewidth=0.8)
    visible = [value for value in magnitudes if magnitudes and value >= NEGLIGIBLE * max(magnitudes)]
    if visible and max(visible) / min(visible) > SPAN_FOR_LOG:
        axes.set_xscale("symlog", linthresh=min(visible))
        title += " (symmetric log scale)"
    axes.set_yticks(range(len(rows)), labels)
    axes.invert_yaxis()  # first row on top, as in the table
    axes.set_xlabel(title)
    if len(series) > 1:
        axes.legend(fontsize="small")
    axes.grid(axis="x", alpha=0.3)
    return figure


def interval_chart(entries: list[dict], value_label: str):
    """A forest plot: one line per entry (``label``, ``delta``, ``ci_low``, ``ci_high``, ``colour_key``), a dot at Δ
    and a bar over its interval; 0 (no change against the baseline) is the vertical line."""
    figure, (axes,) = new_figure(8, 1.2 + 0.32 * len(entries))
    for position, entry in enumerate(entries):
        colour = colour_of(entry["colour_key"])
        low, high, delta = _finite(entry.get("ci_low")), _finite(entry.get("ci_high")), _finite(entry.get("delta"))
        if low == low and high == high:
            axes.plot([low, high], [position, position], color=colour, linewidth=2)
        axes.plot([delta], [position], "o", color=colour)
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(entries)), [entry["label"] for entry in entries], fontsize="small")
    axes.invert_yaxis()
    axes.set_xlabel(value_label)
    axes.grid(axis="x", alpha=0.3)
    return figure


def sqnr_chart(rows: list[dict], spec: str):
    """Weight and activation SQNR (dB) of every quantized linear, per decoder layer, one line per projection
    (``massquant errors`` rows: ``layer`` is the module name); modules outside numbered layers are left out."""
    by_projection: dict[str, list[tuple[int, dict]]] = {}
    for row in rows:
        found = LAYER_INDEX.search(row["layer"])
        if found:
            projection = row["layer"][found.end():]
            by_projection.setdefault(projection, []).append((int(found.group(1)), row))
    figure, axes = new_figure(9, 7, rows=2)
    # projections by name, coloured in that order: every model with the same projections gets the same colours
    for (projection, points), colour in zip(sorted(by_projection.items()), SERIES_COLOURS * len(by_projection)):
        points.sort(key=lambda point: point[0])
        layers = [layer for layer, _ in points]
        for each, key in zip(axes, ("act_sqnr_db", "weight_sqnr_db")):
            each.plot(layers, [_finite(row.get(key)) for _, row in points], marker="o", markersize=3, label=projection, color=colour)
    axes[0].set_title(f"Quantization SQNR per layer ({spec}); lower is worse")
    axes[0].set_ylabel("activation SQNR (dB)")
    axes[1].set_ylabel("weight SQNR (dB)")
    axes[1].set_xlabel("layer (index of the decoder layer)")
    axes[0].legend(fontsize="x-small", ncol=2)
    for each in axes:
        each.grid(alpha=0.3)
        integer_ticks(each.xaxis)
    return figure


def training_curves(history: list[dict]):
    """Loss (nats per token), learning rate and gradient norm per optimizer step of ``massquant train``."""
    steps = [record["step"] for record in history]
    panels = [("loss", "training loss (nats/token)"), ("lr", "learning rate"), ("grad_norm", "gradient L2 norm (before clipping)")]
    panels = [(key, label) for key, label in panels if any(key in record for record in history)]
    figure, axes = new_figure(8, 2.2 * len(panels) + 0.6, rows=len(panels))
    for each, (key, label), colour in zip(axes, panels, SERIES_COLOURS):
        each.plot(steps, [_finite(record.get(key)) for record in history], color=colour, marker="o" if len(steps) < 40 else None, markersize=3)
        each.set_ylabel(label)
        each.grid(alpha=0.3)
        integer_ticks(each.xaxis)
    axes[0].set_title("Training")
    axes[-1].set_xlabel("optimizer step")
    return figure
