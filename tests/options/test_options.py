"""Options are declared once: the flags, recipe keys and lm-eval model_args come from the same declarations
and build the same objects."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from massquant import options
from massquant.cli.main import build_parser
from massquant.errors import UserError
from massquant.lmeval.model import HFLM_ARGS, accepted_keys, check_option_values, model_options, variant_from_options
from massquant.options import settings
from massquant.options.registry import GROUPS, OPTIONS, Option
from massquant.recipes.schema import GRID_GROUPS, GRID_SKIP, recipe_from_mapping

CLI_ONLY = {"out", "json", "table_format", "help"}
LMEVAL_NAMES = {"pretrained": "model", "device": "device", "add_bos_token": "bos"}  # lm-eval's spelling -> ours


def flags_of(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {action.dest for action in sub._actions} - CLI_ONLY - {"run"}


def recipe_keys() -> set[str]:
    return {key for key in options.keys(*GRID_GROUPS) if key not in GRID_SKIP}


def test_eval_flags_recipe_keys_and_model_args_are_one_vocabulary():
    assert flags_of("eval") == recipe_keys()
    model_args = {LMEVAL_NAMES.get(key, key) for key in accepted_keys()} - set(HFLM_ARGS)
    # lm-eval scores one variant of one model: no tasks, texts or windows in model_args (lm-eval owns those)
    assert model_args == recipe_keys() - set(options.keys("tasks")) - (set(options.keys("text")) - {"bos"})
    # batch_size means "per forward pass" in both: windows for massquant eval, requests for lm-eval
    assert set(HFLM_ARGS) & set(OPTIONS) == {"batch_size"}


def test_every_option_is_declared_once_with_a_default_its_own_parser_accepts():
    seen = [option.key for group in GROUPS.values() for option in group.options]
    assert len(seen) == len(set(seen)) == len(OPTIONS)
    for option in OPTIONS.values():
        assert option.help and option.type in (bool, int, float, str)
        if option.default is not None:
            assert option.parse(option.default, option.key) == option.default, option.key


@pytest.fixture
def declared_in_a_test():
    """An option added from outside the declarations module (as a plugin would), removed afterwards."""
    groups, registered = dict(GROUPS), dict(OPTIONS)
    options.extend("calibration", Option("calib_stride", int, 0, "tokens between calibration sequences", low=0, high=64))
    yield
    GROUPS.clear(), GROUPS.update(groups), OPTIONS.clear(), OPTIONS.update(registered)


def test_an_option_declared_in_one_place_reaches_all_three_surfaces(declared_in_a_test):
    args = build_parser().parse_args(["eval", "--calib-stride", "7"])
    assert args.calib_stride == 7
    assert recipe_from_mapping({"kind": "grid", "calib_stride": 7}, "r").values.calib_stride == 7
    assert model_options({"calib_stride": "7"}).calib_stride == 7
    for surface in (lambda: build_parser().parse_args(["eval", "--calib-stride", "65"]),
                    lambda: recipe_from_mapping({"kind": "grid", "calib_stride": 65}, "r"),
                    lambda: model_options({"calib_stride": 65})):
        with pytest.raises(UserError, match="calib.stride.*expected an integer from 0 to 64; got 65"):
            surface()


def test_the_same_values_build_the_same_objects_on_every_surface():
    args = build_parser().parse_args([
        "eval", "--spec", "w8a8", "--act-granularity", "tensor", "--massive", "keep", "--massive-threshold", "50",
        "--mitigation", "smoothquant:alpha=0.8", "--calib-samples", "4", "--dtype", "bfloat16",
    ])
    recipe = recipe_from_mapping({
        "kind": "grid", "spec": "w8a8", "act_granularity": "tensor", "massive": ["keep"], "massive_threshold": 50,
        "mitigation": ["smoothquant:alpha=0.8"], "calib_samples": 4, "dtype": "bfloat16",
    }, "r").values
    lm = model_options({
        "pretrained": "smollm2-135m", "spec": "w8a8", "act_granularity": "tensor", "massive": "keep", "massive_threshold": 50,
        "mitigation": "smoothquant:alpha=0.8", "calib_samples": 4, "dtype": "bfloat16", "device": "cpu",
    })
    quantized = [v for v in settings.variants(args) if v.spec is not None]
    assert quantized == [v for v in settings.variants(recipe) if v.spec is not None] == [variant_from_options(lm)]
    assert quantized[0].spec.name == "w8a8-tensor" and quantized[0].massive.criteria.abs_threshold == 50.0
    assert settings.calibration(args) == settings.calibration(recipe) == settings.calibration(lm)
    assert settings.model_config(args, "m") == settings.model_config(recipe, "m") == check_option_values(SimpleNamespace(**{**vars(lm), "pretrained": "m"}))


@pytest.mark.parametrize("option, value, expected", [
    (OPTIONS["calib_samples"], "4", 4),
    (OPTIONS["calib_samples"], 4.0, 4),  # YAML 4.0
    (OPTIONS["massive_threshold"], 50, 50.0),
    (OPTIONS["quantize_lm_head"], "yes", True),
    (OPTIONS["spec"], ["w8a8, w4", "kv8"], ["w8a8", "w4", "kv8"]),
    (OPTIONS["mitigation"], "hadamard,smoothquant:alpha=0.8", ["hadamard,smoothquant:alpha=0.8"]),  # its own comma syntax
    (OPTIONS["spec"], 8, ["8"]),  # lm-eval types model_args loosely
    (OPTIONS["seq_len"], None, None),
])
def test_values_are_typed_by_their_declaration(option, value, expected):
    assert option.parse(value, "where") == expected


@pytest.mark.parametrize("option, value, message", [
    (OPTIONS["calib_samples"], "0", "where: expected a positive integer (at most 1000000); got 0"),
    (OPTIONS["calib_samples"], "four", "where: expected a positive integer (at most 1000000); got 'four'"),
    (OPTIONS["calib_samples"], True, "expected a positive integer"),
    (OPTIONS["dtype"], "fp16", "where: unknown value 'fp16'; accepted: float32, bfloat16, float16"),
    (OPTIONS["massive"], "keep,kepp", "unknown value 'kepp'; accepted: none, keep"),
    (OPTIONS["massive_threshold"], "inf", "expected a finite number"),
    (OPTIONS["quantize_lm_head"], "maybe", "expected true/false"),
])
def test_bad_values_name_where_and_what_is_accepted(option, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        option.parse(value, "where")
