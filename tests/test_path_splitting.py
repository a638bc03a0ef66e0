"""Importance splitting of memoryless-SDE paths (``lightning_nft.path_splitting``).

* The split ensemble keeps the plain ensemble's expectations: over three random mixtures, the weighted means
  of ``X_1``, ``|X_1|^2`` and the component probabilities agree with those of an independent plain ensemble
  ten times larger, within 4.5 combined standard errors (the split ensemble's error is measured per root).
* Structure: the given paths come back unchanged first, every root's weights sum to 1, copies share their
  root's states up to the step where they branched, and the path count is capped by ``max_factor``.
* Bad settings are refused.
"""

from __future__ import annotations

import pytest
import torch

from lightning_nft.analytic import GaussianMixture
from lightning_nft.conditions import Conditions
from lightning_nft.path_splitting import split_paths
from lightning_nft.samplers import MemorylessNoise, SDESolver, time_grid


def _mixture(seed: int) -> GaussianMixture:
    """3-4 narrow components (std 0.3-0.4) on a ring of radius 2-2.5, random weights: the flow stretches
    tangents between the modes, so paths do split."""
    g = torch.Generator().manual_seed(seed)
    k = 3 + seed % 2
    angles = torch.arange(k) * (2 * torch.pi / k) + torch.rand((), generator=g)
    radius = 2.0 + 0.5 * torch.rand((), generator=g)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    weights = 0.5 + 1.5 * torch.rand(k, generator=g)
    return GaussianMixture(weights / weights.sum(), means, float(0.3 + 0.1 * torch.rand((), generator=g)))


def _functions(mixture: GaussianMixture, x1: torch.Tensor) -> torch.Tensor:
    """Per path: ``(x, |x|^2, one-hot component)``, ``(N, 3 + K)``."""
    labels = mixture.classify(x1)
    return torch.cat([x1, (x1 ** 2).sum(1, keepdim=True), torch.nn.functional.one_hot(labels, mixture.n_components)], 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_ensemble_keeps_the_plain_expectations(seed):
    mixture = _mixture(seed)
    solver, times = SDESolver(MemorylessNoise()), time_grid(40)
    g = torch.Generator().manual_seed(100 + seed)
    roots = 3000
    with torch.no_grad():
        traj = solver.sample(mixture, torch.randn(roots, 2, generator=g), times, generator=g,
                             return_trajectory=True).trajectory
    paths, weight, root = split_paths(mixture, mixture, solver, traj, times, split_at=2.0, generator=g)
    assert paths.shape[1] > 1.3 * roots  # the flow does stretch: many splits
    f = _functions(mixture, paths[-1])
    per_root = torch.zeros(roots, f.shape[1]).index_add_(0, root, weight[:, None] * f)  # sum_w f per root
    split_mean, split_se = per_root.mean(0), per_root.std(0) / roots ** 0.5
    with torch.no_grad():  # an independent plain ensemble, 10x larger
        plain = solver.sample(mixture, torch.randn(10 * roots, 2, generator=g), times, generator=g).samples
    fp = _functions(mixture, plain)
    plain_mean, plain_se = fp.mean(0), fp.std(0) / fp.shape[0] ** 0.5
    z = (split_mean - plain_mean) / (split_se ** 2 + plain_se ** 2).sqrt().clamp_min(1e-6)
    assert z.abs().max() < 4.5, (split_mean, plain_mean, z)


def test_structure_of_the_split_ensemble():
    mixture = _mixture(3)
    solver, times = SDESolver(MemorylessNoise()), time_grid(30)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        traj = solver.sample(mixture, torch.randn(400, 2, generator=g), times, generator=g,
                             return_trajectory=True).trajectory
    paths, weight, root = split_paths(mixture, mixture, solver, traj, times, split_at=2.0, generator=g)
    n = paths.shape[1]
    assert n > 400 and paths.shape == (31, n, 2) and weight.shape == root.shape == (n,)
    assert torch.equal(paths[:, :400], traj)  # the given paths, unchanged, first
    assert torch.equal(root[:400], torch.arange(400))
    sums = torch.zeros(400, dtype=weight.dtype).index_add_(0, root, weight)
    assert torch.allclose(sums, torch.ones(400), atol=1e-6)
    # weights are powers of 1/2; a copy equals its root up to its branching step, then differs
    assert torch.allclose(torch.log2(weight), torch.log2(weight).round())
    same = (paths[:, 400:] == traj[:, root[400:]]).all(-1)  # (T+1, copies)
    branch = same.float().argmin(0)  # the first differing state
    assert bool((branch >= 1).all()) and bool(same[0].all())
    assert bool((same.cumprod(0).sum(0) == branch).all())  # identical before, never again identical-by-prefix
    capped, _, _ = split_paths(mixture, mixture, solver, traj, times, split_at=2.0, max_factor=1, generator=g)
    assert capped.shape[1] == 400


def test_conditions_follow_their_roots_and_bad_settings_are_refused():
    mixture = _mixture(4)
    solver, times = SDESolver(MemorylessNoise()), time_grid(20)
    seen = []

    def velocity(x, t, cond):
        assert isinstance(cond, Conditions) and len(cond) == x.shape[0]
        seen.append(cond.tensors[:, 0].clone())
        return mixture(x, t) + 0.0 * cond.tensors  # the condition rides along; the field is the mixture's

    g = torch.Generator().manual_seed(3)
    cond = Conditions(torch.arange(200.0)[:, None], [{"prompt_id": i} for i in range(200)])
    with torch.no_grad():
        traj = solver.sample(velocity, torch.randn(200, 2, generator=g), times, cond, generator=g,
                             return_trajectory=True).trajectory
    seen.clear()
    paths, weight, root = split_paths(velocity, velocity, solver, traj, times, cond, generator=g)
    assert paths.shape[1] > 200 and seen  # copies were continued with their roots' conditions
    with pytest.raises(ValueError, match="split_at"):
        split_paths(mixture, mixture, solver, traj, times, split_at=1.0)
    with pytest.raises(ValueError, match="max_factor"):
        split_paths(mixture, mixture, solver, traj, times, max_factor=0)
    with pytest.raises(ValueError, match="trajectory"):
        split_paths(mixture, mixture, solver, traj[:-1], times)
