"""Matplotlib figures without pyplot state (an Agg canvas each, so no display and no global figure list): one way
to make them, save them as PNG files or embed them in a page, and one palette, so that a configuration has the same
colour in every chart of every report.
"""

from __future__ import annotations

import base64
import io
import zlib
from pathlib import Path

from massquant.reporting.results import write_atomic

# matplotlib's tab10, by hex code so a page's CSS can use the same colours
SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
BASELINE_COLOUR = "#000000"
MAGNITUDE_MAP = "viridis"  # |activation| heat maps and the 3-D plot
ATTENTION_MAP = "magma"  # attention probabilities
DELTA_MAP = "RdYlGn_r"  # cost of quantization: green = free, red = broken
PNG_DPI = 110


def new_figure(width: float, height: float, rows: int = 1, columns: int = 1, projection: str | None = None):
    """A figure of ``width`` x ``height`` inches and its axes as a flat list (``rows`` x ``columns``, row-major)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False, subplot_kw={"projection": projection} if projection else None)
    return figure, list(axes.flat)


def png_bytes(figure, dpi: int = PNG_DPI) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_png(figure, path: str | Path, dpi: int = PNG_DPI) -> Path:
    """Written atomically, like every result file."""
    return write_atomic(path, png_bytes(figure, dpi))


def png_data_uri(figure_or_png, dpi: int = PNG_DPI) -> str:
    """A figure (or PNG bytes) as a ``data:image/png;base64,...`` URI: a page that embeds it needs no other file."""
    png = figure_or_png if isinstance(figure_or_png, bytes) else png_bytes(figure_or_png, dpi)
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def integer_ticks(axis) -> None:
    """Only whole numbers on ``axis`` (layers, heads, steps are counted, not measured)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def colour_of(label: str) -> str:
    """The same colour for the same label in every chart: the baseline black, others by a hash of the name."""
    if label in ("fp", "fp32", "unchanged", "baseline"):
        return BASELINE_COLOUR
    return SERIES_COLOURS[zlib.crc32(label.encode("utf-8")) % len(SERIES_COLOURS)]


def scaled_colour(fraction: float, colour_map: str = DELTA_MAP) -> tuple[str, str]:
    """Background (hex) for ``fraction`` in [0, 1] of ``colour_map``, and black or white text, whichever reads on it."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    red, green, blue, _ = colormaps[colour_map](min(max(fraction, 0.0), 1.0))
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return to_hex((red, green, blue)), "#000000" if luminance > 0.5 else "#ffffff"
