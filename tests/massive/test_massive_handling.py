"""Massive activations under quantization: keep masks, interventions, --massive policies, massquant intervene."""

from __future__ import annotations

import json

import pytest
import torch

from massquant.errors import UserError
from massquant.massive import MassiveCriteria, MassivePolicy
from massquant.massive import handling
from massquant.massive.intervene import (
    InterventionCounts, ResidualTarget, clip_values, down_projection, intervene_residual, mean_tables, mean_values,
    zero_super_weights,
)
from massquant.massive.sites import MassiveSite, MassiveSites, SuperWeight
from massquant.models.architectures import decoder_layers
from massquant.models.loading import load_model
from massquant.quantizers.functional import fake_quantize, outlier_mask
from massquant.quantizers.spec import parse_spec
from massquant.quantizers.tensors import KeepRule
from massquant.variants import Variant, apply_variant
from massquant.wrapping.modules import ActivationQuantizer, QuantLinear
from tests.conftest import make_tiny_llama

MASSIVE_CHANNEL = 7
PLANTED = 5000.0  # added to the BOS embedding: a massive residual value on the first token from layer 0 on


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def lower_median(values: torch.Tensor) -> float:
    ordered = values.flatten().sort().values
    return float(ordered[(len(ordered) - 1) // 2])


# --- pure functions ------------------------------------------------------------------------------


def test_kept_values_pass_through_and_leave_the_per_tensor_scale():
    x = randn(6, 32, seed=1)
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[0, 3] = keep[4, 9] = True
    x[0, 3], x[4, 9] = 900.0, -450.0
    rest_scale = float(x.masked_fill(keep, 0).abs().max() / 127)
    expected = torch.where(keep, x, torch.fake_quantize_per_tensor_affine(x, rest_scale, 0, -128, 127))
    assert torch.equal(fake_quantize(x, "int", 8, "tensor", keep=keep), expected)
    # without the mask the outlier sets the scale and most other values round to zero
    assert (fake_quantize(x, "int", 8, "tensor") == 0).float().mean() > 0.9


def test_kept_values_leave_their_token_scale_asymmetric():
    x = randn(5, 40, seed=2) + 0.5
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[2, [0, 11]] = True
    x[2, 0], x[2, 11] = 300.0, -80.0
    others = x.masked_fill(keep, 0)
    low, high = others.amin(dim=1).clamp(max=0), others.amax(dim=1).clamp(min=0)
    scale = (high - low) / 255
    zero_point = torch.round(-low / scale).to(torch.int32)
    reference = torch.fake_quantize_per_channel_affine(x.clamp(low[:, None], high[:, None]), scale, zero_point, 0, 0, 255)
    actual = fake_quantize(x, "int", 8, "row", symmetric=False, keep=keep)
    assert torch.equal(actual[keep], x[keep])
    assert torch.allclose(actual[~keep], reference[~keep], atol=1e-6)


def test_outlier_mask_applies_both_criteria_in_the_inspected_channels():
    x = randn(2, 10, 16, seed=3)
    x[0, 0, 5], x[1, 4, 5], x[0, 2, 9], x[1, 1, 12] = 2000.0, -1500.0, 120.0, 3000.0
    median = lower_median(x.abs())
    expected = (x.abs() > 100) & (x.abs() > 50 * median)
    assert torch.equal(outlier_mask(x, 100, 50), expected)
    in_channels = outlier_mask(x, 100, 50, channels=(5, 9))
    assert in_channels.sum() == 3 and not in_channels[..., 12].any() and torch.equal(in_channels[..., 5], expected[..., 5])
    assert outlier_mask(x, 5000, 1) is None  # nothing passes the absolute threshold
    assert outlier_mask(x, 100, 1e6) is None  # nothing passes the median ratio


def test_activation_quantizer_keeps_the_rule_and_counts():
    quantizer = ActivationQuantizer(parse_spec("a8-tensor").activations)
    x = randn(1, 12, 64, seed=4)
    x[0, 0, 7] = 800.0
    x[0, 5, 30] = 600.0  # outside the inspected channel: quantized, and it sets the scale
    quantizer.keep = KeepRule(100.0, 10.0, (7,))
    out = quantizer(x)
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[0, 0, 7] = True
    scale = 600.0 / 127
    assert torch.equal(out, torch.where(keep, x, torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)))
    assert (quantizer.kept_values, quantizer.inspected_values) == (1, x.numel())


def test_zero_mean_clip_change_only_masked_values():
    hidden = torch.tensor([[[900.0, 1.0, -2.0], [3.0, -700.0, 4.0], [500.0, 5.0, 6.0]]])
    mask = hidden.abs() > 100
    means = torch.tensor([[850.0, float("nan"), 0.0], [450.0, -650.0, 0.0]])  # rows: first position, others
    positions = torch.arange(3)[None]
    assert torch.equal(
        mean_values(hidden, mask, means, positions),
        torch.tensor([[[850.0, 1.0, -2.0], [3.0, -650.0, 4.0], [450.0, 5.0, 6.0]]]),
    )
    assert torch.equal(clip_values(hidden, mask, 200.0), torch.tensor([[[200.0, 1.0, -2.0], [3.0, -200.0, 4.0], [200.0, 5.0, 6.0]]]))
    # a position with no calibrated mean in a channel keeps its value
    only_first = torch.tensor([[850.0, 0.0, 0.0], [float("nan")] * 3])
    assert torch.equal(mean_values(hidden, mask, only_first, positions)[0, 2], hidden[0, 2])


def site(layer, sequence, position, channel, value):
    return MassiveSite(layer, sequence, position, channel, value, ratio=abs(value))


def test_mean_tables_average_sites_by_position_class():
    sites = MassiveSites([
        site(3, 0, 0, 7, 1000.0), site(3, 1, 0, 7, 1200.0), site(3, 0, 9, 7, 400.0),
        site(3, 1, 4, 7, 600.0), site(3, 1, 4, 2, -50.0), site(5, 0, 0, 7, 999.0),
    ])
    tables = mean_tables(sites, hidden_size=8)
    assert set(tables) == {3, 5}
    assert tables[3][0, 7] == 1100.0 and tables[3][1, 7] == 500.0 and tables[3][1, 2] == -50.0
    assert tables[3][0, 2].isnan() and tables[3][:, 0].isnan().all()
    assert set(mean_tables(sites, 8, layers=[5])) == {5}


# --- hooks on a tiny LLaMA with a planted massive activation ------------------------------------


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    """A tiny random LLaMA whose BOS embedding carries a massive value in one channel."""
    directory = make_tiny_llama(tmp_path_factory.mktemp("planted-llama"), layers=3)
    loaded = load_model(model=str(directory))
    with torch.no_grad():
        loaded.model.model.embed_tokens.weight[loaded.tokenizer.bos_token_id, MASSIVE_CHANNEL] += PLANTED
    loaded.model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def planted(planted_dir):
    return load_model(model=planted_dir)


@pytest.fixture(scope="module")
def token_ids(planted):
    ids = torch.randint(3, len(planted.tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = planted.tokenizer.bos_token_id
    return ids


def layer_outputs(model, ids) -> list[torch.Tensor]:
    """Decoder-layer outputs, captured by hooks registered after any intervention's."""
    captured = []
    handles = [layer.register_forward_hook(lambda m, a, out: captured.append(out.clone())) for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return captured + [logits]


CRITERIA = MassiveCriteria()


def planted_sites(model, ids) -> MassiveSites:
    """What locate reports for the planted model: channel 7 on the first token from layer 0 on, one super weight."""
    outputs = layer_outputs(model, ids)[:-1]
    sites = [
        site(layer, sequence, 0, MASSIVE_CHANNEL, float(outputs[layer][sequence, 0, MASSIVE_CHANNEL]))
        for layer in range(len(outputs)) for sequence in range(len(ids))
    ]
    weight = float(down_projection(model, 1).weight.detach()[MASSIVE_CHANNEL, 3])
    return MassiveSites(sites, down_proj_channels={1: [3, 11]}, super_weights=[SuperWeight(1, MASSIVE_CHANNEL, 3, weight, 1.0, 1.0)])


@pytest.mark.parametrize("kind", ["zero", "mean", "clip"])
def test_intervention_changes_the_massive_values_of_one_layer_and_undoes(planted, token_ids, kind):
    model = planted.model
    before = layer_outputs(model, token_ids)
    layer0 = before[0]
    assert layer0[:, 0, MASSIVE_CHANNEL].abs().min() > 4000  # the planted massive value is there
    mask = torch.zeros_like(layer0, dtype=torch.bool)
    mask[:, 0, MASSIVE_CHANNEL] = True
    means = {0: torch.full((2, layer0.shape[-1]), float("nan"))}
    means[0][0, MASSIVE_CHANNEL] = 1234.0
    counts = InterventionCounts()
    undo = intervene_residual(model, kind, ResidualTarget(CRITERIA, 0, (MASSIVE_CHANNEL, 2)), means, counts)
    try:
        after = layer_outputs(model, token_ids)
    finally:
        undo()
    bound = max(100.0, 1000 * lower_median(layer0.abs()))
    replacement = {"zero": 0.0, "mean": 1234.0, "clip": bound}[kind]
    expected = layer0.clone()
    expected[:, 0, MASSIVE_CHANNEL] = replacement * layer0[:, 0, MASSIVE_CHANNEL].sign()
    assert torch.equal(after[0], expected)
    assert not torch.equal(after[-1], before[-1])
    assert counts.values == 2 and counts.layers == {0: 1}
    assert torch.equal(layer_outputs(model, token_ids)[-1], before[-1])  # undone exactly


def test_dynamic_detection_changes_only_the_first_massive_layer_of_each_forward(planted, token_ids):
    model = planted.model
    before = layer_outputs(model, token_ids)
    counts = InterventionCounts()
    undo = intervene_residual(model, "clip", ResidualTarget(CRITERIA), counts=counts)
    try:
        layer_outputs(model, token_ids)
        after = layer_outputs(model, token_ids)
    finally:
        undo()
    assert counts.layers == {0: 2}  # reset per forward, never a later layer
    assert counts.values == 2 * 2  # the first token of both sequences, each forward
    assert after[1][:, 0, MASSIVE_CHANNEL].abs().max() < before[1][:, 0, MASSIVE_CHANNEL].abs().min()


def test_super_weights_zeroed_and_restored(planted):
    matrix = down_projection(planted.model, 1).weight
    original = matrix.detach().clone()
    undo = zero_super_weights(planted.model, [SuperWeight(1, 5, 3, 0.0, 0.0, 0.0), SuperWeight(1, 2, 0, 0.0, 0.0, 0.0)])
    assert matrix[5, 3] == 0 and matrix[2, 0] == 0 and (matrix != original).sum() == 2
    undo()
    assert torch.equal(matrix, original)


# --- --massive policies around quantization -------------------------------------------------------


@pytest.fixture
def fake_locate(monkeypatch, planted, token_ids):
    sites = planted_sites(planted.model, token_ids)
    calls = []

    def locate(model, calibration, criteria):
        calls.append(criteria)
        return sites

    monkeypatch.setattr(handling, "locate_sites", locate)
    return sites, calls


def normed_massive_channels(model, token_ids, threshold, ratio) -> dict:
    """{(layer, "q" or "up"): channels} where q_proj's / up_proj's input has |x| > threshold and > ratio x its median |x|
    in some sequence: plain hooks, sequence by sequence."""
    found = {}
    handles = []
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in (("q", layer.self_attn.q_proj), ("up", layer.mlp.up_proj)):
            found[index, name] = set()

            def hook(module, args, key=(index, name)):
                x = args[0][0].abs()
                found[key].update((x > max(threshold, ratio * x.flatten().median())).nonzero()[:, 1].tolist())

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in token_ids:
            model(input_ids=row[None])
    for handle in handles:
        handle.remove()
    return {key: tuple(sorted(channels)) for key, channels in found.items()}


def apply(planted, spec, mode, detection="calibrated", calibration=None, criteria=CRITERIA):
    variant = Variant(parse_spec(spec) if spec else None, MassivePolicy(mode, detection, criteria))
    return apply_variant(planted, variant, calibration)


def test_keep_sets_rules_on_located_inputs_restores_super_weights_and_counts(planted, token_ids, fake_locate):
    sites, _ = fake_locate
    reference = layer_outputs(planted.model, token_ids)[-1]
    criteria = MassiveCriteria(2.0, 5.0)  # the normed first token reaches ~8 in channel 7 of this tiny model
    normed = normed_massive_channels(planted.model, token_ids, 2.0, 5.0)
    applied = apply(planted, "w4g16a8-tensor", "keep", calibration=token_ids, criteria=criteria)
    try:
        layers = decoder_layers(planted.model)
        rules = {name: module.input_quantizer.keep for name, module in planted.model.named_modules() if isinstance(module, QuantLinear)}
        # readers: the channels massive in the stream entering their layer, and those massive in their own (normed) input
        assert rules["model.layers.0.self_attn.q_proj"] == KeepRule(2.0, 5.0, normed[0, "q"]) != KeepRule(2.0, 5.0, ())
        assert rules["model.layers.1.self_attn.q_proj"] == KeepRule(2.0, 5.0, tuple(sorted({MASSIVE_CHANNEL, *normed[1, "q"]})))
        assert rules["model.layers.2.mlp.up_proj"] == KeepRule(2.0, 5.0, tuple(sorted({MASSIVE_CHANNEL, *normed[2, "up"]})))
        assert rules["model.layers.1.mlp.down_proj"] == KeepRule(2.0, 5.0, (3, 11))
        assert rules["model.layers.1.self_attn.o_proj"] is None
        down = layers[1].mlp.down_proj
        assert down.weight[MASSIVE_CHANNEL, 3] == down.original_weight()[MASSIVE_CHANNEL, 3]  # restored
        assert (down.weight != down.original_weight()).sum() > 0.5 * down.weight.numel()  # the rest is 4-bit
        quantized = layer_outputs(planted.model, token_ids)[-1]
        q_proj = layers[1].self_attn.q_proj.input_quantizer
        assert q_proj.kept_values >= len(token_ids)  # the first token's channel 7 in each sequence, and normed outliers
        with_rules = [m.input_quantizer for m in planted.model.modules() if isinstance(m, QuantLinear) and m.input_quantizer.keep]
    finally:
        applied.undo()
    record = applied.summary["massive"]
    kept, inspected = sum(q.kept_values for q in with_rules), sum(q.inspected_values for q in with_rules)
    readers_with_channels = sum(5 for layer in range(3) if normed[layer, "q"] or normed[layer, "up"] or layer > 0)
    assert record["keep_rules"] == len(with_rules) == readers_with_channels + 1  # + layer 1's down_proj
    hidden, intermediate = 64, 128
    assert record["kept_values"] == kept > 0
    assert record["inspected_values"] == inspected == token_ids.numel() * (readers_with_channels * hidden + intermediate)  # one forward
    assert record["kept_fraction"] == pytest.approx(kept / inspected)
    # where: per (linear, channel, token, position), summing to the count; the first token's channel 7 in each sequence
    assert sum(entry["values"] for entry in record["kept"]) == kept
    first = [e for e in record["kept"] if e["linear"] == "model.layers.1.self_attn.q_proj" and e["channel"] == MASSIVE_CHANNEL]
    assert [(e["token_id"], e["position"], e["values"]) for e in first] == [(int(token_ids[0, 0]), "first", len(token_ids))]
    assert record["super_weights_restored"] == [{"layer": 1, "row": MASSIVE_CHANNEL, "col": 3}]
    assert not torch.equal(quantized, reference)
    assert torch.equal(layer_outputs(planted.model, token_ids)[-1], reference)


def test_keep_with_a_real_backend_is_a_user_error_and_leaves_the_model(planted, token_ids, fake_locate):
    reference = layer_outputs(planted.model, token_ids)[-1]
    with pytest.raises(UserError, match="--massive keep needs"):
        apply_variant(planted, Variant(parse_spec("w8", backend="bnb"), MassivePolicy("keep")), token_ids)
    assert torch.equal(layer_outputs(planted.model, token_ids)[-1], reference)


def test_suppression_runs_before_quantization_so_static_ranges_see_it(planted, token_ids, fake_locate):
    q_proj_input = []
    handle = decoder_layers(planted.model)[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: q_proj_input.append(a[0]))
    undo = intervene_residual(planted.model, "zero", ResidualTarget(CRITERIA, 0, (MASSIVE_CHANNEL,)))
    layer_outputs(planted.model, token_ids)
    undo()
    handle.remove()
    applied = apply(planted, "a8-static", "suppress-zero", calibration=token_ids)
    try:
        quantizer = decoder_layers(planted.model)[1].self_attn.q_proj.input_quantizer
        assert float(quantizer.amax) == pytest.approx(float(q_proj_input[0].abs().max()))
        layer_outputs(planted.model, token_ids[:1])  # one evaluated sequence; the calibration passes do not count
    finally:
        applied.undo()
    record = applied.summary["massive"]
    assert record["intervention"] == f"layer 0, channels {MASSIVE_CHANNEL}"
    assert record["values_changed"] == 1 and record["layers"] == {0: 1}
    assert record["located"]["first_layer"] == 0


def test_keep_recalibrates_static_ranges_without_the_kept_values(planted, token_ids, fake_locate):
    criteria = MassiveCriteria(2.0, 5.0)
    inputs = []
    handle = decoder_layers(planted.model)[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    layer_outputs(planted.model, token_ids)
    handle.remove()
    x = inputs[0]
    channels = sorted({MASSIVE_CHANNEL, *normed_massive_channels(planted.model, token_ids, 2.0, 5.0)[1, "q"]})
    kept = outlier_mask(x, 2.0, 5.0, channels)
    applied = apply(planted, "a8-static", "keep", calibration=token_ids, criteria=criteria)
    try:
        quantizer = decoder_layers(planted.model)[1].self_attn.q_proj.input_quantizer
        assert kept.sum() >= 2 and kept[:, 0, MASSIVE_CHANNEL].all()
        assert float(quantizer.amax) == pytest.approx(float(x[~kept].abs().max()))
        assert float(quantizer.amax) < float(x.abs().max())
    finally:
        applied.undo()


def test_dynamic_keep_inspects_every_channel_and_finds_super_weights_without_data(planted, token_ids, fake_locate, monkeypatch):
    _, calls = fake_locate
    prompted = []
    monkeypatch.setattr(handling, "find_super_weights", lambda model, tokenizer, criteria: prompted.append(criteria) or [SuperWeight(2, 5, 9, 0.0, 0.0, 0.0)])
    applied = apply(planted, "w8a8", "keep", detection="dynamic")
    try:
        rules = {m.input_quantizer.keep for m in planted.model.modules() if isinstance(m, QuantLinear)}
        assert rules == {KeepRule(100.0, 1000.0, None)}
        down = down_projection(planted.model, 2)
        original = down.original_weight()
        scale = original[5].abs().max() / 127
        assert down.weight[5, 9] == original[5, 9] != torch.round(original[5, 9] / scale) * scale
    finally:
        applied.undo()
    assert not calls and prompted == [CRITERIA]  # dynamic detection locates nothing on calibration data
    assert applied.summary["massive"]["located"] is None
    assert applied.summary["massive"]["super_weights_restored"] == [{"layer": 2, "row": 5, "col": 9}]


def test_policies_needing_calibration_say_so(planted):
    with pytest.raises(UserError, match="needs calibration"):
        apply(planted, "w8a8-tensor", "suppress-mean", detection="dynamic")


# --- massquant intervene, and the real model ------------------------------------------------------


def test_intervene_command_on_a_planted_massive_activation(planted_dir, tiny_text_file, tmp_path, capsys):
    from massquant.cli.main import main

    status = main([
        "intervene", "--model", planted_dir, "--data", tiny_text_file, "--seq-len", "32", "--max-tokens", "128",
        "--calib-data", tiny_text_file, "--calib-samples", "2", "--calib-seq-len", "32", "--json", "--out", str(tmp_path),
    ])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    printed = json.loads(captured.out)
    assert printed == json.loads((tmp_path / "results.json").read_text())
    assert printed["located"]["first_layer"] == 0 and printed["located"]["channels"][0] == MASSIVE_CHANNEL
    rows = {row["intervention"]: row for row in printed["rows"]}
    assert list(rows) == ["unchanged", "zero", "mean", "clip"]  # no super weight in this model: its row is left out
    assert "no super weight" in captured.err
    windows = rows["unchanged"]["windows"]
    for name in ("zero", "mean", "clip"):
        assert rows[name]["values_changed"] == windows and rows[name]["layers"] == {"0": windows}
        assert rows[name]["delta_ppl"] == pytest.approx(rows[name]["ppl"] - rows["unchanged"]["ppl"])
    # the mean of a planted constant is that constant: perplexity moves far less than with zero
    assert abs(rows["mean"]["delta_ppl"]) < 0.01 * abs(rows["zero"]["delta_ppl"])


def test_eval_keep_versus_none_in_one_table(planted_dir, tiny_text_file, tmp_path, capsys):
    """The issue's command: --spec w8a8 --act-granularity tensor --massive none,keep; the table notes what was kept.
    The linears read the normed stream, where the planted value is about sqrt(hidden) = 5.7: thresholds to match."""
    from massquant.cli.main import main

    status = main([
        "eval", "--model", planted_dir, "--data", tiny_text_file, "--seq-len", "32", "--max-tokens", "128",
        "--spec", "w8a8", "--act-granularity", "tensor", "--massive", "none,keep", "--massive-threshold", "4", "--massive-ratio", "5",
        "--calib-data", tiny_text_file, "--calib-samples", "2", "--calib-seq-len", "32", "--out", str(tmp_path),
    ])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    rows = {row["config"]: row for row in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert list(rows) == ["fp", "w8a8-tensor", "w8a8-tensor massive=keep"]
    kept = rows["w8a8-tensor massive=keep"]["quantization"]["massive"]
    assert kept["kept_values"] > 0 and kept["kept_fraction"] == pytest.approx(kept["kept_values"] / kept["inspected_values"])
    line = next(line for line in captured.out.splitlines() if "massive=keep" in line)
    assert f"kept {kept['kept_values']} values unquantized" in line
    assert abs(rows["w8a8-tensor massive=keep"]["delta_ppl"]) < abs(rows["w8a8-tensor"]["delta_ppl"])


def test_intervene_rejects_unknown_interventions(planted_dir, capsys):
    from massquant.cli.main import main

    assert main(["intervene", "--model", planted_dir, "--interventions", "zero,halve"]) == 2
    assert "accepted: zero, mean, clip, super-weights" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smollm2_case(smollm2, enwiki_text):
    """One calibration sequence and two scored windows of 128 tokens: cheap, yet the real model."""
    from massquant.data.calibration import calibration_batch
    from massquant.evaluation.perplexity import PerplexityConfig, build_windows

    calibration = calibration_batch(smollm2.tokenizer, "lee-news", 1, 128, seed=0)
    windows = build_windows(smollm2.tokenizer, enwiki_text, PerplexityConfig(seq_len=128, max_tokens=254), 8192)
    return calibration, windows


def test_smollm2_first_massive_layer_zeroed_or_set_to_its_mean(smollm2, smollm2_case):
    """Located, not hard-coded: the first massive layer's values sit on the first token; zero breaks, mean does not."""
    from massquant.evaluation.perplexity import perplexity
    from massquant.massive.intervene import first_layer_target

    calibration, windows = smollm2_case
    sites = handling.locate_sites(smollm2.model, calibration, CRITERIA)
    target = first_layer_target(sites, CRITERIA)
    first = [s for s in sites.sites if s.layer == target.layer]
    assert {s.position for s in first} == {0} and max(abs(s.value) for s in first) > 10_000
    model = smollm2.model
    ppl = {"unchanged": perplexity(model, windows).ppl}
    for kind in ("zero", "mean"):
        undo = intervene_residual(model, kind, target, mean_tables(sites, model.config.hidden_size))
        try:
            ppl[kind] = perplexity(model, windows).ppl
        finally:
            undo()
    assert abs(ppl["mean"] / ppl["unchanged"] - 1) < 0.05 and ppl["zero"] > 10 * ppl["unchanged"]
    assert perplexity(model, windows).ppl == ppl["unchanged"]  # undone exactly


@pytest.mark.slow
def test_smollm2_keep_beats_plain_per_tensor_w8a8(smollm2, smollm2_case):
    from massquant.evaluation.perplexity import perplexity

    calibration, windows = smollm2_case
    ppl = {}
    for mode in ("none", "keep"):
        applied = apply_variant(smollm2, Variant(parse_spec("w8a8-tensor"), MassivePolicy(mode)), calibration)
        try:
            ppl[mode] = perplexity(smollm2.model, windows).ppl
        finally:
            applied.undo()
    assert ppl["keep"] < 0.9 * ppl["none"]
    record = applied.summary["massive"]
    assert 0 < record["kept_values"] < 1e-5 * record["inspected_values"] and record["super_weights_restored"]
