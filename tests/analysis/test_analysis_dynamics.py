"""Emergence dynamics: the trajectory fit, statistics recorded by massquant train, and over checkpoint directories."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from massquant.analysis.dynamics import PARAMETERS, checkpoint_step, emergence_form, fit_trajectory
from massquant.cli.main import main
from massquant.massive.locate import locate
from massquant.massive.observers import attention_sink_share
from massquant.massive.report import LocateConfig

TRUE = {"A": 400.0, "lambda": 3e-4, "gamma": 0.02, "t0": 150.0, "K": 5.0}


def test_form_by_hand_at_three_steps():
    for t, expected in ((100.0, 5.0), (150.0, 5.0), (1150.0, 400 * math.exp(-3e-4 * 1150) * math.log(1 + 0.02 * 1000) + 5)):
        assert emergence_form(t, *TRUE.values()) == pytest.approx(expected, rel=1e-12)


def test_fit_recovers_the_parameters_of_a_synthetic_trajectory():
    steps = np.linspace(0, 10000, 60)
    clean = emergence_form(steps, *TRUE.values())
    noise = np.random.default_rng(0).normal(0, 0.5, size=steps.shape)  # 0.5 on values up to ~800
    fit = fit_trajectory(steps, clean + noise)
    assert list(fit["parameters"]) == list(PARAMETERS)
    for name, value in TRUE.items():
        assert fit["parameters"][name] == pytest.approx(value, rel=0.05), name
        assert abs(fit["parameters"][name] - value) < 4 * fit["errors"][name] + 1e-9, name
    assert fit["r2"] > 0.9999
    exact = fit_trajectory(steps, clean)
    for name, value in TRUE.items():
        assert exact["parameters"][name] == pytest.approx(value, rel=1e-4), name


def test_fit_needs_five_points():
    with pytest.raises(ValueError, match="at least as many points"):
        fit_trajectory([0, 1, 2, 3], [1, 2, 3, 4])


def test_checkpoint_step_from_directory_names():
    assert [checkpoint_step(p, i) for i, p in enumerate(["run/checkpoint-50", "pythia/step1000", "run/checkpoint"])] == [50, 1000, 2]


def _locate_expectation(model, ids):
    report = locate(model, ids, LocateConfig(), progress=False)
    share = attention_sink_share(model, ids, progress=False)
    return [(stats.top_means[0], stats.median, stats.kurtosis, stats.first_token_norm, float(np.mean(share[i])))
            for i, stats in enumerate(report.layers)]


def test_train_records_dynamics_every_n_steps_and_checkpoints_analyze_the_same(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    from massquant.models.loading import load_model

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"kind: train\nmodel: {tiny_llama_dir}\n"
        f"train: {{data: {tiny_text_file}, seq_len: 32, batch_size: 2, steps: 6, lr: 3.0e-3, warmup_steps: 1, "
        f"record_every: 2, record_sequences: 2, save_every: 2}}\n"
        f"eval: {{data: {tiny_text_file}, seq_len: 32, max_tokens: 96, locate: false}}\n"
    )
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    dynamics = results["dynamics"]
    assert [record["step"] for record in dynamics["records"]] == [0, 2, 4, 6]
    assert dynamics["steps"] == [0, 2, 4, 6] and "error" in dynamics["fit"]  # four points: too few for five parameters
    assert (tmp_path / "run" / "dynamics.png").stat().st_size > 0 and "max top-1 |a|" in printed
    # the last record (step 6) is the final checkpoint's statistics on the first two evaluation windows
    final = load_model(model=str(tmp_path / "run" / "checkpoint"))
    from massquant.evaluation.perplexity import PerplexityConfig, build_windows

    windows = build_windows(final.tokenizer, open(tiny_text_file).read(), PerplexityConfig(data=tiny_text_file, seq_len=32, max_tokens=96), 256)
    expected = _locate_expectation(final.model, windows.input_ids[:2])
    for row, (top1, median, kurtosis, norm, attention) in zip(dynamics["records"][-1]["layers"], expected):
        assert row["top1"] == pytest.approx(top1, rel=1e-4)
        assert row["median"] == pytest.approx(median, rel=1e-4)
        assert row["kurtosis"] == pytest.approx(kurtosis, rel=1e-3)
        assert row["first_token_norm"] == pytest.approx(norm, rel=1e-4)
        assert row["first_token_attention"] == pytest.approx(attention, rel=1e-4)

    checkpoints = [str(tmp_path / "run" / f"checkpoint-{step}") for step in (2, 4)]
    out = tmp_path / "dyn"
    assert main(["analyze", "dynamics", *checkpoints, "--data", tiny_text_file, "--n-seqs", "2", "--seq-len", "24", "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert [record["step"] for record in payload["records"]] == [2, 4]
    from massquant.data.calibration import calibration_batch

    for checkpoint, record in zip(checkpoints, payload["records"]):
        loaded = load_model(model=checkpoint)
        ids = calibration_batch(loaded.tokenizer, tiny_text_file, 2, 24, 0, bos=True)  # the command's sampled sequences
        expected = _locate_expectation(loaded.model, ids)
        assert [row["top1"] for row in record["layers"]] == pytest.approx([e[0] for e in expected], rel=1e-5)
        assert [row["first_token_attention"] for row in record["layers"]] == pytest.approx([e[4] for e in expected], rel=1e-5)
    assert payload["top1"] == [max(row["top1"] for row in record["layers"]) for record in payload["records"]]
    assert (out / "dynamics.png").stat().st_size > 0


def test_analyze_dynamics_refuses_missing_and_unordered_checkpoints(tmp_path, capsys):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-2").mkdir()
    assert main(["analyze", "dynamics", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["analyze", "dynamics", str(tmp_path / "checkpoint-4"), str(tmp_path / "checkpoint-2")]) == 2
    assert "training order" in capsys.readouterr().err
