"""bitsandbytes' 4-bit weight formats: real kernels only (``--backend bnb``), no fake quantization here."""

from __future__ import annotations

from massquant.quantizers.formats import NumberFormat, register_format

for _name, _description in (("nf4", "normal-float 4-bit (bitsandbytes)"), ("fp4", "float 4-bit (bitsandbytes)")):
    register_format(NumberFormat(
        name=_name, layout="scaled", bits=(4,), spellings=(_name,), quantize=None, backend="bnb",
        weight_only=True, description=_description,
    ))
