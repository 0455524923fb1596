"""Pure statistics of one sequence's tensor ``[tokens, channels]``: the largest |a| with where they sit, medians,
power sums (excess kurtosis), token norms, matrix entropy, and the cutoff each massive criterion draws."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from massquant.massive import MassiveCriteria
from massquant.massive.report import Peak


def host(x: Tensor) -> np.ndarray:
    """A small tensor as a numpy array: a view on the CPU, a copy from other devices."""
    return x.detach().cpu().numpy()


def host_rows(x: Tensor, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of a [tokens, channels] tensor as a numpy array, copying only those rows off the device."""
    if x.device.type == "cpu":
        return x.numpy()[rows]
    return host(x[torch.from_numpy(rows).to(x.device)])


def row_magnitudes(x: Tensor) -> np.ndarray:
    """max |x| of each token (row) as a numpy array, without materializing |x| (aminmax over a dim is 15x slower)."""
    return np.maximum(host(x.amax(dim=-1)), -host(x.amin(dim=-1)))


def channel_magnitudes(x: Tensor) -> np.ndarray:
    """max |x| of each channel (column) as a numpy array. On the CPU numpy's column reductions are ~8x faster
    than torch's reduction over the outer dimension."""
    if x.device.type == "cpu":
        values = x.numpy()
        return np.maximum(values.max(axis=0), -values.min(axis=0))
    return np.maximum(host(x.amax(dim=0)), -host(x.amin(dim=0)))


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest of ``values``, largest first (a partition, then a sort of k)."""
    k = min(k, values.size)
    chosen = np.argpartition(values, values.size - k)[values.size - k :]
    return chosen[np.argsort(-values[chosen], kind="stable")]


def largest(x: Tensor, row_maxima: np.ndarray, k: int) -> tuple[list[float], list[int], list[int]]:
    """The k largest |x| of a [tokens, channels] tensor (signed values), with positions and channels, largest first.

    ``row_maxima`` is ``row_magnitudes(x)``. The k largest values lie in the k
    tokens with the largest maximum, so only those rows are ranked: a topk over
    the whole flattened tensor is a single-threaded pass that costs more than
    the rest of the hook.
    """
    rows = top_indices(row_maxima, k)
    candidates = host_rows(x, rows)
    flat = top_indices(np.abs(candidates).ravel(), k)
    positions, channels = rows[flat // x.shape[-1]], flat % x.shape[-1]
    return candidates.ravel()[flat].tolist(), positions.tolist(), channels.tolist()


def lower_median_in_place(values: np.ndarray) -> np.generic:
    """The lower median of a 1-D array (``torch.median``'s), by partitioning the array in place."""
    rank = (values.size - 1) // 2
    values.partition(rank)
    return values[rank]


def _lower_median(magnitudes: Tensor) -> float:
    """Lower median of a tensor of magnitudes (|x|, a temporary: on the CPU it is reordered in place).

    On the CPU numpy's introselect partitions the bit patterns (a non-negative
    float orders like its bits read as an integer, and integer selection skips
    the NaN handling of float selection): about 20x faster than ``torch.median``.
    """
    if magnitudes.device.type != "cpu":
        return float(magnitudes.median())
    rank = (magnitudes.numel() - 1) // 2
    bits = magnitudes.reshape(-1).numpy().view(np.int32)
    bits.partition(rank)
    return float(bits[rank : rank + 1].view(np.float32)[0])


def median_magnitude(x: Tensor) -> float:
    """``torch.median(x.abs())``: the lower median of |x|."""
    return _lower_median(x.abs())


def magnitude_profile(x: Tensor) -> tuple[np.ndarray, float]:
    """``row_magnitudes(x)`` and ``median_magnitude(x)`` from one |x| copy."""
    magnitudes = x.abs()
    row_maxima = host(magnitudes.amax(dim=-1))  # before the selection reorders the copy
    return row_maxima, _lower_median(magnitudes)


def entries_above(x: Tensor, row_maxima: np.ndarray, cutoff: float) -> tuple[list[float], list[int], list[int]]:
    """Every value with |x| > cutoff: signed values, token positions, channels. Only rows whose maximum passes are searched."""
    rows = np.flatnonzero(row_maxima > cutoff)
    candidates = host_rows(x, rows)
    found, channels = np.nonzero(np.abs(candidates) > cutoff)
    return candidates[found, channels].tolist(), rows[found].tolist(), channels.tolist()


def power_sums(x: Tensor) -> list[float]:
    """[count, Σx, Σx², Σx³, Σx⁴]: enough to pool moments over sequences (dot products: one temporary, x²)."""
    flat = x.reshape(-1)
    squares = flat * flat
    return [x.numel(), *torch.stack((flat.sum(), flat @ flat, squares @ flat, squares @ squares)).tolist()]


def excess_kurtosis(sums: list[float]) -> float:
    """m4 / m2² − 3 from power sums; 0 for a normal distribution, large when a few values dominate."""
    count, s1, s2, s3, s4 = sums
    mean = s1 / count
    m2 = s2 / count - mean**2
    m4 = s4 / count - 4 * mean * s3 / count + 6 * mean**2 * s2 / count - 3 * mean**4
    return m4 / m2**2 - 3 if m2 > 0 else math.nan


def gram_entropy(x: Tensor) -> float:
    """Rényi entropy of order 2 of the spectrum of the tokens' Gram matrix X Xᵀ, normalized to unit trace.

    H₂ = −log Σ pᵢ² with pᵢ = λᵢ / Σλ. Since Σλᵢ² = ‖X Xᵀ‖²_F = ‖Xᵀ X‖²_F and
    Σλᵢ = ‖X‖²_F, no eigendecomposition is needed, and the smaller Gram matrix
    is formed. Near 0 when one direction holds the energy (a token of massive
    norm), log(rank) when it is spread evenly: the "compression valley" of
    middle layers shows as a dip.
    """
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    energy = float(x.reshape(-1) @ x.reshape(-1))
    if energy == 0:
        return math.nan
    return -math.log(float(gram.reshape(-1) @ gram.reshape(-1)) / energy**2)


def token_norms(x: Tensor) -> tuple[float, float]:
    """The first token's L2 norm and the (lower) median L2 norm of the other tokens."""
    norms = host(torch.linalg.vector_norm(x, dim=-1))
    first = float(norms[0])
    return first, float(lower_median_in_place(norms[1:])) if norms.size > 1 else math.nan


def massive_cutoff(criteria: MassiveCriteria, median: float) -> float:
    """The magnitude a value must exceed to be massive in a tensor whose median |a| is ``median`` (Sun et al.)."""
    return max(criteria.abs_threshold, criteria.median_ratio * median)


def criterion_cutoff(criteria: MassiveCriteria, median: float, row_maxima: np.ndarray, ranked: list[float]) -> tuple[float, float]:
    """(reference, cutoff) of one [tokens, channels] tensor under ``criteria.rule``: a value is massive when |a| > cutoff.

    ``median``: its median |a|; ``row_maxima``: each token's max |a|;
    ``ranked``: its largest values, largest first, at least k + 1 of them for
    top-k. The reference is what the cutoff is a multiple of: the median |a|
    (sun), the median of the tokens' max |a| (prefixquant), the (k+1)-th
    largest |a| (top-k, so exactly the k largest pass).
    """
    if criteria.rule == "sun":
        return median, massive_cutoff(criteria, median)
    if criteria.rule == "prefixquant":
        reference = float(lower_median_in_place(row_maxima.copy()))
        return reference, max(criteria.abs_threshold, criteria.median_ratio * reference)
    reference = abs(ranked[criteria.k]) if len(ranked) > criteria.k else 0.0
    return reference, max(criteria.abs_threshold, reference)


def reference_name(criteria: MassiveCriteria) -> str:
    """What ``criterion_cutoff``'s reference is, in words."""
    return {"sun": "median |a|", "prefixquant": "median token max |a|"}.get(criteria.rule, f"the {criteria.k + 1}th largest |a|")


def ratio_to(value: float, median: float) -> float:
    """|value| / median: infinite for a zero median, NaN when the median was not computed."""
    if math.isnan(median):
        return math.nan
    return abs(value) / median if median > 0 else math.inf


def keep_largest(peaks: list[Peak], k: int) -> list[Peak]:
    return sorted(peaks, key=lambda peak: -abs(peak.value))[:k]


def tokens_by_channels(x: Tensor) -> Tensor:
    """One sequence's [1, tokens, channels] (or OPT's flattened [tokens, channels]) as float32 [tokens, channels]."""
    return x.reshape(-1, x.shape[-1]).float()
