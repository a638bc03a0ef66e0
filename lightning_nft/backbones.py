"""Velocity-field backbones: plain ``nn.Module`` s with ``forward(x, t, cond=None) -> v``.

Shapes: ``x (B, *S)``, ``t (B,)`` in ``[0, 1]`` (our convention, noise at 0), optional ``cond``;
the output has the shape of ``x``. Adapters for diffusers models live in
``lightning_nft.diffusers_backbones``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn


class SinusoidalTimeEmbedding(nn.Module):
    """``t (B,) -> (B, dim)``: sines and cosines of ``t`` at geometrically spaced frequencies."""

    def __init__(self, dim: int = 32, max_period: float = 1000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs * 2 * math.pi, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        args = t.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return torch.cat([args.sin(), args.cos()], dim=-1)


class MLPVelocity(nn.Module):
    """MLP velocity field for flat data ``(B, dim)`` with a sinusoidal time embedding.

    ``num_classes > 0`` adds a learned class embedding for integer conditions ``cond (B,)``.
    ``zero_init`` sets the last layer to zero so the field starts at exactly ``v = 0`` (used for
    residuals around a base model).
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 128,
        depth: int = 3,
        time_embed_dim: int = 32,
        num_classes: int = 0,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError("dim, hidden and depth must be positive")
        self.dim = dim
        self.time_embed = SinusoidalTimeEmbedding(time_embed_dim)
        self.class_embed = nn.Embedding(num_classes, time_embed_dim) if num_classes > 0 else None
        layers: list[nn.Module] = []
        width = dim + time_embed_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, dim)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Any] = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        emb = self.time_embed(t).to(x.dtype)
        if self.class_embed is not None:
            if cond is None:
                raise ValueError("this MLPVelocity is class-conditional: pass cond (B,) integer labels")
            emb = emb + self.class_embed(torch.as_tensor(cond, device=x.device).long()).to(x.dtype)
        return self.head(self.body(torch.cat([x, emb], dim=-1)))


class ResidualVelocity(nn.Module):
    """``v(x, t) = base(x, t) + residual(x, t)``: a trainable correction around a frozen base.

    With a zero-initialised residual (``MLPVelocity(zero_init=True)``) the model starts exactly at the
    base, the natural initialisation for fine-tuning an exact field such as
    ``lightning_nft.analytic.GaussianMixture``. The base is frozen (``requires_grad_(False)``).
    """

    def __init__(self, base: nn.Module, residual: nn.Module) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.residual = residual

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Any] = None) -> Tensor:
        return self.base(x, t, cond) + self.residual(x, t, cond)
