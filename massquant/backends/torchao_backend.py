"""torchao: int8 weight-only, int8 dynamic activations + int8 weights, 2..7-bit grouped integer weights, float8 weights.

``torchao.quantization.quantize_`` turns the selected linears' weights, in place, into
torchao tensor subclasses; ``undo`` puts the original ``weight`` Parameters back.
Configs are built with ``set_inductor_config=False``: those settings only matter under
torch.compile and would change process-wide state.
"""

from __future__ import annotations

import torch
from torchao.quantization import (
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    MappingType,
    PerAxis,
    PerGroup,
    PerRow,
    PerTensor,
    quantize_,
)

from massquant.backends import AppliedQuantization
from massquant.wrapping.selection import check_group_divides, select_linears
from massquant.errors import UserError

SUPPORTED = (
    "w8 (Int8WeightOnly; -channel, -tensor or gN), "
    "w8a8 (Int8DynamicActivationInt8Weight; weights -channel/-tensor, activations dynamic -token/-tensor), "
    "w2..w7 gN or -channel (IntxWeightOnly, -sym/-asym), "
    "wfp8 / wfp8e5m2 (Float8WeightOnly; -channel, -tensor or gN)"
)
FLOAT8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _unsupported(spec, reason: str) -> UserError:
    return UserError(f"backend torchao cannot do '{spec.name}' ({reason}); supported: {SUPPORTED}")


def _granularity(weights):
    """torchao granularity of a weight spec: PerRow = one scale per output channel."""
    if weights.granularity == "group":
        return PerGroup(weights.group_size)
    return PerRow() if weights.granularity == "channel" else PerTensor()


def _config(spec):
    """The torchao config for a spec; raises UserError for anything torchao cannot do on its own."""
    weights, activations = spec.weights, spec.activations
    if spec.kv_cache is not None:
        raise _unsupported(spec, "no KV-cache quantization in torchao's quantize_")
    if weights is None:
        raise _unsupported(spec, "torchao quantizes weights, optionally with activations")
    if weights.clip_search:
        raise _unsupported(spec, "no clip search in torchao")
    if activations is not None:
        if not (weights.format == "int" and weights.bits == 8 and activations.format == "int" and activations.bits == 8):
            raise _unsupported(spec, "activations only as int8 with int8 weights")
        if not activations.dynamic:
            raise _unsupported(spec, "activation scales are dynamic only")
        if weights.granularity == "group" or not weights.symmetric:
            raise _unsupported(spec, "w8a8 weights are symmetric per channel or per tensor")
        act_granularity = PerRow() if activations.granularity == "token" else PerTensor()
        return Int8DynamicActivationInt8WeightConfig(
            granularity=[act_granularity, _granularity(weights)],
            act_mapping_type=MappingType.SYMMETRIC if activations.symmetric else MappingType.ASYMMETRIC,
            set_inductor_config=False,
        )
    if weights.format in FLOAT8_DTYPES:
        return Float8WeightOnlyConfig(
            weight_dtype=FLOAT8_DTYPES[weights.format], granularity=_granularity(weights), set_inductor_config=False
        )
    if weights.format == "int" and weights.bits == 8:
        if not weights.symmetric:
            raise _unsupported(spec, "int8 weight-only is symmetric")
        return Int8WeightOnlyConfig(granularity=_granularity(weights), set_inductor_config=False)
    if weights.format == "int" and 2 <= weights.bits <= 7:
        if weights.granularity == "tensor":
            raise _unsupported(spec, "low-bit integer weights are per channel or per group")
        return IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{weights.bits}"),
            granularity=PerGroup(weights.group_size) if weights.granularity == "group" else PerAxis(0),
            mapping_type=MappingType.SYMMETRIC if weights.symmetric else MappingType.ASYMMETRIC,
        )
    raise _unsupported(spec, f"{weights.format} {weights.bits}-bit weights")


def check(loaded, spec) -> tuple[object, list]:
    """Refuse what torchao cannot do before any work; returns its config and the selected linears."""
    config = _config(spec)
    selected = select_linears(loaded.model, spec)
    group = spec.weights.group_size if spec.weights.granularity == "group" else None
    check_group_divides(spec, selected, group, "pick a group size dividing them all")
    return config, selected


def apply(loaded, spec, calibration: torch.Tensor | None) -> AppliedQuantization:
    config, selected = check(loaded, spec)
    model = loaded.model
    # quantize_ replaces the weight Parameter and patches extra_repr on the module itself.
    originals = [(linear, linear.weight, linear.__dict__.get("extra_repr")) for _, linear in selected]
    names = {name for name, _ in selected}
    quantize_(model, config, filter_fn=lambda module, name: name in names)

    def undo() -> None:
        for linear, weight, extra_repr in originals:
            linear.weight = weight
            if extra_repr is None:
                linear.__dict__.pop("extra_repr", None)
            else:
                linear.extra_repr = extra_repr

    return AppliedQuantization(
        model=model,
        undo=undo,
        summary={"backend": "torchao", "modules": len(selected), "config": type(config).__name__, "spec": spec.name},
    )
