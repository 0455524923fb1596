"""The number formats ``fake_quantize`` can simulate, and validation of a format/bit-width pair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from massquant.errors import UserError


@dataclass(frozen=True)
class NumberFormat:
    """One low-precision number format.

    ``kind`` selects the quantization rule: "int" (uniform grid, scale per block),
    "float" (an fp8 dtype, scale per block) or "micro" (E2M1 elements with a shared
    scale per fixed-size block of the last dimension).
    """

    name: str
    kind: Literal["int", "float", "micro"]
    bits: tuple[int, ...]
    description: str
    default_group_size: int | None = None
    torch_dtype: torch.dtype | None = None  # the storage dtype of "float" formats
    # a second-level scale over the whole tensor couples its blocks (NVFP4's fp32 scale), so
    # "per sequence" must quantize each sequence on its own
    tensor_scale: bool = False

    @property
    def default_bits(self) -> int:
        """The width used when the caller gives none: the widest allowed."""
        return max(self.bits)


FORMATS: dict[str, NumberFormat] = {
    fmt.name: fmt
    for fmt in (
        NumberFormat(
            name="int",
            kind="int",
            bits=tuple(range(2, 9)),
            description="integer, 2-8 bits, symmetric or asymmetric round-to-nearest",
        ),
        NumberFormat(
            name="fp8_e4m3",
            kind="float",
            bits=(8,),
            description="FP8 E4M3 (torch.float8_e4m3fn, max 448)",
            torch_dtype=torch.float8_e4m3fn,
        ),
        NumberFormat(
            name="fp8_e5m2",
            kind="float",
            bits=(8,),
            description="FP8 E5M2 (torch.float8_e5m2, max 57344)",
            torch_dtype=torch.float8_e5m2,
        ),
        NumberFormat(
            name="mxfp4",
            kind="micro",
            bits=(4,),
            description="OCP MX FP4: E2M1 elements, power-of-two (E8M0) scale per block of 32",
            default_group_size=32,
        ),
        NumberFormat(
            name="nvfp4",
            kind="micro",
            bits=(4,),
            description="NVIDIA FP4: E2M1 elements, E4M3 scale per block of 16, fp32 scale per tensor",
            default_group_size=16,
            tensor_scale=True,
        ),
    )
}


def get_format(name: str) -> NumberFormat:
    """The registered format called ``name``."""
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(f"unknown number format {name!r}; valid formats: {', '.join(FORMATS)}") from None


def validate(name: str, bits: int | None) -> NumberFormat:
    """Check that ``name`` is a known format and ``bits`` one of its widths (None: its default)."""
    fmt = get_format(name)
    if bits is None or bits in fmt.bits:
        return fmt
    if len(fmt.bits) == 1:
        raise UserError(f"{name} is {fmt.bits[0]}-bit only; got bits={bits}")
    raise UserError(f"{name} bits must be {min(fmt.bits)}..{max(fmt.bits)}; got {bits}")
