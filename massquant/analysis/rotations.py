"""Rotation kinds compared (DFRot's question, Xiang & Zhang 2024): randomized Hadamard, random orthogonal, identity.

DFRot reports that a randomized Hadamard beats a random orthogonal rotation of the residual stream under W4A4
because of the tokens with massive activations: both rotations leave ordinary tokens' per-token quantization
error alike, but the Hadamard spreads a massive token's few huge channels more evenly. This module measures that
split directly: for each kind (``hadamard:rotation=KIND``), every quantized linear's input is fake-quantized as
the activation spec says, and the quantization error is summed separately over the tokens that carry massive
activations (located on the unrotated model) and over the others; perplexity deltas come from ``eval``'s path.

Error metric: SQNR (dB) = 10 log10(Σ‖x‖² / Σ‖x − Q(x)‖²) over the rows (tokens) of a class, pooled over layers
and windows; higher is better.
"""

from __future__ import annotations

import math
import torch
from tqdm.auto import tqdm

from massquant.models.passes import run_sequences
from massquant.quantizers.functional import energy_ratio_db

TOKEN_CLASSES = ("massive", "other")


def row_energies(x: torch.Tensor, quantized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (token) of ``[..., tokens, features]``: Σx² and Σ(x − Q(x))² in float64, flattened to [rows]."""
    x64 = x.double().reshape(-1, x.shape[-1])
    return x64.square().sum(-1), (x64 - quantized.double().reshape(-1, x.shape[-1])).square().sum(-1)


class ClassErrors:
    """Signal and noise energies summed per (linear kind, token class); SQNR per class pooled or per kind."""

    def __init__(self):
        self.sums: dict[tuple[str, str], list[float]] = {}

    def add(self, kind: str, signal: torch.Tensor, noise: torch.Tensor, massive: torch.Tensor) -> None:
        """``signal``, ``noise``: [rows] energies; ``massive``: [rows] bool, True on massive-carrier tokens."""
        for name, members in (("massive", massive), ("other", ~massive)):
            entry = self.sums.setdefault((kind, name), [0.0, 0.0, 0])
            entry[0] += float(signal[members].sum())
            entry[1] += float(noise[members].sum())
            entry[2] += int(members.sum())

    def sqnr(self, token_class: str, kind: str | None = None) -> float:
        """SQNR (dB) of one class, over every linear kind (``kind`` None) or one."""
        chosen = [v for (k, c), v in self.sums.items() if c == token_class and (kind is None or k == kind)]
        signal, noise = sum(v[0] for v in chosen), sum(v[1] for v in chosen)
        return energy_ratio_db(signal, noise) if chosen and signal > 0 else math.nan

    def as_dict(self) -> dict:
        kinds = sorted({k for k, _ in self.sums})
        return {
            "sqnr_db": {name: self.sqnr(name) for name in TOKEN_CLASSES},
            "by_linear": {kind: {name: self.sqnr(name, kind) for name in TOKEN_CLASSES} for kind in kinds},
            "rows": {name: sum(v[2] for (k, c), v in self.sums.items() if c == name) for name in TOKEN_CLASSES},  # tokens x linears
        }


def linear_kind(name: str) -> str:
    """``model.layers.3.mlp.down_proj.linear`` -> ``down_proj``: the projection a linear input feeds."""
    parts = name.split(".")
    return parts[-2] if parts[-1] == "linear" else parts[-1]


@torch.inference_mode()
def activation_errors(model, input_ids: torch.Tensor, part, carriers: set[tuple[int, int]]) -> ClassErrors:
    """Quantize (``part``, an activation TensorQuantSpec) every decoder linear's input of ``model`` on each
    sequence of ``input_ids`` [sequences, tokens] and sum the error per class; the model itself is not changed."""
    from massquant.wrapping.selection import select_linears
    from massquant.quantizers.spec import QuantSpec
    from massquant.quantizers.tensors import quantize_activation
    from massquant.wrapping.quantize import QUANTIZABLE_TYPES

    errors = ClassErrors()
    current = {"massive": None}

    def hook_for(kind: str):
        def hook(module, args):
            x = args[0]
            signal, noise = row_energies(x, quantize_activation(x, part))
            errors.add(kind, signal.cpu(), noise.cpu(), current["massive"])

        return hook

    linears = select_linears(model, QuantSpec(activations=part), QUANTIZABLE_TYPES)
    def mark(index: int, row: torch.Tensor) -> None:
        current["massive"] = torch.tensor([(index, position) in carriers for position in range(len(row))])

    hooks = [(module, "pre", hook_for(linear_kind(name))) for name, module in linears]
    run_sequences(model, input_ids, hooks, "activation errors", mark)
    return errors


def rotation_choices(kinds: list[str], seeds: list[int]):
    """(kind, seed, label, mitigation choices): the unrotated model first, then each kind and seed; ``identity``
    does not depend on the seed (one row)."""
    from massquant.mitigations import MitigationChoice, get_mitigation

    defaults = get_mitigation("hadamard").parameters
    rows = [("none", None, "none (unrotated)", ())]
    for kind in kinds:
        for seed in seeds[:1] if kind == "identity" else seeds:
            label = kind if kind == "identity" else f"{kind} seed {seed}"
            rows.append((kind, seed, label, (MitigationChoice("hadamard", {**defaults, "rotation": kind, "seed": seed}),)))
    return rows


def compare_rotations(loaded, windows, calibration, kinds: list[str], seeds: list[int], specs, error_part,
                      carriers: set[tuple[int, int]], batch_size: int = 1, on_row=None) -> dict:
    """Unrotated, then per rotation kind and seed: activation SQNR on massive vs other tokens (``error_part``)
    and Δppl per spec against the unquantized, unrotated model."""
    from massquant.evaluation.runner import evaluate_variant
    from massquant.variants import Variant, apply_variant

    baseline = evaluate_variant(loaded, Variant(), windows, calibration, batch_size)
    rows = []
    for kind, seed, label, mitigation in tqdm(rotation_choices(kinds, seeds), desc="rotation kinds", unit="kind"):
        applied = apply_variant(loaded, Variant(mitigation=mitigation), calibration)
        try:
            errors = activation_errors(applied.model, windows.input_ids, error_part, carriers)
        finally:
            applied.undo()
        row = {"rotation": label, "kind": kind, "seed": seed, "errors": errors.as_dict(), "ppl": {}, "delta_ppl": {}}
        for spec in specs:
            ppl = evaluate_variant(loaded, Variant(spec, mitigation=mitigation), windows, calibration, batch_size)["ppl"]
            row["ppl"][spec.name], row["delta_ppl"][spec.name] = ppl, ppl - baseline["ppl"]
        rows.append(row)
        if on_row:
            on_row(rows)
    return {"baseline_ppl": baseline["ppl"], "rows": rows}


def kind_summary(rows: list[dict], specs: list[str]) -> list[dict]:
    """Mean over seeds per kind: SQNR on massive and other tokens, Δppl per spec (what the verdict compares)."""
    summary = []
    for kind in dict.fromkeys(row["kind"] for row in rows):
        own = [row for row in rows if row["kind"] == kind]
        entry = {"kind": kind, "seeds": len(own)}
        for name in TOKEN_CLASSES:
            entry[f"sqnr_{name}"] = sum(row["errors"]["sqnr_db"][name] for row in own) / len(own)
        for spec in specs:
            entry[f"delta_{spec}"] = sum(row["delta_ppl"][spec] for row in own) / len(own)
        summary.append(entry)
    return summary


def plot_rotations(rows: list[dict], specs: list[str]):
    """Left: SQNR on massive vs other tokens per rotation; right: Δppl per spec (log)."""
    import numpy as np

    from massquant.reporting.figures import SERIES_COLOURS, new_figure

    figure, axes = new_figure(11, 4.5, columns=2)
    labels = [row["rotation"] for row in rows]
    positions = np.arange(len(rows))
    for offset, name in enumerate(TOKEN_CLASSES):
        axes[0].bar(positions + 0.4 * offset - 0.2, [row["errors"]["sqnr_db"][name] for row in rows], 0.4,
                    label=f"{name} tokens", color=SERIES_COLOURS[offset])
    axes[0].set_ylabel("activation SQNR (dB, higher is better)")
    axes[0].set_title("Quantization error by token class")
    width = 0.8 / max(1, len(specs))
    for offset, spec in enumerate(specs):
        axes[1].bar(positions + width * offset - 0.4 + width / 2, [row["delta_ppl"][spec] for row in rows], width,
                    label=spec, color=SERIES_COLOURS[offset + 2])
    axes[1].set_yscale("symlog", linthresh=0.01)
    axes[1].set_ylabel("Δppl vs full precision (symlog)")
    axes[1].set_title("Perplexity cost per rotation kind")
    for each in axes:
        each.set_xticks(positions, labels, rotation=30, ha="right")
        each.legend(fontsize="small")
        each.grid(alpha=0.3, axis="y")
    return figure


def with_activation_part(spec_text: str):
    """The activation part of a spec text such as ``a4`` or ``w4a4`` (the error measurement's quantizer)."""
    from massquant.errors import UserError
    from massquant.quantizers.spec import parse_spec

    part = parse_spec(spec_text).activations
    if part is None:
        raise UserError(f"--error-spec '{spec_text}' quantizes no activations; give one with an a part, e.g. a4 or a8-tensor")
    return part
