"""Modules that hold quantization state; the math is in massquant.quantizers."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from massquant.models.architectures import weight_out_in
from massquant.quantizers.spec import TensorQuantSpec
from massquant.quantizers.tensors import (
    KeepRule, keep_mask, observed_range, quantize_activation, quantize_kv, quantize_weight, real_rows,
)
from massquant.wrapping.padding import real_tokens


class RangeObserver(nn.Module):
    """A tensor quantizer's calibration state: dynamic, observing, or frozen with a static range."""

    def __init__(self, part: TensorQuantSpec):
        super().__init__()
        self.part = part
        self.observing = False
        self.register_buffer("amax", None)
        self.register_buffer("amin", None)
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def observe(
        self, x: torch.Tensor, real: torch.Tensor | None = None, token_dim: int = 1, left_out: torch.Tensor | None = None
    ) -> None:
        """Record each sequence's range over its real tokens (``real``, ``[batch, tokens]``; None: all),
        without the values ``left_out`` marks (shaped like ``x``)."""
        sequences = real_rows(x, real, token_dim)
        excluded = [None] * len(sequences) if left_out is None else real_rows(left_out, real, token_dim)
        for rows, skip in zip(sequences, excluded):
            values = rows if skip is None else rows[~skip]
            if values.numel():
                self._batches.append(observed_range(values, self.part))

    def freeze(self) -> None:
        """Min-max takes the extremes over sequences; a percentile is averaged over them."""
        if not self._batches:
            raise RuntimeError("calibration saw no input for this quantizer")
        highs = torch.stack([high for high, _ in self._batches])
        lows = torch.stack([low for _, low in self._batches])
        if self.part.calibration == "minmax":
            self.amax, self.amin = highs.max(), lows.min()
        else:
            self.amax, self.amin = highs.mean(), lows.mean()
        self._batches.clear()
        self.observing = False

    @property
    def static_range(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (self.amax, self.amin if not self.part.symmetric else None)


class ActivationQuantizer(RangeObserver):
    """Quantizes a linear layer's input, per token or per tensor.

    With a ``keep`` rule, the values it selects bypass quantization and stay out
    of the scales (and out of calibrated ranges); ``kept_values`` and
    ``inspected_values`` count them over every quantized forward.
    """

    def __init__(self, part: TensorQuantSpec):
        super().__init__(part)
        self.keep: KeepRule | None = None
        self.kept_values = 0
        self.inspected_values = 0
        self.on_kept: Callable[[torch.Tensor], None] | None = None  # sees each evaluated forward's kept mask (records where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real = real_tokens(x.shape[0], x.shape[1]) if x.dim() >= 3 else None
        kept = None if self.keep is None else keep_mask(x, self.keep, real)
        if self.observing:
            self.observe(x, real, left_out=kept)
            return x
        if self.keep is not None:
            self.kept_values += 0 if kept is None else int(kept.sum())
            if kept is not None and self.on_kept is not None:
                self.on_kept(kept)
            self.inspected_values += x.numel() if real is None else int(real.sum()) * x.shape[-1]
        return quantize_activation(x, self.part, *self.static_range, keep=kept, real=real)


class KVQuantizer(RangeObserver):
    """Quantizes one attention module's keys and values (after RoPE), as a KV cache would hold them."""

    def __init__(self, part: TensorQuantSpec):
        super().__init__(part)
        self.values = RangeObserver(part)  # keys and values have separate static ranges

    def forward(self, module, key, value, attention_mask):
        real = real_tokens(key.shape[0], key.shape[2])
        if self.observing:
            self.observe(key, real, token_dim=2)
            self.values.observe(value, real, token_dim=2)
            return key, value, attention_mask
        key = quantize_kv(key, self.part, *self.static_range, real=real)
        value = quantize_kv(value, self.part, *self.values.static_range, real=real)
        return key, value, attention_mask

    def freeze(self) -> None:
        super().freeze()
        self.values.freeze()


class QuantLinear(nn.Module):
    """A linear layer with its weight quantized once and, optionally, its input per forward.

    The quantized values are written into the original weight's storage
    (``self.weight`` is a view of it, ``[out, in]``), so no second copy of the
    weight exists; ``source`` (see ``massquant.wrapping.sources``) gives the
    original values back for ``restore()``. With ``source=None`` the original is
    left untouched and the quantized weight gets storage of its own (a weight
    tied to another parameter).
    """

    def __init__(self, original: nn.Module, weight_part: TensorQuantSpec | None, input_part: TensorQuantSpec | None, source=None):
        super().__init__()
        weight = weight_out_in(original).detach()  # a view: written in place below
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.original = [original]  # a list, so the original is neither a submodule nor in state_dict
        self.source = source if weight_part else None  # an input-only quantizer leaves the weight as it is
        with torch.no_grad():
            if weight_part is not None:
                quantized = quantize_weight(weight, weight_part)
                if self.source is not None:
                    weight.copy_(quantized)
                else:
                    weight = quantized.contiguous()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = original.bias
        self.weight_part = weight_part
        self.input_quantizer = ActivationQuantizer(input_part) if input_part else None

    @property
    def in_place(self) -> bool:
        """Whether the quantized values overwrote the original weight's storage."""
        return self.source is not None

    def original_weight(self) -> torch.Tensor:
        """The full-precision weight ``[out, in]`` on the weight's device (read from the undo source when overwritten)."""
        if not self.in_place:
            return weight_out_in(self.original[0]).detach()
        stored = self.source.load().to(self.weight.device)  # in the module's own layout
        return stored if isinstance(self.original[0], nn.Linear) else stored.t()

    def restore(self) -> None:
        """Write the original values back into the original weight, bit for bit."""
        if self.in_place:
            with torch.no_grad():
                self.original[0].weight.copy_(self.source.load())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        weight = self.weight_part.label("w") if self.weight_part else "fp"
        activation = self.input_quantizer.part.label("a") if self.input_quantizer else "fp"
        return f"in={self.in_features}, out={self.out_features}, weight={weight}, input={activation}"
