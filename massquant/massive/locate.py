"""Find massive activations (Sun et al. 2024) and super weights (Yu et al. 2024) with streaming hooks.

Two forward hooks per decoder layer see each sequence: one on the layer's
output (the residual stream), one on its MLP down projection. Each reduces its
tensor at once to a few numbers — the top-k |a| with their token and channel,
the median |a|, power sums for the kurtosis, the first token's norm, a matrix
entropy — and keeps only the values that meet the massive criterion (|a| above
a threshold and above a cutoff of the tensor: by default a multiple of its
median |a|, Sun et al. 2024; see ``MassiveCriteria`` for the others). No hidden
state outlives its hook, so memory stays that of a plain forward pass. The
sites are then grouped into phenomena, with the criterion's blind spots per
layer (``massquant.massive.phenomena``).
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from massquant.errors import UserError
from massquant.massive import CRITERIA, MassiveCriteria
from massquant.massive.intervene import down_projection
from massquant.models.architectures import weight_out_in
from massquant.massive.phenomena import LayerProfiles, blind_spots, group_phenomena
from massquant.massive.sites import MassiveSite, MassiveSites
from massquant.models.architectures import architecture_of, decoder_layers, get_path, layer_hidden
from massquant.wrapping.attention import PREFIX as ATTENTION_PREFIX


@dataclass(frozen=True)
class LocateConfig:
    criteria: MassiveCriteria = field(default_factory=MassiveCriteria)
    top_k: int = 10  # largest magnitudes kept per layer, over all sequences
    # Rényi-2 entropy of each layer's token Gram spectrum: one more [tokens x tokens x hidden] product
    # per layer, about 8% of a forward pass, so only when asked (massquant locate does).
    entropy: bool = False
    # One more pass per sequence with eager attention, for the attention share on the first key per
    # layer and head (eager materializes the probabilities; sdpa never does).
    attention_sink: bool = False

    def validate(self) -> "LocateConfig":
        self.criteria.validate()
        if self.top_k < 1:
            raise UserError(f"top-k must be a positive integer; got {self.top_k}")
        return self


@dataclass(frozen=True)
class Peak:
    """One of the largest magnitudes of a layer's tensor, and where it sits."""

    value: float  # signed
    sequence: int
    position: int
    channel: int
    ratio: float  # |value| / median |a| of that layer's tensor for that sequence; NaN where no median was needed
    token: str | None = None


@dataclass
class LayerStats:
    layer: int
    top: list[Peak]  # largest |a| of the layer output, largest first
    top_means: list[float]  # each sequence's 1st, 2nd, 3rd largest |a|, averaged over sequences
    median: float  # median |a| of the layer output, averaged over sequences
    cutoff: float  # the magnitude a value had to exceed to count as massive, averaged over sequences
    massive: int  # values meeting the massive criteria
    kurtosis: float  # excess kurtosis of every value of the layer output, all sequences pooled
    first_token_norm: float  # L2 norm of the first token's hidden state, averaged over sequences
    token_norm: float  # median L2 norm of the other tokens, averaged over sequences
    entropy: float  # Rényi-2 matrix entropy of the tokens' Gram spectrum (nats), averaged over sequences; NaN if not asked
    down_proj_top: list[Peak]  # largest |x| at the down projection's input

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TokenCount:
    """A token that carries massive activations: how often it does, and how often it occurs."""

    token: str
    token_id: int
    carriers: int  # (sequence, position) pairs of this token with a massive value in some layer
    occurrences: int  # times the token occurs in the located sequences
    at_first_position: int  # carriers at position 0


@dataclass
class LocateReport:
    config: LocateConfig
    sequences: int
    seq_len: int
    layers: list[LayerStats]
    massive: MassiveSites
    tokens: list[TokenCount]
    attention_sink: list[list[float]] | None = None  # [layer][head]: mean attention probability on key 0
    phenomena: list[dict] = field(default_factory=list)  # group_phenomena of the sites
    blind_spots: list[dict] = field(default_factory=list)  # phenomena.blind_spots, per layer

    @property
    def super_weights(self):
        return self.massive.super_weights

    def as_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "criterion": {"rule": self.config.criteria.rule, "source": CRITERIA[self.config.criteria.rule],
                          "description": self.config.criteria.describe()},
            "sequences": self.sequences,
            "seq_len": self.seq_len,
            "summary": outlier_summary(self),
            "phenomena": self.phenomena,
            "blind_spots": self.blind_spots,
            "massive_groups": group_sites(self.massive.sites),
            "tokens": [asdict(count) for count in self.tokens],
            "layers": [layer.as_dict() for layer in self.layers],
            "massive": self.massive.as_dict(),
            "attention_sink": self.attention_sink,
        }


# ---- pure statistics of one [tokens, channels] tensor ---------------------------------------------


# Each function reduces the tensor on its device to a few hundred numbers in as few torch calls as
# it can (a call costs ~10-40 us inside a forward pass, as much as reading the tensor), then finishes
# on the host with numpy.


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


# The |x| copies below are as large as the tensor, but hooks run after a layer has freed its larger
# intermediates, so the forward pass's peak memory does not grow.


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


# ---- running the model ------------------------------------------------------------------------------


def down_projections(model) -> list[torch.nn.Module]:
    return [down_projection(model, index) for index in range(len(decoder_layers(model)))]


def run_without_logits(model, input_ids: Tensor) -> None:
    """One forward of ``input_ids`` [batch, tokens] for its hooks: logits only for the last token, where the model allows."""
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    model(input_ids=input_ids.to(model.get_input_embeddings().weight.device), use_cache=False, **kwargs)


# ---- hooks: state per layer, fed one sequence at a time --------------------------------------------


TOP_MEANS = 3  # the curves of the magnitude plot


class _ResidualStream:
    """Running statistics of one decoder layer's output."""

    def __init__(self, layer: int, config: LocateConfig):
        self.layer = layer
        self.config = config
        self.top: list[Peak] = []
        self.top_sums = [0.0] * TOP_MEANS
        self.medians: list[float] = []
        self.sums = [0.0] * 5
        self.first_norms: list[float] = []
        self.token_norms: list[float] = []
        self.entropies: list[float] = []
        self.sites: list[MassiveSite] = []
        # per sequence, for the blind spots: the cutoff, its reference, |a| of the first token, max |a| of the others
        self.cutoffs: list[float] = []
        self.references: list[float] = []
        self.first: list[np.ndarray] = []
        self.others: list[np.ndarray] = []

    def observe(self, x: Tensor, sequence: int) -> None:
        row_maxima, median = magnitude_profile(x)
        self.medians.append(median)
        criteria = self.config.criteria
        ranked = max(self.config.top_k, TOP_MEANS, criteria.k + 1 if criteria.rule == "top-k" else 0)
        values, positions, channels = largest(x, row_maxima, ranked)
        self.top = keep_largest(
            self.top + [Peak(v, sequence, p, c, ratio_to(v, median)) for v, p, c in zip(values, positions, channels)],
            self.config.top_k,
        )
        self.top_sums = [total + abs(value) for total, value in zip(self.top_sums, values)]
        reference, cutoff = criterion_cutoff(criteria, median, row_maxima, values)
        self.references.append(reference)
        self.cutoffs.append(cutoff)
        self.first.append(np.abs(host_rows(x, np.zeros(1, dtype=np.int64))[0]))
        self.others.append(channel_magnitudes(x[1:]))
        if abs(values[0]) > cutoff:
            for v, p, c in zip(*entries_above(x, row_maxima, cutoff)):
                self.sites.append(MassiveSite(self.layer, sequence, p, c, v, ratio_to(v, median)))
        self.sums = [total + part for total, part in zip(self.sums, power_sums(x))]
        first, others = token_norms(x)
        self.first_norms.append(first)
        self.token_norms.append(others)
        if self.config.entropy:
            self.entropies.append(gram_entropy(x))


class _DownProjection:
    """Largest inputs of one down projection, its massive input channels, and its super-weight spike."""

    def __init__(self, layer: int, module: torch.nn.Module, config: LocateConfig, super_weights):
        self.layer = layer
        self.weight = weight_out_in(module)
        self.config = config
        self.super_weights = super_weights
        self.top: list[Peak] = []
        self.massive_channels: set[int] = set()

    def observe(self, inputs: Tensor, outputs: Tensor, sequence: int) -> None:
        row_maxima = row_magnitudes(inputs)
        values, positions, channels = largest(inputs, row_maxima, self.config.top_k)
        # Most down projections never reach the absolute threshold: their median is not needed.
        median = median_magnitude(inputs) if abs(values[0]) > self.config.criteria.abs_threshold else math.nan
        self.top = keep_largest(
            self.top + [Peak(v, sequence, p, c, ratio_to(v, median)) for v, p, c in zip(values, positions, channels)],
            self.config.top_k,
        )
        if not math.isnan(median):
            self.massive_channels.update(entries_above(inputs, row_maxima, massive_cutoff(self.config.criteria, median))[2])
        self.super_weights.observe(self.layer, inputs, outputs, self.weight)


def tokens_by_channels(x: Tensor) -> Tensor:
    """One sequence's [1, tokens, channels] (or OPT's flattened [tokens, channels]) as float32 [tokens, channels]."""
    return x.reshape(-1, x.shape[-1]).float()


# ---- the located report ----------------------------------------------------------------------------


def _token_text(tokenizer, token_id: int) -> str | None:
    return tokenizer.decode([token_id]) if tokenizer is not None else None


def _with_tokens(items: list, token_ids: list[list[int]], tokenizer) -> list:
    """Peaks or sites with the text of the token each sits on; unchanged without a tokenizer."""
    if tokenizer is None:
        return list(items)
    return [replace(item, token=_token_text(tokenizer, token_ids[item.sequence][item.position])) for item in items]


def token_counts(sites: list[MassiveSite], token_ids: list[list[int]], tokenizer) -> list[TokenCount]:
    """Which tokens carry massive values, most frequent first: over distinct (sequence, position) pairs."""
    carriers = sorted({(site.sequence, site.position) for site in sites})
    by_token = Counter(token_ids[sequence][position] for sequence, position in carriers)
    first = Counter(token_ids[sequence][0] for sequence, position in carriers if position == 0)
    occurrences = Counter(token for row in token_ids for token in row)
    return [
        TokenCount(_token_text(tokenizer, token_id) or str(token_id), token_id, count, occurrences[token_id], first[token_id])
        for token_id, count in sorted(by_token.items(), key=lambda item: (-item[1], item[0]))
    ]


def format_ranges(numbers: list[int]) -> str:
    """[2, 3, 4, 7] -> "2-4,7"."""
    runs: list[list[int]] = []
    for number in sorted(set(numbers)):
        if runs and runs[-1][1] == number - 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def group_sites(sites: list[MassiveSite]) -> list[dict]:
    """Massive values grouped by (channel, token): layer range, positions, largest value and ratio; largest first."""
    groups: dict[tuple[int, str | None], list[MassiveSite]] = {}
    for site in sites:
        groups.setdefault((site.channel, site.token), []).append(site)
    rows = []
    for (channel, token), members in groups.items():
        strongest = max(members, key=lambda site: abs(site.value))
        rows.append({
            "channel": channel,
            "token": token,
            "layers": format_ranges([site.layer for site in members]),
            "first_layer": min(site.layer for site in members),
            "last_layer": max(site.layer for site in members),
            "positions": sorted({site.position for site in members}),
            "sequences": len({site.sequence for site in members}),
            "value": strongest.value,
            "ratio": max(site.ratio for site in members),
            "count": len(members),
        })
    return sorted(rows, key=lambda row: -abs(row["value"]))


def outlier_summary(report: LocateReport) -> dict:
    """The outlier numbers one evaluation row shows: largest |a| and where, kurtosis, first massive layer."""
    with_top = [layer for layer in report.layers if layer.top]
    strongest = max(with_top, key=lambda layer: abs(layer.top[0].value), default=None)
    kurtoses = [layer.kurtosis for layer in report.layers if math.isfinite(layer.kurtosis)]
    return {
        "max_abs": abs(strongest.top[0].value) if strongest else None,
        "max_abs_layer": strongest.layer if strongest else None,
        "mean_kurtosis": sum(kurtoses) / len(kurtoses) if kurtoses else None,
        "max_kurtosis": max(kurtoses, default=None),
        "first_massive_layer": report.massive.first_layer,
        "massive_values": len(report.massive.sites),
        "phenomena": len(report.phenomena),
        "super_weights": len(report.massive.super_weights),
    }


def _mean(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else math.nan


def _layer_stats(residual: _ResidualStream, down: _DownProjection, token_ids: list[list[int]], tokenizer) -> LayerStats:
    return LayerStats(
        layer=residual.layer,
        top=_with_tokens(residual.top, token_ids, tokenizer),
        top_means=[total / len(residual.medians) for total in residual.top_sums],
        median=_mean(residual.medians),
        cutoff=_mean(residual.cutoffs),
        massive=len(residual.sites),
        kurtosis=excess_kurtosis(residual.sums),
        first_token_norm=_mean(residual.first_norms),
        token_norm=_mean(residual.token_norms),
        entropy=_mean(residual.entropies),
        down_proj_top=_with_tokens(down.top, token_ids, tokenizer),
    )


def _as_batch(input_ids: Tensor) -> Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise UserError(f"locate needs token ids shaped [sequences, tokens] with at least 2 tokens; got {tuple(input_ids.shape)}")
    return input_ids.cpu()


@torch.inference_mode()
def locate(
    model, input_ids: Tensor, config: LocateConfig | None = None, tokenizer=None, progress: bool = True
) -> LocateReport:
    """Massive activations, super weights and outlier statistics of ``model`` on ``input_ids`` [sequences, tokens].

    Sequences run one at a time; layers are numbered from 0 (the first decoder
    layer's output is layer 0). ``tokenizer`` only adds token texts (and with
    them the delimiter token class). ``config.criteria`` decides what is
    massive in the residual stream; down-projection inputs and super weights
    always use Sun et al.'s rule (with the same absolute threshold).
    """
    from massquant.massive.super_weights import SuperWeightTracker  # builds on this module's primitives

    config = (config or LocateConfig()).validate()
    input_ids = _as_batch(input_ids)
    layers = decoder_layers(model)
    tracker = SuperWeightTracker(config.criteria.sun())
    residuals = [_ResidualStream(index, config) for index in range(len(layers))]
    projections = down_projections(model)
    sun = replace(config, criteria=config.criteria.sun())
    downs = [_DownProjection(index, module, sun, tracker) for index, module in enumerate(projections)]
    current = {"sequence": 0}

    def residual_hook(stream: _ResidualStream):
        return lambda module, args, output: stream.observe(tokens_by_channels(layer_hidden(output)), current["sequence"])

    def down_hook(down: _DownProjection):
        return lambda module, args, output: down.observe(
            tokens_by_channels(args[0]), tokens_by_channels(output), current["sequence"]
        )

    handles = [layer.register_forward_hook(residual_hook(stream)) for layer, stream in zip(layers, residuals)]
    handles += [module.register_forward_hook(down_hook(down)) for module, down in zip(projections, downs)]
    try:
        for sequence in tqdm(range(len(input_ids)), desc="locate", unit="seq", leave=False, disable=not progress):
            current["sequence"] = sequence
            run_without_logits(model, input_ids[sequence : sequence + 1])
    finally:
        for handle in handles:
            handle.remove()

    token_ids = input_ids.tolist()
    sites = _with_tokens([site for stream in residuals for site in stream.sites], token_ids, tokenizer)
    massive = MassiveSites(
        sites=sites,
        down_proj_channels={down.layer: sorted(down.massive_channels) for down in downs if down.massive_channels},
        super_weights=tracker.super_weights(),
    )
    profiles = LayerProfiles(
        cutoffs=np.array([stream.cutoffs for stream in residuals]),
        first=np.array([stream.first for stream in residuals]),
        others=np.array([stream.others for stream in residuals]),
        references=np.array([stream.references for stream in residuals]),
    )
    phenomena = group_phenomena(sites, getattr(tokenizer, "bos_token", None))
    return LocateReport(
        config=config,
        sequences=len(input_ids),
        seq_len=input_ids.shape[1],
        layers=[_layer_stats(residual, down, token_ids, tokenizer) for residual, down in zip(residuals, downs)],
        massive=massive,
        tokens=token_counts(sites, token_ids, tokenizer),
        attention_sink=attention_sink_share(model, input_ids, progress) if config.attention_sink else None,
        phenomena=phenomena,
        blind_spots=blind_spots(phenomena, sites, profiles, reference_name(config.criteria)),
    )


# ---- extra passes: attention on the first key, one layer's activations --------------------------------


def _eager_name(implementation: str) -> str:
    """Eager attention, through massquant's key/value hook when the model is routed through it."""
    return ATTENTION_PREFIX + "eager" if implementation.startswith(ATTENTION_PREFIX) else "eager"


def _runs_eager(model) -> bool:
    return model.config._attn_implementation.removeprefix(ATTENTION_PREFIX) == "eager"


def attention_probabilities_available(model) -> bool:
    """Whether attention probabilities can be read: the model runs eager attention or can switch to it at run time."""
    return _runs_eager(model) or model._can_set_attn_implementation()


@torch.inference_mode()
def attention_sink_share(model, input_ids: Tensor, progress: bool = True) -> list[list[float]]:
    """[layer][head]: attention probability on key position 0, averaged over queries 1.. and sequences.

    Runs each sequence once with eager attention, whose attention modules return
    their probabilities; a hook reduces each layer's [heads, queries, keys] to
    [heads] at once and the implementation is restored afterwards.
    """
    if not attention_probabilities_available(model):
        raise UserError(
            f"{type(model).__name__} cannot switch to eager attention at run time; "
            "load it with --attn-implementation eager to measure attention on the first token"
        )
    input_ids = _as_batch(input_ids)
    attention_path = architecture_of(model).attention
    modules = [get_path(layer, attention_path) for layer in decoder_layers(model)]
    totals = [None] * len(modules)

    def hook_for(index: int):
        def hook(module, args, output):
            probabilities = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probabilities is None:
                raise UserError(f"attention module {type(module).__name__} returns no attention probabilities with eager attention")
            share = probabilities[0, :, 1:, 0].float().mean(dim=-1)
            totals[index] = share if totals[index] is None else totals[index] + share

        return hook

    previous = model.config._attn_implementation
    if not _runs_eager(model):
        model.set_attn_implementation(_eager_name(previous))
    handles = [module.register_forward_hook(hook_for(index)) for index, module in enumerate(modules)]
    try:
        for sequence in tqdm(input_ids, desc="attention on the first token", unit="seq", leave=False, disable=not progress):
            run_without_logits(model, sequence[None])
    finally:
        for handle in handles:
            handle.remove()
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
    return [(total / len(input_ids)).tolist() for total in totals]


@torch.inference_mode()
def layer_output(model, input_ids: Tensor, layer: int) -> Tensor:
    """One decoder layer's output for one sequence ``[tokens]``: ``[tokens, hidden]`` float32 (for a heat-map)."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise UserError(f"layer {layer} does not exist; this model has layers 0..{len(layers) - 1}")
    captured = {}

    def hook(module, args, output):
        captured["output"] = tokens_by_channels(layer_hidden(output)).cpu()

    handle = layers[layer].register_forward_hook(hook)
    try:
        run_without_logits(model, input_ids.reshape(1, -1))
    finally:
        handle.remove()
    return captured["output"]
