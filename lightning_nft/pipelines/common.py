"""What the fine-tuning module needs from a diffusers text-to-image pipeline, common to every family.

A family builder (``sd3``, ``flux``, ``sd15``) turns a diffusers pipeline into a :class:`PipelineParts`:

* ``backbone``: the denoiser as a velocity field in our convention (``lightning_nft.diffusers_backbones``);
* ``prompt_encoder``: ``list[str] -> dict[str, Tensor]`` of ``(n, ...)`` rows, running *all* the family's
  text encoders (frozen, on their own device, CPU by default: with an embedding cache each distinct
  prompt is encoded once, so the encoders need not sit on the accelerator);
* ``decoder``: the decode step ``latents (B, C, h, w) -> pixels (B, 3, H, W)`` in ``[-1, 1]`` (frozen VAE);
* the latent shape of a resolution, the family's own sampling time grid, its default LoRA targets.

Sampling starts from ``x = s(t_0) z``, ``z ~ N(0, I)``, at the grid's first time ``t_0``: diffusers'
schedulers start from unit-variance noise at their noisiest level. For the flow families ``t_0 = 0``
and ``s = 1``; for a VP model (SD1.5) that noise, seen in rectified-flow coordinates, is
``y = z / (sqrt(abar) + sqrt(1 - abar))`` at ``t_0 = sqrt(abar) / (sqrt(abar) + sqrt(1 - abar))``,
i.e. ``s(t_0) = sqrt(t_0^2 + (1 - t_0)^2)`` (:func:`initial_noise_scale`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

# diffusers pipeline class -> our family name
PIPELINE_FAMILIES = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "StableDiffusionPipeline": "sd15",
}

DTypeLike = Union[None, str, torch.dtype]


def resolve_dtype(dtype: DTypeLike) -> Optional[torch.dtype]:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` ... -> ``torch.dtype`` (``None`` stays ``None``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = names.get(str(dtype).lower(), str(dtype).lower()).replace("torch.", "")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16', 'float16' or 'float32'")
    return value


def initial_noise_scale(t_start: float) -> float:
    """``sqrt(t0^2 + (1 - t0)^2)``: the scale of unit noise at the VP model's noisiest level, in our coordinates."""
    return math.sqrt(t_start * t_start + (1.0 - t_start) * (1.0 - t_start))


class VAEDecoder(nn.Module):
    """Decode step ``pixels = vae.decode(latents / scaling_factor + shift_factor)``, clamped to ``[-1, 1]``.

    Frozen, in eval mode. ``offload=True`` keeps the VAE out of this module's parameters (so moving
    the fine-tuning module to the accelerator leaves it on the CPU): latents are decoded on the CPU
    and the pixels moved back to the latents' device. Shapes: ``(B, C, h, w) -> (B, 3, h f, w f)``
    with ``f`` the VAE's spatial factor.
    """

    def __init__(self, vae: nn.Module, offload: bool = False) -> None:
        super().__init__()
        vae = vae.requires_grad_(False).eval()
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.offload = bool(offload)
        if self.offload:
            self.vae = None
            self._offloaded = [vae.to("cpu")]  # a list: not registered as a submodule
        else:
            self.vae = vae

    def _model(self) -> nn.Module:
        return self._offloaded[0] if self.offload else self.vae

    def forward(self, latents: Tensor) -> Tensor:
        vae = self._model()
        dtype = next(vae.parameters()).dtype
        device = next(vae.parameters()).device
        z = (latents.to(device=device, dtype=dtype) / self.scaling_factor) + self.shift_factor
        pixels = vae.decode(z).sample
        return pixels.clamp(-1.0, 1.0).to(device=latents.device, dtype=latents.dtype)


class PromptEncoder:
    """``list[str] -> dict[str, Tensor]`` of ``(n, ...)`` rows with a family's text encoders, frozen.

    ``text_pipeline`` is the diffusers pipeline without denoiser and VAE (only tokenizers and text
    encoders); ``encode(text_pipeline, prompts, device)`` calls its ``encode_prompt`` and names the
    outputs as the backbone's keyword arguments. The encoders run on ``device`` (default: where they
    are, the CPU unless moved) under ``torch.no_grad``; outputs are returned on ``output_device``
    (CPU by default, where an embedding cache keeps them).
    """

    def __init__(self, text_pipeline: Any, encode: Callable[[Any, list[str], torch.device], dict[str, Tensor]],
                 device: Union[None, str, torch.device] = None, output_device: Union[str, torch.device] = "cpu") -> None:
        self.text_pipeline = text_pipeline
        self._encode = encode
        for enc in self.text_encoders():
            enc.requires_grad_(False).eval()
            if device is not None:
                enc.to(device)
        self.device = torch.device(device) if device is not None else self._encoder_device()
        self.output_device = torch.device(output_device)

    def text_encoders(self) -> list[nn.Module]:
        """The pipeline's text encoders (``text_encoder``, ``text_encoder_2``, ... that are set)."""
        comps = getattr(self.text_pipeline, "components", {})
        return [m for k, m in sorted(comps.items()) if k.startswith("text_encoder") and isinstance(m, nn.Module)]

    def _encoder_device(self) -> torch.device:
        for enc in self.text_encoders():
            return next(enc.parameters()).device
        return torch.device("cpu")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        if isinstance(prompts, str):
            raise TypeError("a prompt encoder takes a list of prompts, got one string")
        out = self._encode(self.text_pipeline, list(prompts), self.device)
        return {k: v.to(self.output_device) for k, v in out.items()}


@dataclass
class PipelineParts:
    """A diffusers text-to-image pipeline taken apart for reward fine-tuning, in our convention.

    Attributes:
        family: ``"sd3"``, ``"flux"`` or ``"sd15"``.
        backbone: velocity field ``(x (B, C, h, w), t (B,), cond) -> v`` (noise at ``t = 0``).
        prompt_encoder: ``list[str] -> dict`` of ``(n, ...)`` condition tensors for the backbone.
        decoder: decode step latents -> pixels in ``[-1, 1]``.
        latent_channels: ``C``; vae_scale_factor: pixels per latent cell.
        size_multiple: height and width (pixels) must be multiples of this (VAE factor x patch/packing).
        lora_targets: default LoRA target module names (peft suffix matching).
        grid: ``(n_steps, height, width) -> times (n_steps + 1,)``, the family's own sampling grid.
        negative_prompt: the unconditional prompt of classifier-free guidance (``""``, as diffusers).
        source: where the pipeline came from (hub id, folder or class name), for messages.
    """

    family: str
    backbone: nn.Module
    prompt_encoder: Callable[[list[str]], dict[str, Tensor]]
    decoder: nn.Module
    latent_channels: int
    vae_scale_factor: int
    size_multiple: int
    lora_targets: list[str]
    grid: Callable[[int, int, int], Tensor]
    negative_prompt: str = ""
    source: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def check_resolution(self, height: int, width: Optional[int] = None) -> tuple[int, int]:
        """``(height, width)`` after checking both are positive multiples of :attr:`size_multiple`."""
        width = height if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % self.size_multiple:
                raise ValueError(
                    f"{self.family} ({self.source}): {name}={value!r} is not a positive multiple of "
                    f"{self.size_multiple} (VAE factor {self.vae_scale_factor} x "
                    f"{self.size_multiple // self.vae_scale_factor} for the denoiser's patches)"
                )
        return height, width

    def latent_shape(self, height: int, width: Optional[int] = None) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents of a ``height x width`` image."""
        height, width = self.check_resolution(height, width)
        return (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def time_grid(self, n_steps: int, height: int, width: Optional[int] = None) -> Tensor:
        """The family's sampling times ``(n_steps + 1,)``, increasing, float64 (first: the start time)."""
        height, width = self.check_resolution(height, width)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
        return self.grid(n_steps, height, width)

    def initial_state(self, noise: Tensor, times: Tensor) -> Tensor:
        """The state at ``times[0]`` from unit noise ``(B, C, h, w)``: ``s(times[0]) noise`` (module docstring)."""
        return noise * initial_noise_scale(float(times[0]))


def load_diffusers_pipeline(source: Any, dtype: DTypeLike = None) -> tuple[Any, str, str]:
    """``(pipeline, family, description)`` from a pipeline object, a local folder or a hub id.

    A string is resolved with ``model_index.json`` (read from the folder, or fetched from the hub by
    diffusers): its ``_class_name`` picks the family, and that class's ``from_pretrained`` loads it
    (no custom pipeline code is ever run). Unsupported pipeline classes raise a ``ValueError`` naming
    the class and the source.
    """
    import diffusers

    if not isinstance(source, (str, os.PathLike)):
        name = type(source).__name__
        if name not in PIPELINE_FAMILIES:
            raise ValueError(f"unsupported pipeline {name}; supported: {sorted(PIPELINE_FAMILIES)}")
        pipe = source
        if dtype is not None:
            pipe.to(dtype=resolve_dtype(dtype))
        return pipe, PIPELINE_FAMILIES[name], name
    source = os.fspath(source)
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "model_index.json")):
        raise ValueError(f"{source!r} is a folder without model_index.json: not a saved diffusers pipeline")
    config = diffusers.DiffusionPipeline.load_config(source)
    name = config.get("_class_name")
    if name not in PIPELINE_FAMILIES:
        raise ValueError(f"{source!r} is a {name} pipeline; supported families: "
                         + ", ".join(f"{k} ({v})" for k, v in PIPELINE_FAMILIES.items()))
    kwargs = {"dtype": resolve_dtype(dtype)} if dtype is not None else {}
    pipe = getattr(diffusers, name).from_pretrained(source, **kwargs)
    return pipe, PIPELINE_FAMILIES[name], source


def text_only_pipeline(pipe: Any, **extra: Any) -> Any:
    """The same pipeline class holding only tokenizers and text encoders (denoiser, VAE set to ``None``)."""
    comps = dict(pipe.components)
    for key in ("transformer", "unet", "vae"):
        if key in comps:
            comps[key] = None
    return type(pipe)(**comps, **extra)


def prepare_denoiser(model: nn.Module, gradient_checkpointing: bool, device: Union[None, str, torch.device]) -> nn.Module:
    """Put the denoiser in train-ready state: all weights trainable (LoRA freezes them later), checkpointing on request."""
    model.requires_grad_(True)
    if gradient_checkpointing:
        if not hasattr(model, "enable_gradient_checkpointing"):
            raise ValueError(f"{type(model).__name__} has no gradient checkpointing")
        model.enable_gradient_checkpointing()
    return model.to(device) if device is not None else model


def float32(module: nn.Module) -> nn.Module:
    """``module`` in float32 (cast only when needed: diffusers warns on every ``.to(dtype)`` of a VAE)."""
    if any(p.dtype != torch.float32 for p in module.parameters()):
        module.to(torch.float32)
    return module
