"""Massive sites grouped into phenomena, the criteria from the literature, and the criteria's blind spots.

Synthetic cases are checked against hand-written expectations; the criteria on
SmolLM2 against plain torch on ``output_hidden_states``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from massquant.data.calibration import calibration_batch
from massquant.errors import UserError
from massquant.massive import MassiveCriteria
from massquant.massive.locate import locate
from massquant.massive.report import LocateConfig
from massquant.massive.statistics import criterion_cutoff, largest, magnitude_profile
from massquant.massive.phenomena import (
    LayerProfiles, blind_spots, describe_blind_spots, group_phenomena, is_delimiter, merge_runs, token_class,
)
from massquant.massive.sites import MassiveSite
from tests.conftest import decoder_layer_outputs


def site(layer, sequence, position, channel, value, token, ratio=1000.0):
    return MassiveSite(layer, sequence, position, channel, value, ratio, token)


@pytest.mark.parametrize(
    "text, delimiter",
    [(" ", True), ("\n", True), ("\n\n", True), (",", True), (" ,", True), ("...", True), ("—", True),
     (" the", False), ("<bos>", False), ("1", False), ("", False), (None, False)],
)
def test_delimiter_tokens(text, delimiter):
    assert is_delimiter(text) is delimiter
    assert token_class(3, text) == ("delimiter" if delimiter else "other")
    assert token_class(0, text) == "first"


def test_cells_of_one_channel_with_overlapping_spans_form_one_phenomenon():
    sites = [
        # channel 163: BOS in layers 3-13, a lone space in layers 5-13 of both sequences -> one phenomenon
        *[site(layer, s, 0, 163, 9e4 + layer, "<bos>") for layer in range(3, 14) for s in (0, 1)],
        *[site(layer, s, 7 + s, 163, -2e4, " ") for layer in range(5, 14) for s in (0, 1)],
        # channel 400: ordinary tokens in layers 0-2, disjoint from its BOS cell in layers 10-11 -> two phenomena
        *[site(layer, 0, position, 400, 700.0, text) for layer in range(3) for position, text in ((4, " the"), (9, " of"), (12, " the"))],
        site(10, 1, 0, 400, 300.0, "<bos>"), site(11, 1, 0, 400, 310.0, "<bos>"),
    ]
    phenomena = group_phenomena(sites, bos_token="<bos>")
    assert [p["name"] for p in phenomena] == [
        "channel 163 on BOS ('<bos>') and delimiter tokens (' '), layers 3–13",
        "channel 400 on other tokens (' the', ' of'), layers 0–2",
        "channel 400 on BOS ('<bos>'), layers 10–11",
    ]
    first = phenomena[0]
    assert first["value"] == 9e4 + 13 and first["values"] == 22 + 18 and first["carriers"] == 4 and first["sequences"] == 2
    assert [(c["class"], c["carriers"], c["layers"]) for c in first["classes"]] == [("first", 2, "3-13"), ("delimiter", 2, "5-13")]
    assert phenomena[1]["carriers"] == 3 and phenomena[1]["classes"][0]["examples"] == [" the", " of"]
    # a first token that is not the tokenizer's BOS is not called BOS
    assert group_phenomena([site(4, 0, 0, 5, 500.0, "The")], bos_token="<s>")[0]["name"] == "channel 5 on the first token ('The'), layers 4"


def profiles_for(cutoffs, first, others):
    cutoffs = np.asarray(cutoffs, dtype=float)
    return LayerProfiles(cutoffs, np.asarray(first, dtype=float), np.asarray(others, dtype=float), cutoffs / 1000)


def test_blind_spots_state_low_and_high_cutoffs():
    # 4 layers, 1 sequence, 2 channels. Cutoffs: layer 0 low (0.5e3), layers 1-2 typical (2e4), layer 3 high (2.2e5).
    cutoffs = [[500.0], [2e4], [2.1e4], [2.2e5]]
    first = [[[10.0, 1.0]], [[9e4, 1.0]], [[1e5, 1.0]], [[1.04e5, 1.0]]]  # channel 0 on the first token
    others = [[[1.0, 800.0]], [[1.0, 50.0]], [[1.0, 50.0]], [[1.0, 50.0]]]  # channel 1 on ordinary tokens
    sites = [site(1, 0, 0, 0, 9e4, "<bos>"), site(2, 0, 0, 0, 1e5, "<bos>"),
             site(0, 0, 3, 1, 800.0, " the"), site(0, 0, 5, 1, -600.0, ",")]
    phenomena = group_phenomena(sites, "<bos>")
    spots = blind_spots(phenomena, sites, profiles_for(cutoffs, first, others), "median |a|")
    assert [(s["layer"], s["kind"]) for s in spots] == [(0, "low cutoff"), (3, "high cutoff")]
    low, high = spots
    # typical cutoff: the median of the layers' cutoffs, (2e4 + 2.1e4) / 2
    assert low["typical_cutoff"] == 2.05e4 and low["values"] == 2 and low["classes"] == {"other": 1, "delimiter": 1}
    assert low["channels"] == {1: 2} and low["max_value"] == 800.0
    assert (high["channel"], high["value"], high["cutoff"], high["massive_cutoff"]) == (0, 1.04e5, 2.2e5, 2e4)
    assert high["text"] == (
        "channel 0 on the first token reaches 1.04e+05, above the typical layer's cutoff 2.05e+04 and the 2e+04 it passed "
        "as massive (layers 1-2), but median |a| 220 puts the cutoff at 2.2e+05"
    )
    # a value below the typical cutoff (here: above the one its phenomenon passed) is no blind spot
    first[3][0][0] = 2.03e4
    assert [s["kind"] for s in blind_spots(phenomena, sites, profiles_for(cutoffs, first, others), "median |a|")] == ["low cutoff"]


def test_consecutive_layers_saying_the_same_are_merged():
    def high(layer, value, channel=163):
        return {"layer": layer, "kind": "high cutoff", "channel": channel, "class": "the first token", "value": value,
                "cutoff": 1000.0 * layer, "reference": float(layer), "massive_cutoff": 500.0, "typical_cutoff": 2e4,
                "massive_layers": "3-13"}

    low = {"layer": 0, "kind": "low cutoff", "cutoff": 600.0, "typical_cutoff": 2e4, "reference": 0.6, "values": 30,
           "carriers": 20, "classes": {"other": 25, "delimiter": 5}, "channels": {400: 28, 12: 2}, "max_value": 3000.0}
    spots = [high(14, 9e4), high(15, 1.04e5), high(16, 1e5), high(17, 5e4, channel=7), high(18, 9e4),
             low, {**low, "layer": 1, "reference": 3.2, "cutoff": 3200.0}]
    runs = merge_runs(spots)
    assert [[spot["layer"] for spot in run] for run in runs] == [[0, 1], [14, 15, 16], [17], [18]]
    assert describe_blind_spots(runs[1], "median |a|") == (
        "channel 163 on the first token reaches 9e+04–1.04e+05, above the typical layer's cutoff 2e+04 and the 500 it "
        "passed as massive (layers 3-13), but median |a| 14–16 puts the cutoff at 1.4e+04–1.6e+04"
    )
    assert describe_blind_spots(runs[0], "median |a|") == (
        "median |a| 0.6–3.2 puts the cutoff at 600–3.2e+03, below the typical layer's 2e+04: 60 values (50 on other "
        "tokens, 10 on delimiter tokens; channels 400, 12) pass with |a| <= 3e+03, which the typical cutoff would not"
    )


def test_criteria_cutoffs_match_their_definitions():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, 32, generator=generator)
    x[0, 5], x[7, 9], x[8, 9], x[20, 1] = 5e3, -400.0, 350.0, 120.0
    row_maxima, median = magnitude_profile(x)
    values, _, _ = largest(x, row_maxima, 5)
    sun = MassiveCriteria.named("sun")
    assert criterion_cutoff(sun, median, row_maxima, values) == (median, max(100.0, 1000 * float(x.abs().median())))
    prefix = MassiveCriteria.named("prefixquant")
    token_max = float(x.abs().amax(dim=1).median())  # torch's median is the lower median, as PrefixQuant's
    assert prefix.median_ratio == 64 and criterion_cutoff(prefix, median, row_maxima, values) == (token_max, max(100.0, 64 * token_max))
    top = MassiveCriteria.named("top-k", k=2)
    reference, cutoff = criterion_cutoff(top, median, row_maxima, values)
    assert reference == 350.0 and cutoff == 350.0  # the third largest: exactly 5e3 and -400 pass
    assert criterion_cutoff(MassiveCriteria.named("top-k", k=2, abs_threshold=1e3), median, row_maxima, values)[1] == 1e3


@pytest.mark.parametrize(
    "arguments, message",
    [(("median",), "unknown massive criterion 'median'; accepted: sun, prefixquant, top-k"),
     (("top-k", None, 10.0), "takes no ratio"), (("sun", None, None, 3), "top-k criterion only"),
     (("top-k", None, None, 0), "k >= 1"), (("prefixquant", None, 0.5), "median_ratio >= 1")],
)
def test_bad_criteria(arguments, message):
    with pytest.raises(UserError, match=message):
        MassiveCriteria.named(*arguments)


# ---- the real SmolLM2 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_batch(smollm2):
    return calibration_batch(smollm2.tokenizer, "enwiki-sample", 2, 128, seed=0)


@pytest.fixture(scope="module")
def smol_hidden(smollm2, smol_batch):
    return decoder_layer_outputs(smollm2.model, smol_batch)


def expected_sites(hidden_states, rule: str) -> dict:
    """(layer, sequence, position, channel) -> value for each criterion, by its definition in plain torch."""
    expected = {}
    for layer, per_sequence in enumerate(hidden_states):
        for sequence, hidden in enumerate(per_sequence):
            magnitudes = hidden.abs()
            if rule == "prefixquant":
                mask = (magnitudes > 100) & (magnitudes > 64 * magnitudes.amax(dim=1).median())
            else:  # top-k, k = 4
                mask = torch.zeros_like(magnitudes, dtype=torch.bool)
                mask.view(-1)[magnitudes.flatten().topk(4).indices] = True
                mask &= magnitudes > 100
            for position, channel in mask.nonzero().tolist():
                expected[(layer, sequence, position, channel)] = float(hidden[position, channel])
    return expected


@pytest.mark.parametrize("rule", ["prefixquant", "top-k"])
def test_smollm2_sites_under_each_criterion_match_hidden_states(smollm2, smol_batch, smol_hidden, rule):
    criteria = MassiveCriteria.named(rule)
    report = locate(smollm2.model, smol_batch, LocateConfig(criteria=criteria), tokenizer=smollm2.tokenizer, progress=False)
    found = {(s.layer, s.sequence, s.position, s.channel): s.value for s in report.massive.sites}
    expected = expected_sites(smol_hidden, rule)
    assert found.keys() == expected.keys() and found
    assert all(found[key] == pytest.approx(value, rel=1e-5) for key, value in expected.items())
    assert report.as_dict()["criterion"]["rule"] == rule


def test_smollm2_phenomena_and_blind_spots_match_hidden_states(smollm2, smol_batch, smol_hidden):
    report = locate(smollm2.model, smol_batch, LocateConfig(), tokenizer=smollm2.tokenizer, progress=False)
    first = report.phenomena[0]
    # independently: the layers where channel 507 of the first token passes Sun et al.'s criterion in some sequence
    passing = [
        layer for layer, per_sequence in enumerate(smol_hidden)
        if any(abs(float(h[0, 507])) > max(100.0, 1000 * float(h.abs().median())) for h in per_sequence)
    ]
    assert first["channel"] == 507 and first["first_layer"] == passing[0] == 11 and first["last_layer"] == passing[-1]
    assert first["name"].startswith("channel 507 on BOS ('<|im_start|>')")
    assert sum(p["values"] for p in report.phenomena) == len(report.massive.sites)
    # every stated high-cutoff blind spot is true of the hidden states: the value is there, and fails there
    high = [spot for spot in report.blind_spots if spot["kind"] == "high cutoff"]
    for spot in high:
        hidden = smol_hidden[spot["layer"]][spot["sequence"]]
        assert spot["class"] == "the first token"
        assert spot["value"] == pytest.approx(abs(float(hidden[0, spot["channel"]])), rel=1e-6)
        assert spot["cutoff"] == pytest.approx(max(100.0, 1000 * float(hidden.abs().median())), rel=1e-6)
        assert spot["massive_cutoff"] < spot["value"] <= spot["cutoff"] and spot["typical_cutoff"] < spot["value"]
    # and every layer after the span where channel 507 of the first token is above the lowest cutoff it passed and the
    # typical layer's cutoff (the median over layers of the cutoff averaged over sequences) is stated
    cutoffs = [[max(100.0, 1000 * float(h.abs().median())) for h in per_sequence] for per_sequence in smol_hidden]
    typical = float(np.median([np.mean(per_sequence) for per_sequence in cutoffs]))
    lowest = min(cutoffs[s.layer][s.sequence] for s in report.massive.sites if s.channel == 507 and s.position == 0)
    expected_layers = [
        layer for layer in range(first["last_layer"] + 1, len(smol_hidden))
        if any(max(lowest, typical) < abs(float(h[0, 507])) <= cutoffs[layer][s] for s, h in enumerate(smol_hidden[layer]))
    ]
    assert [spot["layer"] for spot in high if spot["channel"] == 507] == expected_layers == [28, 29]
