"""The figures of massive activations, drawn from ``massquant locate``'s saved results (the JSON and one layer's
activations), so that ``locate`` (PNG files) and ``massquant report`` (one page) draw the same pictures:

- ``magnitudes.png``: the 1st/2nd/3rd largest |a| and the median |a| per layer (Sun et al. 2024, fig. 2);
- ``heatmap-layer-N.png``: |a| of one layer, tokens x channels, on a log colour scale;
- ``magnitudes-3d-layer-N.png``: the same tokens and every channel as a 3-D surface (Sun et al. 2024, fig. 1);
- ``attention-sink.png``: attention probability on the first token per layer and head;
- ``outliers.png``: excess kurtosis, first-token vs other-token norm, and (when computed) matrix entropy per layer.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from massquant.errors import UserError
from massquant.reporting.figures import (
    ATTENTION_MAP, BASELINE_COLOUR, MAGNITUDE_MAP, SERIES_COLOURS, integer_ticks, new_figure, save_png,
)
from massquant.reporting.results import write_atomic

TOP_CURVES = ("largest", "2nd largest", "3rd largest")
MAGNITUDE = "|activation| (hidden-state units"  # completed with the scale: ", log scale)" or ")"
FIRST_TOKENS, STRONGEST_TOKENS = 8, 16  # rows of the heat map and the 3-D plot


def _number(value) -> float:
    """JSON stores NaN as null; a plot draws it as a gap."""
    return math.nan if value is None else float(value)


def plot_magnitudes(layers: list[int], top_means: list[list[float]], medians: list[float]):
    """``top_means[l][i]``: the (i+1)-th largest |a| of layer l, averaged over sequences. Returns the figure."""
    figure, (axes,) = new_figure(8, 4.5)
    for rank, (label, colour) in enumerate(zip(TOP_CURVES, SERIES_COLOURS)):
        values = [_number(top[rank]) if len(top) > rank else math.nan for top in top_means]
        axes.plot(layers, values, marker="o", markersize=3, label=label, color=colour)
    axes.plot(layers, [_number(value) for value in medians], marker="o", markersize=3, color=BASELINE_COLOUR, linestyle="--", label="median")
    axes.set_yscale("log")
    integer_ticks(axes.xaxis)
    axes.set_xlabel("layer (index of the decoder layer whose output is measured)")
    axes.set_ylabel(MAGNITUDE + ", log scale)")
    axes.set_title("Largest and median magnitudes of the residual stream")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    return figure


def shown_tokens(magnitudes: np.ndarray, first: int = FIRST_TOKENS, strongest: int = STRONGEST_TOKENS) -> list[int]:
    """Positions drawn from a [tokens, channels] |a| array: the ``first`` tokens and the ``strongest`` others.

    A few rows instead of every token keep a single massive value a visible cell rather than one pixel
    among hundreds of rows.
    """
    by_maximum = np.argsort(-magnitudes.max(axis=1), kind="stable")[:strongest].tolist()
    return sorted(set(range(min(first, magnitudes.shape[0]))) | set(by_maximum))


def plot_heatmap(values: np.ndarray, tokens: list[str], layer: int):
    """|a| of one layer's output ``values`` [tokens, channels] over channels, for the rows ``shown_tokens`` picks."""
    from matplotlib.colors import LogNorm

    magnitudes = np.abs(values.astype(np.float32))
    rows = shown_tokens(magnitudes)
    shown = magnitudes[rows]
    positive = shown[shown > 0]
    floor = max(float(np.quantile(positive, 0.01)) if positive.size else 1e-6, 1e-6)
    figure, (axes,) = new_figure(10, 1.5 + 0.22 * len(rows))
    image = axes.imshow(
        np.maximum(shown, floor), aspect="auto", interpolation="nearest", cmap=MAGNITUDE_MAP,
        norm=LogNorm(vmin=floor, vmax=max(float(shown.max()), floor * 10)),
    )
    axes.set_yticks(range(len(rows)), [f"{row} {tokens[row]!r}" for row in rows], fontsize="x-small")
    strongest_channels = sorted(np.argsort(-shown.max(axis=0), kind="stable")[:6].tolist())
    axes.set_xticks(strongest_channels, [str(channel) for channel in strongest_channels], fontsize="x-small", rotation=90)
    axes.set_xlabel("channel (index in the hidden state; ticks: the largest)")
    axes.set_ylabel("token (position, text)")
    axes.set_title(f"|activation| of layer {layer}'s output: the first {FIRST_TOKENS} tokens and the {STRONGEST_TOKENS} with the largest values")
    figure.colorbar(image, ax=axes, label=MAGNITUDE + ", log scale)")
    return figure


def plot_magnitudes_3d(values: np.ndarray, tokens: list[str], layer: int):
    """Sun et al.'s picture: |a| of one layer over tokens x channels as a surface; the same rows as the heat map."""
    magnitudes = np.abs(values.astype(np.float32))
    rows = shown_tokens(magnitudes)
    channels = np.arange(magnitudes.shape[1])
    grid_channels, grid_rows = np.meshgrid(channels, np.arange(len(rows)))
    figure, (axes,) = new_figure(9, 6, projection="3d")
    axes.plot_surface(grid_channels, grid_rows, magnitudes[rows], cmap=MAGNITUDE_MAP, rstride=1, cstride=1, linewidth=0, antialiased=False)
    step = max(1, len(rows) // 8)
    axes.set_yticks(range(0, len(rows), step), [str(rows[index]) for index in range(0, len(rows), step)], fontsize="x-small")
    axes.set_xlabel("channel (index)")
    axes.set_ylabel("token (position)")
    axes.set_zlabel(MAGNITUDE + ")")
    axes.set_title(f"|activation| of layer {layer}'s output: the heat map's {len(rows)} tokens x every channel")
    axes.view_init(elev=25, azim=-60)
    return figure


def plot_attention_sink(share: list[list[float]]):
    """``share[layer][head]``: attention probability on key 0, averaged over queries."""
    figure, (axes,) = new_figure(max(5.0, 1.5 + 0.5 * len(share[0])), max(4.0, 1.0 + 0.18 * len(share)))
    image = axes.imshow(share, aspect="auto", interpolation="nearest", cmap=ATTENTION_MAP, vmin=0.0, vmax=1.0)
    integer_ticks(axes.xaxis)
    integer_ticks(axes.yaxis)
    axes.set_xlabel("head (index)")
    axes.set_ylabel("layer (index)")
    axes.set_title("Attention on the first token (mean over queries)")
    figure.colorbar(image, ax=axes, label="attention probability (0-1)")
    return figure


def plot_outlier_statistics(layers: list[int], kurtosis: list[float], first_norms: list[float], token_norms: list[float], entropy: list[float]):
    entropy = [_number(value) for value in entropy]
    with_entropy = any(math.isfinite(value) for value in entropy)
    figure, axes = new_figure(8, 8 if with_entropy else 5.5, rows=3 if with_entropy else 2)
    axes[0].plot(layers, [_number(value) for value in kurtosis], marker="o", markersize=3, color=SERIES_COLOURS[0])
    axes[0].set_yscale("symlog")
    axes[0].set_ylabel("excess kurtosis (dimensionless)")
    axes[1].plot(layers, [_number(value) for value in first_norms], marker="o", markersize=3, label="first token", color=SERIES_COLOURS[0])
    axes[1].plot(layers, [_number(value) for value in token_norms], marker="o", markersize=3, label="other tokens (median)", color=SERIES_COLOURS[1])
    axes[1].set_yscale("log")
    axes[1].set_ylabel("hidden-state L2 norm (log)")
    axes[1].legend(fontsize="small")
    if with_entropy:
        axes[2].plot(layers, entropy, marker="o", markersize=3, color=SERIES_COLOURS[0])
        axes[2].set_ylabel("matrix entropy (nats)")
    axes[-1].set_xlabel("layer (index)")
    axes[0].set_title("Outlier statistics of the residual stream")
    for each in axes:
        each.grid(alpha=0.3)
        integer_ticks(each.xaxis)
    return figure


# ---- one layer's activations, saved beside results.json --------------------------------------------


def activations_file(layer: int) -> str:
    return f"activations-layer-{layer}.npz"


def save_activations(directory: str | Path, layer: int, values: np.ndarray, tokens: list[str]) -> Path:
    """One sequence's output of ``layer``: ``values`` [tokens, channels] float32 and the tokens' texts, as a
    compressed ``.npz`` (written atomically), so the heat map and 3-D plot can be drawn again later."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, values=np.asarray(values, dtype=np.float32), tokens=np.array(tokens, dtype=str))
    return write_atomic(Path(directory) / activations_file(layer), buffer.getvalue())


def load_activations(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """``(values [tokens, channels], token texts)`` of ``save_activations``; UserError when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return saved["values"], saved["tokens"].tolist()
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"cannot read saved activations '{path}': {error}") from None


# ---- every figure of one locate result -------------------------------------------------------------


def locate_figures(payload: dict, activations: tuple[int, np.ndarray, list[str]] | None = None) -> dict[str, object]:
    """File name -> figure for every figure a ``massquant locate`` results dict supports;
    ``activations`` = (layer, its [tokens, channels] output for one sequence, token texts)."""
    layers = payload["layers"]
    numbers = [stats["layer"] for stats in layers]
    figures = {"magnitudes.png": plot_magnitudes(numbers, [stats["top_means"] for stats in layers], [stats["median"] for stats in layers])}
    if activations is not None:
        layer, values, tokens = activations
        figures[f"magnitudes-3d-layer-{layer}.png"] = plot_magnitudes_3d(values, tokens, layer)
        figures[f"heatmap-layer-{layer}.png"] = plot_heatmap(values, tokens, layer)
    if payload.get("attention_sink") is not None:
        figures["attention-sink.png"] = plot_attention_sink(payload["attention_sink"])
    figures["outliers.png"] = plot_outlier_statistics(
        numbers, [stats["kurtosis"] for stats in layers], [stats["first_token_norm"] for stats in layers],
        [stats["token_norm"] for stats in layers], [stats["entropy"] for stats in layers],
    )
    return figures


def write_plots(payload: dict, directory: str | Path, activations: tuple[int, np.ndarray, list[str]] | None = None) -> list[Path]:
    """``locate_figures`` as PNG files in ``directory``."""
    return [save_png(figure, Path(directory) / name) for name, figure in locate_figures(payload, activations).items()]
