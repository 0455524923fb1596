"""Training-time mitigations (tvr, dyt, gated, kvbias) and `massquant train`: math against references,
exactness at step 0, loss going down, checkpoints that reload to identical logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from massquant.cli.main import main
from massquant.errors import UserError
from massquant.mitigations import dyt, gated_attention, tvr
from massquant.models.architectures import decoder_layers
from massquant.models.loading import load_model
from massquant.training.checkpoint import save_checkpoint
from massquant.training.loop import batch_order, lr_factor, train, training_windows
from massquant.training.recipe import TrainSettings, load_recipe, parse_recipe
from massquant.training.runner import build_from_scratch
from massquant.training.surgery import apply_surgery, recorded_choices, training_choices
from massquant.wrapping.quantize import quantize_
from tests.conftest import TRAINING_TEXT

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("train-*.yaml"))
SCRATCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread; two oversubscribe the cores that parallel test workers share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ids_for(tokenizer, shape, seed=0):
    return torch.randint(3, len(tokenizer), shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


# -- TVR ---------------------------------------------------------------------------------------------


def test_tvr_rescales_matrices_wider_than_target_times_threshold():
    generator = torch.Generator().manual_seed(0)
    wide, narrow = torch.randn(64, 32, generator=generator) * 0.5, torch.randn(64, 32, generator=generator) * 0.11
    rescaled = tvr.rescaled_to_target(wide, target=0.1, threshold=1.25)
    torch.testing.assert_close(rescaled, wide * (0.1 / wide.std()))
    assert abs(float(rescaled.std()) - 0.1) < 1e-6
    assert tvr.rescaled_to_target(narrow, target=0.1, threshold=1.25) is None  # 0.11 < 0.125: left alone
    assert tvr.rescaled_to_target(narrow, target=0.1, threshold=0) is not None  # threshold 0: the paper's "always"
    assert tvr.rescaled_to_target(torch.zeros(4, 4), target=0.1, threshold=0) is None


def test_tvr_on_step_acts_every_interval_on_layer_matrices_only(tiny_llama_dir):
    model = load_model(model=tiny_llama_dir).model
    params = {"target": 0.01, "threshold": 1.0, "interval": 3}
    matrices = tvr.layer_matrices(model)
    assert len(matrices) == 2 * 7  # q, k, v, o, gate, up, down per layer; embeddings and head excluded
    embedding = model.model.embed_tokens.weight.clone()
    assert tvr.on_step(model, params, 2) is None
    event = tvr.on_step(model, params, 3)
    assert event == {"rescaled_matrices": 14}  # random init std 0.02 > 0.01
    assert all(abs(float(w.detach().std()) - 0.01) < 1e-6 for w in matrices.values())
    torch.testing.assert_close(model.model.embed_tokens.weight, embedding)
    with pytest.raises(UserError, match="threshold >= 0"):
        tvr.surgery(model, {**params, "threshold": -1.0})


# -- DyT ---------------------------------------------------------------------------------------------


def test_dyt_fit_finds_a_known_alpha_and_sums_add_over_batches():
    generator = torch.Generator().manual_seed(0)
    alpha = float(dyt.ALPHA_GRID[60])
    x = torch.randn(300, 8, generator=generator) * 3 / alpha
    gain = torch.randn(8, generator=generator)
    target = gain * torch.tanh(alpha * x.double())
    whole = dyt.fit_sums(x, target, gain, dyt.ALPHA_GRID)
    halves = dyt.add_sums(dyt.fit_sums(x[:100], target[:100], gain, dyt.ALPHA_GRID), dyt.fit_sums(x[100:], target[100:], gain, dyt.ALPHA_GRID))
    for key in whole:
        torch.testing.assert_close(halves[key], whole[key])
    found_alpha, residual = dyt.solve_fit(whole, dyt.ALPHA_GRID)
    assert found_alpha == pytest.approx(alpha, rel=1e-12)
    assert residual < 1e-8  # float32 tanh; the neighbouring alpha leaves ~1e-3
    neighbour = dyt.ALPHA_GRID[61:62]
    assert dyt.solve_fit(dyt.fit_sums(x, target, gain, neighbour), neighbour)[1] > 1e-4


@pytest.mark.parametrize("make_norm", [lambda: LlamaRMSNorm(6), lambda: nn.LayerNorm(6)])
def test_dyt_probe_reads_a_norms_affine_map(make_norm):
    norm = make_norm()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.arange(6.0) / 10)
    scale, shift = dyt.probe_affine(norm, 6, norm.weight)
    torch.testing.assert_close(scale, norm.weight.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(shift, norm.bias.detach() if getattr(norm, "bias", None) is not None else torch.zeros(6))


def test_dyt_fit_matches_least_squares_per_alpha_on_captured_norm_activations(tiny_llama_dir):
    loaded = load_model(model=tiny_llama_dir)
    model, calibration = loaded.model, ids_for(loaded.tokenizer, (2, 24))
    path = "model.layers.1.input_layernorm"
    norm = model.get_submodule(path)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, norm.weight.shape[0]))
    affine = {path: dyt.probe_affine(norm, norm.weight.shape[0], norm.weight)}
    captured = []
    handle = norm.register_forward_hook(lambda m, a, out: captured.append((a[0][0], out[0])))
    fitted = dyt.fit_norms(model, [path], affine, calibration, tokens=1000)[path]  # more than there are: all of them
    handle.remove()
    x, y = torch.cat([c[0] for c in captured]).double(), torch.cat([c[1] for c in captured]).double()
    gain, shift = (v.double() for v in affine[path])
    # reference: the squared error of gain * tanh(alpha x) + shift against the norm's output, alpha by alpha
    errors = [(float((gain * torch.tanh(alpha * x) + shift - y).pow(2).sum()), float(alpha)) for alpha in dyt.ALPHA_GRID]
    error, alpha = min(errors)
    assert fitted[0] == pytest.approx(alpha)
    assert fitted[1] == pytest.approx(error / float((y - shift).pow(2).sum()), rel=1e-4)


def test_dyt_surgery_replaces_every_norm_and_fitting_beats_the_data_free_start(tiny_llama_dir):
    loaded = load_model(model=tiny_llama_dir)
    ids = ids_for(loaded.tokenizer, (2, 24), seed=1)
    reference = logits(loaded.model, ids)
    errors = {}
    for fit in (False, True):
        model = load_model(model=tiny_llama_dir).model
        report = dyt.surgery(model, {"alpha": 0.5, "fit": fit, "fit_tokens": 512}, calibration=ids_for(loaded.tokenizer, (4, 24)))
        norms = [m for m in model.modules() if isinstance(m, dyt.DynamicTanh)]
        assert len(norms) == 2 * 2 + 1 and not any(isinstance(m, LlamaRMSNorm) for m in model.modules())
        errors[fit] = float((logits(model, ids) - reference).abs().max())
        assert ("relative_residual" in report) == fit
    assert errors[True] < 0.75 * errors[False]  # measured: 0.32 against 0.61


# -- gated attention ---------------------------------------------------------------------------------


def test_gated_attention_is_exact_at_init_and_a_closed_head_equals_zeroed_o_proj_columns(tiny_llama_dir):
    loaded = load_model(model=tiny_llama_dir)
    ids = ids_for(loaded.tokenizer, (2, 16))
    reference = logits(loaded.model, ids)
    gated = load_model(model=tiny_llama_dir).model
    gated_attention.surgery(gated, {"bias": 0.0})
    torch.testing.assert_close(logits(gated, ids), reference, atol=1e-5, rtol=1e-5)

    head_dim = loaded.model.config.head_dim
    ablated = load_model(model=tiny_llama_dir).model
    with torch.no_grad():
        for layer, layer_ablated in zip(decoder_layers(gated), decoder_layers(ablated)):
            layer.self_attn.head_gate.score.bias[1] = -60.0  # sigmoid ~ 1e-26: head 1 closed
            layer_ablated.self_attn.o_proj.weight[:, head_dim : 2 * head_dim] = 0
    torch.testing.assert_close(logits(gated, ids), logits(ablated, ids), atol=1e-5, rtol=1e-5)
    # quantization replaces o_proj; the gate lives in the attention hook and stays: all heads closed
    # in every layer is the model without attention, quantized or not
    with torch.no_grad():
        for layer, layer_ablated in zip(decoder_layers(gated), decoder_layers(ablated)):
            layer.self_attn.head_gate.score.bias.fill_(-60.0)
            layer_ablated.self_attn.o_proj.weight.zero_()
    with quantize_(gated, "w8a8kv8"), quantize_(ablated, "w8a8kv8"):
        torch.testing.assert_close(logits(gated, ids), logits(ablated, ids), atol=1e-5, rtol=1e-5)
    # undoing the KV quantizers' attention routing leaves the gates' routing in place
    assert gated.config._attn_implementation == "massquant_sdpa"
    torch.testing.assert_close(logits(gated, ids), logits(ablated, ids), atol=1e-5, rtol=1e-5)


# -- recipes, schedule, batches ----------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_shipped_training_recipes_parse(recipe):
    parsed = load_recipe(recipe)
    assert training_choices(parsed.mitigation)


@pytest.mark.parametrize(
    "mapping, fragment",
    [
        ({"train": {"step": 3}}, "unknown key 'step' (did you mean 'steps'?); accepted: data, seq_len"),
        ({"mitigatoin": "tvr"}, "unknown key 'mitigatoin' (did you mean 'mitigation'?)"),
        ({"mitigation": "hadamard"}, "has no training-time form; accepted: none, kvbias"),
        ({"mitigation": "tvr,dyt"}, "train one combination at a time"),
        ({"mitigation": "tvr:every=3"}, "unknown key 'every'"),
        ({"mitigation": "tvr:threshold=-1"}, "threshold >= 0"),
        ({"mitigation": "tvr+dyt:alpha=0"}, "needs alpha > 0"),
        ({"mitigation": "gated:bias=40"}, "-10 <= bias <= 10"),
        ({"train": {"schedule": "step"}}, "accepted: cosine, linear, constant"),
        ({"kind": "grid", "specs": ["w8"]}, "not a training recipe"),
        ({"train": {"lr": "fast"}}, "lr: expected a number"),
    ],
)
def test_recipe_mistakes_are_one_line_errors(mapping, fragment):
    with pytest.raises(UserError) as error:
        training_choices(parse_recipe(mapping).mitigation)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    settings = TrainSettings(steps=12, warmup_steps=2, min_lr_ratio=0.1, schedule="cosine")
    factors = [lr_factor(step, settings) for step in range(12)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[-1] == pytest.approx(0.1)
    assert factors[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    linear = TrainSettings(steps=12, warmup_steps=2, min_lr_ratio=0.0, schedule="linear")
    assert lr_factor(6, linear) == pytest.approx(1 - 4 / 9)


def test_batch_order_is_seeded_and_covers_every_window_each_epoch():
    order = batch_order(10, 4, 5, torch.Generator().manual_seed(3))
    again = batch_order(10, 4, 5, torch.Generator().manual_seed(3))
    assert torch.equal(order, again) and order.shape == (5, 4)
    flat = order.flatten()
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:20].tolist()) == list(range(10))


def test_training_windows_skip_the_evaluation_tokens(tiny_llama_dir):
    tokenizer = load_model(model=tiny_llama_dir).tokenizer
    settings = TrainSettings(data="tiny", seq_len=17, batch_size=2, steps=3)
    windows = training_windows(tokenizer, TRAINING_TEXT, settings, skip_tokens=40, model_max_length=256)
    text_ids = tokenizer(TRAINING_TEXT, add_special_tokens=False)["input_ids"]
    assert windows[0, 0] == tokenizer.bos_token_id
    assert windows[0, 1:].tolist() == text_ids[48:64]  # 40 tokens held out: windows of 16 start at 48


# -- training and checkpoints ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch_recipe(tiny_llama_dir, tiny_text_file):
    def make(mitigation, steps=12, **train):
        return parse_recipe({
            "model": tiny_llama_dir, "from_scratch": SCRATCH, "mitigation": mitigation,
            "train": {"data": tiny_text_file, "seq_len": 32, "batch_size": 4, "steps": steps, "lr": 3e-3, "warmup_steps": 2, **train},
            "calib_data": tiny_text_file, "calib_samples": 2, "calib_seq_len": 32,
            "eval": None,
        })

    return make


@pytest.mark.parametrize("mitigation", ["tvr:interval=4", "dyt", "gated", "kvbias", "tvr+kvbias", "tvr+dyt"])
def test_from_scratch_training_lowers_the_loss_and_the_checkpoint_reloads_identically(scratch_recipe, mitigation, tmp_path):
    recipe = scratch_recipe(mitigation)
    loaded = build_from_scratch(recipe)
    choices = training_choices(mitigation)
    calibration = ids_for(loaded.tokenizer, (2, 32))
    apply_surgery(loaded.model, choices, calibration)
    added = {name: p.detach().clone() for name, p in loaded.model.named_parameters() if "head_gate" in name or "kv_bias" in name or "alpha" in name}
    windows = training_windows(loaded.tokenizer, TRAINING_TEXT, recipe.train, 0, 256)
    history = train(loaded.model, windows, recipe.train, choices)
    losses = [record["loss"] for record in history]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    assert all(not torch.equal(p, added[name]) for name, p in loaded.model.named_parameters() if name in added)  # the new modules learn
    if mitigation.startswith("tvr"):
        assert [r["tvr"]["rescaled_matrices"] > 0 for r in history if "tvr" in r] == [True] * (12 // choices[0].params["interval"])

    save_checkpoint(loaded.model, loaded.tokenizer, tmp_path)
    assert recorded_choices(AutoConfig.from_pretrained(tmp_path)) == choices
    ids = ids_for(loaded.tokenizer, (2, 20), seed=5)
    expected = logits(loaded.model, ids)
    reloaded = load_model(model=str(tmp_path)).model
    assert torch.equal(logits(reloaded, ids), expected)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert torch.equal(logits(remote, ids), expected)


def test_training_is_deterministic_for_a_seed(scratch_recipe):
    runs = []
    for _ in range(2):
        recipe = scratch_recipe("gated", steps=4)
        loaded = build_from_scratch(recipe)
        apply_surgery(loaded.model, training_choices("gated"))
        runs.append([r["loss"] for r in train(loaded.model, training_windows(loaded.tokenizer, TRAINING_TEXT, recipe.train, 0, 256), recipe.train, [])])
    assert runs[0] == runs[1]


def test_a_surgery_cannot_be_applied_twice(tiny_llama_dir):
    model = load_model(model=tiny_llama_dir).model
    apply_surgery(model, training_choices("gated"))
    with pytest.raises(UserError, match="already carries mitigation"):
        apply_surgery(model, training_choices("tvr+gated"))


def test_train_command_writes_checkpoint_results_and_table(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"kind: train\nmodel: {tiny_llama_dir}\nmitigation: tvr:target=0.05,interval=2+gated\n"
        f"train: {{data: {tiny_text_file}, seq_len: 32, batch_size: 2, steps: 4, lr: 1.0e-3}}\n"
        f"eval: {{data: {tiny_text_file}, seq_len: 32, max_tokens: 128, spec: [w8a8-tensor], n_seqs: 1}}\n"
    )
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(r["stage"], r["config"]) for r in results["rows"]] == [
        ("before", "fp"), ("before", "w8a8-tensor"), ("surgery", "fp"), ("after", "fp"), ("after", "w8a8-tensor"),
    ]
    # gated attention and TVR (first rescale after step 2) leave the function unchanged before training
    assert results["rows"][2]["ppl"] == pytest.approx(results["rows"][0]["ppl"], rel=1e-5)
    assert set(results["massive"]) == {"before", "surgery", "after"} and results["massive"]["after"]["max_abs"] > 0
    assert len(results["training"]["history"]) == 4 and results["mitigation"] == "tvr:target=0.05,interval=2+gated"
    assert "| after   | w8a8-tensor |" in table and "max|a|" in table
    reloaded = load_model(model=results["checkpoint"])
    assert type(reloaded.model).__name__ == "MassquantLlamaForCausalLM"


def test_train_command_bad_recipe_is_one_line_exit_2(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("kind: train\ntrain: {steps: 3, batchsize: 2}\n")
    assert main(["train", str(recipe)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("massquant: error:") and "unknown key 'batchsize' (did you mean 'batch_size'?)" in error
    assert "\n" not in error


@pytest.mark.slow
def test_smollm2_gated_is_exact_at_step_0_trains_and_reloads(smollm2, enwiki_text, tmp_path):
    text_ids = smollm2.tokenizer(enwiki_text[:4000], return_tensors="pt")["input_ids"][0]
    bos = torch.tensor([smollm2.tokenizer.bos_token_id])
    ids = torch.cat([bos, text_ids[:63]])[None]
    reference = logits(smollm2.model, ids)
    loaded = load_model(model="smollm2-135m")
    choices = training_choices("gated")
    apply_surgery(loaded.model, choices)
    torch.testing.assert_close(logits(loaded.model, ids), reference, atol=1e-4, rtol=1e-4)
    settings = TrainSettings(seq_len=64, batch_size=2, steps=2, lr=1e-4, warmup_steps=0)
    windows = torch.stack([torch.cat([bos, text_ids[start : start + 63]]) for start in (100, 200, 300, 400)])
    history = train(loaded.model, windows, settings, choices)
    assert len(history) == 2 and all(math.isfinite(r["loss"]) for r in history)
    save_checkpoint(loaded.model, loaded.tokenizer, tmp_path)
    reloaded = load_model(model=str(tmp_path))
    assert torch.equal(logits(reloaded.model, ids), logits(loaded.model, ids))
