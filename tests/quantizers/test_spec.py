"""The one spec syntax: what each string means, and the errors for what it cannot mean."""

from __future__ import annotations

import pytest

from massquant.errors import UserError
from massquant.quantizers.spec import TensorQuantSpec, parse_spec, spec_text_from_flags, with_granularity


@pytest.mark.parametrize(
    "text, weights, activations, kv",
    [
        ("w4g128", TensorQuantSpec("int", 4, "group", 128), None, None),
        ("w8", TensorQuantSpec("int", 8, "channel"), None, None),
        ("w4", TensorQuantSpec("int", 4, "group", 128), None, None),  # 4-bit default: g128
        ("w8a8", TensorQuantSpec("int", 8, "channel"), TensorQuantSpec("int", 8, "token"), None),
        ("w4a8-token", TensorQuantSpec("int", 4, "group", 128), TensorQuantSpec("int", 8, "token"), None),
        ("w8a8-tensor", TensorQuantSpec("int", 8, "channel"), TensorQuantSpec("int", 8, "tensor"), None),
        ("w8a8kv8", TensorQuantSpec("int", 8, "channel"), TensorQuantSpec("int", 8, "token"), TensorQuantSpec("int", 8, "head")),
        ("wfp8afp8", TensorQuantSpec("fp8_e4m3", 8, "channel"), TensorQuantSpec("fp8_e4m3", 8, "token"), None),
        ("wfp8e5m2", TensorQuantSpec("fp8_e5m2", 8, "channel"), None, None),
        ("wmxfp4amxfp4", TensorQuantSpec("mxfp4", 4, "channel"), TensorQuantSpec("mxfp4", 4, "token"), None),
        ("w4g64-asym-mse", TensorQuantSpec("int", 4, "group", 64, symmetric=False, clip_search=True), None, None),
        ("a8-static-p99.9", None, TensorQuantSpec("int", 8, "tensor", dynamic=False, calibration="p99.9"), None),
        ("kv4g32", None, None, TensorQuantSpec("int", 4, "group", 32)),
        ("W3G32", TensorQuantSpec("int", 3, "group", 32), None, None),
    ],
)
def test_spec_strings(text, weights, activations, kv):
    spec = parse_spec(text)
    assert (spec.weights, spec.activations, spec.kv_cache) == (weights, activations, kv)
    assert parse_spec(spec.name) == spec  # the canonical name parses back to the same spec


@pytest.mark.parametrize(
    "text, message",
    [
        ("w9", "int bits must be 2..8; got 9"),
        ("w1", "int bits must be 2..8; got 1"),
        ("x4", "cannot parse spec"),
        ("w4w8", "sets 'w' twice"),
        ("a8-channel", "granularity 'channel' is not valid for activations"),
        ("w8-static", "weights are always quantized once"),
        ("a8-mse", "applies to weights only"),
        ("anf4", "nf4 is a weight-only format (runs on --backend bnb)"),
        ("wfp8-asym", "asymmetric quantization is only available for integer formats"),
        ("a8-static-token", "static (calibrated) scales are per tensor"),
        ("w8-group", "needs a group size"),
        ("a8-p150", "percentile 150"),
    ],
)
def test_bad_specs(text, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(text)


def test_flags_are_written_as_specs():
    assert spec_text_from_flags(bits=4) == "w4"
    assert spec_text_from_flags(bits=4, group_size=64, act_bits=8, act_granularity="tensor", symmetric=False) == "w4g64-asyma8-tensor-asym"
    assert parse_spec(spec_text_from_flags(fmt="fp8_e5m2", act_bits=8)).activations.format == "fp8_e5m2"
    assert spec_text_from_flags(kv_bits=4, kv_granularity="token") == "kv4-token"
    with pytest.raises(UserError, match="fp8_e4m3 is 8-bit only"):
        spec_text_from_flags(fmt="fp8_e4m3", bits=3)
    with pytest.raises(UserError, match="unknown number format 'int3'"):
        spec_text_from_flags(fmt="int3", bits=3)


def test_granularity_flags_apply_to_spec_strings():
    """`--spec w8a8 --act-granularity tensor` must mean w8a8-tensor, not a silently ignored flag."""
    from massquant.cli.main import build_parser
    from massquant.options.settings import quant_specs

    parser = build_parser()
    args = parser.parse_args(["eval", "--spec", "w8a8,w4", "--act-granularity", "tensor", "--kv-bits", "8", "--kv-granularity", "token"])
    assert [spec.name for spec in quant_specs(args)] == ["w8a8-tensor", "w4g128", "kv8-token"]
    assert with_granularity(parse_spec("w8a8kv4"), "kv", "token") == parse_spec("w8a8kv4-token")
    with pytest.raises(UserError, match="act_granularity tensor needs a spec that quantizes that tensor"):
        quant_specs(parser.parse_args(["eval", "--spec", "w4", "--act-granularity", "tensor"]))
    with pytest.raises(UserError, match="static .* scales are per tensor"):
        with_granularity(parse_spec("a8-static"), "a", "token")
