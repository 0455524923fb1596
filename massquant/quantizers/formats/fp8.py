"""FP8 (E4M3, E5M2): a scale per block maps its amax onto the format's largest value, then a cast rounds."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from massquant.quantizers.formats import NumberFormat, register_format, safe_divide


def quantize_float8(blocks: Tensor, bits: int, symmetric: bool, amax: Tensor, amin: Tensor, dtype: torch.dtype) -> Tensor:
    format_max = torch.finfo(dtype).max
    scale = amax / format_max
    # Saturate first: out-of-range casts give NaN (e4m3fn) or inf (e5m2).
    scaled = torch.clamp(safe_divide(blocks, scale), -format_max, format_max)
    return scaled.to(dtype).float() * scale


for _name, _spellings, _dtype, _max in (
    ("fp8_e4m3", ("fp8", "fp8e4m3", "e4m3"), torch.float8_e4m3fn, 448),
    ("fp8_e5m2", ("fp8e5m2", "e5m2"), torch.float8_e5m2, 57344),
):
    register_format(NumberFormat(
        name=_name, layout="scaled", bits=(8,), spellings=_spellings, torch_dtype=_dtype,
        quantize=functools.partial(quantize_float8, dtype=_dtype),
        description=f"FP8 {_name[4:].upper()} ({_dtype}, max {_max})",
    ))
