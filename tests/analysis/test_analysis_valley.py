"""Compression valley: matrix entropies per layer and their correlation with the first token's norm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from massquant.analysis.valley import compression_valley, layer_correlation, matrix_entropies
from massquant.massive.locate import locate
from massquant.massive.report import LocateConfig
from massquant.massive.statistics import gram_entropy


def _entropies_by_numpy(x: np.ndarray) -> tuple[float, float]:
    eigenvalues = np.clip(np.linalg.eigvalsh(x @ x.T), 0, None)  # always the tokens' Gram matrix
    p = eigenvalues / eigenvalues.sum()
    p = p[p > 1e-300]
    return float(-(p * np.log(p)).sum()), float(-np.log((p**2).sum()))


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])
def test_matrix_entropies_match_numpy_and_locate(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    von_neumann, renyi2 = matrix_entropies(x)
    expected = _entropies_by_numpy(x.double().numpy())
    assert von_neumann == pytest.approx(expected[0], rel=1e-9)
    assert renyi2 == pytest.approx(expected[1], rel=1e-9)
    assert renyi2 == pytest.approx(gram_entropy(x.double()), rel=1e-9)
    assert renyi2 <= von_neumann + 1e-12  # Rényi entropies decrease with the order


def test_entropy_extremes_one_dominant_token_and_orthogonal_tokens():
    spread = torch.eye(8, 32)
    assert matrix_entropies(spread)[0] == pytest.approx(math.log(8), rel=1e-12)
    dominant = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    dominant[0] *= 1e4  # a massive first token: its direction holds nearly all the energy
    assert matrix_entropies(dominant)[0] < 1e-3


def test_correlation_equals_numpy_pearson_on_log_norm_and_rank_correlation():
    entropy = [3.0, 2.5, 0.4, 0.3, 0.5, 2.0]
    norms = [10.0, 12.0, 900.0, 1000.0, 800.0, 30.0]
    result = layer_correlation(entropy, norms)
    assert result["pearson"] == pytest.approx(np.corrcoef(entropy, np.log(norms))[0, 1], rel=1e-12)
    ranks_e, ranks_n = np.argsort(np.argsort(entropy)), np.argsort(np.argsort(norms))
    assert result["spearman"] == pytest.approx(np.corrcoef(ranks_e, ranks_n)[0, 1], rel=1e-12)


def test_valley_per_layer_matches_locate(tiny_llama_dir):
    from massquant.models.loading import load_model

    loaded = load_model(model=tiny_llama_dir)
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    result = compression_valley(loaded.model, ids)
    report = locate(loaded.model, ids, LocateConfig(entropy=True), progress=False)
    assert len(result["layers"]) == len(report.layers) == 2
    for row, stats in zip(result["layers"], report.layers):
        assert row["renyi2"] == pytest.approx(stats.entropy, rel=1e-5)
        assert row["first_token_norm"] == pytest.approx(stats.first_token_norm, rel=1e-5)
