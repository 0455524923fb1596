"""The CLI as a user meets it: help, JSON output, one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


def assert_one_line_error(completed, fragment):
    assert completed.returncode == 2, completed.stderr
    lines = [line for line in completed.stderr.splitlines() if line.startswith("massquant: error:")]
    assert len(lines) == 1 and fragment in lines[0], completed.stderr
    assert "Traceback" not in completed.stderr


def test_help_lists_commands_and_flags():
    top = run_cli("--help")
    assert top.returncode == 0 and "eval" in top.stdout
    sub = run_cli("eval", "--help")
    for flag in ("--model", "--data", "--seq-len", "--max-tokens", "--bos", "--dtype", "--device", "--seed", "--out", "--json"):
        assert flag in sub.stdout


def test_json_output_on_a_local_model(tiny_llama_dir, tiny_text_file, tmp_path):
    completed = run_cli("eval", "--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", 32, "--json", "--out", tmp_path)
    assert completed.returncode == 0, completed.stderr
    printed = json.loads(completed.stdout)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert printed == saved
    (row,) = printed["rows"]
    assert row["config"] == "fp" and row["ppl"] > 1 and row["delta_ppl"] == 0
    assert "outliers" not in row  # located only when mitigations are compared
    assert printed["environment"]["versions"]["torch"].startswith("2.13.0")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["--seq-len", "0"], "positive integer"),
        (["--seq-len", "-5"], "positive integer"),
        (["--data", "/nonexistent/text.txt"], "unknown text"),
        (["--bos", "maybe"], "argument --bos: unknown value 'maybe'; accepted: auto, always, never"),
        (["--model", "no-such-org/no-such-model"], "cannot load model"),
        (["--out", "/proc/forbidden"], "not writable"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_llama_dir, tiny_text_file, arguments, fragment):
    base = ["eval", "--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", "32"]
    assert_one_line_error(run_cli(*base, *arguments), fragment)


def test_empty_text_file(tiny_llama_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(run_cli("eval", "--model", tiny_llama_dir, "--data", empty), "is empty")
