"""A number format is one registry entry: registered here, in the test file alone, it parses in specs,
fake-quantizes, and runs through `massquant eval --spec`."""

from __future__ import annotations

import json

import pytest
import torch

from massquant.cli.main import main
from massquant.data.text import load_text
from massquant.evaluation.perplexity import PerplexityConfig, build_windows, perplexity
from massquant.models.loading import ModelConfig, load_model
from massquant.quantizers import formats
from massquant.quantizers.formats import FORMATS, NumberFormat, register_format
from massquant.quantizers.functional import fake_quantize
from massquant.quantizers.spec import parse_spec


def ternary(blocks, bits, symmetric, amax, amin):
    """{-1, 0, +1} x amax per block (TernaryBERT-style), the test's own format."""
    scale = torch.where(amax > 0, amax, torch.ones_like(amax))
    return torch.clamp(torch.round(blocks / scale), -1, 1) * scale


@pytest.fixture
def tern():
    saved = dict(FORMATS), dict(formats._SPELLINGS)
    register_format(NumberFormat(name="ternary", layout="scaled", bits=(2,), spellings=("tern",), quantize=ternary,
                                 description="{-1, 0, +1} times a scale per block"))
    yield
    FORMATS.clear(), FORMATS.update(saved[0]), formats._SPELLINGS.clear(), formats._SPELLINGS.update(saved[1])


def test_registered_format_parses_labels_and_quantizes(tern):
    spec = parse_spec("wterna8")
    assert spec.weights.format == "ternary" and spec.weights.bits == 2 and spec.weights.granularity == "channel"
    assert spec.name == "wterna8"
    x = torch.tensor([[0.2, -0.9, 1.0, 0.49], [4.0, -1.9, 2.1, 0.0]])
    expected = torch.tensor([[0.0, -1.0, 1.0, 0.0], [4.0, -0.0, 4.0, 0.0]])
    assert torch.equal(fake_quantize(x, "ternary", 2, "row"), expected)
    with pytest.raises(Exception, match="unknown number format"):
        fake_quantize(x, "quaternary")


def test_registered_format_runs_through_massquant_eval(tern, tiny_llama_dir, tiny_text_file, tmp_path):
    assert main(["eval", "--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", "32", "--spec", "wtern",
                 "--out", str(tmp_path), "--json"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["config"] for row in rows] == ["fp", "wtern"]
    # independent: every decoder linear's weight rows ternarized by hand, the output layer left alone
    loaded = load_model(ModelConfig(model=tiny_llama_dir))
    with torch.no_grad():
        for name, module in loaded.model.named_modules():
            if isinstance(module, torch.nn.Linear) and module is not loaded.model.get_output_embeddings():
                amax = module.weight.abs().amax(dim=1, keepdim=True)
                module.weight.copy_(torch.clamp(torch.round(module.weight / amax), -1, 1) * amax)
    windows = build_windows(loaded.tokenizer, load_text(tiny_text_file), PerplexityConfig(data=tiny_text_file, seq_len=32), 2048)
    assert rows[1]["ppl"] == pytest.approx(perplexity(loaded.model, windows).ppl, rel=1e-6)
    assert rows[1]["ppl"] != pytest.approx(rows[0]["ppl"], rel=1e-3)
