"""What an objective tells the module, and the one method the module calls.

Loss *functions* are pure tensor code (``objectives/nft.py``, ``adjoint_matching.py``, ``grpo.py``,
``flow_matching.py``). An :class:`Objective` wires one of them to the policy interface: it says
which policy samples the round's rollouts, whether trajectories / log-probabilities / reward
gradients are needed, which solver it wants by default, and computes the loss of a minibatch of
rollouts. Objectives are chosen in YAML (``model.init_args.objective.class_path``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

from torch import Tensor

from lightning_nft.rollouts import RolloutBatch
from lightning_nft.samplers import Solver

if TYPE_CHECKING:  # pragma: no cover
    from lightning_nft.module import RewardFineTuningModule


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
    """

    sampling_policy: Literal["old", "current"] = "old"
    needs_trajectory: bool = False
    needs_log_probs: bool = False
    needs_reward_gradient: bool = False
    needs_old_policy: bool = True
    default_ema_decay: float = 0.5

    def default_solver(self) -> Optional[Solver]:
        """The solver used for rollouts when the module is given none (``None``: Euler ODE)."""
        return None

    def setup(self, module: "RewardFineTuningModule") -> None:
        """Validate the module's configuration (e.g. refuse a black-box reward). Called at fit start."""

    def loss(self, module: "RewardFineTuningModule", batch: RolloutBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(scalar loss, {name: scalar to log})`` for a minibatch of rollouts."""
        raise NotImplementedError
