"""Massive sites grouped into phenomena, and where the criterion that found them is blind.

A *phenomenon* is one residual channel carrying massive values on one or more
token classes over a span of layers — "channel 163 on BOS and on delimiter
tokens, layers 3–17" — rather than thousands of (layer, sequence, position)
sites. Token classes: ``first`` (position 0, BOS when it is the tokenizer's
BOS), ``delimiter`` (punctuation, whitespace-only or newline tokens) and
``other``. Cells of one channel (one per token class) whose layer spans overlap
form one phenomenon.

Every criterion compares a value with a per-layer cutoff, and the cutoffs vary
across layers, so the same value can count in one layer and not in another.
``blind_spots`` states, per layer, the two ways this misleads:

- ``low cutoff``: values pass only because this layer's cutoff is below the
  typical layer's (the median of the layers' cutoffs) — e.g. Gemma 3's first
  layers, whose median |a| of 0.56–3.2 lets thousands of ordinary tokens pass;
- ``high cutoff``: a phenomenon's channel is here above the typical layer's
  cutoff and above a cutoff it passed elsewhere, but this layer's cutoff is
  higher still — e.g. Gemma 3's BOS value of ~1e5 from layer 14 on, where
  the median |a| has grown to 116–223.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass

import numpy as np

from massquant.massive.sites import MassiveSite
from massquant.massive.report import format_ranges

TOKEN_CLASSES = ("first", "delimiter", "other")
EXAMPLES = 3  # token texts shown per class


@dataclass
class LayerProfiles:
    """What the blind-spot check needs of every (layer, sequence): cutoffs and per-channel magnitudes.

    ``cutoffs`` [layers, sequences]: the magnitude a value had to exceed;
    ``first`` [layers, sequences, channels]: |a| of the first token;
    ``others`` [layers, sequences, channels]: max |a| over the other tokens;
    ``references`` [layers, sequences]: the number the cutoff is a multiple of
    (median |a|, median token max, or the (k+1)-th largest |a|).
    """

    cutoffs: np.ndarray
    first: np.ndarray
    others: np.ndarray
    references: np.ndarray


def is_delimiter(text: str | None) -> bool:
    """Punctuation, whitespace-only or newline: every character is whitespace or Unicode punctuation (P*)."""
    return bool(text) and all(ch.isspace() or unicodedata.category(ch).startswith("P") for ch in text)


def token_class(position: int, text: str | None) -> str:
    """``first`` at position 0, else ``delimiter`` or ``other`` by the token's text (``other`` without a text)."""
    if position == 0:
        return "first"
    return "delimiter" if is_delimiter(text) else "other"


def _class_label(name: str, examples: list[str], bos: str | None) -> str:
    shown = ", ".join(repr(text) for text in examples)
    if name == "first":
        return f"BOS ({shown})" if bos is not None and examples == [bos] else f"the first token ({shown})"
    return f"{name} tokens ({shown})" if shown else f"{name} tokens"


def _span(layers: set[int]) -> str:
    low, high = min(layers), max(layers)
    return str(low) if low == high else f"{low}–{high}"


def group_phenomena(sites: list[MassiveSite], bos_token: str | None = None) -> list[dict]:
    """Phenomena from massive sites, largest |value| first.

    Each: ``name``, ``channel``, ``classes`` (per token class: carriers =
    distinct (sequence, position) pairs, sequences, example token texts, layer
    range), ``layers`` (e.g. "3-13,15"), ``first_layer``, ``last_layer``,
    ``value`` (the signed largest), ``ratio`` (its largest |a| / median |a|),
    ``values`` (sites), ``carriers``, ``sequences``. ``bos_token``: the
    tokenizer's BOS text, to call a first token BOS only when it is one.
    """
    cells: dict[tuple[int, str], list[MassiveSite]] = {}
    for site in sites:
        cells.setdefault((site.channel, token_class(site.position, site.token)), []).append(site)
    merged: list[list[tuple[str, list[MassiveSite]]]] = []
    for channel in sorted({channel for channel, _ in cells}):
        spans = sorted(
            ((name, members) for (c, name), members in cells.items() if c == channel),
            key=lambda cell: (min(s.layer for s in cell[1]), TOKEN_CLASSES.index(cell[0])),
        )
        groups: list[list[tuple[str, list[MassiveSite]]]] = []
        for cell in spans:
            low = min(s.layer for s in cell[1])
            if groups and low <= max(s.layer for _, members in groups[-1] for s in members):
                groups[-1].append(cell)  # overlapping layer spans: the same phenomenon on another token class
            else:
                groups.append([cell])
        merged += groups
    phenomena = []
    for group in merged:
        group.sort(key=lambda cell: TOKEN_CLASSES.index(cell[0]))
        members = [site for _, cell_sites in group for site in cell_sites]
        strongest = max(members, key=lambda site: abs(site.value))
        layers = {site.layer for site in members}
        classes = []
        for name, cell_sites in group:
            carriers = {(site.sequence, site.position): site.token for site in cell_sites}
            carrier_texts = Counter(text for text in carriers.values() if text is not None)
            classes.append({
                "class": name,
                "carriers": len(carriers),
                "sequences": len({site.sequence for site in cell_sites}),
                "examples": [text for text, _ in carrier_texts.most_common(EXAMPLES)],
                "layers": format_ranges([site.layer for site in cell_sites]),
            })
        described = " and ".join(_class_label(c["class"], c["examples"], bos_token) for c in classes)
        channel = strongest.channel
        phenomena.append({
            "name": f"channel {channel} on {described}, layers {_span(layers)}",
            "channel": channel,
            "classes": classes,
            "layers": format_ranges(sorted(layers)),
            "first_layer": min(layers),
            "last_layer": max(layers),
            "value": strongest.value,
            "ratio": max(site.ratio for site in members),
            "values": len(members),
            "carriers": len({(site.sequence, site.position) for site in members}),
            "sequences": len({site.sequence for site in members}),
        })
    return sorted(phenomena, key=lambda phenomenon: -abs(phenomenon["value"]))


def typical_cutoff(layer_cutoffs) -> float:
    """The typical layer's cutoff: the median over layers of each layer's cutoff (averaged over sequences)."""
    return float(np.median(np.asarray(layer_cutoffs, dtype=float)))


def beyond_typical(sites: list[MassiveSite], layer_cutoffs) -> list[MassiveSite]:
    """The sites that would be massive in the typical layer too (|value| > ``typical_cutoff``): not a low-cutoff artefact.

    On Gemma 3 this keeps channel 163 on BOS and on its second sink token (~1e5)
    and drops channel 400 on thousands of ordinary tokens in layers 0-6 (<= 8.8e3,
    against a typical cutoff of 1.6e4).
    """
    typical = typical_cutoff(layer_cutoffs)
    return [site for site in sites if abs(site.value) > typical]


def blind_spots(
    phenomena: list[dict], sites: list[MassiveSite], profiles: LayerProfiles, reference_name: str
) -> list[dict]:
    """Per layer, where the criterion's verdict comes from the layer's cutoff rather than the values (module docstring).

    ``reference_name`` says what the cutoff is a multiple of ("median |a|").
    Each entry: ``layer``, ``kind`` (``low cutoff`` / ``high cutoff``), the
    numbers it states and ``text``. A low-cutoff entry shows its layer's cutoff
    and reference averaged over sequences; a high-cutoff entry those of the
    sequence where the missed value is largest. Every test is per sequence.
    """
    layer_cutoffs = profiles.cutoffs.mean(axis=1)
    typical = typical_cutoff(layer_cutoffs)
    by_layer: dict[int, list[MassiveSite]] = {}
    for site in sites:
        by_layer.setdefault(site.layer, []).append(site)
    # each site's phenomenon: the lowest cutoff each phenomenon passed, and the layers it is present in
    by_channel: dict[int, list[tuple[int, dict, set[str]]]] = {}
    for index, phenomenon in enumerate(phenomena):
        by_channel.setdefault(phenomenon["channel"], []).append((index, phenomenon, {c["class"] for c in phenomenon["classes"]}))
    lowest: dict[int, float] = {}
    present: set[tuple[int, int]] = set()
    for site in sites:
        name = token_class(site.position, site.token)
        for index, phenomenon, classes in by_channel.get(site.channel, []):
            if name in classes and phenomenon["first_layer"] <= site.layer <= phenomenon["last_layer"]:
                cutoff = float(profiles.cutoffs[site.layer, site.sequence])
                lowest[index] = min(lowest.get(index, cutoff), cutoff)
                present.add((index, site.layer))
                break
    spots = []
    for layer in range(profiles.cutoffs.shape[0]):
        passing = [site for site in by_layer.get(layer, []) if abs(site.value) <= typical]
        if passing:
            spots.append({
                "layer": layer, "kind": "low cutoff", "cutoff": float(layer_cutoffs[layer]), "typical_cutoff": typical,
                "reference": float(profiles.references[layer].mean()), "values": len(passing),
                "carriers": len({(site.sequence, site.position) for site in passing}),
                "classes": dict(Counter(token_class(site.position, site.token) for site in passing)),
                "channels": dict(Counter(site.channel for site in passing).most_common()),
                "max_value": max(abs(site.value) for site in passing),
            })
        for index, phenomenon in enumerate(phenomena):
            if (index, layer) in present:
                continue
            missed = _missed_here(phenomenon, max(lowest[index], typical), profiles, layer)
            if missed is not None:
                spots.append({"layer": layer, **missed, "massive_cutoff": lowest[index], "typical_cutoff": typical,
                              "massive_layers": phenomenon["layers"]})
    for spot in spots:
        spot["text"] = describe_blind_spots([spot], reference_name)
    return spots


def _missed_here(phenomenon: dict, floor: float, profiles: LayerProfiles, layer: int) -> dict | None:
    """The largest value of the phenomenon's channel at ``layer`` that fails there but exceeds ``floor``."""
    channel = phenomenon["channel"]
    classes = {c["class"] for c in phenomenon["classes"]}
    candidates = []
    if "first" in classes:
        candidates.append(("the first token", profiles.first[layer, :, channel]))
    if classes - {"first"}:
        candidates.append(("the other tokens", profiles.others[layer, :, channel]))
    best = None
    for where, values in candidates:
        for sequence, value in enumerate(values.tolist()):
            cutoff = float(profiles.cutoffs[layer, sequence])
            if floor < value <= cutoff and (best is None or value > best["value"]):
                best = {"kind": "high cutoff", "channel": channel, "class": where, "value": value, "sequence": sequence,
                        "cutoff": cutoff, "reference": float(profiles.references[layer, sequence])}
    return best


def _between(values: list[float]) -> str:
    low, high = f"{min(values):.3g}", f"{max(values):.3g}"
    return low if low == high else f"{low}–{high}"


def merge_runs(spots: list[dict]) -> list[list[dict]]:
    """Blind spots of consecutive layers that say the same thing (same kind; for high cutoffs, same channel and tokens)."""
    runs: dict[tuple, list[list[dict]]] = {}
    for spot in sorted(spots, key=lambda spot: spot["layer"]):
        key = (spot["kind"], spot.get("channel"), spot.get("class"), spot.get("massive_layers"))
        same = runs.setdefault(key, [])
        if same and same[-1][-1]["layer"] == spot["layer"] - 1:
            same[-1].append(spot)
        else:
            same.append([spot])
    return sorted((run for groups in runs.values() for run in groups), key=lambda run: (run[0]["layer"], run[0]["kind"]))


def describe_blind_spots(run: list[dict], reference_name: str) -> str:
    """One sentence for a run of blind spots from ``merge_runs`` (or a single one), with its numbers' ranges."""
    first = run[0]
    references = _between([spot["reference"] for spot in run])
    cutoffs = _between([spot["cutoff"] for spot in run])
    if first["kind"] == "high cutoff":
        return (
            f"channel {first['channel']} on {first['class']} reaches {_between([spot['value'] for spot in run])}, above the "
            f"typical layer's cutoff {first['typical_cutoff']:.3g} and the {first['massive_cutoff']:.3g} it passed as massive "
            f"(layers {first['massive_layers']}), but {reference_name} {references} puts the cutoff at {cutoffs}"
        )
    classes, channels = Counter(), Counter()
    for spot in run:
        classes.update(spot["classes"])
        channels.update(spot["channels"])
    shown = [str(channel) for channel, _ in channels.most_common(3)] + (["…"] if len(channels) > 3 else [])
    return (
        f"{reference_name} {references} puts the cutoff at {cutoffs}, below the typical layer's {first['typical_cutoff']:.3g}: "
        f"{sum(spot['values'] for spot in run)} values ({', '.join(f'{n} on {name} tokens' for name, n in classes.most_common())}; "
        f"channel{'s' if len(channels) > 1 else ''} {', '.join(shown)}) pass with |a| <= "
        f"{max(spot['max_value'] for spot in run):.3g}, which the typical cutoff would not"
    )
