"""Rotation kinds of the hadamard mitigation and the per-class quantization error (massquant.analysis.rotations)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from massquant.analysis.rotations import ClassErrors, row_energies
from massquant.errors import UserError
from massquant.mitigations import MitigationChoice, apply_post_hoc, get_mitigation
from massquant.mitigations.hadamard import identity_rotation, random_orthogonal, residual_rotation, sylvester
from massquant.quantizers.spec import parse_spec
from massquant.quantizers.tensors import quantize_activation
from tests.conftest import run_cli


def test_sylvester_from_scipy_equals_the_recursive_construction():
    expected = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(6):
        expected = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), expected)
    assert torch.equal(sylvester(64), expected)
    assert torch.equal(sylvester(1), torch.ones(1, 1, dtype=torch.float64))


def test_random_orthogonal_is_orthogonal_seeded_and_not_a_signed_permutation():
    rotation = random_orthogonal(48, seed=3)
    matrix = rotation(torch.eye(48, dtype=torch.float64))
    assert torch.allclose(matrix @ matrix.T, torch.eye(48, dtype=torch.float64), atol=1e-12)
    assert torch.equal(matrix, random_orthogonal(48, seed=3)(torch.eye(48, dtype=torch.float64)))
    assert not torch.equal(matrix, random_orthogonal(48, seed=4)(torch.eye(48, dtype=torch.float64)))
    assert matrix.abs().max() < 0.9  # a dense rotation spreads every axis
    x = torch.randn(5, 48, dtype=torch.float64)
    assert torch.equal(identity_rotation(48, 0)(x), x)


def test_unknown_rotation_kind_is_refused():
    with pytest.raises(UserError, match="unknown rotation 'givens'; accepted: hadamard, orthogonal, identity"):
        residual_rotation("givens", 8, 0)


@pytest.mark.parametrize("kind", ["orthogonal", "identity"])
def test_every_rotation_kind_keeps_logits_and_undo_restores(tiny_llama_dir, kind):
    from massquant.models.loading import load_model

    loaded = load_model(model=tiny_llama_dir)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits
        state = {name: value.clone() for name, value in loaded.model.state_dict().items()}
        params = {**get_mitigation("hadamard").parameters, "rotation": kind, "seed": 1}
        undo = apply_post_hoc(loaded, [MitigationChoice("hadamard", params)], None)
        embedding = loaded.model.get_input_embeddings().weight.clone()
        rotated = loaded.model(input_ids=ids).logits
        undo()
        after = loaded.model(input_ids=ids).logits
    assert torch.allclose(rotated, before, atol=1e-4)
    assert torch.equal(after, before)
    assert all(torch.equal(value, state[name]) for name, value in loaded.model.state_dict().items())
    original = state["model.embed_tokens.weight"]
    # identity folds norms only: the embedding rows (residual vectors) are unchanged; orthogonal mixes them
    assert torch.allclose(embedding, original) == (kind == "identity")


def test_class_errors_match_a_hand_quantized_per_token_int4():
    x = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(0))
    x[0, 0, 3] = 500.0  # one massive value on the first token
    part = parse_spec("a4").activations
    signal, noise = row_energies(x, quantize_activation(x, part))
    scale = x[0].abs().amax(dim=-1, keepdim=True) / 7  # symmetric int4: levels -7..7 (7 = 2^(4-1) - 1)
    by_hand = (x[0] / scale).round().clamp(-7, 7) * scale
    expected_noise = (x[0].double() - by_hand.double()).square().sum(-1)
    assert torch.allclose(noise, expected_noise, rtol=1e-6, atol=1e-9)
    errors = ClassErrors()
    massive = torch.tensor([True, False, False, False, False, False])
    errors.add("q_proj", signal, noise, massive)
    errors.add("down_proj", signal, noise, massive)
    other_signal, other_noise = 2 * float(x[0, 1:].double().square().sum()), 2 * float(expected_noise[1:].sum())
    assert errors.sqnr("other") == pytest.approx(10 * math.log10(other_signal / other_noise), rel=1e-6)
    assert errors.sqnr("massive", "q_proj") == pytest.approx(
        10 * math.log10(float(x[0, 0].double().square().sum()) / float(expected_noise[0])), rel=1e-6)
    assert errors.as_dict()["rows"] == {"massive": 2, "other": 10}  # tokens x linear inputs


def test_cli_rotations_rows_equal_eval_with_that_rotation(tiny_llama_dir, tiny_text_file, tmp_path):
    common = ["--model", tiny_llama_dir, "--data", tiny_text_file, "--seq-len", "48", "--max-tokens", "144"]
    completed = run_cli("analyze", "rotations", *common, "--spec", "w8a8,w4g32", "--seeds", "0,1", "--out", tmp_path / "r")
    assert completed.returncode == 0, completed.stderr
    payload = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [row["rotation"] for row in payload["rows"]] == [
        "none (unrotated)", "hadamard seed 0", "hadamard seed 1", "orthogonal seed 0", "orthogonal seed 1", "identity"]
    assert [entry["seeds"] for entry in payload["summary"]] == [1, 2, 2, 1]
    evaluated = run_cli("eval", *common, "--spec", "w8a8", "--mitigation", "hadamard:rotation=orthogonal,seed=1", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    rows = json.loads(evaluated.stdout)["rows"]
    quantized = next(row for row in rows if row["spec"] == "w8a8")
    assert payload["rows"][4]["ppl"]["w8a8"] == pytest.approx(quantized["ppl"], rel=1e-12)
    assert all(math.isfinite(row["errors"]["sqnr_db"]["other"]) for row in payload["rows"])
    unrotated = run_cli("eval", *common, "--spec", "w8a8", "--json")
    assert payload["rows"][0]["ppl"]["w8a8"] == pytest.approx(json.loads(unrotated.stdout)["rows"][1]["ppl"], rel=1e-12)
    assert (tmp_path / "r" / "rotations.png").stat().st_size > 0


def test_cli_rotations_refuses_unknown_kind_and_seeds(tiny_llama_dir):
    completed = run_cli("analyze", "rotations", "--model", tiny_llama_dir, "--kinds", "hadamard,givens")
    assert completed.returncode == 2 and "givens" in completed.stderr and "Traceback" not in completed.stderr
