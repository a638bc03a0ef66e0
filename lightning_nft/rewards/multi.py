"""``MultiReward``: a weighted sum of named rewards that remembers each part.

``r(x, c) = sum_k w_k r_k(x, c)`` with ``(B,)`` outputs. It is differentiable iff every part is.
After each call, ``last_components[name]`` holds the detached ``(B,)`` values of part ``name``
(before weighting), so a callback can log every part of the reward.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor, nn

from lightning_nft.rewards.base import Reward


class MultiReward(Reward):
    """Weighted sum of rewards.

    Args:
        rewards: name -> reward module (each returning ``(B,)``).
        weights: name -> weight; a missing name gets weight 1.0, an unknown name is an error.
    """

    def __init__(self, rewards: Dict[str, Reward], weights: Optional[Dict[str, float]] = None) -> None:
        super().__init__()
        if not rewards:
            raise ValueError("MultiReward needs at least one reward")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(rewards))
        if unknown:
            raise ValueError(f"weights given for unknown rewards {unknown}; rewards are {sorted(rewards)}")
        self.rewards = nn.ModuleDict(dict(rewards))
        self.weights: Dict[str, float] = {name: float(weights.get(name, 1.0)) for name in rewards}
        self.differentiable = all(getattr(r, "differentiable", False) for r in self.rewards.values())
        self.last_components: Dict[str, Tensor] = {}

    def forward(self, samples: Tensor, cond: Optional[Any] = None) -> Tensor:
        total: Optional[Tensor] = None
        components: Dict[str, Tensor] = {}
        for name, reward in self.rewards.items():
            value = reward(samples, cond)
            components[name] = value.detach()
            term = self.weights[name] * value
            total = term if total is None else total + term
        self.last_components = components
        return total
