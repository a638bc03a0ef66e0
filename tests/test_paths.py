"""Conventions: conversions between velocity, data/noise prediction, score and diffusers' direction."""

import pytest
import torch

from lightning_nft import paths
from lightning_nft.analytic import GaussianMixture


def _xtv(dtype=torch.float64, shape=(16, 3)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.rand(shape[0], generator=g, dtype=dtype) * 0.9 + 0.05
    v = torch.randn(shape, generator=g, dtype=dtype)
    return x, t, v


def test_interpolation_endpoints_and_target():
    x0, x1 = torch.randn(4, 2), torch.randn(4, 2)
    assert torch.equal(paths.interpolate(x0, x1, 0.0), x0)
    assert torch.equal(paths.interpolate(x0, x1, 1.0), x1)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt = paths.interpolate(x0, x1, t)
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * x1[1])
    assert torch.equal(paths.velocity_target(x0, x1), x1 - x0)


def test_conditional_pair_is_recovered_exactly():
    """On one pair (x0, x1) the conditional velocity x1 - x0 gives back x1 and x0 exactly."""
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64)
    xt, v = paths.interpolate(x0, x1, t), x1 - x0
    torch.testing.assert_close(paths.data_from_velocity(xt, t, v), x1)
    torch.testing.assert_close(paths.noise_from_velocity(xt, t, v), x0)


@pytest.mark.parametrize("shape", [(16, 3), (4, 1, 8, 8)])
def test_round_trips(shape):
    x, t, v = _xtv(shape=shape)
    torch.testing.assert_close(paths.velocity_from_data(x, t, paths.data_from_velocity(x, t, v)), v)
    torch.testing.assert_close(paths.velocity_from_noise(x, t, paths.noise_from_velocity(x, t, v)), v)
    torch.testing.assert_close(paths.velocity_from_score(x, t, paths.score_from_velocity(x, t, v)), v)
    # score = -E[x0 | x] / (1 - t)
    torch.testing.assert_close(paths.score_from_velocity(x, t, v),
                               -paths.noise_from_velocity(x, t, v) / (1 - paths.expand_like(t, x)))


def test_score_of_exact_field_matches_mixture_score():
    """An independent check of the score conversion: the exact mixture's own score."""
    m = GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.5, -0.5]], [0.5, 0.8]).double()
    x, t, _ = _xtv(shape=(32, 2))
    torch.testing.assert_close(paths.score_from_velocity(x, t, m(x, t)), m.score(x, t), rtol=1e-8, atol=1e-8)


def test_diffusers_direction_round_trip():
    t = torch.tensor([0.0, 0.3, 1.0])
    torch.testing.assert_close(paths.sigma_from_time(t), torch.tensor([1.0, 0.7, 0.0]))
    torch.testing.assert_close(paths.diffusers_timestep_from_time(t), torch.tensor([1000.0, 700.0, 0.0]))
    torch.testing.assert_close(paths.time_from_diffusers_timestep(paths.diffusers_timestep_from_time(t)), t)
    torch.testing.assert_close(paths.time_from_sigma(paths.sigma_from_time(t)), t)
    # diffusers' x_sigma = (1 - sigma) data + sigma noise is our x_t, and its target noise - data is -v
    x0, x1 = torch.randn(3, 2), torch.randn(3, 2)
    sigma = paths.sigma_from_time(t)
    x_diffusers = (1 - sigma)[:, None] * x1 + sigma[:, None] * x0
    torch.testing.assert_close(x_diffusers, paths.interpolate(x0, x1, t))
    torch.testing.assert_close(paths.velocity_from_diffusers_flow(x0 - x1), x1 - x0)
    torch.testing.assert_close(paths.diffusers_flow_from_velocity(x1 - x0), x0 - x1)


def test_epsilon_prediction_to_velocity():
    """A VP state sqrt(ab) x1 + sqrt(1-ab) eps, rescaled, is the RF point at t = rf_time; the exact eps gives x1 - eps."""
    g = torch.Generator().manual_seed(2)
    x1, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.01, 0.2, 0.5, 0.9, 0.999], dtype=torch.float64)
    x_vp = ab.sqrt()[:, None] * x1 + (1 - ab).sqrt()[:, None] * eps
    t = paths.rf_time_from_alpha_bar(ab)
    torch.testing.assert_close(paths.rf_state_from_vp(x_vp, ab), paths.interpolate(eps, x1, t))
    torch.testing.assert_close(paths.velocity_from_epsilon(x_vp, eps, ab), x1 - eps)


def test_expand_like_rejects_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        paths.expand_like(torch.zeros(3), torch.zeros(4, 2))
