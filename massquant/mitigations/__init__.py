"""Registry of mitigations: model changes that tame massive activations before quantization.

Each mitigation lives in its own module of this package and describes itself
with a module-level ``MITIGATION`` entry. To add one, write the module and add
its name to ``_MODULES``.

- post-hoc modules define ``apply(loaded, params, calibration) -> undo`` (no
  training; ``calibration`` is [samples, seq_len] token ids or None);
- training-time modules define ``surgery(model, params) -> None`` (adds the
  new modules, persistently) and optionally ``on_step(model, params, step)``
  called by ``massquant train`` after each optimizer step. A training-time
  entry with ``needs_calibration`` gets ``surgery(..., calibration=ids or None)``
  to fit its starting point (None when a checkpoint is rebuilt: its weights
  load next). Whatever ``surgery``/``on_step`` return (a dict or None) is
  recorded in the run's results. A post-hoc module may also define
  ``surgery`` (kvbias): it is then trainable too.

Selection syntax (``--mitigation``, ``mitigation=`` in model_args, recipes)::

    variants := variant ("," variant)*        several variants to compare
    variant  := choice ("+" choice)*          applied together, in order (tvr+kvbias)
    choice   := NAME (":" key=value ("," key=value)*)? | none

A ``key=value`` after a comma continues the previous choice's parameters:
``smoothquant:alpha=0.8,layers=0:3,hadamard`` is two variants.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Callable

import torch

from massquant.config import parse_options
from massquant.errors import UserError

KINDS = ("post-hoc", "training")
_MODULES = ("kv_bias", "prefix_kv", "hadamard", "smoothquant", "tvr", "dyt", "gated_attention")


@dataclass(frozen=True)
class Mitigation:
    name: str
    kind: str  # "post-hoc" or "training"
    description: str  # one line, shown by `massquant mitigations`
    parameters: dict = field(default_factory=dict)  # name -> default; the default's type is the parameter's
    architectures: tuple[str, ...] = ()  # config.model_type values; empty: every architecture massquant knows
    why_not: str = ""  # why the other architectures are refused, said with the refusal
    needs_calibration: bool = False
    module: str = ""  # filled by the registry: massquant.mitigations.<module>

    def implementation(self):
        return importlib.import_module(f"massquant.mitigations.{self.module}")


@dataclass(frozen=True)
class MitigationChoice:
    """One selected mitigation with its parameters (defaults filled in)."""

    name: str
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        defaults = registry()[self.name].parameters
        changed = [f"{k}={format_value(v)}" for k, v in self.params.items() if defaults.get(k) != v]
        return self.name + (":" + ",".join(changed) if changed else "")


def format_value(value) -> str:
    """A parameter value as the key=value syntax writes it."""
    return ":".join(map(str, value)) if isinstance(value, tuple) else str(value).lower() if isinstance(value, bool) else str(value)


@cache
def registry() -> dict[str, Mitigation]:
    entries = {}
    for module_name in _MODULES:
        entry = importlib.import_module(f"massquant.mitigations.{module_name}").MITIGATION
        entries[entry.name] = Mitigation(**{**vars(entry), "module": module_name})
    return entries


def get_mitigation(name: str) -> Mitigation:
    entries = registry()
    if name not in entries:
        raise UserError(f"unknown mitigation '{name}'; accepted: none, {', '.join(entries)} (see 'massquant mitigations')")
    return entries[name]


def variant_label(variant: list[MitigationChoice]) -> str:
    return "+".join(choice.label for choice in variant) or "none"


_TOKEN = re.compile(r"([^,+]+)([,+]?)")


def parse_mitigations(text: str) -> list[list[MitigationChoice]]:
    """``"none,smoothquant:alpha=0.8,tvr+dyt"`` -> three variants (lists of choices, ``[]`` = none)."""
    variants: list[list[tuple[str, list[str]]]] = []
    separator = ","
    for match in _TOKEN.finditer(text.replace(" ", "")):
        piece, next_separator = match.groups()
        name, colon, option = piece.partition(":")
        if "=" in name:  # continues the previous choice's parameters (a value may hold ":")
            if not variants or not variants[-1]:
                raise UserError(f"mitigation '{text}': '{piece}' has no mitigation name before it")
            variants[-1][-1][1].append(piece)
        elif separator == "+" and variants:
            variants[-1].append((name, [option] if option else []))
        else:
            variants.append([(name, [option] if option else [])])
        separator = next_separator or separator
    if not variants:
        raise UserError("--mitigation is empty; accepted: none or names from 'massquant mitigations'")
    return [_resolve(variant, text) for variant in variants]


def _resolve(variant: list[tuple[str, list[str]]], text: str) -> list[MitigationChoice]:
    if [name for name, _ in variant] == ["none"]:
        return []
    choices = []
    for name, options in variant:
        if name == "none":
            raise UserError(f"mitigation '{text}': 'none' cannot be combined with other mitigations")
        entry = get_mitigation(name)
        choices.append(MitigationChoice(name, parse_options(",".join(options), entry.parameters, f"mitigation '{name}'")))
    if len({c.name for c in choices}) != len(choices):
        raise UserError(f"mitigation '{text}' names the same mitigation twice")
    return choices


def check_applicable(model, variant: list[MitigationChoice]) -> None:
    model_type = getattr(model.config, "model_type", None)
    for choice in variant:
        entry = get_mitigation(choice.name)
        if entry.architectures and model_type not in entry.architectures:
            because = f": {entry.why_not}" if entry.why_not else ""
            raise UserError(
                f"mitigation '{entry.name}' supports {', '.join(entry.architectures)}; this model is '{model_type}'{because}"
            )


def apply_post_hoc(
    loaded, variant: list[MitigationChoice], calibration: torch.Tensor | None, records: dict | None = None
) -> Callable[[], None]:
    """Apply every choice of ``variant`` in order; returns one undo for all of them.

    A mitigation whose undo carries a ``record`` dict (what it chose, e.g.
    prefixkv's tokens) has it put in ``records`` under its name.

    ``massquant.variants.check_variant`` has refused training-time entries:
    they change the model only together with fine-tuning (``massquant train``),
    and a checkpoint trained with them already carries them.
    """
    undos: list[Callable[[], None]] = []

    def undo() -> None:
        while undos:
            undos.pop()()

    try:
        for choice in variant:
            entry = get_mitigation(choice.name)
            if entry.needs_calibration and calibration is None:
                raise UserError(f"mitigation '{entry.name}' needs calibration sequences")
            undos.append(entry.implementation().apply(loaded, choice.params, calibration))
            if records is not None and getattr(undos[-1], "record", None) is not None:
                records[entry.name] = undos[-1].record
    except BaseException:
        undo()
        raise
    return undo
