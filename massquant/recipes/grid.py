"""A recipe's cell: one model, one text with its windows, one variant (``options.settings.variants``).

Each cell is identified by a hash of everything that decides its numbers, so a
finished cell is found again whatever order or recipe asked for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from massquant.data.calibration import CalibrationSettings
from massquant.evaluation.perplexity import PerplexityConfig
from massquant.evaluation.tasks import TaskSettings
from massquant.models.loading import ModelConfig
from massquant.variants import Variant

# Bumped when a cell's meaning changes, so older cached cells are not mistaken for new ones.
# 2: batch sizes and the inputs' content fingerprints are part of the identity.
CELL_FORMAT = 2


@dataclass(frozen=True)
class Cell:
    """One measurement: a model, a text with its windows, and a variant."""

    model: ModelConfig
    data: PerplexityConfig
    variant: Variant
    calibration: CalibrationSettings
    tasks: TaskSettings | None  # lm-eval tasks scored besides perplexity
    seed: int
    # Content fingerprints of what the cell reads: ("model", ...), ("data", ...), ("calibration", ...);
    # filled by massquant.recipes.execute before the cache is consulted.
    inputs: tuple[tuple[str, str | None], ...] = ()

    @property
    def data_group(self) -> tuple:
        """Cells of one group share windows and one baseline."""
        return (self.model.model, self.data.data, self.data.seq_len, self.data.max_tokens, self.data.stride, self.data.bos)

    def settings(self) -> dict:
        """Every setting that can change the cell's numbers, batch sizes included (padding and batched kernels
        change the last digits). Bootstrap settings do not: intervals are computed from the saved scores."""
        variant = self.variant
        return {
            "format": CELL_FORMAT,
            "model": dataclasses.asdict(self.model),
            "data": {key: getattr(self.data, key) for key in ("data", "seq_len", "max_tokens", "stride", "bos", "batch_size")},
            "spec": dataclasses.asdict(variant.spec) if variant.spec is not None else None,
            "massive": dataclasses.asdict(variant.massive) if variant.massive.mode != "none" else None,
            "mitigation": [{"name": choice.name, "params": choice.params} for choice in variant.mitigation],
            # Calibration only matters to variants that read it: changing it keeps the other cells.
            "calibration": dataclasses.asdict(self.calibration) if variant.needs_calibration else None,
            "tasks": {key: getattr(self.tasks, key) for key in ("tasks", "limit", "num_fewshot", "bos", "batch_size")} if self.tasks else None,
            "seed": self.seed,
        }

    def identity(self) -> dict:
        """The settings and the content of the inputs: an edited text or a model rewritten in place is another cell."""
        inputs = dict(self.inputs)
        if not self.variant.needs_calibration:
            inputs.pop("calibration", None)
        return {**self.settings(), "inputs": inputs}

    @property
    def slot(self) -> str:
        """The cell by its settings alone: finds an earlier measurement of it whose inputs have since changed."""
        return cell_key(self.settings())

    @property
    def key(self) -> str:
        return cell_key(self.identity())


def cell_key(identity: dict) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]
