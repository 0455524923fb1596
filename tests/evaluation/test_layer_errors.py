"""Per-layer quantization errors: numbers recomputed by hand, outlier sensitivity, purity, and the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from massquant.cli import common, errors as errors_command
from massquant.errors import UserError
from massquant.evaluation.layer_errors import layer_errors
from massquant.models.loading import load_model
from massquant.quantizers.spec import parse_spec
from tests.conftest import run_cli
from tests.integration.test_cli_foundation import assert_one_line_error

CHECKED_LAYER = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    return load_model(model=tiny_llama_dir).model


@pytest.fixture(scope="module")
def token_batch(tiny_model):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, tiny_model.config.vocab_size, (2, 16), generator=generator)


def rows_by_layer(rows):
    return {row["layer"]: row for row in rows}


def captured_input(model, layer_name, batch):
    """The layer's input for every sequence, each sequence run on its own (as layer_errors does)."""
    inputs = []
    handle = model.get_submodule(layer_name).register_forward_hook(lambda module, args, output: inputs.append(args[0].detach()))
    try:
        with torch.no_grad():
            for sequence in batch:
                model(input_ids=sequence[None], use_cache=False)
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])


def int8_absmax_per_row(x):
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def decibels(reference, approx):
    return 10 * math.log10(reference.double().square().sum() / (approx.double() - reference.double()).square().sum())


def test_one_layer_matches_independent_arithmetic(tiny_model, token_batch):
    row = rows_by_layer(layer_errors(tiny_model, parse_spec("w8a8"), token_batch))[CHECKED_LAYER]
    linear = tiny_model.get_submodule(CHECKED_LAYER)
    weight = linear.weight.detach()
    x = captured_input(tiny_model, CHECKED_LAYER, token_batch)
    quantized_weight, quantized_x = int8_absmax_per_row(weight), int8_absmax_per_row(x)  # per output channel, per token
    output = x @ weight.T
    quantized_output = quantized_x @ quantized_weight.T
    assert (row["in_features"], row["out_features"]) == (linear.in_features, linear.out_features)
    assert row["weight_sqnr_db"] == pytest.approx(decibels(weight, quantized_weight), rel=1e-4)
    assert row["act_sqnr_db"] == pytest.approx(decibels(x, quantized_x), rel=1e-4)
    assert row["max_abs_input"] == pytest.approx(x.abs().max().item(), rel=1e-4)
    expected_error = ((quantized_output - output).norm() / output.norm()).item()
    assert row["rel_output_error"] == pytest.approx(expected_error, rel=1e-4)


def test_per_tensor_scales_lose_more_to_an_outlier_channel(tiny_model, token_batch):
    with_outlier = copy.deepcopy(tiny_model)
    with torch.no_grad():
        with_outlier.model.layers[0].input_layernorm.weight[5] *= 1000  # channel 5 of q/k/v_proj's input
    layer = "model.layers.0.self_attn.q_proj"
    plain = rows_by_layer(layer_errors(tiny_model, parse_spec("w8a8"), token_batch))[layer]
    per_token = rows_by_layer(layer_errors(with_outlier, parse_spec("w8a8"), token_batch))[layer]
    per_tensor = rows_by_layer(layer_errors(with_outlier, parse_spec("w8a8-tensor"), token_batch))[layer]
    assert per_token["max_abs_input"] > 100 * plain["max_abs_input"]
    assert per_tensor["act_sqnr_db"] < per_token["act_sqnr_db"]


def test_model_is_left_unchanged(tiny_model, token_batch):
    with torch.no_grad():
        before = tiny_model(input_ids=token_batch).logits
    state = {name: tensor.clone() for name, tensor in tiny_model.state_dict().items()}
    layer_errors(tiny_model, parse_spec("w4g32a8"), token_batch)
    with torch.no_grad():
        after = tiny_model(input_ids=token_batch).logits
    assert torch.equal(before, after)
    assert all(torch.equal(state[name], tensor) for name, tensor in tiny_model.state_dict().items())
    assert not any(module._forward_hooks for module in tiny_model.modules())


def test_weight_only_and_static_specs(tiny_model, token_batch):
    row = layer_errors(tiny_model, parse_spec("w8"), token_batch)[0]
    assert row["act_sqnr_db"] is None and row["weight_sqnr_db"] > 0
    with pytest.raises(UserError, match="dynamic ranges"):
        layer_errors(tiny_model, parse_spec("w8a8-static"), token_batch)


def parsed_errors_arguments(*arguments):
    parser = common.ArgumentParser(prog="massquant errors")
    errors_command.add_arguments(parser)
    return parser.parse_args([str(argument) for argument in arguments])


def test_command_in_process(tiny_llama_dir, tiny_text_file, tiny_model, capsys):
    base = ["--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", 32, "--n-seqs", 2]
    assert errors_command.run(parsed_errors_arguments(*base, "--spec", "w8a8", "--json")) == 0
    printed = json.loads(capsys.readouterr().out)
    linears = [name for name, module in tiny_model.named_modules() if isinstance(module, torch.nn.Linear) and name != "lm_head"]
    assert printed["command"] == "errors" and printed["spec"] == "w8a8"
    assert [row["layer"] for row in printed["rows"]] == linears
    assert errors_command.run(parsed_errors_arguments(*base, "--spec", "w4g32", "--top", 3)) == 0
    table_lines = capsys.readouterr().out.strip().splitlines()
    assert len(table_lines) == 2 + 3 and "rel. out err" in table_lines[0]  # header, rule, three worst layers
    with pytest.raises(UserError, match="exactly one spec"):
        errors_command.run(parsed_errors_arguments(*base, "--spec", "w8a8,w4g32"))


def test_command_as_a_user_runs_it(tiny_llama_dir, tiny_text_file):
    base = ["errors", "--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", 32, "--n-seqs", 2]
    completed = run_cli(*base, "--spec", "w8a8", "--json")
    assert completed.returncode == 0, completed.stderr
    rows = json.loads(completed.stdout)["rows"]
    assert len(rows) == 14 and all(row["rel_output_error"] > 0 for row in rows)  # 2 layers x 7 linears
    assert_one_line_error(run_cli(*base, "--spec", "w8a8", "--spec", "w4g32"), "exactly one spec")
