"""Loss attribution by token class and the per-layer sensitivity scan (massquant.analysis.attribution)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from massquant.analysis.attribution import CLASSES, class_shares, position_classes, scan_units
from massquant.quantizers.spec import parse_spec
from tests.conftest import run_cli


def test_position_classes_partition_with_first_then_massive_then_delimiter():
    texts = [["<s>", "The", ",", " ", "cat", "."], ["<s>", ".", "dog", "!", "\n", "x"]]
    carriers = {(0, 0), (0, 2), (1, 2), (1, 4)}  # (0, 0) is first anyway; a massive delimiter is 'massive'
    classes = position_classes(texts, carriers)
    names = [[CLASSES[index] for index in row] for row in classes]
    assert names == [
        ["first", "other", "massive", "delimiter", "other", "delimiter"],
        ["first", "delimiter", "massive", "delimiter", "massive", "other"],
    ]


def test_class_shares_sum_to_the_total_and_match_hand_computation():
    generator = torch.Generator().manual_seed(0)
    baseline = torch.rand(3, 7, generator=generator, dtype=torch.float64) * 4
    quantized = baseline + torch.randn(3, 7, generator=generator, dtype=torch.float64).abs() * 0.5
    quantized[1, 3] -= 1.0  # a prediction that got better: shares can be negative
    scored = torch.ones(3, 7, dtype=torch.bool)
    scored[2, :3] = False  # a sliding window's already-scored prefix
    classes = np.random.default_rng(0).integers(0, len(CLASSES), size=(3, 8))
    result = class_shares(baseline, quantized, scored, classes)

    delta = (quantized - baseline)[scored]
    assert result["total"]["delta_nll"] == pytest.approx(float(delta.sum()), rel=1e-12)
    assert sum(c["delta_nll"] for c in result["classes"]) == pytest.approx(float(delta.sum()), rel=1e-12)
    assert sum(c["share"] for c in result["classes"]) == pytest.approx(1.0, abs=1e-12)
    assert sum(c["tokens"] for c in result["classes"]) == int(scored.sum()) == 18
    base_ppl = math.exp(float(baseline[scored].mean()))
    quant_ppl = math.exp(float(quantized[scored].mean()))
    assert result["total"]["delta_ppl"] == pytest.approx(quant_ppl - base_ppl, rel=1e-12)
    assert sum(c["delta_ppl_share"] for c in result["classes"]) == pytest.approx(quant_ppl - base_ppl, rel=1e-12)
    # one class by hand: predictions made at positions of class 2 (target t + 1 predicted at position t)
    members = scored & torch.from_numpy(classes[:, :-1] == 2)
    own = float((quantized - baseline)[members].sum())
    entry = result["classes"][2]
    assert entry["tokens"] == int(members.sum())
    assert entry["delta_nll"] == pytest.approx(own, rel=1e-12)
    mixed = torch.where(members, quantized, baseline)[scored].mean()
    assert entry["isolated_delta_ppl"] == pytest.approx(math.exp(float(mixed)) - base_ppl, rel=1e-12)


def test_cli_attribution_total_equals_eval_and_classes_partition_it(tiny_llama_dir, tiny_text_file, tmp_path):
    common = ["--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", "48", "--max-tokens", "240"]
    completed = run_cli("analyze", "attribution", *common, "--spec", "w4g32a4-tensor", "--out", tmp_path / "a")
    assert completed.returncode == 0, completed.stderr
    payload = json.loads((tmp_path / "a" / "results.json").read_text())
    (row,) = payload["rows"]
    assert (tmp_path / "a" / "attribution.png").stat().st_size > 0
    evaluated = run_cli("eval", *common, "--spec", "w4g32a4-tensor", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    fp, quantized = json.loads(evaluated.stdout)["rows"]
    assert row["total"]["baseline_ppl"] == pytest.approx(fp["ppl"], rel=1e-9)
    assert row["total"]["ppl"] == pytest.approx(quantized["ppl"], rel=1e-9)
    assert row["total"]["tokens"] == quantized["tokens"]
    assert sum(c["delta_nll"] for c in row["classes"]) == pytest.approx(row["total"]["delta_nll"], rel=1e-9)
    assert sum(c["tokens"] for c in row["classes"]) == row["total"]["tokens"]
    first = next(c for c in row["classes"] if c["class"] == "first")
    assert first["tokens"] == quantized["windows"]  # one BOS prediction per window
    assert "total" in completed.stdout and "first" in completed.stdout


def test_layer_scan_row_equals_eval_with_include_of_that_layer(tiny_llama_dir, tiny_text_file, tmp_path):
    common = ["--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", "48", "--max-tokens", "240", "--spec", "w4g32a4-tensor"]
    completed = run_cli("analyze", "layers", *common, "--out", tmp_path / "s")
    assert completed.returncode == 0, completed.stderr
    rows = json.loads((tmp_path / "s" / "results.json").read_text())["rows"]
    assert [row["unit"] for row in rows] == ["layer 0", "layer 1", "all (the full spec)"]
    layer_one = rows[1]
    evaluated = run_cli("eval", *common, "--include", r"model\.layers\.1\.", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    fp, quantized = json.loads(evaluated.stdout)["rows"]
    assert quantized["quantization"]["linears"] == 7  # q, k, v, o, gate, up, down of one layer
    assert layer_one["ppl"] == pytest.approx(quantized["ppl"], rel=1e-12)
    assert layer_one["delta_ppl"] == pytest.approx(quantized["ppl"] - fp["ppl"], rel=1e-9)
    assert layer_one["ppl"] != rows[0]["ppl"]


def test_projection_units_select_one_kind_in_every_layer(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    units = scan_units(model, parse_spec("w8a8"), "projection")
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name != "lm_head"]
    assert [label for label, _ in units] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for label, (pattern,) in units:
        assert [name for name in names if re.search(pattern, name)] == [f"model.layers.{i}.{label}" for i in range(2)]


def test_scan_of_a_kv_spec_is_refused_before_any_forward(tiny_llama_dir, tiny_text_file):
    completed = run_cli("analyze", "layers", "--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", "48", "--spec", "w8kv4")
    assert completed.returncode == 2
    assert completed.stderr.startswith("massquant: error:") and "KV cache" in completed.stderr and "Traceback" not in completed.stderr
