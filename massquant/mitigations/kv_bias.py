"""Explicit attention sink (Sun et al. 2024, "Massive Activations in Large Language Models", §5).

Per layer and key/value head, one key k′ and value v′ sit in front of every
sequence's keys and values (the attention mask gains one visible column), so
attention can park on them instead of on the first token, whose massive
activation then has no job left and can be suppressed (``--massive``).

Position: the bias is a virtual token at position 0; real tokens move to
positions 1.. . RoPE at position 0 is the identity, so k′ is a plain key. The
first token of a causal sequence sees only itself, so its keys and values are
a constant of the model: initialised from them (``init=sink``, the default,
with BOS-first calibration), the model on a sequence *without* that token
computes exactly what it computed on the sequence with it.

The bias is prepended after KV-cache quantization (``PREPEND_STAGE``): it stays
in full precision whatever the spec.

Parameters (stable names, for checkpoints of ``massquant train``):
``<attention module>.kv_bias.key`` and ``.kv_bias.value``, each
``[num_key_value_heads, 1, head_dim]``; e.g. ``model.layers.3.self_attn.kv_bias.key``
for LLaMA. ``surgery`` adds them as trainable parameters (in ``state_dict``,
saved by ``save_pretrained``); re-apply ``surgery`` to a freshly loaded base
model before loading such a checkpoint's weights.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from massquant.errors import UserError
from massquant.models.loss import token_nll
from massquant.mitigations import Mitigation
from massquant.wrapping.attention import (
    PREPEND_STAGE,
    PrependedKeyValues,
    attach_kv_transform,
    attach_position_offset,
    attention_modules,
    capture_key_values,
)

MITIGATION = Mitigation(
    name="kvbias",
    kind="post-hoc",
    description="explicit attention sink: a full-precision key/value per layer and head in front of every sequence (Sun et al. 2024)",
    parameters={"init": "sink", "fit_steps": 0, "lr": 1e-3},
    needs_calibration=True,
)
INITS = {
    "sink": "mean key/value of the calibration sequences' first token (BOS when windows start with it); surgery: BOS",
    "bos": "the BOS token's own key/value at position 0",
    "zero": "k′ = v′ = 0 (softmax with one extra zero logit)",
}
SUBMODULE = "kv_bias"  # the attention module's child holding .key and .value


def check_params(params: dict) -> None:
    if params["init"] not in INITS:
        raise UserError(f"kvbias: unknown init '{params['init']}'; accepted: {', '.join(INITS)}")
    if params["fit_steps"] < 0 or not params["lr"] > 0:
        raise UserError(f"kvbias: fit_steps must be >= 0 and lr > 0; got {params['fit_steps']}, {params['lr']}")


def first_token_key_values(model, first_tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the mean key/value ``[kv_heads, 1, head_dim]`` of these tokens when each is a sequence's first token.

    A first token attends only to itself, so one single-token forward per
    distinct token gives exactly what it has in any sequence it starts.
    """
    distinct, counts = first_tokens.unique(return_counts=True)
    weights = (counts.float() / counts.sum())[:, None, None, None]
    captured = capture_key_values(model, distinct[:, None])
    return [((key * weights.to(key)).sum(0), (value * weights.to(value)).sum(0)) for key, value in captured]


def _bos_token(model, tokenizer=None) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    bos = bos if bos is not None else model.config.bos_token_id
    if bos is None:
        raise UserError("kvbias init=bos (or sink without calibration) needs a BOS token and this model has none; use init=zero")
    return int(bos)


def initial_key_values(
    model, init: str, calibration: torch.Tensor | None = None, tokenizer=None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, k′ and v′ ``[kv_heads, 1, head_dim]`` as ``init`` says (``sink`` without calibration: BOS)."""
    if init == "zero":  # any token: only the shapes are used
        key_values = first_token_key_values(model, torch.zeros(1, dtype=torch.long))
        return [(torch.zeros_like(key), torch.zeros_like(value)) for key, value in key_values]
    if init == "sink" and calibration is not None:
        return first_token_key_values(model, calibration[:, 0])
    return first_token_key_values(model, torch.tensor([_bos_token(model, tokenizer)]))


def install(model, key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """Add ``kv_bias`` (trainable parameters) to every attention module, prepend it, shift positions by one."""
    modules = attention_modules(model)
    if any(hasattr(module, SUBMODULE) for module in modules):
        raise UserError("kvbias is already installed on this model; it cannot be applied twice")
    for module, (key, value) in zip(modules, key_values):
        module.add_module(SUBMODULE, PrependedKeyValues(key, value, trainable=True))
    undo_transform = attach_kv_transform(model, modules, lambda _, module: getattr(module, SUBMODULE), PREPEND_STAGE)
    undo_offset = attach_position_offset(model, 1)

    def undo() -> None:
        undo_offset()
        undo_transform()
        for module in modules:
            delattr(module, SUBMODULE)

    return undo


def biases(model) -> list[PrependedKeyValues]:
    return [getattr(module, SUBMODULE) for module in attention_modules(model)]


def fit(model, calibration: torch.Tensor, steps: int, lr: float) -> list[float]:
    """Adam on k′, v′ only (the model frozen): next-token loss over the calibration sequences, one per step, cycling.

    Returns the loss of each step.
    """
    trainable = [p for bias in biases(model) for p in bias.parameters()]
    trainable_ids = {id(p) for p in trainable}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trainable_ids]
    for parameter in frozen:
        parameter.requires_grad_(False)
    optimizer = torch.optim.Adam(trainable, lr=lr)
    device = next(model.parameters()).device
    losses = []
    try:
        with torch.enable_grad():
            for step in tqdm(range(steps), desc="fitting kvbias", unit="step", leave=False):
                row = calibration[step % len(calibration)][None].to(device)
                logits = model(input_ids=row, use_cache=False).logits[:, :-1].float()
                loss = token_nll(logits, row[:, 1:]).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    return losses


def apply(loaded, params: dict, calibration: torch.Tensor | None) -> Callable[[], None]:
    check_params(params)
    if params["fit_steps"] and calibration is None:
        raise UserError("kvbias fit_steps > 0 needs calibration sequences")
    model = loaded.model
    undo = install(model, initial_key_values(model, params["init"], calibration, loaded.tokenizer))
    try:
        if params["fit_steps"]:
            fit(model, calibration, params["fit_steps"], params["lr"])
        for bias in biases(model):
            bias.requires_grad_(False)  # evaluation needs no gradients for them
    except BaseException:
        undo()
        raise
    return undo


def surgery(model, params: dict) -> None:
    """Training-time: the same trainable k′, v′, installed for good (no calibration: ``sink`` means BOS).

    On the meta device (a ``massquant train`` checkpoint rebuilt inside
    ``from_pretrained``, whose saved k′/v′ load next) only shapes matter and no forward can run.
    """
    check_params(params)
    if next(model.parameters()).is_meta:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (config.num_key_value_heads, 1, head_dim)
        install(model, [(torch.zeros(shape, device="meta"),) * 2 for _ in attention_modules(model)])
        return
    install(model, initial_key_values(model, params["init"]))
