"""Fake quantization, KV hooks, massive handling and post-hoc mitigations on a model dispatched by accelerate
over an explicit multi-entry device_map (CPU entries here: no GPU in the test machine). Quantized weights stay
where the map put their layer, accelerate's hooks stay on their modules, and the numbers equal the same
variant on the undispatched model."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import dispatch_model

from massquant.errors import UserError
from massquant.lmeval.model import model_options, variant_from_options
from massquant.models.loading import load_model
from massquant.variants import apply_variant
from massquant.wrapping.modules import QuantLinear
from massquant.wrapping.quantize import quantize_

DEVICE_MAP = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
    "model.norm": "cpu", "lm_head": "cpu",
}
VARIANTS = [
    {"spec": "w8a8kv8"},
    {"spec": "w8a8-static", "massive": "keep"},
    {"spec": "w4g16a8", "mitigation": "smoothquant"},
    {"spec": "w8a8", "mitigation": "hadamard"},
    {"spec": "w8a8kv8", "mitigation": "prefixkv"},
]


@pytest.fixture()
def pair(tiny_llama_dir):
    plain = load_model(model=tiny_llama_dir)
    dispatched = copy.copy(plain)
    dispatched.model = dispatch_model(copy.deepcopy(plain.model), device_map=DEVICE_MAP, force_hooks=True)
    return plain, dispatched


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arguments", VARIANTS, ids=lambda a: "+".join(a.values()))
def test_variants_on_a_dispatched_model_match_the_plain_model_and_undo(pair, arguments):
    plain, dispatched = pair
    ids = torch.randint(0, len(plain.tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    calibration = ids[:, :16]
    hooked = {name for name, module in dispatched.model.named_modules() if hasattr(module, "_hf_hook")}
    assert "model.layers.0" in hooked  # accelerate's AlignDevicesHook on each mapped module
    before = {name: tensor.clone() for name, tensor in dispatched.model.state_dict().items()}
    variant = variant_from_options(model_options(arguments))
    expected_applied = apply_variant(plain, variant, calibration)
    try:
        expected = logits(plain.model, ids)
    finally:
        expected_applied.undo()
    applied = apply_variant(dispatched, variant, calibration)
    try:
        assert torch.equal(logits(dispatched.model, ids), expected)
        still = {name for name, module in dispatched.model.named_modules() if hasattr(module, "_hf_hook")}
        assert set(DEVICE_MAP) <= still  # the mapped modules keep their hooks (a rotation may add a wrapper module)
        for name, module in dispatched.model.named_modules():
            if isinstance(module, QuantLinear):
                assert hasattr(module, "_hf_hook")  # the hook of the linear it stands in for
                layer = next(key for key in DEVICE_MAP if name.startswith(key + "."))
                assert module.weight.device == torch.device(DEVICE_MAP[layer])
                assert module.weight.untyped_storage().data_ptr() == module.original[0].weight.untyped_storage().data_ptr()
    finally:
        applied.undo()
    after = dispatched.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)


def test_offloaded_weights_are_refused(tiny_llama_dir, tmp_path):
    loaded = load_model(model=tiny_llama_dir)
    model = dispatch_model(loaded.model, device_map={**DEVICE_MAP, "model.layers.1": "disk"}, offload_dir=str(tmp_path))
    with pytest.raises(UserError, match="offloaded weights .*model.layers.1"):
        quantize_(model, "w8")
