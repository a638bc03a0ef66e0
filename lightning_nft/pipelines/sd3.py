"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``) for reward fine-tuning.

SD3 (P. Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis",
arXiv:2403.03206) is a rectified flow in diffusers' direction; ``FlowTransformerVelocity`` converts it.
Text: two CLIP encoders (per-token states concatenated, pooled outputs concatenated) and a T5 whose
states are appended along the sequence, all via the pipeline's own ``encode_prompt``; the condition is
``{"encoder_hidden_states": (n, L, D), "pooled_projections": (n, P)}``.

Time grid: the scheduler's (``FlowMatchEulerDiscreteScheduler``, ``shift = 3`` for SD3/SD3.5):
``sigma_i`` uniform between its largest and smallest training noise level, shifted by
``sigma' = shift sigma / (1 + (shift - 1) sigma)``, then ``0``; our times are ``t_i = 1 - sigma'_i``
(a resolution-dependent ``mu`` is used when the scheduler config asks for dynamic shifting).
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_nft.diffusers_backbones import FlowTransformerVelocity
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

# the attention projections of the joint blocks (image and text streams): DiffusionNFT's and Flow-GRPO's choice
SD3_LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]


def flow_scheduler_times(scheduler: Any, n_steps: int, mu: Optional[float] = None,
                         sigmas: Optional[Any] = None) -> Tensor:
    """``1 - sigmas`` of a copy of a flow-matching scheduler after ``set_timesteps`` (its own grid, float64)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

    sched = copy.deepcopy(scheduler)
    kwargs = {"mu": mu} if mu is not None else {}
    retrieve_timesteps(sched, n_steps, "cpu", sigmas=sigmas, **kwargs)
    return 1.0 - sched.sigmas.double().cpu()


def sd3_time_grid(scheduler: Any, n_steps: int, image_seq_len: int) -> Tensor:
    """SD3's grid: the scheduler's shifted sigmas (``mu`` from the image length when dynamic shifting is on)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    cfg = scheduler.config
    mu = None
    if cfg.get("use_dynamic_shifting", False):
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
    return flow_scheduler_times(scheduler, n_steps, mu=mu)


def _encode_sd3(max_sequence_length: int):
    def encode(pipe: Any, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    return encode


def build_sd3(source: Any, *, dtype: DTypeLike = None, device: Union[None, str, torch.device] = None,
              gradient_checkpointing: bool = False, text_encoder_device: Union[None, str, torch.device] = None,
              offload_vae: bool = False, max_sequence_length: int = 256) -> PipelineParts:
    """SD3/SD3.5 parts from a ``StableDiffusion3Pipeline``, a local folder or a hub id.

    Args:
        source: the pipeline object, or a path / hub id (e.g. ``stabilityai/stable-diffusion-3.5-medium``).
        dtype: weights of the transformer and text encoders (e.g. ``bfloat16``); the VAE stays float32.
        device: where the transformer goes (default: where it is).
        gradient_checkpointing: recompute the transformer's blocks in the backward pass.
        text_encoder_device: where the three text encoders run (default: where they are; CPU after loading).
        offload_vae: keep the VAE on the CPU, outside the module's parameters.
        max_sequence_length: T5 tokens (diffusers' default 256).
    """
    pipe, family, description = load_diffusers_pipeline(source, dtype)
    if family != "sd3":
        raise ValueError(f"{description} is a {type(pipe).__name__}, not a StableDiffusion3Pipeline")
    transformer = prepare_denoiser(pipe.transformer, gradient_checkpointing, device)
    patch = int(transformer.config.patch_size)
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    scheduler = copy.deepcopy(pipe.scheduler)

    def grid(n_steps: int, height: int, width: int) -> Tensor:
        return sd3_time_grid(scheduler, n_steps, (height // (vae_factor * patch)) * (width // (vae_factor * patch)))

    return PipelineParts(
        family="sd3",
        backbone=FlowTransformerVelocity(transformer),
        prompt_encoder=PromptEncoder(text_only_pipeline(pipe), _encode_sd3(max_sequence_length), text_encoder_device),
        decoder=VAEDecoder(float32(pipe.vae), offload=offload_vae),
        latent_channels=int(transformer.config.in_channels),
        vae_scale_factor=vae_factor,
        size_multiple=vae_factor * patch,
        lora_targets=list(SD3_LORA_TARGETS),
        grid=grid,
        source=description,
    )
