"""Simulated quantization with massquant's own modules (every format, granularity, KV cache)."""

from __future__ import annotations

from massquant.backends import AppliedQuantization
from massquant.wrapping.quantize import quantize_


def check(loaded, spec) -> None:
    """Every spec the parser accepts is simulated."""


def apply(loaded, spec, calibration) -> AppliedQuantization:
    handle = quantize_(loaded.model, spec, calibration)
    return AppliedQuantization(loaded.model, handle.undo, handle.summary())
