"""Perplexity equals exp(mean NLL) computed by hand over the same windows."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from massquant.errors import UserError
from massquant.evaluation.perplexity import PerplexityConfig, build_windows, perplexity
from massquant.models.loading import load_model
from tests.conftest import TRAINING_TEXT, run_cli


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(model=tiny_llama_dir)


def hand_nll(model, token_ids: list[int], scored_from: int) -> tuple[float, int]:
    """Sum of -log p(token_t | tokens_<t) for t >= scored_from, straight from the logits."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for t in range(max(scored_from, 1), len(token_ids)):
        total -= float(log_probs[t - 1, token_ids[t]])
    return total, len(token_ids) - max(scored_from, 1)


def test_non_overlapping_windows_without_bos(tiny):
    ids = tiny.tokenizer(TRAINING_TEXT, add_special_tokens=False)["input_ids"]
    windows = build_windows(tiny.tokenizer, TRAINING_TEXT, PerplexityConfig(seq_len=16, bos="never"), 256)
    assert windows.input_ids.shape == (len(ids) // 16, 16)
    assert windows.input_ids.flatten().tolist() == ids[: len(ids) // 16 * 16]
    assert windows.scored_tokens == len(ids) // 16 * 15


def test_bos_is_prepended_to_every_window(tiny):
    bos = tiny.tokenizer.bos_token_id
    ids = tiny.tokenizer(TRAINING_TEXT, add_special_tokens=False)["input_ids"]
    for policy in ("auto", "always"):
        windows = build_windows(tiny.tokenizer, TRAINING_TEXT, PerplexityConfig(seq_len=16, bos=policy), 256)
        assert (windows.input_ids[:, 0] == bos).all()
        assert windows.input_ids[0, 1:].tolist() == ids[:15]
        assert windows.scored_tokens == len(windows.input_ids) * 15  # every text token is predicted


@pytest.mark.parametrize("bos", ["never", "always"])
def test_perplexity_equals_hand_computation(tiny, bos):
    config = PerplexityConfig(seq_len=32, bos=bos, batch_size=3)
    windows = build_windows(tiny.tokenizer, TRAINING_TEXT, config, 256)
    result = perplexity(tiny.model, windows, batch_size=3)
    ids = tiny.tokenizer(TRAINING_TEXT, add_special_tokens=False)["input_ids"]
    per_window = 32 if bos == "never" else 31
    total, count = 0.0, 0
    for w in range(len(ids) // per_window):
        chunk = ids[w * per_window : (w + 1) * per_window]
        if bos == "always":
            chunk = [tiny.tokenizer.bos_token_id] + chunk
        nll, n = hand_nll(tiny.model, chunk, 1)
        total, count = total + nll, count + n
    assert result.tokens == count
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_sliding_window_scores_each_token_once(tiny):
    ids = tiny.tokenizer(TRAINING_TEXT, add_special_tokens=False)["input_ids"]
    length, stride = 40, 16
    windows = build_windows(tiny.tokenizer, TRAINING_TEXT, PerplexityConfig(seq_len=length, stride=stride, bos="never"), 256)
    # independent bookkeeping: which text positions each window scores
    starts = list(range(0, len(ids) - length + 1, stride))
    if starts[-1] + length < len(ids):
        starts.append(len(ids) - length)
    scored = []
    total = 0.0
    previous_end = 1
    for start in starts:
        first = previous_end - start
        scored.extend(range(start + first, start + length))
        total += hand_nll(tiny.model, ids[start : start + length], first)[0]
        previous_end = start + length
    assert scored == list(range(1, len(ids)))  # every token after the first, exactly once
    result = perplexity(tiny.model, windows)
    assert result.tokens == len(ids) - 1
    assert result.ppl == pytest.approx(math.exp(total / (len(ids) - 1)), rel=1e-5)


def test_max_tokens_caps_the_text(tiny):
    windows = build_windows(tiny.tokenizer, TRAINING_TEXT, PerplexityConfig(seq_len=16, max_tokens=64, bos="never"), 256)
    assert windows.text_tokens == 64 and windows.input_ids.shape == (4, 16)


@pytest.mark.parametrize(
    "config, message",
    [
        (PerplexityConfig(seq_len=512), "exceeds the model's maximum"),
        (PerplexityConfig(seq_len=1, bos="always"), "too short"),
        (PerplexityConfig(seq_len=0), "positive"),
        (PerplexityConfig(bos="sometimes"), "unknown BOS policy"),
        (PerplexityConfig(seq_len=16, max_tokens=8), "fewer than one window"),
        (PerplexityConfig(seq_len=16, stride=20), "stride"),
    ],
)
def test_bad_window_settings_are_user_errors(tiny, config, message):
    with pytest.raises(UserError, match=message):
        build_windows(tiny.tokenizer, TRAINING_TEXT, config, 256)


def test_real_model_cli_perplexity_equals_direct_transformers(smollm2, enwiki_text, tmp_path):
    """The issue's acceptance check: eight 512-token windows, no BOS, against plain transformers."""
    text_file = tmp_path / "article.txt"
    text_file.write_text(enwiki_text[:60_000])
    out = tmp_path / "out"
    completed = run_cli(
        "eval", "--model", "smollm2-135m", "--data", text_file, "--seq-len", 512,
        "--max-tokens", 4096, "--bos", "never", "--out", out,
    )
    assert completed.returncode == 0, completed.stderr
    row = json.loads((out / "results.json").read_text())["rows"][0]
    ids = smollm2.tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"][:4096]
    batch = torch.tensor(ids).view(8, 512)
    with torch.no_grad():
        logits = smollm2.model(batch).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), batch[:, 1:].reshape(-1))
    assert row["config"] == "fp" and row["tokens"] == 8 * 511
    assert row["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert 5 < row["ppl"] < 60  # a real model on real text, not a random one
    assert "| fp " in completed.stdout
