"""A number must not depend on how it was computed: batch size, padding, the other sequences of a batch, BOS."""

from __future__ import annotations

import math

import pytest
import torch

from massquant.evaluation.perplexity import PerplexityConfig, build_windows, window_nll
from massquant.models.loss import token_nll
from massquant.evaluation.runner import evaluate_variant
from massquant.massive import MassiveCriteria, MassivePolicy
from massquant.quantizers.spec import parse_spec
from massquant.quantizers.tensors import KeepRule, keep_mask, quantize_activation, quantize_kv
from massquant.variants import Variant
from massquant.wrapping.quantize import quantize_
from tests.conftest import TRAINING_TEXT

# ---------------------------------------------------------------- hand-made tensors


def int8_by_hand(x: torch.Tensor, amax: float) -> torch.Tensor:
    """Symmetric int8 in float32, as massquant's quantizers compute, cast back to x's dtype."""
    scale = torch.tensor(amax, dtype=torch.float32) / 127
    return ((x.float() / scale).round().clamp(-128, 127) * scale).to(x.dtype)


def test_per_tensor_activation_scale_is_each_sequences_own_over_its_real_tokens():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x[0, 2] = 50.0  # a padding position of sequence 0 with a huge value
    x[1, 1, 2] = 9.0  # sequence 1's own outlier
    real = torch.tensor([[True, True, False], [True, True, True]])
    out = quantize_activation(x, parse_spec("a8-tensor").activations, real=real)
    assert torch.equal(out[0, :2], int8_by_hand(x[0, :2], float(x[0, :2].abs().max())))
    assert torch.equal(out[0, 2], x[0, 2])  # padding passes through, in no scale
    assert torch.equal(out[1], int8_by_hand(x[1], 9.0))
    # and sequence 0 alone gives the same numbers
    alone = quantize_activation(x[:1, :2], parse_spec("a8-tensor").activations)
    assert torch.equal(alone[0], out[0, :2])


def test_per_tensor_kv_scale_is_per_sequence_and_skips_padding():
    torch.manual_seed(1)
    keys = torch.randn(2, 2, 4, 3, dtype=torch.float64)  # [batch, heads, tokens, head_dim]
    keys[1, :, 0] = 100.0  # left padding of sequence 1
    real = torch.tensor([[True] * 4, [False, True, True, True]])
    out = quantize_kv(keys, parse_spec("kv8-tensor").kv_cache, real=real)
    assert torch.equal(out[0], int8_by_hand(keys[0], float(keys[0].abs().max())))
    assert torch.equal(out[1, :, 1:], int8_by_hand(keys[1, :, 1:], float(keys[1, :, 1:].abs().max())))
    assert torch.equal(out[1, :, 0], keys[1, :, 0])


def test_nvfp4_tensor_scale_is_per_sequence():
    torch.manual_seed(2)
    x = torch.randn(3, 4, 32)
    x[2] *= 1000  # a loud sequence must not change the others' fp32 tensor scale
    part = parse_spec("anvfp4").activations
    batched = quantize_activation(x, part)
    for index in range(3):
        assert torch.equal(batched[index], quantize_activation(x[index : index + 1], part)[0])


def test_keep_rule_median_is_each_sequences_own():
    x = torch.ones(2, 4, 8)
    x[1] *= 10  # sequence 1's median is 10, sequence 0's is 1
    x[0, 0, 3] = 50.0
    x[1, 0, 3] = 50.0
    mask = keep_mask(x, KeepRule(abs_threshold=20, median_ratio=4))
    # 50 > max(20, 4 x 1) in sequence 0 and > max(20, 4 x 10) in sequence 1
    assert mask[0, 0, 3] and mask[1, 0, 3] and int(mask.sum()) == 2
    mask = keep_mask(x, KeepRule(abs_threshold=20, median_ratio=6))
    # 6 x 10 = 60 > 50 in sequence 1 only; one median pooled over the batch (10) would keep neither
    assert mask[0, 0, 3] and not mask[1, 0, 3]
    padded = torch.cat([x[:1], torch.full((1, 4, 8), 1000.0)], dim=1)  # padding tokens would raise the median
    real = torch.tensor([[True] * 4 + [False] * 4])
    kept = keep_mask(padded, KeepRule(abs_threshold=20, median_ratio=6), real)
    assert kept[0, 0, 3] and int(kept.sum()) == 1  # padding is never kept either


# ---------------------------------------------------------------- a sequence alone vs padded in a batch


GRANULARITY_SPECS = [
    "w8a8", "w8a8-tensor", "a8-tensor", "a8-tensor-asym", "w4g32a8-tensor", "w8a8kv8", "kv8-tensor",
    "kv4-token", "kv4g8", "kv8-tensor-asym", "anvfp4", "amxfp4", "w8a8-static", "kv8-tensor-static",
]


@pytest.fixture(scope="module")
def tiny64(tiny_llama_dir):
    from massquant.models.loading import load_model

    loaded = load_model(model=tiny_llama_dir)
    loaded.model.double()
    return loaded


def _logits(model, ids, mask=None):
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("spec", GRANULARITY_SPECS)
def test_quantized_outputs_of_a_sequence_alone_equal_it_padded_in_a_batch(tiny64, spec):
    model, tokenizer = tiny64.model, tiny64.tokenizer
    ids = torch.tensor(tokenizer(TRAINING_TEXT, add_special_tokens=False).input_ids[:60])
    first, other = ids[:20], ids[20:60]
    calibration = ids[None, :40]
    with quantize_(model, spec, calibration):
        alone = _logits(model, first[None])
        pad = 7
        right = torch.stack([torch.cat([first, torch.full((20,), pad)]), other])
        right_mask = torch.stack([torch.cat([torch.ones(20), torch.zeros(20)]), torch.ones(40)]).long()
        left = torch.stack([torch.cat([torch.full((20,), pad), first]), other])
        left_mask = torch.stack([right_mask[0].flip(0), right_mask[1]])
        from_right = _logits(model, right, right_mask)[0, :20]
        from_left = _logits(model, left, left_mask)[0, 20:]
    assert (from_right - alone[0]).abs().max() <= 1e-9
    assert (from_left - alone[0]).abs().max() <= 1e-9


# ---------------------------------------------------------------- perplexity at every batch size


PERPLEXITY_VARIANTS = {
    "fp": Variant(),
    **{name: Variant(parse_spec(name)) for name in (
        "w8", "w8a8", "w8a8-tensor", "a8-tensor", "w8a8-static", "w8a8kv8", "kv4-token", "w4g32a8-tensor", "wnvfp4anvfp4",
    )},
    "w8a8-tensor keep": Variant(parse_spec("w8a8-tensor"), MassivePolicy("keep", "dynamic", MassiveCriteria(0.5, 4))),
    "w8a8-tensor suppress-mean": Variant(parse_spec("w8a8-tensor"), MassivePolicy("suppress-mean", "calibrated", MassiveCriteria(0.5, 4))),
    "w8a8-tensor clip": Variant(parse_spec("w8a8-tensor"), MassivePolicy("clip", "dynamic", MassiveCriteria(0.5, 4))),
}


@pytest.fixture(scope="module")
def tiny32(tiny_llama_dir):
    from massquant.models.loading import load_model

    return load_model(model=tiny_llama_dir)


def test_perplexity_is_bit_identical_at_every_batch_size(tiny32):
    windows = build_windows(tiny32.tokenizer, TRAINING_TEXT * 2, PerplexityConfig(seq_len=32, bos="auto"), 256)
    assert len(windows.input_ids) >= 8
    windows.input_ids = windows.input_ids[:8]
    windows.first_scored = windows.first_scored[:8]
    calibration = windows.input_ids[:4]
    for name, variant in PERPLEXITY_VARIANTS.items():
        rows = [evaluate_variant(tiny32, variant, windows, calibration, batch_size) for batch_size in (1, 3, 8)]
        assert rows[0]["ppl"] == rows[1]["ppl"] == rows[2]["ppl"], (name, [row["ppl"] for row in rows])
        assert math.isfinite(rows[0]["ppl"])
    kept = evaluate_variant(tiny32, PERPLEXITY_VARIANTS["w8a8-tensor keep"], windows, calibration, 8)
    assert kept["quantization"]["massive"]["kept_values"] > 0  # the policy really acted


def test_smollm2_per_tensor_w8a8_is_the_same_at_batch_sizes_1_and_4(smollm2, enwiki_text):
    """The issue's report: --batch-size 1 and 4 differed (62.21 vs 66.61 on its machine) on the same four
    256-token windows. The value itself depends on the CPU's kernels (64.54 on an AVX2 machine), so it is
    not pinned here; the windows' NLL sums must agree to the last bit."""
    windows = build_windows(smollm2.tokenizer, enwiki_text, PerplexityConfig(seq_len=256, max_tokens=1024), None)
    assert windows.input_ids.shape == (4, 256)
    with quantize_(smollm2.model, "w8a8-tensor"):
        one, four = (window_nll(smollm2.model, windows, size) for size in (1, 4))
        again = window_nll(smollm2.model, windows, 4)
    assert torch.equal(one, four) and torch.equal(four, again)
    unquantized = window_nll(smollm2.model, windows, 4)
    assert (one > unquantized * 1.1).all()  # per-tensor W8A8 really is in the forward


# ---------------------------------------------------------------- lm-eval: the tokens each policy feeds


class _Recorder:
    def __init__(self, model):
        self.calls: list[list[int]] = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append([row.tolist() for row in ids])


def _requests(kind: str, arguments: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=index) for index, args in enumerate(arguments)]


@pytest.mark.parametrize("policy", ["auto", "always", "never"])
def test_lm_eval_requests_reach_the_model_with_exactly_the_tokens_the_policy_names(tiny32, policy):
    from massquant.lmeval.hflm import InvariantHFLM

    tokenizer = tiny32.tokenizer
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    lm = InvariantHFLM(tiny32.model, tokenizer, policy, batch_size=4)
    text = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    first = [bos] if policy != "never" else []
    recorder = _Recorder(tiny32.model)
    try:
        lm.loglikelihood(_requests("loglikelihood", [("The quick brown", " fox"), ("", " lazy dog")]))
        lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [("Perplexity measures how well",)]))
        lm.generate_until(_requests("generate_until", [("The quick", {"until": ["\n"], "max_gen_toks": 2})]))
    finally:
        recorder.handle.remove()
    received = [row for call in recorder.calls for row in call]
    whole = text("The quick brown fox")
    context = first if policy != "never" else [eos]  # never: the empty context is EOS, never BOS
    expected_loglikelihood = [(first + whole)[:-1], (context + text(" lazy dog"))[:-1]]
    expected_rolling = ([bos] if policy != "never" else [eos]) + text("Perplexity measures how well")[:-1]
    assert sorted(received[:2]) == sorted(expected_loglikelihood)
    assert received[2] == expected_rolling
    assert received[3] == first + text("The quick")  # generation: the prompt, then one token per step
    assert len(received) == 5 and len(received[4]) == 1
    assert all(row.count(bos) == (0 if policy == "never" else 1) for row in received[:4])
    assert lm.bos_tokens == {
        "bos": policy, "bos_token_id": None if policy == "never" else bos,
        "prefix_token_id": eos if policy == "never" else bos, "requests_per_forward": 1,
    }


def test_rolling_loglikelihood_equals_the_perplexity_windows_nll(tiny32):
    """The issue's report: a rolling request scored [BOS, BOS, text...] (-144.9 instead of -121.1)."""
    from massquant.lmeval.hflm import InvariantHFLM

    tokenizer = tiny32.tokenizer
    text = "Massive activations appear on the first token and on delimiter tokens."
    lm = InvariantHFLM(tiny32.model, tokenizer, "auto", batch_size=1)
    (rolling,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]])
    with torch.inference_mode():
        direct = token_nll(tiny32.model(ids).logits[:, :-1].float(), ids[:, 1:]).double().sum()
    windows = build_windows(tokenizer, text, PerplexityConfig(seq_len=ids.shape[1], bos="auto"), 256)
    assert torch.equal(windows.input_ids, ids)
    assert rolling == pytest.approx(-float(window_nll(tiny32.model, windows)[0]), abs=1e-4)
    assert rolling == pytest.approx(-float(direct), abs=1e-4)


def test_bos_never_without_a_non_bos_context_token_is_refused(tiny32):
    from massquant.errors import UserError
    from massquant.lmeval.hflm import context_token

    tokenizer = tiny32.tokenizer
    assert context_token(tokenizer, "never", None) == tokenizer.eos_token_id
    with pytest.raises(UserError, match="bos=never cannot be honoured"):
        context_token(tokenizer, "never", tokenizer.bos_token_id)
    with pytest.raises(UserError, match="contradicts bos=auto"):
        context_token(tokenizer, "auto", tokenizer.eos_token_id)


def test_task_scores_under_per_tensor_w8a8_are_equal_at_task_batch_sizes_1_and_8(tiny_llama_dir):
    import lm_eval

    from massquant.evaluation.tasks import task_index
    from massquant.lmeval import MassquantLM
    from massquant.models.loading import load_model

    loaded = load_model(model=tiny_llama_dir)
    responses = {}
    for batch_size in (1, 8):
        lm = MassquantLM(pretrained=loaded, spec="w8a8-tensor", batch_size=batch_size)
        try:
            output = lm_eval.simple_evaluate(model=lm, tasks=["massquant_arc_easy"], limit=8, task_manager=task_index())
        finally:
            lm.restore()
        samples = sorted(output["samples"]["massquant_arc_easy"], key=lambda s: s["doc_id"])
        responses[batch_size] = [[resp[0] for resp in sample["filtered_resps"]] for sample in samples]
    assert len(responses[1]) == 8 and responses[1] == responses[8]
