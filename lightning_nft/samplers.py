r"""ODE and SDE solvers for flow-matching velocity fields, with trajectories and log-probs.

Convention (``paths``): ``x_t = (1 - t) x0 + t x1``, noise ``x0 ~ N(0, I)`` at ``t = 0``, data at
``t = 1``; a velocity field is called as ``velocity(x (B, *S), t (B,), cond) -> (B, *S)``.

**ODE.** ``dX = v(X, t) dt`` from ``X_0 = x0``: :class:`EulerSolver` (first order) and
:class:`HeunSolver` (second-order predictor-corrector).

**SDE** (Adjoint Matching, arXiv:2409.08861, "Flow Matching Generative SDE"). With the score
``s = grad log p_t = (t v - x) / (1 - t)`` (:func:`lightning_nft.paths.score_from_velocity`),

.. math::

    dX = \big[v + \tfrac{\sigma(t)^2}{2} s\big] dt + \sigma(t) dB
       = \big[(1 + c(t)\, t)\, v - c(t)\, X\big] dt + \sigma(t) dB,
    \qquad c(t) = \frac{\sigma(t)^2}{2 (1 - t)},

has the marginals ``p_t`` of the ODE for *any* noise schedule ``sigma``. The schedules shipped
here form the power-law family ``sigma(t)^2 = k (1 - t) / t`` (``c = k / (2 t)``):
``k = 2`` is the memoryless schedule ``sigma = sqrt(2 eta_t)``, ``eta_t = (1 - t) / t`` of
Adjoint Matching (Adjoint Matching paper: ``X_0`` and ``X_1`` independent, drift ``2 v - x / t``), and
``k = a^2`` is Flow-GRPO's ``sigma = a sqrt((1 - t) / t)``.

``c`` is infinite at ``t = 0`` (Euler-Maruyama would have ``c dt = 1`` on the first step of the
memoryless SDE and the wrong variance), so one step ``t -> t' = t + h`` integrates the linear
part ``-c X`` exactly with ``v`` frozen at ``v(X_t, t)`` (exponential integrator). With
``Phi(s) = exp(-int_s^{t'} c)`` and ``F = Phi(t)`` the step is Gaussian:

.. math::

    X_{t'} \mid X_t = x \sim N\big(F x + G v,\; \mathrm{Var}\, I\big), \quad
    G = \int_t^{t'} \Phi(s) (1 + c(s) s)\, ds = t' - F t, \quad
    \mathrm{Var} = \int_t^{t'} \Phi(s)^2 \sigma(s)^2 ds .

(``G = t' - F t`` holds for every ``c`` because ``d/ds [Phi(s) s] = Phi(s)(1 + c(s) s)``.)
Equivalently the mean is the Euler step minus a shrinkage of the noise prediction:
``x + h v - (1 - F)(x - t v)``. For the power law (``Phi(s) = (s / t')^{k/2}``)

.. math::

    F = (t / t')^{k/2}, \qquad
    \mathrm{Var} = \frac{k}{t'^k} \Big[\frac{s^k}{k} - \frac{s^{k+1}}{k+1}\Big]_{s=t}^{t'}
                 = 1 - F^2 - \frac{k}{k+1}\,(t' - t F^2),

finite at ``t = 0`` (``F = 0``, ``Var = 1 - k t' / (k + 1)``) and positive up to ``t' = 1``.
``sigma = 0`` gives ``F = 1``, ``G = h``, ``Var = 0``: exactly the Euler ODE step.
Note that *every* power law with ``k > 0`` satisfies Adjoint Matching paper's memorylessness condition
(``sigma^2 = 2 eta + chi`` with ``chi = (k - 2)(1 - t)/t``: ``alpha_t' exp(-int chi / (2 beta^2))
~ t'^{k/2} -> 0``), and the exact step from ``t = 0`` has ``F = 0`` for every ``k``; only ``k = 2``
gives Adjoint Matching's drift ``2 v - x / t``. (Flow-GRPO's reference code clips ``sigma`` near
``t = 0`` instead; here the first step is integrated exactly.) A user schedule
that defines only ``sigma(t)`` uses the same integrator with ``c`` and ``sigma`` frozen at the
step midpoint ``t_m``: ``F = exp(-c(t_m) h)``, ``Var = (1 - t_m)(1 - F^2)``.

Every SDE step is Gaussian with isotropic std ``sqrt(Var)`` per sample, so the log-density of a
stored step (Flow-GRPO's policy ratio) is :func:`gaussian_log_prob`. Coefficients are computed in
float64 and cast to ``x``'s dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from lightning_nft.paths import expand_like

# Same alias as ``lightning_nft.policy.VelocityFn`` (policy imports this module, so not imported here).
VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]
TimeLike = Union[float, Tensor]

__all__ = [
    "time_grid",
    "NoiseSchedule",
    "ZeroNoise",
    "PowerLawNoise",
    "MemorylessNoise",
    "FlowGRPONoise",
    "build_noise",
    "SampleOutput",
    "Solver",
    "EulerSolver",
    "HeunSolver",
    "SDESolver",
    "gaussian_log_prob",
    "build_solver",
]


# ----------------------------------------------------------------------------------------------
# Time grids
# ----------------------------------------------------------------------------------------------


def _shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """diffusers' shift on ``sigma = 1 - t``: ``sigma' = shift sigma / (1 + (shift - 1) sigma)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _unshift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """Inverse of :func:`_shift_sigma`: ``sigma = sigma' / (shift - (shift - 1) sigma')``."""
    return sigma / (shift - (shift - 1) * sigma)


def time_grid(
    n_steps: int,
    t_start: float = 0.0,
    t_end: float = 1.0,
    time_shift: float = 1.0,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Increasing times ``(n_steps + 1,)`` from ``t_start`` to ``t_end`` (both included).

    ``time_shift = 1`` gives a uniform grid. Otherwise the grid is uniform in the *unshifted* time
    and mapped through diffusers' shift on ``sigma = 1 - t``,
    ``sigma' = time_shift sigma / (1 + (time_shift - 1) sigma)`` (SD3 uses ``time_shift = 3``; ``time_shift > 1``
    spends more steps near the noise, ``t = 0``). The endpoints are fixed points of the map when
    ``t_start = 0`` and ``t_end = 1`` (then the grid is exactly diffusers' shifted linspace);
    for other endpoints the uniform grid runs between their pre-images, so the returned grid
    still starts at ``t_start`` and ends at ``t_end``.
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    t_start, t_end, time_shift = float(t_start), float(t_end), float(time_shift)
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"need 0 <= t_start < t_end <= 1, got t_start={t_start}, t_end={t_end}")
    if not (time_shift > 0.0 and math.isfinite(time_shift)):
        raise ValueError(f"time_shift must be a positive finite number, got {time_shift}")
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    if time_shift == 1.0:
        grid = torch.linspace(t_start, t_end, n_steps + 1, dtype=torch.float64)
    else:
        ends = torch.tensor([1.0 - t_start, 1.0 - t_end], dtype=torch.float64)
        lo, hi = _unshift_sigma(ends, time_shift).tolist()
        sigma = torch.linspace(lo, hi, n_steps + 1, dtype=torch.float64)
        grid = 1.0 - _shift_sigma(sigma, time_shift)
        grid[0], grid[-1] = t_start, t_end
    return grid.to(device=device, dtype=dtype)


def _check_times(times: Tensor) -> list[float]:
    """Validate a time grid (1-D, >= 2 points, strictly increasing, inside [0, 1]); return floats."""
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError(f"times must be a 1-D tensor with at least 2 points, got shape {tuple(times.shape)}")
    ts = [float(v) for v in times.detach().cpu().double().tolist()]
    if not all(math.isfinite(v) for v in ts) or ts[0] < 0.0 or ts[-1] > 1.0:
        raise ValueError(f"times must lie in [0, 1], got [{ts[0]}, {ts[-1]}]")
    if any(b <= a for a, b in zip(ts[:-1], ts[1:])):
        raise ValueError("times must be strictly increasing (noise at t=0 -> data at t=1)")
    return ts


def _coef_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _as_time64(t: TimeLike) -> Tensor:
    """A time as a float64 tensor (0-d or ``(B,)``) for the step coefficients."""
    if isinstance(t, Tensor):
        return t.detach().to(_coef_dtype(t.device))
    return torch.tensor(float(t), dtype=torch.float64)


def _batch_times(t: TimeLike, x: Tensor) -> Tensor:
    """``t`` as a ``(B,)`` tensor in ``x``'s dtype and device, for calling a velocity field."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape (B,) = ({x.shape[0]},); got {tuple(t.shape)}")
    return t


# ----------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------


class NoiseSchedule:
    r"""Diffusion coefficient ``sigma(t)`` of the generative SDE (Adjoint Matching paper).

    Subclasses define :meth:`sigma`; a closed-form :meth:`step_coefficients` is optional. The
    default one freezes ``c = sigma^2 / (2 (1 - t))`` and ``sigma`` at the step midpoint
    ``t_m = (t + t') / 2``: ``F = exp(-c(t_m) h)``, ``Var = (1 - t_m)(1 - F^2)`` (exact for a
    constant ``c``; first-order accurate otherwise, and finite for schedules that blow up at
    ``t = 0`` since ``t_m > 0``).
    """

    def sigma(self, t: Tensor) -> Tensor:
        """Elementwise ``sigma(t)`` for ``t`` in ``(0, 1)``; same shape as ``t``."""
        raise NotImplementedError

    def drift_coefficient(self, t: Tensor) -> Tensor:
        """``c(t) = sigma(t)^2 / (2 (1 - t))``, the weight of the score term (``t < 1``)."""
        t = torch.as_tensor(t)
        return self.sigma(t) ** 2 / (2 * (1 - t))

    def step_coefficients(self, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        """Decay ``F = exp(-int_t^{t'} c)`` and noise variance ``Var = int Phi^2 sigma^2`` of one step.

        ``t``, ``t_next``: float tensors (0-d or ``(B,)``), ``0 <= t < t_next <= 1``.
        Returns ``(F, Var)`` broadcast to the shape of ``t``/``t_next``. The mean coefficient of
        the velocity is ``G = t_next - F t`` (module docstring).
        """
        h = t_next - t
        tm = t + 0.5 * h
        c = self.drift_coefficient(tm)
        decay = torch.exp(-c * h)
        var = (1 - tm) * -torch.expm1(-2 * c * h)
        return decay, var.clamp_min(0.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ZeroNoise(NoiseSchedule):
    """``sigma = 0``: the SDE solver takes exactly the Euler ODE step (``F = 1``, ``Var = 0``)."""

    def sigma(self, t: Tensor) -> Tensor:
        return torch.zeros_like(torch.as_tensor(t))

    def step_coefficients(self, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        shape = torch.broadcast_shapes(t.shape, t_next.shape)
        one = torch.ones(shape, dtype=t.dtype, device=t.device)
        return one, torch.zeros_like(one)


class PowerLawNoise(NoiseSchedule):
    r"""``sigma(t)^2 = k (1 - t) / t`` (``k > 0``), with closed-form step coefficients.

    ``c = k / (2 t)``, ``Phi(s) = (s / t')^{k/2}``, ``F = (t / t')^{k/2}`` and
    ``Var = k t'^{-k} [s^k / k - s^{k+1} / (k + 1)]_t^{t'} = 1 - F^2 - k (t' - t F^2) / (k + 1)``
    (evaluated with ``expm1`` for accuracy at small steps). ``k = 2``: memoryless (Adjoint Matching paper);
    ``k = a^2``: Flow-GRPO.
    """

    def __init__(self, k: float = 2.0) -> None:
        k = float(k)
        if not (k > 0.0 and math.isfinite(k)):
            raise ValueError(f"k must be a positive finite number (use ZeroNoise for k = 0), got {k}")
        self.k = k

    def sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        return torch.sqrt(self.k * (1 - t) / t)

    def step_coefficients(self, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        k = self.k
        log_ratio = torch.log(t) - torch.log(t_next)  # -inf at t = 0
        decay = torch.exp(0.5 * k * log_ratio)
        one_minus_f2 = -torch.expm1(k * log_ratio)  # 1 - F^2
        h = t_next - t
        # 1 - F^2 - k/(k+1) (t' - t F^2), with t' - t F^2 = h + t (1 - F^2)
        var = one_minus_f2 * (1 - k * t / (k + 1)) - k * h / (k + 1)
        return decay, var.clamp_min(0.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k})"


class MemorylessNoise(PowerLawNoise):
    """Adjoint Matching's memoryless schedule ``sigma(t)^2 = 2 eta_t = 2 (1 - t) / t`` (Adjoint Matching paper).

    The drift becomes ``2 v - x / t`` and ``X_1`` is independent of ``X_0``.
    """

    def __init__(self) -> None:
        super().__init__(k=2.0)

    def __repr__(self) -> str:
        return "MemorylessNoise()"


class FlowGRPONoise(PowerLawNoise):
    """Flow-GRPO's schedule ``sigma(t) = a sqrt((1 - t) / t)`` (power law with ``k = a^2``)."""

    def __init__(self, a: float = 0.7) -> None:
        a = float(a)
        if not (a > 0.0 and math.isfinite(a)):
            raise ValueError(f"a must be a positive finite number, got {a}")
        self.a = a
        super().__init__(k=a * a)

    def __repr__(self) -> str:
        return f"FlowGRPONoise(a={self.a})"


NoiseLike = Union[NoiseSchedule, str, float]


def build_noise(noise: NoiseLike = "memoryless", a: float = 0.7) -> NoiseSchedule:
    """A :class:`NoiseSchedule` from a spec: an instance, ``"memoryless"``, ``"flow_grpo"`` (with
    ``a``), ``"zero"``, or a number ``k`` (``PowerLawNoise(k)``; ``k = 0`` is :class:`ZeroNoise`)."""
    if isinstance(noise, NoiseSchedule):
        return noise
    if isinstance(noise, str):
        name = noise.strip().lower().replace("-", "_")
        if name == "memoryless":
            return MemorylessNoise()
        if name in ("flow_grpo", "flowgrpo"):
            return FlowGRPONoise(a=a)
        if name in ("zero", "none", "ode"):
            return ZeroNoise()
        try:
            noise = float(name)
        except ValueError:
            raise ValueError(
                f"unknown noise schedule {noise!r}; use 'memoryless', 'flow_grpo', 'zero', a number k "
                "or a NoiseSchedule"
            ) from None
    if isinstance(noise, (int, float)) and not isinstance(noise, bool):
        return ZeroNoise() if float(noise) == 0.0 else PowerLawNoise(k=float(noise))
    raise TypeError(f"cannot build a noise schedule from {noise!r}")


# ----------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------


@dataclass
class SampleOutput:
    """Result of :meth:`Solver.sample`.

    samples: ``(B, *S)`` state at ``times[-1]``; times: ``(T + 1,)`` the grid used;
    trajectory: ``(T + 1, B, *S)`` states at every grid time (``trajectory[0] = x0``) or ``None``;
    log_probs: ``(T, B)`` log-density of each SDE transition ``x_{i+1} | x_i`` or ``None``.
    """

    samples: Tensor
    times: Tensor
    trajectory: Optional[Tensor] = None
    log_probs: Optional[Tensor] = None


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Union[Tensor, float]) -> Tensor:
    r"""``log N(x_next; mean, std^2 I)`` summed over the non-batch dims: ``(B,)``.

    ``x_next``, ``mean``: ``(B, *S)``; ``std``: float, 0-d or ``(B,)`` (isotropic per sample).
    ``-|x_next - mean|^2 / (2 std^2) - D log std - D/2 log(2 pi)`` with ``D = prod(S)``.
    """
    std = expand_like(std, x_next)
    z = (x_next - mean) / std
    elem = -0.5 * z * z - torch.log(std) - 0.5 * math.log(2 * math.pi)
    elem = elem.expand_as(x_next)
    return elem.reshape(x_next.shape[0], -1).sum(dim=1)


class Solver:
    """Integrates ``dX = v dt`` (ODE) or the generative SDE from ``times[0]`` to ``times[-1]``.

    Subclasses implement :meth:`step`; ``stochastic`` solvers also :meth:`transition`.
    """

    stochastic: bool = False

    def step(
        self,
        velocity: VelocityFn,
        x: Tensor,
        t: TimeLike,
        t_next: TimeLike,
        cond: Any = None,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """One step ``x (B, *S)`` at ``t`` -> state at ``t_next``; runs in the caller's grad mode."""
        raise NotImplementedError

    def _step_with_log_prob(
        self,
        velocity: VelocityFn,
        x: Tensor,
        t: float,
        t_next: float,
        cond: Any,
        generator: Optional[torch.Generator],
    ) -> tuple[Tensor, Tensor]:
        """One step and the log-density ``(B,)`` of the state it drew (stochastic solvers only)."""
        self._check_log_probs_defined()
        raise NotImplementedError

    def sample(
        self,
        velocity: VelocityFn,
        x0: Tensor,
        times: Tensor,
        cond: Any = None,
        *,
        generator: Optional[torch.Generator] = None,
        return_trajectory: bool = False,
        return_log_probs: bool = False,
    ) -> SampleOutput:
        """Integrate from ``x0`` (``(B, *S)``, at ``times[0]``) over ``times`` (``(T + 1,)``, increasing).

        ``velocity(x, t (B,), cond)`` is evaluated under ``torch.no_grad()`` (recompute
        differentiable log-probs with :meth:`SDESolver.transition`). ``generator`` drives the SDE
        noise (``None``: the global RNG). Returns :class:`SampleOutput`.
        """
        if not isinstance(times, Tensor):
            times = torch.as_tensor(times, dtype=x0.dtype, device=x0.device)
        ts = _check_times(times)
        if return_log_probs:
            self._check_log_probs_defined()
        x = x0
        traj = [x0] if return_trajectory else None
        logps: list[Tensor] = []
        with torch.no_grad():
            for t, t_next in zip(ts[:-1], ts[1:]):
                if return_log_probs:
                    x, lp = self._step_with_log_prob(velocity, x, t, t_next, cond, generator)
                    logps.append(lp)
                else:
                    x = self.step(velocity, x, t, t_next, cond, generator=generator)
                if traj is not None:
                    traj.append(x)
        return SampleOutput(
            samples=x,
            times=times,
            trajectory=torch.stack(traj) if traj is not None else None,
            log_probs=torch.stack(logps) if return_log_probs else None,
        )

    def _check_log_probs_defined(self) -> None:
        raise ValueError(
            f"{type(self).__name__} is deterministic: transition log-probs are not defined for an ODE "
            "solver; use SDESolver with a non-zero noise schedule"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _dt(t: TimeLike, t_next: TimeLike, x: Tensor) -> Tensor:
    """``t_next - t`` computed in float64, cast to ``x``'s dtype, broadcastable against ``x``."""
    return expand_like(_as_time64(t_next) - _as_time64(t), x)


class EulerSolver(Solver):
    """Explicit Euler: ``x' = x + h v(x, t)``, ``h = t' - t`` (first order)."""

    def step(self, velocity, x, t, t_next, cond=None, *, generator=None):
        v = velocity(x, _batch_times(t, x), cond)
        return x + _dt(t, t_next, x) * v


class HeunSolver(Solver):
    """Heun (explicit trapezoid, second order):

    ``x~ = x + h v(x, t)``, ``x' = x + h/2 [v(x, t) + v(x~, t')]``. Needs ``v`` finite at
    ``t' = 1`` on the last step (true for rectified-flow fields with non-degenerate data,
    where ``v(x, 1) = x - E[X0] = x``). Two velocity evaluations per step.
    """

    def step(self, velocity, x, t, t_next, cond=None, *, generator=None):
        h = _dt(t, t_next, x)
        v = velocity(x, _batch_times(t, x), cond)
        x_pred = x + h * v
        v_next = velocity(x_pred, _batch_times(t_next, x), cond)
        return x + 0.5 * h * (v + v_next)


def _standard_normal(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """``N(0, I)`` noise shaped like ``x``, drawn on the generator's device and moved to ``x``'s.

    Rollout callbacks seed CPU generators (one per rank and round), which CUDA sampling refuses;
    drawing on the generator's device keeps the stream identical on every device.
    """
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class SDESolver(Solver):
    r"""Generative SDE ``dX = [(1 + c t) v - c X] dt + sigma dB`` (module docstring; Adjoint Matching paper).

    Each step is Gaussian, ``N(F x + (t' - F t) v(x, t), Var I)``, with ``(F, Var)`` from
    ``noise.step_coefficients`` (closed form for the power-law schedules). ``noise``: a
    :class:`NoiseSchedule` or a spec for :func:`build_noise` (``"memoryless"``, ``"flow_grpo"``
    with ``a``, ``"zero"``, a number ``k``). :class:`ZeroNoise` reproduces :class:`EulerSolver`
    exactly.
    """

    stochastic = True

    def __init__(self, noise: NoiseLike = "memoryless", a: float = 0.7) -> None:
        self.noise = build_noise(noise, a=a)

    def moments(self, x: Tensor, v: Tensor, t: TimeLike, t_next: TimeLike) -> tuple[Tensor, Tensor]:
        """Mean ``(B, *S)`` and std ``(B,)`` of ``X_{t'} | X_t = x`` given the velocity ``v = v(x, t)``.

        Differentiable in ``x`` and ``v`` (the coefficients depend on the times only).
        """
        t64, tn64 = _as_time64(t), _as_time64(t_next)
        if t64.device != tn64.device:
            tn64 = tn64.to(t64.device)
        decay, var = self.noise.step_coefficients(t64, tn64)
        g = tn64 - decay * t64
        mean = expand_like(decay, x) * x + expand_like(g, x) * v
        std = var.sqrt().to(device=x.device, dtype=x.dtype)
        if std.dim() == 0:
            std = std.expand(x.shape[0])
        return mean, std

    def transition(
        self, velocity: VelocityFn, x: Tensor, t: TimeLike, t_next: TimeLike, cond: Any = None
    ) -> tuple[Tensor, Tensor]:
        """Gaussian step ``X_{t'} | X_t = x``: returns ``(mean (B, *S), std (B,))``.

        ``t``, ``t_next``: floats, 0-d or ``(B,)`` tensors (per-sample times allowed). Runs under
        the caller's grad mode, so ``gaussian_log_prob(x_next, *transition(...))`` is
        differentiable in the velocity's parameters (GRPO's recomputed log-probs).
        """
        v = velocity(x, _batch_times(t, x), cond)
        return self.moments(x, v, t, t_next)

    def step(self, velocity, x, t, t_next, cond=None, *, generator=None):
        mean, std = self.transition(velocity, x, t, t_next, cond)
        noise = _standard_normal(x, generator)
        return mean + expand_like(std, x) * noise

    def _check_log_probs_defined(self) -> None:
        if isinstance(self.noise, ZeroNoise):
            raise ValueError(
                "log-probs are not defined with ZeroNoise (every transition is a point mass); "
                "use a non-zero noise schedule"
            )

    def _step_with_log_prob(self, velocity, x, t, t_next, cond, generator):
        mean, std = self.transition(velocity, x, t, t_next, cond)
        noise = _standard_normal(x, generator)
        x_next = mean + expand_like(std, x) * noise
        return x_next, gaussian_log_prob(x_next, mean, std)

    def __repr__(self) -> str:
        return f"SDESolver(noise={self.noise!r})"


def build_solver(name: str = "euler", **kwargs: Any) -> Solver:
    """``"euler"`` -> :class:`EulerSolver`, ``"heun"`` -> :class:`HeunSolver`, ``"sde"`` ->
    :class:`SDESolver` (``noise="memoryless" | "flow_grpo" | "zero" | k``, ``a=0.7`` for
    Flow-GRPO). Solvers are also plain classes for YAML ``class_path`` / ``init_args``."""
    key = name.strip().lower()
    if key in ("euler", "heun"):
        if kwargs:
            raise TypeError(f"{key} solver takes no arguments, got {sorted(kwargs)}")
        return EulerSolver() if key == "euler" else HeunSolver()
    if key == "sde":
        return SDESolver(**kwargs)
    raise ValueError(f"unknown solver {name!r}; choose 'euler', 'heun' or 'sde'")


# ----------------------------------------------------------------------------------------------
# TempFlow-style branching rollouts
# ----------------------------------------------------------------------------------------------


class BranchingSDESolver(SDESolver):
    r"""One-step branching rollouts (TempFlow-GRPO; "Reward Score Matching", App. C.2.3, Eq. 113), a simple version.

    The ``B`` rows are split into consecutive blocks of ``branch_width`` rows (``W``). Every row of a block
    starts from the block's *first* noise ``x0`` (the other rows' noises are ignored) and follows the
    deterministic Euler ODE ``x' = x + h v(x, t)``, except at one *branching step* ``j_b`` drawn per block,
    where each row takes an independent SDE transition ``N(mu_j, s_j^2 I)`` of this solver's noise
    schedule; after it the rows continue deterministically. So the ``W`` rows of a block share one parent
    latent ``x_{j_b}``, differ by one Gaussian step, and are denoised by the ODE: their rewards are ``W``
    point estimates of the lookahead value at ``x_{j_b + 1}``, and group-centring them (the module's
    normaliser, with ``group_size == W``) is the branching-width-``W`` zeroth-order estimator of the value
    gradient at step ``j_b`` (Reward Score Matching, Def. 3.5, Eq. 15). Only that step carries a log-probability:
    ``log_probs[j, i]`` is ``NaN`` for every deterministic step, and :class:`GRPOObjective` trains exactly
    the finite ones (one step per sample). Because every other step is deterministic, the value being
    estimated is that of the ODE continuation, ``r(ODE(x_{j_b + 1}))``: stochasticity localization, which
    changes the control problem rather than only the variance (Reward Score Matching, sec. 3.2). ``trajectory[0]`` holds
    the shared noises; the rollout buffer's ``x0`` field keeps the callback's per-row noises (unused by GRPO).

    Budget allocation across time (Reward Score Matching, sec. 5.2, "reallocate branching budget"): ``branch_steps``
    (step indices; default all ``T`` steps) and ``branch_probs`` (default uniform) give the distribution
    from which each block draws its branching step, i.e. the expected share of the groups (and of the
    sampled images) spent on each step.

    What this is *not*: TempFlow-GRPO revisits *every* step of one ODE trajectory (``T`` branch points per
    prompt) and BranchGRPO branches recursively; here each group branches once, at a random step, so a
    round spreads its groups over the steps. The rows must be ordered block by block (the module's
    rollouts are: ``repeat_interleave`` of the group conditions).

    Args:
        noise, a: the SDE noise schedule of the branching step (as :class:`SDESolver`; default
            Flow-GRPO's with ``a = 0.7``).
        branch_width: ``W >= 2`` rows per block.
        branch_steps: allowed branching steps (indices into the ``T`` steps; negative counts from the end).
        branch_probs: probabilities of ``branch_steps`` (normalised).
    """

    def __init__(self, noise: NoiseLike = "flow_grpo", a: float = 0.7, branch_width: int = 4,
                 branch_steps: Optional[Sequence[int]] = None, branch_probs: Optional[Sequence[float]] = None) -> None:
        super().__init__(noise, a=a)
        if isinstance(branch_width, bool) or not isinstance(branch_width, int) or branch_width < 2:
            raise ValueError(f"branch_width must be an integer >= 2; got {branch_width!r}")
        if isinstance(self.noise, ZeroNoise):
            raise ValueError("the branching step needs a non-zero noise schedule")
        self.branch_width = branch_width
        self.branch_steps = None if branch_steps is None else [int(j) for j in branch_steps]
        if self.branch_steps is not None and not self.branch_steps:
            raise ValueError("branch_steps must not be empty")
        if branch_probs is not None:
            p = torch.as_tensor([float(v) for v in branch_probs], dtype=torch.float64)
            n = len(self.branch_steps) if self.branch_steps is not None else None
            if n is None or p.numel() != n:
                raise ValueError("branch_probs needs branch_steps of the same length")
            if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or not bool(p.sum() > 0):
                raise ValueError(f"branch_probs must be finite, non-negative and not all zero; got {p.tolist()}")
            self.branch_probs: Optional[Tensor] = p / p.sum()
        else:
            self.branch_probs = None

    def candidate_steps(self, n_steps: int) -> tuple[Tensor, Tensor]:
        """Allowed branching steps ``(C,)`` (in ``[0, n_steps)``) and their probabilities ``(C,)``."""
        if self.branch_steps is None:
            steps = torch.arange(n_steps)
        else:
            steps = torch.as_tensor([j + n_steps if j < 0 else j for j in self.branch_steps])
            if bool(((steps < 0) | (steps >= n_steps)).any()):
                raise ValueError(f"branch_steps {self.branch_steps} out of range for {n_steps} sampler steps")
        if self.branch_probs is not None:
            probs = self.branch_probs
        else:
            probs = torch.full((steps.numel(),), 1.0 / steps.numel(), dtype=torch.float64)
        return steps, probs

    def sample(self, velocity: VelocityFn, x0: Tensor, times: Tensor, cond: Any = None, *,
               generator: Optional[torch.Generator] = None, return_trajectory: bool = False,
               return_log_probs: bool = False) -> SampleOutput:
        """Branching rollouts from ``x0 (B, *S)`` (``B`` a multiple of ``branch_width``) over ``times (T+1,)``.

        Returns :class:`~lightning_nft.samplers.SampleOutput`; ``log_probs (T, B)`` is ``NaN`` except at each
        row's branching step. The branching steps are drawn first, then one noise tensor per grid step
        (drawn for all rows, used by the branching rows), all from ``generator``.
        """
        if not isinstance(times, Tensor):
            times = torch.as_tensor(times, dtype=x0.dtype, device=x0.device)
        ts = _check_times(times)
        n, w = x0.shape[0], self.branch_width
        if n % w:
            raise ValueError(f"BranchingSDESolver needs a batch that is a multiple of branch_width={w}; got {n}")
        n_steps = len(ts) - 1
        cand, probs = self.candidate_steps(n_steps)
        pick = torch.multinomial(probs, n // w, replacement=True, generator=generator)
        branch_step = cand[pick].repeat_interleave(w).to(x0.device)  # (B,)
        x = x0[::w].repeat_interleave(w, dim=0)
        traj = [x] if return_trajectory else None
        logps: list[Tensor] = []
        with torch.no_grad():
            for j, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
                v = velocity(x, _batch_times(t, x), cond)
                mean, std = self.moments(x, v, t, t_next)
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                    device="cpu" if generator is not None else x.device).to(x.device)
                x_sde = mean + expand_like(std, x) * noise
                x_ode = x + (t_next - t) * v
                here = branch_step == j
                x_next = torch.where(here.reshape(-1, *([1] * (x.dim() - 1))), x_sde, x_ode)
                if return_log_probs:
                    lp = gaussian_log_prob(x_next, mean, std)
                    logps.append(torch.where(here, lp, torch.full_like(lp, float("nan"))))
                x = x_next
                if traj is not None:
                    traj.append(x)
        return SampleOutput(samples=x, times=times, trajectory=torch.stack(traj) if traj is not None else None,
                            log_probs=torch.stack(logps) if return_log_probs else None)

    def __repr__(self) -> str:
        probs = None if self.branch_probs is None else self.branch_probs.tolist()
        return (f"BranchingSDESolver(noise={self.noise!r}, branch_width={self.branch_width}, "
                f"branch_steps={self.branch_steps}, branch_probs={probs})")
