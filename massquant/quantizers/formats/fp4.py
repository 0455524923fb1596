"""FP4 E2M1 micro-scaled formats: OCP MX FP4 (E8M0 scale per 32) and NVIDIA NVFP4 (E4M3 scale per 16, fp32 per tensor)."""

from __future__ import annotations

import torch
from torch import Tensor

from massquant.quantizers.formats import NumberFormat, register_format, safe_divide

E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest E2M1 binade: 6 = 1.5 * 2**2
E8M0_EXPONENT_LIMIT = 127
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def round_to_e2m1(x: Tensor) -> Tensor:
    """Nearest FP4 E2M1 value (±{0, 0.5, 1, 1.5, 2, 3, 4, 6}), ties to even mantissa, saturating at ±6."""
    magnitude = x.abs()
    # Grid spacing is 0.5 below 2, 1 in [2, 4) and 2 from 4 on; rounding in units of
    # the spacing with round-half-to-even matches E2M1's ties-to-even encoding.
    step = torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))
    rounded = torch.clamp(torch.round(magnitude / step) * step, max=E2M1_MAX)
    return torch.copysign(rounded, x)


def quantize_mxfp4(blocks: Tensor, bits: int, symmetric: bool, amax: Tensor, amin: Tensor) -> Tensor:
    # frexp gives amax = mantissa * 2**exponent with mantissa in [0.5, 1), so floor(log2(amax))
    # is exponent - 1 exactly, with no log2 rounding near powers of two.
    _, exponent = torch.frexp(amax)
    shared_exponent = torch.clamp(exponent - 1 - E2M1_EMAX, -E8M0_EXPONENT_LIMIT, E8M0_EXPONENT_LIMIT)
    scale = torch.where(amax > 0, torch.exp2(shared_exponent.float()), torch.zeros_like(amax))
    return round_to_e2m1(safe_divide(blocks, scale)) * scale


def quantize_nvfp4(blocks: Tensor, bits: int, symmetric: bool, amax: Tensor, amin: Tensor) -> Tensor:
    # The fp32 per-tensor scale maps the largest block scale onto E4M3's maximum.
    global_scale = amax.max() / (E2M1_MAX * E4M3_MAX)
    block_scale = torch.clamp(safe_divide(amax / E2M1_MAX, global_scale), max=E4M3_MAX)
    scale = block_scale.to(torch.float8_e4m3fn).float() * global_scale
    return round_to_e2m1(safe_divide(blocks, scale)) * scale


MXFP4 = register_format(NumberFormat(
    name="mxfp4", layout="micro", bits=(4,), spellings=("mxfp4",), quantize=quantize_mxfp4, default_group_size=32,
    description="OCP MX FP4: E2M1 elements, power-of-two (E8M0) scale per block of 32",
))
NVFP4 = register_format(NumberFormat(
    name="nvfp4", layout="micro", bits=(4,), spellings=("nvfp4",), quantize=quantize_nvfp4, default_group_size=16,
    tensor_scale=True, description="NVIDIA FP4: E2M1 elements, E4M3 scale per block of 16, fp32 scale per tensor",
))
