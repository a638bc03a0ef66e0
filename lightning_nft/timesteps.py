"""Training-time densities ``p(t)`` on ``[t_min, t_max]`` (our convention: noise at 0, data at 1).

* ``uniform``: ``t ~ U[t_min, t_max]``.
* ``logit_normal``: ``t = sigmoid(m + s z)``, ``z ~ N(0, 1)`` (SD3's density), then clamped.
* ``shifted``: uniform ``u``, then diffusers' shift on ``sigma = 1 - u``:
  ``sigma' = shift sigma / (1 + (shift - 1) sigma)``, ``t = 1 - sigma'`` (``shift > 1`` favours noise).

Objectives that train on the sampler's own grid (DiffusionNFT's ``time_source="grid"``, Flow-GRPO,
Adjoint Matching) index the rollout's time grid themselves.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

TIME_DENSITIES = ("uniform", "logit_normal", "shifted")


class TimeSampler:
    """Draw ``(n,)`` training times from one of :data:`TIME_DENSITIES`."""

    def __init__(
        self,
        density: str = "uniform",
        t_min: float = 0.0,
        t_max: float = 1.0,
        shift: float = 1.0,
        loc: float = 0.0,
        scale: float = 1.0,
    ) -> None:
        if density not in TIME_DENSITIES:
            raise ValueError(f"unknown time density {density!r}; choose one of {TIME_DENSITIES}")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if shift <= 0 or scale <= 0:
            raise ValueError("shift and scale must be positive")
        self.density, self.t_min, self.t_max = density, t_min, t_max
        self.shift, self.loc, self.scale = shift, loc, scale

    def __call__(self, n: int, device=None, dtype=torch.float32, generator: Optional[torch.Generator] = None) -> Tensor:
        if self.density == "logit_normal":
            z = torch.randn(n, device=device, dtype=dtype, generator=generator)
            return torch.sigmoid(self.loc + self.scale * z).clamp(self.t_min, self.t_max)
        u = torch.rand(n, device=device, dtype=dtype, generator=generator)
        t = self.t_min + (self.t_max - self.t_min) * u
        if self.density == "shifted":
            sigma = 1 - t
            t = 1 - self.shift * sigma / (1 + (self.shift - 1) * sigma)
        return t
