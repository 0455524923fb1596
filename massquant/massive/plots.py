"""The figures ``massquant locate`` writes (PNG through matplotlib's Agg canvas; no display, no pyplot state).

- ``magnitudes.png``: the 1st/2nd/3rd largest |a| and the median |a| per layer (Sun et al. 2024, fig. 2);
- ``heatmap-layer-N.png``: |a| of one layer, tokens x channels, on a log colour scale;
- ``attention-sink.png``: attention probability on the first token per layer and head;
- ``outliers.png``: excess kurtosis, first-token vs other-token norm, and (when computed) matrix entropy per layer.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor

from massquant.reporting.results import writing

TOP_CURVES = ("largest", "2nd largest", "3rd largest")


def _figure(width: float, height: float, rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
    return figure, axes


def _save(figure, path: str | Path) -> Path:
    figure.tight_layout()
    with writing(path) as path:
        figure.savefig(path, dpi=120)
    return path


def plot_magnitudes(layers: list[int], top_means: list[list[float]], medians: list[float], path: str | Path) -> Path:
    """``top_means[l][i]``: the (i+1)-th largest |a| of layer l, averaged over sequences."""
    figure, (axes,) = _figure(8, 4.5)
    for rank, label in enumerate(TOP_CURVES):
        values = [top[rank] if len(top) > rank else math.nan for top in top_means]
        axes.plot(layers, values, marker="o", markersize=3, label=label)
    axes.plot(layers, medians, marker="o", markersize=3, color="black", linestyle="--", label="median")
    axes.set_yscale("log")
    axes.set_xlabel("layer (decoder layer output)")
    axes.set_ylabel("|activation|")
    axes.set_title("Largest and median magnitudes of the residual stream")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_heatmap(
    magnitudes: Tensor, tokens: list[str], layer: int, path: str | Path, first: int = 8, strongest: int = 16
) -> Path:
    """|a| of one layer's output over channels, for the ``first`` tokens and the ``strongest`` others.

    A few rows instead of every token keep a single massive value a visible
    cell rather than one pixel among hundreds of rows.
    """
    from matplotlib.colors import LogNorm

    magnitudes = magnitudes.abs().float()
    by_maximum = magnitudes.amax(dim=1).topk(min(strongest, magnitudes.shape[0])).indices.tolist()
    rows = sorted(set(range(min(first, magnitudes.shape[0]))) | set(by_maximum))
    shown = magnitudes[rows]
    positive = shown[shown > 0]
    floor = max(float(positive.quantile(0.01)) if positive.numel() else 1e-6, 1e-6)
    figure, (axes,) = _figure(10, 1.5 + 0.22 * len(rows))
    image = axes.imshow(
        shown.clamp_min(floor).numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
        norm=LogNorm(vmin=floor, vmax=max(float(shown.max()), floor * 10)),
    )
    axes.set_yticks(range(len(rows)), [f"{row} {tokens[row]!r}" for row in rows], fontsize="x-small")
    strongest_channels = sorted(shown.amax(dim=0).topk(min(6, shown.shape[1])).indices.tolist())
    axes.set_xticks(strongest_channels, [str(channel) for channel in strongest_channels], fontsize="x-small", rotation=90)
    axes.set_xlabel("channel (ticks: the largest)")
    axes.set_ylabel("token (position, text)")
    axes.set_title(f"|activation| of layer {layer}'s output: the first {first} tokens and the {strongest} with the largest values")
    figure.colorbar(image, ax=axes, label="|activation| (log)")
    return _save(figure, path)


def plot_attention_sink(share: list[list[float]], path: str | Path) -> Path:
    """``share[layer][head]``: attention probability on key 0, averaged over queries."""
    figure, (axes,) = _figure(max(5.0, 1.5 + 0.5 * len(share[0])), max(4.0, 1.0 + 0.18 * len(share)))
    image = axes.imshow(share, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0, vmax=1.0)
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title("Attention on the first token (mean over queries)")
    figure.colorbar(image, ax=axes, label="attention probability")
    return _save(figure, path)


def plot_outlier_statistics(
    layers: list[int], kurtosis: list[float], first_norms: list[float], token_norms: list[float],
    entropy: list[float], path: str | Path,
) -> Path:
    with_entropy = any(math.isfinite(value) for value in entropy)
    figure, axes = _figure(8, 8 if with_entropy else 5.5, rows=3 if with_entropy else 2)
    axes[0].plot(layers, kurtosis, marker="o", markersize=3)
    axes[0].set_yscale("symlog")
    axes[0].set_ylabel("excess kurtosis")
    axes[1].plot(layers, first_norms, marker="o", markersize=3, label="first token")
    axes[1].plot(layers, token_norms, marker="o", markersize=3, label="other tokens (median)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("hidden-state norm")
    axes[1].legend(fontsize="small")
    if with_entropy:
        axes[2].plot(layers, entropy, marker="o", markersize=3)
        axes[2].set_ylabel("matrix entropy (nats)")
    axes[-1].set_xlabel("layer")
    axes[0].set_title("Outlier statistics of the residual stream")
    for each in axes:
        each.grid(alpha=0.3)
    return _save(figure, path)


def write_plots(report, directory: str | Path, heatmap: tuple[int, Tensor, list[str]] | None = None) -> list[Path]:
    """Every figure a ``LocateReport`` supports; ``heatmap`` = (layer, its [tokens, channels] output, token texts)."""
    directory = Path(directory)
    layers = [stats.layer for stats in report.layers]
    paths = [
        plot_magnitudes(layers, [stats.top_means for stats in report.layers], [stats.median for stats in report.layers], directory / "magnitudes.png"),
        plot_outlier_statistics(
            layers, [stats.kurtosis for stats in report.layers], [stats.first_token_norm for stats in report.layers],
            [stats.token_norm for stats in report.layers], [stats.entropy for stats in report.layers],
            directory / "outliers.png",
        ),
    ]
    if heatmap is not None:
        layer, magnitudes, tokens = heatmap
        paths.append(plot_heatmap(magnitudes, tokens, layer, directory / f"heatmap-layer-{layer}.png"))
    if report.attention_sink is not None:
        paths.append(plot_attention_sink(report.attention_sink, directory / "attention-sink.png"))
    return paths
