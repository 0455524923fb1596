"""Target Variance Rescaling (Owen et al. 2025): keep the decoder's weight matrices at a target spread.

Every ``interval`` optimizer steps, each weight matrix of a decoder layer
whose standard deviation exceeds ``target x threshold`` is multiplied by
``target / std`` so its standard deviation is ``target`` again. Growing
weight variance is one source of extreme activations; capping it during
training keeps activations (and quantization ranges) small. Embeddings and
the output head are left alone, as in the paper. ``threshold=0`` rescales
every matrix at every interval (the paper's rule); the default 1 only pulls
back matrices that grew past the target.

The paper trains from scratch with ``target=0.01``. A pretrained model's
matrices are far wider (SmolLM2-135M: std 0.05-0.40, median ~0.19), so a
fine-tuning recipe sets ``target`` near the model's own spread.
"""

from __future__ import annotations

import torch

from massquant.errors import UserError
from massquant.mitigations import Mitigation
from massquant.models.architectures import decoder_layers

MITIGATION = Mitigation(
    name="tvr",
    kind="training",
    description="Target Variance Rescaling: every N steps, rescale layer weight matrices wider than target x threshold to the target std",
    parameters={"target": 0.01, "threshold": 1.0, "interval": 10},
)


def rescaled_to_target(weight: torch.Tensor, target: float, threshold: float) -> torch.Tensor | None:
    """``weight x target / std(weight)`` when std(weight) > target x threshold, else None (leave it)."""
    std = weight.float().std()
    if std == 0 or std <= target * threshold:  # an all-zero matrix (a fresh gate) has no spread to rescale
        return None
    return (weight.float() * (target / std)).to(weight.dtype)


def check_params(params: dict) -> None:
    if not params["target"] > 0 or not params["threshold"] >= 0 or params["interval"] < 1:
        raise UserError(
            f"mitigation 'tvr' needs target > 0, threshold >= 0 and interval >= 1; "
            f"got target={params['target']}, threshold={params['threshold']}, interval={params['interval']}"
        )


def layer_matrices(model) -> dict[str, torch.nn.Parameter]:
    """Every 2-D weight inside the decoder layers, by name."""
    return {
        f"{index}.{name}": parameter
        for index, layer in enumerate(decoder_layers(model))
        for name, parameter in layer.named_parameters()
        if parameter.ndim == 2
    }


def surgery(model, params: dict) -> None:
    """TVR adds no modules; the parameters are checked here, before training starts."""
    check_params(params)
    decoder_layers(model)  # an unsupported architecture fails now, not at step ``interval``


@torch.no_grad()
def on_step(model, params: dict, step: int) -> dict | None:
    if step % params["interval"]:
        return None
    rescaled = 0
    for weight in layer_matrices(model).values():
        new = rescaled_to_target(weight, params["target"], params["threshold"])
        if new is not None:
            weight.copy_(new)
            rescaled += 1
    return {"rescaled_matrices": rescaled}
