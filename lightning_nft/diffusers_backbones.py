"""Adapters that present diffusers models as velocity fields in our convention.

Past these adapters nothing knows diffusers' direction:

* :class:`FlowTransformerVelocity` wraps a rectified-flow transformer (SD3 ``SD3Transformer2DModel``,
  Flux-style models with the same call). diffusers samples ``x_sigma = (1 - sigma) data + sigma
  noise`` and the network predicts ``noise - data``; with ``sigma = 1 - t`` that state *is* our
  ``x_t`` and the prediction is ``-v``, so ``v(x, t) = -net(x, timestep=1000 (1 - t))``.
* :class:`EpsilonUNetVelocity` wraps an epsilon-prediction VP UNet (SD1.5's
  ``UNet2DConditionModel``, or ``UNet2DModel``). A VP state ``x = sqrt(abar) x1 + sqrt(1 - abar) eps``
  rescaled by ``1 / (sqrt(abar) + sqrt(1 - abar))`` is the rectified-flow point at
  ``t = sqrt(abar) / (sqrt(abar) + sqrt(1 - abar))``. Inverting, our ``(y, t)`` maps to
  ``abar = t^2 / (t^2 + (1 - t)^2)`` and ``x_vp = y / sqrt(t^2 + (1 - t)^2)``; the UNet's noise
  prediction then gives ``v = (y - eps_hat) / t`` (``paths.velocity_from_epsilon``). The discrete
  timestep fed to the UNet is interpolated from the scheduler's ``alphas_cumprod`` table.

Conditions are dicts of keyword tensors forwarded to the model, one row per sample, e.g.
``{"encoder_hidden_states": (B, L, D), "pooled_projections": (B, P)}`` for SD3. Both adapters are
plain ``nn.Module`` s, so LoRA (``lightning_nft.lora``) and the fine-tuning module apply unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from lightning_nft.paths import diffusers_timestep_from_time, velocity_from_diffusers_flow, velocity_from_epsilon


def _model_kwargs(cond: Any) -> dict[str, Any]:
    if cond is None:
        return {}
    if isinstance(cond, Mapping):
        return dict(cond)
    raise TypeError("diffusers adapters take conditions as a dict of keyword tensors (or None)")


def _sample_of(out: Any) -> Tensor:
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)


class FlowTransformerVelocity(nn.Module):
    """``v(x, t, cond) = -model(hidden_states=x, timestep=1000 (1 - t), **cond).sample``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        out = self.model(hidden_states=x, timestep=diffusers_timestep_from_time(t), **_model_kwargs(cond))
        return velocity_from_diffusers_flow(_sample_of(out))


def alpha_bar_from_time(t: Tensor) -> Tensor:
    """The VP noise level with rectified-flow time ``t``: ``abar = t^2 / (t^2 + (1 - t)^2)``."""
    return t * t / (t * t + (1 - t) * (1 - t))


class EpsilonUNetVelocity(nn.Module):
    """Velocity of an epsilon-prediction VP UNet in our (rectified-flow) coordinates.

    Args:
        model: ``model(sample, timestep, **cond).sample`` predicts the noise.
        alphas_cumprod: the scheduler's ``abar`` per discrete timestep, decreasing, shape ``(T,)``
            (``DDPMScheduler(...).alphas_cumprod``).
        t_min: times below this are clamped (``t = 0`` is pure noise, where ``v = (y - eps)/t``
            divides by zero).
    """

    def __init__(self, model: nn.Module, alphas_cumprod: Tensor, t_min: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.dim() != 1 or ac.numel() < 2 or not bool((ac[1:] <= ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be a decreasing 1-D table")
        self.register_buffer("log_snr_table", torch.log(ac / (1 - ac)), persistent=False)
        self.t_min = float(t_min)

    def timestep_from_alpha_bar(self, alpha_bar: Tensor) -> Tensor:
        """Fractional discrete timestep whose table ``log(abar / (1 - abar))`` equals that of ``alpha_bar``."""
        table = self.log_snr_table  # decreasing in the timestep index
        target = torch.log(alpha_bar / (1 - alpha_bar)).to(table.dtype)
        flipped = table.flip(0)  # increasing
        idx = torch.searchsorted(flipped, target).clamp(1, table.numel() - 1)
        lo, hi = flipped[idx - 1], flipped[idx]
        frac = ((target - lo) / (hi - lo)).clamp(0, 1)
        pos_in_flipped = idx - 1 + frac
        return (table.numel() - 1) - pos_in_flipped

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0]).clamp(self.t_min, 1 - self.t_min)
        ab = alpha_bar_from_time(t)
        scale = torch.rsqrt(t * t + (1 - t) * (1 - t)).reshape(-1, *([1] * (x.dim() - 1)))
        x_vp = x * scale
        timestep = self.timestep_from_alpha_bar(ab).to(x.dtype)
        eps = _sample_of(self.model(x_vp, timestep, **_model_kwargs(cond)))
        return velocity_from_epsilon(x_vp, eps, ab)
