"""massquant compare and the table helpers: pivots, formats, Δs per group, the chart; eval and run results alike."""

from __future__ import annotations

import csv
import io
import json

import matplotlib.image
import pytest

from massquant.cli.main import main
from massquant.errors import UserError
from massquant.reporting.compare import View, add_deltas, chart_table, load_rows, resolve_view, table
from massquant.reporting.tables import mitigation_grid, pivot, render
from tests.conftest import TRAINING_TEXT, make_tiny_llama


def row(spec, mitigation="none", ppl=10.0, model="m", **extra):
    return {"model": model, "data": "d", "seq_len": 8, "max_tokens": None, "stride": None, "bos": "auto",
            "spec": spec, "massive": "none", "mitigation": mitigation, "config": spec, "ppl": ppl, **extra}


def test_pivot_places_each_value_and_leaves_missing_cells_empty():
    rows = [row("fp", ppl=10.0), row("w8a8", ppl=10.5), row("w8a8", "hadamard", ppl=10.25), row("w4a8", "hadamard", ppl=12.0)]
    table_rows, columns = pivot(rows, ["mitigation"], "spec", "ppl")
    assert columns == {"mitigation": "mitigation", "spec=fp": "fp", "spec=w8a8": "w8a8", "spec=w4a8": "w4a8"}
    assert table_rows == [
        {"mitigation": "none", "spec=fp": 10.0, "spec=w8a8": 10.5},
        {"mitigation": "hadamard", "spec=w8a8": 10.25, "spec=w4a8": 12.0},
    ]
    assert render(table_rows, columns, "github").splitlines()[3] == "| hadamard     |         | 10.2500 | 12.0000 |"


def test_mitigation_grid_puts_ppl_and_delta_in_cells_and_each_mitigations_outliers_beside():
    outliers = {"max_abs": 1500.0, "mean_kurtosis": 900.0}
    rows = [
        row("fp", ppl=10.0, delta_ppl=0.0, outliers=outliers),
        row("w8a8", ppl=12.5, delta_ppl=2.5),
        row("fp", "hadamard", ppl=10.0, delta_ppl=0.0, outliers={"max_abs": 40.0, "mean_kurtosis": 3.0}),
        row("w8a8", "hadamard", ppl=10.25, delta_ppl=0.25),
    ]
    table_rows, columns = mitigation_grid(rows)
    assert list(columns.values()) == ["mitigation", "fp", "w8a8", "max |a| (unquantized)", "mean kurtosis"]
    assert table_rows == [
        {"mitigation": "none", "spec=fp": "10.0000", "spec=w8a8": "12.5000 (+2.5000)", "max_abs": 1500.0, "kurtosis": 900.0},
        {"mitigation": "hadamard", "spec=fp": "10.0000", "spec=w8a8": "10.2500 (+0.2500)", "max_abs": 40.0, "kurtosis": 3.0},
    ]


def test_pivot_refuses_to_hide_a_result_and_says_what_tells_them_apart():
    rows = [row("w8a8", model="a", ppl=1.0), row("w8a8", model="b", ppl=2.0)]
    with pytest.raises(UserError, match=r"two results share mitigation=none and spec=w8a8; .*differ in: model\)"):
        pivot(rows, ["mitigation"], "spec", "ppl")


def test_formats_csv_keeps_full_precision_latex_and_markdown_render():
    rows = [{"spec": "w8a8", "ppl": 22.756789123, "delta_ppl": 0.5987}, {"spec": "fp", "ppl": 22.157, "delta_ppl": 0.0}]
    columns = {"spec": "spec", "ppl": "perplexity", "delta_ppl": "Δppl"}
    parsed = list(csv.reader(io.StringIO(render(rows, columns, "csv"))))
    assert parsed == [["spec", "perplexity", "Δppl"], ["w8a8", "22.756789123", "0.5987"], ["fp", "22.157", "0.0"]]
    latex = render(rows, columns, "latex", signed={"delta_ppl"})
    assert latex.splitlines()[2:5] == [" spec   & perplexity   & $\\Delta$ppl    \\\\", "\\midrule", " w8a8   & 22.7568      & +0.5987 \\\\"]
    assert render(rows, columns, "markdown", signed={"delta_ppl"}).splitlines()[2] == "| w8a8   | 22.7568      | +0.5987 |"


def test_deltas_are_taken_within_each_model_and_text_group():
    rows = add_deltas([
        row("fp", ppl=10.0, model="a"), row("w8a8", ppl=12.5, model="a"),
        row("w8a8", ppl=30.0, model="b"), row("fp", ppl=20.0, model="b"),  # baseline after its variant
        row("w8a8", ppl=5.0, model="c"),  # no baseline for c
    ])
    assert [r["delta_ppl"] for r in rows] == [0.0, 2.5, 10.0, 0.0, None]


def test_task_metrics_become_values_with_deltas():
    def scored(spec, acc):
        return row(spec, tasks={"massquant_arc_easy": {"metrics": {"acc": {"value": acc, "stderr": 0.05}}}})

    payload = {"command": "run", "rows": [scored("fp", 0.5), scored("w4a8", 0.425)]}
    from massquant.reporting.compare import rows_of

    rows = add_deltas(rows_of(payload, "x"))
    assert rows[1]["massquant_arc_easy:acc"] == 0.425
    assert rows[1]["delta_massquant_arc_easy:acc"] == pytest.approx(-0.075)
    view = resolve_view(rows, None, "spec", "delta_massquant_arc_easy:acc")
    table_rows, columns, signed = table(rows, view)
    assert table_rows == [{"model": "m", "spec=fp": 0.0, "spec=w4a8": pytest.approx(-0.075)}] and signed == {"spec=fp", "spec=w4a8"}


def train_result(directory, mitigation, after_ppl):
    """A massquant train results.json: rows before (shared by every run of the model), after surgery, after training."""
    def stage_rows(stage, label, fp, quantized):
        outliers = {"max_abs": 10 * fp, "mean_kurtosis": fp / 2}
        return [{"config": "fp", "spec": "fp", "massive": "none", "mitigation": label, "stage": stage, "ppl": fp, "outliers": outliers},
                {"config": "w8a8", "spec": "w8a8", "massive": "none", "mitigation": label, "stage": stage, "ppl": quantized}]

    rows = stage_rows("before", "none", 20.0, 40.0) + stage_rows("surgery", mitigation, 25.0, 45.0)[:1] + stage_rows("after", mitigation, *after_ppl)
    payload = {"command": "train", "model": {"reference": "m"}, "eval_data": {"data": "d", "seq_len": 8, "max_tokens": 64, "bos": "auto"},
               "mitigation": mitigation, "rows": rows}
    directory.mkdir()
    (directory / "results.json").write_text(json.dumps(payload))
    return str(directory)


def test_training_runs_compare_in_one_grid_with_their_shared_baseline_once(tmp_path, capsys):
    runs = [train_result(tmp_path / "tvr", "tvr", (21.0, 30.0)), train_result(tmp_path / "dyt", "dyt", (22.0, 24.0))]
    assert main(["compare", *runs, "--rows", "mitigation,stage", "--cols", "spec", "--value", "delta_ppl", "--table-format", "csv"]) == 0
    printed = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert printed == [
        ["mitigation", "stage", "fp", "w8a8"],
        ["none", "before", "0.0", "20.0"],
        ["tvr", "surgery", "5.0", ""],
        ["tvr", "after", "1.0", "10.0"],
        ["dyt", "surgery", "5.0", ""],
        ["dyt", "after", "2.0", "4.0"],
    ]
    assert main(["compare", *runs, "--rows", "mitigation,stage", "--cols", "spec", "--value", "max_abs", "--table-format", "csv"]) == 0
    assert [line[2] for line in csv.reader(io.StringIO(capsys.readouterr().out))] == ["fp", "200.0", "250.0", "210.0", "250.0", "220.0"]


def test_view_errors_list_what_is_accepted():
    rows = add_deltas([row("fp"), row("w8a8")])
    with pytest.raises(UserError, match="unknown row/column key 'quant'; accepted: model, dtype, data"):
        resolve_view(rows, ["quant"], None, None)
    with pytest.raises(UserError, match="unknown value 'acc'; accepted: .*ppl.*delta_ppl"):
        resolve_view(rows, None, None, "acc")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One `massquant eval` and one `massquant run` of the same configurations on a tiny model, in process."""
    root = tmp_path_factory.mktemp("compare")
    model = str(make_tiny_llama(root / "model"))
    text = root / "text.txt"
    text.write_text(TRAINING_TEXT)
    common = ["--model", model, "--data", str(text), "--seq-len", "32", "--max-tokens", "64"]
    assert main(["eval", *common, "--spec", "w8a8,kv4", "--out", str(root / "eval")]) == 0
    recipe = root / "grid.yaml"
    recipe.write_text("kind: grid\nspec: [w8a8, kv4]\ntable: {cols: spec, value: delta_ppl}\n")
    assert main(["run", str(recipe), *common, "--out", str(root / "run")]) == 0
    return root


def test_compare_reads_eval_and_run_results_alike(measured, capsys):
    capsys.readouterr()
    evaluated = json.loads((measured / "eval" / "results.json").read_text())["rows"]
    assert main(["compare", str(measured / "eval"), str(measured / "run" / "results.json"),
                 "--rows", "source", "--cols", "spec", "--value", "ppl", "--table-format", "csv"]) == 0
    lines = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [line["source"] for line in lines] == [str(measured / "eval"), str(measured / "run" / "results.json")]
    for line in lines:  # the same configurations give the same perplexity through either command
        assert {spec: float(line[spec]) for spec in ("fp", "w8a8", "kv4")} == {r["spec"]: r["ppl"] for r in evaluated}


def test_compare_of_a_run_directory_repeats_the_table_it_printed(measured, capsys):
    capsys.readouterr()
    assert main(["run", str(measured / "grid.yaml"), "--out", str(measured / "run"),
                 "--model", json.loads((measured / "run" / "results.json").read_text())["rows"][0]["model"],
                 "--data", str(measured / "text.txt"), "--seq-len", "32", "--max-tokens", "64"]) == 0
    printed = capsys.readouterr()
    assert "3 reused" in printed.err
    assert main(["compare", str(measured / "run")]) == 0
    assert capsys.readouterr().out == printed.out


def test_compare_writes_markdown_csv_latex_and_a_delta_chart(measured, tmp_path, capsys):
    assert main(["compare", str(measured / "eval"), "--out", str(tmp_path)]) == 0
    rows = load_rows([measured / "eval"])
    assert (tmp_path / "compare.md").read_text() == capsys.readouterr().out
    written = list(csv.DictReader(io.StringIO((tmp_path / "compare.csv").read_text())))
    assert [(line["config"], float(line["perplexity"]), float(line["Δppl"])) for line in written] == [
        (r["config"], r["ppl"], r["delta_ppl"]) for r in rows
    ]
    assert "\\begin{tabular}" in (tmp_path / "compare.tex").read_text()
    image = matplotlib.image.imread(tmp_path / "compare.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    chart_rows, chart_columns = chart_table(rows, View(["config"], None, "ppl"))
    assert list(chart_columns) == ["config", "delta_ppl"]
    assert [r["delta_ppl"] for r in chart_rows] == [r["ppl"] - rows[0]["ppl"] for r in rows]


def test_compare_rejects_paths_without_results(tmp_path, capsys):
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    for path, message in [(tmp_path / "empty", "no results at"), (tmp_path / "other.json", "is not a massquant eval, train or run result")]:
        path.parent.mkdir(exist_ok=True)
        assert main(["compare", str(path)]) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1
