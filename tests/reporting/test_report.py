"""massquant report: a page built from results the real commands wrote on a tiny random LLaMA, loaded in headless
Chromium (console errors, network requests, images, numbers in the DOM), plus its one-line errors.

Chromium and its driver are Debian packages (``apt-get install chromium chromium-driver``; ``.ci/run`` installs them).
Without them the browser test fails: it never skips.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
from matplotlib import colormaps
from matplotlib.colors import to_hex

from massquant.cli.main import main
from massquant.reporting.report import GRID_RATIO_RED, _grid_cell

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KINDS = {"eval", "run", "train", "errors", "locate", "intervene", "compare"}


@pytest.fixture(scope="module")
def results(tiny_llama_dir, tiny_text_file, tmp_path_factory):
    """Every command's results, written by the commands themselves, under one directory."""
    root = tmp_path_factory.mktemp("report")
    model = ["--model", tiny_llama_dir]
    text = ["--data", tiny_text_file, "--seq-len", "32"]
    calibration = ["--calib-data", tiny_text_file, "--calib-samples", "2", "--calib-seq-len", "32"]
    tiny_massive = ["--massive-threshold", "0.05", "--massive-ratio", "3"]  # a random model has no real massive values
    commands = [
        ["eval", *model, *text, "--max-tokens", "128", "--spec", "w8a8,w2g32", "--massive", "none,keep", *tiny_massive,
         "--mitigation", "none,smoothquant", *calibration, "--tasks", "massquant_arc_easy", "--limit", "4", "--bootstrap", "200",
         "--out", root / "eval", "--json"],
        ["errors", *model, "--data", tiny_text_file, "--n-seqs", "2", "--seq-len", "32", "--spec", "w8a8-tensor", "--out", root / "errors", "--json"],
        ["locate", *model, "--data", tiny_text_file, "--n-seqs", "2", "--seq-len", "24", "--massive-threshold", "0.05", "--massive-ratio", "3", "--out", root / "locate", "--json"],
        ["intervene", *model, *text, "--max-tokens", "64", *tiny_massive, *calibration, "--out", root / "intervene", "--json"],
        ["compare", root / "eval", "--out", root / "compare"],
    ]
    recipe = root / "grid.yaml"
    recipe.write_text("kind: grid\nspec: [w8a8, w4g32]\ntable: {cols: spec, value: delta_ppl}\n")
    commands.append(["run", recipe, *model, *text, "--max-tokens", "64", "--out", root / "run", "--json"])
    training = root / "train.yaml"
    training.write_text(
        f"kind: train\nmodel: {tiny_llama_dir}\nmitigation: tvr:target=0.05,interval=2\n"
        f"train: {{data: {tiny_text_file}, seq_len: 32, batch_size: 2, steps: 4, lr: 1.0e-3}}\n"
        f"eval: {{data: {tiny_text_file}, seq_len: 32, max_tokens: 64, spec: [w8a8-tensor], n_seqs: 1}}\n"
    )
    commands.append(["train", training, "--out", root / "train", "--json"])
    for command in commands:
        assert main([str(argument) for argument in command]) == 0, command[0]
    assert main(["report", str(root), "--out", str(root / "report.html")]) == 0
    return root


def saved(results, kind: str) -> dict:
    return json.loads((results / kind / "results.json").read_text())


# ---- the page in a browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail("headless Chromium is needed for the report test: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)  # an explicit driver: nothing is downloaded
    yield driver
    driver.quit()


def load(driver, path) -> tuple[list[dict], list[str]]:
    """Open ``path``; the console messages at level SEVERE, and every URL the page requested."""
    driver.get_log("browser"), driver.get_log("performance")  # empty both logs
    driver.get(path.as_uri())
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    requests = [
        message["params"]["request"]["url"]
        for message in (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
        if message["method"] == "Network.requestWillBeSent"
    ]
    return errors, requests


def test_the_console_check_sees_errors_and_requests(browser, tmp_path):
    """The checks below can fail: a page with a script error and a remote image is caught by both."""
    page = tmp_path / "broken.html"
    page.write_text('<html><body><img src="http://127.0.0.1:9/x.png"><script>undefined_function()</script></body></html>')
    errors, requests = load(browser, page)
    assert any("undefined_function" in entry["message"] for entry in errors)
    assert "http://127.0.0.1:9/x.png" in requests


def text_of(driver, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector).text


def test_report_loads_offline_with_every_section_plot_and_number(results, browser, tmp_path):
    from selenium.webdriver.common.by import By

    page = results / "report.html"
    html = page.read_text(encoding="utf-8")
    assert not re.search(r'(?:src|href)="(?!data:image/png;base64,|#)', html)  # nothing to fetch
    errors, requests = load(browser, page)
    assert errors == []
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []

    sections = browser.find_elements(By.CSS_SELECTOR, "section.result")
    assert {section.get_attribute("data-kind") for section in sections} == KINDS
    # every figure is an embedded PNG that decoded
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) >= 12 and all(image.get_attribute("src").startswith("data:image/png;base64,") for image in images)
    assert browser.execute_script("return Array.from(document.images).every(image => image.complete && image.naturalWidth > 100)")

    # eval: the grid (one row per mitigation x massive policy, one column per spec), Δppl, tasks, provenance
    evaluated = saved(results, "eval")
    rows = {(row["mitigation"], row["massive"], row["spec"]): row for row in evaluated["rows"]}
    grid = browser.find_element(By.CSS_SELECTOR, "[data-kind=eval] table.grid")
    headers = [cell.text for cell in grid.find_elements(By.TAG_NAME, "th")]
    assert headers[:5] == ["mitigation", "massive", "fp", "w8a8", "w2g32"]
    lines = {tuple(cell.text for cell in line.find_elements(By.TAG_NAME, "td")[:2]): line.find_elements(By.TAG_NAME, "td") for line in grid.find_elements(By.CSS_SELECTOR, "tbody tr")}
    assert set(lines) == {("none", "none"), ("none", "keep"), ("smoothquant", "none"), ("smoothquant", "keep")}
    broken = rows[("none", "none", "w2g32")]
    cell = lines[("none", "none")][4].text
    assert cell.startswith(f"{broken['ppl']:.4f} (") and f"{abs(broken['delta_ppl']):.4f})" in cell
    assert lines[("none", "keep")][2].text == ""  # keep has no unquantized row
    assert f"{rows[('none', 'none', 'fp')]['outliers']['max_abs']:.4f}" == lines[("none", "none")][5].text
    ppl_table = text_of(browser, "[data-kind=eval] [data-block=ppl] table")
    assert all(f"{row['ppl']:.4f}" in ppl_table for row in evaluated["rows"])
    tasks = text_of(browser, "[data-kind=eval] [data-block=tasks] table")
    score = rows[("none", "none", "w2g32")]["tasks"]["massquant_arc_easy"]["metrics"]["acc"]
    assert f"{score['value']:.4f}" in tasks and f"{score['stderr']:.4f}" in tasks and f"{abs(score['ci_high']):.4f}]" in tasks
    provenance = text_of(browser, "[data-kind=eval] [data-block=provenance]")
    assert evaluated["model"]["fingerprint"] in provenance and evaluated["data"]["text_fingerprint"] in provenance
    assert "massquant eval --model" in provenance and evaluated["environment"]["versions"]["torch"] in provenance

    # errors: the worst layer and its SQNR; the SQNR chart
    layers = saved(results, "errors")["rows"]
    worst = max(layers, key=lambda row: row["rel_output_error"])
    first = browser.find_elements(By.CSS_SELECTOR, "[data-kind=errors] table tbody tr")[0].text
    assert first.startswith(worst["layer"]) and f"{worst['act_sqnr_db']:.4f}" in first
    assert len(browser.find_elements(By.CSS_SELECTOR, "[data-kind=errors] img")) == 1

    # locate: magnitudes, 3-D, heat map, attention share, outliers; the summary numbers
    located = saved(results, "locate")
    assert len(browser.find_elements(By.CSS_SELECTOR, "[data-kind=locate] img")) == 5
    note = text_of(browser, "[data-kind=locate] .note")
    assert f"{located['summary']['max_abs']:.4f}" in note and f"{located['summary']['massive_values']} massive values" in note

    # intervene, train, run, compare
    intervened = saved(results, "intervene")["rows"]
    assert all(f"{row['ppl']:.4f}" in text_of(browser, "[data-kind=intervene] table") for row in intervened)
    trained = saved(results, "train")
    assert f"{trained['training']['final_loss']:.4f}" in text_of(browser, "[data-kind=train] [data-block=training]")
    assert len(browser.find_elements(By.CSS_SELECTOR, "[data-kind=train] [data-block=training] img")) == 1
    ran = saved(results, "run")
    assert f"{ran['rows'][1]['ppl']:.4f}" in text_of(browser, "[data-kind=run] table.grid")
    assert "w8a8 massive=keep" in text_of(browser, "[data-kind=compare] table")

    browser.set_window_size(1400, min(browser.execute_script("return document.body.scrollHeight"), 12000))
    screenshot = tmp_path / "report.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[0] > 3000 and pixels[..., :3].std() > 0.1  # a long page with content, not a blank one


# ---- pieces and errors -------------------------------------------------------------------------------


def test_grid_colours_follow_the_ratio_to_the_baseline_on_a_fixed_log_scale():
    scale = colormaps["RdYlGn_r"]
    for ratio, fraction in [(1.0, 0.0), (0.5, 0.0), (math.sqrt(GRID_RATIO_RED), 0.5), (GRID_RATIO_RED, 1.0), (50.0, 1.0)]:
        cell = _grid_cell({"config": "c", "ppl": 20.0 * ratio, "delta_ppl": 20.0 * ratio - 20.0})
        assert f"background:{to_hex(scale(fraction))}" in cell.style
    assert _grid_cell({"config": "c", "ppl": None, "delta_ppl": None}).style == ""


def test_report_bad_input_is_one_line_and_leaves_no_file(results, tmp_path, capsys):
    out = tmp_path / "page.html"
    foreign = tmp_path / "foreign" / "results.json"
    foreign.parent.mkdir()
    foreign.write_text(json.dumps({"command": "bench", "rows": []}))
    truncated = tmp_path / "truncated" / "results.json"
    truncated.parent.mkdir()
    truncated.write_text(json.dumps({"command": "errors", "rows": []}))
    (tmp_path / "empty").mkdir()
    for arguments, message in [
        ([tmp_path / "missing"], "no such file or directory"),
        ([tmp_path / "empty"], "no massquant results under"),
        ([results / "eval", foreign.parent], "is not a massquant result (its 'command' is 'bench'; accepted: eval, run, train, errors, locate, intervene)"),
        ([results / "eval", truncated], "is not a complete massquant errors result (KeyError: 'spec')"),
        ([results / "eval", "--out", tmp_path], "is a directory"),
    ]:
        command = ["report", *map(str, arguments)] + ([] if "--out" in arguments else ["--out", str(out)])
        assert main(command) == 2
        error = capsys.readouterr().err
        assert message in error and error.startswith("massquant: error: ") and len(error.strip().splitlines()) == 1
        assert not out.exists() and not list(tmp_path.glob(".page.html.*"))
