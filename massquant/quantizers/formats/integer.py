"""Integer grids, 2-8 bits, symmetric or with a zero point: round-to-nearest on a uniform grid."""

from __future__ import annotations

import torch
from torch import Tensor

from massquant.quantizers.formats import NumberFormat, register_format, safe_divide


def quantize_int(blocks: Tensor, bits: int, symmetric: bool, amax: Tensor, amin: Tensor) -> Tensor:
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = amax / qmax
        # one fresh tensor, then in place: every full-size temporary of a wide activation is a new
        # allocation that page-faults, which made per-token W8A8 visibly slower than fp32
        return safe_divide(blocks, scale).round_().clamp_(-(qmax + 1), qmax).mul_(scale)
    levels = 2**bits - 1
    # The range must contain 0 so that zero (padding, ReLU outputs) is exact.
    low = torch.clamp(amin, max=0.0)
    high = torch.clamp(amax, min=0.0)
    scale = (high - low) / levels
    zero_point = torch.round(safe_divide(-low, scale))
    q = torch.clamp(torch.round(safe_divide(blocks, scale)) + zero_point, 0, levels)
    return (q - zero_point) * scale


INT = register_format(NumberFormat(
    name="int", layout="scaled", bits=tuple(range(2, 9)), quantize=quantize_int, asymmetric=True,
    description="integer, 2-8 bits, symmetric or asymmetric round-to-nearest",
))
