"""The compression valley (Queipo-de-Llano et al. 2025, "Attention sinks and compression valleys in LLMs are two
sides of the same coin"): per layer, the matrix-based entropy of the token representations next to the first
token's norm, and how closely the two move across layers.

For a layer's output X [tokens, hidden], the Gram spectrum λ of X Xᵀ normalized to unit trace (p = λ / Σλ) gives
the von Neumann (Shannon, α = 1) entropy −Σ p log p and the Rényi-2 entropy −log Σ p² (``massquant locate``'s
entropy column), both in nats: log(rank) when the energy is spread evenly, near 0 when one direction (a token of
massive norm) holds it. The paper finds the entropy dipping where the first token's norm is massive; the
correlation across layers (Pearson on log ‖first token‖, Spearman on ranks) puts a number on it per model.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from massquant.models.architectures import decoder_layers, layer_hidden
from massquant.models.passes import run_sequences


def matrix_entropies(x: torch.Tensor) -> tuple[float, float]:
    """(von Neumann, Rényi-2) entropy in nats of the trace-normalized Gram spectrum of ``x`` [tokens, hidden]."""
    x = x.double()
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x  # same non-zero spectrum, the smaller matrix
    eigenvalues = torch.linalg.eigvalsh(gram).clamp(min=0)
    total = eigenvalues.sum()
    if total == 0:
        return math.nan, math.nan
    p = eigenvalues / total
    nonzero = p[p > 0]
    return float(-(nonzero * nonzero.log()).sum()), float(-torch.log((p * p).sum()))


def layer_correlation(entropy: list[float], first_norm: list[float]) -> dict:
    """Pearson r of entropy with log ‖first token‖, and Spearman ρ, across layers (scipy.stats)."""
    from scipy import stats

    entropy_array, norm_array = np.asarray(entropy, dtype=float), np.asarray(first_norm, dtype=float)
    return {
        "pearson": float(stats.pearsonr(entropy_array, np.log(norm_array)).statistic),
        "spearman": float(stats.spearmanr(entropy_array, norm_array).statistic),
    }


@torch.inference_mode()
def compression_valley(model, input_ids: torch.Tensor) -> dict:
    """Per decoder layer (outputs, numbered from 0 like ``locate``), entropies and norms averaged over the
    sequences of ``input_ids`` [sequences, tokens]; the correlations across layers."""
    layers = decoder_layers(model)
    sums = np.zeros((len(layers), 4))  # von Neumann, Rényi-2, first-token norm, median other-token norm
    def hook_for(index: int):
        def hook(module, args, output):
            x = layer_hidden(output)[0].float()
            norms = torch.linalg.vector_norm(x, dim=-1)
            sums[index] += [*matrix_entropies(x), float(norms[0]), float(norms[1:].median())]

        return hook

    run_sequences(model, input_ids, [(layer, "forward", hook_for(index)) for index, layer in enumerate(layers)], "compression valley")
    means = sums / len(input_ids)
    rows = [
        {"layer": index, "von_neumann": float(v), "renyi2": float(r), "first_token_norm": float(f), "token_norm": float(t)}
        for index, (v, r, f, t) in enumerate(means)
    ]
    first = [row["first_token_norm"] for row in rows]
    return {
        "sequences": len(input_ids),
        "layers": rows,
        "correlation": {
            "von_neumann": layer_correlation([row["von_neumann"] for row in rows], first),
            "renyi2": layer_correlation([row["renyi2"] for row in rows], first),
        },
        "valley_layer": int(np.argmin([row["von_neumann"] for row in rows])),
    }


def plot_valley(result: dict):
    """Entropy per layer (left axis) and the first token's norm (right axis, log)."""
    from massquant.reporting.figures import SERIES_COLOURS, integer_ticks, new_figure

    figure, (axes,) = new_figure(8, 4.5)
    layers = [row["layer"] for row in result["layers"]]
    axes.plot(layers, [row["von_neumann"] for row in result["layers"]], marker="o", markersize=3, color=SERIES_COLOURS[0], label="von Neumann entropy")
    axes.plot(layers, [row["renyi2"] for row in result["layers"]], marker="o", markersize=3, color=SERIES_COLOURS[1], label="Rényi-2 entropy")
    axes.set_ylabel("matrix entropy (nats)")
    axes.set_xlabel("layer (index of the decoder layer whose output is measured)")
    norms = axes.twinx()
    norms.plot(layers, [row["first_token_norm"] for row in result["layers"]], color=SERIES_COLOURS[3], linestyle="--", label="‖first token‖")
    norms.plot(layers, [row["token_norm"] for row in result["layers"]], color=SERIES_COLOURS[7], linestyle=":", label="‖other tokens‖ (median)")
    norms.set_yscale("log")
    norms.set_ylabel("hidden-state L2 norm (log)")
    correlation = result["correlation"]["von_neumann"]
    axes.set_title(f"Compression valley: entropy vs first-token norm (Pearson r = {correlation['pearson']:.2f}, Spearman ρ = {correlation['spearman']:.2f})")
    handles = axes.get_legend_handles_labels()
    more = norms.get_legend_handles_labels()
    axes.legend(handles[0] + more[0], handles[1] + more[1], fontsize="small", loc="best")
    integer_ticks(axes.xaxis)
    axes.grid(alpha=0.3)
    return figure
