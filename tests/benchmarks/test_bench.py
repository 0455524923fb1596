"""The benchmark: its model-bytes count, and a quick end-to-end run on the embedded model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from massquant.benchmarks.bench import model_bytes

FIGURE_KEYS = {"1", "2", "3a", "3b", "4a", "4b", "5", "6a", "6b", "6c", "7a", "7b", "8", "9"}


def test_model_bytes_of_a_linear_before_and_after_bitsandbytes_int8():
    bnb = pytest.importorskip("bitsandbytes")
    linear = nn.Linear(64, 32)
    # fp32 weight 32*64*4 + fp32 bias 32*4
    assert model_bytes(linear) == 8192 + 128

    quantized = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0)
    quantized.load_state_dict(linear.state_dict())
    quantized = quantized.to("cpu").eval()  # the move to a device is what quantizes
    assert quantized.weight.dtype == torch.int8
    # int8 weight 32*64 + fp32 row scales (SCB) 32*4 + fp32 bias 32*4
    expected = 2048 + 128 + 128
    assert model_bytes(quantized) == expected
    quantized(torch.randn(2, 64))  # the first forward moves the scales onto the module's state
    assert model_bytes(quantized) == expected


@pytest.mark.slow
def test_quick_benchmark_reports_every_figure_against_its_goal(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "massquant.benchmarks", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=1500,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    payload = json.loads((tmp_path / "bench.json").read_text())
    figures = {figure["key"]: figure for figure in payload["figures"]}
    assert set(figures) == FIGURE_KEYS
    for key, figure in figures.items():
        assert {"goal", "goal_direction", "goal_applies", "holds"} <= set(figure), key
        if figure["value"] is None:
            assert isinstance(figure["unavailable"], str) and figure["unavailable"], key
            continue
        assert isinstance(figure["value"], float) and math.isfinite(figure["value"]), key
        if figure["goal"] is not None and figure["goal_applies"]:
            expected = figure["value"] <= figure["goal"] if figure["goal_direction"] == "<=" else figure["value"] >= figure["goal"]
            assert figure["holds"] is expected, key
    assert len(figures["1"]["details"]["fp32_seconds"]) == 2  # --quick: two repeats
    assert figures["3b"]["details"]["windows_match"] is True
    for key in FIGURE_KEYS:  # the table went to stdout
        assert f"| {key}. " in completed.stdout, key
