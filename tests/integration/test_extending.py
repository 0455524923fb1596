"""Extending massquant touches only the files the README names: an architecture is one table entry and a
mitigation is one module with its entry. Both are done here, from this file alone, and checked against
independent computations. (A format: tests/test_formats.py; an option: tests/test_options.py.)"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from massquant.cli.main import main
from massquant.data.text import load_text
from massquant.evaluation.perplexity import PerplexityConfig, build_windows, perplexity
from massquant.massive.locate import locate
from massquant.massive.report import LocateConfig
from massquant.mitigations import Mitigation, _REGISTRY, register_mitigation
from massquant.models.architectures import ARCHITECTURES, architecture_of
from massquant.models.loading import ModelConfig, load_model
from massquant.quantizers.tensors import quantize_weight
from massquant.quantizers.spec import parse_spec
from massquant.wrapping.quantize import quantize_

# ---- a mitigation defined by this module: it scales the final norm's gain (so every logit) by `factor`

MITIGATION = Mitigation(
    name="logit-scale", kind="post-hoc", description="scale the final norm's gain (a test's mitigation)",
    parameters={"factor": 2.0}, requires=("rmsnorm",),
)


def apply(loaded, params: dict, calibration):
    norm = loaded.model.get_submodule(architecture_of(loaded.model).final_norm)
    original = norm.weight.data.clone()
    norm.weight.data.mul_(params["factor"])
    return lambda: norm.weight.data.copy_(original)


@pytest.fixture
def logit_scale():
    register_mitigation(__name__)
    yield
    _REGISTRY.pop("logit-scale")


def test_a_mitigation_module_registered_from_outside_runs_in_eval(logit_scale, tiny_llama_dir, tiny_text_file, tmp_path):
    assert main(["eval", "--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", "32",
                 "--mitigation", "logit-scale:factor=0.5", "--out", str(tmp_path), "--json"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["config"] for row in rows] == ["fp", "fp mitigation=logit-scale:factor=0.5"]
    loaded = load_model(ModelConfig(model=tiny_llama_dir))
    windows = build_windows(loaded.tokenizer, load_text(tiny_text_file), PerplexityConfig(data=tiny_text_file, seq_len=32), 2048)
    with torch.no_grad():
        loaded.model.model.norm.weight.mul_(0.5)
    assert rows[1]["ppl"] == pytest.approx(perplexity(loaded.model, windows).ppl, rel=1e-6)
    assert rows[1]["ppl"] != pytest.approx(rows[0]["ppl"], rel=1e-3)


def test_a_mitigation_that_breaks_its_protocol_is_refused_at_registration(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "apply", None)
    with pytest.raises(TypeError, match="must define apply"):
        register_mitigation(__name__)


# ---- an architecture: OLMo (LLaMA paths, parameter-free LayerNorms) is one entry


@pytest.fixture
def olmo(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "olmo", dataclasses.replace(ARCHITECTURES["llama"], norm_kind="layernorm"))
    torch.manual_seed(0)
    config = AutoConfig.for_model("olmo", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                  bos_token_id=None, eos_token_id=0, pad_token_id=1)
    return AutoModelForCausalLM.from_config(config).eval()


def test_an_architecture_entry_is_all_quantization_and_locate_need(olmo):
    input_ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    report = locate(olmo, input_ids, LocateConfig(top_k=2), progress=False)
    with torch.no_grad():
        hidden = olmo(input_ids=input_ids, output_hidden_states=True).hidden_states
    # transformers' last hidden state is after the final norm; locate's last layer is before it
    assert [abs(layer.top[0].value) for layer in report.layers[:-1]] == pytest.approx(
        [float(h.abs().max()) for h in hidden[1:-1]], rel=1e-5)
    # weight-only int4 g32 through the wrapper equals the weights replaced by hand
    spec = parse_spec("w4g32")
    with torch.no_grad():
        reference = olmo.__class__(olmo.config).eval()
        reference.load_state_dict(olmo.state_dict())
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(quantize_weight(module.weight, spec.weights))
        expected = reference(input_ids=input_ids).logits
        with quantize_(olmo, spec):
            assert torch.equal(olmo(input_ids=input_ids).logits, expected)
