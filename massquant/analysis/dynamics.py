"""How massive activations emerge during training: per-layer statistics over steps or checkpoints, and a fit of
the top activation's trajectory.

Recorded per layer (``massquant.massive.locate`` on a few fixed sequences): the 1st/2nd/3rd largest and the
median |a| of the decoder layer's output, its excess kurtosis, the first token's L2 norm, and the attention
probability on the first token (mean over heads and queries).

**Fit.** Gallego-Feliciano et al. 2025 ("Hidden Dynamics of Massive Activations in Transformer Training",
arXiv:2508.03616) model the trajectory with an exponentially modulated logarithmic function of five parameters.
Their exact equation could not be read offline here; the form fitted is

    f(t) = A · exp(−λ t) · log(1 + γ (t − t0)) + K   for t > t0,   f(t) = K   for t <= t0,

with A the amplitude, λ the exponential decay rate, γ the logarithmic growth rate, t0 the onset step and K the
baseline magnitude (``scipy.optimize.curve_fit``, trust-region reflective with bounds λ >= 0, γ > 0).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

PARAMETERS = ("A", "lambda", "gamma", "t0", "K")
STATISTICS = ("top1", "top2", "top3", "median", "kurtosis", "first_token_norm", "first_token_attention")


def emergence_form(t, A, lam, gamma, t0, K):
    """The exponentially modulated logarithm above, vectorized over ``t`` (steps, float)."""
    shifted = np.maximum(np.asarray(t, dtype=float) - t0, 0.0)
    return A * np.exp(-lam * np.asarray(t, dtype=float)) * np.log1p(gamma * shifted) + K


def fit_trajectory(steps, values) -> dict:
    """Least-squares fit of ``emergence_form`` to (steps, values); parameters named as in ``PARAMETERS``.

    Returns ``parameters``, their standard errors (``errors``, from the covariance; NaN when undetermined),
    ``r2`` and ``rmse``. Raises ValueError with fewer than five points (five parameters).
    """
    from scipy.optimize import curve_fit

    t, y = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if len(t) < len(PARAMETERS):
        raise ValueError(f"the fit has {len(PARAMETERS)} parameters and needs at least as many points; got {len(t)}")
    span = max(t.max() - t.min(), 1.0)
    K0 = float(y[np.argmin(t)])
    gamma0 = 10.0 / span
    A0 = (float(y.max()) - K0) / math.log1p(gamma0 * span) or 1.0
    lower = [-np.inf, 0.0, 1e-12, t.min() - span, -np.inf]
    upper = [np.inf, np.inf, np.inf, t.max(), np.inf]
    best = None
    for start_t0 in (t.min() - 1e-3 * span, t.min() + 0.1 * span):  # onset at the start, or a little later
        try:
            parameters, covariance = curve_fit(
                emergence_form, t, y, p0=[A0, 0.1 / span, gamma0, start_t0, K0], bounds=(lower, upper), maxfev=20000,
            )
        except RuntimeError:
            continue
        residual = float(np.sum((emergence_form(t, *parameters) - y) ** 2))
        if best is None or residual < best[0]:
            best = (residual, parameters, covariance)
    if best is None:
        raise ValueError("the fit did not converge")
    residual, parameters, covariance = best
    total = float(np.sum((y - y.mean()) ** 2))
    errors = np.sqrt(np.clip(np.diag(covariance), 0, None)) if np.all(np.isfinite(covariance)) else np.full(len(PARAMETERS), np.nan)
    return {
        "form": "A * exp(-lambda * t) * log(1 + gamma * (t - t0)) + K for t > t0, else K",
        "parameters": dict(zip(PARAMETERS, map(float, parameters))),
        "errors": dict(zip(PARAMETERS, map(float, errors))),
        "r2": 1 - residual / total if total > 0 else math.nan,
        "rmse": math.sqrt(residual / len(t)),
    }


def step_statistics(model, input_ids, attention: bool = True) -> list[dict]:
    """Per decoder layer, the ``STATISTICS`` of ``model`` on ``input_ids`` [sequences, tokens] (locate, no grad)."""
    from massquant.massive.locate import locate
    from massquant.massive.observers import attention_probabilities_available
    from massquant.massive.report import LocateConfig

    training = model.training
    model.eval()
    try:
        with_attention = attention and attention_probabilities_available(model)
        report = locate(model, input_ids, LocateConfig(attention_sink=with_attention), progress=False)
    finally:
        model.train(training)
    rows = []
    for index, stats in enumerate(report.layers):
        tops = list(stats.top_means) + [math.nan] * (3 - len(stats.top_means))
        share = report.attention_sink[index] if report.attention_sink is not None else None
        rows.append({
            "layer": stats.layer, "top1": tops[0], "top2": tops[1], "top3": tops[2], "median": stats.median,
            "kurtosis": stats.kurtosis, "first_token_norm": stats.first_token_norm,
            "first_token_attention": float(np.mean(share)) if share is not None else math.nan,
        })
    return rows


def top_trajectory(records: list[dict]) -> tuple[list[float], list[float], list[int]]:
    """(steps, largest top-1 |a| over layers, the layer holding it) of step records ``{"step", "layers"}``."""
    steps, values, layers = [], [], []
    for record in records:
        best = max(record["layers"], key=lambda row: row["top1"])
        steps.append(record["step"])
        values.append(best["top1"])
        layers.append(best["layer"])
    return steps, values, layers


def summarize(records: list[dict]) -> dict:
    """The trajectory of the top activation and its fit (None when there are too few points or no convergence)."""
    steps, values, layers = top_trajectory(records)
    try:
        fit = fit_trajectory(steps, values)
    except ValueError as error:
        fit = {"error": str(error)}
    return {"steps": steps, "top1": values, "top1_layer": layers, "fit": fit}


def checkpoint_step(path: str, index: int) -> int:
    """The training step of a checkpoint directory: the number in ``checkpoint-<N>`` / ``step<N>``, else its index."""
    match = re.search(r"(?:checkpoint-|step)(\d+)$", Path(path).name)
    return int(match.group(1)) if match else index


def plot_dynamics(records: list[dict], summary: dict):
    """Per layer over steps: top-1 |a| (log), excess kurtosis, first-token norm, attention on the first token;
    the fitted trajectory of the largest top-1 over layers on the first panel."""
    from matplotlib import colormaps

    from massquant.reporting.figures import BASELINE_COLOUR, new_figure

    figure, axes = new_figure(11, 8, rows=2, columns=2)
    steps = [record["step"] for record in records]
    count = len(records[0]["layers"]) if records else 0
    colours = colormaps["viridis"](np.linspace(0, 1, max(count, 2)))
    panels = (("top1", "top-1 |a| (log)", "log"), ("kurtosis", "excess kurtosis (symlog)", "symlog"),
              ("first_token_norm", "‖first token‖ (log)", "log"), ("first_token_attention", "attention on the first token", "linear"))
    for each, (key, label, scale) in zip(axes, panels):
        for layer in range(count):
            each.plot(steps, [record["layers"][layer][key] for record in records], color=colours[layer], linewidth=1,
                      label=f"layer {layer}" if layer in (0, count - 1) else None)
        each.set_yscale(scale)
        each.set_ylabel(label)
        each.set_xlabel("training step")
        each.grid(alpha=0.3)
    fit = summary.get("fit", {})
    if "parameters" in fit and steps:
        dense = np.linspace(min(steps), max(steps), 200)
        axes[0].plot(summary["steps"], summary["top1"], "o", color=BASELINE_COLOUR, markersize=3, label="largest over layers")
        axes[0].plot(dense, emergence_form(dense, *fit["parameters"].values()), color=BASELINE_COLOUR, linestyle="--",
                     label=f"fit (R² = {fit['r2']:.3f})")
    axes[0].legend(fontsize="small")
    axes[0].set_title("Emergence of massive activations over training")
    return figure
