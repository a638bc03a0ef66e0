"""The reward protocol.

A reward maps a batch of generated samples (and their conditions) to one float per sample,
higher is better. Rewards are ``nn.Module`` s so that any
weights they hold move with the Lightning module, and they declare whether they are
differentiable: Adjoint Matching needs ``grad r`` and refuses a black-box reward at set-up;
DiffusionNFT and GRPO only need the numbers.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn


class Reward(nn.Module):
    """Base class: ``forward(samples (B, *S), cond=None) -> rewards (B,)``.

    Subclasses set the class attribute :attr:`differentiable`. A differentiable reward must be
    built from torch operations so that ``torch.autograd.grad(reward(x).sum(), x)`` is ``grad r``.
    A black-box reward may compute its numbers any way it likes (PIL, a remote call) and returns a
    detached tensor.
    """

    differentiable: bool = True

    def forward(self, samples: Tensor, cond: Optional[Any] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def gradient(self, samples: Tensor, cond: Optional[Any] = None) -> Tensor:
        """``grad_x r(x)`` of shape ``(B, *S)``; raises for a black-box reward."""
        require_differentiable(self)
        with torch.enable_grad():
            x = samples.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self(x, cond).sum(), x)
        return grad


def require_differentiable(reward: nn.Module, purpose: str = "this objective") -> None:
    """Raise a clear error when ``reward`` is not marked differentiable."""
    if not getattr(reward, "differentiable", False):
        raise TypeError(
            f"{type(reward).__name__} is a black-box reward (differentiable=False), but {purpose} needs "
            "grad r(x). Use a differentiable reward, or an objective that only needs reward values "
            "(DiffusionNFT, GRPO)."
        )


def check_finite_rewards(rewards: Tensor) -> None:
    """Raise ``ValueError`` naming the first sample whose reward is NaN or infinite."""
    bad = ~torch.isfinite(rewards)
    if bad.any():
        idx = int(bad.nonzero()[0, 0]) if rewards.dim() else 0
        value = rewards.reshape(-1)[idx].item()
        raise ValueError(
            f"reward of sample {idx} is {value} ({int(bad.sum())} of {rewards.numel()} samples non-finite); "
            "rewards must be finite numbers"
        )


class LinearReward(Reward):
    """``r(x) = a . x`` on flat samples ``(B, d)`` (the exactly tiltable reward of ``analytic``)."""

    differentiable = True

    def __init__(self, direction: Union[Sequence[float], Tensor]) -> None:
        super().__init__()
        self.register_buffer("direction", torch.as_tensor(direction, dtype=torch.float32).reshape(-1))

    def forward(self, samples: Tensor, cond: Optional[Any] = None) -> Tensor:
        return samples.reshape(samples.shape[0], -1) @ self.direction.to(samples.dtype)


class SigmoidReward(Reward):
    """Bounded reward ``r(x) = sigmoid(scale * (a . x - offset))`` in ``(0, 1)``."""

    differentiable = True

    def __init__(self, direction: Union[Sequence[float], Tensor], scale: float = 1.0, offset: float = 0.0) -> None:
        super().__init__()
        self.linear = LinearReward(direction)
        self.scale = float(scale)
        self.offset = float(offset)

    def forward(self, samples: Tensor, cond: Optional[Any] = None) -> Tensor:
        return torch.sigmoid(self.scale * (self.linear(samples) - self.offset))
