"""Where an in-place quantized weight's original values come back from on undo.

Fake quantization writes the quantized values into the original weight's own
storage (as torchao's ``quantize_`` and optimum-quanto's ``freeze`` do), so a
wrapped model holds one copy of its weights. Undo needs the originals, from the
most compact source that reproduces them bit for bit:

- ``safetensors``: the checkpoint the model was loaded from (a Hugging Face
  directory, or massquant's de-quantized GGUF cache, which is one), memory-mapped
  with ``safetensors.safe_open`` and read one tensor at a time. Used only when the
  tensor in the file equals the current weight exactly (a mitigation applied
  before quantization, such as a rotation, changes the weights, and the file no
  longer holds them) and the file is unchanged (size, mtime) at undo.
- ``cpu_copy``: a clone of the original on the CPU; for a model with no
  checkpoint on disk (built in memory, or changed since loading). On an
  accelerator it costs host memory, not device memory; on the CPU it costs what
  the weight does.
- ``shared``: a weight whose storage another parameter also uses (an output
  projection tied to the input embedding) is not overwritten; the quantized
  values get storage of their own and the original stays as it is.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class SafetensorsSource:
    """One tensor of a safetensors file, with the file's size and mtime when it was checked against the weight."""

    path: str
    key: str
    stamp: tuple[int, int]

    kind = "safetensors"

    def load(self) -> torch.Tensor:
        """The tensor as stored (CPU). Raises RuntimeError when the file changed since it was checked."""
        status = os.stat(self.path)
        if (status.st_size, status.st_mtime_ns) != self.stamp:
            raise RuntimeError(f"{self.path} changed after quantization; the original weight '{self.key}' cannot be restored from it")
        with safe_open(self.path, framework="pt", device="cpu") as handle:
            return handle.get_tensor(self.key)


@dataclass(frozen=True)
class CpuCopy:
    """A clone of the original weight on the CPU."""

    tensor: torch.Tensor

    kind = "cpu_copy"

    def load(self) -> torch.Tensor:
        return self.tensor


def checkpoint_files(model: nn.Module) -> dict[str, Path]:
    """Parameter name -> safetensors file, for the directory the model was loaded from
    (``model.name_or_path``); empty when there is none (a model built in memory, a GGUF file, a hub id)."""
    directory = Path(str(getattr(model, "name_or_path", "") or ""))
    if not str(directory) or not directory.is_dir():
        return {}
    if (directory / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        except (OSError, ValueError, KeyError):
            return {}
        return {key: directory / name for key, name in weight_map.items() if (directory / name).is_file()}
    single = directory / SINGLE_FILE
    if not single.is_file():
        return {}
    with safe_open(str(single), framework="pt", device="cpu") as handle:
        return {key: single for key in handle.keys()}


def shared_storages(model: nn.Module) -> set[int]:
    """Storages that more than one parameter uses (tied weights): never overwritten in place."""
    counts = Counter(parameter.untyped_storage().data_ptr() for _, parameter in model.named_parameters(remove_duplicate=False))
    return {pointer for pointer, count in counts.items() if count > 1}


def undo_sources(model: nn.Module, names: list[str]) -> dict[str, SafetensorsSource | CpuCopy | None]:
    """For each linear module name, where its weight's original comes back from; None: not overwritten (shared).

    Each candidate tensor of the checkpoint is read once and compared with the
    current weight (``torch.equal``); it is dropped right after, so no second
    copy stays resident.
    """
    files = checkpoint_files(model)
    shared = shared_storages(model)
    sources: dict[str, SafetensorsSource | CpuCopy | None] = {}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        weight = model.get_submodule(name).weight
        if weight.untyped_storage().data_ptr() in shared:
            sources[name] = None
        elif f"{name}.weight" in files:
            by_file.setdefault(files[f"{name}.weight"], []).append(name)
        else:
            sources[name] = CpuCopy(weight.detach().to("cpu", copy=True))
    for path, members in by_file.items():
        status = os.stat(path)
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in members:
                weight = model.get_submodule(name).weight.detach()
                stored = handle.get_tensor(f"{name}.weight")
                same = stored.dtype == weight.dtype and stored.shape == weight.shape and torch.equal(stored, weight.cpu())
                sources[name] = (
                    SafetensorsSource(str(path), f"{name}.weight", (status.st_size, status.st_mtime_ns))
                    if same else CpuCopy(weight.to("cpu", copy=True))
                )
                del stored
    return {name: sources[name] for name in names}
