"""The rollout buffer of one online round.

One round samples ``K`` outputs for each of ``P``
conditions from the sampling policy, scores them, normalises the rewards within each group and
keeps everything for the round's gradient steps. Shapes use ``N = P * K`` on this rank.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from torch import Tensor

from lightning_nft.conditions import index_condition


@dataclass
class RolloutBatch:
    """Samples of one round and everything the objectives need about them.

    Attributes:
        x1: final samples ``(N, *S)``.
        rewards: raw rewards ``(N,)``.
        advantages: group-normalised (and clipped) advantages ``(N,)``.
        r: optimality probabilities in ``[0, 1]`` ``(N,)`` (DiffusionNFT).
        group: group index of each sample ``(N,)`` (unique across ranks).
        cond: the condition of each sample (``N`` rows) or ``None``.
        x0: the starting noise ``(N, *S)``.
        trajectory: states on the sampler grid ``(T+1, N, *S)`` when kept.
        times: the sampler grid ``(T+1,)`` when a trajectory is kept.
        log_probs: per-step Gaussian transition log-probabilities ``(T, N)`` (SDE samplers).
    """

    x1: Tensor
    rewards: Tensor
    advantages: Tensor
    r: Tensor
    group: Tensor
    cond: Any = None
    x0: Optional[Tensor] = None
    trajectory: Optional[Tensor] = None
    times: Optional[Tensor] = None
    log_probs: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.x1.shape[0]

    def index(self, idx: Tensor) -> "RolloutBatch":
        """The rows ``idx`` of every per-sample field (the grid ``times`` is shared)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "times" or v is None:
                out[f.name] = v
            elif f.name == "cond":
                out[f.name] = index_condition(v, idx)
            elif f.name in ("trajectory", "log_probs"):
                out[f.name] = v[:, idx.to(v.device)]
            else:
                out[f.name] = v[idx.to(v.device)]
        return RolloutBatch(**out)
