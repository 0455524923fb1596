"""Locating massive activations and super weights, checked against plain transformers computations.

Every statistic is recomputed here from tensors transformers hands out
(``output_hidden_states``, ``output_attentions``, plain forward hooks) with
straightforward torch code: medians with ``torch.median``, kurtosis from
float64 central moments, entropy from eigenvalues.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from massquant.cli import common, locate as locate_command
from massquant.data.calibration import calibration_batch
from massquant.errors import UserError
from massquant.massive import MassiveCriteria
from massquant.massive.intervene import zero_super_weights
from massquant.massive.locate import locate
from massquant.massive.observers import attention_sink_share, layer_output
from massquant.massive.report import LocateConfig, format_ranges, outlier_summary
from massquant.massive.statistics import entries_above, excess_kurtosis, gram_entropy, largest, magnitude_profile, median_magnitude, power_sums, row_magnitudes
from massquant.massive.plots import load_activations, write_plots
from massquant.massive.super_weights import DEFAULT_PROMPT, find_super_weights, spike_super_weight
from massquant.models.loading import load_model
from tests.conftest import decoder_layer_outputs, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- pure functions --------------------------------------------------------------------------------


def sample_tensors():
    generator = torch.Generator().manual_seed(0)
    plain = torch.randn(37, 53, generator=generator)
    ties = torch.randint(-3, 4, (16, 16), generator=generator).float()
    half_zero = torch.randn(8, 10, generator=generator)
    half_zero[:, :5] = 0
    massive = torch.randn(64, 96, generator=generator)
    massive[0, 7], massive[12, 40] = 2.5e4, -1.9e3
    # a layer-sized tensor, the massive values far apart
    large = torch.randn(700, 1000, generator=generator)
    large[0, 3], large[650, 999] = 3e4, -2e3
    return {
        "plain": plain, "ties": ties, "half_zero": half_zero, "massive": massive, "pair": torch.tensor([[3.0, -1.0]]), "large": large,
    }


@pytest.mark.parametrize("kind", ["plain", "ties", "half_zero", "massive", "pair", "large"])
def test_median_magnitude_is_torch_median_of_the_magnitudes(kind):
    x = sample_tensors()[kind]
    assert median_magnitude(x) == float(x.abs().median())
    row_maxima, median = magnitude_profile(x)
    assert median == float(x.abs().median())
    assert np.array_equal(row_maxima, x.abs().amax(dim=-1).numpy())


@pytest.mark.parametrize("kind", ["plain", "ties", "massive"])
def test_largest_are_the_flattened_top_k(kind):
    x = sample_tensors()[kind]
    assert np.array_equal(row_magnitudes(x), x.abs().amax(dim=-1).numpy())
    values, positions, channels = largest(x, row_magnitudes(x), 6)
    assert torch.equal(torch.tensor(values).abs(), x.abs().flatten().topk(6).values)
    assert [float(x[p, c]) for p, c in zip(positions, channels)] == values


def test_entries_above_a_cutoff():
    x = sample_tensors()["massive"]
    values, positions, channels = entries_above(x, row_magnitudes(x), 1000.0)
    assert sorted(zip(positions, channels, values)) == [(0, 7, 2.5e4), (12, 40, -1.9e3)]


def reference_kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    centered = x - x.mean()
    return float(centered.pow(4).mean() / centered.pow(2).mean() ** 2 - 3)


def test_excess_kurtosis_pools_power_sums_over_tensors():
    tensors = sample_tensors()
    first, second = tensors["massive"], tensors["plain"] * 5 + 1
    pooled = [a + b for a, b in zip(power_sums(first), power_sums(second))]
    assert excess_kurtosis(pooled) == pytest.approx(reference_kurtosis(torch.cat([first.flatten(), second.flatten()])), rel=1e-4)
    large = tensors["large"]
    assert excess_kurtosis(power_sums(large)) == pytest.approx(reference_kurtosis(large.flatten()), rel=1e-4)
    gaussian = torch.randn(400, 500, generator=torch.Generator().manual_seed(1))
    assert abs(excess_kurtosis(power_sums(gaussian))) < 0.05


def reference_entropy(x: torch.Tensor) -> float:
    eigenvalues = torch.linalg.eigvalsh(x.double() @ x.double().T).clamp_min(0)
    p = eigenvalues / eigenvalues.sum()
    return float(-torch.log((p * p).sum()))


@pytest.mark.parametrize("shape", [(20, 48), (48, 20)])  # fewer tokens than channels, and more
def test_gram_entropy_is_renyi_2_of_the_gram_spectrum(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    assert gram_entropy(x) == pytest.approx(reference_entropy(x), rel=1e-5)
    x[0] *= 1e3  # one token of massive norm takes the whole spectrum: the compression valley
    assert gram_entropy(x) == pytest.approx(reference_entropy(x), abs=1e-4) and gram_entropy(x) < 0.01


def test_format_ranges():
    assert format_ranges([7, 2, 3, 4, 9, 10]) == "2-4,7,9-10"
    assert format_ranges([5]) == "5"


def test_spike_super_weight_finds_the_planted_weight():
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(10, 24, generator=generator) * 0.1
    weight = torch.randn(8, 24, generator=generator) * 0.1
    inputs[4, 17] = 300.0  # input spike on token 4, channel 17
    weight[2, 17] = 2.0  # ... multiplied into output channel 2
    outputs = inputs @ weight.T
    found = spike_super_weight(5, inputs, outputs, weight, MassiveCriteria(100, 50))
    assert (found.layer, found.row, found.col, found.position) == (5, 2, 17, 4)
    assert (found.value, found.input_value, found.output_value) == (2.0, 300.0, pytest.approx(float(outputs[4, 2])))
    assert found.contribution == pytest.approx(600.0 / float(outputs[4, 2]))
    assert spike_super_weight(5, inputs, outputs, weight, MassiveCriteria(1000, 50)) is None  # below the threshold


# ---- a tiny LLaMA with a planted super weight ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(model=tiny_llama_dir)


@pytest.fixture(scope="module")
def planted(tiny):
    """Layer 0's MLP: intermediate channel 7 boosted, and down_proj[5, 7] large: a super weight writing channel 5."""
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[7] *= 1e4
        model.model.layers[0].mlp.down_proj.weight[5, 7] = 40.0
    return model


@pytest.fixture(scope="module")
def tiny_batch(tiny):
    generator = torch.Generator().manual_seed(4)
    batch = torch.randint(3, tiny.model.config.vocab_size, (3, 24), generator=generator)
    batch[:, 0] = tiny.tokenizer.bos_token_id
    return batch


def captured_down_projection(model, layer: int, batch: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of one down projection for each sequence, run one at a time."""
    seen = []
    handle = model.model.layers[layer].mlp.down_proj.register_forward_hook(
        lambda module, args, output: seen.append((args[0][0].detach(), output[0].detach()))
    )
    try:
        with torch.no_grad():
            for sequence in batch:
                model(input_ids=sequence[None])
    finally:
        handle.remove()
    return seen


def test_planted_super_weight_and_its_massive_channel_are_found(planted, tiny, tiny_batch):
    report = locate(planted, tiny_batch, LocateConfig(), tokenizer=tiny.tokenizer, progress=False)
    # independent: the largest down_proj output over the sequences, and the largest input of that token
    seen = captured_down_projection(planted, 0, tiny_batch)
    sequence = max(range(len(seen)), key=lambda s: float(seen[s][1].abs().max()))
    inputs, outputs = seen[sequence]
    position, row = divmod(int(outputs.abs().argmax()), outputs.shape[1])
    col = int(inputs[position].abs().argmax())
    assert (row, col) == (5, 7)
    [weight] = [w for w in report.massive.super_weights if w.layer == 0]
    assert (weight.row, weight.col, weight.position, weight.value) == (5, 7, position, 40.0)
    assert weight.input_value == pytest.approx(float(inputs[position, 7]))
    assert weight.output_value == pytest.approx(float(outputs[position, 5]))
    # input channels of down_proj that meet the criteria, per sequence against that sequence's median
    expected_channels = set()
    for inputs, _ in seen:
        magnitudes = inputs.abs()
        expected_channels |= set(((magnitudes > 100) & (magnitudes > 1000 * magnitudes.median())).nonzero()[:, 1].tolist())
    assert report.massive.down_proj_channels[0] == sorted(expected_channels) == [7]
    assert report.massive.channels[0] == 5 and report.massive.first_layer == 0
    assert all(math.isnan(stats.entropy) for stats in report.layers)  # not asked for: no Gram products
    assert not locate(tiny.model, tiny_batch, progress=False).massive  # the unmodified model has none


def test_attention_share_and_layer_output_match_transformers(tiny, tiny_batch):
    model = tiny.model
    share = torch.tensor(attention_sink_share(model, tiny_batch, progress=False))
    eager = load_model(model=tiny.source, attn_implementation="eager").model
    with torch.no_grad():
        outputs = eager(input_ids=tiny_batch, output_attentions=True, output_hidden_states=True)
    expected = torch.stack([layer[:, :, 1:, 0].mean(dim=(0, 2)) for layer in outputs.attentions])
    torch.testing.assert_close(share, expected)
    assert model.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(layer_output(model, tiny_batch[1], 0), outputs.hidden_states[1][1])
    with pytest.raises(UserError, match="layers 0..1"):
        layer_output(model, tiny_batch[1], 2)


def test_plots_are_written(planted, tiny, tiny_batch, tmp_path):
    report = locate(planted, tiny_batch, LocateConfig(attention_sink=True, entropy=True), tokenizer=tiny.tokenizer, progress=False)
    tokens = [tiny.tokenizer.decode([token]) for token in tiny_batch[0].tolist()]
    paths = write_plots(report.as_dict(), tmp_path, (0, layer_output(planted, tiny_batch[0], 0).numpy(), tokens))
    assert sorted(path.name for path in paths) == [
        "attention-sink.png", "heatmap-layer-0.png", "magnitudes-3d-layer-0.png", "magnitudes.png", "outliers.png",
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000


def test_bad_input_is_a_user_error(tiny):
    with pytest.raises(UserError, match="top-k"):
        LocateConfig(top_k=0).validate()
    with pytest.raises(UserError, match="median_ratio"):
        LocateConfig(criteria=MassiveCriteria(100, 0.5)).validate()
    with pytest.raises(UserError, match="at least 2 tokens"):
        locate(tiny.model, torch.tensor([[1]]), progress=False)


# ---- the real SmolLM2 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_batch(smollm2):
    return calibration_batch(smollm2.tokenizer, "enwiki-sample", 2, 128, seed=0)


@pytest.fixture(scope="module")
def smol_report(smollm2, smol_batch):
    return locate(smollm2.model, smol_batch, LocateConfig(entropy=True), tokenizer=smollm2.tokenizer, progress=False)


@pytest.fixture(scope="module")
def smol_layer_outputs(smollm2, smol_batch):
    return decoder_layer_outputs(smollm2.model, smol_batch)


def test_smollm2_massive_sites_match_hidden_states(smol_report, smol_layer_outputs, smol_batch, smollm2):
    expected = {}
    for layer, per_sequence in enumerate(smol_layer_outputs):
        for sequence, hidden in enumerate(per_sequence):
            magnitudes = hidden.abs()
            mask = (magnitudes > 100) & (magnitudes > 1000 * magnitudes.median())
            for position, channel in mask.nonzero().tolist():
                expected[(layer, sequence, position, channel)] = float(hidden[position, channel])
    found = {(s.layer, s.sequence, s.position, s.channel): s.value for s in smol_report.massive.sites}
    assert found.keys() == expected.keys()
    assert all(found[key] == pytest.approx(value, rel=1e-5) for key, value in expected.items())
    # What it found without being told: SmolLM2's massive activation is channel 507 of the first (BOS) token,
    # from layer 11 on, about 25,000 against a median |a| below 2.
    strongest = max(smol_report.massive.sites, key=lambda site: abs(site.value))
    assert (strongest.channel, strongest.position, strongest.token) == (507, 0, "<|im_start|>")
    assert smol_report.massive.first_layer == 11 and abs(strongest.value) > 2e4 and strongest.ratio > 1e4
    assert smol_report.tokens[0].token == "<|im_start|>" and smol_report.tokens[0].at_first_position == len(smol_batch)


def test_smollm2_layer_statistics_match_hidden_states(smol_report, smol_layer_outputs):
    for stats, per_sequence in zip(smol_report.layers, smol_layer_outputs):
        stacked = torch.stack(per_sequence)
        assert abs(stats.top[0].value) == pytest.approx(float(stacked.abs().max()), rel=1e-6)
        assert stats.median == pytest.approx(sum(float(h.abs().median()) for h in per_sequence) / len(per_sequence), rel=1e-6)
        leading = [sorted(h.abs().flatten().topk(3).values.tolist()) for h in per_sequence]
        assert stats.top_means == pytest.approx([sum(v[2 - i] for v in leading) / len(leading) for i in range(3)], rel=1e-6)
        assert stats.kurtosis == pytest.approx(reference_kurtosis(stacked), rel=1e-3)
        assert stats.first_token_norm == pytest.approx(sum(float(h[0].norm()) for h in per_sequence) / len(per_sequence), rel=1e-5)
        other_norms = [float(h[1:].norm(dim=-1).median()) for h in per_sequence]
        assert stats.token_norm == pytest.approx(sum(other_norms) / len(other_norms), rel=1e-5)
        assert stats.entropy == pytest.approx(sum(reference_entropy(h) for h in per_sequence) / len(per_sequence), rel=1e-3, abs=1e-4)
    summary = outlier_summary(smol_report)
    maxima = [float(torch.stack(h).abs().max()) for h in smol_layer_outputs]
    assert summary["max_abs"] == pytest.approx(max(maxima), rel=1e-6) and summary["max_abs_layer"] == maxima.index(max(maxima))
    assert summary["first_massive_layer"] == 11
    assert summary["max_kurtosis"] == max(stats.kurtosis for stats in smol_report.layers)
    # the compression valley: the massive first token collapses the entropy in the middle layers
    assert min(stats.entropy for stats in smol_report.layers[11:28]) < 0.1 < smol_report.layers[0].entropy


def test_smollm2_super_weight_found_data_free_and_zeroing_it_removes_its_share(smollm2, smol_report):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    found = find_super_weights(model, tokenizer)  # one short prompt
    by_layer = {weight.layer: weight for weight in found}
    weight = by_layer[11]
    assert (weight.row, weight.col) == (507, 1229)  # the same weight locate found on Wikipedia text
    assert any((w.layer, w.row, w.col) == (11, 507, 1229) for w in smol_report.massive.super_weights)
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(DEFAULT_PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids, output_hidden_states=True).hidden_states[12][0, weight.position, 507]
        undo = zero_super_weights(model, [weight])
        try:
            after = model(input_ids=ids, output_hidden_states=True).hidden_states[12][0, weight.position, 507]
        finally:
            undo()
    # layer 11's output moves by exactly the one product the weight contributed
    assert float(after) == pytest.approx(float(before) - weight.value * weight.input_value, rel=1e-4)
    assert abs(float(after)) < 0.3 * abs(float(before))


# ---- the command ---------------------------------------------------------------------------------------


def parsed(*arguments):
    parser = common.ArgumentParser(prog="massquant locate")
    locate_command.add_arguments(parser)
    return parser.parse_args([str(argument) for argument in arguments])


def test_command_in_process(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    base = ["--model", tiny_llama_dir, "--data", tiny_text_file, "--n-seqs", 2, "--seq-len", 24, "--massive-threshold", 0.05, "--massive-ratio", 3]
    assert locate_command.run(parsed(*base, "--out", tmp_path, "--top-k", 4)) == 0
    printed = capsys.readouterr().out
    assert "Massive activations as phenomena (|a| > 0.05 and > 3 x the layer's median |a| (Sun et al. 2024)" in printed
    assert "Blind spots of the criterion" in printed and "Super weights" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["command"] == "locate" and saved["data"]["bos_prepended"] is True
    assert len(saved["layers"]) == 2 and len(saved["layers"][0]["top"]) == 4
    assert saved["massive_groups"] and saved["summary"]["massive_values"] == len(saved["massive"]["sites"])
    layer = saved["summary"]["first_massive_layer"]
    assert saved["criterion"]["rule"] == saved["config"]["criteria"]["rule"] == "sun"
    assert sum(phenomenon["values"] for phenomenon in saved["phenomena"]) == len(saved["massive"]["sites"])
    assert sorted(saved["plots"]) == ["attention-sink.png", f"heatmap-layer-{layer}.png", f"magnitudes-3d-layer-{layer}.png", "magnitudes.png", "outliers.png"]
    assert all((tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE for name in saved["plots"])
    # the heat-map layer's output of the first sequence is saved: the layer's output, recomputed independently
    values, tokens = load_activations(tmp_path / saved["activations"]["file"])
    loaded = load_model(model=tiny_llama_dir)
    ids = calibration_batch(loaded.tokenizer, tiny_text_file, 2, 24, 0, bos=True)[:1]  # the command's first sequence
    with torch.no_grad():
        expected = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
    assert saved["activations"]["shape"] == [24, 64] and tokens == [loaded.tokenizer.decode([token]) for token in ids[0].tolist()]
    torch.testing.assert_close(torch.from_numpy(values), expected)
    assert locate_command.run(parsed(*base, "--json", "--bos", "never")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"]["bos_prepended"] is False and "plots" not in printed and printed["attention_sink"] is None
    with pytest.raises(UserError, match="--layer 5 does not exist"):
        locate_command.run(parsed(*base, "--layer", 5))
    with pytest.raises(UserError, match="--massive-ratio: expected a number >= 1; got 0"):
        locate_command.run(parsed(*base, "--massive-ratio", 0))
    with pytest.raises(UserError, match="--criterion: unknown value 'median'; accepted: sun, prefixquant, top-k"):
        locate_command.run(parsed(*base, "--criterion", "median"))
    with pytest.raises(UserError, match="takes no ratio"):
        locate_command.run(parsed(*base, "--criterion", "top-k"))
    assert locate_command.run(parsed(*base[:-4], "--criterion", "top-k", "--k", 2, "--massive-threshold", 0, "--json")) == 0
    printed = json.loads(capsys.readouterr().out)
    # top-k: exactly k values per layer and sequence (random weights: no ties)
    assert printed["criterion"]["rule"] == "top-k" and len(printed["massive"]["sites"]) == 2 * 2 * 2


@pytest.mark.slow
def test_command_on_smollm2_finds_the_massive_activation_unaided(tmp_path):
    completed = run_cli("locate", "--n-seqs", 2, "--seq-len", 128, "--out", tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    first_row = completed.stdout.split("\n")[3]  # heading, header, rule, the largest phenomenon
    assert "channel 507 on BOS ('<|im_start|>'), layers 11–27" in first_row
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["first_massive_layer"] == 11
    assert "heatmap-layer-11.png" in saved["plots"] and all((tmp_path / name).is_file() for name in saved["plots"])
    assert math.isfinite(saved["summary"]["max_abs"])
