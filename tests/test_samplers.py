"""Tests for lightning_nft.samplers against closed forms (single Gaussian, Gaussian mixture of
lightning_nft.analytic), numerical quadrature (scipy) and Monte Carlo. CPU, a few seconds."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad
from torch import nn

from lightning_nft.analytic import GaussianMixture, component_weights
from lightning_nft.samplers import (
    EulerSolver,
    FlowGRPONoise,
    HeunSolver,
    MemorylessNoise,
    NoiseSchedule,
    PowerLawNoise,
    SampleOutput,
    SDESolver,
    ZeroNoise,
    build_solver,
    gaussian_log_prob,
    time_grid,
)

torch.set_num_threads(1)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------


class SingleGaussianField:
    """Exact velocity of N(m, s^2 I) data: v = m + (t s^2 - (1 - t)) / var (x - t m),
    var = (1 - t)^2 + t^2 s^2; the ODE flow map is x_t = t m + sqrt(var_t) x0."""

    def __init__(self, m: torch.Tensor, s: float) -> None:
        self.m, self.s = m, s

    def var(self, t):
        return (1 - t) ** 2 + t * t * self.s**2

    def __call__(self, x, t, cond=None):
        t = t.reshape(-1, *([1] * (x.dim() - 1)))
        return self.m + (t * self.s**2 - (1 - t)) / self.var(t) * (x - t * self.m)

    def flow_map(self, x0, t: float):
        return t * self.m + math.sqrt(self.var(t)) * x0


def power_law_reference(k: float, t: float, tn: float) -> tuple[float, float, float]:
    """(F, G, Var) of one exponential-integrator step for sigma^2 = k (1 - s)/s, by quadrature:
    c = sigma^2 / (2 (1 - s)), Phi(s) = exp(-int_s^tn c), F = Phi(t), G = int Phi (1 + c s),
    Var = int Phi^2 sigma^2."""

    def c(s):
        return k * (1 - s) / s / (2 * (1 - s)) if s < 1 else k / (2 * s)

    def phi(s):
        return 0.0 if s == 0.0 else math.exp(-quad(c, s, tn, epsabs=1e-13, epsrel=1e-12)[0])

    sigma2 = lambda s: k * (1 - s) / s  # noqa: E731
    F = phi(t)
    G = quad(lambda s: phi(s) * (1 + c(s) * s), t, tn, epsabs=1e-12, epsrel=1e-11)[0]
    V = quad(lambda s: phi(s) ** 2 * sigma2(s), t, tn, epsabs=1e-12, epsrel=1e-11, limit=200)[0]
    return F, G, V


def mixture() -> GaussianMixture:
    """Three well-separated components in 2-D (nearest means 6.4 apart, stds <= 0.7)."""
    return GaussianMixture([0.5, 0.3, 0.2], [[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], [0.5, 0.7, 0.4])


class ConstantSigma(NoiseSchedule):
    """A user schedule that defines only sigma(t) = 1 (no closed form: midpoint fallback)."""

    def sigma(self, t):
        return torch.ones_like(t)


class SigmaOnlyMemoryless(NoiseSchedule):
    """sigma^2 = 2 (1 - t)/t defined through sigma(t) only (midpoint fallback)."""

    def sigma(self, t):
        return torch.sqrt(2 * (1 - t) / t)


# ----------------------------------------------------------------------------------------------
# time grid
# ----------------------------------------------------------------------------------------------


def test_time_grid_uniform_and_shift_formula():
    g = time_grid(8)
    assert g.shape == (9,) and g.dtype == torch.get_default_dtype()
    torch.testing.assert_close(g, torch.linspace(0, 1, 9), rtol=0, atol=1e-7)

    # diffusers: sigma' = shift sigma / (1 + (shift - 1) sigma) on sigma = 1 - t
    shift = 3.0
    u = torch.linspace(0, 1, 11, dtype=F64)
    sigma = 1 - u
    expected = 1 - shift * sigma / (1 + (shift - 1) * sigma)
    got = time_grid(10, time_shift=shift, dtype=F64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    assert got[5] < 0.5  # shift > 1 spends more steps near the noise (t = 0)

    # other endpoints are kept, grid increasing, spacing still follows the shift map
    g2 = time_grid(6, t_start=0.2, t_end=0.9, time_shift=2.0, dtype=F64)
    assert g2[0] == 0.2 and g2[-1] == 0.9 and bool((g2.diff() > 0).all())
    s2 = 1 - g2
    unshifted = s2 / (2.0 - (2.0 - 1) * s2)  # inverse map: must be uniform
    torch.testing.assert_close(unshifted.diff(), unshifted.diff()[:1].expand(6), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_steps=0),
        dict(n_steps=2.5),
        dict(n_steps=4, t_start=0.5, t_end=0.5),
        dict(n_steps=4, t_start=0.7, t_end=0.2),
        dict(n_steps=4, t_start=-0.1),
        dict(n_steps=4, t_end=1.1),
        dict(n_steps=4, time_shift=0.0),
        dict(n_steps=4, time_shift=-2.0),
    ],
)
def test_time_grid_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        time_grid(**kwargs)


def test_sample_rejects_bad_times_and_undefined_log_probs():
    field = SingleGaussianField(torch.zeros(2), 0.5)
    x0 = torch.randn(4, 2)
    for bad in (torch.tensor([0.0]), torch.tensor([0.0, 0.5, 0.5, 1.0]), torch.tensor([0.5, 0.2]),
                torch.tensor([-0.1, 1.0]), torch.tensor([0.0, 1.2]), torch.zeros(2, 2)):
        with pytest.raises(ValueError):
            EulerSolver().sample(field, x0, bad)
    for ode in (EulerSolver(), HeunSolver(), SDESolver("zero")):
        with pytest.raises(ValueError, match="log-probs"):
            ode.sample(field, x0, time_grid(4), return_log_probs=True)


# ----------------------------------------------------------------------------------------------
# ODE solvers
# ----------------------------------------------------------------------------------------------


def test_zero_noise_sde_equals_euler_exactly():
    gm = mixture()
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    times = time_grid(17, time_shift=2.0)
    ode = EulerSolver().sample(gm, x0, times, return_trajectory=True)
    sde = SDESolver(ZeroNoise()).sample(gm, x0, times, return_trajectory=True,
                                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(ode.trajectory, sde.trajectory)
    assert torch.equal(ode.samples, sde.samples)
    mean, std = SDESolver("zero").transition(gm, x0, 0.3, 0.4)
    assert torch.equal(std, torch.zeros(256))
    assert torch.equal(mean, EulerSolver().step(gm, x0, 0.3, 0.4))


def test_heun_beats_euler_against_exact_flow_map():
    """Single Gaussian: the exact flow map x_1 = m + s x0 is known, so the global error is exact.
    Euler is first order (error halves when steps double), Heun second order (quarters)."""
    field = SingleGaussianField(torch.tensor([1.0, -2.0], dtype=F64), 0.5)
    x0 = torch.randn(512, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = field.flow_map(x0, 1.0)

    def err(solver, n):
        out = solver.sample(field, x0, time_grid(n, dtype=F64))
        return float((out.samples - exact).norm(dim=1).max())

    e = {(name, n): err(s, n) for name, s in (("euler", EulerSolver()), ("heun", HeunSolver())) for n in (20, 40, 80)}
    assert e[("heun", 20)] < e[("euler", 20)] / 20  # measured ~70x
    for n in (20, 40):
        r_euler, r_heun = e[("euler", n)] / e[("euler", 2 * n)], e[("heun", n)] / e[("heun", 2 * n)]
        assert 1.7 < r_euler < 2.3, r_euler
        assert 3.3 < r_heun < 4.7, r_heun
    # intermediate times follow the exact flow map too (measured max error 3e-4 at t = 0.5, 40 steps)
    out = HeunSolver().sample(field, x0, time_grid(40, dtype=F64), return_trajectory=True)
    torch.testing.assert_close(out.trajectory[20], field.flow_map(x0, 0.5), rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# the SDE step
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0.49, 1.0, 2.0, 3.5])
def test_power_law_step_matches_quadrature(k):
    """For a constant field v = u the exponential integrator is exact: mean F x + G u, variance Var,
    with F, G, Var computed here by quadrature from sigma^2 = k (1 - t)/t (includes t = 0 and t' = 1)."""
    solver = SDESolver(PowerLawNoise(k))
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=F64)
    u = torch.tensor([0.7, -0.4], dtype=F64)
    field = lambda x, t, c=None: u.expand_as(x)  # noqa: E731
    for t, tn in [(0.0, 0.05), (0.0, 1.0), (0.3, 0.31), (0.5, 0.7), (0.95, 1.0), (0.999, 1.0)]:
        F, G, V = power_law_reference(k, t, tn)
        mean, std = solver.transition(field, x, t, tn)
        torch.testing.assert_close(mean, F * x + G * u, rtol=1e-9, atol=1e-12)
        assert std.shape == (2,)
        torch.testing.assert_close(std**2, torch.full((2,), V, dtype=F64), rtol=1e-8, atol=1e-15)


def test_constant_field_transition_matches_monte_carlo():
    """One memoryless step 0.2 -> 0.5 of a constant field vs 20k Euler-Maruyama paths on 500 substeps."""
    gen = torch.Generator().manual_seed(3)
    u, x_start, t0, t1, n_sub, n = 1.5, 0.8, 0.2, 0.5, 500, 20000
    noise = MemorylessNoise()
    x = torch.full((n,), x_start, dtype=F64)
    ts = torch.linspace(t0, t1, n_sub + 1, dtype=F64)
    for s, s_next in zip(ts[:-1], ts[1:]):
        h = s_next - s
        c = noise.drift_coefficient(s)
        x = x + ((1 + c * s) * u - c * x) * h + noise.sigma(s) * h.sqrt() * torch.randn(n, generator=gen, dtype=F64)
    mean, std = SDESolver(noise).transition(lambda x, t, c=None: torch.full_like(x, u),
                                            torch.tensor([[x_start]], dtype=F64), t0, t1)
    mc_var = float(x.var())
    # MC standard errors: mean sqrt(var/n) ~ 0.003, variance sqrt(2/n) ~ 1% relative; EM bias O(1/500)
    assert abs(float(x.mean()) - float(mean)) < 0.015
    assert abs(mc_var / float(std) ** 2 - 1) < 0.04


def test_generic_schedule_uses_midpoint_fallback():
    """sigma-only subclass of the memoryless schedule: finite at t = 0, and (F, Var) converge to the
    closed form with the step size (relative error below 2e-3 at h = 0.01, shrinking when h halves)."""
    generic, exact = SigmaOnlyMemoryless(), MemorylessNoise()
    F0, V0 = generic.step_coefficients(torch.tensor(0.0, dtype=F64), torch.tensor(0.02, dtype=F64))
    assert 0 <= float(F0) < 1 and 0 < float(V0) < 1
    for t in (0.1, 0.5, 0.9):
        errs = []
        for h in (0.01, 0.005):
            args = torch.tensor(t, dtype=F64), torch.tensor(t + h, dtype=F64)
            (Fg, Vg), (Fe, Ve) = generic.step_coefficients(*args), exact.step_coefficients(*args)
            errs.append(max(float(abs(Fg / Fe - 1)), float(abs(Vg / Ve - 1))))
        assert errs[0] < 2e-3 and errs[1] < errs[0] / 3, (t, errs)


# ----------------------------------------------------------------------------------------------
# log-probs and trajectories
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", [MemorylessNoise(), FlowGRPONoise(0.7)])
def test_log_probs_match_torch_normal(noise):
    """Stored trajectory steps: the solver's log-probs equal torch.distributions.Normal with mean and std
    rebuilt independently (quadrature for F, G, Var; closed-form single-Gaussian velocity), and the
    standardised residuals of the stored steps are N(0, 1)."""
    field = SingleGaussianField(torch.tensor([1.0, -2.0, 0.5], dtype=F64), 0.6)
    x0 = torch.randn(400, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    times = time_grid(6, time_shift=1.5, dtype=F64)
    out = SDESolver(noise).sample(field, x0, times, generator=torch.Generator().manual_seed(1),
                                  return_trajectory=True, return_log_probs=True)
    assert out.trajectory.shape == (7, 400, 3) and out.log_probs.shape == (6, 400)
    assert torch.equal(out.trajectory[0], x0) and torch.equal(out.trajectory[-1], out.samples)
    residuals = []
    for i in range(6):
        t, tn = float(times[i]), float(times[i + 1])
        F, G, V = power_law_reference(noise.k, t, tn)
        x, x_next = out.trajectory[i], out.trajectory[i + 1]
        mean = F * x + G * field(x, torch.full((400,), t, dtype=F64))
        ref = torch.distributions.Normal(mean, math.sqrt(V)).log_prob(x_next).sum(-1)
        torch.testing.assert_close(out.log_probs[i], ref, rtol=1e-7, atol=1e-7)
        residuals.append((x_next - mean) / math.sqrt(V))
    z = torch.cat(residuals).flatten()  # 7200 draws: mean std-error 0.012, variance ~0.017
    assert abs(float(z.mean())) < 0.05 and abs(float(z.var()) - 1) < 0.07


def test_gaussian_log_prob_shapes_and_values():
    x, mean = torch.randn(5, 2, 3, 4), torch.randn(5, 2, 3, 4)
    std = torch.rand(5) + 0.5
    ref = torch.distributions.Normal(mean, std.reshape(5, 1, 1, 1)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), ref)
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.7),
                               torch.distributions.Normal(mean, 0.7).log_prob(x).flatten(1).sum(1))


def test_shapes_cond_and_per_sample_times():
    """Image-shaped states, a conditioning tensor, and (B,) per-sample times in transition."""
    seen = {}

    def field(x, t, cond):
        seen["t_shape"] = tuple(t.shape)
        return cond.reshape(-1, 1, 1, 1) - x

    x0 = torch.randn(3, 2, 4, 4)
    cond = torch.tensor([1.0, -1.0, 2.0])
    out = SDESolver("flow_grpo").sample(field, x0, time_grid(5), cond, return_trajectory=True,
                                        return_log_probs=True)
    assert isinstance(out, SampleOutput)
    assert out.samples.shape == (3, 2, 4, 4) and out.trajectory.shape == (6, 3, 2, 4, 4)
    assert out.log_probs.shape == (5, 3) and out.times.shape == (6,) and seen["t_shape"] == (3,)
    # per-sample times: row b equals the scalar-time transition at (t_b, t'_b)
    t, tn = torch.tensor([0.0, 0.3, 0.9]), torch.tensor([0.1, 0.5, 1.0])
    solver = SDESolver("memoryless")
    mean, std = solver.transition(field, x0, t, tn, cond)
    for b in range(3):
        m_b, s_b = solver.transition(field, x0[b:b + 1], float(t[b]), float(tn[b]), cond[b:b + 1])
        torch.testing.assert_close(mean[b:b + 1], m_b)
        torch.testing.assert_close(std[b:b + 1], s_b)


def test_grad_modes_and_generator_reproducibility():
    net = nn.Linear(2, 2)
    field = lambda x, t, c=None: net(x) * t[:, None]  # noqa: E731
    x0 = torch.randn(8, 2)
    solver = SDESolver("memoryless")
    with torch.enable_grad():
        out = solver.sample(field, x0, time_grid(4), return_log_probs=True)
    assert not out.samples.requires_grad and not out.log_probs.requires_grad
    # transition follows the caller's grad mode: differentiable log-prob of a stored step
    mean, std = solver.transition(field, x0, 0.25, 0.5)
    gaussian_log_prob(out.samples, mean, std).sum().backward()
    assert net.weight.grad is not None and float(net.weight.grad.abs().sum()) > 0
    with torch.no_grad():
        assert not solver.transition(field, x0, 0.25, 0.5)[0].requires_grad

    def run(seed):
        return solver.sample(field, x0, time_grid(4), generator=torch.Generator().manual_seed(seed)).samples

    assert torch.equal(run(7), run(7)) and not torch.equal(run(7), run(8))


# ----------------------------------------------------------------------------------------------
# distributions: the exact Gaussian-mixture field
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, solver, n_steps, std_tol",
    [
        ("euler", EulerSolver(), 100, 0.06),
        ("heun", HeunSolver(), 50, 0.06),
        ("memoryless", SDESolver("memoryless"), 100, 0.06),
        ("flow_grpo", SDESolver("flow_grpo", a=0.7), 100, 0.06),
        # sigma = 1: c = 1/(2(1 - t)) is stiff near t = 1 and the midpoint fallback is only first
        # order there (measured relative std error ~0.08 at 100 steps), hence the looser tolerance
        ("generic_const_sigma", SDESolver(ConstantSigma()), 100, 0.15),
    ],
)
def test_mixture_weights_means_stds(name, solver, n_steps, std_tol):
    """20k samples from the exact mixture field. Weights within 0.02: binomial std
    sqrt(0.25 / 20000) ~ 0.0035 plus the discretisation bias (measured < 0.015). Component means within
    0.06 (MC std-error <= 0.7/sqrt(4000) ~ 0.011; Euler's O(h) bias ~0.03 at 100 steps) and component
    stds within std_tol relative (first-order bias ~ 0.02 at 100 steps, MC ~ 0.011 per coordinate)."""
    gm = mixture()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(20000, 2, generator=gen)
    x = solver.sample(gm, x0, time_grid(n_steps), generator=gen).samples
    assert torch.isfinite(x).all()
    w = component_weights(gm, x)
    assert float((w - gm.weights).abs().max()) < 0.02, (name, w)
    labels = gm.classify(x)
    for k in range(3):
        xk = x[labels == k]
        assert float((xk.mean(0) - gm.means[k]).abs().max()) < 0.06, (name, k, xk.mean(0))
        assert float((xk.std(0) / gm.stds[k] - 1).abs().max()) < std_tol, (name, k, xk.std(0))


def test_memoryless_sde_forgets_initial_noise():
    """Seed 004: under sigma^2 = 2 (1 - t)/t, X_1 is independent of X_0; the ODE map is x1 = m + s x0."""
    field = SingleGaussianField(torch.tensor([1.0, -2.0], dtype=F64), 0.5)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4000, 2, generator=gen, dtype=F64)

    def corr(solver):
        x1 = solver.sample(field, x0, time_grid(50, dtype=F64), generator=gen).samples
        return float(torch.corrcoef(torch.stack([x0[:, 0], x1[:, 0]]))[0, 1])

    assert corr(EulerSolver()) > 0.999
    assert abs(corr(SDESolver("memoryless"))) < 0.06  # sample-correlation std-error 1/sqrt(4000) ~ 0.016


# ----------------------------------------------------------------------------------------------
# construction (build_solver, YAML class_path)
# ----------------------------------------------------------------------------------------------


def test_build_solver_and_noise_specs():
    assert type(build_solver("euler")) is EulerSolver and type(build_solver("Heun")) is HeunSolver
    assert type(build_solver("sde").noise) is MemorylessNoise
    fg = build_solver("sde", noise="flow_grpo", a=0.5).noise
    assert isinstance(fg, FlowGRPONoise) and fg.k == pytest.approx(0.25)
    assert build_solver("sde", noise=1.5).noise.k == 1.5 and type(build_solver("sde", noise=1.5).noise) is PowerLawNoise
    assert isinstance(build_solver("sde", noise="zero").noise, ZeroNoise)
    assert isinstance(build_solver("sde", noise=0.0).noise, ZeroNoise)
    t = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(MemorylessNoise().sigma(t) ** 2, 2 * (1 - t) / t)
    torch.testing.assert_close(FlowGRPONoise(0.7).sigma(t), 0.7 * torch.sqrt((1 - t) / t))
    for bad in (lambda: build_solver("rk4"), lambda: build_solver("sde", noise="loud"),
                lambda: PowerLawNoise(-1.0), lambda: FlowGRPONoise(0.0), lambda: build_solver("euler", noise=1)):
        with pytest.raises((ValueError, TypeError)):
            bad()


def test_solvers_from_yaml_class_path():
    import jsonargparse  # LightningCLI's parser

    from lightning_nft.samplers import Solver

    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--solver", type=Solver)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    cfg = parser.parse_string(
        "solver:\n  class_path: lightning_nft.samplers.SDESolver\n  init_args:\n    noise: flow_grpo\n    a: 0.5\n"
    )
    solver = instantiate(cfg).solver
    assert isinstance(solver, SDESolver) and solver.noise.k == pytest.approx(0.25)
    cfg = parser.parse_string(
        "solver:\n  class_path: lightning_nft.samplers.SDESolver\n  init_args:\n    noise:\n"
        "      class_path: lightning_nft.samplers.PowerLawNoise\n      init_args:\n        k: 1.5\n"
    )
    assert instantiate(cfg).solver.noise.k == 1.5
    cfg = parser.parse_string("solver:\n  class_path: lightning_nft.samplers.SDESolver\n  init_args:\n    noise: 3.0\n")
    assert type(instantiate(cfg).solver.noise) is PowerLawNoise and instantiate(cfg).solver.noise.k == 3.0
    cfg = parser.parse_string("solver:\n  class_path: lightning_nft.samplers.HeunSolver\n")
    assert isinstance(instantiate(cfg).solver, HeunSolver)
