"""Hadamard rotation and SmoothQuant: exact matrices, unchanged function, exact undo, effect on real activations."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from massquant.data.calibration import calibration_batch
from massquant.errors import UserError
from massquant.mitigations import apply_post_hoc, hadamard, parse_mitigations, smoothquant
from massquant.mitigations.hadamard import (
    HadamardInput, hadamard_factors, hadamard_transform, paley, randomized_hadamard, sylvester,
)
from massquant.mitigations.smoothquant import smoothing_scales
from massquant.models.architectures import model_types_with
from massquant.models.loading import LoadedModel
from massquant.quantizers.spec import parse_spec
from massquant.wrapping.modules import QuantLinear
from massquant.wrapping.quantize import quantize_
from tests.conftest import run_cli

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 48, 80, 4, 2, 12  # 48 = 4 x Paley 12, 80 = 4 x Paley 20


def defaults(module, **changes) -> dict:
    return {**module.MITIGATION.parameters, **changes}


def tiny_model(model_type: str) -> LoadedModel:
    """A random 2-layer model with tied embeddings, random norm gains and biases (so folding them matters)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return LoadedModel(model, None, None, f"tiny-{model_type}", "")


TOKENS = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_restored(loaded: LoadedModel, parameters: dict, reference: torch.Tensor, ids: torch.Tensor) -> None:
    model = loaded.model
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == parameters.keys() and all(after[name] is parameters[name] for name in after)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings and model.all_tied_weights_keys
    assert torch.equal(logits(model, ids), reference)


# ---- Hadamard matrices -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [12, 20, 28, 36, 44, 60, 68])
def test_paley_matrices_are_hadamard(order):
    matrix = paley(order)
    assert set(matrix.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(matrix @ matrix.T, order * torch.eye(order, dtype=torch.float64))


def test_sylvester_and_no_paley_order():
    matrix = sylvester(64)
    assert torch.equal(matrix @ matrix.T, 64 * torch.eye(64, dtype=torch.float64))
    assert paley(16) is None and paley(10) is None  # 15, 7 (= 3 mod 4, not 1), 9, 4: no prime field fits


@pytest.mark.parametrize("size, left, right", [(576, 16, 36), (1536, 128, 12), (64, 64, 1), (192, 16, 12)])
def test_factors_of_smollm2_widths_form_a_true_hadamard(size, left, right):
    a, b = hadamard_factors(size)
    assert (a.shape[0], b.shape[0]) == (left, right)
    scaled = torch.kron(a, b) * size**0.5
    assert torch.allclose(scaled.abs(), torch.ones_like(scaled), atol=1e-12)
    assert torch.allclose(scaled @ scaled.T, size * torch.eye(size, dtype=torch.float64), atol=1e-9)


def test_width_without_paley_factor_uses_random_orthogonal_factor():
    a, b = hadamard_factors(11008, seed=0)  # 11008 = 256 x 43; no Paley order 43 * 2^j fits
    assert (a.shape[0], b.shape[0]) == (256, 43)
    assert torch.allclose(b @ b.T, torch.eye(43, dtype=torch.float64), atol=1e-12)


def test_factored_transform_equals_dense_kronecker_product():
    a, b = hadamard_factors(1536)
    x = torch.randn(3, 5, 1536, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x, a, b), x @ torch.kron(a, b), atol=1e-12)


def test_randomized_hadamard_is_seeded_signed_hadamard():
    matrix = randomized_hadamard(HIDDEN, seed=0)(torch.eye(HIDDEN, dtype=torch.float64))
    assert torch.allclose(matrix @ matrix.T, torch.eye(HIDDEN, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(matrix.abs() * HIDDEN**0.5, torch.ones_like(matrix), atol=1e-12)
    again = randomized_hadamard(HIDDEN, seed=0)(torch.eye(HIDDEN, dtype=torch.float64))
    other = randomized_hadamard(HIDDEN, seed=1)(torch.eye(HIDDEN, dtype=torch.float64))
    assert torch.equal(matrix, again) and not torch.equal(matrix, other)


# ---- Hadamard rotation on tiny models ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_type, params",
    [(model_type, {}) for model_type in model_types_with(hadamard.MITIGATION.requires)]
    + [("llama", {"values": False, "down_proj": False, "seed": 5})],
)
def test_rotation_keeps_logits_and_undo_restores_exactly(model_type, params):
    loaded = tiny_model(model_type)
    parameters = dict(loaded.model.named_parameters(remove_duplicate=False))
    reference = logits(loaded.model, TOKENS)
    undo = hadamard.apply(loaded, defaults(hadamard, **params), None)
    assert not torch.equal(loaded.model.get_input_embeddings().weight, parameters["model.embed_tokens.weight"])
    assert loaded.model.get_output_embeddings().weight is not loaded.model.get_input_embeddings().weight
    assert not loaded.model.config.tie_word_embeddings
    assert (logits(loaded.model, TOKENS) - reference).abs().max() < 1e-5
    undo()
    assert_restored(loaded, parameters, reference, TOKENS)


def _down_proj_inputs(module: nn.Module, model, ids) -> torch.Tensor:
    captured = []
    handle = module.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
    try:
        logits(model, ids)
    finally:
        handle.remove()
    return captured[0]


def test_rotation_rotates_residual_stream_and_down_proj_input():
    loaded = tiny_model("llama")
    model = loaded.model
    with torch.no_grad():
        original_states = model(TOKENS, output_hidden_states=True).hidden_states
    original_down_input = _down_proj_inputs(model.model.layers[1].mlp.down_proj, model, TOKENS)
    undo = hadamard.apply(loaded, defaults(hadamard, seed=3), None)
    try:
        with torch.no_grad():
            rotated_states = model(TOKENS, output_hidden_states=True).hidden_states
        residual_rotation = randomized_hadamard(HIDDEN, seed=3)(torch.eye(HIDDEN, dtype=torch.float64)).float()
        for original, rotated in zip(original_states[:-1], rotated_states[:-1]):  # the last one is after the final norm
            assert torch.allclose(rotated, original @ residual_rotation, atol=1e-5)
        wrapper = model.model.layers[1].mlp.down_proj
        assert isinstance(wrapper, HadamardInput)
        online = (torch.kron(sylvester(4), paley(20)) / INTERMEDIATE**0.5).float()
        assert torch.allclose(_down_proj_inputs(wrapper.linear, model, TOKENS), original_down_input @ online, atol=1e-5)
    finally:
        undo()


def test_quantization_wraps_the_linear_inside_the_online_hadamard():
    loaded = tiny_model("llama")
    model = loaded.model
    reference = logits(model, TOKENS)
    undo = hadamard.apply(loaded, defaults(hadamard), None)
    handle = quantize_(model, "w8a8-tensor")
    assert "model.layers.0.mlp.down_proj.linear" in handle.linears
    assert isinstance(model.model.layers[0].mlp.down_proj.linear, QuantLinear)
    handle.undo()
    excluded = quantize_(model, parse_spec("w8a8-tensor", exclude=("down_proj",)))
    assert len(excluded.linears) == 2 * 6 and not any("down_proj" in name for name in excluded.linears)
    excluded.undo()
    undo()
    assert torch.equal(logits(model, TOKENS), reference) and isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)


def test_layernorm_models_are_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=HIDDEN, n_layer=1, n_head=HEADS, n_positions=64))
    with pytest.raises(UserError, match="needs RMSNorm models.*layernorm"):
        hadamard.apply(LoadedModel(model, None, None, "gpt2", ""), defaults(hadamard), None)
    with pytest.raises(UserError, match="needs RMSNorm models"):
        smoothquant.apply(LoadedModel(model, None, None, "gpt2", ""), defaults(smoothquant), TOKENS)


# ---- SmoothQuant on tiny models ----------------------------------------------------------------------------------


def test_smoothing_scales_formula():
    activation = torch.tensor([4.0, 0.0, 9.0, 16.0], dtype=torch.float64)
    weight = torch.tensor([1.0, 2.0, 0.25, 0.0], dtype=torch.float64)
    assert torch.equal(smoothing_scales(activation, weight, 0.5), torch.tensor([2.0, 1.0, 6.0, 1.0], dtype=torch.float64))
    assert torch.equal(smoothing_scales(activation, weight, 1.0)[:3], torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64))


# gemma3 is the multimodal wrapper around a gemma3_text decoder (tested), built from a vision config too
@pytest.mark.parametrize("model_type", [name for name in model_types_with(smoothquant.MITIGATION.requires) if name != "gemma3"])
def test_smoothing_keeps_logits_and_undo_restores_exactly(model_type):
    loaded = tiny_model(model_type)
    parameters = dict(loaded.model.named_parameters(remove_duplicate=False))
    reference = logits(loaded.model, TOKENS)
    undo = smoothquant.apply(loaded, defaults(smoothquant, alpha=0.7), TOKENS)
    changed = [name for name, p in loaded.model.named_parameters() if p is not parameters[name]]
    assert len([name for name in changed if "norm" in name]) == 2 * 2  # the norms feeding q/k/v and gate/up
    assert len([name for name in changed if name.endswith("proj.weight")]) == 2 * 7
    assert (logits(loaded.model, TOKENS) - reference).abs().max() < 1e-5
    undo()
    assert_restored(loaded, parameters, reference, TOKENS)


def _site_ranges(model, layer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(max |x| per input channel on TOKENS, max |W| per input channel) for each smoothed input of ``layer``."""
    attention, mlp = layer.self_attn, layer.mlp
    sites = {
        "qkv": (attention.q_proj, [attention.q_proj, attention.k_proj, attention.v_proj]),
        "up": (mlp.gate_proj, [mlp.gate_proj, mlp.up_proj]),
        "o": (attention.o_proj, [attention.o_proj]),
        "down": (mlp.down_proj, [mlp.down_proj]),
    }
    captured, handles = {}, []
    for name, (module, _) in sites.items():
        handles.append(module.register_forward_pre_hook(lambda _, args, name=name: captured.setdefault(name, args[0].detach())))
    try:
        logits(model, TOKENS)
    finally:
        for handle in handles:
            handle.remove()
    ranges = {}
    for name, (_, readers) in sites.items():
        activation = captured[name].abs().flatten(0, -2).amax(0)
        weight = torch.stack([linear.weight.detach().abs().amax(0) for linear in readers]).amax(0)
        if name == "o":  # one scale per value channel: compare the maxima over the query heads of a group
            def grouped(x):
                return x.view(KV_HEADS, HEADS // KV_HEADS, HEAD_DIM).amax(1)

            activation, weight = grouped(activation), grouped(weight)
        ranges[name] = (activation, weight)
    return ranges


def test_half_alpha_makes_activation_and_weight_ranges_equal_per_channel():
    """With alpha = 0.5 each smoothed channel ends with max|X_j| / s_j = max|W_j| * s_j = sqrt(max|X_j| max|W_j|)."""
    loaded = tiny_model("llama")
    undo = smoothquant.apply(loaded, defaults(smoothquant), TOKENS)
    try:
        for name, (activation, weight) in _site_ranges(loaded.model, loaded.model.model.layers[1]).items():
            assert torch.allclose(activation, weight, rtol=1e-4), name
    finally:
        undo()


def test_full_alpha_moves_the_whole_activation_range_into_the_weights():
    loaded = tiny_model("llama")
    undo = smoothquant.apply(loaded, defaults(smoothquant, alpha=1.0), TOKENS)
    try:
        for name, (activation, _) in _site_ranges(loaded.model, loaded.model.model.layers[0]).items():
            assert torch.allclose(activation, torch.ones_like(activation), rtol=1e-4), name
    finally:
        undo()


@pytest.mark.parametrize(
    "params, calibration, fragment",
    [
        ({"alpha": 1.5}, TOKENS, "alpha must be in"),
        ({"projections": ("qkv", "ffn")}, TOKENS, "projections must be"),
        ({"projections": ()}, TOKENS, "projections must be"),
        ({}, None, "needs calibration"),
    ],
)
def test_smoothquant_bad_parameters(params, calibration, fragment):
    with pytest.raises(UserError, match=fragment):
        smoothquant.apply(tiny_model("llama"), defaults(smoothquant, **params), calibration)


def test_smoothquant_after_rotation_refuses_the_wrapped_down_proj_and_composes_before_it():
    loaded = tiny_model("llama")
    reference = logits(loaded.model, TOKENS)
    parameters = dict(loaded.model.named_parameters(remove_duplicate=False))
    (rotate_then_smooth,) = parse_mitigations("hadamard+smoothquant")
    with pytest.raises(UserError, match="smoothquant\\+hadamard"):
        apply_post_hoc(loaded, rotate_then_smooth, TOKENS)
    assert_restored(loaded, parameters, reference, TOKENS)  # the failed composition was rolled back
    (smooth_then_rotate,) = parse_mitigations("smoothquant:alpha=0.8+hadamard")
    undo = apply_post_hoc(loaded, smooth_then_rotate, TOKENS)
    assert (logits(loaded.model, TOKENS) - reference).abs().max() < 1e-5
    undo()
    assert_restored(loaded, parameters, reference, TOKENS)


def test_cli_evaluates_smoothing_then_rotation_on_a_local_model(tiny_llama_dir, tiny_text_file):
    completed = run_cli(
        "eval", "--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", 32, "--spec", "w8a8-tensor",
        "--mitigation", "smoothquant:alpha=0.7+hadamard", "--calib-samples", 2, "--calib-seq-len", 32, "--json",
    )
    assert completed.returncode == 0, completed.stderr
    rows = {row["config"]: row for row in json.loads(completed.stdout)["rows"]}
    assert set(rows) == {"fp", "fp mitigation=smoothquant:alpha=0.7+hadamard", "w8a8-tensor mitigation=smoothquant:alpha=0.7+hadamard"}
    baseline = rows["fp"]["ppl"]
    assert rows["fp mitigation=smoothquant:alpha=0.7+hadamard"]["ppl"] == pytest.approx(baseline, rel=1e-5)
    assert rows["w8a8-tensor mitigation=smoothquant:alpha=0.7+hadamard"]["ppl"] != pytest.approx(baseline, rel=1e-5)


# ---- SmolLM2 -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_ids(smollm2, enwiki_text):
    body = smollm2.tokenizer(enwiki_text[:2000], add_special_tokens=False)["input_ids"][:127]
    return torch.tensor([[smollm2.tokenizer.bos_token_id] + body])


def _peak_to_rms(x: torch.Tensor) -> float:
    return float(x.abs().max() / x.pow(2).mean().sqrt())


def test_smollm2_rotation_keeps_logits_and_spreads_the_down_proj_spike(smollm2, smollm2_ids):
    model = smollm2.model
    parameters = dict(model.named_parameters(remove_duplicate=False))
    reference = logits(model, smollm2_ids)
    layer = model.model.layers[28]  # its down_proj input peaks at |x| ~ 2,400 (README, massquant errors)
    spike_before = _peak_to_rms(_down_proj_inputs(layer.mlp.down_proj, model, smollm2_ids))
    undo = hadamard.apply(smollm2, defaults(hadamard), None)
    try:
        assert (logits(model, smollm2_ids) - reference).abs().max() <= 1e-3
        spike_after = _peak_to_rms(_down_proj_inputs(layer.mlp.down_proj.linear, model, smollm2_ids))
        assert spike_before > 300 and spike_after < spike_before / 20  # measured: 428 -> 12.7
    finally:
        undo()
    assert_restored(smollm2, parameters, reference, smollm2_ids)


def test_smollm2_smoothing_keeps_logits(smollm2, smollm2_ids):
    model = smollm2.model
    parameters = dict(model.named_parameters(remove_duplicate=False))
    reference = logits(model, smollm2_ids)
    calibration = calibration_batch(smollm2.tokenizer, "lee-news", 2, 128, seed=0)
    undo = smoothquant.apply(smollm2, defaults(smoothquant), calibration)
    try:
        assert (logits(model, smollm2_ids) - reference).abs().max() <= 1e-3
    finally:
        undo()
    assert_restored(smollm2, parameters, reference, smollm2_ids)


@pytest.mark.slow
def test_smollm2_mitigations_rescue_per_tensor_w8a8(smollm2, enwiki_text):
    """The README table: 4,096 enwiki tokens in 512-token windows, SmoothQuant calibrated on 16 x 512 lee-news tokens."""
    from massquant.evaluation.perplexity import PerplexityConfig, build_windows
    from massquant.evaluation.runner import evaluate_variant
    from massquant.models.loading import max_sequence_length
    from massquant.variants import Variant

    config = PerplexityConfig(seq_len=512, max_tokens=4096)
    windows = build_windows(smollm2.tokenizer, enwiki_text, config, max_sequence_length(smollm2.model))
    calibration = calibration_batch(smollm2.tokenizer, "lee-news", 16, 512, seed=0)
    spec = parse_spec("w8a8-tensor")
    measured = {
        text: evaluate_variant(smollm2, Variant(spec, mitigation=tuple(parse_mitigations(text)[0])), windows, calibration)["ppl"]
        for text in ("none", "hadamard", "smoothquant", "smoothquant+hadamard")
    }
    assert measured == pytest.approx({"none": 49.871, "hadamard": 24.355, "smoothquant": 29.118, "smoothquant+hadamard": 22.675}, rel=2e-3)
