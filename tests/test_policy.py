"""The policy interface and the plain backbones."""

import pytest
import torch

from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity, SinusoidalTimeEmbedding
from lightning_nft.policy import FrozenPolicy, Policy, sample_velocity
from lightning_nft.samplers import EulerSolver, SDESolver, time_grid


def test_mlp_velocity_shapes_conditioning_and_zero_init():
    net = MLPVelocity(dim=3, hidden=16, depth=2, num_classes=4)
    x, t = torch.randn(5, 3), torch.rand(5)
    assert net(x, t, torch.tensor([0, 1, 2, 3, 0])).shape == (5, 3)
    with pytest.raises(ValueError, match="cond"):
        net(x, t)
    zero = MLPVelocity(dim=3, hidden=16, depth=2, zero_init=True)
    assert torch.count_nonzero(zero(x, t)) == 0
    # scalar time broadcasts to the batch
    torch.testing.assert_close(zero(x, 0.5), zero(x, torch.full((5,), 0.5)))


def test_time_embedding_distinguishes_times():
    emb = SinusoidalTimeEmbedding(8)
    e = emb(torch.tensor([0.0, 0.5, 1.0]))
    assert e.shape == (3, 8)
    assert torch.cdist(e, e).triu(1).abs().sum() > 0
    with pytest.raises(ValueError):
        SinusoidalTimeEmbedding(7)


def test_residual_velocity_starts_at_the_base_and_freezes_it():
    base = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], 0.3)
    model = ResidualVelocity(base, MLPVelocity(2, 16, 2, zero_init=True))
    x, t = torch.randn(7, 2), torch.rand(7)
    torch.testing.assert_close(model(x, t), base(x, t))
    assert all(p.requires_grad for p in model.residual.parameters())
    assert not any(p.requires_grad for p in model.base.parameters())


def test_frozen_policy_implements_the_protocol_and_samples():
    base = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], 0.3)
    policy = FrozenPolicy(base, n_steps=20)
    assert isinstance(policy, Policy)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    out = policy.sample(x0)
    ref = EulerSolver().sample(base, x0, time_grid(20))
    torch.testing.assert_close(out.samples, ref.samples)
    t = torch.rand(64)
    torch.testing.assert_close(policy.old_velocity(x0, t), base(x0, t))
    torch.testing.assert_close(policy.reference_velocity(x0, t), base(x0, t))


def test_sample_velocity_returns_trajectory_and_log_probs_on_request():
    base = GaussianMixture([1.0], [[0.0, 0.0]], 0.5)
    x0 = torch.randn(8, 2)
    out = sample_velocity(base, x0, solver=SDESolver("memoryless"), n_steps=10, return_trajectory=True,
                          return_log_probs=True, generator=torch.Generator().manual_seed(0))
    assert out.trajectory.shape == (11, 8, 2)
    assert out.log_probs.shape == (10, 8)
    torch.testing.assert_close(out.trajectory[-1], out.samples)
    torch.testing.assert_close(out.trajectory[0], x0)
