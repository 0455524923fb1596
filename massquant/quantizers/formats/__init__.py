"""Number formats: each entry owns its math (``quantize``) and its spelling in specs (``spellings``).

A format is added by one module in this folder that calls ``register_format``
(and an import at the bottom of this file), or from anywhere else — a plugin,
a test — before specs are parsed: the spec grammar, labels, default widths and
the fake-quantization dispatch are all read from the registry. Modelled on
optimum-quanto's ``qtype`` registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from massquant.errors import UserError

# blocks [n_blocks, block_len] float32, bits, symmetric, amax and amin [n_blocks, 1] -> dequantized blocks
QuantizeBlocks = Callable[[Tensor, int, bool, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class NumberFormat:
    """One low-precision number format.

    ``layout`` says how scales are laid out: "scaled" formats take a scale per block
    of the requested granularity (tensor, row, group); "micro" formats have fixed
    hardware blocks of ``default_group_size`` elements of the last dimension.
    ``quantize`` is None for formats only a real backend implements (``backend``).
    ``spellings`` are the spec tokens (the first is the label); an integer format
    is spelled by its bit width (``w4``) and has none.
    """

    name: str
    layout: Literal["scaled", "micro"]
    bits: tuple[int, ...]
    description: str
    quantize: QuantizeBlocks | None
    spellings: tuple[str, ...] = ()
    default_group_size: int | None = None
    torch_dtype: torch.dtype | None = None  # the storage dtype of fp8 formats
    # a second-level scale over the whole tensor couples its blocks (NVFP4's fp32 scale), so
    # "per sequence" must quantize each sequence on its own
    tensor_scale: bool = False
    asymmetric: bool = False  # a zero point is possible (integer grids)
    backend: str | None = None  # the real backend that implements a format without fake quantization
    weight_only: bool = False

    @property
    def default_bits(self) -> int:
        """The width used when the caller gives none: the widest allowed."""
        return max(self.bits)

    @property
    def label(self) -> str:
        return self.spellings[0] if self.spellings else self.name


FORMATS: dict[str, NumberFormat] = {}
_SPELLINGS: dict[str, str] = {}  # spec token -> format name


def register_format(fmt: NumberFormat) -> NumberFormat:
    """Add ``fmt`` to the registry; its spellings become spec tokens (``w<spelling>``, ``a<spelling>``)."""
    taken = [token for token in (fmt.name, *fmt.spellings) if _SPELLINGS.get(token, fmt.name) != fmt.name]
    if fmt.name in FORMATS or taken:
        raise ValueError(f"number format {fmt.name!r} or its spellings {taken} are already registered")
    FORMATS[fmt.name] = fmt
    for token in (fmt.name, *fmt.spellings):
        _SPELLINGS[token] = fmt.name
    return fmt


def spellings() -> list[str]:
    """Every spec token that names a format, longest first (so ``fp8e5m2`` is tried before ``fp8``)."""
    return sorted((token for fmt in FORMATS.values() for token in fmt.spellings), key=len, reverse=True)


def format_named(token: str) -> NumberFormat:
    """The format a spec token or a registry name spells (``fp8`` or ``fp8_e4m3``)."""
    try:
        return FORMATS[_SPELLINGS[token]]
    except KeyError:
        raise UserError(f"unknown number format {token!r}; valid formats: {', '.join(FORMATS)}") from None


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


def safe_divide(blocks: Tensor, scale: Tensor) -> Tensor:
    """``blocks / scale`` where a zero scale (all-zero or fully clipped block) divides by 1 instead of NaN."""
    return blocks / torch.where(scale > 0, scale, torch.ones_like(scale))


# The built-in formats register themselves (after the definitions above, which they use).
from massquant.quantizers.formats import integer, fp8, fp4, bitsandbytes  # noqa: E402,F401
