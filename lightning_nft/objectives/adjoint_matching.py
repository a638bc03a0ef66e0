"""Adjoint Matching (C. Domingo-Enrich, M. Drozdzal, B. Karrer, R. T. Q. Chen, "Adjoint Matching: Fine-tuning
Flow and Diffusion Generative Models with Memoryless Stochastic Optimal Control", ICLR 2025,
arXiv:2409.08861) for rectified flow, as pure functions on tensors.

Conventions (``lightning_nft.paths``): ``x_t = (1 - t) x0 + t x1``, noise at ``t = 0``, data at
``t = 1``; so ``alpha_t = t``, ``beta_t = 1 - t``, ``kappa_t = 1 / t`` and

    eta_t = beta_t (kappa_t beta_t - beta_t') = (1 - t) / t,
    sigma(t) = sqrt(2 eta_t)                                   (memoryless noise, arXiv:2409.08861),
    b(x, t) = 2 v_base(x, t) - x / t                           (base drift),
    b(x, t) + sigma(t) u(x, t) = 2 v_ft(x, t) - x / t          (fine-tuned drift),
    u(x, t) = sqrt(2 / eta_t) (v_ft(x, t) - v_base(x, t))      (the control).

Trajectories ``X`` are sampled (without gradient) from the fine-tuned memoryless SDE
``dX = (2 v_ft - X / t) dt + sigma(t) dB``, ``X_0 ~ N(0, I)``. The *lean adjoint* solves, backwards,

    d a / dt = -(grad_x b(X_t, t))^T a = a / t - 2 (grad_x v_base(X_t, t))^T a,
    a(1) = grad g(X_1) = -lambda grad r(X_1)                   (terminal cost g = -lambda r),

and the Adjoint Matching loss regresses ``|| u(X_t, t) + sigma(t) a(t) ||^2`` over the trajectory's
times. Its unique critical point is the optimal control, whose fine-tuned model samples
``p_base(x) exp(lambda r(x)) / Z`` (arXiv:2409.08861, "Memoryless generative processes"), with *any*
sampler afterwards.

Choices, and the known traps they answer (issue 4)
--------------------------------------------------
1. **The stiff ``x / t`` term (integrating factor).** ``grad_x b`` contains ``-I / t``; an explicit
   Euler step of ``d a / dt = a / t`` from ``t_1`` to ``t_0 = 0`` has ``kappa dt = 1`` and is
   wrong by O(1). We solve exactly for that part: with ``a~ = a / t`` the lean adjoint becomes

       d a~ / dt = -2 (grad_x v_base)^T a~            (no 1/t left; ``grad v_base`` is bounded)

   and ``a = t a~``. One backward step from ``t_{k+1}`` to ``t_k`` (``h = t_{k+1} - t_k``) is

       a~_k = a~_{k+1} + 2 h J^T a~_{k+1},    a_k = t_k a~_k,
       i.e. a_k = (t_k / t_{k+1}) (a_{k+1} + 2 h J^T a_{k+1}),

   exact whenever ``v_base`` does not depend on ``x`` (then ``a(t) = t a(1)`` on any grid; tested)
   and finite down to ``t_0 = 0`` (``a(0) = 0``, as in the continuous solution). The same variable
   makes the loss target bounded: ``eta_t a = (1 - t) a~``.
2. **Where the Jacobian is evaluated** (``scheme``). ``"right"`` (default, the paper's step):
   ``J = grad_x v_base(X_{k+1}, t_{k+1})``, the later end of the step; ``"left"``: ``(X_k, t_k)``;
   ``"heun"``: the trapezoid predictor-corrector over both ends. On deterministic paths (a Gaussian
   base, where ``J`` depends on ``t`` only) Heun is second order and the Euler variants first order
   (tested). Along SDE paths, however, ``J(X_t)`` is only Hölder-1/2 in ``t`` and is large where the
   flow splits between modes, so no scheme beats first order and what matters is the bias of the
   regression target ``E[v_base - eta_t a | X_t] - v_base`` against the optimal control, on the grid
   actually used. ``benchmarks/am_tilt_vs_steps.py`` (table 1) measures it on the 3-component mixture
   of the tests (ratio to the exact control, 1 = unbiased; at t = 0.1 / 0.3 / 0.5 / 0.7)::

       T = 10    right 0.98 0.90 0.79 0.88   left 0.70 0.79 0.90 0.97   heun 1.33 1.37 1.26 1.07
       T = 20    right 0.98 0.92 0.84 0.89   left 0.83 0.87 0.94 1.00   heun 1.27 1.23 1.20 1.08
       T = 40    right 0.95 0.94 0.91 0.98   left 0.87 0.92 0.96 0.98   heun 1.09 1.13 1.11 1.03
       T = 100   right 1.00 0.99 0.95 0.97   left 0.96 0.98 0.98 0.99   heun 1.06 1.07 1.05 1.01

   ``"left"`` under-applies the tilt at early times (where the mixture weights are decided),
   ``"heun"`` over-applies it everywhere (its ``h^2 J_k J_{k+1}`` term is large exactly where ``J`` is),
   ``"right"`` is closest early and costs one VJP per step (Heun two). After fine-tuning (table 2,
   600 iterations, requested ``lambda = 0.6``) the achieved tilt is 0.53 / 0.54 / 0.55 / 0.55 at
   T = 10 / 20 / 40 / 100 with ``"right"``, 0.52 / 0.54 with ``"left"`` and 0.72 / 0.65 with ``"heun"``
   at T = 20 / 40. ``"right"`` and ``"heun"`` query ``v_base`` at ``t = 1``, where rectified-flow fields
   are finite (``v(x, 1) = x - E[X0]``); ``"left"`` never does.
3. **Regress in velocity space.** ``||u + sigma a||^2 = (2 / eta_t) ||v_ft - (v_base - eta_t a)||^2``
   exactly. Implementations that build the control from the drifts, ``u = (b_ft - b_base) / sigma``
   with ``b = 2 v - x / t``, subtract two ``O(|x| / t)`` numbers to get an ``O(1)`` difference and
   lose the low bits near ``t -> 0`` in float32 / bf16. The velocity form never forms a drift, and its
   target ``v_base - eta_t a = v_base - (1 - t) a~`` is bounded on all of ``[0, 1]``.
   :func:`adjoint_matching_loss` is the velocity form; :func:`adjoint_matching_loss_u` the u form
   (``u = sqrt(2 / eta) (v_ft - v_base)``, no drifts either; kept for the equivalence test).
4. **Singular ends.**
   * ``t = 0`` (``sigma = inf``): the time grid may start at 0 (the adjoint recursion above is
     finite there), but ``t = 0`` is never trained: its SOC weight ``2 / eta_0 = 0`` and its u-space
     form is ``inf * 0``. :func:`select_train_indices` only returns grid times in ``(0, 1)``.
   * ``t = 1`` (``eta = 0``, weight ``2 / eta = inf``): never trained either. At ``t = 1`` the target
     is ``v_ft = v_base`` identically, and the integral has no mass there. Near ``t = 1`` the SOC
     weight ``2 t / (1 - t)`` is large but the residual of a good model is ``O(1 - t)``;
     ``max_weight`` caps it when a coarse grid puts a point very close to 1.
   * The loss functions raise on any ``t`` outside the open interval ``(0, 1)``.
   * Weighting: ``"soc"`` (``2 / eta_t``, the faithful SOC loss, default) or ``"uniform"`` (plain
     velocity regression). The pointwise minimiser ``v_ft = E[v_base - eta_t a | X_t = x]`` is the
     same for any positive weight, so the weighting only moves emphasis across times.
   * Adjoint clipping (:func:`clip_adjoint`) is available but off by default: clipping biases the
     target towards ``v_base`` and under-applies the tilt, exactly the failure issue 4 warns about.
5. **Coarse time grids.** The estimator is first order in ``h`` (table above); the achieved tilt
   after fine-tuning against the number of steps is measured by ``benchmarks/am_tilt_vs_steps.py``.
   On narrow multimodal bases 40 steps are too coarse: where ``2 h J`` reaches 0.5-0.7 the Euler factor
   ``1 + 2 h J`` under-weights the growth ``exp(2 int J)``, and with the heavy tail of choice 6 sampled by
   importance splitting the 40-step target is 6-17 % low at ``t <= 0.5``, the 80-step one within 4 % at
   ``t <= 0.3`` and up to 9 % low at ``t = 0.5-0.7``, the 160-step one within 3 % at every ``t`` measured
   (``benchmarks/am_target_splitting.py``, which also splits the ratio between and inside modes: at T = 80 the
   target is up to 21 % low between modes at t = 0.5-0.7, where the weights are decided). Fitted by regression on
   paths of the exact tilted process, the split target yields 0.77-0.79 of the requested tilt at T = 80 and
   0.86-0.90 at T = 160, against 0.94 for the exact control at the same points
   (``benchmarks/am_regression_bias.py``): a right mean is not enough, the fit still loses part of the heavy
   tail of choice 6.
6. **Heavy tails on multimodal bases: the bootstrapped adjoint** (issue 14). Along a path that lingers
   between two modes ``J = grad_x v_base`` is large and positive (10-30 on the family of
   ``tests/test_adjoint_matching.py``), so the lean adjoint grows like ``exp(2 int J dt)`` on a few rare
   paths. Its mean is right (the continuous lean adjoint is unbiased) but it is carried by those paths: on a
   5-component mixture with std 0.36, T = 40, t = 0.3, the per-path projection of ``-eta_t a`` on the exact
   control has median 0.23, 99th percentile 8-10 and maximum 2,400 (1 = the mean if unbiased), and the mean
   over 60k paths is 0.67 (chunks of 200 paths: 0.53 to 1.32). A regression on finite batches (Adam,
   gradient clipping) sees the typical paths and under-applies the tilt, more so the narrower the
   components; the schemes of choice 2 only move the typical value (Heun and exponential integrators
   1.2-1.5, ``"right"`` 0.85; at T = 160 all agree within the noise). ``benchmarks/README.md`` has the numbers.

   The fix keeps the target's conditional mean and cuts the tails. Under the optimal process
   ``M_s = Y_{t->s}^T grad log h(X_s, s)`` (``Y`` the base's tangent flow, ``h(x, s) = E[exp(lambda r(X_1)) |
   X_s = x]``) is a martingale whose value at ``s = 1`` is the lean adjoint, so *any* average of the ``M_s``
   over ``s >= t`` has the same conditional mean ``-E[a(t) | X_t]``. :func:`lean_adjoint` with
   ``ft_velocity`` and ``bootstrap_horizon`` restarts the backward recursion from the current model's
   estimate ``a = -(v_ft - v_base) / eta`` (i.e. ``a~ = -(v_ft - v_base) / (1 - t)``) with weight
   ``w_k = 1 - exp(-(1 - t_k) h / horizon)`` at each interior grid time: a TD(lambda)-style bootstrap whose
   fixed point is still the optimal control (each restart adds only the step's local error, O(h^2) for the
   Euler schemes, tested against closed forms) and whose variance no longer compounds over Jacobian
   products. The ``1 - t`` factor switches restarts off towards ``t = 1``, where the model's estimate divides
   a vanishing difference by a vanishing ``eta_t``: an error ``e`` of ``v_ft`` restarted at ``s`` reaches
   ``t < s`` multiplied by ``(1 - t) / (1 - s)``, and the restart rate ``(1 - s) / horizon`` cancels that
   factor. ``horizon = 0`` (restart at every step, no taper) is kept for tests of the one-step error; in
   training it diverged (the model collapsed onto one mode), as this amplification predicts. With
   ``horizon = 0.05`` about ``exp(-(1 - t)^2 / (2 horizon))`` of the Monte-Carlo part survives from ``t``
   to ``t = 1``. It costs one forward pass of the fine-tuned model (no gradient) per interior grid point.
   **Opt-in, not the default:** the estimator is checked at the optimum (tests), but training with it is
   a fixed-point iteration on the model's own estimate and its stability is not established (issue 14:
   ``horizon = 0.05`` with the ``"uniform"`` weighting collapsed onto one mode within 150 iterations).
7. **A fitted iteration, one iteration per round (the default since issue 14).** Taking a few gradient steps
   on each fresh minibatch of rollouts (``targets="minibatch"``) sees every heavy path of choice 6 once, through
   a normalised optimiser step, and ends 20-30 % short of the requested tilt on random narrow mixtures (tests'
   family, 600 rounds x 512 rollouts, T = 40). The same fixed point is reached by iterating

       v_{k+1} = argmin_v  E_{X ~ v_k} sum_t w (2 / eta_t) || v(X_t, t) - (v_base(X_t, t) - eta_t a(t)) ||^2

   with each minimisation actually carried out: ``targets="round"`` solves the lean adjoint once per round on
   all the round's trajectories, importance-split where the base flow stretches them (``split_at = 2``:
   :mod:`lightning_nft.path_splitting`; the heavy paths of choice 6 are then sampled many times with small
   weights ``w``), keeps ``n_train_times`` random grid times per path, and puts the previous round's points in
   front (``replay_rounds = 1``, carried in checkpoints); the module then takes enough steps to fit them.
   ``configs/gmm_adjoint.yaml`` is the recipe: 30 x 512 rollouts on a 160-step grid (choice 5), 500 Adam steps
   of 8,192 points per round on a per-round cosine 3e-3 -> 1e-5, 12 rounds, and the mean of the last six
   rounds' parameters (``lightning_nft.callbacks.RoundAveraging``: single iterates scatter 5-8 % around the
   fixed point). With fewer steps per round the iterates lag (300 steps: one of three mixtures 8 % short after
   10 rounds); a larger learning rate makes them noisier (1e-2: TV 0.055 on the same mixture). On five random mixtures the tests never saw it ends at 0.965-1.035 of the requested tilt
   with component-weight TV 0.003-0.028 (``benchmarks/am_tilt_family.py --recipes shipped``;
   ``benchmarks/README.md``), where the per-minibatch recipe is 20-30 % short; ``tests/test_adjoint_family.py``
   requires tilt within 5 % and TV at most 0.03 on mixtures of its own. Each round costs about
   30 s of one idle CPU core for this 2-D toy (rollouts, splitting and adjoints about 18 s, the fit the rest).
   Without splitting the iterates swing by +-0.15 (``benchmarks/am_fitted_iteration.py``). For large latents
   the round's points (``n_train_times`` states, adjoints and base velocities per path, twice with the replay)
   and the split trajectories take memory: lower ``n_train_times`` and ``max_split_factor``, or fall back to
   ``targets="minibatch"``.

Shapes: trajectories ``(T+1, B, *S)``, times ``(T+1,)`` strictly increasing in ``[0, 1]``,
per-time quantities ``(B, *S)`` with ``t (B,)``. Everything runs in the trajectory's dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from lightning_nft.paths import expand_like
from lightning_nft.rewards import require_differentiable

VelocityFn = Callable[..., Tensor]

__all__ = [
    "eta_t",
    "memoryless_sigma",
    "base_drift",
    "terminal_adjoint",
    "lean_adjoint",
    "bootstrap_weights",
    "full_adjoint",
    "clip_adjoint",
    "select_train_indices",
    "gather_times",
    "adjoint_matching_target",
    "adjoint_matching_weight",
    "adjoint_matching_loss",
    "adjoint_matching_loss_u",
]

WEIGHTINGS = ("soc", "uniform")
TARGET_MODES = ("round", "minibatch")


# ----------------------------------------------------------------------------------------------
# schedule quantities
# ----------------------------------------------------------------------------------------------


def eta_t(t: Union[float, Tensor]) -> Tensor:
    """``eta_t = (1 - t) / t`` for rectified flow (arXiv:2409.08861 with ``alpha_t = t``, ``beta_t = 1 - t``)."""
    t = torch.as_tensor(t)
    return (1 - t) / t


def memoryless_sigma(t: Union[float, Tensor]) -> Tensor:
    """Memoryless noise level ``sigma(t) = sqrt(2 eta_t) = sqrt(2 (1 - t) / t)`` (arXiv:2409.08861)."""
    return torch.sqrt(2 * eta_t(t))


def base_drift(velocity: VelocityFn, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
    """Memoryless SDE drift ``b(x, t) = 2 v(x, t) - x / t`` of a velocity field, ``(B, *S)``; ``t (B,)``, ``t > 0``."""
    return 2 * velocity(x, t, cond) - x / expand_like(t, x)


def terminal_adjoint(reward: Any, x1: Tensor, reward_multiplier: float, cond: Any = None) -> Tensor:
    """``a(1) = grad g(X_1) = -reward_multiplier grad r(X_1)``, ``(B, *S)``, for a differentiable reward.

    ``reward(x, cond) -> (B,)``. A reward marked ``differentiable = False`` (a black box) is refused
    with a clear ``TypeError`` (``lightning_nft.rewards.require_differentiable``).
    """
    if not callable(reward):
        raise TypeError(f"reward must be callable; got {type(reward).__name__}")
    if getattr(reward, "differentiable", True) is False:
        require_differentiable(reward, "Adjoint Matching")
    with torch.enable_grad():
        x = x1.detach().clone().requires_grad_(True)
        r = reward(x, cond)
        if not isinstance(r, Tensor) or r.shape != (x.shape[0],):
            raise ValueError(f"reward must return a tensor of shape (B,) = ({x.shape[0]},)")
        if not r.requires_grad:
            raise TypeError(
                f"{type(reward).__name__} returned rewards without a graph to the samples; Adjoint Matching "
                "needs grad r(x) (mark black-box rewards differentiable=False)"
            )
        (grad,) = torch.autograd.grad(r.sum(), x)
    return -float(reward_multiplier) * grad


# ----------------------------------------------------------------------------------------------
# adjoint ODEs
# ----------------------------------------------------------------------------------------------


def _check_trajectory(trajectory: Tensor, times: Tensor, terminal: Tensor) -> Tensor:
    if trajectory.dim() < 2:
        raise ValueError(f"trajectory must have shape (T+1, B, *S); got {tuple(trajectory.shape)}")
    times = torch.as_tensor(times).to(device=trajectory.device, dtype=trajectory.dtype)
    if times.dim() != 1 or times.shape[0] != trajectory.shape[0] or times.shape[0] < 2:
        raise ValueError(
            f"times must have shape (T+1,) = ({trajectory.shape[0]},) with T >= 1; got {tuple(times.shape)}"
        )
    if not bool((times[1:] > times[:-1]).all()) or bool(times[0] < 0) or bool(times[-1] > 1):
        raise ValueError("times must be strictly increasing in [0, 1]")
    if terminal.shape != trajectory.shape[1:]:
        raise ValueError(
            f"terminal adjoint must have shape (B, *S) = {tuple(trajectory.shape[1:])}; got {tuple(terminal.shape)}"
        )
    return times


SCHEMES = ("right", "left", "heun")


class _Linearisation:
    """Forward pass of a backward-solver right-hand side at one grid point, reusable for several VJPs.

    ``rhs(x, t) -> (outputs, extra)``: builds the graph once; :meth:`apply` returns
    ``grad_x [2 <v, c> + extra]`` for a cotangent ``c`` (``extra`` a scalar or ``None``).
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], tuple[Tensor, Optional[Tensor]]], x: Tensor, t: Tensor) -> None:
        with torch.enable_grad():
            self.x = x.detach().clone().requires_grad_(True)
            self.v, self.extra = fn(self.x, t)

    def apply(self, cot: Tensor, retain: bool) -> Tensor:
        with torch.enable_grad():
            scalar = 2 * (self.v * cot).sum()
            if self.extra is not None:
                scalar = scalar + self.extra
            (g,) = torch.autograd.grad(scalar, self.x, retain_graph=retain)
        return g


def _solve_backward(
    fn: Callable[[Tensor, Tensor], tuple[Tensor, Optional[Tensor]]],
    trajectory: Tensor,
    times: Tensor,
    terminal: Tensor,
    scheme: str,
    velocities: Optional[Tensor] = None,
    restart: Optional[tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """Integrate ``d a~/dt = -F(X_t, t, a~)`` backwards, ``F = grad_x [2 <v, a~> + extra]``; return ``a = t a~``.

    ``scheme``: ``"heun"`` (trapezoid, predictor with ``F_{k+1}``), ``"right"`` (``F_{k+1}``) or
    ``"left"`` (``F_k``); see :func:`lean_adjoint`. Fills ``velocities[k] = v(X_k, t_k)`` when given.
    ``restart = (ft_velocities (T+1, B, *S), w (T+1,))`` (needs ``velocities``): before each step back
    from an interior ``t_{k+1}``, ``a~ <- (1 - w_{k+1}) a~ - w_{k+1} (v_ft - v)(X_{k+1}) / (1 - t_{k+1})``
    (:func:`lean_adjoint`, ``bootstrap_horizon``).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown adjoint scheme {scheme!r}; choose one of {SCHEMES}")
    n_steps = times.shape[0] - 1
    batch = trajectory.shape[1]
    adjoints = torch.empty_like(trajectory)
    adjoints[n_steps] = terminal.detach()
    a_tilde = terminal.detach().to(trajectory.dtype) / times[n_steps]
    uses = {"heun": 2, "right": 1, "left": 1}[scheme]
    cache: dict[int, tuple[_Linearisation, int]] = {}
    visited: set[int] = set()

    def linearise(k: int) -> _Linearisation:
        if k not in cache:
            lin = _Linearisation(fn, trajectory[k], times[k].expand(batch))
            if velocities is not None:
                velocities[k] = lin.v.detach()
            visited.add(k)
            cache[k] = (lin, 0)
        return cache[k][0]

    def rhs(k: int, cot: Tensor) -> Tensor:
        lin = linearise(k)
        used = cache[k][1] + 1
        last = used >= uses or (scheme == "heun" and k == n_steps)
        g = lin.apply(cot, retain=not last)
        if last:
            del cache[k]
        else:
            cache[k] = (lin, used)
        return g

    for k in range(n_steps - 1, -1, -1):
        h = times[k + 1] - times[k]
        if restart is not None and k + 1 < n_steps and float(restart[1][k + 1]) > 0:
            if k + 1 not in visited:
                linearise(k + 1)
            w = float(restart[1][k + 1])
            control = restart[0][k + 1].to(a_tilde) - velocities[k + 1]  # v_ft - v_base at X_{k+1}
            a_tilde = (1 - w) * a_tilde - (w / (1 - times[k + 1])) * control
        if scheme == "left":
            a_tilde = a_tilde + h * rhs(k, a_tilde)
        elif scheme == "right":
            a_tilde = a_tilde + h * rhs(k + 1, a_tilde)
        else:
            f_next = rhs(k + 1, a_tilde)
            predictor = a_tilde + h * f_next
            a_tilde = a_tilde + 0.5 * h * (f_next + rhs(k, predictor))
        adjoints[k] = times[k] * a_tilde
    cache.clear()
    return adjoints


def bootstrap_weights(times: Tensor, horizon: Optional[float]) -> Tensor:
    """Restart weights ``w (T+1,)`` of the bootstrapped lean adjoint on the grid ``times (T+1,)``.

    ``w_k = 1 - exp(-(1 - t_k) (t_k - t_{k-1}) / horizon)`` (``w_0 = 0``): a restart rate
    ``(1 - t) / horizon`` per unit time, so the Monte-Carlo part of the adjoint is kept with weight
    ``exp(-int_t^s (1 - r) dr / horizon)`` over ``[t, s]``; the factor ``1 - t`` switches restarts off
    towards ``t = 1``, where the model's estimate ``-(v_ft - v_base) / eta_t`` divides a vanishing
    difference by a vanishing ``eta_t``. ``horizon = 0``: ``w = 1`` (one-step bootstrap); ``None``:
    ``w = 0`` (the plain lean adjoint).
    """
    times = torch.as_tensor(times).detach().to(device="cpu", dtype=torch.float64)
    w = torch.zeros_like(times)
    if horizon is None:
        return w
    horizon = float(horizon)
    if not horizon >= 0:
        raise ValueError(f"bootstrap horizon must be >= 0 or None; got {horizon}")
    if horizon == 0:
        w[1:] = 1.0
        return w
    w[1:] = -torch.expm1(-(1 - times[1:]) * (times[1:] - times[:-1]) / horizon)
    return w


def lean_adjoint(
    base_velocity: VelocityFn,
    trajectory: Tensor,
    times: Tensor,
    terminal_grad: Tensor,
    cond: Any = None,
    *,
    scheme: str = "right",
    return_base_velocity: bool = False,
    ft_velocity: Optional[Tensor] = None,
    bootstrap_horizon: Optional[float] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Lean adjoint ``a(t_k)`` along a trajectory, ``(T+1, B, *S)`` (detached).

    Solves ``d a / dt = -(grad_x b(X_t, t))^T a`` with ``b = 2 v_base - x / t`` backwards from
    ``a(t_T) = terminal_grad`` (pass ``grad g(X_1) = -lambda grad r(X_1)``, e.g. from
    :func:`terminal_adjoint`) in the variable ``a~ = a / t`` (integrating factor, module docstring),
    ``d a~ / dt = -2 J^T a~`` with ``J = grad_x v_base``, then ``a_k = t_k a~_k``. One step from
    ``t_{k+1}`` to ``t_k`` (``h = t_{k+1} - t_k``, ``J_k = grad_x v_base(X_k, t_k)``)::

        "right" (default)  a~_k = a~_{k+1} + 2 h J_{k+1}^T a~_{k+1}       (the paper's Euler step)
        "left"             a~_k = a~_{k+1} + 2 h J_k^T a~_{k+1}
        "heun"             p = a~_{k+1} + 2 h J_{k+1}^T a~_{k+1}
                           a~_k = a~_{k+1} + h (J_{k+1}^T a~_{k+1} + J_k^T p)

    (module docstring, choice 2, for why ``"right"``).

    Each ``J^T c`` is one batched vector-Jacobian product (``torch.autograd.grad`` w.r.t. ``x`` only),
    run under ``torch.enable_grad()`` whatever the caller's mode (not under ``torch.inference_mode``).
    ``"heun"`` costs one forward and two backward passes per grid point (the graph at ``X_k`` is kept
    for the next step), the Euler schemes one of each. ``"heun"`` and ``"right"`` evaluate
    ``v_base`` at ``t_T`` (``= 1`` on a full grid), so the field must be finite there (true for
    rectified-flow fields: ``v(x, 1) = x - E[X0]``); ``"left"`` never does.

    Args:
        base_velocity: ``v_base(x (B, *S), t (B,), cond) -> (B, *S)`` (the frozen reference).
        trajectory: ``(T+1, B, *S)`` states ``X_{t_k}`` (sampled from the fine-tuned memoryless SDE).
        times: ``(T+1,)`` strictly increasing in ``[0, 1]``; ``times[0] = 0`` is allowed.
        terminal_grad: ``(B, *S)`` the terminal adjoint ``a(t_T)``.
        cond: passed through to ``base_velocity``.
        scheme: ``"heun"``, ``"right"`` or ``"left"`` (above).
        return_base_velocity: also return ``v_base(X_k, t_k)`` at every grid point, ``(T+1, B, *S)``
            (the recursion computes most of them anyway; the loss needs them at the trained times).
        ft_velocity: ``(T+1, B, *S)`` the fine-tuned model's velocity ``v_ft(X_k, t_k)`` (only the interior
            points ``0 < k < T`` are read), for the bootstrapped adjoint (module docstring, choice 6):
            before each step back from an interior ``t_{k+1}``,
            ``a~ <- (1 - w_{k+1}) a~ - w_{k+1} (v_ft - v_base)(X_{k+1}, t_{k+1}) / (1 - t_{k+1})`` with
            ``w = bootstrap_weights(times, bootstrap_horizon)``. Pass both or neither.
        bootstrap_horizon: ``>= 0``; see :func:`bootstrap_weights`.
    """
    times = _check_trajectory(trajectory, times, terminal_grad)
    velocities = torch.full_like(trajectory, float("nan")) if return_base_velocity else None

    def fn(x: Tensor, t: Tensor) -> tuple[Tensor, None]:
        return base_velocity(x, t, cond), None

    restart = None
    if ft_velocity is not None or bootstrap_horizon is not None:
        if ft_velocity is None or bootstrap_horizon is None:
            raise ValueError("bootstrapping needs both ft_velocity (T+1, B, *S) and bootstrap_horizon")
        if ft_velocity.shape != trajectory.shape:
            raise ValueError(
                f"ft_velocity must have the trajectory's shape {tuple(trajectory.shape)}; got {tuple(ft_velocity.shape)}"
            )
        restart = (ft_velocity.detach(), bootstrap_weights(times, bootstrap_horizon))
        if velocities is None:
            velocities = torch.full_like(trajectory, float("nan"))
    adjoints = _solve_backward(fn, trajectory, times, terminal_grad, scheme, velocities, restart)
    if not return_base_velocity:
        return adjoints
    batch = trajectory.shape[1]
    with torch.no_grad():
        for k in range(times.shape[0]):  # points the scheme did not visit (left: t_T; right: t_0)
            if bool(torch.isnan(velocities[k]).any()):
                velocities[k] = base_velocity(trajectory[k], times[k].expand(batch), cond)
    return adjoints, velocities


def full_adjoint(
    ft_velocity: VelocityFn,
    base_velocity: VelocityFn,
    trajectory: Tensor,
    times: Tensor,
    terminal_grad: Tensor,
    cond: Any = None,
    *,
    scheme: str = "right",
) -> Tensor:
    """The full ("basic adjoint matching") adjoint along a trajectory, ``(T+1, B, *S)`` (detached).

    Seed 004 with ``f = 0``: ``d a / dt = -[(grad_x (b + sigma u))^T a + grad_x (|u|^2 / 2)]``, where
    ``b + sigma u = 2 v_ft - x / t`` and ``|u|^2 / 2 = |v_ft - v_base|^2 / eta_t``. With ``a~ = a / t``
    (same integrating factor as :func:`lean_adjoint`) and ``D = v_ft - v_base``::

        d a~ / dt = -2 (grad_x v_ft)^T a~ - (1 / (1 - t)) grad_x |D|^2,

    stepped with the same ``scheme`` as :func:`lean_adjoint`. At ``t = 1`` the last term is taken as
    its limit 0 (valid when ``D = O(1 - t)``, as at the optimum). Used as the reference for the paper's
    key observation: at the optimum both adjoints have the same conditional expectation
    ``E[a(t) | X_t = x] = -u*(x, t) / sigma(t)``.
    """
    times = _check_trajectory(trajectory, times, terminal_grad)

    def fn(x: Tensor, t: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        v_ft = ft_velocity(x, t, cond)
        t0 = t.reshape(-1)[0]
        if bool(t0 >= 1):
            return v_ft, None
        diff = v_ft - base_velocity(x, t, cond)
        return v_ft, (diff * diff).sum() / (1 - t0)

    return _solve_backward(fn, trajectory, times, terminal_grad, scheme)


def clip_adjoint(adjoint: Tensor, max_norm: Optional[float]) -> Tensor:
    """Rescale each sample's adjoint to norm at most ``max_norm`` (over non-batch dims); ``None``: unchanged.

    Off by default in Adjoint Matching: clipping biases the target ``v_base - eta_t a`` towards
    ``v_base`` and under-applies the tilt. Meant as a safety valve for rewards with rare huge gradients.
    """
    if max_norm is None:
        return adjoint
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive; got {max_norm}")
    norms = adjoint.reshape(adjoint.shape[0], -1).norm(dim=1)
    scale = (max_norm / norms.clamp_min(1e-30)).clamp(max=1.0)
    return adjoint * expand_like(scale, adjoint)


# ----------------------------------------------------------------------------------------------
# which times are trained
# ----------------------------------------------------------------------------------------------


def select_train_indices(
    times: Tensor,
    n: Optional[int] = None,
    *,
    t_min: float = 0.0,
    t_max: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Indices ``k`` of the grid ``times (T+1,)`` to train on, sorted, ``(K,)`` long.

    Eligible: ``t_min < times[k] < t_max`` with ``0 <= t_min < t_max <= 1``; ``t = 0`` and ``t = 1``
    are never eligible (singular ends, module docstring choice 4). ``n = None`` (or ``n`` at least
    the number eligible) returns all of them; otherwise ``n`` distinct indices drawn uniformly
    without replacement (so the mean over them is an unbiased estimate of the mean over all).
    """
    times = torch.as_tensor(times)
    if times.dim() != 1:
        raise ValueError(f"times must be 1-D (T+1,); got {tuple(times.shape)}")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1; got t_min={t_min}, t_max={t_max}")
    eligible = torch.nonzero((times > max(t_min, 0.0)) & (times < min(t_max, 1.0))).reshape(-1)
    if eligible.numel() == 0:
        raise ValueError(f"no grid time lies in ({t_min}, {t_max}) strictly inside (0, 1)")
    if n is None or n >= eligible.numel():
        return eligible
    if n < 1:
        raise ValueError(f"n must be positive; got {n}")
    pick = torch.randperm(eligible.numel(), generator=generator)[:n].to(eligible.device)  # CPU generator
    return eligible[pick].sort().values


def gather_times(indices: Tensor, times: Tensor, *per_time: Tensor) -> tuple[Tensor, ...]:
    """Flatten the chosen grid times into one batch: returns ``(t (K*B,), *tensors (K*B, *S))``.

    ``per_time`` tensors have shape ``(T+1, B, *S)`` (or ``(T, B, *S)``; only the ``indices`` are read),
    e.g. the trajectory, the adjoints and the base velocities; row ``i * B + b`` is time ``indices[i]``,
    sample ``b``.
    """
    indices = torch.as_tensor(indices, dtype=torch.long)
    if not per_time:
        raise ValueError("pass at least one (T+1, B, *S) tensor")
    batch = per_time[0].shape[1]
    t = torch.as_tensor(times)[indices].to(per_time[0]).repeat_interleave(batch)
    out = [p[indices.to(p.device)].reshape(indices.numel() * batch, *p.shape[2:]) for p in per_time]
    return (t, *out)


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------


def _check_open_times(t: Tensor, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x.shape[0]},); got {tuple(t.shape)}")
    if bool(((t <= 0) | (t >= 1)).any()):
        raise ValueError("Adjoint Matching trains on times strictly inside (0, 1): t = 0 and t = 1 are singular")
    return t


def adjoint_matching_target(v_base: Tensor, adjoint: Tensor, t: Tensor) -> Tensor:
    """Velocity-space regression target ``v_base - eta_t a = v_base - (1 - t) a / t``, ``(B, *S)``."""
    t = _check_open_times(t, v_base)
    return v_base - expand_like(eta_t(t), adjoint) * adjoint


def adjoint_matching_weight(t: Tensor, weighting: str = "soc", max_weight: Optional[float] = None) -> Tensor:
    """Per-sample loss weight ``(B,)``: ``"soc"`` gives ``2 / eta_t = 2 t / (1 - t)``, ``"uniform"`` 1.

    ``max_weight`` caps the weight (``None``: no cap).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    w = 2 / eta_t(t) if weighting == "soc" else torch.ones_like(t)
    if max_weight is not None:
        if not max_weight > 0:
            raise ValueError(f"max_weight must be positive; got {max_weight}")
        w = w.clamp(max=max_weight)
    return w


def _reduce(sq: Tensor, reduction: str) -> Tensor:
    flat = sq.reshape(sq.shape[0], -1)
    if reduction == "sum":
        return flat.sum(dim=1)
    if reduction == "mean":
        return flat.mean(dim=1)
    raise ValueError(f"reduction must be 'sum' or 'mean'; got {reduction!r}")


def adjoint_matching_loss(
    v_ft: Tensor,
    v_base: Tensor,
    adjoint: Tensor,
    t: Tensor,
    *,
    weighting: str = "soc",
    max_weight: Optional[float] = None,
    reduction: str = "sum",
) -> Tensor:
    """Adjoint Matching loss in velocity space, per sample ``(B,)``:

        w(t) || v_ft - (v_base - eta_t a) ||^2,     w = 2 / eta_t  ("soc")  or 1 ("uniform").

    With ``"soc"``, no cap and ``reduction="sum"`` it equals ``|| u + sigma a ||^2`` of
    :func:`adjoint_matching_loss_u` exactly (module docstring choice 3). Only ``v_ft`` should carry a
    gradient; ``v_base`` and ``adjoint`` are treated as constants (detached here). ``t (B,)`` must lie
    in the open interval ``(0, 1)``; ``reduction`` over non-batch dims: ``"sum"`` or ``"mean"``.
    """
    t = _check_open_times(t, v_ft)
    target = adjoint_matching_target(v_base.detach(), adjoint.detach(), t)
    w = adjoint_matching_weight(t, weighting, max_weight)
    return w * _reduce((v_ft - target) ** 2, reduction)


def adjoint_matching_loss_u(v_ft: Tensor, v_base: Tensor, adjoint: Tensor, t: Tensor) -> Tensor:
    """The same loss in control space, per sample ``(B,)``: ``|| u + sigma a ||^2`` with
    ``u = sqrt(2 / eta_t) (v_ft - v_base)``, ``sigma = sqrt(2 eta_t)`` (arXiv:2409.08861). For tests; prefer
    :func:`adjoint_matching_loss`.
    """
    t = _check_open_times(t, v_ft)
    e = expand_like(eta_t(t), v_ft)
    u = torch.sqrt(2 / e) * (v_ft - v_base.detach())
    return _reduce((u + torch.sqrt(2 * e) * adjoint.detach()) ** 2, "sum")


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------

# imports of the objective class (kept next to it, below the pure functions)
from lightning.pytorch.utilities import rank_zero_warn  # noqa: E402

from lightning_nft.conditions import index_condition  # noqa: E402
from lightning_nft.objectives.adjoint_targets import AdjointTargets, round_targets  # noqa: E402
from lightning_nft.objectives.base import Objective, Policies  # noqa: E402
from lightning_nft.rollouts import RolloutBatch  # noqa: E402
from lightning_nft.samplers import MemorylessNoise, PowerLawNoise, SDESolver, Solver  # noqa: E402


class AdjointMatchingObjective(Objective):
    """Adjoint Matching ("Adjoint Matching: Fine-tuning Flow and Diffusion Generative Models with Memoryless
    Stochastic Optimal Control", arXiv:2409.08861) as a fine-tuning objective.

    Rollouts are sampled by the *current* fine-tuned model with the memoryless SDE (only that schedule
    makes the optimum sample ``p_base(x) exp(lambda r(x))``), full trajectories are kept, the reward must
    be differentiable, the base drift is the frozen reference and no old policy is kept. With
    ``targets="round"`` (default), once per round, on all the round's trajectories ``X (T+1, N, *S)`` on the
    grid ``t_0 < ... < t_T`` (:meth:`prepare_round`, :func:`~lightning_nft.objectives.adjoint_targets.round_targets`):

    1. the paths are importance-split where the base flow stretches them (``split_at``;
       :func:`lightning_nft.path_splitting.split_paths`), each path weighted so that a rollout's paths sum to 1;
    2. ``a(1) = -lambda grad r(X_1)`` (:func:`terminal_adjoint`) and the lean adjoint backwards along the grid,
       ``d a/dt = -(grad_x b)^T a`` with ``b = 2 v_base - x/t`` (:func:`lean_adjoint`);
    3. ``n_train_times`` random interior grid times per path become regression points, and the points of the
       last ``replay_rounds`` rounds are kept in front of them;

    then each of the round's gradient steps takes a minibatch of points and the weighted velocity-space loss
    ``w (2/eta_t) || v_theta(X_t, t) - (v_base - eta_t a) ||^2`` (:func:`adjoint_matching_loss`). A round is
    then one iteration of a fitted fixed-point iteration when it takes enough steps to fit its points (module
    docstring choice 7: the recipe of ``configs/gmm_adjoint.yaml``, with a per-round cosine learning rate and
    ``lightning_nft.callbacks.RoundAveraging`` over the last rounds). ``targets="minibatch"`` (the recipe
    before issue 14) computes the lean adjoint per minibatch of trajectories instead, without splitting or
    replay, and trains ``n_train_times`` grid times shared by the minibatch.

    Args:
        reward_multiplier: ``lambda`` of the target ``p_base(x) exp(lambda r(x))``.
        n_train_times: grid times trained per trajectory (``None``: every interior time).
        t_min, t_max: trained times lie in ``[t_min, t_max]`` (and always in ``(0, 1)``).
        scheme: where the base Jacobian is evaluated on each adjoint step (:func:`lean_adjoint`).
        weighting: ``"soc"`` (``2 / eta_t``, the faithful loss) or ``"uniform"``.
        max_weight: cap on the ``2 / eta_t`` weight near ``t = 1`` (``None``: no cap).
        adjoint_max_norm: clip each adjoint's norm (``None``: off; clipping under-applies the tilt).
        bootstrap_horizon: restart the lean adjoint from the current model's own control estimate at a
            rate ``(1 - t) / bootstrap_horizon`` (:func:`lean_adjoint`, module docstring choice 6);
            ``None`` (default) runs the plain lean adjoint. The plain adjoint is unbiased but heavy-tailed on
            multimodal bases (a few paths that linger between modes carry most of its mean), so finite
            batches under-apply the tilt; the bootstrapped one cuts the tail but its training stability is
            not established yet (opt-in; ``benchmarks/README.md``).
        targets: ``"round"`` (regression points once per round, default) or ``"minibatch"``.
        split_at: tangent growth factor that splits a path (``None``: no splitting; ``"round"`` only).
        max_split_factor: at most this many paths per rollout on average after splitting.
        replay_rounds: previous rounds whose points are trained again (``"round"`` only; in checkpoints).
        chunk_size: rollouts whose adjoints are solved together (memory).
    """

    sampling_policy = "current"
    needs_trajectory = True
    needs_log_probs = False
    needs_reward_gradient = True
    needs_old_policy = False

    def __init__(self, reward_multiplier: float = 1.0, n_train_times: Optional[int] = 10, t_min: float = 0.0,
                 t_max: float = 1.0, scheme: str = "right", weighting: str = "soc",
                 max_weight: Optional[float] = None, adjoint_max_norm: Optional[float] = None,
                 bootstrap_horizon: Optional[float] = None, targets: str = "round", split_at: Optional[float] = 2.0,
                 max_split_factor: int = 8, replay_rounds: int = 1, chunk_size: int = 4096) -> None:
        if n_train_times is not None and n_train_times < 1:
            raise ValueError(f"n_train_times must be positive or None, got {n_train_times}")
        if bootstrap_horizon is not None and not float(bootstrap_horizon) >= 0:
            raise ValueError(f"bootstrap_horizon must be >= 0 or None, got {bootstrap_horizon}")
        if targets not in TARGET_MODES:
            raise ValueError(f"targets must be one of {TARGET_MODES}, got {targets!r}")
        if split_at is not None and not float(split_at) > 1:
            raise ValueError(f"split_at must be > 1 or None, got {split_at}")
        if max_split_factor < 1 or replay_rounds < 0 or chunk_size < 1:
            raise ValueError(f"need max_split_factor >= 1, replay_rounds >= 0 and chunk_size >= 1; got "
                             f"{max_split_factor}, {replay_rounds}, {chunk_size}")
        if targets == "minibatch" and (split_at is not None or replay_rounds):
            raise ValueError("split_at and replay_rounds act on a round's targets: with targets='minibatch' set "
                             "split_at=None and replay_rounds=0")
        self.bootstrap_horizon = None if bootstrap_horizon is None else float(bootstrap_horizon)
        self.reward_multiplier = float(reward_multiplier)
        self.n_train_times, self.t_min, self.t_max = n_train_times, float(t_min), float(t_max)
        self.scheme, self.weighting, self.max_weight = scheme, weighting, max_weight
        self.adjoint_max_norm = adjoint_max_norm
        self.targets = targets
        self.split_at = None if split_at is None else float(split_at)
        self.max_split_factor, self.replay_rounds, self.chunk_size = int(max_split_factor), int(replay_rounds), int(chunk_size)
        self._history: list[AdjointTargets] = []  # the last replay_rounds rounds' targets

    def default_solver(self) -> Solver:
        return SDESolver(MemorylessNoise())

    def setup(self, *, reward: Any, solver: Solver, group_size: int, kl_weight: float = 0.0) -> None:
        """Refuse a black-box reward and any rollout solver but the memoryless SDE."""
        require_differentiable(reward, "Adjoint Matching")
        noise = getattr(solver, "noise", None)
        memoryless = isinstance(noise, PowerLawNoise) and abs(float(noise.k) - 2.0) < 1e-12
        if not memoryless:
            raise ValueError(
                "Adjoint Matching must sample its rollouts with the memoryless SDE: use "
                "SDESolver(MemorylessNoise()) or leave the module's solver unset; after fine-tuning any "
                f"sampler works. Got {type(solver).__name__} with noise {type(noise).__name__ if noise else None}."
            )
        if kl_weight > 0:
            rank_zero_warn("AdjointMatchingObjective ignores kl_weight (the KLAnchor callback's weight): its "
                           "regularisation toward the reference is set by reward_multiplier")

    def prepare_round(self, policies: Policies, rollouts: RolloutBatch,
                      generator: Optional[torch.Generator] = None) -> Union[RolloutBatch, AdjointTargets]:
        """With ``targets="round"``: the round's regression points (:func:`~lightning_nft.objectives.adjoint_targets.round_targets`)
        followed by those of the last ``replay_rounds`` rounds; ``"minibatch"``: ``rollouts`` unchanged."""
        if self.targets != "round":
            return rollouts
        if rollouts.trajectory is None or rollouts.times is None:
            raise ValueError("Adjoint Matching needs the rollouts' trajectories and time grid")

        def adjoints(paths: Tensor, times: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
            return self.path_adjoints(policies, paths, times, cond)[:2]

        new = round_targets(policies, rollouts, adjoints, n_train_times=self.n_train_times, t_min=self.t_min,
                            t_max=self.t_max, split_at=self.split_at, max_split_factor=self.max_split_factor,
                            chunk_size=self.chunk_size, generator=generator)
        data = AdjointTargets.cat([*self._history, new])
        self._history = [*self._history, new][-self.replay_rounds:] if self.replay_rounds else []
        return data

    def path_adjoints(self, policies: Policies, paths: Tensor, times: Tensor, cond: Any = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """Step 2 of the class docstring on ``paths (T+1, B, *S)``: ``(adjoints (T+1, B, *S), v_base (T+1, B, *S),
        a(1) (B, *S))``, the lean adjoint (bootstrapped and clipped as configured) and the base velocities."""
        terminal = terminal_adjoint(policies.reward, paths[-1], self.reward_multiplier, cond)
        ft_velocity = None
        if self.bootstrap_horizon is not None:
            ft_velocity = _interior_velocities(policies.velocity, paths, times, cond)
        adjoints, v_base = lean_adjoint(policies.reference_velocity, paths, times, terminal, cond, scheme=self.scheme,
                                        return_base_velocity=True, ft_velocity=ft_velocity,
                                        bootstrap_horizon=self.bootstrap_horizon)
        return clip_adjoint(adjoints, self.adjoint_max_norm), v_base, terminal

    def state_dict(self) -> dict[str, Any]:
        """The replayed targets of the last ``replay_rounds`` rounds (checkpoints carry them: exact resume)."""
        return {"history": [part.state() for part in self._history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._history = [AdjointTargets.from_state(part) for part in state.get("history", [])]

    def loss(self, policies: Policies, batch: Union[RolloutBatch, AdjointTargets], generator: torch.Generator,
             kl_weight: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(batch, AdjointTargets):
            v_ft = policies.velocity(batch.x, batch.t, batch.cond)
            per_point = adjoint_matching_loss(v_ft, batch.v_base, batch.adjoint, batch.t, weighting=self.weighting,
                                              max_weight=self.max_weight)
            norms = batch.adjoint.reshape(len(batch), -1).norm(dim=1)
            return (per_point * batch.weight).mean(), {"adjoint_norm": (norms * batch.weight).mean().detach()}
        if batch.trajectory is None or batch.times is None:
            raise ValueError("Adjoint Matching needs the rollouts' trajectories and time grid")
        traj, times = batch.trajectory, batch.times
        adjoints, v_base, terminal = self.path_adjoints(policies, traj, times, batch.cond)
        idx = select_train_indices(times, self.n_train_times, t_min=self.t_min, t_max=self.t_max,
                                   generator=generator)
        t, x, a, vb = gather_times(idx, times, traj, adjoints, v_base)
        b = traj.shape[1]
        cond = index_condition(batch.cond, torch.arange(b).repeat(idx.numel()))  # row i * B + b is sample b
        v_ft = policies.velocity(x, t, cond)
        per_sample = adjoint_matching_loss(v_ft, vb, a, t, weighting=self.weighting, max_weight=self.max_weight)
        loss = per_sample.mean()
        logs = {"adjoint_norm": a.reshape(a.shape[0], -1).norm(dim=1).mean().detach(),
                "terminal_adjoint_norm": terminal.reshape(terminal.shape[0], -1).norm(dim=1).mean().detach()}
        return loss, logs


def _interior_velocities(velocity: Callable[..., Tensor], traj: Tensor, times: Tensor, cond: Any) -> Tensor:
    """The current model's velocity (no gradient) at the interior grid points, ``(T+1, B, *S)`` (ends zero)."""
    out = torch.zeros_like(traj)
    n_inner, b = traj.shape[0] - 2, traj.shape[1]
    if n_inner < 1:
        return out
    with torch.no_grad():
        x = traj[1:-1].reshape(n_inner * b, *traj.shape[2:])
        t = times[1:-1].to(traj).repeat_interleave(b)
        rows = index_condition(cond, torch.arange(b).repeat(n_inner))  # row i * B + b is sample b
        out[1:-1] = velocity(x, t, rows).reshape(n_inner, b, *traj.shape[2:])
    return out
