"""Registry of quantization backends: who turns a QuantSpec into a quantized model.

``fake`` simulates any spec in float (massquant's own modules); the others hand
the model to the field's libraries for real low-bit storage and kernels. Each
entry imports its library lazily, so a missing or GPU-only library fails with a
clear message only when that backend is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from massquant.errors import UserError


@dataclass
class AppliedQuantization:
    """The model to evaluate (the same object, changed in place, or a new one) and how to go back."""

    model: torch.nn.Module
    undo: Callable[[], None]
    summary: dict


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    module: str  # massquant.backends.<module> defines check(loaded, spec) and apply(loaded, spec, calibration)
    packages: tuple[str, ...]  # import names that must be importable
    install_hint: str
    needs_cuda: bool = False

    def _implementation(self):
        missing = [p for p in self.packages if importlib.util.find_spec(p) is None]
        if missing:
            raise UserError(f"backend '{self.name}' needs {', '.join(missing)}: {self.install_hint}")
        if self.needs_cuda and not torch.cuda.is_available():
            raise UserError(f"backend '{self.name}' needs a CUDA GPU; use --backend fake to simulate the same spec")
        return importlib.import_module(f"massquant.backends.{self.module}")

    def require(self) -> None:
        """The library (and GPU) this backend needs, refused whatever the model."""
        self._implementation()

    def check(self, loaded, spec) -> None:
        """Everything this backend would refuse about ``spec`` on this model, raised before any work."""
        self._implementation().check(loaded, spec)

    def apply(self, loaded, spec, calibration: torch.Tensor | None) -> AppliedQuantization:
        return self._implementation().apply(loaded, spec, calibration)


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("fake", "simulated quantization in float: every format, granularity and KV cache", "fake", (), ""),
        Backend(
            "bnb", "bitsandbytes: LLM.int8 (w8, outlier threshold) and nf4/fp4 weights (w4, wnf4, wfp4)",
            "bnb", ("bitsandbytes",), "pip install 'massquant[bnb]'",
        ),
        Backend(
            "torchao", "torchao: int8 weight-only, int8 dynamic activations (w8a8), int4 grouped weights, float8 weights",
            "torchao_backend", ("torchao",), "pip install 'massquant[torchao]'",
        ),
        Backend(
            "gptq", "GPTQ through gptqmodel/optimum: 2/3/4/8-bit grouped weights calibrated on text",
            "gptq", ("gptqmodel", "optimum"), "pip install 'massquant[gptq]'",
        ),
    )
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"unknown backend '{name}'; accepted: {', '.join(BACKENDS)}")
    return BACKENDS[name]
