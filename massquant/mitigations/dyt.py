"""Dynamic Tanh (Zhu et al. 2025): every residual-stream norm becomes ``weight * tanh(alpha * x) + bias``.

A norm divides each token by its own RMS, so one token with a massive value
is squashed as a whole; DyT squashes element by element with a learnable
scalar ``alpha`` and no per-token statistics. Replaced: each decoder layer's
input and post-attention norms and the final norm (the architecture table's
``input_norm``, ``post_attention_norm``, ``final_norm``).

Initialisation keeps the old norm's per-channel affine map (gain g, shift b,
read off the module with two probe inputs; weight 1 / bias 0 for a fresh
norm): ``weight = g``, ``bias = b``, so every output stays within
``|g| + |b|``, the range the norm gives an ordinary token. Without calibration
(and from scratch) ``alpha`` is the ``alpha`` parameter (0.5, the DyT paper's
default). With calibration sequences (``fit=true``) ``alpha`` is fitted per
norm so that ``g * tanh(alpha * x)`` matches the norm's own output minus b in
least squares: one forward pass of the original model feeds each norm's input
and output (``fit_tokens`` tokens per norm, a seeded sample spread over the
sequences) into running sums over a log grid of alphas, and the alpha with
the smallest residual wins. Only alpha is fitted: a free output scale or a
line per channel fits ordinary tokens better but extrapolates without bound
on the rare tokens that carry massive values (on SmolLM2 both sent the
residual stream past 1e8 within 13 layers). All norms are fitted on the
original model's activations in one pass (not layer by layer).

Parameters are named ``alpha``, ``weight``, ``bias`` (``gamma``/``beta``
would be renamed by transformers' legacy key mapping on load).
"""

from __future__ import annotations

import torch
from torch import nn

from massquant.errors import UserError
from massquant.mitigations import Mitigation
from massquant.models.passes import run_sequences
from massquant.models.architectures import architecture_of, decoder_layers

MITIGATION = Mitigation(
    name="dyt",
    kind="training",
    description="Dynamic Tanh: replace every norm by weight*tanh(alpha*x)+bias, alpha fitted on calibration activations",
    parameters={"alpha": 0.5, "fit": True, "fit_tokens": 512},
    needs_calibration=True,
)

ALPHA_GRID = torch.logspace(-4, 2, 97, dtype=torch.float64)  # 16 points per decade


class DynamicTanh(nn.Module):
    def __init__(self, hidden_size: int, alpha: float = 0.5, dtype=None, device=None):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha), dtype=dtype, device=device))
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}"


def norm_paths(model) -> list[str]:
    """Dotted paths (from the model) of every norm DyT replaces, each once."""
    arch = architecture_of(model)
    paths = [
        f"{arch.layers}.{index}.{name}"
        for index in range(len(decoder_layers(model)))
        for name in dict.fromkeys((arch.input_norm, arch.post_attention_norm))
    ]
    return paths + [arch.final_norm]


@torch.no_grad()
def probe_affine(norm: nn.Module, hidden_size: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (scale, shift) of a norm, from inputs +p and -p with p = (1, -1, 1, ...).

    p has mean 0 and RMS 1, so RMSNorm and LayerNorm both map it to
    scale * p + shift; the odd and even parts of the two outputs separate them.
    """
    probe = torch.ones(hidden_size, dtype=like.dtype, device=like.device)
    probe[1::2] = -1
    plus, minus = norm(probe[None]), norm(-probe[None])
    return ((plus - minus) / (2 * probe))[0], ((plus + minus) / 2)[0]


def fit_sums(x: torch.Tensor, target: torch.Tensor, gain: torch.Tensor, alphas: torch.Tensor, chunk: int = 16) -> dict[str, torch.Tensor]:
    """Running sums for the squared error of ``gain * tanh(alpha * x)`` against ``target``, per alpha.

    x, target: [tokens, channels]; gain: [channels]. Returns float64 sums:
    ``cross`` = sum(gain t target) and ``square`` = sum((gain t)^2) ([len(alphas)]),
    ``energy`` = sum(target^2); sums of several batches add. The tanh is taken
    in float32 (the cost), the sums in float64; alphas go ``chunk`` at a time
    so the [alphas, tokens, channels] tanh stays small.
    """
    x32, weighted_target, gain32 = x.float(), (gain * target).float(), gain.float()
    cross, square = [], []
    for group in alphas.float().split(chunk):
        t = torch.tanh(group[:, None, None] * x32[None])  # [chunk, tokens, channels]
        cross.append((t * weighted_target).sum((1, 2), dtype=torch.float64))
        square.append((t * t * gain32 * gain32).sum((1, 2), dtype=torch.float64))
    return {"cross": torch.cat(cross), "square": torch.cat(square), "energy": target.double().pow(2).sum()}


def add_sums(total: dict | None, batch: dict) -> dict:
    return batch if total is None else {key: total[key] + batch[key] for key in batch}


def solve_fit(sums: dict[str, torch.Tensor], alphas: torch.Tensor) -> tuple[float, float]:
    """(alpha, relative residual): the alpha whose error energy - 2 cross + square is smallest,
    the error relative to the target's energy."""
    errors = (sums["energy"] - 2 * sums["cross"] + sums["square"]).clamp_min(0)
    best = int(torch.argmin(errors))
    return float(alphas[best]), float(errors[best] / sums["energy"].clamp_min(1e-300))


@torch.no_grad()
def fit_norms(model, paths: list[str], affine: dict[str, tuple], calibration: torch.Tensor, tokens: int, seed: int = 0) -> dict[str, tuple]:
    """{path: (alpha, relative residual)} from one pass of the unchanged model over ``calibration``.

    ``affine``: each norm's (gain, shift). Each norm is fitted on ``tokens``
    of its inputs, drawn evenly from the sequences (a seeded random subset of
    each): the tanh over the alpha grid is the cost.
    """
    sums: dict[str, dict | None] = dict.fromkeys(paths)
    device = next(model.parameters()).device
    alphas = ALPHA_GRID.to(device)
    per_sequence = max(1, -(-tokens // len(calibration)))
    generator = torch.Generator().manual_seed(seed)
    rows = {"current": None}

    def recorder(path):
        gain, shift = affine[path]

        def hook(module, inputs, output):
            x, y = inputs[0].reshape(-1, inputs[0].shape[-1]), output.reshape(-1, output.shape[-1])
            picked = rows["current"]
            sums[path] = add_sums(sums[path], fit_sums(x[picked], y[picked] - shift, gain, alphas))

        return hook

    def pick(index: int, sequence: torch.Tensor) -> None:
        rows["current"] = torch.randperm(len(sequence), generator=generator)[:per_sequence].to(device)

    run_sequences(model, calibration, [(model.get_submodule(path), "forward", recorder(path)) for path in paths], "dyt fit", pick)
    return {path: solve_fit(sums[path], alphas) for path in paths}


def check_params(params: dict) -> None:
    if not params["alpha"] > 0 or params["fit_tokens"] < 1:
        raise UserError(f"mitigation 'dyt' needs alpha > 0 and fit_tokens >= 1; got alpha={params['alpha']}, fit_tokens={params['fit_tokens']}")


@torch.no_grad()
def surgery(model, params: dict, calibration: torch.Tensor | None = None) -> dict:
    """Replace the norms; fitted from ``calibration`` when given and ``fit`` is on. Returns the fit summary."""
    check_params(params)
    paths = norm_paths(model)
    hidden_size = model.config.hidden_size
    affine = {path: probe_affine(model.get_submodule(path), hidden_size, next(model.get_submodule(path).parameters())) for path in paths}
    fitted = fit_norms(model, paths, affine, calibration, params["fit_tokens"]) if calibration is not None and params["fit"] else {}
    for path in paths:
        like = next(model.get_submodule(path).parameters())
        alpha = fitted[path][0] if path in fitted else params["alpha"]
        new = DynamicTanh(hidden_size, alpha, dtype=like.dtype, device=like.device)
        new.weight.copy_(affine[path][0])
        new.bias.copy_(affine[path][1])
        model.set_submodule(path, new)
    if not fitted:
        return {"initialised": "alpha parameter, the norms' gain and shift"}
    return {
        "initialised": "alpha fitted on calibration activations, the norms' gain and shift",
        "alpha": {path: fit[0] for path, fit in fitted.items()},
        "relative_residual": {path: fit[1] for path, fit in fitted.items()},
    }
