"""Fake quantization (quantize then dequantize) as pure functions on tensors.

Every function views its input as a 2-D tensor of blocks ``[n_blocks, block_len]``
(one block for the whole tensor, per row of the last dimension, or per group
of the last dimension) and reduces over ``dim=-1``, so one scale is computed
per block without Python loops over rows or tokens. The arithmetic runs in
float32 and the result is cast back to the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from massquant.errors import UserError
from massquant.quantizers.formats import NumberFormat, validate

GRANULARITIES = ("tensor", "row", "group")

def _block_length(x: Tensor, fmt: NumberFormat, granularity: str, group_size: int | None) -> int:
    """How many consecutive elements of the flattened ``x`` share one scale."""
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")
    width = x.shape[-1] if x.dim() else 1
    if fmt.layout == "micro":
        size = fmt.default_group_size if group_size is None else group_size
        if size <= 0 or width % size:
            raise UserError(f"{fmt.name} group size {size} must be positive and divide the last dimension ({width})")
        return size
    if granularity == "tensor":
        return x.numel()
    if granularity == "row":
        return width
    if group_size is None:
        raise UserError("granularity='group' needs group_size")
    if not 0 < group_size <= width:
        raise UserError(f"group size {group_size} must be between 1 and the last dimension ({width})")
    return group_size  # a ragged last group was padded by _pad_ragged_groups


def _pad_ragged_groups(x: Tensor, fmt: NumberFormat, granularity: str, group_size: int | None) -> Tensor:
    """int/fp8 rows may end in a shorter group (as GPTQ's do): zero padding never changes a group's range.

    Micro formats keep their hardware block size, which must divide the width.
    """
    if fmt.layout == "micro" or granularity != "group" or not group_size or group_size <= 0 or x.dim() == 0:
        return x
    missing = -x.shape[-1] % group_size
    return torch.nn.functional.pad(x, (0, missing)) if missing and group_size <= x.shape[-1] else x


def _as_blocks(x: Tensor, fmt: NumberFormat, granularity: str, group_size: int | None) -> Tensor:
    """``x`` as float32 ``[n_blocks, block_len]``."""
    return x.reshape(-1, _block_length(x, fmt, granularity, group_size)).float()


def _per_block(stat: Tensor | float, blocks: Tensor, name: str) -> Tensor:
    """``stat`` (scalar or per block) as a float32 ``[n_blocks, 1]`` tensor next to ``blocks``."""
    stat = torch.as_tensor(stat, dtype=torch.float32, device=blocks.device)
    try:
        return torch.broadcast_to(stat, (blocks.shape[0], 1))
    except RuntimeError:
        raise UserError(
            f"{name} must be a scalar or broadcast to the per-block shape [{blocks.shape[0]}, 1]; "
            f"got shape {list(stat.shape)}"
        ) from None


def _block_stats(blocks: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """(amax, amin) per block: |x| max and its negation when symmetric, signed max/min otherwise."""
    if symmetric:
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        return amax, -amax
    return blocks.amax(dim=-1, keepdim=True), blocks.amin(dim=-1, keepdim=True)


def _stat_shape(stat: Tensor, fmt: NumberFormat, granularity: str) -> Tensor:
    """Per-tensor statistics come back as scalars, all others as ``[n_blocks, 1]``."""
    return stat.reshape(()) if fmt.layout != "micro" and granularity == "tensor" else stat


def compute_amax(
    x: Tensor,
    granularity: str = "tensor",
    group_size: int | None = None,
    fmt: str = "int",
    symmetric: bool = True,
) -> Tensor:
    """The per-block maximum ``fake_quantize`` would use: max |x| if symmetric, else signed max.

    Returns a scalar for per-tensor granularity and ``[n_blocks, 1]`` otherwise,
    ready to be passed back as ``amax`` (static / calibrated quantization).
    """
    spec = validate(fmt, None)
    amax, _ = _block_stats(_as_blocks(_pad_ragged_groups(x, spec, granularity, group_size), spec, granularity, group_size), symmetric)
    return _stat_shape(amax, spec, granularity)


def compute_amin(
    x: Tensor,
    granularity: str = "tensor",
    group_size: int | None = None,
    fmt: str = "int",
) -> Tensor:
    """The per-block signed minimum used by asymmetric quantization; shaped like ``compute_amax``."""
    spec = validate(fmt, None)
    padded = _pad_ragged_groups(x, spec, granularity, group_size)
    _, amin = _block_stats(_as_blocks(padded, spec, granularity, group_size), symmetric=False)
    return _stat_shape(amin, spec, granularity)


def _quantize_blocks(
    blocks: Tensor, fmt: NumberFormat, bits: int, symmetric: bool, amax: Tensor, amin: Tensor
) -> Tensor:
    if fmt.quantize is None:
        raise UserError(f"{fmt.name} has no fake quantization; it runs on --backend {fmt.backend}")
    return fmt.quantize(blocks, bits, symmetric, amax, amin)


def _check_symmetry(fmt: NumberFormat, symmetric: bool) -> None:
    if not symmetric and not fmt.asymmetric:
        raise UserError(f"asymmetric quantization is only available for fmt='int'; got fmt={fmt.name!r}")


def _ranges(
    blocks: Tensor, symmetric: bool, amax: Tensor | float | None, amin: Tensor | float | None
) -> tuple[Tensor, Tensor]:
    """Per-block (amax, amin), taken from the caller when given (static) or from the data."""
    if amax is None:
        return _block_stats(blocks, symmetric)
    amax = _per_block(amax, blocks, "amax")
    if symmetric:
        return amax, -amax
    if amin is None:
        raise UserError("asymmetric quantization with a given amax also needs amin")
    return amax, _per_block(amin, blocks, "amin")


def fake_quantize(
    x: Tensor,
    fmt: str = "int",
    bits: int | None = None,
    granularity: str = "tensor",
    group_size: int | None = None,
    symmetric: bool = True,
    clip_ratio: float | Tensor = 1.0,
    amax: Tensor | None = None,
    amin: Tensor | None = None,
    keep: Tensor | None = None,
) -> Tensor:
    """``dequantize(quantize(x))`` in format ``fmt``, same shape and dtype as ``x``.

    ``bits=None`` means the format's widest allowed width (8 for int and fp8, 4 for
    mxfp4/nvfp4). ``granularity`` is "tensor", "row" (one scale per slice of the
    last dim) or "group" (``group_size`` contiguous elements of the last dim);
    mxfp4/nvfp4 always use their blocks (32/16, or ``group_size`` if given).
    ``clip_ratio`` (scalar or per block) shrinks amax/amin before the scale is
    derived; values outside the clipped range saturate. ``amax``/``amin`` (scalar
    or per block, see ``compute_amax``) replace the statistics of ``x``.
    ``keep`` (boolean, shaped like ``x``) marks values that bypass quantization:
    they take no part in any scale and come back unchanged.
    """
    spec = validate(fmt, bits)
    bits = spec.default_bits if bits is None else bits
    _check_symmetry(spec, symmetric)
    if x.numel() == 0:  # e.g. an MoE expert that received no tokens
        return x.clone()
    if keep is not None:
        # Zeros in place of the kept values never widen a range: a symmetric amax is a max of |x|,
        # and an asymmetric range always contains 0.
        others = fake_quantize(x.masked_fill(keep, 0), fmt, bits, granularity, group_size, symmetric, clip_ratio, amax, amin)
        return torch.where(keep, x, others)
    padded = _pad_ragged_groups(x, spec, granularity, group_size)
    blocks = _as_blocks(padded, spec, granularity, group_size)
    block_amax, block_amin = _ranges(blocks, symmetric, amax, amin)
    ratio = _per_block(clip_ratio, blocks, "clip_ratio")
    dequantized = _quantize_blocks(blocks, spec, bits, symmetric, block_amax * ratio, block_amin * ratio)
    return dequantized.reshape(padded.shape)[..., : x.shape[-1]].to(x.dtype)


def token_mask_like(real: Tensor | None, x: Tensor, token_dim: int = 1) -> Tensor | None:
    """``real`` (``[batch, tokens]``, True at real tokens) shaped to broadcast against ``x``, whose dim 0 is the
    batch and ``token_dim`` the tokens (``[batch, tokens, ...]`` by default, keys ``[batch, heads, tokens, head_dim]``).

    A 2-D ``x`` is one sequence ``[tokens, features]``; its mask is ``real[0]``.
    """
    if real is None:
        return None
    if x.dim() < 3:
        return real.reshape(-1, 1)
    shape = [1] * x.dim()
    shape[0], shape[token_dim] = real.shape
    return real.reshape(shape)


def outlier_cutoff(x: Tensor, abs_threshold: float, median_ratio: float, real: Tensor | None = None) -> Tensor:
    """The magnitude an outlier must exceed, per sequence: ``max(abs_threshold, median_ratio x median |x|)``.

    ``x`` is ``[batch, tokens, ...]`` (one sequence per index of dim 0) or
    ``[tokens, features]`` (one sequence); the median (the lower one, as
    ``torch.median``) is over the sequence's real tokens (``real``, ``[batch,
    tokens]``; None: all), so neither the other sequences of a batch nor padding
    move it. Returns ``[batch, 1, ...]`` (``x.dim()`` dims), or a 0-d tensor for
    one sequence. A sequence without real tokens gets +inf.
    """
    magnitudes = x.detach().abs().float()
    sequences = magnitudes[None] if x.dim() < 3 else magnitudes
    masks = [None] * len(sequences) if real is None else list(real.reshape(len(sequences), -1))
    medians = torch.stack([
        torch.tensor(math.inf, device=x.device) if mask is not None and not bool(mask.any())
        else (sequence if mask is None else sequence[mask]).median()
        for sequence, mask in zip(sequences, masks)
    ])
    cutoff = torch.clamp(median_ratio * medians, min=abs_threshold)
    return cutoff.reshape(()) if x.dim() < 3 else cutoff.reshape(-1, *[1] * (x.dim() - 1))


def outlier_mask(
    x: Tensor, abs_threshold: float, median_ratio: float, channels: Sequence[int] | None = None,
    real: Tensor | None = None,
) -> Tensor | None:
    """Where |x| > ``abs_threshold`` and > ``median_ratio`` x the median |x| of its sequence (``outlier_cutoff``).

    Only ``channels`` (indices of the last dimension; None: all) are inspected,
    and only real tokens (``real``, ``[batch, tokens]``; None: all) qualify.
    Returns None when no value qualifies, so callers can skip masked work.
    """
    inspected = (x if channels is None else x[..., list(channels)]).detach().abs()
    # The median is the costly part; it matters only when some value passes the absolute threshold.
    if inspected.numel() == 0 or not bool(inspected.amax() > abs_threshold):
        return None
    found = inspected > outlier_cutoff(x, abs_threshold, median_ratio, real)
    if real is not None:
        found &= token_mask_like(real, x)
    if not bool(found.any()):
        return None
    if channels is None:
        return found
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[..., list(channels)] = found
    return mask


def search_clip_ratio(
    x: Tensor,
    fmt: str = "int",
    bits: int | None = None,
    granularity: str = "tensor",
    group_size: int | None = None,
    symmetric: bool = True,
    grid: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Per block, the clip ratio from ``grid`` (default 1.0 down to 0.5 in 11 steps) with the lowest MSE.

    Returns ``[n_blocks, 1]``, to pass as ``clip_ratio`` with the same format and
    granularity. Ties keep the earlier grid value. For nvfp4 the per-tensor scale
    couples the blocks, so there each block's choice is made as if all blocks
    shared its ratio.
    """
    spec = validate(fmt, bits)
    bits = spec.default_bits if bits is None else bits
    _check_symmetry(spec, symmetric)
    blocks = _as_blocks(_pad_ragged_groups(x, spec, granularity, group_size), spec, granularity, group_size)
    block_amax, block_amin = _block_stats(blocks, symmetric)
    ratios = torch.as_tensor(
        torch.linspace(1.0, 0.5, 11) if grid is None else grid, dtype=torch.float32, device=blocks.device
    )
    best_ratio = torch.ones_like(block_amax)  # no clipping unless a grid value does better
    best_error = torch.full_like(block_amax, math.inf)
    for ratio in ratios:
        dequantized = _quantize_blocks(blocks, spec, bits, symmetric, block_amax * ratio, block_amin * ratio)
        error = (dequantized - blocks).square().mean(dim=-1, keepdim=True)
        better = error < best_error
        best_ratio = torch.where(better, ratio, best_ratio)
        best_error = torch.where(better, error, best_error)
    return best_ratio


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB; +inf when ``approx`` equals ``reference``."""
    if reference.shape != approx.shape:
        raise UserError(f"sqnr_db needs equal shapes; got {list(reference.shape)} and {list(approx.shape)}")
    reference = reference.double()
    return energy_ratio_db(reference.square().sum().item(), (reference - approx.double()).square().sum().item())


def energy_ratio_db(signal: float, noise: float) -> float:
    """10·log10(signal/noise) from summed squares: +inf when exact, -inf for noise on a zero signal."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)
