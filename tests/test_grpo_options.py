"""GRPO options of issue 15, each against an independent computation on fixed tensors:

* ``GRPOObjective.loss`` with non-uniform temporal weights, ``log_prob_reduction="mean"``, the ``t_min``/``t_max``
  window, train-step subsets and fair clipping, against a per-step loop with its own Gaussian formulas;
* the branching estimator's variance against its closed form in the branch width;
* the equal-variance branching budget and switched-off steps;
* peer parity: Flow-GRPO's Euler-Maruyama step and KL term in Flow-GRPO's own variables, DiffusionNFT's
  raw-reward std.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_nft.advantages import normalize_rewards
from lightning_nft.analytic import GaussianMixture
from lightning_nft.objectives.base import Policies
from lightning_nft.objectives.grpo import GRPOObjective, fair_clip_loss, select_train_steps
from lightning_nft.rollouts import RolloutBatch
from lightning_nft.samplers import (
    BranchingSDESolver,
    FlowGRPOEulerMaruyamaNoise,
    FlowGRPONoise,
    SDESolver,
    equal_variance_shares,
    time_grid,
)

A_NOISE = 0.7
FIELD = GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -1.0]], 0.4)


class Shifted(nn.Module):
    """``v(x, t) + b``: the trained policy is the base field plus a learnable offset."""

    def __init__(self, b: torch.Tensor) -> None:
        super().__init__()
        self.b = nn.Parameter(b.clone())

    def forward(self, x, t, cond=None):
        return FIELD(x, t) + self.b


def _power_law_step(t: float, tn: float, k: float) -> tuple[float, float, float]:
    """``(F, G, Var)`` of the exact power-law step, from the closed form (independent of the library)."""
    f = (t / tn) ** (k / 2)
    var = 1 - f * f - k / (k + 1) * (tn - t * f * f)
    return f, tn - f * t, var


def _rollouts(seed: int, n: int = 12, steps: int = 6):
    g = torch.Generator().manual_seed(seed)
    solver = SDESolver(FlowGRPONoise(A_NOISE))
    times = time_grid(steps, dtype=torch.float64)
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    out = solver.sample(lambda x, t, c: FIELD(x, t), x0, times, generator=g, return_trajectory=True,
                        return_log_probs=True)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    batch = RolloutBatch(x1=out.samples, rewards=adv, advantages=adv, r=adv, group=torch.zeros(n, dtype=torch.long),
                         x0=x0, trajectory=out.trajectory, times=out.times, log_probs=out.log_probs)
    return solver, batch, g


def _reference_loss(policy: Shifted, batch: RolloutBatch, steps_sel: torch.Tensor, w: torch.Tensor, eps: float,
                    reduction: str, clipping: str) -> torch.Tensor:
    """Per-step loop: Gaussian log-densities from the closed-form step, the PPO surrogate, weights ``w[j]``."""
    k = A_NOISE ** 2
    ts = batch.times.tolist()
    dim = batch.x1.shape[1]
    terms = []
    for i in range(steps_sel.shape[0]):
        for j in steps_sel[i].tolist():
            f, g, var = _power_law_step(ts[j], ts[j + 1], k)
            x, xn = batch.trajectory[j, i:i + 1], batch.trajectory[j + 1, i:i + 1]
            mean = f * x + g * policy(x, torch.full((1,), ts[j], dtype=x.dtype))
            lp = torch.distributions.Normal(mean, math.sqrt(var)).log_prob(xn).sum()
            log_ratio = (lp - batch.log_probs[j, i]) / (dim if reduction == "mean" else 1)
            a = batch.advantages[i]
            c = g / math.sqrt(var) if clipping == "fair" else 1.0
            rho = torch.exp(log_ratio / c)
            surrogate = -torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a)
            terms.append(w[j] * c * surrogate)
    return torch.stack(terms).mean()


CASES = [  # (reduction, t_min, t_max, train_timesteps, clipping)
    ("sum", 0.0, 1.0, "all", "ratio"),
    ("mean", 0.0, 1.0, "all", "ratio"),
    ("sum", 0.3, 0.9, "all", "ratio"),
    ("sum", 0.0, 1.0, 3, "ratio"),
    ("mean", 0.1, 1.0, 0.5, "fair"),
    ("sum", 0.0, 1.0, "all", "fair"),
]


@pytest.mark.parametrize("reduction,t_min,t_max,subset,clipping", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_a_per_step_loop_with_non_uniform_weights(seed, reduction, t_min, t_max, subset, clipping):
    solver, batch, g = _rollouts(seed)
    n_steps = batch.times.numel() - 1
    w = torch.rand(n_steps, generator=g, dtype=torch.float64) * 3 + 0.1  # non-uniform: a wrong index fails
    w = w / w.mean()
    b = torch.randn(2, generator=g, dtype=torch.float64) * 0.4  # off-policy: ratios away from 1, clips bind
    eps = 0.1
    obj = GRPOObjective(clip_range=eps, temporal_weighting=w.tolist(), t_min=t_min, t_max=t_max,
                        train_timesteps=subset, log_prob_reduction=reduction, clipping=clipping)
    policy = Shifted(b).double()
    policies = Policies(velocity=policy, old_velocity=None, reference_velocity=lambda x, t, c: FIELD(x, t),
                        solver=solver)
    loss, logs = obj.loss(policies, batch, torch.Generator().manual_seed(99))
    loss.backward()
    grad = policy.b.grad.clone()

    tt = batch.times[:-1]
    eligible = ((tt >= t_min) & (tt <= t_max)).unsqueeze(0).expand(len(batch), -1).clone()
    steps_sel = select_train_steps(eligible, subset, generator=torch.Generator().manual_seed(99))
    if subset == "all":
        assert steps_sel.shape[1] == int(eligible[0].sum())
    twin = Shifted(b).double()
    ref = _reference_loss(twin, batch, steps_sel, w, eps, reduction, clipping)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-9, atol=1e-12), (float(loss), float(ref))
    assert torch.allclose(grad, twin.b.grad, rtol=1e-7, atol=1e-10)
    assert float(logs["clip_fraction"]) > 0  # the clip is exercised


def test_fair_clipping_keeps_the_on_policy_gradient_and_rescales_the_clip():
    """At the sampling policy fair and plain clipping give one gradient; off it the fair clip binds where
    ``log rho / c_j`` (not ``log rho``) leaves the trust region, per ``fair_clip_loss``'s formula."""
    for seed in range(3):
        solver, batch, _ = _rollouts(seed)
        grads = []
        for clipping in ("ratio", "fair"):
            policy = Shifted(torch.zeros(2, dtype=torch.float64)).double()
            policies = Policies(velocity=policy, old_velocity=None, reference_velocity=policy, solver=solver)
            loss, _ = GRPOObjective(clip_range=0.05, clipping=clipping).loss(policies, batch, torch.Generator())
            loss.backward()
            grads.append(policy.b.grad.clone())
        assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-12)
    log_ratio = torch.tensor([0.3, 0.3, -0.3, 0.01], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    c = torch.tensor([1.0, 10.0, 10.0, 0.5])
    out = fair_clip_loss(log_ratio, adv, c, 0.1)
    expected = -c * torch.minimum(torch.exp(log_ratio / c) * adv, torch.exp(log_ratio / c).clamp(0.9, 1.1) * adv)
    assert torch.allclose(out, expected)
    out.sum().backward()
    # row 0: log rho / c = 0.3 -> clipped (no gradient); rows 1-2: 0.03 inside -> gradient -A exp(0.03)
    assert log_ratio.grad[0] == 0 and log_ratio.grad[1] == pytest.approx(-math.exp(0.03), rel=1e-6)
    assert log_ratio.grad[2] == pytest.approx(math.exp(-0.03), rel=1e-6)


@pytest.mark.parametrize("width", [2, 4, 8, 16])
def test_branching_estimate_variance_falls_with_width_as_its_closed_form(width):
    """Branching at the last step with a linear reward ``r = a.x1`` and centred advantages: the per-block
    gradient of ``GRPOObjective.loss`` in a velocity offset is ``-G (1/W) S a`` with ``S`` a Wishart(W - 1, I)
    scatter matrix, so ``Var_i = G^2 (W - 1)(|a|^2 + a_i^2) / W^2`` (about ``1/W``: Reward Score Matching, Eq. 19)."""
    n_blocks = 3000 // width * 4
    a = torch.tensor([1.0, -0.5], dtype=torch.float64)
    times = time_grid(5, dtype=torch.float64)
    solver = BranchingSDESolver(FlowGRPONoise(A_NOISE), branch_width=width, branch_steps=[-1])
    offsets = nn.Parameter(torch.zeros(n_blocks, 2, dtype=torch.float64))
    block = torch.arange(n_blocks).repeat_interleave(width)

    def velocity(x, t, cond):
        return FIELD(x, t) + offsets[cond]

    g = torch.Generator().manual_seed(width)
    x0 = torch.randn(n_blocks * width, 2, generator=g, dtype=torch.float64)
    out = solver.sample(velocity, x0, times, block, generator=g, return_trajectory=True, return_log_probs=True)
    r = out.samples @ a
    adv = r - r.reshape(n_blocks, width).mean(1).repeat_interleave(width)
    batch = RolloutBatch(x1=out.samples, rewards=r, advantages=adv, r=adv, group=block, cond=block,
                         trajectory=out.trajectory, times=out.times, log_probs=out.log_probs)
    policies = Policies(velocity=velocity, old_velocity=None, reference_velocity=velocity, solver=solver)
    loss, _ = GRPOObjective(clip_range=0.2, branch_width=width, branch_steps=[-1]).loss(policies, batch, g)
    loss.backward()
    per_block = offsets.grad * n_blocks  # the loss is a mean over all n_blocks * W rows
    _, g_last, _ = _power_law_step(float(times[-2]), 1.0, A_NOISE ** 2)
    expected = g_last ** 2 * (width - 1) * (a.pow(2).sum() + a.pow(2)) / width ** 2
    mean_expected = -g_last * (width - 1) / width * a
    assert torch.allclose(per_block.mean(0), mean_expected, atol=4 * (expected / n_blocks).sqrt().max())
    ratio = per_block.var(0) / expected
    assert bool(((ratio > 0.85) & (ratio < 1.15)).all()), ratio


def test_equal_variance_budget_and_switched_off_steps():
    times = time_grid(8, dtype=torch.float64)
    noise = FlowGRPONoise(A_NOISE)
    shares = equal_variance_shares(noise, times)
    c2 = []
    for t, tn in zip(times[:-1].tolist(), times[1:].tolist()):
        _, gj, var = _power_law_step(t, tn, A_NOISE ** 2)
        c2.append(gj * gj / var)
    c2 = torch.tensor(c2, dtype=torch.float64)
    assert torch.allclose(shares, c2 / c2.sum(), rtol=1e-9)
    steps = [0, 2, 3, 5, 7]  # steps 1, 4, 6 switched off
    solver = BranchingSDESolver(noise, branch_width=2, branch_steps=steps, branch_probs="equal_variance")
    g = torch.Generator().manual_seed(0)
    out = solver.sample(lambda x, t, c: FIELD(x, t), torch.randn(40000, 2, generator=g, dtype=torch.float64), times,
                        generator=g, return_log_probs=True)
    picked = torch.isfinite(out.log_probs[:, ::2]).double().mean(1)  # share of blocks branching at each step
    target = torch.zeros(8, dtype=torch.float64)
    target[steps] = shares[steps] / shares[steps].sum()
    assert torch.allclose(picked, target, atol=4 * (target * (1 - target) / 20000).sqrt().max() + 1e-12)
    assert picked[[1, 4, 6]].sum() == 0


# ---------------------------------------------------------------------------------------------- peer parity


@pytest.mark.parametrize("seed", range(4))
def test_flow_grpo_euler_maruyama_step_matches_its_code_formula(seed):
    """The mean and std of ``FlowGRPOEulerMaruyamaNoise`` against Flow-GRPO's step in its own variables:
    noise level ``s = 1 - t``, ``dt = s' - s``, model output ``-v``, ``std_dev = a sqrt(s / (1 - where(s == 1, s_max, s)))``."""
    g = torch.Generator().manual_seed(seed)
    a = 0.3 + float(torch.rand(1, generator=g))
    times = time_grid(int(torch.randint(3, 12, (1,), generator=g)), time_shift=1.0 + 2 * float(torch.rand(1, generator=g)),
                      dtype=torch.float64)
    solver = SDESolver(FlowGRPOEulerMaruyamaNoise(a))
    sig = 1 - times
    s_max = float(sig[1])
    for j in range(times.numel() - 1):
        x = torch.randn(5, 3, generator=g, dtype=torch.float64)
        v = torch.randn(5, 3, generator=g, dtype=torch.float64)
        mean, std = solver.moments(x, v, times[j], times[j + 1])
        s, dt = sig[j], sig[j + 1] - sig[j]
        std_dev = torch.sqrt(s / (1 - torch.where(s == 1, torch.tensor(s_max, dtype=s.dtype), s))) * a
        mo = -v
        mean_ref = x * (1 + std_dev ** 2 / (2 * s) * dt) + mo * (1 + std_dev ** 2 * (1 - s) / (2 * s)) * dt
        assert torch.allclose(mean, mean_ref, rtol=1e-10, atol=1e-12)
        assert torch.allclose(std, (std_dev * torch.sqrt(-dt)).expand(5), rtol=1e-10)
    obj = GRPOObjective(sde_step="euler_maruyama", noise_level=a)
    assert isinstance(obj.default_solver().noise, FlowGRPOEulerMaruyamaNoise)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_flow_grpo_kl_divides_by_the_diffusion_coefficient(seed, reduction):
    """``kl_form="flow_grpo"``: ``|mu - mu_ref|^2 / (2 sigma_t^2)`` with Flow-GRPO's ``sigma_t``; ``"exact"``:
    divided by the step variance ``sigma_t^2 h`` instead. Both against Flow-GRPO's mean formula."""
    g = torch.Generator().manual_seed(seed)
    solver = SDESolver(FlowGRPOEulerMaruyamaNoise(A_NOISE))
    times = time_grid(5, dtype=torch.float64)
    x0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ref_field = lambda x, t, c: 0.5 * x * t[:, None]  # noqa: E731
    out = solver.sample(ref_field, x0, times, generator=g, return_trajectory=True, return_log_probs=True)
    offset = torch.randn(4, generator=g, dtype=torch.float64)
    current = lambda x, t, c: ref_field(x, t, c) + offset  # noqa: E731
    batch = RolloutBatch(x1=out.samples, rewards=torch.zeros(6), advantages=torch.zeros(6, dtype=torch.float64),
                         r=torch.zeros(6), group=torch.zeros(6, dtype=torch.long), trajectory=out.trajectory,
                         times=out.times, log_probs=out.log_probs)
    policies = Policies(velocity=current, old_velocity=None, reference_velocity=ref_field, solver=solver)
    kls = {}
    for form in ("flow_grpo", "exact"):
        obj = GRPOObjective(kl_weight=1.0, kl_form=form, log_prob_reduction=reduction)
        kls[form] = float(obj.loss(policies, batch, g)[1]["kl"])
    sig = 1 - times
    fg, ex = [], []
    for j in range(5):
        s, dt = sig[j], sig[j + 1] - sig[j]
        std_dev = torch.sqrt(s / (1 - torch.where(s == 1, sig[1], s))) * A_NOISE
        dmu = -offset * (1 + std_dev ** 2 * (1 - s) / (2 * s)) * dt  # model output -v, difference of the means
        sq = dmu.pow(2).sum() if reduction == "sum" else dmu.pow(2).mean()
        fg.append(sq / (2 * std_dev ** 2))
        ex.append(sq / (2 * std_dev ** 2 * (-dt)))
    assert kls["flow_grpo"] == pytest.approx(float(torch.stack(fg).mean()), rel=1e-9)
    assert kls["exact"] == pytest.approx(float(torch.stack(ex).mean()), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_raw_std_normalisation_is_diffusion_nft_release(seed):
    g = torch.Generator().manual_seed(seed)
    n_groups, k = 3, 5
    rewards = torch.randn(n_groups * k, generator=g, dtype=torch.float64) + torch.arange(n_groups).repeat_interleave(k) * 2.0
    group = torch.arange(n_groups).repeat_interleave(k)
    adv, r = normalize_rewards(rewards, group, "group", "raw", clip=1.5, eps=1e-4)
    means = rewards.reshape(n_groups, k).mean(1).repeat_interleave(k)
    std = (rewards - rewards.mean()).pow(2).mean().sqrt()
    expected = ((rewards - means) / (std + 1e-4)).clamp(-1.5, 1.5)
    assert torch.allclose(adv, expected, rtol=1e-12)
    assert torch.allclose(r, expected / 3.0 + 0.5, rtol=1e-12)
    pooled, _ = normalize_rewards(rewards, group, "group", "global", clip=1.5, eps=1e-4)
    assert not torch.allclose(adv, pooled)  # groups at different levels: the raw std is larger
