"""QuaRot-style Hadamard rotation (Ashkboos et al. 2024) for RMSNorm models, without changing the function.

An RMSNorm with unit gain commutes with any orthogonal ``Q`` (``rms(xQ) = rms(x)``),
so once every norm's gain is folded into the linears that read it, the
residual stream can be rotated: embeddings and every reader's input by ``Q``,
every writer's output (o_proj, down_proj) by ``Q`` too. The massive channels
of the residual stream are then spread over all channels before q/k/v,
gate/up and the head read them. Two more rotations are exact on their own:

- values and o_proj's input, per head, by a Hadamard of the head size
  (attention mixes values linearly, so the rotation passes through);
- down_proj's input, online: a module rotates it before the linear, whose
  weight is rotated to match. The linear stays a child (``mlp.down_proj.linear``),
  so quantization wraps it and quantizes the rotated input.

Hadamard matrices of size ``n = 2^k * m`` are Kronecker products of a
Sylvester matrix (``2^k``) and a Paley matrix of order ``m`` (Paley I: ``m - 1`` a
prime = 3 mod 4; Paley II: ``m/2 - 1`` a prime = 1 mod 4), with the smallest
such ``m`` up to 256: 576 = 16 x 36 (Paley II, q = 17), 1536 = 128 x 12 (Paley I,
q = 11), 64 = Sylvester. When no such ``m`` exists (e.g. 11008 = 256 x 43), the
second factor is a seeded random orthogonal matrix of the odd part — still
exact, less even spreading. The residual rotation is randomized: random signs on
the rows of the Hadamard, from ``seed``.

``rotation`` picks the residual-stream rotation (QuaRot's R1, the one DFRot,
Xiang & Zhang 2024, compares): ``hadamard`` (the randomized Hadamard above),
``orthogonal`` (a seeded Haar-random orthogonal matrix, QR of a Gaussian with
the signs of R's diagonal folded in) or ``identity`` (norms folded, nothing
rotated). The per-head and online down_proj rotations stay Hadamard
(``values=false``, ``down_proj=false`` turn them off).
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from functools import cache
from typing import Callable

import scipy.linalg
import torch
from torch import nn
from tqdm.auto import tqdm

from massquant.errors import UserError
from massquant.mitigations import Mitigation
from massquant.mitigations.folding import (
    Edits, RowMap, as_float64, linear_at, norm_gain, rmsnorm_architecture, rotate_inputs, rotate_outputs, scale_inputs,
    set_norm_gain, untie_output_embeddings,
)
from massquant.models.architectures import decoder_layers

MITIGATION = Mitigation(
    name="hadamard",
    kind="post-hoc",
    description="QuaRot-style rotation: norms folded, residual stream rotated by a randomized Hadamard, online Hadamard before down_proj",
    parameters={"seed": 0, "down_proj": True, "values": True, "rotation": "hadamard"},
    requires=("rmsnorm", "no-branch-output-norms", "separate-qkv"),
    needs_calibration=False,
)


ROTATION_KINDS = ("hadamard", "orthogonal", "identity")


def sylvester(order: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of a power-of-two order (Sylvester's construction, ``scipy.linalg.hadamard``)."""
    return torch.from_numpy(scipy.linalg.hadamard(order, dtype="float64"))


# scipy builds only Sylvester (power-of-two) orders; the Paley factors of the other orders are built here.


def _is_prime(number: int) -> bool:
    return number >= 2 and all(number % divisor for divisor in range(2, int(number**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = quadratic character of (j - i) mod q: 1 for non-zero squares, -1 for non-squares, 0 on the diagonal."""
    squares = {(x * x) % q for x in range(1, q)}
    character = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return character[(index[None, :] - index[:, None]) % q]


def paley(order: int) -> torch.Tensor | None:
    """The ±1 Hadamard matrix of ``order`` from a Paley construction over a prime field, or None."""
    if _is_prime(order - 1) and (order - 1) % 4 == 3:  # Paley I: I + [[0, 1^T], [-1, Q]], Q antisymmetric
        q = order - 1
        skew = torch.zeros(order, order, dtype=torch.float64)
        skew[0, 1:], skew[1:, 0], skew[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(order, dtype=torch.float64) + skew
    if order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:  # Paley II, Q symmetric
        q = order // 2 - 1
        conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        conference[0, 1:], conference[1:, 0], conference[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        on_entries = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        on_zeros = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)  # the conference matrix's zero diagonal
        return torch.kron(conference, on_entries) + torch.kron(torch.eye(q + 1, dtype=torch.float64), on_zeros)
    return None


# The Paley factor is applied as a dense m x m product per row (online, per token): larger orders cost more
# than they spread, so beyond this the odd part gets a random orthogonal factor instead.
MAX_PALEY_ORDER = 256


@cache
def hadamard_factors(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal (left, right) with left ⊗ right = H_size / sqrt(size): Sylvester ⊗ Paley (see the module doc).

    ``seed`` only matters for sizes without a Paley factor, whose odd part becomes a random orthogonal matrix.
    """
    power = (size & -size).bit_length() - 1
    odd = size >> power
    for shift in range(power + 1):
        order = odd << shift
        if order > MAX_PALEY_ORDER:
            break
        small = torch.ones(1, 1, dtype=torch.float64) if order == 1 else paley(order)
        if small is not None:
            left = sylvester(size // order)
            return left / left.shape[0] ** 0.5, small / order**0.5
    generator = torch.Generator().manual_seed(seed)
    random_orthogonal, _ = torch.linalg.qr(torch.randn(odd, odd, generator=generator, dtype=torch.float64))
    left = sylvester(1 << power)
    return left / left.shape[0] ** 0.5, random_orthogonal


def hadamard_transform(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x @ kron(left, right)`` over the last dimension, as ``left^T X right`` with X = x viewed [len(left), len(right)]."""
    a, b = left.shape[0], right.shape[0]
    # two plain 2-D products (batched small matmuls are far slower on CPU)
    times_right = (x.reshape(-1, b) @ right).reshape(-1, a, b)
    transposed = (times_right.transpose(-1, -2).reshape(-1, a) @ left).reshape(-1, b, a)
    return transposed.transpose(-1, -2).reshape(x.shape)


@dataclass(frozen=True)
class Rotation:
    """``x -> (x * signs) @ kron(left, right)`` on the last dimension, never forming the n x n matrix."""

    left: torch.Tensor
    right: torch.Tensor
    signs: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x * self.signs, self.left, self.right)

    def to(self, device: torch.device) -> "Rotation":
        return Rotation(*(tensor.to(device) for tensor in (self.left, self.right, self.signs)))


def randomized_hadamard(size: int, seed: int) -> Rotation:
    """``diag(±1) H / sqrt(size)`` with seeded random signs (float64)."""
    left, right = hadamard_factors(size, seed)
    signs = torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    return Rotation(left, right, signs)


def random_orthogonal(size: int, seed: int) -> Rotation:
    """A seeded Haar-random orthogonal matrix (float64): Q of the QR of a Gaussian, columns signed by diag(R)."""
    gaussian = torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    unit = torch.ones(1, 1, dtype=torch.float64)
    return Rotation(unit, q * torch.sign(torch.diagonal(r)), torch.ones(size, dtype=torch.float64))


def identity_rotation(size: int, seed: int) -> Rotation:
    """The identity as a Rotation: folding without rotating (the baseline of the rotation kinds)."""
    unit = torch.ones(1, 1, dtype=torch.float64)
    return Rotation(unit, torch.eye(size, dtype=torch.float64), torch.ones(size, dtype=torch.float64))


def residual_rotation(kind: str, size: int, seed: int) -> Rotation:
    """The residual-stream rotation of ``kind`` (``ROTATION_KINDS``); an unknown kind is a UserError."""
    builders = {"hadamard": randomized_hadamard, "orthogonal": random_orthogonal, "identity": identity_rotation}
    if kind not in builders:
        raise UserError(f"hadamard: unknown rotation '{kind}'; accepted: {', '.join(ROTATION_KINDS)}")
    return builders[kind](size, seed)


def plain_hadamard(size: int, seed: int) -> Rotation:
    """``H / sqrt(size)`` without signs: the per-head and the online rotations."""
    left, right = hadamard_factors(size, seed)
    return Rotation(left, right, torch.ones(size, dtype=torch.float64))


class HadamardInput(nn.Module):
    """Rotates its input by ``kron(left, right)`` and runs ``linear``, whose weight was rotated to match."""

    def __init__(self, linear: nn.Linear, left: torch.Tensor, right: torch.Tensor):
        super().__init__()
        self.linear = linear
        # not persistent: the state dict keeps only the linear's (rotated) weights
        self.register_buffer("left", left.to(linear.weight, copy=True), persistent=False)
        self.register_buffer("right", right.to(linear.weight, copy=True), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(hadamard_transform(x, self.left.to(x.dtype), self.right.to(x.dtype)))

    def extra_repr(self) -> str:
        return f"hadamard={self.left.shape[0]}x{self.right.shape[0]}"


def _set_linear(linear: nn.Linear, edits: Edits, weight: Callable, bias: Callable) -> None:
    """Replace the weight (and bias, if any) by ``weight(W)`` / ``bias(b)``, computed in float64 and rounded once."""
    edits.set_tensor(linear, "weight", weight(as_float64(linear.weight)))
    if linear.bias is not None:
        edits.set_tensor(linear, "bias", bias(as_float64(linear.bias)))


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _fold_and_rotate_readers(norm: nn.Module, readers: dict[nn.Linear, RowMap], rotation: Rotation, edits: Edits) -> None:
    """Move the norm's gain into its readers' input channels and rotate their inputs; the norm becomes unit gain.

    ``readers`` maps each linear to a rotation of its outputs (a row map, applied to W^T and to the bias).
    """
    gain = norm_gain(norm)
    for linear, rotate_rows in readers.items():
        _set_linear(linear, edits, lambda w: rotate_outputs(rotate_inputs(scale_inputs(w, gain), rotation), rotate_rows), rotate_rows)
    set_norm_gain(norm, torch.ones_like(gain), edits)


def _rotate_layer(layer: nn.Module, architecture, rotation: Rotation, params: dict, edits: Edits) -> None:
    name = MITIGATION.name
    query, key, value = (linear_at(layer, path, name) for path in (architecture.query, architecture.key, architecture.value))
    out_proj = linear_at(layer, architecture.out_proj, name)
    down_proj = linear_at(layer, architecture.down_proj, name)
    up_projs = [linear_at(layer, path, name) for path in architecture.up_proj]

    per_head: RowMap = _unchanged
    if params["values"]:  # values (outputs of v_proj) and o_proj's input, head by head
        head_dim = layer.get_submodule(architecture.attention).head_dim
        head_rotation = plain_hadamard(head_dim, params["seed"]).to(rotation.signs.device)
        per_head = functools.partial(_per_head, head_rotation, head_dim)

    _fold_and_rotate_readers(
        layer.get_submodule(architecture.input_norm), {query: _unchanged, key: _unchanged, value: per_head}, rotation, edits
    )
    _fold_and_rotate_readers(
        layer.get_submodule(architecture.post_attention_norm), dict.fromkeys(up_projs, _unchanged), rotation, edits
    )
    _set_linear(out_proj, edits, lambda w: rotate_outputs(rotate_inputs(w, per_head), rotation), rotation)
    if not params["down_proj"]:
        _set_linear(down_proj, edits, lambda w: rotate_outputs(w, rotation), rotation)
        return
    online = plain_hadamard(down_proj.in_features, params["seed"]).to(rotation.signs.device)
    _set_linear(down_proj, edits, lambda w: rotate_inputs(rotate_outputs(w, rotation), online), rotation)
    parent_path, _, attribute = architecture.down_proj.rpartition(".")
    edits.set(layer.get_submodule(parent_path), attribute, HadamardInput(down_proj, online.left, online.right))


def _per_head(head_rotation, head_dim: int, x: torch.Tensor) -> torch.Tensor:
    """Rotate each head's ``head_dim`` channels of ``x`` [..., heads * head_dim]."""
    return head_rotation(x.unflatten(-1, (-1, head_dim))).flatten(-2)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def apply(loaded, params: dict, calibration: torch.Tensor | None = None) -> Callable[[], None]:
    """Rotate ``loaded.model`` in place; returns the undo that restores every original weight and module."""
    model = loaded.model
    if params["rotation"] not in ROTATION_KINDS:
        raise UserError(f"hadamard: unknown rotation '{params['rotation']}'; accepted: {', '.join(ROTATION_KINDS)}")
    architecture = rmsnorm_architecture(model, MITIGATION.name)
    edits = Edits()
    try:
        untie_output_embeddings(model, edits)
        embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
        rotation = residual_rotation(params["rotation"], embeddings.weight.shape[1], params["seed"]).to(embeddings.weight.device)
        edits.set_tensor(embeddings, "weight", rotate_inputs(as_float64(embeddings.weight), rotation))  # rows are residual vectors
        for layer in tqdm(decoder_layers(model), desc="hadamard rotation", unit="layer", leave=False):
            _rotate_layer(layer, architecture, rotation.to(_device(layer)), params, edits)
        _fold_and_rotate_readers(model.get_submodule(architecture.final_norm), {head: _unchanged}, rotation.to(_device(head)), edits)
    except BaseException:
        edits.undo()
        raise
    return edits.undo

