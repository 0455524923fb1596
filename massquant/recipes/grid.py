"""The evaluated grid: specs x massive policies x mitigations, shared by ``massquant eval`` and recipes.

A recipe multiplies that grid by models, texts and window lengths into cells;
each cell is identified by a hash of everything that decides its numbers, so a
finished cell is found again whatever order or recipe asked for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from massquant.backends import get_backend
from massquant.data.calibration import DEFAULT_CALIBRATION_TEXT
from massquant.evaluation.perplexity import PerplexityConfig
from massquant.evaluation.tasks import TaskSettings
from massquant.massive import MassiveCriteria, MassivePolicy
from massquant.mitigations import MitigationChoice, parse_mitigations
from massquant.models.loading import ModelConfig
from massquant.quantizers.spec import QuantSpec, parse_spec
from massquant.variants import Variant

# Bumped when a cell's meaning changes, so older cached cells are not mistaken for new ones.
CELL_FORMAT = 1


def parse_specs(texts: list[str], backends: list[str], **settings) -> list[QuantSpec]:
    """Every spec on every backend; full-precision entries are dropped (the baseline is always there)."""
    for backend in backends:
        get_backend(backend)
    specs = [parse_spec(text, backend=backend, **settings) for text in texts for backend in backends]
    return [spec for spec in specs if not spec.is_identity]


def massive_policies(modes: list[str], detection: str, criteria: MassiveCriteria) -> list[MassivePolicy]:
    return [MassivePolicy(mode, detection, criteria).validate() for mode in dict.fromkeys(modes or ["none"])]


def mitigation_variants(texts: list[str]) -> list[tuple[MitigationChoice, ...]]:
    """Each text in the registry syntax may name several variants; ``()`` is no mitigation."""
    return [tuple(variant) for text in texts for variant in parse_mitigations(text)] or [()]


def variant_grid(
    specs: list[QuantSpec], policies: list[MassivePolicy], mitigations: list[tuple[MitigationChoice, ...]]
) -> list[Variant]:
    """The baseline first, then every mitigation x massive policy x spec (mitigated rows unquantized too)."""
    grid = [Variant()]
    for mitigation in _unique(mitigations):
        if mitigation:
            grid.append(Variant(mitigation=mitigation))
        for policy in policies:
            grid.extend(Variant(spec, policy, mitigation) for spec in specs)
    return _unique(grid)


def _unique(items: list) -> list:
    """First occurrences, by equality: mitigation parameters are dicts, so variants cannot be hashed."""
    kept: list = []
    for item in items:
        if item not in kept:
            kept.append(item)
    return kept


@dataclass(frozen=True)
class CalibrationSettings:
    """Sequences for static ranges, GPTQ, massive-site detection and mitigations that calibrate."""

    data: str = DEFAULT_CALIBRATION_TEXT
    samples: int = 16
    seq_len: int = 512


@dataclass(frozen=True)
class Cell:
    """One measurement: a model, a text with its windows, and a variant."""

    model: ModelConfig
    data: PerplexityConfig
    variant: Variant
    calibration: CalibrationSettings
    tasks: TaskSettings | None  # lm-eval tasks scored besides perplexity
    seed: int

    @property
    def data_group(self) -> tuple:
        """Cells of one group share windows and one baseline."""
        return (self.model.model, self.data.data, self.data.seq_len, self.data.max_tokens, self.data.stride, self.data.bos)

    def identity(self) -> dict:
        """Everything that decides the cell's numbers; batch sizes and bootstrap settings do not."""
        variant = self.variant
        return {
            "format": CELL_FORMAT,
            "model": dataclasses.asdict(self.model),
            "data": {key: getattr(self.data, key) for key in ("data", "seq_len", "max_tokens", "stride", "bos")},
            "spec": dataclasses.asdict(variant.spec) if variant.spec is not None else None,
            "massive": dataclasses.asdict(variant.massive) if variant.massive.mode != "none" else None,
            "mitigation": [{"name": choice.name, "params": choice.params} for choice in variant.mitigation],
            # Calibration only matters to variants that read it: changing it keeps the other cells.
            "calibration": dataclasses.asdict(self.calibration) if variant.needs_calibration else None,
            "tasks": {key: getattr(self.tasks, key) for key in ("tasks", "limit", "num_fewshot", "bos")} if self.tasks else None,
            "seed": self.seed,
        }

    @property
    def key(self) -> str:
        return cell_key(self.identity())


def cell_key(identity: dict) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]
