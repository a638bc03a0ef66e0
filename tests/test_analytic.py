"""Tests for lightning_nft.analytic: closed forms against independent computations.

Monte-Carlo checks use self-normalised importance sampling over a pool of ``N`` draws of ``X1`` from
the mixture: given ``X_t = x``, ``x0_i = (x - t x1_i) / (1 - t)`` and the weight of draw ``i`` is
``w_i ∝ N(x0_i; 0, I)`` (the Jacobian ``(1 - t)^-d`` is the same for all ``i``), so
``E[f(X0, X1) | X_t = x] ≈ sum_i w_i f(x0_i, x1_i)``. The tolerance is 5 delta-method standard
errors, ``se = sqrt(sum_i w_i^2 (f_i - est)^2)``, and every check also requires an effective sample
size ``1 / sum_i w_i^2`` large enough for that standard error to be meaningful. All random draws
use fixed generators, so the tests are deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_nft import paths
from lightning_nft.analytic import GaussianMixture, component_weights, effective_tilt, total_variation

DT = torch.float64
WEIGHTS = [0.5, 0.3, 0.2]
MEANS = [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]]
STDS = [0.5, 0.8, 0.3]
N_POOL = 200_000
N_SIGMA = 5.0
MIN_ESS = 500.0


def _mixture(dtype: torch.dtype = DT) -> GaussianMixture:
    return GaussianMixture(WEIGHTS, MEANS, STDS).to(dtype)


@pytest.fixture(scope="module")
def gm() -> GaussianMixture:
    return _mixture()


@pytest.fixture(scope="module")
def pool(gm: GaussianMixture) -> torch.Tensor:
    return gm.sample(N_POOL, generator=torch.Generator().manual_seed(0))


def _query_points(gm: GaussianMixture, t: float, n: int, seed: int) -> torch.Tensor:
    """Typical points of p_t: x = (1 - t) x0 + t x1 with fresh (x0, x1)."""
    g = torch.Generator().manual_seed(seed)
    x1 = gm.sample(n, generator=g)
    x0 = torch.randn(n, gm.dim, generator=g, dtype=DT)
    return paths.interpolate(x0, x1, t)


def _is_weights(pool: torch.Tensor, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised importance weights of the pool given X_t = x (x of shape (d,)), and the implied x0."""
    x0 = (x - t * pool) / (1 - t)
    w = torch.softmax(-0.5 * (x0**2).sum(-1), dim=0)
    ess = float(1.0 / (w**2).sum())
    assert ess > MIN_ESS, f"importance sampling degenerate (ESS={ess:.0f}) at t={t}"
    return w, x0


def _weighted(w: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised estimate sum_i w_i f_i and its delta-method standard error (f: (N, ...))."""
    shape = (-1,) + (1,) * (f.dim() - 1)
    est = (w.reshape(shape) * f).sum(0)
    se = ((w.reshape(shape) ** 2) * (f - est) ** 2).sum(0).sqrt()
    return est, se


def _assert_within(exact: torch.Tensor, est: torch.Tensor, se: torch.Tensor, what: str) -> None:
    err = (exact - est).abs()
    tol = N_SIGMA * se + 1e-4
    assert bool((err <= tol).all()), f"{what}: |exact - MC| = {err.tolist()} > tol {tol.tolist()}"


MC_TIMES = [0.2, 0.5, 0.75]


# ----------------------------------------------------------------------------------------------
# (a) velocity, (d) posterior covariance, (g) NFT optimum against importance-sampled Monte Carlo
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", MC_TIMES)
def test_velocity_matches_importance_sampling(gm: GaussianMixture, pool: torch.Tensor, t: float) -> None:
    xs = _query_points(gm, t, 4, seed=10)
    v = gm.velocity(xs, t)
    for x, v_exact in zip(xs, v):
        w, x0 = _is_weights(pool, x, t)
        est, se = _weighted(w, pool - x0)
        _assert_within(v_exact, est, se, f"velocity at t={t}")


@pytest.mark.parametrize("t", MC_TIMES)
def test_posterior_mean_and_cov_match_importance_sampling(gm: GaussianMixture, pool: torch.Tensor, t: float) -> None:
    xs = _query_points(gm, t, 4, seed=11)
    mean, cov = gm.posterior_mean(xs, t), gm.posterior_cov(xs, t)
    assert cov.shape == (4, 2, 2)
    assert torch.allclose(cov, cov.transpose(1, 2))
    for x, m_exact, c_exact in zip(xs, mean, cov):
        w, _ = _is_weights(pool, x, t)
        m_est, m_se = _weighted(w, pool)
        _assert_within(m_exact, m_est, m_se, f"posterior mean at t={t}")
        dev = pool - m_est
        c_est, c_se = _weighted(w, dev[:, :, None] * dev[:, None, :])
        _assert_within(c_exact, c_est, c_se, f"posterior cov at t={t}")


@pytest.mark.parametrize("t", MC_TIMES)
def test_nft_optimum_matches_importance_sampled_covariance(gm: GaussianMixture, pool: torch.Tensor, t: float) -> None:
    """v* = v0 + (2/beta) Cov(a.X1, X1 - X0 | X_t = x) (the Taylor-approximation note (Liu, "DiffusionNFT as Taylor Approximation"), Thm 1.1), Cov estimated by IS."""
    a = torch.tensor([1.0, -0.5], dtype=DT)
    beta = 0.5
    xs = _query_points(gm, t, 4, seed=12)
    delta = (gm.nft_optimum(xs, t, a, beta) - gm.velocity(xs, t)) * beta / 2
    for x, d_exact in zip(xs, delta):
        w, x0 = _is_weights(pool, x, t)
        r = pool @ a
        y = pool - x0
        r_bar, y_bar = (w * r).sum(), (w[:, None] * y).sum(0)
        est, se = _weighted(w, (r - r_bar)[:, None] * (y - y_bar))
        _assert_within(d_exact, est, se, f"Cov(a.X1, X1-X0 | x) at t={t}")


# ----------------------------------------------------------------------------------------------
# exact identities
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 1.0])
def test_nft_optimum_is_first_order_step_of_exact_tilt(gm: GaussianMixture, t: float) -> None:
    """Seed 000, Thm 1.3: (v* - v0) beta/2 = d/d alpha v^alpha at alpha = 0 (central differences of tilt())."""
    a = torch.tensor([0.7, 1.2], dtype=DT)
    beta, h = 2.0, 1e-5
    xs = _query_points(gm, 0.5, 8, seed=13)
    fd = (gm.tilt(a, h).velocity(xs, t) - gm.tilt(a, -h).velocity(xs, t)) / (2 * h)
    delta = (gm.nft_optimum(xs, t, a, beta) - gm.velocity(xs, t)) * beta / 2
    assert torch.isfinite(delta).all()
    torch.testing.assert_close(delta, fd, atol=1e-7, rtol=1e-6)
    # (B, d) reward directions give the same answer row by row
    torch.testing.assert_close(gm.nft_optimum(xs, t, a.expand(8, 2), beta), gm.nft_optimum(xs, t, a, beta))


def test_endpoints_closed_form(gm: GaussianMixture) -> None:
    """t = 0: X_0 = x is independent of X1; t = 1: X1 = x. Both ends are finite."""
    xs = _query_points(gm, 0.5, 6, seed=14)
    w, m, s2 = gm.weights, gm.means, gm.stds**2
    mean1 = w @ m
    cov1 = (w * s2).sum() * torch.eye(2, dtype=DT) + (w[:, None, None] * m[:, :, None] * m[:, None, :]).sum(0)
    cov1 = cov1 - torch.outer(mean1, mean1)
    a = torch.tensor([1.0, 2.0], dtype=DT)
    torch.testing.assert_close(gm.velocity(xs, 0.0), mean1 - xs)
    torch.testing.assert_close(gm.posterior_mean(xs, 0.0), mean1.expand(6, 2))
    torch.testing.assert_close(gm.posterior_cov(xs, 0.0), cov1.expand(6, 2, 2))
    torch.testing.assert_close(gm.nft_optimum(xs, 0.0, a, 1.0), mean1 - xs + 2 * cov1 @ a)
    torch.testing.assert_close(gm.marginal_log_prob(xs, 0.0), -0.5 * (xs**2).sum(-1) - math.log(2 * math.pi))
    torch.testing.assert_close(gm.velocity(xs, 1.0), xs)
    torch.testing.assert_close(gm.posterior_mean(xs, 1.0), xs)
    torch.testing.assert_close(gm.posterior_cov(xs, 1.0), torch.zeros(6, 2, 2, dtype=DT))
    torch.testing.assert_close(gm.nft_optimum(xs, 1.0, a, 1.0), xs)


def test_log_prob_matches_torch_distributions(gm: GaussianMixture) -> None:
    D = torch.distributions
    ref = D.MixtureSameFamily(
        D.Categorical(probs=gm.weights),
        D.Independent(D.Normal(gm.means, gm.stds[:, None].expand(3, 2)), 1),
    )
    xs = _query_points(gm, 0.8, 16, seed=15)
    torch.testing.assert_close(gm.log_prob(xs), ref.log_prob(xs))
    # responsibilities at t=1 are the Bayes posterior over components
    joint = ref.component_distribution.log_prob(xs[:, None, :]) + gm.weights.log()
    torch.testing.assert_close(gm.responsibilities(xs, 1.0), torch.softmax(joint, -1))


@pytest.mark.parametrize("t", [0.0, 0.25, 0.6, 0.95, 1.0, "batch"])
def test_score_is_gradient_of_marginal_log_prob(gm: GaussianMixture, t: object) -> None:
    xs = _query_points(gm, 0.5, 8, seed=16).requires_grad_(True)
    tt = torch.linspace(0.0, 1.0, 8, dtype=DT) if t == "batch" else t
    (grad,) = torch.autograd.grad(gm.marginal_log_prob(xs, tt).sum(), xs)
    torch.testing.assert_close(gm.score(xs, tt), grad, atol=1e-10, rtol=1e-9)


def test_conversions_in_paths_agree() -> None:
    gm = _mixture()
    xs = _query_points(gm, 0.5, 8, seed=17)
    t = torch.linspace(0.05, 0.95, 8, dtype=DT)
    v, s = gm.velocity(xs, t), gm.score(xs, t)
    torch.testing.assert_close(paths.score_from_velocity(xs, t, v), s)
    torch.testing.assert_close(paths.velocity_from_score(xs, t, s), v)
    torch.testing.assert_close(paths.data_from_velocity(xs, t, v), gm.posterior_mean(xs, t))
    x0_hat = (xs - t[:, None] * gm.posterior_mean(xs, t)) / (1 - t[:, None])  # E[X0 | x]
    torch.testing.assert_close(paths.noise_from_velocity(xs, t, v), x0_hat)


def test_time_forms_dtypes_and_backbone_interface() -> None:
    gm64 = _mixture()
    xs = _query_points(gm64, 0.5, 5, seed=18)
    ref = gm64.velocity(xs, torch.full((5,), 0.4, dtype=DT))
    torch.testing.assert_close(gm64(xs, 0.4), ref)
    torch.testing.assert_close(gm64(xs, torch.tensor(0.4), cond="ignored"), ref)
    # float32 module and inputs agree with float64; float64 inputs on a float32 module are promoted
    gm32 = GaussianMixture(WEIGHTS, MEANS, STDS)
    assert gm32.means.dtype == torch.float32 and gm64.means.dtype == DT
    out32 = gm32(xs.float(), torch.full((5,), 0.4))
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, atol=1e-5, rtol=1e-5)
    assert gm32(xs, 0.4).dtype == DT
    # buffers only, state_dict round trip
    assert list(gm64.parameters()) == []
    assert set(gm64.state_dict()) == {"weights", "means", "stds"}
    other = GaussianMixture([1.0, 1.0, 1.0], [[0.0, 0.0]] * 3, 1.0).double()
    other.load_state_dict(gm64.state_dict())
    torch.testing.assert_close(other(xs, 0.4), ref)
    assert (gm64.dim, gm64.n_components) == (2, 3)
    torch.testing.assert_close(gm64.weights.sum(), torch.tensor(1.0, dtype=DT))


def test_constructible_from_yaml() -> None:
    yaml = pytest.importorskip("yaml")
    text = "weights: [2, 1]\nmeans: [[-1.0, 0.0, 1.0], [1, 2, 3]]\nstds: 0.5\n"
    gm = GaussianMixture(**yaml.safe_load(text))
    torch.testing.assert_close(gm.weights, torch.tensor([2 / 3, 1 / 3]))
    torch.testing.assert_close(gm.stds, torch.tensor([0.5, 0.5]))
    assert (gm.dim, gm.n_components) == (3, 2)
    from omegaconf import OmegaConf

    gm_oc = GaussianMixture(**OmegaConf.create(text))
    torch.testing.assert_close(gm_oc.means, gm.means)
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--model", type=torch.nn.Module)
    cfg = parser.parse_string(
        "model:\n  class_path: lightning_nft.analytic.GaussianMixture\n"
        "  init_args:\n    weights: [0.25, 0.75]\n    means: [[0.0], [3.0]]\n    stds: [1.0, 0.5]\n"
    )
    model = parser.instantiate(cfg).model
    assert isinstance(model, GaussianMixture)
    torch.testing.assert_close(model.stds, torch.tensor([1.0, 0.5]))


# ----------------------------------------------------------------------------------------------
# (e) sampling, (f) tilt, (h) effective tilt, classification helpers
# ----------------------------------------------------------------------------------------------


def test_sample_reproduces_weights_means_and_stds(gm: GaussianMixture) -> None:
    n = 20_000
    x, labels = gm.sample_with_labels(n, generator=torch.Generator().manual_seed(1))
    assert x.shape == (n, 2) and labels.shape == (n,) and x.dtype == DT
    frac = torch.bincount(labels, minlength=3).to(DT) / n
    w = gm.weights
    # binomial std sqrt(p(1-p)/n) <= 0.0035 at n = 20k
    assert bool(((frac - w).abs() <= N_SIGMA * (w * (1 - w) / n).sqrt()).all()), frac
    for k in range(3):
        xk = x[labels == k]
        nk, s = xk.shape[0], gm.stds[k]
        assert bool(((xk.mean(0) - gm.means[k]).abs() <= N_SIGMA * s / math.sqrt(nk)).all())
        var_hat = ((xk - gm.means[k]) ** 2).mean()  # nk * d squared deviations
        assert abs(float(var_hat - s**2)) <= N_SIGMA * float(s**2) * math.sqrt(2 / (nk * 2))
    again = gm.sample(n, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, x, rtol=0, atol=0)


def test_tilt_matches_importance_weighted_base_samples(gm: GaussianMixture) -> None:
    a = torch.tensor([1.0, 0.5], dtype=DT)
    lam = 0.8
    tilted = gm.tilt(a, lam)
    x, labels = gm.sample_with_labels(N_POOL, generator=torch.Generator().manual_seed(2))
    w = torch.softmax(lam * (x @ a), dim=0)  # self-normalised weights exp(lam a.x)
    assert float(1 / (w**2).sum()) > 10 * MIN_ESS
    for k in range(3):
        ind = (labels == k).to(DT)
        est, se = _weighted(w, ind)
        _assert_within(tilted.weights[k], est, se, f"tilted weight {k}")
        wk = w * ind / (w * ind).sum()
        m_est, m_se = _weighted(wk, x)
        _assert_within(tilted.means[k], m_est, m_se, f"tilted mean {k}")
    torch.testing.assert_close(tilted.stds, gm.stds)


def test_tilt_density_is_exact(gm: GaussianMixture) -> None:
    """log p'(x) - log p(x) - lam a.x is a constant (-log Z) for every x."""
    a = torch.tensor([-0.3, 1.5], dtype=DT)
    lam = 1.7
    xs = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=DT) * 3
    gap = gm.tilt(a, lam).log_prob(xs) - gm.log_prob(xs) - lam * (xs @ a)
    assert float(gap.std()) < 1e-10
    torch.testing.assert_close(gm.tilt(a, 0.0).weights, gm.weights)
    # composition: tilting by lam1 then lam2 equals tilting by lam1 + lam2
    two = gm.tilt(a, 0.4).tilt(a, 1.3)
    torch.testing.assert_close(two.weights, gm.tilt(a, lam).weights)
    torch.testing.assert_close(two.means, gm.tilt(a, lam).means)


def test_effective_tilt_recovers_lambda_for_equal_stds() -> None:
    base = GaussianMixture([0.2, 0.3, 0.1, 0.4], [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0], [1.0, 3.0]], 0.6).double()
    a = torch.tensor([0.8, -0.4], dtype=DT)
    for lam in [-1.5, 0.0, 0.35, 2.0]:
        w_t = base.tilt(a, lam).weights
        assert effective_tilt(base, w_t, a) == pytest.approx(lam, abs=1e-9)
        assert effective_tilt(base, (5 * w_t).tolist(), a.tolist()) == pytest.approx(lam, abs=1e-9)
    # unequal stds: the weight ratio also carries lam^2 s_k^2 |a|^2 / 2, so the slope is not lam
    uneq = GaussianMixture([0.2, 0.3, 0.1, 0.4], [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0], [1.0, 3.0]], [0.3, 1.0, 0.5, 0.8])
    assert abs(effective_tilt(uneq.double(), uneq.double().tilt(a, 2.0).weights, a) - 2.0) > 0.05


def test_classify_component_weights_and_total_variation() -> None:
    gm = GaussianMixture([0.6, 0.4], [[-5.0, 0.0], [5.0, 0.0]], 0.5).double()
    n = 20_000
    x, labels = gm.sample_with_labels(n, generator=torch.Generator().manual_seed(4))
    assert torch.equal(gm.classify(x), labels)  # separation 20 stds: misclassification ~ 1e-23
    cw = component_weights(gm, x)
    torch.testing.assert_close(cw, torch.bincount(labels, minlength=2).to(DT) / n)
    assert total_variation(cw, gm.weights) <= N_SIGMA * math.sqrt(0.24 / n)
    assert total_variation([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.5)
    assert total_variation(torch.tensor([0.2, 0.3, 0.5]), [0.2, 0.3, 0.5]) == pytest.approx(0.0, abs=1e-7)
    assert total_variation([1.0, 0.0, 0.0], [0.0, 0.0, 1.0]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# (i) input validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(weights=[0.5, -0.1], means=[[0.0], [1.0]], stds=1.0), "weights"),
        (dict(weights=[0.0, 0.0], means=[[0.0], [1.0]], stds=1.0), "weights"),
        (dict(weights=[0.5, float("nan")], means=[[0.0], [1.0]], stds=1.0), "weights"),
        (dict(weights=[0.5, 0.5, 0.0], means=[[0.0], [1.0]], stds=1.0), "weights"),
        (dict(weights=[0.5, 0.5], means=[0.0, 1.0], stds=1.0), "means"),
        (dict(weights=[0.5, 0.5], means=[[0.0], [float("inf")]], stds=1.0), "means"),
        (dict(weights=[0.5, 0.5], means=[[0.0], [1.0]], stds=[1.0, 1.0, 1.0]), "stds"),
        (dict(weights=[0.5, 0.5], means=[[0.0], [1.0]], stds=0.0), "stds"),
        (dict(weights=[0.5, 0.5], means=[[0.0], [1.0]], stds=[1.0, -1.0]), "stds"),
        (dict(weights=["a", "b"], means=[[0.0], [1.0]], stds=1.0), "weights"),
    ],
)
def test_constructor_rejects_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


def test_methods_reject_bad_input(gm: GaussianMixture) -> None:
    x = torch.zeros(4, 2, dtype=DT)
    with pytest.raises(ValueError, match="shape"):
        gm.velocity(torch.zeros(4, 3, dtype=DT), 0.5)
    with pytest.raises(ValueError, match="shape"):
        gm.velocity(torch.zeros(2, dtype=DT), 0.5)
    with pytest.raises(ValueError, match="t must"):
        gm.velocity(x, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gm.score(x, 1.5)
    with pytest.raises(ValueError, match="beta"):
        gm.nft_optimum(x, 0.5, [1.0, 0.0], 0.0)
    with pytest.raises(ValueError, match="direction"):
        gm.nft_optimum(x, 0.5, [1.0, 0.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="direction"):
        gm.tilt(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="lam"):
        gm.tilt(torch.ones(2), float("inf"))
    with pytest.raises(ValueError, match="n must"):
        gm.sample(-1)
    with pytest.raises(ValueError, match="weights_hat"):
        effective_tilt(gm, [0.5, 0.5], [1.0, 0.0])
    with pytest.raises(ValueError, match="positive"):
        effective_tilt(gm, [0.5, 0.5, 0.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="different"):
        effective_tilt(gm, [0.2, 0.3, 0.5], [0.0, 0.0])
    with pytest.raises(ValueError, match="same length"):
        total_variation([0.5, 0.5], [1.0, 0.0, 0.0])
