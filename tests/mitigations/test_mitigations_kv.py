"""Explicit attention sink (kvbias) and prefixed full-precision KV (prefixkv): exact equivalences and masks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from massquant.data.calibration import calibration_batch
from massquant.data.text import load_text
from massquant.errors import UserError
from massquant.evaluation.perplexity import PerplexityConfig, build_windows
from massquant.models.loss import token_nll
from massquant.mitigations import kv_bias, prefix_kv
from massquant.models.loading import load_model
from massquant.quantizers.spec import parse_spec
from massquant.quantizers.tensors import quantize_kv
from massquant.wrapping.attention import (
    PREFIX,
    PREPEND_STAGE,
    PrependedKeyValues,
    attach_kv_transform,
    attention_modules,
)
from massquant.wrapping.quantize import quantize_
from tests.conftest import run_cli

KVBIAS = {"init": "bos", "fit_steps": 0, "lr": 1e-3}


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny(request, tiny_llama_dir):
    return load_model(model=tiny_llama_dir, attn_implementation=request.param)


def random_ids(loaded, shape, seed=0, low=3):
    return torch.randint(low, len(loaded.tokenizer), shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def with_bos(loaded, ids):
    return torch.cat([torch.full((len(ids), 1), loaded.tokenizer.bos_token_id), ids], dim=1)


# --- the attention hook against a manual computation ---------------------------------------------


def manual_attention(query, key, value, prefix_key, prefix_value, scaling, padding=None):
    """softmax(q·[k′; K]ᵀ) [v′; V] per head, causal over the sequence, the prefix visible to every query."""
    groups = query.shape[1] // key.shape[1]
    keys = torch.cat([prefix_key[None].expand(len(key), -1, -1, -1), key], 2).repeat_interleave(groups, 1)
    values = torch.cat([prefix_value[None].expand(len(value), -1, -1, -1), value], 2).repeat_interleave(groups, 1)
    tokens, prefix = query.shape[2], prefix_key.shape[1]
    allowed = torch.ones(tokens, tokens, dtype=torch.bool).tril()[None, None]
    if padding is not None:
        allowed = allowed & padding[:, None, None, :]
    allowed = allowed.expand(len(query), -1, -1, -1)
    allowed = torch.cat([torch.ones(*allowed.shape[:3], prefix, dtype=torch.bool), allowed], -1)
    scores = (query @ keys.transpose(2, 3) * scaling).masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ values).transpose(1, 2)


def test_prepended_positions_match_manual_attention_for_every_mask_form(tiny):
    """None (sdpa's implicit causal), boolean (sdpa) and additive float (eager) masks all gain visible prefix columns."""
    implementation = tiny.model.config._attn_implementation
    module = attention_modules(tiny.model)[0]
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(2, 4, 6, module.head_dim, generator=generator)
    key, value, prefix_key, prefix_value = (
        torch.randn(*shape, module.head_dim, generator=generator) for shape in ((2, 2, 6), (2, 2, 6), (2, 3), (2, 3))
    )
    padding = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & padding[:, None, None, :]
    masks = {
        "sdpa": [(None, None), (allowed, padding)],
        "eager": [(torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min), padding)],
    }[implementation]
    undo = attach_kv_transform(tiny.model, [module], lambda *_: PrependedKeyValues(prefix_key, prefix_value), PREPEND_STAGE)
    try:
        attention = ALL_ATTENTION_FUNCTIONS[PREFIX + implementation]
        for mask, pad in masks:
            output, _ = attention(module, query, key, value, mask, scaling=module.scaling, dropout=0.0)
            # with the prefix visible, even fully padded query rows are well defined: compare everything
            expected = manual_attention(query, key, value, prefix_key, prefix_value, module.scaling, pad)
            assert torch.allclose(output, expected, atol=1e-5), (implementation, mask is None)
    finally:
        undo()
    assert tiny.model.config._attn_implementation == implementation


# --- kvbias: exact equivalences ------------------------------------------------------------------


def test_kvbias_from_bos_equals_the_sequence_with_bos(tiny):
    """The BOS token's keys/values are a constant of the model: as k′, v′ at position 0 (real tokens at 1..),
    a sequence without BOS gives exactly the logits the model gives with BOS in front."""
    ids = random_ids(tiny, (2, 12))
    reference = logits(tiny.model, with_bos(tiny, ids))[:, 1:]
    plain = logits(tiny.model, ids)
    assert (plain - reference).abs().max() > 1e-2  # without the sink it is not the same computation
    undo = kv_bias.apply(tiny, KVBIAS, None)
    try:
        assert torch.allclose(logits(tiny.model, ids), reference, atol=2e-6)
        with torch.no_grad():  # with a KV cache: a chunk of several queries, then one token at a time
            cache = tiny.model(input_ids=ids[:, :5], use_cache=True).past_key_values
            chunk = tiny.model(input_ids=ids[:, 5:9], past_key_values=cache, use_cache=True).logits
            step = tiny.model(input_ids=ids[:, 9:10], past_key_values=cache, use_cache=True).logits
        assert torch.allclose(torch.cat([chunk, step], 1), reference[:, 5:10], atol=2e-6)
    finally:
        undo()
    assert not any(hasattr(m, kv_bias.SUBMODULE) for m in attention_modules(tiny.model))
    assert torch.equal(logits(tiny.model, ids), plain)


def test_kvbias_with_left_padding_and_explicit_positions(tiny):
    """A materialized padding mask gets the bias column too; explicit position_ids are shifted by one."""
    bos, pad = tiny.tokenizer.bos_token_id, tiny.tokenizer.eos_token_id
    first, second = random_ids(tiny, (12,), seed=3).tolist(), random_ids(tiny, (10,), seed=4).tolist()

    def batch(start: list[int]):  # row 1 is left-padded by two
        ids = torch.tensor([start + first, [pad, pad] + start + second])
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))

    with torch.no_grad():
        reference = tiny.model(**batch([bos])).logits
        undo = kv_bias.apply(tiny, KVBIAS, None)
        try:
            mitigated = tiny.model(**batch([])).logits
        finally:
            undo()
    assert torch.allclose(mitigated[0], reference[0, 1:], atol=2e-6)
    assert torch.allclose(mitigated[1, 2:], reference[1, 3:], atol=2e-6)


# --- prefixkv: exact equivalence, selection, and what quantization sees --------------------------


def test_prefix_kv_equals_running_the_prefix_as_real_tokens(tiny):
    prefix, ids = [tiny.tokenizer.bos_token_id, 7, 11], random_ids(tiny, (2, 10), seed=5)
    reference = logits(tiny.model, torch.cat([torch.tensor([prefix] * 2), ids], 1))[:, len(prefix):]
    undo = prefix_kv.prepend_prefix(tiny.model, prefix)
    try:
        assert torch.allclose(logits(tiny.model, ids), reference, atol=2e-6)
    finally:
        undo()


def test_kvbias_and_prefix_compose_positions_add_up(tiny):
    """kvbias first (virtual position 0), then a prefix computed on that model (positions 1..p): the sequence
    sits at 1+p.. and the whole equals BOS + prefix + sequence as real tokens."""
    prefix, ids = [7, 11], random_ids(tiny, (1, 9), seed=6)
    reference = logits(tiny.model, with_bos(tiny, torch.cat([torch.tensor([prefix]), ids], 1)))[:, 1 + len(prefix):]
    undo_bias = kv_bias.apply(tiny, KVBIAS, None)
    undo_prefix = prefix_kv.prepend_prefix(tiny.model, prefix)
    try:
        assert torch.allclose(logits(tiny.model, ids), reference, atol=2e-6)
    finally:
        undo_prefix(), undo_bias()


def test_outlier_selection_by_median_ratio_and_frequency():
    calibration = torch.tensor([[1, 5, 9, 5, 4, 6], [1, 9, 8, 5, 3, 2], [1, 8, 8, 8, 8, 8]])
    maxima = torch.ones(2, 3, 6)
    maxima[:, :, 0] = 500.0  # position 0: the sink, never counted as a prefix token
    maxima[0, 0, 1] = maxima[0, 0, 3] = 70.0  # token 5 twice in layer 0 of sequence 0
    maxima[1, 1, 3] = 65.0  # token 5 once more, in layer 1
    maxima[1, 1, 1] = 63.0  # token 9: under 64x the median (1)
    maxima[0, 2, 2] = maxima[1, 2, 2] = 100.0  # token 8: one position, outlier in both layers (counts once)
    outliers = prefix_kv.outlier_positions(maxima, 64.0)
    assert outliers.sum() == 3 * 2 + 5
    # layer 0 has 3 outliers after position 0 over 3 sequences, layer 1 has 2: ceil(3 / 3) = 1 token
    assert prefix_kv.choose_prefix_tokens(calibration, outliers, -1, bos_token_id=1) == [1, 5]
    assert prefix_kv.choose_prefix_tokens(calibration, outliers, 5, bos_token_id=None) == [5, 8]
    with pytest.raises(UserError, match="threshold"):
        prefix_kv.check_params({"threshold": 1.0, "count": -1, "bos": True})


def recorder(store: list):
    def record(module, key, value, attention_mask):
        store.append((key, value))
        return key, value, attention_mask

    return lambda index, module: record


def test_prefix_is_neither_kv_quantized_nor_seen_by_quantized_linears(tiny):
    """quantize_ attaches its KV quantizer after the prefix: stages keep the prefix out of the per-tensor scale."""
    prefix, ids = [tiny.tokenizer.bos_token_id, 7, 11], random_ids(tiny, (1, 10), seed=7)
    modules = attention_modules(tiny.model)
    fp_keys, entering = [], []
    undo_prefix = prefix_kv.prepend_prefix(tiny.model, prefix)
    undo_fp = attach_kv_transform(tiny.model, modules, recorder(fp_keys))
    handle = quantize_(tiny.model, "w8a8-tensorkv4-tensor")
    undo_seen = attach_kv_transform(tiny.model, modules, recorder(entering), PREPEND_STAGE + 1)  # what attention gets
    inputs = []
    hook = handle.linears["model.layers.0.self_attn.q_proj"].register_forward_pre_hook(lambda m, a: inputs.append(a[0].shape))
    try:
        logits(tiny.model, ids)
    finally:
        hook.remove(), undo_seen(), handle.undo(), undo_fp(), undo_prefix()
    part = parse_spec("kv4-tensor").kv_cache
    expected_prefix = prefix_kv.capture_key_values(tiny.model, torch.tensor([prefix]))
    for (key, value), (key_in, value_in), (prefix_key, prefix_value) in zip(fp_keys, entering, expected_prefix):
        assert torch.equal(key_in[:, :, :3], prefix_key) and torch.equal(value_in[:, :, :3], prefix_value)
        assert torch.equal(key_in[:, :, 3:], quantize_kv(key, part)) and torch.equal(value_in[:, :, 3:], quantize_kv(value, part))
    assert inputs == [torch.Size([1, 10, tiny.model.config.hidden_size])]


# --- kvbias: fit and training-time surgery -------------------------------------------------------


def test_kvbias_fit_moves_only_the_bias_and_lowers_the_loss(tiny):
    calibration = random_ids(tiny, (2, 16), seed=8)
    before = {name: p.clone() for name, p in tiny.model.named_parameters()}
    undo = kv_bias.install(tiny.model, kv_bias.initial_key_values(tiny.model, "zero"))
    try:
        losses = kv_bias.fit(tiny.model, calibration[:1], steps=6, lr=0.05)
        fitted = kv_bias.biases(tiny.model)[0].value.detach().clone()
    finally:
        undo()
    assert losses[-1] < losses[0] - 1e-3
    assert fitted.abs().max() > 0  # it moved from zero
    for name, parameter in tiny.model.named_parameters():
        assert torch.equal(parameter, before[name]) and parameter.requires_grad, name


def test_kvbias_surgery_is_a_trainable_saved_parameter(tiny_llama_dir, tmp_path):
    loaded = load_model(model=tiny_llama_dir)
    kv_bias.surgery(loaded.model, dict(kv_bias.MITIGATION.parameters))
    state = loaded.model.state_dict()
    key = state["model.layers.1.self_attn.kv_bias.key"]
    config = loaded.model.config
    assert key.shape == (config.num_key_value_heads, 1, config.hidden_size // config.num_attention_heads)
    ids = random_ids(loaded, (1, 8), seed=9)
    # surgery's sink is BOS: before training, the model without BOS is the model with it
    reference = logits(load_model(model=tiny_llama_dir).model, with_bos(loaded, ids))[:, 1:]
    assert torch.allclose(logits(loaded.model, ids), reference, atol=2e-6)
    loaded.model(input_ids=ids, labels=ids).loss.backward()
    bias = kv_bias.biases(loaded.model)[1]
    assert bias.key.requires_grad and bias.key.grad.abs().max() > 0 and bias.value.grad.abs().max() > 0
    with torch.no_grad():
        for bias in kv_bias.biases(loaded.model):
            bias.value.add_(0.5)  # "trained"
    trained = logits(loaded.model, ids)
    loaded.model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert torch.equal(saved["model.layers.1.self_attn.kv_bias.value"], kv_bias.biases(loaded.model)[1].value)
    reloaded = load_model(model=tiny_llama_dir)  # the colleague's path: base model, surgery, then the weights
    kv_bias.surgery(reloaded.model, dict(kv_bias.MITIGATION.parameters))
    reloaded.model.load_state_dict(saved)
    assert torch.equal(logits(reloaded.model, ids), trained)


# --- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_text_ids(smollm2, enwiki_text):
    return torch.tensor([smollm2.tokenizer(enwiki_text[:2000], add_special_tokens=False)["input_ids"][:32]])


def test_smollm2_sink_measured_on_calibration_replaces_bos(smollm2, smollm2_text_ids):
    calibration = calibration_batch(smollm2.tokenizer, "lee-news", 2, 16, bos=True)
    reference = logits(smollm2.model, with_bos(smollm2, smollm2_text_ids))[:, 1:]
    assert (logits(smollm2.model, smollm2_text_ids) - reference).abs().max() > 5
    undo = kv_bias.apply(smollm2, dict(kv_bias.MITIGATION.parameters), calibration)
    try:
        assert torch.allclose(logits(smollm2.model, smollm2_text_ids), reference, atol=5e-4)
    finally:
        undo()


def test_smollm2_prefix_takes_the_massive_activations_out_of_the_sequence(smollm2, smollm2_text_ids):
    """Without a prefix the sequence's first token carries SmolLM2's massive activations (|x| ~ 3000 at a
    down-projection input); with BOS prefilled in front, no token of the sequence is an outlier."""
    calibration = calibration_batch(smollm2.tokenizer, "lee-news", 2, 48, bos=True)

    def worst_ratio(maxima):
        return float((maxima / maxima.median(dim=-1, keepdim=True).values).max())

    plain = prefix_kv.token_maxima(smollm2.model, smollm2_text_ids)
    undo = prefix_kv.apply(smollm2, dict(prefix_kv.MITIGATION.parameters), calibration)
    try:
        prefixed = prefix_kv.token_maxima(smollm2.model, smollm2_text_ids)
    finally:
        undo()
    assert plain.max() > 1000 and worst_ratio(plain) > 1000
    assert prefixed.max() < 200 and worst_ratio(prefixed) < 64


# --- through the CLI -----------------------------------------------------------------------------


def test_eval_grid_with_kvbias_and_prefixkv(tiny_llama_dir, tiny_text_file):
    """Both mitigations with and without quantization specs; the kvbias row equals an independent
    computation: windows without BOS scored by the plain model with BOS put in front of each."""
    completed = run_cli(
        "eval", "--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", 32, "--max-tokens", 128,
        "--bos", "never", "--mitigation", "none,kvbias:init=bos,prefixkv:threshold=4", "--spec", "w8a8kv4",
        "--calib-samples", 2, "--calib-seq-len", 32, "--json",
    )
    assert completed.returncode == 0, completed.stderr
    rows = {row["config"]: row for row in json.loads(completed.stdout)["rows"]}
    mitigated = [f"{spec} mitigation={name}" for name in ("kvbias:init=bos", "prefixkv:threshold=4.0") for spec in ("fp", "w8a8kv4")]
    assert list(rows) == ["fp", "w8a8kv4", *mitigated]
    assert all(row["ppl"] > 1 and row["tokens"] == 4 * 31 for row in rows.values())

    loaded = load_model(model=tiny_llama_dir)
    windows = build_windows(loaded.tokenizer, load_text(tiny_text_file), PerplexityConfig(seq_len=32, max_tokens=128, bos="never"), None)
    scored = logits(loaded.model, with_bos(loaded, windows.input_ids))[:, 1:-1]
    expected = float(token_nll(scored, windows.input_ids[:, 1:]).double().mean().exp())
    assert rows["fp mitigation=kvbias:init=bos"]["ppl"] == pytest.approx(expected, rel=1e-5)
    assert rows["fp"]["ppl"] != pytest.approx(expected, rel=1e-3)

    # Outliers of each unquantized row: the largest |a| over the decoder layers' outputs (transformers' last
    # hidden state is after the final norm, so the last layer's output is the norm's input);
    # with the kvbias the tokens see BOS's key/value, as if BOS stood in front of them.
    def largest_hidden(ids, skip):
        final_inputs = []
        handle = loaded.model.model.norm.register_forward_pre_hook(lambda module, args: final_inputs.append(args[0]))
        with torch.no_grad():
            hidden = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states[1:-1]
        handle.remove()
        return max(float(h[:, skip:].abs().max()) for h in (*hidden, final_inputs[0]))

    assert rows["fp"]["outliers"]["max_abs"] == pytest.approx(largest_hidden(windows.input_ids, 0), rel=1e-5)
    assert rows["fp mitigation=kvbias:init=bos"]["outliers"]["max_abs"] == pytest.approx(
        largest_hidden(with_bos(loaded, windows.input_ids), 1), rel=1e-5
    )
    assert all("outliers" not in row for config, row in rows.items() if not config.startswith("fp"))
