"""Real-library backends on the tiny LLaMA (hidden 64, MLP 128): bitsandbytes, torchao, GPTQ."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os

import pytest
import torch
from torch import nn

from massquant.backends import Backend, get_backend
from massquant.wrapping.selection import select_linears
from massquant.errors import UserError
from massquant.evaluation.perplexity import PerplexityConfig, build_windows, perplexity
from massquant.models.loading import load_model
from massquant.quantizers.spec import parse_spec
from tests.conftest import TRAINING_TEXT

DECODER_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(model=tiny_llama_dir)


@pytest.fixture(scope="module")
def token_ids(tiny):
    return tiny.tokenizer(TRAINING_TEXT[:300], return_tensors="pt").input_ids


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def relative_error(quantized, reference) -> float:
    return float((quantized - reference).norm() / reference.norm())


@contextlib.contextmanager
def quantized(loaded, spec_text, backend, calibration=None, **settings):
    """The AppliedQuantization, undone afterwards so the shared model stays full precision."""
    applied = get_backend(backend).apply(loaded, parse_spec(spec_text, backend=backend, **settings), calibration)
    try:
        yield applied
    finally:
        applied.undo()


# --- module selection ---------------------------------------------------------------------------


def test_selection_skips_lm_head_and_applies_include_then_exclude(tiny):
    names = [name for name, _ in select_linears(tiny.model, parse_spec("w8"))]
    assert len(names) == DECODER_LINEARS and "lm_head" not in names
    assert "lm_head" in [name for name, _ in select_linears(tiny.model, parse_spec("w8", quantize_lm_head=True))]
    chosen = select_linears(tiny.model, parse_spec("w8", include=(r"mlp\.",), exclude=(r"down_proj",)))
    assert [name for name, _ in chosen] == [
        f"model.layers.{i}.mlp.{proj}" for i in range(2) for proj in ("gate_proj", "up_proj")
    ]
    with pytest.raises(UserError, match="selects no linear layer"):
        select_linears(tiny.model, parse_spec("w8", include=("no_such_module",)))


def test_missing_package_names_the_install_hint(tiny):
    ghost = Backend("ghost", "needs a package that is not installed", "bnb", ("no_such_pkg",), "pip install ghost")
    with pytest.raises(UserError, match=r"no_such_pkg: pip install ghost"):
        ghost.apply(tiny, parse_spec("w8", backend="bnb"), None)


# --- bitsandbytes -------------------------------------------------------------------------------


def test_bnb_int8_replaces_linears_and_undo_restores_exact_logits(tiny, token_ids):
    import bitsandbytes as bnb

    reference = logits(tiny.model, token_ids)
    original_up_proj = tiny.model.model.layers[0].mlp.up_proj
    with quantized(tiny, "w8", "bnb", bnb_threshold=4.0) as applied:
        replaced = [module for _, module in select_linears(applied.model, parse_spec("w8"))]
        assert all(isinstance(module, bnb.nn.Linear8bitLt) for module in replaced)
        assert {module.state.threshold for module in replaced} == {4.0}
        assert type(applied.model.lm_head) is nn.Linear
        assert not applied.model.training  # training mode would silently ignore the threshold
        assert applied.summary == {"backend": "bnb", "modules": DECODER_LINEARS, "format": "int8", "threshold": 4.0, "block_size": None}
        error = relative_error(logits(applied.model, token_ids), reference)
        assert 0 < error < 0.03
    assert tiny.model.model.layers[0].mlp.up_proj is original_up_proj
    assert torch.equal(logits(tiny.model, token_ids), reference)


@pytest.mark.parametrize("spec_text, quant_type", [("wnf4", "nf4"), ("wfp4", "fp4"), ("w4g32", "nf4")])
def test_bnb_4bit_module_computes_with_its_dequantized_weight(tiny, spec_text, quant_type):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    float_weight = tiny.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    with quantized(tiny, spec_text, "bnb") as applied:
        module = applied.model.model.layers[0].mlp.up_proj
        assert isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_type == quant_type
        dequantized = dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert dequantized.shape == float_weight.shape
        assert not torch.equal(dequantized, float_weight)
        assert relative_error(dequantized, float_weight) < 0.2
        with torch.no_grad():
            identity_output = module(torch.eye(module.in_features))
        torch.testing.assert_close(identity_output, dequantized.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec_text", ["w8a8", "w3", "w8kv8", "w8-asym"])
def test_bnb_refuses_what_it_cannot_do(tiny, spec_text):
    with pytest.raises(UserError, match="supported: w8"):
        get_backend("bnb").apply(tiny, parse_spec(spec_text, backend="bnb"), None)


# --- torchao ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_text, tolerance", [("w8", 0.02), ("w8a8", 0.03), ("w4g32", 0.2), ("wfp8", 0.08)])
def test_torchao_logits_close_and_undo_restores_weights(tiny, token_ids, spec_text, tolerance):
    reference = logits(tiny.model, token_ids)
    up_proj = tiny.model.model.layers[0].mlp.up_proj
    float_weight = up_proj.weight
    with quantized(tiny, spec_text, "torchao") as applied:
        assert type(up_proj.weight.data).__module__.startswith("torchao")
        assert type(applied.model.lm_head.weight.data) is torch.Tensor
        assert applied.summary["modules"] == DECODER_LINEARS
        error = relative_error(logits(applied.model, token_ids), reference)
        assert 0 < error < tolerance
    assert up_proj.weight is float_weight and "extra_repr" not in up_proj.__dict__
    assert torch.equal(logits(tiny.model, token_ids), reference)


def test_torchao_group_must_divide_every_width(tiny):
    with pytest.raises(UserError, match=r"group size 48 .*widths \[64, 128\]"):
        get_backend("torchao").apply(tiny, parse_spec("w4g48", backend="torchao"), None)


@pytest.mark.parametrize("spec_text", ["w4g32a8", "w8kv8", "w8a8-static", "wmxfp4"])
def test_torchao_refuses_what_it_cannot_do(tiny, spec_text):
    with pytest.raises(UserError, match="supported: w8"):
        get_backend("torchao").apply(tiny, parse_spec(spec_text, backend="torchao"), None)


# --- GPTQ ---------------------------------------------------------------------------------------


def calibration_rows(tokenizer, rows: int = 4, length: int = 32) -> torch.Tensor:
    ids = tokenizer(TRAINING_TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return torch.stack([ids[start : start + length] for start in range(0, rows * 50, 50)])


needs_gptq = pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None, reason="the gptq extra is not installed"
)


@needs_gptq
def test_gptq_w4g32_quantizes_decoder_linears(tiny, token_ids, monkeypatch):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    # gptqmodel's Python packing path: same result, without compiling its C++ packer (40-70 s on first use).
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")

    reference = logits(tiny.model, token_ids)
    with quantized(tiny, "w4g32", "gptq", calibration_rows(tiny.tokenizer)) as applied:
        model = applied.model
        assert model is not tiny.model and not model.training
        blocks = model.model.layers
        assert all(isinstance(module, BaseQuantLinear) for block in blocks for module in (
            block.self_attn.q_proj, block.self_attn.o_proj, block.mlp.up_proj, block.mlp.down_proj))
        assert type(model.lm_head) is nn.Linear
        assert applied.summary["bits"] == 4 and applied.summary["group_size"] == 32
        error = relative_error(logits(model, token_ids), reference)
        assert 0 < error < 0.1
        windows = build_windows(tiny.tokenizer, TRAINING_TEXT, PerplexityConfig(seq_len=64, max_tokens=256), 256)
        assert math.isfinite(perplexity(model, windows).ppl)
        saved_copy = model.name_or_path
        assert os.path.isdir(saved_copy)
    assert not os.path.exists(saved_copy)
    assert type(tiny.model.model.layers[0].mlp.up_proj) is nn.Linear  # the loaded model is untouched


@needs_gptq
@pytest.mark.parametrize(
    "spec_text, settings, calibration, message",
    [
        ("w4g32", {}, None, "needs calibration"),
        ("w4g48", {}, "rows", r"group size 48 .*try g64 or g32"),
        ("w4g32", {"quantize_lm_head": True}, "rows", "lm_head"),
        ("w4g32", {"exclude": (r"layers\.0\.",)}, "rows", "different modules in different blocks"),
        ("w4g32a8", {}, "rows", "weights only"),
        ("wfp8", {}, "rows", "supported: integer"),
    ],
)
def test_gptq_refuses_before_quantizing(tiny, spec_text, settings, calibration, message):
    rows = calibration_rows(tiny.tokenizer) if calibration == "rows" else None
    with pytest.raises(UserError, match=message):
        get_backend("gptq").apply(tiny, parse_spec(spec_text, backend="gptq", **settings), rows)


@needs_gptq
def test_gptq_maps_include_exclude_to_one_module_list_per_block(tiny):
    from massquant.backends.gptq import _modules_in_block

    every_linear = select_linears(tiny.model, parse_spec("w4g32"))
    assert _modules_in_block(tiny.model, every_linear) is None  # GPTQConfig's default: all of them
    only_mlp = select_linears(tiny.model, parse_spec("w4g32", include=(r"mlp\.",), exclude=("gate",)))
    assert _modules_in_block(tiny.model, only_mlp) == [["mlp.up_proj"], ["mlp.down_proj"]]
