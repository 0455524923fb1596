"""Fake quantization overwrites weights in place; undo brings the originals back bit for bit from the
checkpoint on disk, a CPU copy, or (tied weights) leaves them untouched."""

from __future__ import annotations

import os

import pytest
import torch

from massquant.models.loading import load_model
from massquant.quantizers.spec import parse_spec
from massquant.quantizers.tensors import quantize_weight
from massquant.wrapping.quantize import quantize_
from tests.models.test_architectures import tiny_model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def storages(model) -> set[int]:
    return {tensor.untyped_storage().data_ptr() for tensor in [*model.parameters(), *model.buffers()]}


def assert_same(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


@pytest.fixture()
def tiny(tiny_llama_dir):
    return load_model(model=tiny_llama_dir)  # fresh per test: some tests change weights


def test_a_model_loaded_from_safetensors_is_quantized_in_place_and_restored_from_the_file(tiny):
    before, pointers = snapshot(tiny.model), storages(tiny.model)
    down = tiny.model.model.layers[1].mlp.down_proj
    expected = quantize_weight(down.weight.detach(), parse_spec("w8a8").weights)
    with quantize_(tiny.model, "w8a8") as handle:
        assert handle.summary()["undo_sources"] == {"safetensors": 14}
        assert storages(tiny.model) == pointers  # no weight got a second copy
        quantized = handle.linears["model.layers.1.mlp.down_proj"]
        assert quantized.weight.data_ptr() == down.weight.data_ptr()
        assert torch.equal(down.weight, expected)  # the original module's own weight holds the int8 values
        assert torch.equal(quantized.original_weight(), before["model.layers.1.mlp.down_proj.weight"])
    assert tiny.model.model.layers[1].mlp.down_proj is down
    assert_same(tiny.model, before)


def test_a_weight_changed_since_loading_is_kept_on_the_cpu(tiny):
    up = tiny.model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        up.weight.mul_(2)  # what a rotation or smoothing applied before quantization does: the file no longer holds it
    before = snapshot(tiny.model)
    with quantize_(tiny.model, "w4g16") as handle:
        assert handle.summary()["undo_sources"] == {"cpu_copy": 1, "safetensors": 13}
        assert handle.linears["model.layers.0.mlp.up_proj"].source.kind == "cpu_copy"
        assert not torch.equal(up.weight, before["model.layers.0.mlp.up_proj.weight"])
    assert_same(tiny.model, before)


def test_a_checkpoint_changed_after_quantization_is_refused_on_undo(tiny_llama_dir, tmp_path):
    import shutil

    directory = shutil.copytree(tiny_llama_dir, tmp_path / "copy")
    loaded = load_model(model=str(directory))
    handle = quantize_(loaded.model, "w8")
    file = directory / "model.safetensors"
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    with pytest.raises(RuntimeError, match="changed after quantization"):
        handle.undo()


def test_a_model_built_in_memory_keeps_cpu_copies_and_a_tied_output_projection_is_not_overwritten():
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    before = snapshot(model)
    spec = parse_spec("w8", quantize_lm_head=True)
    with quantize_(model, spec) as handle:
        assert handle.summary()["undo_sources"] == {"cpu_copy": 4 * len(model.transformer.h), "separate": 1}
        assert torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])  # the embedding is intact
        assert not torch.equal(handle.linears["lm_head"].weight, before["lm_head.weight"])
    assert_same(model, before)


def test_input_only_specs_leave_weights_alone(tiny):
    before = snapshot(tiny.model)
    with quantize_(tiny.model, "a8") as handle:
        assert handle.summary()["undo_sources"] == {"separate": 14}
        assert_same(tiny.model, before)
    assert_same(tiny.model, before)
