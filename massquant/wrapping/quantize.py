"""``quantize_(model, spec)``: simulated quantization in place, undoable.

The torchao-style entry point: a config (QuantSpec or its spec string) and one
call. Weights are quantized once here, never per forward.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from massquant.wrapping.selection import select_linears
from massquant.errors import UserError
from massquant.models.passes import run_sequences
from massquant.models.architectures import LINEAR_TYPES, architecture_of, decoder_layers
from massquant.quantizers.spec import QuantSpec, parse_spec
from massquant.wrapping.attention import attach_kv_transform
from massquant.wrapping.modules import KVQuantizer, QuantLinear, RangeObserver
from massquant.wrapping.padding import attach_padding_mask
from massquant.wrapping.sources import undo_sources

# QuantLinear reads GPT-2's Conv1D weight transposed, so simulated quantization covers it too.
QUANTIZABLE_TYPES = LINEAR_TYPES


@dataclass
class QuantizationHandle:
    """What ``quantize_`` changed; ``undo()`` (or leaving a ``with`` block) restores the model exactly."""

    model: torch.nn.Module
    spec: QuantSpec
    linears: dict[str, QuantLinear] = field(default_factory=dict)
    kv_quantizers: list[KVQuantizer] = field(default_factory=list)
    _undo_steps: list[Callable[[], None]] = field(default_factory=list)

    def undo(self) -> None:
        while self._undo_steps:
            self._undo_steps.pop()()

    def __enter__(self) -> "QuantizationHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def summary(self) -> dict:
        return {
            "backend": "fake",
            "spec": self.spec.name,
            "linears": len(self.linears),
            "kv_attention_modules": len(self.kv_quantizers),
            "static": any(not o.part.dynamic for o in self.observers()),
            "undo_sources": self.undo_sources(),
        }

    def undo_sources(self) -> dict[str, int]:
        """How many quantized weights come back from each source on undo (``massquant.wrapping.sources``):
        ``safetensors``, ``cpu_copy``, or ``separate`` (not overwritten: input-only, or a tied weight)."""
        kinds = [linear.source.kind if linear.in_place else "separate" for linear in self.linears.values()]
        return dict(sorted(Counter(kinds).items()))

    def observers(self) -> list[RangeObserver]:
        inputs = [q.input_quantizer for q in self.linears.values() if q.input_quantizer is not None]
        return inputs + list(self.kv_quantizers)


def _replace_linears(model, spec: QuantSpec, handle: QuantizationHandle) -> None:
    selected = select_linears(model, spec, QUANTIZABLE_TYPES)
    offloaded = [name for name, module in selected if module.weight.device.type == "meta"]
    if offloaded:  # accelerate keeps them elsewhere and loads them per forward: quantizing the placeholder does nothing
        raise UserError(
            f"spec '{spec.name}': {len(offloaded)} selected layers have offloaded weights (e.g. {offloaded[0]}, on the meta "
            "device under an accelerate device_map with CPU or disk offload); fake quantization needs them in memory: "
            "give the model more device memory, or load it with --device cpu"
        )
    sources = undo_sources(model, [name for name, _ in selected]) if spec.weights is not None else {}
    originals = []

    def restore() -> None:
        for name, module in reversed(originals):
            handle.linears[name].restore()
            model.set_submodule(name, module)

    handle._undo_steps.append(restore)  # before the loop: a failure part-way still restores what was changed
    for name, module in tqdm(selected, desc=f"quantizing {spec.name}", unit="linear", leave=False):
        quantized = QuantLinear(module, spec.weights, spec.activations, sources.get(name))
        if hasattr(module, "_hf_hook"):  # accelerate's device hook (a device_map) stays on the module in this place
            from accelerate.hooks import add_hook_to_module

            add_hook_to_module(quantized, module._hf_hook)
        model.set_submodule(name, quantized)
        handle.linears[name] = quantized
        originals.append((name, module))


def _attach_kv_quantizers(model, spec: QuantSpec, handle: QuantizationHandle) -> None:
    attention_path = architecture_of(model).attention
    modules = [layer.get_submodule(attention_path) for layer in decoder_layers(model)]
    handle.kv_quantizers = [KVQuantizer(spec.kv_cache) for _ in modules]
    handle._undo_steps.append(attach_kv_transform(model, modules, lambda index, _: handle.kv_quantizers[index]))


@torch.inference_mode()
def calibrate(model, observers: list[RangeObserver], calibration: torch.Tensor) -> None:
    """Run calibration sequences in full precision of the observed tensors and freeze static ranges."""
    for observer in observers:
        observer.observing = True
    run_sequences(model, calibration, description="calibrating static ranges")
    for observer in observers:
        observer.freeze()


def quantize_(model, spec: QuantSpec | str, calibration: torch.Tensor | None = None) -> QuantizationHandle:
    """Quantize ``model`` in place as ``spec`` says (fake quantization) and return the undo handle.

    ``calibration`` ([samples, seq_len] token ids) is needed when activations or
    the KV cache use static (calibrated) ranges.
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    handle = QuantizationHandle(model, spec)
    try:
        if spec.weights is not None or spec.activations is not None:
            _replace_linears(model, spec, handle)
        if spec.kv_cache is not None:
            _attach_kv_quantizers(model, spec, handle)
        if spec.activations is not None or spec.kv_cache is not None:  # their scales must not see padding
            handle._undo_steps.append(attach_padding_mask(model))
        static = [observer for observer in handle.observers() if not observer.part.dynamic]
        if static:
            if calibration is None:
                raise UserError(f"spec '{spec.name}' has static ranges and needs calibration sequences")
            calibrate(model, static, calibration)
    except BaseException:
        handle.undo()
        raise
    return handle
