"""Adjoint Matching wired to the fine-tuning module (the maths is in ``adjoint_matching.py``).

Adjoint Matching plugs into the same :class:`~lightning_nft.module.RewardFineTuningModule` as
DiffusionNFT; choose it in YAML (``objective.class_path:
lightning_nft.objectives.AdjointMatchingObjective``). What differs is declared here: rollouts are
sampled by the *current* fine-tuned model with the memoryless SDE (seed 004: only that schedule
makes the optimum sample ``p_base(x) exp(lambda r(x))``), full trajectories are kept, the reward
must be differentiable, the base drift is the frozen reference (``module.reference_velocity``: the
KL-anchor snapshot for full fine-tuning, adapters disabled for LoRA), and no old policy is kept.

Per minibatch of trajectories ``X (T+1, B, *S)`` on the grid ``t_0 < ... < t_T``:

1. ``a(1) = -lambda grad r(X_1)`` (:func:`terminal_adjoint`);
2. the lean adjoint backwards along the grid, ``d a/dt = -(grad_x b)^T a`` with
   ``b = 2 v_base - x/t`` (:func:`lean_adjoint`, integrating factor for the stiff ``x/t`` term),
   optionally restarted from the current model's control estimate (``bootstrap_horizon``, opt-in);
3. on ``n_train_times`` random interior grid times (``t_min <= t <= t_max``, never ``t = 0`` or
   ``t = 1``), the velocity-space loss ``(2/eta_t) || v_theta(X_t, t) - (v_base - eta_t a) ||^2``
   (:func:`adjoint_matching_loss`; equal to ``|| u + sigma a ||^2``), averaged over samples and times.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from lightning_nft.objectives.adjoint_matching import (
    adjoint_matching_loss,
    clip_adjoint,
    gather_times,
    lean_adjoint,
    select_train_indices,
    terminal_adjoint,
)
from lightning_nft.objectives.base import Objective
from lightning_nft.rewards.base import require_differentiable
from lightning_nft.rollouts import RolloutBatch
from lightning_nft.samplers import MemorylessNoise, PowerLawNoise, SDESolver, Solver

if TYPE_CHECKING:  # pragma: no cover
    from lightning_nft.module import RewardFineTuningModule


class AdjointMatchingObjective(Objective):
    """Adjoint Matching (seed 004) as a fine-tuning objective.

    Args:
        reward_multiplier: ``lambda`` of the target ``p_base(x) exp(lambda r(x))``.
        n_train_times: grid times trained per trajectory (``None``: every interior time).
        t_min, t_max: trained times lie in ``[t_min, t_max]`` (and always in ``(0, 1)``).
        scheme: where the base Jacobian is evaluated on each adjoint step (``"right"``, ``"left"``,
            ``"heun"``; see ``adjoint_matching.lean_adjoint``).
        weighting: ``"soc"`` (``2 / eta_t``, the faithful loss) or ``"uniform"``.
        max_weight: cap on the ``2 / eta_t`` weight near ``t = 1`` (``None``: no cap).
        adjoint_max_norm: clip each adjoint's norm (``None``: off; clipping under-applies the tilt).
        bootstrap_horizon: restart the lean adjoint from the current model's own control estimate at a
            rate ``(1 - t) / bootstrap_horizon`` (``adjoint_matching.lean_adjoint``, module docstring choice 6);
            ``None`` (default) runs the plain lean adjoint. The plain adjoint is unbiased but heavy-tailed on
            multimodal bases (a few paths that linger between modes carry most of its mean), so finite
            batches under-apply the tilt; the bootstrapped one cuts the tail but its training stability is
            not established yet (opt-in; ``benchmarks/README.md``, issue 14).
    """

    sampling_policy = "current"
    needs_trajectory = True
    needs_log_probs = False
    needs_reward_gradient = True
    needs_old_policy = False

    def __init__(self, reward_multiplier: float = 1.0, n_train_times: Optional[int] = None, t_min: float = 0.0,
                 t_max: float = 1.0, scheme: str = "right", weighting: str = "soc",
                 max_weight: Optional[float] = None, adjoint_max_norm: Optional[float] = None,
                 bootstrap_horizon: Optional[float] = None) -> None:
        if n_train_times is not None and n_train_times < 1:
            raise ValueError(f"n_train_times must be positive or None, got {n_train_times}")
        self.reward_multiplier = float(reward_multiplier)
        self.n_train_times, self.t_min, self.t_max = n_train_times, float(t_min), float(t_max)
        self.scheme, self.weighting, self.max_weight = scheme, weighting, max_weight
        self.adjoint_max_norm = adjoint_max_norm
        if bootstrap_horizon is not None and not float(bootstrap_horizon) >= 0:
            raise ValueError(f"bootstrap_horizon must be >= 0 or None, got {bootstrap_horizon}")
        self.bootstrap_horizon = None if bootstrap_horizon is None else float(bootstrap_horizon)

    def default_solver(self) -> Solver:
        return SDESolver(MemorylessNoise())

    def setup(self, module: "RewardFineTuningModule") -> None:
        require_differentiable(module.reward, "Adjoint Matching")
        solver = module.rollout_solver()
        noise = getattr(solver, "noise", None)
        memoryless = isinstance(noise, PowerLawNoise) and abs(float(noise.k) - 2.0) < 1e-12
        if not memoryless:
            raise ValueError(
                "Adjoint Matching must sample its rollouts with the memoryless SDE (seed 004): use "
                "SDESolver(MemorylessNoise()) or leave the module's solver unset; after fine-tuning any "
                f"sampler works. Got {type(solver).__name__} with noise {type(noise).__name__ if noise else None}."
            )

    def loss(self, module: "RewardFineTuningModule", batch: RolloutBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.trajectory is None or batch.times is None:
            raise ValueError("Adjoint Matching needs the rollouts' trajectories and time grid")
        traj, times = batch.trajectory, batch.times
        terminal = terminal_adjoint(module.reward, traj[-1], self.reward_multiplier, batch.cond)
        ft_velocity = None if self.bootstrap_horizon is None else _interior_velocities(module, traj, times, batch.cond)
        adjoints, v_base = lean_adjoint(module.reference_velocity, traj, times, terminal, batch.cond,
                                        scheme=self.scheme, return_base_velocity=True, ft_velocity=ft_velocity,
                                        bootstrap_horizon=self.bootstrap_horizon)
        if self.adjoint_max_norm is not None:
            adjoints = clip_adjoint(adjoints, self.adjoint_max_norm)
        idx = select_train_indices(times, self.n_train_times, t_min=self.t_min, t_max=self.t_max)
        t, x, a, vb = gather_times(idx, times, traj, adjoints, v_base)
        cond = _repeat_cond(batch.cond, idx.numel())
        v_ft = module.velocity(x, t, cond)
        per_sample = adjoint_matching_loss(v_ft, vb, a, t, weighting=self.weighting, max_weight=self.max_weight)
        loss = per_sample.mean()
        logs = {"adjoint_norm": a.reshape(a.shape[0], -1).norm(dim=1).mean().detach(),
                "terminal_adjoint_norm": terminal.reshape(terminal.shape[0], -1).norm(dim=1).mean().detach()}
        return loss, logs


def _interior_velocities(module: "RewardFineTuningModule", traj: Tensor, times: Tensor, cond) -> Tensor:
    """The current model's velocity (no gradient) at the interior grid points, ``(T+1, B, *S)`` (ends zero)."""
    out = torch.zeros_like(traj)
    n_inner, batch = traj.shape[0] - 2, traj.shape[1]
    if n_inner < 1:
        return out
    with torch.no_grad():
        x = traj[1:-1].reshape(n_inner * batch, *traj.shape[2:])
        t = times[1:-1].to(traj).repeat_interleave(batch)
        out[1:-1] = module.velocity(x, t, _repeat_cond(cond, n_inner)).reshape(n_inner, batch, *traj.shape[2:])
    return out


def _repeat_cond(cond, k: int):
    """Conditions for ``gather_times``' layout (row ``i * B + b`` is sample ``b``): tile ``k`` times."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond.repeat(k, *([1] * (cond.dim() - 1)))
    if isinstance(cond, dict):
        return {key: _repeat_cond(v, k) for key, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(list(cond) * k) if not (cond and isinstance(cond[0], Tensor)) else type(cond)(
            _repeat_cond(c, k) for c in cond)
    raise TypeError(f"cannot repeat a condition of type {type(cond).__name__}")
