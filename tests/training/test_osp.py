"""Outlier-safe pre-training (Park et al. 2025): single-scale RMSNorm, the embedding projection, Muon."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from massquant.mitigations.embproj import EmbeddingProjection
from massquant.mitigations.ssnorm import SingleScaleRMSNorm
from massquant.models.architectures import decoder_layers
from massquant.models.loading import load_model
from massquant.training.checkpoint import save_checkpoint
from massquant.training.loop import _optimizers, train, training_windows
from massquant.training.recipe import parse_recipe
from massquant.training.runner import build_from_scratch
from massquant.training.surgery import apply_surgery, recorded_choices, training_choices
from tests.conftest import TRAINING_TEXT
from tests.training.test_training import SCRATCH, ids_for, logits, one_thread  # noqa: F401 (autouse fixture)


def test_ssnorm_is_a_single_scale_rmsnorm():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0)) * 7
    norm = SingleScaleRMSNorm(16, eps=1e-5, scale=2.5)
    expected = 2.5 * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)
    assert [name for name, _ in norm.named_parameters()] == ["weight"] and norm.weight.shape == (1,)


def test_ssnorm_surgery_starts_at_the_mean_gain_and_is_exact_for_constant_gains(tiny_llama_dir):
    model = load_model(model=tiny_llama_dir).model
    ids = ids_for(load_model(model=tiny_llama_dir).tokenizer, (2, 12))
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.input_layernorm.weight.fill_(0.75)
            layer.post_attention_layernorm.weight.fill_(1.25)
        model.model.norm.weight.fill_(2.0)
    before = logits(model, ids)
    report = apply_surgery(model, training_choices("ssnorm"))["ssnorm"]
    assert report["scale"]["model.norm"] == 2.0 and report["scale"]["model.layers.0.input_layernorm"] == 0.75
    assert isinstance(model.model.layers[1].post_attention_layernorm, SingleScaleRMSNorm)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-6, atol=1e-6)

    fresh = load_model(model=tiny_llama_dir).model
    gain = torch.linspace(0.5, 1.5, fresh.config.hidden_size)
    with torch.no_grad():
        fresh.model.norm.weight.copy_(gain)
    apply_surgery(fresh, training_choices("ssnorm"))
    assert float(fresh.model.norm.weight.detach()) == pytest.approx(float(gain.mean()))


def test_embproj_is_the_identity_at_init_and_a_learnable_map_after(tiny_llama_dir):
    loaded = load_model(model=tiny_llama_dir)
    model, ids = loaded.model, ids_for(loaded.tokenizer, (2, 12))
    before = logits(model, ids)
    apply_surgery(model, training_choices("embproj"))
    assert torch.equal(logits(model, ids), before)
    projection = model.model.embed_tokens.projection
    assert isinstance(projection, EmbeddingProjection)
    with torch.no_grad():
        projection.weight.mul_(0.5)
    embedded = model.get_input_embeddings()(ids)
    torch.testing.assert_close(embedded, 0.5 * model.model.embed_tokens.weight[ids])


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tiny_llama_dir):
    model = load_model(model=tiny_llama_dir).model
    apply_surgery(model, training_choices("ssnorm+embproj"))
    settings = parse_recipe({"model": tiny_llama_dir, "train": {"optimizer": "muon"}, "eval": None}).train
    adamw, muon = _optimizers(model, settings)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in in_muon}
    assert model.model.embed_tokens.weight is not None and "model.embed_tokens.weight" not in names
    assert "lm_head.weight" not in names and "model.embed_tokens.projection.weight" in names
    assert names == {name for name, p in model.named_parameters() if p.ndim == 2} - {"model.embed_tokens.weight", "lm_head.weight"}
    assert len(_optimizers(model, parse_recipe({"model": tiny_llama_dir, "eval": None}).train)) == 1  # default: AdamW only


@pytest.mark.parametrize("mitigation", ["none", "ssnorm+embproj"])
def test_muon_training_from_scratch_lowers_the_loss_and_the_checkpoint_reloads_identically(tiny_llama_dir, tiny_text_file, mitigation, tmp_path):
    recipe = parse_recipe({
        "model": tiny_llama_dir, "from_scratch": SCRATCH, "mitigation": mitigation,
        "train": {"data": tiny_text_file, "seq_len": 32, "batch_size": 4, "steps": 12, "lr": 3e-3, "warmup_steps": 2, "optimizer": "muon"},
        "eval": None,
    })
    loaded = build_from_scratch(recipe)
    choices = training_choices(mitigation)
    ids = ids_for(loaded.tokenizer, (2, 20), seed=5)
    start = logits(loaded.model, ids)
    apply_surgery(loaded.model, choices)
    assert torch.equal(logits(loaded.model, ids), start)  # from scratch both are exact at step 0
    windows = training_windows(loaded.tokenizer, TRAINING_TEXT, recipe.train, 0, 256)
    history = train(loaded.model, windows, recipe.train, choices)
    losses = [record["loss"] for record in history]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5

    save_checkpoint(loaded.model, loaded.tokenizer, tmp_path)
    assert recorded_choices(AutoConfig.from_pretrained(tmp_path)) == choices
    expected = logits(loaded.model, ids)
    assert torch.equal(logits(load_model(model=str(tmp_path)).model, ids), expected)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert torch.equal(logits(remote, ids), expected)


def test_train_table_shows_excess_kurtosis_and_max_abs_on_the_unquantized_rows():
    from massquant.cli.train import summary

    payload = {
        "mitigation": "ssnorm+embproj", "recipe": {"train": {"optimizer": "muon"}}, "checkpoint": "ck",
        "training": {"history": [{}] * 3, "tokens_per_step": 8, "seconds": 1.0, "first_loss": 5.0, "final_loss": 4.0},
        "massive": {"after": {"max_abs": 12.5, "mean_kurtosis": 0.375}},
        "rows": [{"stage": "after", "spec": "fp", "config": "fp", "ppl": 10.0, "delta_ppl": 0.0},
                 {"stage": "after", "spec": "w8a8-tensor", "config": "w8a8-tensor", "ppl": 11.0, "delta_ppl": 1.0}],
    }
    text = summary(payload, "github")
    assert "ssnorm+embproj (muon): 3 steps" in text and "excess kurtosis" in text
    fp, quantized = [line for line in text.splitlines() if "| after" in line]
    assert "12.5" in fp and "0.375" in fp and "12.5" not in quantized and "0.375" not in quantized
