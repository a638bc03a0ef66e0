"""Classifier-free guidance on velocity fields.

Classifier-free guidance (J. Ho and T. Salimans, "Classifier-Free Diffusion Guidance",
arXiv:2207.12598) extrapolates from the unconditional toward the conditional prediction. For a
velocity field in our convention (noise at ``t = 0``, data at ``t = 1``) with guidance scale ``w``:

    v_w(x, t, c) = v(x, t, u) + w (v(x, t, c) - v(x, t, u)),

where ``u`` is the unconditional (empty or negative-prompt) condition. ``w = 1`` is the conditional
field itself (returned without an extra network pass); ``w = 0`` the unconditional one. The two
predictions are computed in one network call on the concatenated batch ``[u; c]`` (``2B`` rows), as
diffusers' pipelines do; for a linear network output this equals two separate calls.

Flux-dev's *distilled* guidance is not this: it is an input of the network (``guidance``), one pass.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from lightning_nft.conditions import concat_conditions

VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]


def guided_velocity(velocity: VelocityFn, x: Tensor, t: Tensor, cond: Any, uncond: Any, scale: float) -> Tensor:
    """``v(x, t, uncond) + scale (v(x, t, cond) - v(x, t, uncond))`` with one call on ``2B`` rows.

    Args:
        velocity: ``velocity(x (B, *S), t (B,), cond) -> (B, *S)``.
        x: states ``(B, *S)``; t: times ``(B,)`` (or a scalar tensor).
        cond, uncond: ``B`` rows of conditional and unconditional (negative-prompt) conditions, of one kind.
        scale: guidance scale ``w``; ``1`` returns ``velocity(x, t, cond)`` exactly (one pass).
    """
    if scale == 1.0:
        return velocity(x, t, cond)
    if uncond is None:
        raise ValueError(f"guidance scale {scale} needs an unconditional (negative-prompt) condition, got None")
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
    both = velocity(torch.cat([x, x]), torch.cat([t, t]), concat_conditions([uncond, cond]))
    v_u, v_c = both.chunk(2)
    return v_u + scale * (v_c - v_u)


class GuidedVelocity:
    """``velocity`` with classifier-free guidance toward ``cond`` away from a fixed ``uncond``.

    A callable ``(x, t, cond) -> v_w`` for the samplers; ``uncond`` holds ``B`` rows (one per sample
    of the batch being integrated) and is paired row by row with ``cond``.
    """

    def __init__(self, velocity: VelocityFn, uncond: Any, scale: float) -> None:
        self.velocity, self.uncond, self.scale = velocity, uncond, float(scale)

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return guided_velocity(self.velocity, x, t, cond, self.uncond, self.scale)
