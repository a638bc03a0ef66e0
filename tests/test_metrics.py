"""Diversity and FID metrics against independent computations."""

import itertools

import pytest
import torch

from lightning_nft.metrics import DiversityMetric, FrechetDistanceMetric, mean_pairwise_distance


def test_mean_pairwise_distance_matches_a_double_loop():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(12, 5, generator=g)
    pairs = [torch.linalg.norm(f[i] - f[j]) for i, j in itertools.combinations(range(12), 2)]
    torch.testing.assert_close(mean_pairwise_distance(f), torch.stack(pairs).mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        mean_pairwise_distance(f[:1])


def test_diversity_metric_accumulates_batches():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(40, 3, generator=g)
    m = DiversityMetric()
    m.update(f[:15])
    m.update(f[15:])
    torch.testing.assert_close(m.compute(), mean_pairwise_distance(f))
    # a collapsed set has zero diversity
    m.reset()
    m.update(torch.ones(10, 3))
    assert float(m.compute()) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    """FID(N(0, I), N(mu, I)) = |mu|^2; with 20k samples in 4-D the estimate is within 0.05."""
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    mu = torch.tensor([1.0, -0.5, 0.0, 0.5], dtype=torch.float64)
    gen = torch.randn(20000, 4, generator=g, dtype=torch.float64) + mu
    m = FrechetDistanceMetric(ref)
    m.update(gen[:7000])
    m.update(gen[7000:])
    assert float(m.compute()) == pytest.approx(float(mu @ mu), abs=0.05)
    same = FrechetDistanceMetric(ref)
    same.update(ref)
    assert abs(float(same.compute())) < 1e-6


def test_frechet_distance_needs_a_reference():
    m = FrechetDistanceMetric()
    m.update(torch.randn(10, 2))
    with pytest.raises(RuntimeError, match="reference"):
        m.compute()
