"""Registry of mitigations: model changes that tame massive activations before quantization.

Each mitigation lives in its own module of this package and describes itself
with a module-level ``MITIGATION`` entry; the module implements the protocol of
its kind (checked when the registry is built). To add one, write the module and
add its name to ``_MODULES``.

- post-hoc (``PostHoc``): ``apply(loaded, params, calibration) -> undo`` (no
  training; ``calibration`` is [samples, seq_len] token ids or None);
- training-time (``TrainingTime``): ``surgery(model, params) -> dict | None``
  (adds the new modules, persistently) and optionally ``on_step(model, params,
  step)`` called by ``massquant train`` after each optimizer step. A
  training-time entry with ``needs_calibration`` gets ``surgery(...,
  calibration=ids or None)`` to fit its starting point (None when a checkpoint
  is rebuilt: its weights load next). Whatever ``surgery``/``on_step`` return
  is recorded in the run's results. A post-hoc module may also define
  ``surgery`` (kvbias): it is then trainable too.
- ``check_params(params)`` (optional) refuses bad values before any model loads.

An entry states the structural facts it needs (``requires``, from
``models.architectures.FACTS``), never a list of model types.

Selection syntax (``--mitigation``, ``mitigation=`` in model_args, recipes)::

    variants := variant ("," variant)*        several variants to compare
    variant  := choice ("+" choice)*          applied together, in order (tvr+kvbias)
    choice   := NAME (":" key=value ("," key=value)*)? | none

A ``key=value`` after a comma continues the previous choice's parameters:
``smoothquant:alpha=0.8,layers=0:3,hadamard`` is two variants.
"""

from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Protocol

import torch

from massquant.config import parse_options
from massquant.errors import UserError
from massquant.models.architectures import FACTS, architecture_of, model_types_with

KINDS = ("post-hoc", "training")
_MODULES = ("kv_bias", "prefix_kv", "hadamard", "smoothquant", "tvr", "dyt", "gated_attention", "ssnorm", "embproj")


class PostHoc(Protocol):
    def apply(self, loaded, params: dict, calibration: torch.Tensor | None) -> Callable[[], None]: ...


class TrainingTime(Protocol):
    def surgery(self, model: torch.nn.Module, params: dict) -> dict | None: ...


PROTOCOLS = {"post-hoc": ("apply", PostHoc), "training": ("surgery", TrainingTime)}


@dataclass(frozen=True)
class Mitigation:
    name: str
    kind: str  # "post-hoc" or "training"
    description: str  # one line, shown by `massquant mitigations`
    parameters: dict = field(default_factory=dict)  # name -> default; the default's type is the parameter's
    requires: tuple[str, ...] = ()  # structural facts (models.architectures.FACTS) the model must have
    needs_calibration: bool = False
    module: str = ""  # filled by the registry: the implementing module's import path

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def trainable(self) -> bool:
        """Usable by ``massquant train``: the module defines ``surgery``."""
        return callable(getattr(self.implementation(), "surgery", None))

    def hook(self, name: str) -> Callable | None:
        """An optional part of the protocol (``on_step``, ``check_params``), or None."""
        return getattr(self.implementation(), name, None)

    @property
    def architectures(self) -> list[str]:
        """The model types in massquant's table that meet ``requires``."""
        return model_types_with(self.requires)


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


_REGISTRY: dict[str, Mitigation] = {}


def register_mitigation(module_path: str) -> Mitigation:
    """Register the mitigation defined by the module at ``module_path`` (its ``MITIGATION`` entry and the
    protocol functions of its kind); a module outside this package (a plugin, a test) registers the same way.

    Raises TypeError when the module does not implement its kind's protocol or requires an unknown fact."""
    module = importlib.import_module(module_path)
    entry = Mitigation(**{**vars(module.MITIGATION), "module": module_path})
    required, protocol = PROTOCOLS[entry.kind]
    if not callable(getattr(module, required, None)):
        raise TypeError(f"mitigation module {module_path} ({entry.kind}) must define {required}() ({protocol.__name__})")
    unknown = set(entry.requires) - set(FACTS)
    if unknown:
        raise TypeError(f"mitigation {entry.name} requires unknown facts {sorted(unknown)}; known: {', '.join(FACTS)}")
    _REGISTRY[entry.name] = entry
    return entry


@functools.cache
def _register_builtins() -> None:
    for name in _MODULES:
        register_mitigation(f"massquant.mitigations.{name}")


def registry() -> dict[str, Mitigation]:
    """Every registered mitigation by name; the built-in ones (``_MODULES``) are registered on first use."""
    _register_builtins()
    return _REGISTRY


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
    """Refuse a mitigation whose required structural facts the model's architecture entry lacks."""
    entries = [get_mitigation(choice.name) for choice in variant]
    if not any(entry.requires for entry in entries):
        return
    facts = architecture_of(model).facts
    for entry in entries:
        missing = [fact for fact in entry.requires if fact not in facts]
        if missing:
            raise UserError(
                f"mitigation '{entry.name}' needs {'; '.join(FACTS[fact] for fact in missing)}, which "
                f"'{model.config.model_type}' does not have (supported: {', '.join(entry.architectures)})"
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
