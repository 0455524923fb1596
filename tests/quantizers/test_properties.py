"""Property: whatever a user types or writes, a command ends in a result or in one error line with exit 2.

Generated spec strings, flag combinations, recipe documents and lm-eval ``model_args`` strings go through
the CLI's ``main()`` in this process on a tiny model. An exception escaping ``main`` (a traceback), an exit
2 with anything but one ``massquant: error:`` line, or a failed run that leaves a file behind, fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from massquant.cli.main import main

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

TARGETS = st.sampled_from(["w", "a", "kv", "x", ""])
FORMATS = st.sampled_from(["2", "4", "8", "9", "0", "fp8", "fp8e5m2", "mxfp4", "nvfp4", "nf4", "fp4", "int", ""])
MODIFIERS = st.sampled_from(["tensor", "channel", "token", "head", "group", "sym", "asym", "dynamic", "static", "minmax", "p99.9", "p0", "mse", "x"])
PART = st.builds(
    lambda target, fmt, group, modifiers: target + fmt + (f"g{group}" if group is not None else "") + "".join(f"-{m}" for m in modifiers),
    TARGETS, FORMATS, st.one_of(st.none(), st.integers(0, 4096)), st.lists(MODIFIERS, max_size=2),
)
SPEC = st.one_of(st.lists(PART, min_size=1, max_size=3).map("".join), st.text(max_size=12))
NUMBER = st.one_of(st.integers(-5, 2**65).map(str), st.sampled_from(["0", "-1", "1e400", "nan", "x", "", "3.5"]))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama_dir, tiny_text_file):
    return {"model": tiny_llama_dir, "text": tiny_text_file, "root": tmp_path_factory.mktemp("property")}


def run_main(args: list[str], directory: Path) -> None:
    """Run the CLI; assert the outcome is a result (exit 0) or one error line (exit 2) leaving no file."""
    before = set(directory.rglob("*"))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)  # an exception here is a traceback a user would see
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    assert code in (0, 2), (args, code, lines[-3:])
    if code == 2:
        errors = [line for line in lines if line.startswith("massquant: error: ")]
        assert errors == lines[-1:] and len(errors) == 1, (args, lines[-5:])
        assert set(directory.rglob("*")) == before, (args, "a failed run left files behind")
    else:
        for results in directory.rglob("results.json"):
            json.loads(results.read_text())  # complete, parseable


def fresh_directory(workspace) -> Path:
    return Path(tempfile.mkdtemp(dir=workspace["root"]))


def eval_args(workspace, out: Path) -> list[str]:
    return ["eval", "--model", workspace["model"], "--data", workspace["text"], "--seq-len", "16", "--max-tokens", "32", "--out", str(out / "o")]


@SETTINGS
@given(specs=st.lists(SPEC, min_size=1, max_size=3))
def test_spec_strings_end_in_a_result_or_one_line(workspace, specs):
    directory = fresh_directory(workspace)
    run_main([*eval_args(workspace, directory), "--spec", ",".join(specs), "--calib-data", workspace["text"],
              "--calib-samples", "1", "--calib-seq-len", "16"], directory)
    shutil.rmtree(directory)


FLAGS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["--bits", "--act-bits", "--kv-bits", "--group-size", "--seed", "--calib-samples",
                               "--batch-size", "--stride", "--bnb-threshold", "--massive-ratio", "--massive-threshold"]), NUMBER),
    st.tuples(st.sampled_from(["--format"]), st.sampled_from(["int", "fp8", "mxfp4", "nvfp4", "nf4", "e5m2", "bad"])),
    st.tuples(st.sampled_from(["--act-granularity", "--kv-granularity"]), st.sampled_from(["token", "tensor", "head", "group", "x"])),
    st.tuples(st.just("--massive"), st.sampled_from(["none", "keep", "suppress-zero", "suppress-mean", "clip", "x"])),
    st.tuples(st.just("--mitigation"), st.sampled_from(["none", "hadamard", "smoothquant:alpha=2", "kvbias:init=zero", "dyt", "nope", ""])),
    st.tuples(st.just("--backend"), st.sampled_from(["fake", "bnb", "gptq", "trt"])),
    st.tuples(st.sampled_from(["--include", "--exclude"]), st.sampled_from(["mlp", "(", "nothing-matches", ""])),
), max_size=4)


@SETTINGS
@given(flags=FLAGS)
def test_flag_combinations_end_in_a_result_or_one_line(workspace, flags):
    directory = fresh_directory(workspace)
    extra = [item for pair in flags for item in pair]
    # the calibration of anything calibrated stays small, unless a generated flag sets it
    calibration = ["--calib-data", workspace["text"], "--calib-seq-len", "16"] + ([] if "--calib-samples" in extra else ["--calib-samples", "1"])
    run_main([*eval_args(workspace, directory), *calibration, *extra], directory)
    shutil.rmtree(directory)


YAML_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=True), st.text(max_size=6),
              st.sampled_from(["w8", "w4g16", "kv8g64", "none", "keep", "hadamard", "auto", "fp"])),
    lambda inner: st.one_of(st.lists(inner, max_size=2), st.dictionaries(st.sampled_from(["samples", "seq_len", "data", "rows", "x"]), inner, max_size=2)),
    max_leaves=4,
)
RECIPE_KEYS = st.sampled_from([
    "name", "seq_len", "max_tokens", "stride", "bos", "batch_size", "specs", "backends", "massive", "massive_detection",
    "massive_threshold", "mitigations", "include", "exclude", "quantize_lm_head", "calibration", "seed", "table", "models", "data", "typo",
])


@SETTINGS
@given(document=st.dictionaries(RECIPE_KEYS, YAML_VALUE, max_size=3))
def test_recipe_documents_end_in_a_result_or_one_line(workspace, document):
    directory = fresh_directory(workspace)
    base = {"kind": "grid", "models": [workspace["model"]], "data": workspace["text"], "seq_len": 16, "max_tokens": 32,
            "calibration": {"data": workspace["text"], "samples": 1, "seq_len": 16}}
    recipe = workspace["root"] / f"{directory.name}.yaml"
    recipe.write_text(yaml.safe_dump({**base, **document}))
    run_main(["run", str(recipe), "--out", str(directory / "run")], directory)
    shutil.rmtree(directory)


MODEL_ARG = st.one_of(
    st.tuples(st.sampled_from(["spec", "massive", "mitigation", "bos", "backend", "dtype", "attn_implementation", "typo"]),
              st.one_of(SPEC, st.sampled_from(["keep", "hadamard", "smoothquant:alpha=0.5;projections=qkv", "never", "bnb", "float64", "eager"]))),
    st.tuples(st.sampled_from(["calib_samples", "calib_seq_len", "seed", "bnb_threshold", "massive_ratio", "max_length", "batch_size"]), NUMBER),
)


@SETTINGS
@given(pairs=st.lists(MODEL_ARG, max_size=3))
def test_model_args_end_in_a_model_or_one_line(workspace, pairs):
    """model_args as lm-eval hands them over: refused in one line before lm-eval starts, or a model that builds."""
    from lm_eval.utils import simple_parse_args_string

    from massquant.errors import UserError
    from massquant.lmeval.model import MassquantLM, check_model_args

    text = ",".join([f"pretrained={workspace['model']}", "calib_data=" + workspace["text"], "calib_seq_len=16"]
                    + [f"{key}={value}".replace(",", "") for key, value in pairs])
    try:
        arguments = simple_parse_args_string(text)
    except ValueError:
        return  # lm-eval's own parser refuses it before massquant sees it
    try:
        check_model_args(arguments)
    except UserError as error:
        assert "\n" not in str(error)
        return
    MassquantLM(**arguments).restore()  # accepted: it must build
