"""--massive-target: which phenomena an intervention or policy acts on, and the record of what it changed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from massquant.errors import UserError
from massquant.massive import MassiveCriteria, MassivePolicy, check_target
from massquant.massive.intervene import InterventionCounts, intervene_targets
from massquant.massive.locate import locate
from massquant.massive.report import LocateConfig
from massquant.massive.sites import MassiveSite, MassiveSites
from massquant.massive.targets import residual_targets
from massquant.models.architectures import decoder_layers
from massquant.models.loading import load_model
from massquant.options import settings
from tests.conftest import make_tiny_llama

CRITERIA = MassiveCriteria()
BOS_CHANNEL, BOS_PLANT = 7, 8000.0  # the dominant phenomenon: BOS, from layer 0 on
TOKEN_CHANNEL, TOKEN_PLANT = 20, 3000.0  # a second one: an ordinary token wherever it occurs
TOKEN = 42


def site(layer, sequence, position, channel, value, token=None):
    return MassiveSite(layer, sequence, position, channel, value, abs(value), token)


def gemma_like_sites() -> MassiveSites:
    """Gemma 3's shape (issue 15): channel 400 on many ordinary tokens in layers 0-4 (small values, low cutoffs),
    channel 163 on BOS and a lone space from layer 3 (1e5)."""
    sites = [site(layer, 0, position, 400, 900.0 + position, " the") for layer in range(5) for position in (3, 9, 14)]
    sites += [site(layer, 0, 0, 163, 1.0e5, "<bos>") for layer in range(3, 14)]
    sites += [site(layer, 0, 21, 163, -9.0e4, " ") for layer in range(3, 14)]
    return MassiveSites(sites)


@pytest.mark.parametrize("target, expected", [
    ("first-layer", [(0, (400,))]),  # what intervene did before targets: Gemma's layer 0, channel 400 only
    ("dominant", [(3, (163,))]),
    ("all", [(0, (400,)), (3, (163,))]),
    ("channel:163", [(3, (163,))]),
    ("channel:400", [(0, (400,))]),
])
def test_targets_on_gemma_shaped_sites(target, expected):
    chosen = residual_targets(gemma_like_sites(), target, CRITERIA)
    assert [(t.layer, t.channels) for t in chosen] == expected


def test_target_names_are_checked():
    with pytest.raises(UserError, match="channel:N"):
        check_target("channel:x")
    with pytest.raises(UserError, match="needs --massive-detection calibrated"):
        check_target("dominant", "dynamic")
    assert residual_targets(None, "channel:5", CRITERIA, "dynamic")[0].channels == (5,)
    with pytest.raises(UserError, match="channel 5 carries no massive activation.*163, 400"):
        residual_targets(gemma_like_sites(), "channel:5", CRITERIA)
    assert MassivePolicy("suppress-zero", target="channel:163").validate().label == "suppress-zero:channel:163"
    assert MassivePolicy("keep").label == "keep"  # the default target leaves names (and cached cells) as they were
    values = SimpleNamespace(massive=["none", "keep"], massive_detection="calibrated", massive_threshold=100.0,
                             massive_ratio=None, massive_target=["first-layer", "dominant"])
    policies = settings.massive_policies(values)
    assert [p.label for p in policies] == ["none", "keep", "keep:dominant"]


@pytest.fixture(scope="module")
def two_phenomena(tmp_path_factory):
    """A tiny random LLaMA with two planted massive activations: BOS channel 7 (larger) and token 42's channel 20."""
    loaded = load_model(model=str(make_tiny_llama(tmp_path_factory.mktemp("two-phenomena"), layers=3)))
    with torch.no_grad():
        embeddings = loaded.model.model.embed_tokens.weight
        embeddings[loaded.tokenizer.bos_token_id, BOS_CHANNEL] += BOS_PLANT
        embeddings[TOKEN, TOKEN_CHANNEL] += TOKEN_PLANT
    ids = torch.randint(50, len(loaded.tokenizer), (2, 24), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = loaded.tokenizer.bos_token_id
    ids[0, 5] = ids[0, 17] = ids[1, 9] = TOKEN
    return loaded, ids


def independent_mask(hidden: torch.Tensor, channels: tuple[int, ...]) -> torch.Tensor:
    """|x| > 100 and > 1000 x the sequence's (lower) median |x|, in ``channels`` only: plain torch."""
    magnitudes = hidden.abs()
    cutoff = torch.stack([torch.clamp(1000 * row.flatten().median(), min=100) for row in magnitudes])
    mask = magnitudes > cutoff[:, None, None]
    keep = torch.zeros(hidden.shape[-1], dtype=torch.bool)
    keep[list(channels)] = True
    return mask & keep


def logits_with_hook(model, ids, layer: int, channels: tuple[int, ...]):
    """The forward with layer ``layer``'s output zeroed where ``independent_mask`` says, by a plain hook."""
    found = {}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        found["mask"] = independent_mask(hidden, channels)
        zeroed = hidden.masked_fill(found["mask"], 0)
        return (zeroed, *output[1:]) if isinstance(output, tuple) else zeroed

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(ids).logits, found["mask"]
    finally:
        handle.remove()


@pytest.mark.parametrize("target, channels", [
    ("dominant", (BOS_CHANNEL,)), ("channel:20", (TOKEN_CHANNEL,)), ("all", (BOS_CHANNEL, TOKEN_CHANNEL)),
])
def test_zeroing_a_target_equals_a_plain_hook_and_records_exactly_what_changed(two_phenomena, target, channels):
    loaded, ids = two_phenomena
    model = loaded.model
    with torch.no_grad():
        reference = model(ids).logits
    sites = locate(model, ids, LocateConfig(criteria=CRITERIA), progress=False).massive
    # both plants are massive from layer 0: every target acts there, on its channels
    assert [(t.layer, t.channels) for t in residual_targets(sites, target, CRITERIA)] == [(0, channels)]
    expected_logits, mask = logits_with_hook(model, ids, 0, channels)
    counts = InterventionCounts()
    undo = intervene_targets(model, "zero", residual_targets(sites, target, CRITERIA), counts=counts)
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        undo()
    assert torch.equal(logits, expected_logits)
    # the record: (layer, channel, token, first) of every changed value, as the independent mask has them
    sequence, position, channel = mask.nonzero(as_tuple=True)
    expected = {}
    for s, p, c in zip(sequence.tolist(), position.tolist(), channel.tolist()):
        key = (0, c, int(ids[s, p]), p == 0)
        expected[key] = expected.get(key, 0) + 1
    assert dict(counts.changed) == expected and counts.values == int(mask.sum())
    assert {key[2] for key in expected} == ({loaded.tokenizer.bos_token_id} if target == "dominant" else {TOKEN} if target == "channel:20" else {loaded.tokenizer.bos_token_id, TOKEN})
    rows = counts.as_dict(loaded.tokenizer)["changed"]
    assert sum(row["values"] for row in rows) == counts.values and all("token" in row for row in rows)
    assert not torch.equal(logits, reference)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)  # undone exactly


def test_intervene_command_compares_targets_and_names_the_tokens(two_phenomena, tmp_path, tiny_text_file, capsys):
    from massquant.cli.main import main

    loaded, _ = two_phenomena
    directory = tmp_path / "model"
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    status = main([
        "intervene", "--model", str(directory), "--data", tiny_text_file, "--seq-len", "32", "--max-tokens", "128",
        "--calib-data", tiny_text_file, "--calib-samples", "2", "--calib-seq-len", "32", "--interventions", "zero",
        "--massive-target", "first-layer,dominant", "--json",
    ])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    rows = {row["intervention"]: row for row in json.loads(captured.out)["rows"]}
    assert list(rows) == ["unchanged", "zero first-layer", "zero dominant"]
    dominant = rows["zero dominant"]
    assert dominant["target"] == "dominant" and dominant["where"].startswith("layer 0, channels 7")
    assert {(entry["layer"], entry["channel"], entry["position"]) for entry in dominant["changed"]} == {(0, BOS_CHANNEL, "first")}
    assert sum(entry["values"] for entry in dominant["changed"]) == dominant["values_changed"] == dominant["windows"]


# --- prefixkv: its tokens from the residual-stream phenomena --------------------------------------


def test_prefixkv_adds_the_residual_sink_tokens_and_records_them(two_phenomena):
    from massquant.massive.phenomena import typical_cutoff
    from massquant.mitigations import prefix_kv

    loaded, ids = two_phenomena
    model = loaded.model
    # independent: each layer's cutoff per sequence from plain hooks; a token counts where its value beats the typical one
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
               for layer in decoder_layers(model)]
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for handle in handles:
        handle.remove()
    layers = len(decoder_layers(model))
    cutoffs = [sum(max(100.0, 1000 * float(outputs[s * layers + layer].abs().flatten().median())) for s in range(len(ids))) / len(ids)
               for layer in range(layers)]
    typical = typical_cutoff(cutoffs)
    carriers = {
        (s, p) for s in range(len(ids)) for layer in range(layers)
        for p in (outputs[s * layers + layer][0].abs().amax(dim=-1) > typical).nonzero().flatten().tolist() if p > 0
    }
    assert {int(ids[s, p]) for s, p in carriers} == {TOKEN}
    assert prefix_kv.residual_sink_tokens(model, ids) == [TOKEN]
    undo = prefix_kv.apply(loaded, {"threshold": 64.0, "count": 0, "bos": True, "residual": True}, ids)
    try:
        record = undo.record
    finally:
        undo()
    assert record["prefix_ids"] == [loaded.tokenizer.bos_token_id, TOKEN]
    assert record["from_residual"] == [loaded.tokenizer.decode([TOKEN])] and record["from_down_proj"] == []
    undo = prefix_kv.apply(loaded, {"threshold": 64.0, "count": 0, "bos": True, "residual": False}, ids)
    undo()
    assert undo.record["prefix_ids"] == [loaded.tokenizer.bos_token_id]


# --- massquant across: the analysis on several models, one column per model -----------------------


def test_across_prints_one_column_per_model(two_phenomena, tmp_path, tiny_text_file, tiny_llama_dir, capsys):
    from massquant.cli.main import main

    loaded, _ = two_phenomena
    directory = tmp_path / "planted"
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    status = main([
        "across", "--model", f"{directory},{tiny_llama_dir}", "--data", tiny_text_file, "--n-seqs", "2", "--seq-len", "32",
        "--max-tokens", "64", "--calib-data", tiny_text_file, "--calib-samples", "2", "--calib-seq-len", "32",
        "--out", str(tmp_path / "out"),
    ])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    planted, plain = payload["models"][str(directory)], payload["models"][str(tiny_llama_dir)]
    assert planted["phenomena"][0]["channel"] == BOS_CHANNEL and not plain["phenomena"]
    rows = {row["name"]: row for row in planted["interventions"]}
    assert rows["zero dominant"]["where"] == f"layer 0, channels {BOS_CHANNEL}"
    assert {entry["channel"] for entry in rows["zero dominant"]["changed"]} == {BOS_CHANNEL}
    assert [row["name"] for row in planted["quantized"]][:2] == ["none", "keep"]
    header = next(line for line in captured.out.splitlines() if str(directory) in line)
    assert str(tiny_llama_dir) in header
    assert (tmp_path / "out" / directory.name / "magnitudes.png").exists()
