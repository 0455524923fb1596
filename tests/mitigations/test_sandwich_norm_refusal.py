"""Rotation on sandwich-norm models (Gemma 2/3): refused per row, before loading, with the reason; the rest runs."""

from __future__ import annotations

import json

from massquant.cli.main import main


def test_a_recipe_mixing_llama_and_gemma3_runs_every_row_but_gemma_hadamard(
    tmp_path_factory, tiny_llama_dir, tiny_text_file, tmp_path, capsys
):
    from tests.integration.test_robustness import make_tiny_gemma3

    gemma, _ = make_tiny_gemma3(tmp_path_factory)
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(
        f"kind: grid\nmodel: [{tiny_llama_dir}, {gemma}]\ndata: [{tiny_text_file}]\nseq_len: [32]\nmax_tokens: 64\n"
        "spec: [w8]\nmitigation: [none, hadamard]\ncalib_samples: 2\ncalib_seq_len: 32\n"
    )
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    measured = [(row["model"], row["config"]) for row in rows if row.get("ppl") is not None]
    refused = [row for row in rows if row.get("not_applicable")]
    assert measured == [
        (tiny_llama_dir, "fp"), (tiny_llama_dir, "w8"), (tiny_llama_dir, "fp mitigation=hadamard"),
        (tiny_llama_dir, "w8 mitigation=hadamard"), (gemma, "fp"), (gemma, "w8"),
    ]
    assert [row["config"] for row in refused] == ["fp mitigation=hadamard", "w8 mitigation=hadamard"]
    assert all(row["model"] == gemma and "no norm on the attention/MLP outputs" in row["not_applicable"] for row in refused)


def test_hadamard_alone_on_gemma3_is_refused_before_the_weights_load(tmp_path_factory, tiny_text_file, monkeypatch, capsys):
    from tests.integration.test_robustness import make_tiny_gemma3
    import massquant.cli.eval as eval_command

    gemma, _ = make_tiny_gemma3(tmp_path_factory)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(eval_command, "load_model", never)
    code = main(["eval", "--model", gemma, "--data", tiny_text_file, "--spec", "w8", "--mitigation", "hadamard"])
    err = capsys.readouterr().err
    assert code == 2 and "massquant: error: mitigation 'hadamard' needs" in err and "no norm on the attention/MLP outputs" in err
    assert "the model was loaded" not in err
