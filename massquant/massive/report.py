"""What ``locate`` is asked (``LocateConfig``) and what it reports: peaks, per-layer statistics, token counts,
the grouped sites and the outlier summary that evaluation rows carry."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

from massquant.errors import UserError
from massquant.massive import CRITERIA, MassiveCriteria
from massquant.massive.sites import MassiveSite, MassiveSites


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


def token_text(tokenizer, token_id: int) -> str | None:
    return tokenizer.decode([token_id]) if tokenizer is not None else None


def with_tokens(items: list, token_ids: list[list[int]], tokenizer) -> list:
    """Peaks or sites with the text of the token each sits on; unchanged without a tokenizer."""
    if tokenizer is None:
        return list(items)
    return [replace(item, token=token_text(tokenizer, token_ids[item.sequence][item.position])) for item in items]


def token_counts(sites: list[MassiveSite], token_ids: list[list[int]], tokenizer) -> list[TokenCount]:
    """Which tokens carry massive values, most frequent first: over distinct (sequence, position) pairs."""
    carriers = sorted({(site.sequence, site.position) for site in sites})
    by_token = Counter(token_ids[sequence][position] for sequence, position in carriers)
    first = Counter(token_ids[sequence][0] for sequence, position in carriers if position == 0)
    occurrences = Counter(token for row in token_ids for token in row)
    return [
        TokenCount(token_text(tokenizer, token_id) or str(token_id), token_id, count, occurrences[token_id], first[token_id])
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
