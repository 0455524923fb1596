"""bitsandbytes: LLM.int8 (w8, with outlier threshold) and 4-bit nf4/fp4 weights.

The selected ``nn.Linear`` layers of the loaded model are swapped in place for
``Linear8bitLt`` / ``Linear4bit``; the originals are kept so ``undo`` can put them back.
The 4-bit block size is the spec's group size (bitsandbytes' 64 when none); as in
bitsandbytes, blocks run over the flattened row-major weight.
"""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import torch
from torch import nn

from massquant.backends import AppliedQuantization
from massquant.wrapping.selection import select_linears
from massquant.errors import UserError

SUPPORTED = "w8 (LLM.int8, per-channel, symmetric), w4 / wnf4 (nf4), wfp4 (fp4); 4-bit block sizes g32..g4096 (powers of 2)"
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCK_SIZE = 64  # bitsandbytes' own default for nf4/fp4

# LLM.int8 always quantizes activations through fp16; bitsandbytes logs that on every layer call.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")
)


def _unsupported(spec, reason: str) -> UserError:
    return UserError(f"backend bnb cannot do '{spec.name}' ({reason}); supported: {SUPPORTED}")


def _four_bit_type(spec) -> str | None:
    """``nf4``/``fp4`` for a 4-bit weight spec bitsandbytes can store, None for the int8 path; raises otherwise."""
    if spec.activations is not None or spec.kv_cache is not None:
        raise _unsupported(spec, "bitsandbytes quantizes weights only")
    weights = spec.weights
    if weights is None:
        raise _unsupported(spec, "no weight quantization requested")
    if weights.clip_search:
        raise _unsupported(spec, "no clip search in bitsandbytes")
    if weights.format == "int" and weights.bits == 8:
        if weights.granularity != "channel" or not weights.symmetric:
            raise _unsupported(spec, "LLM.int8 weights are symmetric per output channel")
        return None
    if weights.format in ("nf4", "fp4") or (weights.format == "int" and weights.bits == 4):
        if not weights.symmetric:
            raise _unsupported(spec, "nf4/fp4 blocks are scaled by their absmax, symmetric only")
        if weights.granularity == "tensor":
            raise _unsupported(spec, "4-bit weights are scaled per block")
        return "fp4" if weights.format == "fp4" else "nf4"
    raise _unsupported(spec, f"{weights.format} {weights.bits}-bit weights")


def _int8_linear(linear: nn.Linear, threshold: float) -> bnb.nn.Linear8bitLt:
    quantized = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        has_fp16_weights=False, threshold=threshold, device="meta",
    )
    quantized.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu", copy=True), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return quantized


def _four_bit_linear(linear: nn.Linear, quant_type: str, block_size: int) -> bnb.nn.Linear4bit:
    quantized = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=torch.float32, compress_statistics=False, quant_type=quant_type, device="meta",
    )
    quantized.weight = bnb.nn.Params4bit(
        linear.weight.data.to("cpu", copy=True), requires_grad=False, blocksize=block_size,
        compress_statistics=False, quant_type=quant_type, module=quantized,
    )
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    # On AVX512-BF16 CPUs bitsandbytes would repack the weight for a kernel that computes in
    # bfloat16; keeping the float32 path makes results the same on every CPU.
    quantized.support_avx512bf16_for_cpu = False
    return quantized


def check(loaded, spec) -> tuple[str | None, int]:
    """Refuse what bitsandbytes cannot do before any work; returns the 4-bit type and block size."""
    quant_type = _four_bit_type(spec)
    block_size = spec.weights.group_size or DEFAULT_BLOCK_SIZE
    if quant_type is not None and block_size not in BLOCK_SIZES:
        raise _unsupported(spec, f"block size {block_size}")
    return quant_type, block_size


def apply(loaded, spec, calibration: torch.Tensor | None) -> AppliedQuantization:
    quant_type, block_size = check(loaded, spec)
    model = loaded.model
    originals = select_linears(model, spec)
    for name, linear in originals:
        quantized = (
            _int8_linear(linear, spec.bnb_threshold)
            if quant_type is None
            else _four_bit_linear(linear, quant_type, block_size)
        )
        # Moving the still-float weight to a device is what quantizes it in bitsandbytes.
        model.set_submodule(name, quantized.to(linear.weight.device))
    # In training mode bnb takes a weight-only path that ignores the outlier threshold.
    model.eval()

    def undo() -> None:
        for name, linear in originals:
            model.set_submodule(name, linear)

    return AppliedQuantization(
        model=model,
        undo=undo,
        summary={
            "backend": "bnb",
            "modules": len(originals),
            "format": "int8" if quant_type is None else quant_type,
            "threshold": spec.bnb_threshold if quant_type is None else None,
            "block_size": None if quant_type is None else block_size,
        },
    )
