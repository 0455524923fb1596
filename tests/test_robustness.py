"""Robustness sweep: bad input through the CLI, as a user types it, in a subprocess.

Every case must end with one clear line on stderr, exit status 2, no
traceback, and no result file left behind. Then: NaN is located, not averaged;
the same seed gives the same numbers; Ctrl-C keeps finished results.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_llama, run_cli


@dataclass
class BadInput:
    name: str
    args: list[str]
    expect: str  # a phrase the one-line message must contain
    files: dict[str, str | bytes] = field(default_factory=dict)  # created in the case's directory first


TINY = "{tiny}"  # replaced by the tiny LLaMA directory
TEXT = "{text}"  # replaced by a short real text file
EVAL = ["eval", "--model", TINY, "--data", TEXT, "--seq-len", "32", "--max-tokens", "128"]

CASES = [
    BadInput("unknown hub id", ["eval", "--model", "no-such-org/no-such-model", "--max-tokens", "64"], "cannot load model"),
    BadInput("missing path", ["eval", "--model", "./missing/model.gguf"], "not found"),
    BadInput("corrupt gguf", ["eval", "--model", "broken.gguf"], "cannot load model", {"broken.gguf": b"GGUF\x00garbage" * 10}),
    BadInput("bad spec", [*EVAL, "--spec", "w4x"], "cannot parse spec"),
    BadInput("spec sets weights twice", [*EVAL, "--spec", "w4w8"], "twice"),
    BadInput("bits out of range", [*EVAL, "--bits", "9"], "bits"),
    BadInput("bits zero", [*EVAL, "--spec", "w1"], "bits"),
    BadInput("fp8 with a bit width", [*EVAL, "--format", "fp8", "--bits", "4"], "8-bit only"),
    BadInput("asymmetric fp8", [*EVAL, "--spec", "wfp8-asym"], "asymmetric"),
    BadInput("static weights", [*EVAL, "--spec", "w8-static"], "weights are always quantized once"),
    BadInput("percentile out of range", [*EVAL, "--spec", "a8-p150"], "percentile"),
    BadInput("group size not dividing (torchao)", [*EVAL, "--spec", "w4g48", "--backend", "torchao"], "group size"),
    BadInput("unknown backend", [*EVAL, "--spec", "w8", "--backend", "tensorrt"], "unknown backend"),
    BadInput("unknown massive policy", [*EVAL, "--spec", "w8a8", "--massive", "shrink"], "unknown massive policy"),
    BadInput("bad massive ratio", [*EVAL, "--spec", "w8a8", "--massive", "keep", "--massive-ratio", "0.5"], "median_ratio"),
    BadInput("unknown mitigation", [*EVAL, "--mitigation", "quarot"], "unknown mitigation"),
    BadInput("mitigation parameter typo", [*EVAL, "--mitigation", "smoothquant:alfa=0.5"], "did you mean 'alpha'"),
    BadInput("mitigation parameter type", [*EVAL, "--mitigation", "smoothquant:alpha=high"], "expects a number"),
    BadInput("training-time mitigation in eval", [*EVAL, "--mitigation", "dyt"], "massquant train"),
    BadInput("unsupported architecture", [*EVAL, "--attn", "eager", "--spec", "kv8"], "not supported"),
    BadInput("empty text", ["eval", "--model", TINY, "--data", "empty.txt"], "empty", {"empty.txt": ""}),
    BadInput("too-short text", ["eval", "--model", TINY, "--data", "short.txt", "--seq-len", "64"], "fewer than one window", {"short.txt": "Too short."}),
    BadInput("unknown corpus", ["eval", "--model", TINY, "--data", "wikitext-9"], "wikitext-9"),
    BadInput("seq-len above the model maximum", ["eval", "--model", TINY, "--data", TEXT, "--seq-len", "100000"], "exceeds the model's maximum"),
    BadInput("seq-len negative", [*EVAL[:-4], "--seq-len", "-5"], "positive integer"),
    BadInput("stride longer than the window", [*EVAL, "--stride", "500"], "stride"),
    BadInput("output dir not writable", [*EVAL, "--out", "/proc/massquant-results"], "not writable"),
    BadInput("output path is a file", [*EVAL, "--out", "taken"], "not writable", {"taken": "a file"}),
    BadInput("NaN in weights", ["eval", "--model", "{nan_model}", "--data", TEXT], "NaN or inf"),
    BadInput("unknown flag", [*EVAL, "--frobnicate"], "unrecognized arguments"),
    BadInput("unknown table format", [*EVAL, "--table-format", "excel"], "invalid choice"),
    BadInput("missing calibration text", [*EVAL, "--spec", "a8-static", "--calib-data", "nowhere.txt"], "nowhere.txt"),
    BadInput("unknown command", ["quantise"], "invalid choice"),
]


@pytest.fixture(scope="module")
def sweep_models(tmp_path_factory, tiny_llama_dir):
    """The tiny LLaMA, one with a NaN weight, and one of an architecture massquant has no entry for."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig, BloomForCausalLM

    nan_dir = tmp_path_factory.mktemp("nan-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    model.save_pretrained(nan_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(nan_dir)

    bloom_dir = tmp_path_factory.mktemp("bloom")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4)).save_pretrained(bloom_dir)
    tokenizer.save_pretrained(bloom_dir)
    return {"tiny": tiny_llama_dir, "nan_model": str(nan_dir), "bloom": str(bloom_dir)}


def _substitute(args, values):
    return [arg.format(**values) if "{" in arg else arg for arg in args]


def assert_one_clean_line(result, expect: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("massquant: error: "), lines
    assert expect.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2(case, sweep_models, tiny_text_file, tmp_path, monkeypatch):
    for name, content in case.files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    values = {**sweep_models, "text": tiny_text_file}
    if case.name == "unsupported architecture":
        values["tiny"] = sweep_models["bloom"]
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.rglob("*"))
    result = run_cli(*_substitute(case.args, values))
    assert_one_clean_line(result, case.expect)
    assert set(tmp_path.rglob("*")) - before <= {tmp_path / "results"} | {p for p in tmp_path.rglob("*") if p.is_dir()}, (
        "a partial file was left behind"
    )


def test_sweep_covers_at_least_25_kinds():
    assert len({case.name for case in CASES}) >= 25


def test_non_finite_forward_is_located_not_averaged(tiny_llama_dir, tiny_text_file):
    from massquant.data.text import load_text
    from massquant.evaluation.perplexity import PerplexityConfig, build_windows, perplexity
    from massquant.models.loading import load_model

    loaded = load_model(model=tiny_llama_dir)
    windows = build_windows(loaded.tokenizer, load_text(tiny_text_file), PerplexityConfig(seq_len=32, max_tokens=128), 256)
    healthy = perplexity(loaded.model, windows)
    assert math.isfinite(healthy.ppl) and healthy.first_non_finite is None
    with torch.no_grad():  # an overflow inside one layer, as a broken low-precision kernel would produce
        loaded.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    broken = perplexity(loaded.model, windows)
    assert math.isnan(broken.ppl)
    assert broken.non_finite_windows == broken.windows
    assert broken.first_non_finite == "model.layers.1.mlp.down_proj"


def _eval_numbers(out_dir: Path, model_dir: str, text: str) -> list[tuple]:
    result = run_cli(
        "eval", "--model", model_dir, "--data", text, "--seq-len", "32", "--max-tokens", "256",
        "--spec", "w4g32a8-static,w8a8kv4", "--calib-samples", "2", "--calib-seq-len", "32", "--calib-data", text,
        "--seed", "7", "--out", out_dir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((out_dir / "results.json").read_text())["rows"]
    return [(row["config"], row["ppl"], row["mean_nll"]) for row in rows]


def test_same_seed_gives_identical_numbers(tiny_llama_dir, tiny_text_file, tmp_path):
    first = _eval_numbers(tmp_path / "a", tiny_llama_dir, tiny_text_file)
    second = _eval_numbers(tmp_path / "b", tiny_llama_dir, tiny_text_file)
    assert len(first) == 3 and first == second


def test_ctrl_c_keeps_finished_rows_valid(tmp_path, tiny_text_file):
    """SIGINT after the first rows: the JSON on disk is complete and valid, exit status 130."""
    model_dir = make_tiny_llama(tmp_path / "model", layers=4, hidden=128)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "massquant", "eval", "--model", str(model_dir), "--data", tiny_text_file,
         "--seq-len", "64", "--spec", ",".join(["w8", "w6", "w4", "w3", "w2"] * 8), "--out", str(out)],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    results = out / "results.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if results.exists() and len(json.loads(results.read_text())["rows"]) >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    rows = json.loads(results.read_text())["rows"]
    assert len(rows) >= 2 and all(math.isfinite(row["ppl"]) for row in rows)
    assert not list(out.glob("*.tmp*")), "a temporary file was left behind"
