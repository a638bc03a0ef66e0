"""Decode steps: the latents a flow model samples -> pixels in ``[-1, 1]`` for rewards, grids and metrics.

Pixel models (the digits flows) decode with :class:`IdentityDecoder`. Latent models (SD3, Flux,
SD1.5) sample in the latent space of a VAE; diffusers stores latents normalised by the VAE's
``scaling_factor`` ``s`` and (SD3, Flux) ``shift_factor`` ``m``, so that

    decode(z) = VAE.decode(z / s + m),        encode(x) = (mean of VAE.encode(x) - m) * s,

which is what diffusers' pipelines do before ``vae.decode`` and after ``vae.encode``.
(SD1.5: ``s = 0.18215``, ``m = 0``; SD3: ``s = 1.5305``, ``m = 0.0609``; Flux: ``s = 0.3611``,
``m = 0.1159``; read from the VAE's config unless given.)

A decoder is a frozen ``nn.Module`` ``forward(latents (B, c, h, w)) -> pixels (B, C, H, W)``, kept in
eval mode, and differentiable in its input (Adjoint Matching differentiates rewards through it).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


class Decoder(nn.Module):
    """Base class: ``forward(latents) -> pixels`` in ``[-1, 1]``; frozen, always in eval mode."""

    def train(self, mode: bool = True) -> "Decoder":
        return super().train(False)  # a frozen decoder: never in train mode

    def forward(self, latents: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class IdentityDecoder(Decoder):
    """Samples already are pixels: ``decode(x) = x``."""

    def forward(self, latents: Tensor) -> Tensor:
        return latents


class AutoencoderKLDecoder(Decoder):
    """diffusers ``AutoencoderKL`` decode: ``pixels = VAE.decode(z / scaling_factor + shift_factor)``.

    Args:
        vae: an ``AutoencoderKL``; or ``path`` (a local folder or hub id, with ``subfolder``, e.g.
            ``"vae"`` inside a pipeline folder) to load one with ``AutoencoderKL.from_pretrained``.
        scaling_factor, shift_factor: override the VAE config's values (``shift_factor`` ``None`` in the
            config means ``0``).
        clamp: clamp decoded pixels to ``[-1, 1]`` (the VAE may overshoot slightly).
    """

    def __init__(self, vae: Optional[nn.Module] = None, path: Optional[str] = None, subfolder: Optional[str] = None,
                 scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None,
                 clamp: bool = True) -> None:
        super().__init__()
        if vae is None:
            if path is None:
                raise ValueError("AutoencoderKLDecoder needs a vae or a path to load one from")
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder)
        self.vae = vae.requires_grad_(False).eval()
        config = getattr(vae, "config", None)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else config.scaling_factor)
        config_shift = getattr(config, "shift_factor", None) if config is not None else None
        self.shift_factor = float(shift_factor if shift_factor is not None else (config_shift or 0.0))
        self.clamp = bool(clamp)

    def forward(self, latents: Tensor) -> Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        pixels = self.vae.decode(z.to(self.vae.dtype)).sample
        return pixels.clamp(-1.0, 1.0) if self.clamp else pixels

    def encode(self, pixels: Tensor) -> Tensor:
        """Normalised latents of ``pixels``: ``(mean of VAE.encode(x) - shift_factor) * scaling_factor``."""
        z = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean
        return (z - self.shift_factor) * self.scaling_factor


def decode_samples(decoder: Optional[nn.Module], samples: Tensor) -> Tensor:
    """``decoder(samples)``, or ``samples`` unchanged when ``decoder`` is ``None``."""
    return samples if decoder is None else decoder(samples)
