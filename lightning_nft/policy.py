"""The policy interface every module and callback relies on.

A *policy* is a velocity field ``v(x, t, cond)`` in our convention (``x_t = (1 - t) x0 + t x1``,
noise at ``t = 0``, data at ``t = 1``). Reward fine-tuning needs three of them at once:

* the **current** policy ``v_theta`` (trained, gradients flow),
* the **old** policy ``v_old`` that samples the round's rollouts and anchors DiffusionNFT's
  implicit parameterisation (seed 003; refreshed by EMA once per round),
* the **reference** ``v_ref``, the frozen initial model of the KL anchor (seed 001) and the base
  drift of Adjoint Matching (seed 004).

Shapes: ``x`` is ``(B, *S)``, ``t`` is ``(B,)``, ``cond`` is whatever the backbone accepts (``None``
for unconditional models, a ``(B,)`` label tensor, a ``(B, L, D)`` embedding...). Each velocity
returns ``(B, *S)``.

Any object with these methods works with the callbacks in ``lightning_nft.callbacks``;
:class:`lightning_nft.module.RewardFineTuningModule` is the reference implementation and a plain
``nn.Module`` velocity field can be wrapped by :class:`FrozenPolicy` to serve all three roles
(e.g. the exact Gaussian-mixture field of ``lightning_nft.analytic``).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_nft.samplers import EulerSolver, SampleOutput, Solver, time_grid

VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]
PolicyRole = Literal["current", "old", "reference"]


@runtime_checkable
class Policy(Protocol):
    """Velocity of the current, old and reference policy, and sampling from any of them."""

    def velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Current (trained) policy ``v_theta(x, t, cond)``; differentiable."""

    def old_velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Old (sampling) policy ``v_old(x, t, cond)``; no gradient."""

    def reference_velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Frozen initial model ``v_ref(x, t, cond)``; no gradient."""

    def sample(
        self,
        x0: Tensor,
        cond: Any = None,
        *,
        policy: PolicyRole = "current",
        solver: Optional[Solver] = None,
        times: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        return_trajectory: bool = False,
        return_log_probs: bool = False,
    ) -> SampleOutput:
        """Integrate ``policy`` from noise ``x0`` (``(B, *S)``, time 0) to data (time 1)."""


def sample_velocity(
    velocity: VelocityFn,
    x0: Tensor,
    cond: Any = None,
    *,
    solver: Optional[Solver] = None,
    times: Optional[Tensor] = None,
    n_steps: int = 50,
    generator: Optional[torch.Generator] = None,
    return_trajectory: bool = False,
    return_log_probs: bool = False,
) -> SampleOutput:
    """Sample a velocity field with ``solver`` (Euler by default) on ``times`` (uniform, ``n_steps``)."""
    solver = solver if solver is not None else EulerSolver()
    if times is None:
        times = time_grid(n_steps, device=x0.device, dtype=x0.dtype)
    return solver.sample(
        velocity,
        x0,
        times.to(device=x0.device, dtype=x0.dtype),
        cond,
        generator=generator,
        return_trajectory=return_trajectory,
        return_log_probs=return_log_probs,
    )


class FrozenPolicy(nn.Module):
    """A fixed velocity field seen through the :class:`Policy` interface (all three roles equal)."""

    def __init__(self, field: nn.Module, solver: Optional[Solver] = None, n_steps: int = 50) -> None:
        super().__init__()
        self.field = field.requires_grad_(False)
        self.solver = solver
        self.n_steps = n_steps

    def velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.field(x, t, cond)

    old_velocity = velocity
    reference_velocity = velocity

    def sample(self, x0: Tensor, cond: Any = None, *, policy: PolicyRole = "current", solver=None, times=None,
               generator=None, return_trajectory=False, return_log_probs=False) -> SampleOutput:
        return sample_velocity(self.velocity, x0, cond, solver=solver or self.solver, times=times,
                               n_steps=self.n_steps, generator=generator, return_trajectory=return_trajectory,
                               return_log_probs=return_log_probs)
