"""Tests for the DiffusionNFT objective (lightning_nft.objectives.nft) and reward normalisation
(lightning_nft.advantages).

* Lemma 1.2 (the Taylor-approximation note (Liu, "DiffusionNFT as Taylor Approximation")) exactly, in float64: the gradient of the per-sample loss vanishes at
  ``nft_pointwise_optimum``; the loss is a quadratic with Hessian ``2 beta^2 I / D`` whose
  minimiser, obtained by solving ``H v = -g(0)``, is that point.
* Velocity vs data space: exact relations through ``e = (1 - t)(v - y)``.
* Normalisation modes on hand-made groups (expected numbers computed by hand below).
* Theorem 1.1 (Taylor-approximation note): an MLP residual trained with the velocity-space NFT loss, old policy =
  the exact mixture field, rollouts = mixture samples, ``r = a.x1``, reaches
  ``GaussianMixture.nft_optimum`` within 5% relative L2 error over ``t in [0.1, 0.9]``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_nft.advantages import RewardNormalizer, normalize_rewards
from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.objectives.nft import (
    NFTObjective,
    implicit_policies,
    kl_anchor_penalty,
    nft_loss,
    nft_pointwise_optimum,
)
from lightning_nft.objectives.base import Policies
from lightning_nft.paths import interpolate
from lightning_nft.rollouts import RolloutBatch
from lightning_nft.samplers import EulerSolver, time_grid
from lightning_nft.timesteps import TimeSampler

DT = torch.float64


def _random_case(seed: int, b: int = 5, shape=(3, 2)):
    g = torch.Generator().manual_seed(seed)
    v_old = torch.randn(b, *shape, generator=g, dtype=DT)
    x0 = torch.randn(b, *shape, generator=g, dtype=DT)
    x1 = 2 * torch.randn(b, *shape, generator=g, dtype=DT)
    t = torch.rand(b, generator=g, dtype=DT) * 0.9 + 0.05
    # r inside and outside [0, 1]: the quadratic stays convex for any real r
    r = torch.tensor([0.0, 1.0, 0.3, -0.7, 1.8], dtype=DT)[:b]
    return v_old, x0, x1, t, r


# ------------------------------------------------------------------------------------------------
# Lemma 1.2 and the quadratic structure
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_lemma_1_2_gradient_vanishes_at_pointwise_optimum(beta):
    v_old, x0, x1, t, r = _random_case(0)
    x_t = interpolate(x0, x1, t)
    v_star = nft_pointwise_optimum(v_old, x1 - x0, r, beta).requires_grad_(True)
    loss = nft_loss(v_star, v_old, x0, x1, x_t, t, r, beta).sum()
    (grad,) = torch.autograd.grad(loss, v_star)
    assert grad.abs().max().item() < 1e-12
    # and it is not a trivial point: the gradient at v_old is far from zero wherever r != 1/2
    v0 = v_old.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(nft_loss(v0, v_old, x0, x1, x_t, t, r, beta).sum(), v0)
    assert g0.abs().max().item() > 1e-2


@pytest.mark.parametrize("beta", [0.3, 1.0, 4.0])
def test_lemma_1_2_quadratic_minimiser_by_solving(beta):
    v_old, x0, x1, t, r = _random_case(1, shape=(4,))
    x_t = interpolate(x0, x1, t)
    d = v_old.shape[1]
    for i in range(v_old.shape[0]):
        args = (v_old[i : i + 1], x0[i : i + 1], x1[i : i + 1], x_t[i : i + 1], t[i : i + 1], r[i : i + 1])

        def f(v, args=args):
            return nft_loss(v.reshape(1, d), *args, beta=beta).sum()

        zero = torch.zeros(d, dtype=DT)
        hess = torch.autograd.functional.hessian(f, zero)
        grad0 = torch.autograd.functional.jacobian(f, zero)
        # Hessian 2 beta^2 I / D for every real r
        torch.testing.assert_close(hess, 2 * beta**2 / d * torch.eye(d, dtype=DT), rtol=1e-12, atol=1e-12)
        v_min = torch.linalg.solve(hess, -grad0)
        expected = nft_pointwise_optimum(v_old[i : i + 1], (x1 - x0)[i : i + 1], r[i : i + 1], beta)[0]
        torch.testing.assert_close(v_min, expected, rtol=1e-10, atol=1e-10)
        # loss(v) - loss(v*) = beta^2 mean ||v - v*||^2 (exact quadratic), at a random v
        v = torch.randn(d, dtype=DT, generator=torch.Generator().manual_seed(i))
        gap = f(v) - f(expected)
        torch.testing.assert_close(gap, beta**2 * ((v - expected) ** 2).mean(), rtol=1e-10, atol=1e-12)


def test_implicit_policies_average_to_old_and_kl_anchor_combined_optimum():
    v_old, x0, x1, t, r = _random_case(2)
    beta, w = 0.7, 0.4
    v_theta = torch.randn_like(v_old)
    v_pos, v_neg = implicit_policies(v_theta, v_old, beta)
    torch.testing.assert_close((v_pos + v_neg) / 2, v_old)
    torch.testing.assert_close(v_pos - v_neg, 2 * beta * (v_theta - v_old))
    # with the anchor w ||v - v_ref||^2 the per-sample minimiser is (beta^2 z + w v_ref) / (beta^2 + w)
    v_ref = torch.randn_like(v_old)
    x_t = interpolate(x0, x1, t)
    z = nft_pointwise_optimum(v_old, x1 - x0, r, beta)
    v_comb = ((beta**2 * z + w * v_ref) / (beta**2 + w)).requires_grad_(True)
    total = (nft_loss(v_comb, v_old, x0, x1, x_t, t, r, beta) + w * kl_anchor_penalty(v_comb, v_ref)).sum()
    (grad,) = torch.autograd.grad(total, v_comb)
    assert grad.abs().max().item() < 1e-12
    torch.testing.assert_close(kl_anchor_penalty(v_theta, v_ref), ((v_theta - v_ref) ** 2).mean(dim=(1, 2)))


# ------------------------------------------------------------------------------------------------
# velocity vs data space
# ------------------------------------------------------------------------------------------------


def test_data_space_relations_to_velocity_space():
    v_old, x0, x1, t, r = _random_case(3)
    beta = 0.6
    x_t = interpolate(x0, x1, t)
    v_theta = torch.randn_like(v_old, dtype=DT).requires_grad_(True)
    tb = t.reshape(-1, 1, 1)
    vel = nft_loss(v_theta, v_old, x0, x1, x_t, t, r, beta, space="velocity")
    plain = nft_loss(v_theta, v_old, x0, x1, x_t, t, r, beta, space="data", adaptive_weight=False)
    # x_t + (1 - t) v - x1 = (1 - t)(v - (x1 - x0)): plain data-space loss = (1 - t)^2 velocity loss
    torch.testing.assert_close(plain, (1 - t) ** 2 * vel, rtol=1e-12, atol=1e-12)

    adaptive = nft_loss(v_theta, v_old, x0, x1, x_t, t, r, beta, space="data")
    y = x1 - x0
    d_pos = (1 - beta) * v_old + beta * v_theta - y
    d_neg = (1 + beta) * v_old - beta * v_theta - y
    m_pos = d_pos.abs().mean(dim=(1, 2))
    m_neg = d_neg.abs().mean(dim=(1, 2))
    expected = (1 - t) * (r * (d_pos**2).mean(dim=(1, 2)) / m_pos + (1 - r) * (d_neg**2).mean(dim=(1, 2)) / m_neg)
    torch.testing.assert_close(adaptive, expected, rtol=1e-12, atol=1e-12)

    # the weight is detached: d/dv of the loss is the squared-error gradient over the fixed weight
    (grad,) = torch.autograd.grad(adaptive.sum(), v_theta)
    n_el = d_pos[0].numel()
    rr = r.reshape(-1, 1, 1)
    g_expected = (
        2 * (1 - tb) * beta / n_el * (rr * d_pos / m_pos.reshape(-1, 1, 1) - (1 - rr) * d_neg / m_neg.reshape(-1, 1, 1))
    ).detach()
    torch.testing.assert_close(grad, g_expected, rtol=1e-10, atol=1e-12)


def test_data_space_is_finite_at_t_one():
    v_old, x0, x1, _, r = _random_case(4)
    t = torch.ones(v_old.shape[0], dtype=DT)
    v_theta = torch.randn_like(v_old).requires_grad_(True)
    loss = nft_loss(v_theta, v_old, x0, x1, interpolate(x0, x1, t), t, r, 1.0, space="data")
    (grad,) = torch.autograd.grad(loss.sum(), v_theta)
    assert torch.all(loss == 0) and torch.all(torch.isfinite(grad))


def test_loss_input_validation():
    v_old, x0, x1, t, r = _random_case(5)
    x_t = interpolate(x0, x1, t)
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v_old, v_old, x0, x1, x_t, t, r, 0.0)
    with pytest.raises(ValueError, match="space"):
        nft_loss(v_old, v_old, x0, x1, x_t, t, r, 1.0, space="score")
    with pytest.raises(ValueError, match="x_t and t"):
        nft_loss(v_old, v_old, x0, x1, None, None, r, 1.0, space="data")
    with pytest.raises(ValueError, match="shape"):
        nft_loss(v_old, v_old, x0, x1, x_t, t, r[:3], 1.0)
    for bad in (dict(beta=-1.0), dict(space="x"), dict(time_source="grids"), dict(substeps=0), dict(substeps=1.5)):
        with pytest.raises(ValueError):
            NFTObjective(**bad)


# ------------------------------------------------------------------------------------------------
# reward normalisation
# ------------------------------------------------------------------------------------------------

# groups (non-contiguous ids): 7 -> [1, 2, 3]; 3 -> [4, 4] (zero std); 11 -> [5] (singleton); 0 -> [0, 10]
REWARDS = [1.0, 2.0, 3.0, 4.0, 4.0, 5.0, 0.0, 10.0]
GROUPS = [7, 7, 7, 3, 3, 11, 0, 0]
CENTRED = [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -5.0, 5.0]


def _expected_group(stds, clip, eps):
    adv = [max(-clip, min(clip, c / (s + eps))) if c != 0 else 0.0 for c, s in zip(CENTRED, stds)]
    return adv, [a / (2 * clip) + 0.5 for a in adv]


def _check(out, adv, r):
    a_out, r_out = out
    torch.testing.assert_close(a_out, torch.tensor(adv), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(r_out, torch.tensor(r), rtol=1e-6, atol=1e-7)


def test_group_mode_per_group_std():
    s_a = math.sqrt(2.0 / 3.0)  # population std of [1, 2, 3]
    stds = [s_a, s_a, s_a, 0.0, 0.0, 0.0, 5.0, 5.0]
    rewards, groups = torch.tensor(REWARDS), torch.tensor(GROUPS)
    out = normalize_rewards(rewards, groups, mode="group", std_scope="group", clip=5.0, eps=0.0)
    adv, r = _expected_group(stds, 5.0, 0.0)
    assert adv[0] == pytest.approx(-1.224744871391589) and r[7] == pytest.approx(0.6)
    _check(out, adv, r)
    # the release-style eps in the denominator, and a clip that bites (|A| = 1.2247 > 1)
    _check(normalize_rewards(rewards, groups, "group", "group", clip=1.0, eps=1e-4), *_expected_group(stds, 1.0, 1e-4))
    a1, r1 = normalize_rewards(rewards, groups, "group", "group", clip=1.0, eps=0.0)
    assert r1.tolist() == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.5, 0.5, 0.0, 1.0])


def test_group_mode_global_pooled_std():
    sigma = math.sqrt(52.0 / 8.0)  # sqrt(mean of the squared centred rewards) = 2.5495...
    rewards, groups = torch.tensor(REWARDS), torch.tensor(GROUPS)
    out = RewardNormalizer()(rewards, groups)  # defaults: group, global, clip 5, eps 1e-4
    _check(out, *_expected_group([sigma] * 8, 5.0, 1e-4))
    adv, r = normalize_rewards(rewards, groups, std_scope="global", clip=1.0, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1 / sigma, 0, 1 / sigma, 0, 0, 0, -1.0, 1.0]))
    torch.testing.assert_close(r, torch.tensor([0.5 - 0.5 / sigma, 0.5, 0.5 + 0.5 / sigma, 0.5, 0.5, 0.5, 0.0, 1.0]))
    # one group (group=None): the pooled std is the plain population std
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    a_none, _ = normalize_rewards(x, None, clip=5.0, eps=0.0)
    torch.testing.assert_close(a_none, (x - x.mean()) / x.std(unbiased=False))


def test_minmax_and_binary_modes():
    rewards, groups = torch.tensor(REWARDS), torch.tensor(GROUPS)
    adv, r = normalize_rewards(rewards, groups, mode="minmax")
    torch.testing.assert_close(r, rewards / 10.0)
    torch.testing.assert_close(adv, rewards / 5.0 - 1.0)
    adv, r = normalize_rewards(torch.full((4,), 3.0), None, mode="minmax")
    assert r.tolist() == [0.5] * 4 and adv.tolist() == [0.0] * 4

    adv, r = normalize_rewards(rewards, groups, mode="binary")
    assert adv.tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0, 1.0]
    assert r.tolist() == [0.0, 0.5, 1.0, 0.5, 0.5, 0.5, 0.0, 1.0]
    # a tie that float arithmetic hides: mean([0.1] * 3) != 0.1 in float64, still a tie
    tie = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.4], dtype=DT)
    assert tie[:3].mean().item() != 0.1
    adv, r = normalize_rewards(tie, torch.tensor([1, 1, 1, 2, 2]), mode="binary")
    assert r.tolist() == [0.5, 0.5, 0.5, 0.0, 1.0]
    adv, r = normalize_rewards(tie, torch.tensor([1, 1, 1, 2, 2]), mode="group", std_scope="group", eps=0.0)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0] and r[:3].tolist() == [0.5, 0.5, 0.5]


def test_normalisation_dtypes_and_invariances():
    rewards = torch.tensor([3, 1, 4, 1, 5, 9], dtype=torch.long)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, r = normalize_rewards(rewards, groups)
    assert adv.dtype == torch.float32 and r.dtype == torch.float32
    assert torch.all((r >= 0) & (r <= 1))
    # r depends on rewards only through group-centred, scaled values: invariant to a*R + b (a > 0)
    adv2, r2 = normalize_rewards(2.5 * rewards.double() - 7.0, groups, eps=0.0)
    adv1, r1 = normalize_rewards(rewards.double(), groups, eps=0.0)
    torch.testing.assert_close(adv2, adv1)
    assert adv2.dtype == DT
    # group ids are labels: relabelling changes nothing
    torch.testing.assert_close(normalize_rewards(rewards, groups * 13 - 4)[1], r)
    with pytest.raises(ValueError, match="group"):
        normalize_rewards(rewards, torch.tensor([0.0, 0, 0, 1, 1, 1]))
    with pytest.raises(ValueError, match="mode"):
        RewardNormalizer(mode="rank")
    with pytest.raises(ValueError, match="clip"):
        RewardNormalizer(clip=0.0)


@pytest.mark.parametrize("mode", ["group", "minmax", "binary"])
def test_non_finite_rewards_name_the_sample(mode):
    groups = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="sample 2"):
        normalize_rewards(torch.tensor([0.0, 1.0, float("nan"), 2.0]), groups, mode=mode)
    with pytest.raises(ValueError, match="sample 0"):
        RewardNormalizer(mode=mode)(torch.tensor([float("inf"), 1.0, 0.0, 2.0]), groups)


# ------------------------------------------------------------------------------------------------
# NFTObjective wiring (a small module exposing the policy interface)
# ------------------------------------------------------------------------------------------------


class _TinyPolicy(nn.Module):
    """Current / old / reference MLP fields; records the inputs each role was called with."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.current = MLPVelocity(dim=3, hidden=16, depth=2)
        self.old = copy.deepcopy(self.current).requires_grad_(False)
        with torch.no_grad():
            for p in self.old.parameters():
                p.add_(0.1 * torch.randn_like(p))
        self.ref = MLPVelocity(dim=3, hidden=16, depth=2).requires_grad_(False)
        self.calls: dict[str, list] = {"current": [], "old": [], "reference": []}

    def velocity(self, x, t, cond=None):
        self.calls["current"].append((x.detach().clone(), t.detach().clone(), cond))
        return self.current(x, t)

    def old_velocity(self, x, t, cond=None):
        self.calls["old"].append((x.detach().clone(), t.detach().clone(), cond))
        return self.old(x, t)

    def reference_velocity(self, x, t, cond=None):
        self.calls["reference"].append((x.detach().clone(), t.detach().clone(), cond))
        return self.ref(x, t)

    def policies(self) -> Policies:
        return Policies(self.velocity, self.old_velocity, self.reference_velocity, solver=EulerSolver())


def _gen(seed=11):
    return torch.Generator().manual_seed(seed)


def _batch(n=64, times=None):
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(n, 3, generator=g)
    r = torch.rand(n, generator=g)
    return RolloutBatch(x1=x1, rewards=r, advantages=2 * r - 1, r=r, group=torch.arange(n), cond=None, times=times)


@pytest.mark.parametrize("space", ["velocity", "data"])
def test_objective_loss_matches_pure_function(space):
    policy = _TinyPolicy()
    batch = _batch()
    obj = NFTObjective(beta=0.5, space=space, substeps=3, time_sampler=TimeSampler("uniform", 0.1, 0.9))
    assert obj.effective_beta == 1.5 and obj.sampling_policy == "old" and not obj.needs_grid_times
    loss, logs = obj.loss(policy.policies(), batch, _gen())
    (x_t, t, _), (x_t_old, t_old, _) = policy.calls["current"][0], policy.calls["old"][0]
    torch.testing.assert_close(x_t_old, x_t)
    torch.testing.assert_close(t_old, t)
    assert t.shape == (64,) and bool(((t >= 0.1) & (t <= 0.9)).all())
    assert not policy.calls["reference"]  # no anchor, no reference forward pass
    x0 = (x_t - t[:, None] * batch.x1) / (1 - t[:, None])  # the noise the objective drew
    with torch.no_grad():
        expected = nft_loss(policy.current(x_t, t), policy.old(x_t, t), x0, batch.x1, x_t, t, batch.r, 1.5, space=space)
    torch.testing.assert_close(loss.detach(), expected.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["nft_loss"], expected.mean(), rtol=1e-5, atol=1e-6)
    assert "kl_anchor" not in logs and logs["old_deviation"] > 0
    loss.backward()
    assert all(p.grad is not None for p in policy.current.parameters())
    assert all(p.grad is None for p in policy.old.parameters())


def test_objective_adds_weighted_kl_anchor():
    policy = _TinyPolicy()
    batch = _batch()
    loss, logs = NFTObjective(beta=1.0).loss(policy.policies(), batch, _gen(), kl_weight=0.3)
    (x_t, t, _) = policy.calls["current"][0]
    (x_t_ref, t_ref, _) = policy.calls["reference"][0]
    torch.testing.assert_close(x_t_ref, x_t)
    with torch.no_grad():
        kl = ((policy.current(x_t, t) - policy.ref(x_t, t)) ** 2).mean()
    torch.testing.assert_close(logs["kl_anchor"], kl)
    torch.testing.assert_close(loss.detach(), logs["nft_loss"] + 0.3 * kl)


def test_objective_grid_times():
    grid = time_grid(4)  # 0, 0.25, 0.5, 0.75, 1
    obj = NFTObjective(time_source="grid")
    assert obj.needs_grid_times
    t = obj.sample_times(_batch(times=grid), 2000, torch.device("cpu"), torch.float32)
    assert set(t.tolist()) == {0.0, 0.25, 0.5, 0.75}
    restricted = NFTObjective(time_source="grid", time_sampler=TimeSampler("uniform", 0.2, 1.0))
    t = restricted.sample_times(_batch(times=grid), 2000, torch.device("cpu"), torch.float32)
    assert set(t.tolist()) == {0.25, 0.5, 0.75}
    policy = _TinyPolicy()
    obj.loss(policy.policies(), _batch(times=grid), _gen())
    assert set(policy.calls["current"][0][1].tolist()) <= {0.0, 0.25, 0.5, 0.75}
    with pytest.raises(ValueError, match="times"):
        obj.loss(policy.policies(), _batch(times=None), _gen())


@pytest.mark.parametrize("time_source", ["density", "grid"])
def test_objective_noise_comes_from_the_generator_only(time_source):
    """The loss noise ``(x0, t)`` is a function of the generator: equal seeds give equal losses, different
    seeds different ones, and the global torch generator is neither read nor advanced."""
    obj = NFTObjective(beta=0.7, time_source=time_source)
    batch = _batch(times=time_grid(8))
    policy = _TinyPolicy()
    losses = {}
    for seed in (1, 1, 2):
        torch.manual_seed(1234 + len(losses))  # a different global state before every call
        state = torch.random.get_rng_state()
        losses.setdefault(seed, []).append(obj.loss(policy.policies(), batch, _gen(seed))[0].detach())
        assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(losses[1][0], losses[1][1])
    assert not torch.equal(losses[1][0], losses[2][0])


# ------------------------------------------------------------------------------------------------
# Seed 000, Theorem 1.1 on a Gaussian mixture
# ------------------------------------------------------------------------------------------------

MIX_WEIGHTS = [0.3, 0.4, 0.3]
MIX_MEANS = [[-2.0, 0.0], [0.5, 1.5], [2.0, -1.0]]
MIX_STDS = [0.5, 0.6, 0.4]
DIRECTION = [0.5, 0.25]


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_theorem_1_1_trained_field_reaches_closed_form_optimum(beta):
    """v_old = exact mixture field (frozen), x1 ~ mixture, r = a.x1 used as is (E[r] = 0.175, values
    roughly in [-2, 2]: the theorem holds for any real r). The trained field is the exact field plus a
    zero-initialised MLP (``ResidualVelocity``; an MLP from scratch with the same budget reaches
    about 5.4% and fails). Adam with a one-cycle schedule, 3000 steps of 1024 fresh rollouts,
    t ~ U[0.05, 0.95]. Error: for each t in {0.1, ..., 0.9}, ||v_theta - v*|| / ||v*|| in L2(p_t)
    (4000 draws of x ~ p_t), averaged over t; must be <= 5% (observed 1.7% at beta = 2 and
    3.3-3.5% at beta = 0.5 over three seeds), while the untrained field (= v_old) is at >= 40%
    (observed 43% at beta = 2, 69% at beta = 0.5). The error relative to the correction
    v* - v_old is checked too (<= 15%; observed about 7%).
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mix = GaussianMixture(MIX_WEIGHTS, MIX_MEANS, MIX_STDS)
    a = torch.tensor(DIRECTION)
    model = ResidualVelocity(mix, MLPVelocity(dim=2, hidden=64, depth=3, zero_init=True))
    steps, batch_size, lr = 3000, 1024, 5e-3
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    times = TimeSampler("uniform", 0.05, 0.95)
    for _ in range(steps):
        x1 = mix.sample(batch_size)
        x0 = torch.randn_like(x1)
        t = times(batch_size)
        x_t = interpolate(x0, x1, t)
        with torch.no_grad():
            v_old = mix(x_t, t)
        loss = nft_loss(model(x_t, t), v_old, x0, x1, x_t, t, x1 @ a, beta).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    g = torch.Generator().manual_seed(123)
    rel, rel_init, rel_corr = [], [], []
    with torch.no_grad():
        for tv in torch.linspace(0.1, 0.9, 9):
            x1 = mix.sample(4000, generator=g)
            x0 = torch.randn(4000, 2, generator=g)
            tt = tv.expand(4000)
            x = interpolate(x0, x1, tt)
            v_star = mix.nft_optimum(x, tt, a, beta)
            v_old = mix(x, tt)
            err = ((model(x, tt) - v_star) ** 2).sum()
            rel.append(math.sqrt(err / (v_star**2).sum()))
            rel_init.append(math.sqrt(((v_old - v_star) ** 2).sum() / (v_star**2).sum()))
            rel_corr.append(math.sqrt(err / ((v_star - v_old) ** 2).sum()))
    mean_rel, mean_init, mean_corr = sum(rel) / 9, sum(rel_init) / 9, sum(rel_corr) / 9
    assert mean_init >= 0.40, f"test problem too easy: v_old is already within {mean_init:.3f} of v*"
    assert mean_rel <= 0.05, f"mean relative L2 error {mean_rel:.4f} > 5% (per t: {[round(x, 3) for x in rel]})"
    assert mean_corr <= 0.15, f"error relative to the correction {mean_corr:.4f} > 15%"
