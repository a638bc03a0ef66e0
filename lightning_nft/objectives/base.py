"""What an objective tells the module, and the narrow input it computes a loss from.

Every method lives in one file, ``objectives/<method>.py``: pure tensor functions at the top, the
:class:`Objective` subclass below. An objective says which policy samples the round's rollouts,
whether trajectories / log-probabilities / reward gradients are needed, which solver it wants by
default, and computes the loss of a minibatch of rollouts from

* :class:`Policies`: the velocities it may call, the rollout solver and the reward;
* the :class:`~lightning_nft.rollouts.RolloutBatch` minibatch;
* a ``torch.Generator`` for its own noise (``x0``, ``t``...), derived by the module from
  ``(seed, rank, round, step)`` (so training draws nothing from the global torch generator);
* its own settings (constructor arguments) and the KL-anchor weight ``kl_weight``.

It never sees the module or the trainer. Objectives are chosen in YAML
(``model.init_args.objective.class_path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor

from lightning_nft.rollouts import RolloutBatch
from lightning_nft.samplers import Solver

VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]


@dataclass(frozen=True)
class Policies:
    """The policies an objective may call (shapes: ``x (B, *S)``, ``t (B,)``, returns ``(B, *S)``).

    Attributes:
        velocity: current policy ``v_theta(x, t, cond)`` (parameter gradients flow).
        old_velocity: old (sampling) policy ``v_old`` (``None`` when the module keeps none).
        reference_velocity: frozen initial model ``v_ref``.
        solver: the solver that sampled the rollouts (its transition densities for Flow-GRPO).
        reward: ``reward(x1 (B, *S), cond) -> (B,)`` (differentiable for Adjoint Matching).
    """

    velocity: VelocityFn
    old_velocity: Optional[VelocityFn]
    reference_velocity: VelocityFn
    solver: Solver
    reward: Optional[Callable[..., Tensor]] = None

    def require_old(self, who: str) -> VelocityFn:
        """``old_velocity``, or a clear error naming ``who`` needs it."""
        if self.old_velocity is None:
            raise RuntimeError(f"{who} needs an old policy, but the module keeps none")
        return self.old_velocity


class Objective:
    """Base class of fine-tuning objectives.

    Class attributes (override in subclasses):
        sampling_policy: the policy that samples rollouts: ``"old"`` (DiffusionNFT, GRPO) or
            ``"current"`` (Adjoint Matching samples the fine-tuned model).
        needs_trajectory: keep the sampler's states ``(T+1, N, *S)`` in the rollouts.
        needs_log_probs: keep per-step Gaussian log-probabilities ``(T, N)`` (SDE solvers only).
        needs_reward_gradient: the reward must be differentiable (checked at set-up).
        needs_old_policy: the module keeps an old policy (EMA copy or second LoRA adapter).
        default_ema_decay: decay of the ``EMAOldPolicy`` the module adds when the trainer has none
            (GRPO wants ``0``: its ratio is against the policy that sampled).
        rollouts_per_round: fresh rollout collections per round, each after a hard refresh
            ``old <- current`` (``1``; multi-step DiffusionNFT asks for ``substeps``).
    """

    sampling_policy: Literal["old", "current"] = "old"
    needs_trajectory: bool = False
    needs_log_probs: bool = False
    needs_reward_gradient: bool = False
    needs_old_policy: bool = True
    default_ema_decay: float = 0.5
    rollouts_per_round: int = 1

    def default_solver(self) -> Optional[Solver]:
        """The solver used for rollouts when the module is given none (``None``: Euler ODE)."""
        return None

    def setup(self, *, reward: Any, solver: Solver, group_size: int, kl_weight: float = 0.0) -> None:
        """Validate the configuration at fit start (e.g. refuse a black-box reward or an ODE solver)."""

    def prepare_round(self, policies: Policies, rollouts: RolloutBatch,
                      generator: Optional[torch.Generator] = None) -> Any:
        """What the round's minibatches are drawn from, computed once per round from its ``rollouts``
        (gradients enabled, no parameter update): anything with ``len`` and ``index(idx)``. Default: the
        rollouts themselves (Adjoint Matching returns its regression points)."""
        return rollouts

    def state_dict(self) -> dict[str, Any]:
        """State carried across rounds that a checkpoint must keep for an exact resume (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (from a checkpoint)."""

    def loss(self, policies: Policies, batch: Any, generator: torch.Generator,
             kl_weight: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(scalar loss, {name: scalar to log})`` for a minibatch of what :meth:`prepare_round`
        returned (by default a minibatch of rollouts)."""
        raise NotImplementedError


def standard_normal(shape: tuple[int, ...], like: Tensor, generator: torch.Generator) -> Tensor:
    """``N(0, I)`` noise of ``shape`` drawn on the CPU from ``generator`` (device-independent), in the dtype and on the device of ``like``."""
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)
