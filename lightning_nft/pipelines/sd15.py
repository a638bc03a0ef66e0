"""Stable Diffusion 1.5 (``StableDiffusionPipeline``: epsilon-prediction UNet) for reward fine-tuning.

``EpsilonUNetVelocity`` turns the UNet's noise prediction into our velocity (VP -> rectified-flow change
of variables, ``lightning_nft.diffusers_backbones``). Text: one CLIP encoder via the pipeline's
``encode_prompt``; the condition is ``{"encoder_hidden_states": (n, 77, D)}``.

Time grid: DDIM's (J. Song, C. Meng, S. Ermon, "Denoising Diffusion Implicit Models", arXiv:2010.02502).
A deterministic DDIM step between discrete timesteps ``k -> k'`` is exactly one Euler step of our ODE
between ``t_k = rf_time(abar_k)`` and ``t_k'`` (the existing adapter test checks this), so the grid is
``t_i = sqrt(abar_{k_i}) / (sqrt(abar_{k_i}) + sqrt(1 - abar_{k_i}))`` over the scheduler's own
timesteps ``k_i`` (``timestep_spacing``, ``steps_offset`` from its config), followed by ``t = 1``. The
first time is the scheduler's noisiest level, not ``t = 0`` (``t ~ 0.064`` for SD1.5's ``abar_999``; the
10-step grid with SD1.5's "leading" spacing starts at ``abar_901``). The last step goes to ``t = 1`` (the
data prediction): DDIM with ``set_alpha_to_one=True``; SD1.5's config stops one level short, at
``abar_0 = 0.99915`` (``t ~ 0.97``), whose state is not yet a clean latent in our coordinates.
"""

from __future__ import annotations

import copy
from typing import Any, Union

import torch
from torch import Tensor

from lightning_nft.diffusers_backbones import EpsilonUNetVelocity
from lightning_nft.paths import rf_time_from_alpha_bar
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

# the attention projections of the UNet's transformer blocks (diffusers' text-to-image LoRA example)
SD15_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def ddim_scheduler(scheduler: Any) -> Any:
    """A ``DDIMScheduler`` with the noise schedule and spacing of ``scheduler``'s config (PNDM for SD1.5)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config)


def sd15_time_grid(scheduler: Any, n_steps: int) -> Tensor:
    """DDIM's timesteps as our times, then ``t = 1`` (module docstring); float64, increasing."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(n_steps)
    abar = sched.alphas_cumprod.double()[sched.timesteps.long()]
    return torch.cat([rf_time_from_alpha_bar(abar), torch.ones(1, dtype=torch.float64)])


def _encode_sd15(pipe: Any, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return {"encoder_hidden_states": embeds}


def build_sd15(source: Any, *, dtype: DTypeLike = None, device: Union[None, str, torch.device] = None,
               gradient_checkpointing: bool = False, text_encoder_device: Union[None, str, torch.device] = None,
               offload_vae: bool = False) -> PipelineParts:
    """SD1.5 parts from a ``StableDiffusionPipeline``, a local folder or a hub id.

    The pipeline's scheduler (PNDM in SD1.5's release) is replaced by DDIM with the same noise schedule
    for the grid; arguments as :func:`~lightning_nft.pipelines.sd3.build_sd3`.
    """
    pipe, family, description = load_diffusers_pipeline(source, dtype)
    if family != "sd15":
        raise ValueError(f"{description} is a {type(pipe).__name__}, not a StableDiffusionPipeline")
    if pipe.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"{description}: only epsilon-prediction SD1.x/2.x-base pipelines are supported "
                         f"(scheduler prediction_type={pipe.scheduler.config.get('prediction_type')!r})")
    unet = prepare_denoiser(pipe.unet, gradient_checkpointing, device)
    scheduler = ddim_scheduler(pipe.scheduler)
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)  # the UNet halves the latents this many times

    def grid(n_steps: int, height: int, width: int) -> Tensor:
        return sd15_time_grid(scheduler, n_steps)

    return PipelineParts(
        family="sd15",
        backbone=EpsilonUNetVelocity(unet, scheduler.alphas_cumprod),
        prompt_encoder=PromptEncoder(text_only_pipeline(pipe, requires_safety_checker=False), _encode_sd15,
                                     text_encoder_device),
        decoder=VAEDecoder(float32(pipe.vae), offload=offload_vae),
        latent_channels=int(unet.config.in_channels),
        vae_scale_factor=vae_factor,
        size_multiple=vae_factor * unet_factor,
        lora_targets=list(SD15_LORA_TARGETS),
        grid=grid,
        source=description,
    )
