"""Number formats and pure fake-quantization functions."""

from massquant.quantizers.formats import FORMATS, NumberFormat, get_format, register_format, validate
from massquant.quantizers.formats.fp4 import round_to_e2m1
from massquant.quantizers.functional import (
    GRANULARITIES,
    compute_amax,
    compute_amin,
    fake_quantize,
    search_clip_ratio,
    sqnr_db,
)

__all__ = [
    "FORMATS",
    "GRANULARITIES",
    "NumberFormat",
    "compute_amax",
    "compute_amin",
    "fake_quantize",
    "get_format",
    "register_format",
    "round_to_e2m1",
    "search_clip_ratio",
    "sqnr_db",
    "validate",
]
