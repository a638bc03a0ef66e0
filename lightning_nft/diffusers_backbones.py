"""Adapters that present diffusers models as velocity fields in our convention.

Our convention (noise at ``t = 0``, data at ``t = 1``, ``x_t = (1 - t) x0 + t x1``, velocity
``x1 - x0``) is converted here, once; past these adapters nothing knows diffusers' direction.

* :class:`FlowTransformerVelocity` wraps a rectified-flow transformer called like SD3's
  ``SD3Transformer2DModel``. diffusers samples ``x_sigma = (1 - sigma) data + sigma noise`` and the
  network predicts ``noise - data``; with ``sigma = 1 - t`` that state *is* our ``x_t`` and the
  prediction is ``-v``, so ``v(x, t) = -net(x, timestep=1000 (1 - t))``.
* :class:`FluxTransformerVelocity` wraps ``FluxTransformer2DModel`` (FLUX.1-dev / -schnell). Three
  differences from SD3: the model multiplies its ``timestep`` input by 1000 itself, so it receives
  ``sigma = 1 - t``; it works on 2x2-packed latents ``(B, H W / 4, 4 C)`` with positional ids
  ``img_ids (H W / 4, 3)`` and ``txt_ids (L, 3)`` shared by the whole batch (2-D, not per sample);
  and FLUX.1-dev takes its *distilled* guidance scale as an input (``guidance``, one pass, not CFG).
  The adapter takes unpacked latents ``(B, C, H, W)`` and does the packing and the ids itself.
* :class:`EpsilonUNetVelocity` wraps an epsilon-prediction VP UNet (SD1.5's
  ``UNet2DConditionModel``, or ``UNet2DModel``). A VP state ``x = sqrt(abar) x1 + sqrt(1 - abar) eps``
  rescaled by ``1 / (sqrt(abar) + sqrt(1 - abar))`` is the rectified-flow point at
  ``t = sqrt(abar) / (sqrt(abar) + sqrt(1 - abar))``. Inverting, our ``(y, t)`` maps to
  ``abar = t^2 / (t^2 + (1 - t)^2)`` and ``x_vp = y / sqrt(t^2 + (1 - t)^2)``; the UNet's noise
  prediction then gives ``v = (y - eps_hat) / t`` (``paths.velocity_from_epsilon``). The discrete
  timestep fed to the UNet is interpolated from the scheduler's ``alphas_cumprod`` table. The model
  was never trained noisier than the table's last entry: :attr:`EpsilonUNetVelocity.t_start`
  (``t ~ 0.064`` for SD1.5), where sampling must start (not at ``t = 0``).

Conditions are dicts of keyword tensors forwarded to the model, one row per sample, e.g.
``{"encoder_hidden_states": (B, L, D), "pooled_projections": (B, P)}`` for SD3 and Flux. The
adapters run the model in its own dtype (bf16 weights take bf16 inputs) and return velocities in
the dtype of ``x``. All are plain ``nn.Module`` s, so LoRA (``lightning_nft.lora``) and the
fine-tuning module apply unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from lightning_nft.paths import (
    diffusers_timestep_from_time,
    rf_time_from_alpha_bar,
    sigma_from_time,
    velocity_from_diffusers_flow,
    velocity_from_epsilon,
)


def _model_kwargs(cond: Any, dtype: torch.dtype) -> dict[str, Any]:
    """``cond`` (a dict of keyword tensors, or None) with floating tensors cast to the model's ``dtype``."""
    if cond is None:
        return {}
    if isinstance(cond, Mapping):
        return {k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in cond.items()}
    raise TypeError(f"diffusers adapters take conditions as a dict of keyword tensors (or None), got {type(cond).__name__}")


def _sample_of(out: Any) -> Tensor:
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)


def _dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype of the model's (first) floating-point weights: what its inputs must be cast to."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _times(t: Tensor, x: Tensor) -> Tensor:
    """``t`` as a float32 ``(B,)`` tensor (timesteps stay float32 even for bf16 models, as in diffusers)."""
    return torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])


class FlowTransformerVelocity(nn.Module):
    """``v(x, t, cond) = -model(hidden_states=x, timestep=1000 (1 - t), **cond).sample`` (SD3, SD3.5)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        dtype = _dtype_of(self.model)
        out = self.model(hidden_states=x.to(dtype), timestep=diffusers_timestep_from_time(_times(t, x)),
                         **_model_kwargs(cond, dtype))
        return velocity_from_diffusers_flow(_sample_of(out)).to(x.dtype)


def pack_latents(x: Tensor) -> Tensor:
    """Flux's 2x2 packing: ``(B, C, H, W) -> (B, (H/2)(W/2), 4 C)``, channel-major inside each 2x2 patch."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need an even height and width, got {h}x{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents`: ``(B, (H/2)(W/2), 4 C) -> (B, C, H, W)`` for latent ``height, width``."""
    b, n, c4 = x.shape
    x = x.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def flux_image_ids(height: int, width: int, device: Any = None) -> Tensor:
    """Positional ids ``((H/2)(W/2), 3)`` of the packed latent tokens: ``(0, row, column)``, shared by the batch."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class FluxTransformerVelocity(nn.Module):
    """Velocity of a ``FluxTransformer2DModel`` on unpacked latents ``(B, C, H, W)``.

    ``v(x, t, cond) = -unpack(model(pack(x), timestep=1 - t, guidance, img_ids, txt_ids, **cond))``;
    the model scales ``timestep`` by 1000 internally, so it receives ``sigma = 1 - t``.

    Args:
        model: the transformer.
        guidance_scale: FLUX.1-dev's distilled guidance (the ``guidance`` input, one pass per step; 3.5 is
            ``FluxPipeline``'s default). Required when ``model.config.guidance_embeds`` is true, ignored
            otherwise (FLUX.1-schnell). A condition may carry per-row values under ``"guidance"`` ``(B,)``.

    ``cond``: ``{"encoder_hidden_states": (B, L, D), "pooled_projections": (B, P)}``; the text ids
    ``(L, 3)`` (zeros) and image ids are built here, once for the batch.
    """

    def __init__(self, model: nn.Module, guidance_scale: Optional[float] = None) -> None:
        super().__init__()
        self.model = model
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)

    @property
    def uses_guidance(self) -> bool:
        """Whether the model takes a distilled ``guidance`` input (FLUX.1-dev)."""
        return bool(getattr(getattr(self.model, "config", None), "guidance_embeds", False))

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"FluxTransformerVelocity takes unpacked latents (B, C, H, W), got shape {tuple(x.shape)}")
        dtype = _dtype_of(self.model)
        kwargs = _model_kwargs(cond, dtype)
        for key in ("txt_ids", "img_ids"):
            if key in kwargs:
                raise ValueError(f"do not pass {key!r} in the condition: the adapter builds the shared ids itself")
        guidance = kwargs.pop("guidance", None)
        if self.uses_guidance:
            if guidance is None:
                if self.guidance_scale is None:
                    raise ValueError("this Flux transformer takes a distilled guidance input (FLUX.1-dev): "
                                     "set guidance_scale (e.g. 3.5) or pass cond['guidance'] (B,)")
                guidance = torch.full((x.shape[0],), self.guidance_scale, device=x.device, dtype=torch.float32)
            guidance = guidance.to(device=x.device, dtype=torch.float32)
        else:
            guidance = None
        b, c, h, w = x.shape
        text = kwargs.get("encoder_hidden_states")
        txt_ids = torch.zeros(text.shape[1] if text is not None else 0, 3, device=x.device, dtype=dtype)
        out = self.model(hidden_states=pack_latents(x).to(dtype), timestep=sigma_from_time(_times(t, x)),
                         guidance=guidance, txt_ids=txt_ids, img_ids=flux_image_ids(h, w, x.device).to(dtype),
                         **kwargs)
        return velocity_from_diffusers_flow(unpack_latents(_sample_of(out), h, w)).to(x.dtype)


def alpha_bar_from_time(t: Tensor) -> Tensor:
    """The VP noise level with rectified-flow time ``t``: ``abar = t^2 / (t^2 + (1 - t)^2)``."""
    return t * t / (t * t + (1 - t) * (1 - t))


class EpsilonUNetVelocity(nn.Module):
    """Velocity of an epsilon-prediction VP UNet in our (rectified-flow) coordinates.

    Args:
        model: ``model(sample, timestep, **cond).sample`` predicts the noise.
        alphas_cumprod: the scheduler's ``abar`` per discrete timestep, decreasing, shape ``(T,)``
            (``DDIMScheduler(...).alphas_cumprod``).
        t_min: times below this are clamped to it. Default: :attr:`t_start`, the noisiest level of the
            table (below it the timestep would leave the range the model was trained on, and ``t = 0``
            divides by zero in ``v = (y - eps) / t``).
    """

    def __init__(self, model: nn.Module, alphas_cumprod: Tensor, t_min: Optional[float] = None) -> None:
        super().__init__()
        self.model = model
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.dim() != 1 or ac.numel() < 2 or not bool((ac[1:] <= ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be a decreasing 1-D table")
        self.register_buffer("log_snr_table", torch.log(ac / (1 - ac)), persistent=False)
        self.t_start = float(rf_time_from_alpha_bar(ac[-1]))
        self.t_min = self.t_start if t_min is None else float(t_min)

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
        wide = torch.float32 if x.device.type == "mps" else torch.float64  # the table's precision where available
        t = torch.as_tensor(t, dtype=wide, device=x.device).expand(x.shape[0]).clamp(self.t_min, 1 - 1e-3)
        ab = alpha_bar_from_time(t)
        scale = torch.rsqrt(t * t + (1 - t) * (1 - t)).reshape(-1, *([1] * (x.dim() - 1)))
        x_vp = (x.to(wide) * scale).to(x.dtype)
        dtype = _dtype_of(self.model)
        timestep = self.timestep_from_alpha_bar(ab).float()
        eps = _sample_of(self.model(x_vp.to(dtype), timestep, **_model_kwargs(cond, dtype))).to(x.dtype)
        return velocity_from_epsilon(x_vp, eps, ab.to(x.dtype))
