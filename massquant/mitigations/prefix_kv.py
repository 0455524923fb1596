"""PrefixQuant (Chen et al. 2024): prefilled outlier tokens, kept in full precision in front of every sequence.

A few tokens (the first one, and frequent delimiters) carry the token-wise
outliers that set per-tensor scales. PrefixQuant finds the frequent ones on
calibration data, computes their keys and values once, in full precision, and
puts them in front of every sequence as a prefilled KV cache: the model no
longer needs to produce those outliers inside the sequence, and the prefix
itself never passes through a quantized layer.

Selection: per layer and calibration sequence, a token is an outlier when the
maximum |x| of its down-projection input exceeds ``threshold`` times the
median of those maxima over the sequence's tokens. The prefix is BOS (when
``bos``) then the ``count`` tokens most often outliers (position 0 excluded:
it is the sink whatever its token); ``count=-1`` takes as many as the layer
with the most outlier tokens has per sequence on average, rounded up. With
``residual=true``, the tokens that carry massive activations in the
residual stream after position 0 follow — those whose value would count in
the typical layer too (``phenomena.beyond_typical``), not Gemma 3's thousands
of ordinary tokens that pass only in its low-median first layers — most
frequent first: Gemma 3's second sink token (a lone space), which the
down-projection maxima miss. Off by default: on Gemma 3 the lone space is a
sink only in context (before a number), so prefixing it leaves the in-window
sink in place (max |a| unchanged) and per-tensor W8A8 got worse (+7.65 against
+6.01 with BOS alone, 1,024 enwiki tokens). Every row records the chosen
prefix (``mitigation_record``).

The prefix's keys and values are computed on the model as it is when the
mitigation is applied (before quantization), prepended after KV-cache
quantization, and the sequence's tokens move to positions p.. (p = prefix
length), exactly as if the prefix had been real tokens before them.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import torch
from tqdm.auto import tqdm

from massquant.errors import UserError
from massquant.massive.locate import locate
from massquant.massive.report import LocateConfig
from massquant.massive.phenomena import beyond_typical
from massquant.mitigations import Mitigation
from massquant.models.architectures import architecture_of, decoder_layers
from massquant.wrapping.attention import (
    PREPEND_STAGE,
    PrependedKeyValues,
    attach_kv_transform,
    attach_position_offset,
    attention_modules,
    capture_key_values,
)

MITIGATION = Mitigation(
    name="prefixkv",
    kind="post-hoc",
    description="PrefixQuant: BOS and frequent outlier tokens prefilled once in full precision, prepended to every sequence's KV",
    parameters={"threshold": 64.0, "count": -1, "bos": True, "residual": False},
    needs_calibration=True,
)


def check_params(params: dict) -> None:
    if not params["threshold"] > 1 or params["count"] < -1:
        raise UserError(
            f"prefixkv: threshold must be > 1 and count >= -1 (-1: automatic); got {params['threshold']}, {params['count']}"
        )


@torch.no_grad()
def token_maxima(model, calibration: torch.Tensor) -> torch.Tensor:
    """``[layers, sequences, tokens]``: max |x| over channels of each token's down-projection input."""
    path = architecture_of(model).down_proj
    layers = decoder_layers(model)
    maxima = torch.empty(len(layers), *calibration.shape)
    latest: list = [None] * len(layers)  # this forward's maxima, per layer

    def recorder(layer_index):
        def record(module, args):
            latest[layer_index] = args[0][0].abs().amax(dim=-1).float().cpu()

        return record

    hooks = [layer.get_submodule(path).register_forward_pre_hook(recorder(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for index, row in enumerate(tqdm(calibration, desc="finding outlier tokens", unit="seq", leave=False)):
            model(input_ids=row[None].to(device), use_cache=False)
            maxima[:, index] = torch.stack(latest)
    finally:
        for hook in hooks:
            hook.remove()
    return maxima


def outlier_positions(maxima: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean, shaped like ``maxima`` ``[..., tokens]``: the token's maximum over the median maximum of its sequence > threshold."""
    return maxima > threshold * maxima.median(dim=-1, keepdim=True).values


def choose_prefix_tokens(
    calibration: torch.Tensor, outliers: torch.Tensor, count: int, bos_token_id: int | None
) -> list[int]:
    """BOS (if given), then the ``count`` (-1: automatic) token ids most often outliers after position 0.

    ``outliers``: ``[layers, sequences, tokens]``. A position counts once if
    it is an outlier in any layer; ties go to the smaller token id.
    """
    later = outliers[:, :, 1:]
    if count < 0:
        per_sequence = later.sum(dim=-1).float().mean(dim=-1)  # [layers]
        count = math.ceil(float(per_sequence.max())) if len(per_sequence) else 0
    frequencies = Counter(calibration[:, 1:][later.any(dim=0)].tolist())
    frequencies.pop(bos_token_id, None)
    ranked = sorted(frequencies, key=lambda token: (-frequencies[token], token))
    return ([bos_token_id] if bos_token_id is not None else []) + ranked[:count]


def residual_sink_tokens(model, calibration: torch.Tensor) -> list[int]:
    """Token ids carrying robust massive residual activations after position 0 (Sun et al. criteria), most frequent first.

    ``calibration``: ``[sequences, tokens]``. Robust: above the typical layer's
    cutoff (``phenomena.beyond_typical``). Counted once per (sequence, position).
    """
    report = locate(model, calibration, LocateConfig(), progress=False)
    robust = beyond_typical(report.massive.sites, [layer.cutoff for layer in report.layers])
    carriers = {(site.sequence, site.position) for site in robust if site.position > 0}
    frequencies = Counter(int(calibration[sequence, position]) for sequence, position in carriers)
    return sorted(frequencies, key=lambda token: (-frequencies[token], token))


def prepend_prefix(model, prefix_ids: list[int]) -> Callable[[], None]:
    """Compute the prefix's keys/values once, in full precision, and put them in front of every sequence."""
    captured = capture_key_values(model, torch.tensor([prefix_ids]))
    prefixes = [PrependedKeyValues(key[0], value[0]) for key, value in captured]
    undo_transform = attach_kv_transform(model, attention_modules(model), lambda index, _: prefixes[index], PREPEND_STAGE)
    undo_offset = attach_position_offset(model, len(prefix_ids))

    def undo() -> None:
        undo_offset()
        undo_transform()

    return undo


def apply(loaded, params: dict, calibration: torch.Tensor | None) -> Callable[[], None]:
    check_params(params)
    if calibration is None:
        raise UserError("prefixkv needs calibration sequences to find the outlier tokens")
    bos = loaded.tokenizer.bos_token_id if params["bos"] else None
    if params["bos"] and bos is None:
        raise UserError("prefixkv bos=true: this tokenizer has no BOS token; use bos=false")
    outliers = outlier_positions(token_maxima(loaded.model, calibration), params["threshold"])
    prefix = choose_prefix_tokens(calibration, outliers, params["count"], bos)
    from_down_proj = prefix[1 if bos is not None else 0 :]
    from_residual = residual_sink_tokens(loaded.model, calibration) if params["residual"] else []
    prefix += [token for token in from_residual if token not in prefix]
    if not prefix:
        raise UserError(
            f"prefixkv found no outlier token above threshold {params['threshold']} and bos=false: nothing to prefix; "
            "lower threshold or set bos=true"
        )
    undo = prepend_prefix(loaded.model, prefix)
    text = loaded.tokenizer.decode
    undo.record = {
        "prefix_ids": prefix, "prefix_tokens": [text([token]) for token in prefix],
        "from_down_proj": [text([token]) for token in from_down_proj],
        "from_residual": [text([token]) for token in from_residual],
    }
    return undo
