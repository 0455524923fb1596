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
    BadInput("unknown backend", [*EVAL, "--spec", "w8", "--backend", "tensorrt"], "--backend: unknown value 'tensorrt'; accepted: fake, bnb"),
    BadInput("unknown massive policy", [*EVAL, "--spec", "w8a8", "--massive", "shrink"], "--massive: unknown value 'shrink'; accepted: none, keep"),
    BadInput("bad massive ratio", [*EVAL, "--spec", "w8a8", "--massive", "keep", "--massive-ratio", "0.5"], "--massive-ratio: expected a number >= 1; got 0.5"),
    BadInput("unknown mitigation", [*EVAL, "--mitigation", "quarot"], "unknown mitigation"),
    BadInput("mitigation parameter typo", [*EVAL, "--mitigation", "smoothquant:alfa=0.5"], "did you mean 'alpha'"),
    BadInput("mitigation parameter type", [*EVAL, "--mitigation", "smoothquant:alpha=high"], "expects a number"),
    BadInput("training-time mitigation in eval", [*EVAL, "--mitigation", "dyt"], "massquant train"),
    BadInput("unsupported architecture", [*EVAL, "--attn-implementation", "eager", "--spec", "kv8"], "not supported"),
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
    """The tiny LLaMA, one with a NaN weight, one of an architecture massquant has no entry for, and a tiny
    Gemma 3 (gemma3_text) whole and with its weights file destroyed (what is refused before loading still is)."""
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
    gemma_dir, broken_dir = make_tiny_gemma3(tmp_path_factory)
    broken_llama = tmp_path_factory.mktemp("broken-llama")
    for file in Path(tiny_llama_dir).iterdir():
        (broken_llama / file.name).write_bytes(b"garbage" if file.suffix == ".safetensors" else file.read_bytes())
    return {
        "tiny": tiny_llama_dir, "nan_model": str(nan_dir), "bloom": str(bloom_dir), "gemma": gemma_dir,
        "gemma_broken": broken_dir, "broken_llama": str(broken_llama),
    }


def make_tiny_gemma3(tmp_path_factory) -> tuple[str, str]:
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_llama(tmp_path_factory.mktemp("tokenizer")))
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    )
    gemma_dir, broken_dir = tmp_path_factory.mktemp("gemma3"), tmp_path_factory.mktemp("gemma3-broken")
    Gemma3ForCausalLM(config).save_pretrained(gemma_dir)
    tokenizer.save_pretrained(gemma_dir)
    for file in gemma_dir.iterdir():
        (broken_dir / file.name).write_bytes(b"garbage" if file.suffix == ".safetensors" else file.read_bytes())
    return str(gemma_dir), str(broken_dir)


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


# Kinds run in this process through the CLI's main() (the same one-line path as a subprocess, far cheaper):
# checks that must come before any computation, content the user can create, numbers that overflow.
LM_EVAL = ["lm-eval", "--model", "massquant", "--tasks", "massquant_arc_easy", "--limit", "1", "--model_args"]
GRID = "kind: grid\nmodel: ['{tiny}']\ndata: '{text}'\nseq_len: 32\nmax_tokens: 64\n"
TRAIN = "model: '{tiny}'\nout: trained\ntrain: {{data: '{text}', seq_len: 16, batch_size: 1, steps: 1}}\neval: null\n"
IN_PROCESS_CASES = [
    # checked against the model's shapes and architecture before its weights load (the weights file is garbage)
    BadInput("group wider than every layer", ["eval", "--model", "{broken_llama}", "--data", TEXT, "--spec", "w8g1024", "--out", "o"], "w8g1024"),
    BadInput("KV group wider than head_dim", ["eval", "--model", "{broken_llama}", "--data", TEXT, "--spec", "kv8g64", "--out", "o"], "kv8g64"),
    BadInput("mx block not dividing the width", ["eval", "--model", "{broken_llama}", "--data", TEXT, "--spec", "wmxfp4g48"], "mxfp4"),
    BadInput("mitigation for another architecture", ["eval", "--model", "{gemma_broken}", "--data", TEXT, "--mitigation", "hadamard"], "hadamard"),
    BadInput("recipe spec no layer can take", ["run", "r.yaml", "--out", "o"], "w4g128", {"r.yaml": GRID + "spec: [w4]\n"}),
    BadInput("errors: group wider than every layer", ["errors", "--model", "{broken_llama}", "--data", TEXT, "--spec", "w8g1024"], "w8g1024"),
    BadInput("errors: static activations", ["errors", "--model", TINY, "--data", TEXT, "--spec", "w8a8-static"], "static"),
    BadInput("locate: layer out of range", ["locate", "--model", "{broken_llama}", "--data", TEXT, "--layer", "7"], "does not exist"),
    BadInput("locate: unsupported architecture", ["locate", "--model", "{bloom}", "--data", TEXT, "--seq-len", "16"], "not supported"),
    BadInput("intervene: unsupported architecture", ["intervene", "--model", "{bloom}", "--data", TEXT, "--seq-len", "16"], "not supported"),
    BadInput("train: eval spec no layer can take", ["train", "t.yaml"], "w8g1024", {"t.yaml": TRAIN.replace("eval: null", "eval: {{spec: [w8g1024]}}")}),
    BadInput("train: mitigation for another architecture", ["train", "t.yaml"], "tvr", {"t.yaml": TRAIN.replace("{tiny}", "{bloom}") + "mitigation: tvr\n"}),
    BadInput("lm-eval: spec no layer can take", [*LM_EVAL, "pretrained={broken_llama},spec=w8g1024"], "w8g1024"),
    # lm-eval model_args held to eval's standard, before lm-eval starts
    BadInput("lm-eval: negative calibration samples", [*LM_EVAL, "pretrained={tiny},calib_samples=-1,spec=w8a8-static"], "calib_samples"),
    BadInput("lm-eval: unknown dtype", [*LM_EVAL, "pretrained={tiny},dtype=float64"], "dtype: unknown value 'float64'"),
    BadInput("lm-eval: seed out of range", [*LM_EVAL, "pretrained={tiny},seed=-5"], "seed"),
    BadInput("lm-eval: negative max_length", [*LM_EVAL, "pretrained={tiny},max_length=-1"], "max_length"),
    # recipes as files a user can write
    BadInput("recipe with no models", ["run", "r.yaml"], "'model' is empty", {"r.yaml": "kind: grid\nmodel: []\n"}),
    BadInput("recipe not UTF-8", ["run", "r.yaml"], "not UTF-8", {"r.yaml": b"kind: grid\nname: \xff\xfe\n"}),
    BadInput("recipe not YAML", ["run", "r.yaml"], "not valid YAML", {"r.yaml": "kind: grid\nspec: [w8\n"}),
    BadInput("recipe seq_len a float", ["run", "r.yaml"], "seq_len", {"r.yaml": "kind: grid\nseq_len: 5.5\n"}),
    BadInput("recipe batch size a string", ["run", "r.yaml"], "batch_size", {"r.yaml": "kind: grid\nbatch_size: 1e3\n"}),
    BadInput("recipe negative seed", ["run", "r.yaml"], "seed", {"r.yaml": GRID + "seed: -1\n"}),
    BadInput("recipe zero calibration samples", ["run", "r.yaml"], "calib_samples", {"r.yaml": GRID + "calib_samples: 0\n"}),
    BadInput("recipe model dtype", ["run", "r.yaml"], "model: dtype: unknown value 'float64'", {"r.yaml": GRID.replace("['{tiny}']", "[{{model: '{tiny}', dtype: float64}}]")}),
    BadInput("train recipe not UTF-8", ["train", "t.yaml"], "not UTF-8", {"t.yaml": b"model: \xff\n"}),
    BadInput("train recipe negative size", ["train", "t.yaml"], "does not make a model", {"t.yaml": TRAIN + "from_scratch: {{hidden_size: -8}}\n"}),
    BadInput("train recipe zero steps", ["train", "t.yaml"], "train: steps: expected a positive integer", {"t.yaml": TRAIN.replace("steps: 1", "steps: 0")}),
    BadInput("train recipe huge calibration", ["train", "t.yaml"], "calib_samples", {"t.yaml": TRAIN + "calib_samples: 100000000\n"}),
    # saved results of another shape
    BadInput("compare: foreign JSON", ["compare", "x.json"], "not a result file", {"x.json": b'{"command": "run", "rows": {"a": 1}}'}),
    BadInput("compare: truncated JSON", ["compare", "x.json"], "cannot read results", {"x.json": b'{"command": "eval", "rows": [{"con'}),
    BadInput("compare: non-plain row key", ["compare", "x.json"], "plain value", {"x.json": b'{"command": "run", "rows": [{"spec": [1], "ppl": 2}]}'}),
    BadInput("compare: task scores of another shape", ["compare", "x.json"], "tasks", {"x.json": b'{"command": "eval", "rows": [{"tasks": {"t": 1}}]}'}),
    # numbers a user can type
    BadInput("seed overflowing", [*EVAL, "--seed", str(2**64)], "seed"),
    BadInput("calibration samples overflowing", [*EVAL, "--spec", "a8-static", "--calib-samples", str(10**12)], "at most"),
    BadInput("negative bnb threshold", [*EVAL, "--spec", "w8", "--bnb-threshold", "-1"], "--bnb-threshold: expected a number >= 0"),
    BadInput("zero group size", [*EVAL, "--bits", "4", "--group-size", "0"], "positive integer"),
]


@pytest.mark.parametrize("case", IN_PROCESS_CASES, ids=[c.name for c in IN_PROCESS_CASES])
def test_bad_input_in_process_is_one_line_exit_2(case, sweep_models, tiny_text_file, tmp_path, monkeypatch, capsys):
    from massquant.cli.main import main

    values = {**sweep_models, "text": tiny_text_file}
    for name, content in case.files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content.format(**values))
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.rglob("*"))
    code = main(_substitute(case.args, values))
    captured = capsys.readouterr()
    assert_one_clean_line(subprocess.CompletedProcess(case.args, code, captured.out, captured.err), case.expect)
    assert set(tmp_path.rglob("*")) == before, f"left behind: {set(tmp_path.rglob('*')) - before}"


def test_sweep_covers_at_least_60_kinds():
    assert len({case.name for case in CASES + IN_PROCESS_CASES}) >= 60


def test_a_full_disk_keeps_the_previous_results_and_every_number(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch, capsys):
    """ENOSPC while rewriting results.json: the previous file is intact, no temporary file is left, the rows
    are still printed, and the command ends with one line and exit 2."""
    import errno

    from massquant.cli.main import main
    from massquant.reporting import results

    out = tmp_path / "out"
    args = ["eval", "--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", "32", "--max-tokens", "64", "--out", str(out)]
    assert main(args) == 0
    previous = (out / "results.json").read_bytes()
    capsys.readouterr()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results.os, "fsync", full_disk)
    assert main([*args, "--spec", "w8"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("massquant: error: ")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in captured.err
    assert "| w8 " in captured.out  # the measured row is not lost
    assert (out / "results.json").read_bytes() == previous
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
