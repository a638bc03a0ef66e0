"""FLUX.1 (``FluxPipeline``: FLUX.1-dev with its distilled guidance input, FLUX.1-schnell) for reward fine-tuning.

``FluxTransformerVelocity`` converts the transformer (timestep ``sigma`` because the model scales it
by 1000 itself; 2x2-packed latents and batch-shared positional ids handled inside; FLUX.1-dev's
``guidance`` input). Text: CLIP (pooled output) and T5 (per-token states) via the pipeline's own
``encode_prompt``; the condition is ``{"encoder_hidden_states": (n, L, D), "pooled_projections": (n, P)}``.

Time grid (as ``FluxPipeline``): ``sigma_i = linspace(1, 1 / n, n)`` shifted with the
resolution-dependent ``mu = calculate_shift(image_seq_len)`` (the scheduler's exponential time shift,
``sigma' = e^mu / (e^mu + 1 / sigma - 1)``), then ``0``; our times are ``t_i = 1 - sigma'_i``.
``image_seq_len`` is the number of packed latent tokens, ``(H / 16)(W / 16)`` for the real VAE.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from lightning_nft.diffusers_backbones import FluxTransformerVelocity
from lightning_nft.pipelines.common import (
    DTypeLike,
    PipelineParts,
    PromptEncoder,
    VAEDecoder,
    float32,
    load_diffusers_pipeline,
    prepare_denoiser,
    text_only_pipeline,
)
from lightning_nft.pipelines.sd3 import flow_scheduler_times

# attention projections of the double-stream blocks (image and text) and of the single-stream blocks
FLUX_LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                     "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out"]

FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


def flux_time_grid(scheduler: Any, n_steps: int, image_seq_len: int) -> Tensor:
    """FluxPipeline's grid for ``image_seq_len`` packed tokens (module docstring)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = scheduler.config
    sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1.0 / n_steps, n_steps)
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    return flow_scheduler_times(scheduler, n_steps, mu=mu, sigmas=sigmas)


def _encode_flux(max_sequence_length: int):
    def encode(pipe: Any, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                               max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    return encode


def build_flux(source: Any, *, dtype: DTypeLike = None, device: Union[None, str, torch.device] = None,
               gradient_checkpointing: bool = False, text_encoder_device: Union[None, str, torch.device] = None,
               offload_vae: bool = False, max_sequence_length: int = 512,
               guidance_scale: Optional[float] = FLUX_DEFAULT_GUIDANCE) -> PipelineParts:
    """FLUX.1 parts from a ``FluxPipeline``, a local folder or a hub id (``black-forest-labs/FLUX.1-dev``).

    ``guidance_scale``: FLUX.1-dev's distilled guidance, an input of the transformer (ignored by
    FLUX.1-schnell, which has no guidance embedding). Other arguments as :func:`~lightning_nft.pipelines.sd3.build_sd3`;
    ``max_sequence_length``: T5 tokens (512 for dev, 256 for schnell in diffusers' examples).
    """
    pipe, family, description = load_diffusers_pipeline(source, dtype)
    if family != "flux":
        raise ValueError(f"{description} is a {type(pipe).__name__}, not a FluxPipeline")
    transformer = prepare_denoiser(pipe.transformer, gradient_checkpointing, device)
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    scheduler = copy.deepcopy(pipe.scheduler)

    def grid(n_steps: int, height: int, width: int) -> Tensor:
        return flux_time_grid(scheduler, n_steps, (height // (2 * vae_factor)) * (width // (2 * vae_factor)))

    return PipelineParts(
        family="flux",
        backbone=FluxTransformerVelocity(transformer, guidance_scale=guidance_scale),
        prompt_encoder=PromptEncoder(text_only_pipeline(pipe), _encode_flux(max_sequence_length), text_encoder_device),
        decoder=VAEDecoder(float32(pipe.vae), offload=offload_vae),
        latent_channels=int(transformer.config.in_channels) // 4,
        vae_scale_factor=vae_factor,
        size_multiple=2 * vae_factor,
        lora_targets=list(FLUX_LORA_TARGETS),
        grid=grid,
        source=description,
    )
