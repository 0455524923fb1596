"""Gated attention (Qiu et al. 2025): a head-specific sigmoid gate on the attention output, before o_proj.

For each query token and head, ``g = sigmoid(x W + b)`` (x: the attention
module's input hidden state, W: [hidden, heads], b: [heads]) multiplies that
head's attention output. A head that wants to attend to nothing can close its
gate instead of parking its attention on a sink token, which removes the
pressure that creates massive activations.

Initialisation keeps the model's function exactly: W = 0 and b = ``bias``
(default 0) give g = sigmoid(bias) everywhere, and o_proj's input columns of
every head are divided by that constant, so o_proj(g * out) is the old
o_proj(out) at step 0 while the gate keeps a full sigmoid range (and a
gradient of sigmoid'(bias) = 0.25 at the default) to learn with.

The gate acts on the attention output inside massquant's attention hook
(``massquant.wrapping.attention``), not on o_proj: quantization may replace
o_proj and the gate stays. Parameters: ``<attention>.head_gate.score.weight``
and ``.bias`` (``model.layers.3.self_attn.head_gate.score.weight`` for LLaMA).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from massquant.errors import UserError
from massquant.mitigations import Mitigation
from massquant.models.architectures import architecture_of, decoder_layers
from massquant.wrapping.attention import attach_output_transform, attention_modules

MITIGATION = Mitigation(
    name="gated",
    kind="training",
    description="gated attention: head-specific sigmoid gate on the attention output before o_proj, exact at step 0",
    parameters={"bias": 0.0},
)
SUBMODULE = "head_gate"


class HeadGate(nn.Module):
    """Holds the gate's linear map; as an output transform it scales each head of the attention output."""

    def __init__(self, hidden_size: int, heads: int, bias: float, dtype=None, device=None):
        super().__init__()
        self.score = nn.Linear(hidden_size, heads, dtype=dtype, device=device)
        with torch.no_grad():
            self.score.weight.zero_()
            self.score.bias.fill_(bias)
        self._gates: torch.Tensor | None = None  # this forward's gates, from the attention's input

    def record_input(self, attention, args, kwargs) -> None:
        """Forward pre-hook of the attention module: compute the gates from its input hidden states."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._gates = torch.sigmoid(self.score(hidden))  # [batch, queries, heads]

    def forward(self, attention, output: torch.Tensor) -> torch.Tensor:
        """Output transform: ``output`` is [batch, queries, heads, head_dim]."""
        gates, self._gates = self._gates, None
        return output * gates[..., None].to(output.dtype)


def gate_output_columns(weight: torch.Tensor, heads: int, factor: float) -> None:
    """Scale every head's input columns of an o_proj weight [hidden, heads * head_dim] by ``factor``, in place."""
    weight.view(weight.shape[0], heads, -1).mul_(factor)


def check_params(params: dict) -> None:
    if not -10 <= params["bias"] <= 10:
        raise UserError(f"mitigation 'gated' needs -10 <= bias <= 10 (beyond, the sigmoid saturates and the gate cannot learn); got {params['bias']}")


@torch.no_grad()
def surgery(model, params: dict) -> None:
    check_params(params)
    arch = architecture_of(model)
    heads = model.config.num_attention_heads
    modules = attention_modules(model)
    out_projections = [layer.get_submodule(arch.out_proj) for layer in decoder_layers(model)] if arch.out_proj else []
    if not out_projections or not all(isinstance(projection, nn.Linear) for projection in out_projections):
        raise UserError(
            f"mitigation 'gated' needs each attention's output projection to be an nn.Linear; "
            f"'{model.config.model_type}' has {type(out_projections[0]).__name__ if out_projections else 'none listed'}"
        )
    compensation = 1 + math.exp(-params["bias"])  # 1 / sigmoid(bias), in plain floats (surgery may run on the meta device)
    for module, projection in zip(modules, out_projections):
        if hasattr(module, SUBMODULE):
            raise UserError("gated attention is already installed on this model; it cannot be applied twice")
        gate = HeadGate(model.config.hidden_size, heads, params["bias"], projection.weight.dtype, projection.weight.device)
        module.add_module(SUBMODULE, gate)
        module.register_forward_pre_hook(gate.record_input, with_kwargs=True)
        gate_output_columns(projection.weight, heads, compensation)
    attach_output_transform(model, modules, lambda _, module: getattr(module, SUBMODULE))
