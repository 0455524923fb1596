"""The validation pass (grids keep their runnable rows) and content-addressed recipe cells."""

from __future__ import annotations

import json
import os

import pytest

from massquant.cli.main import main


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_grid_marks_what_cannot_run_and_runs_the_rest(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    code, out, err = _run(
        capsys, "eval", "--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", "32", "--max-tokens", "64",
        "--spec", "w8g1024,w8,kv8g64", "--out", tmp_path,
    )
    assert code == 0, err
    rows = {row["config"]: row for row in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["w8"]["ppl"] > 0 and "not_applicable" not in rows["w8"]
    assert "ppl" not in rows["w8g1024"] and "group size 1024" in rows["w8g1024"]["not_applicable"]
    assert "(64 inputs)" in rows["w8g1024"]["not_applicable"]
    assert "2 heads of 16 channels" in rows["kv8g64"]["not_applicable"]
    assert "not applicable: spec 'kv8g64'" in out


def test_a_mitigation_for_another_architecture_is_a_row_not_an_abort(tmp_path_factory, tiny_text_file, tmp_path, capsys):
    from tests.integration.test_robustness import make_tiny_gemma3

    gemma, _ = make_tiny_gemma3(tmp_path_factory)
    code, _, err = _run(
        capsys, "eval", "--model", gemma, "--data", tiny_text_file, "--seq-len", "32", "--max-tokens", "64",
        "--spec", "w8", "--mitigation", "none,hadamard", "--out", tmp_path,
    )
    assert code == 0, err
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    measured = [row["config"] for row in rows if "ppl" in row]
    skipped = [row for row in rows if "not_applicable" in row]
    assert measured == ["fp", "w8"]
    assert len(skipped) == 2 and all("'gemma3_text'" in row["not_applicable"] for row in skipped)


def test_the_fake_backend_check_agrees_with_quantizing(tiny_llama_dir):
    """Every spec the check accepts quantizes; every spec it refuses fails when quantizing (same rule, one place)."""
    from massquant.backends import get_backend
    from massquant.errors import UserError
    from massquant.models.loading import ModelConfig, load_model
    from massquant.quantizers.spec import parse_spec
    from massquant.validation import model_facts
    from massquant.wrapping.quantize import quantize_

    facts = model_facts(ModelConfig(model=tiny_llama_dir))
    loaded = load_model(model=tiny_llama_dir)
    for text in ("w8g1024", "w4", "w4g48", "wmxfp4", "wmxfp4g48", "wnvfp4anvfp4", "kv8g64", "kv8g16", "kv4g32", "kvmxfp4-token"):
        spec = parse_spec(text)
        try:
            get_backend("fake").check(facts, spec)
            refused = None
        except UserError as error:
            refused = error
        try:
            quantize_(loaded.model, spec).undo()
            failed = False
        except UserError:
            failed = True
        if spec.kv_cache is not None and not failed:  # KV quantizers act in the forward pass
            import torch

            with quantize_(loaded.model, spec):
                try:
                    loaded.model(input_ids=torch.tensor([[1, 5, 7, 9]]))
                except UserError:
                    failed = True
        assert (refused is not None) == failed, (text, refused)


def _recipe(tmp_path, model, text, extra: str = "") -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(f"kind: grid\nmodel: ['{model}']\ndata: '{text}'\nseq_len: 32\nmax_tokens: 64\nspec: [w8]\n{extra}")
    return str(path)


def _cells(capsys, recipe, out, *extra) -> tuple[dict, str]:
    code, _, err = _run(capsys, "run", recipe, "--out", out, "--json", *extra)
    assert code == 0, err
    payload = json.loads((out / "results.json").read_text())
    return payload, err


def test_an_edited_text_or_model_is_never_served_from_cache(tiny_llama_dir, tmp_path, capsys):
    import shutil

    from tests.conftest import TRAINING_TEXT

    text = tmp_path / "text.txt"
    text.write_text(TRAINING_TEXT)
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    recipe, out = _recipe(tmp_path, model, text), tmp_path / "run"

    first, _ = _cells(capsys, recipe, out)
    assert (first["computed"], first["reused"]) == (2, 0)
    again, _ = _cells(capsys, recipe, out)
    assert (again["computed"], again["reused"]) == (0, 2)

    text.write_text("Another text entirely, about other things. " * 40)  # edited between two runs
    edited, err = _cells(capsys, recipe, out)
    assert (edited["computed"], edited["reused"]) == (2, 0)
    assert "2 recomputed: text" in err and edited["stale"] == {f"text '{text}' changed": 2}
    assert {row["ppl"] for row in edited["rows"]} != {row["ppl"] for row in first["rows"]}

    config = json.loads((model / "config.json").read_text())  # the model rewritten in place
    config["rms_norm_eps"] = 0.5
    (model / "config.json").write_text(json.dumps(config))
    rewritten, err = _cells(capsys, recipe, out)
    assert rewritten["computed"] == 2 and "model" in err and "changed" in err

    forced, err = _cells(capsys, recipe, out, "--recompute")
    assert (forced["computed"], forced["reused"]) == (2, 0) and "--recompute" in err


def test_batch_size_is_part_of_a_cells_identity(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    _cells(capsys, _recipe(tmp_path, tiny_llama_dir, tiny_text_file), out)
    changed, _ = _cells(capsys, _recipe(tmp_path, tiny_llama_dir, tiny_text_file, "batch_size: 2\n"), out)
    assert (changed["computed"], changed["reused"]) == (2, 0)


def test_model_fingerprints_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    from massquant import fingerprints

    monkeypatch.setattr(fingerprints, "CACHE_FILE", tmp_path / "cache" / "fingerprints.json")
    fingerprints._memory.clear()
    file = tmp_path / "weights.bin"
    file.write_bytes(b"a" * 1000)
    first = fingerprints.file_digest(file)
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a[0]) or real_open(*a, **k))
    assert fingerprints.file_digest(file) == first and not reads  # not read again
    file.write_bytes(b"b" * 1000)  # same size, new content and mtime
    os.utime(file, ns=(1, 10**18))
    assert fingerprints.file_digest(file) != first and reads
    fingerprints._memory.clear()


@pytest.mark.parametrize("args", [
    ["--model_args", "pretrained={model},spec=w8"],
    ["--model_args", "pretrained={model},dtype=float64"],
])
def test_lm_eval_model_args_are_checked_like_eval_flags(args, tiny_llama_dir):
    """The lm-eval model refuses before loading what eval refuses, and builds what eval builds."""
    from massquant.errors import UserError
    from massquant.lmeval.model import MassquantLM, check_model_args
    from lm_eval.utils import simple_parse_args_string

    arguments = simple_parse_args_string(args[1].format(model=tiny_llama_dir))
    if arguments.get("dtype") == "float64":
        with pytest.raises(UserError, match="dtype: unknown value 'float64'"):
            check_model_args(arguments)
        with pytest.raises(UserError, match="dtype: unknown value 'float64'"):
            MassquantLM(**arguments)
    else:
        check_model_args(arguments)
        lm = MassquantLM(**arguments)
        assert lm.massquant["config"] == "w8"
