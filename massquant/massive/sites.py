"""Where a model's massive activations and super weights are: the data ``locate`` produces and handling consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class MassiveSite:
    """One massive value in the residual stream (a decoder layer's output)."""

    layer: int
    sequence: int  # index of the sequence in the located batch
    position: int  # token position in that sequence
    channel: int
    value: float  # signed
    ratio: float  # |value| / median |a| of that layer's tensor
    token: str | None = None


@dataclass(frozen=True)
class SuperWeight:
    """Yu et al. 2024: down_proj weight[row, col], row = output spike channel, col = input spike channel."""

    layer: int
    row: int
    col: int
    value: float
    input_value: float  # the down-projection input spike that multiplies it
    output_value: float  # the resulting spike at the down-projection output
    position: int | None = None  # token position of the spike
    contribution: float | None = None  # value * input_value / output_value: the spike's share this one weight makes


@dataclass
class MassiveSites:
    """Everything handling needs: which layers/channels/positions carry massive values."""

    sites: list[MassiveSite] = field(default_factory=list)
    # layer -> input channels of that layer's down projection that carry massive values
    down_proj_channels: dict[int, list[int]] = field(default_factory=dict)
    super_weights: list[SuperWeight] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.sites})

    @property
    def first_layer(self) -> int | None:
        return min((s.layer for s in self.sites), default=None)

    @property
    def channels(self) -> list[int]:
        """Residual channels, most frequent first."""
        counts: dict[int, int] = {}
        for site in self.sites:
            counts[site.channel] = counts.get(site.channel, 0) + 1
        return sorted(counts, key=lambda c: (-counts[c], c))

    @property
    def positions(self) -> list[int]:
        return sorted({s.position for s in self.sites})

    def __bool__(self) -> bool:
        return bool(self.sites)

    def as_dict(self) -> dict:
        return {
            "first_layer": self.first_layer,
            "layers": self.layers,
            "channels": self.channels,
            "positions": self.positions,
            "sites": [asdict(s) for s in self.sites],
            "down_proj_channels": {str(k): v for k, v in self.down_proj_channels.items()},
            "super_weights": [asdict(w) for w in self.super_weights],
        }
