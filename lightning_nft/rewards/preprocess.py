"""Differentiable image preprocessing that reproduces a scorer's own processor.

Learned scorers (CLIP, PickScore, HPS, the LAION aesthetic head) were trained on images prepared by
a fixed pipeline: resize the shortest edge to ``size`` (bicubic), centre-crop ``crop``, scale to
``[0, 1]`` and normalise with per-channel ``mean``/``std``. Rewards receive decoded images
``x (B, C, H, W)`` in ``[-1, 1]``; :class:`ImagePreprocess` applies the same pipeline with torch
operations only (no PIL), so ``grad_x r`` exists for Adjoint Matching::

    u = (x + 1) / 2                                   (B, C, H, W) in [0, 1]; C = 1 is repeated to 3
    u' = clamp(resize_v(clamp(resize_h(u), 0, 1)), 0, 1)   short side -> size, width pass first
    u'' = centre_crop(u', crop)                        (B, 3, crop_h, crop_w)
    out = (u'' - mean) / std

The resize uses torch's antialiased bicubic kernel (Keys a = -0.5, the kernel of PIL and of
torchvision's ``antialias=True``) in two separable passes, horizontal first, each clipped to
``[0, 1]``: PIL resamples uint8 images that way, and the intermediate clipping of the bicubic
overshoot changes pixels by up to ~16/255 on high-contrast images when left out. The output
size follows the references' rule ``long = int(size * long / short)``. The crop offset rule differs
between references: transformers' processors take ``floor((H - h) / 2)``, torchvision's
``CenterCrop`` (open_clip) ``round((H - h) / 2)``; ``crop_offset`` names which. Agreement with the
references is tested in ``tests/test_reward_preprocess.py`` (within the uint8 rounding they do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PIL_RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize (shortest edge), centre-crop and normalise images in ``[-1, 1]``: ``(B, C, H, W) -> (B, 3, h, w)``.

    Args:
        size: target length of the shortest edge after resizing.
        crop: ``(h, w)`` of the centre crop.
        mean, std: per-channel normalisation constants (after scaling to ``[0, 1]``).
        interpolation: ``"bicubic"`` or ``"bilinear"`` (antialiased, as PIL).
        crop_offset: ``"floor"`` (transformers) or ``"round"`` (torchvision / open_clip).
    """

    size: int = 224
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"
    crop_offset: str = "floor"

    def __post_init__(self) -> None:
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")
        if self.crop_offset not in ("floor", "round"):
            raise ValueError(f"crop_offset must be 'floor' or 'round', got {self.crop_offset!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 channels, got mean={self.mean}, std={self.std}")

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_clip_processor(cls, processor: Any) -> "ImagePreprocess":
        """The pipeline of a transformers ``CLIPImageProcessor`` (or a ``CLIPProcessor`` holding one)."""
        proc = getattr(processor, "image_processor", processor)
        size = proc.size
        short = size.get("shortest_edge") if hasattr(size, "get") else getattr(size, "shortest_edge", None)
        if short is None:
            raise ValueError(f"{type(proc).__name__}.size must give 'shortest_edge', got {size}")
        crop = proc.crop_size
        crop_hw = (int(crop["height"]), int(crop["width"])) if proc.do_center_crop else None
        resample = int(getattr(proc.resample, "value", proc.resample))
        if resample not in _PIL_RESAMPLE_NAMES:
            raise ValueError(f"{type(proc).__name__}.resample={proc.resample} is not bicubic (3) or bilinear (2)")
        if not (proc.do_resize and proc.do_rescale and proc.do_normalize) or crop_hw is None:
            raise ValueError(f"{type(proc).__name__} must resize, centre-crop, rescale and normalise")
        if abs(float(proc.rescale_factor) - 1 / 255) > 1e-9:
            raise ValueError(f"{type(proc).__name__}.rescale_factor={proc.rescale_factor}, expected 1/255")
        return cls(int(short), crop_hw, tuple(map(float, proc.image_mean)), tuple(map(float, proc.image_std)),
                   _PIL_RESAMPLE_NAMES[resample], "floor")

    @classmethod
    def from_open_clip(cls, model: Any) -> "ImagePreprocess":
        """The evaluation pipeline of an open_clip model (its ``visual.preprocess_cfg``, resize mode 'shortest')."""
        cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if cfg.get("resize_mode", "shortest") != "shortest":
            raise ValueError(f"open_clip resize_mode {cfg['resize_mode']!r} is not supported (only 'shortest')")
        if hw[0] != hw[1]:
            raise ValueError(f"open_clip image size {hw} is not square")
        return cls(hw[0], hw, tuple(cfg.get("mean", OPENAI_CLIP_MEAN)), tuple(cfg.get("std", OPENAI_CLIP_STD)),
                   cfg.get("interpolation", "bicubic"), "round")

    # ----------------------------------------------------------------- the pipeline
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after the shortest-edge resize: ``long = int(size * long / short)`` (the references' rule)."""
        if height <= width:
            return self.size, int(self.size * width / height)
        return int(self.size * height / width), self.size

    def crop_box(self, height: int, width: int) -> tuple[int, int]:
        """Top-left corner ``(top, left)`` of the centre crop of an ``height x width`` image."""
        ch, cw = self.crop
        if ch > height or cw > width:
            raise ValueError(f"crop {self.crop} is larger than the resized image {(height, width)}")
        if self.crop_offset == "floor":
            return (height - ch) // 2, (width - cw) // 2
        return int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))

    def __call__(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1|3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        u = (images + 1.0) / 2.0
        if u.shape[1] == 1:
            u = u.expand(-1, 3, -1, -1)
        h, w = self.resized_size(u.shape[-2], u.shape[-1])
        dtype = u.dtype
        if dtype in (torch.float16, torch.bfloat16):
            u = u.float()  # resample in at least single precision
        if w != u.shape[-1]:  # horizontal pass first, clipped, as PIL's two-pass resampler
            u = F.interpolate(u, size=(u.shape[-2], w), mode=self.interpolation, align_corners=False, antialias=True)
            u = u.clamp(0.0, 1.0)
        if h != u.shape[-2]:
            u = F.interpolate(u, size=(h, w), mode=self.interpolation, align_corners=False, antialias=True)
        u = u.clamp(0.0, 1.0).to(dtype)
        top, left = self.crop_box(h, w)
        u = u[..., top: top + self.crop[0], left: left + self.crop[1]]
        mean = torch.tensor(self.mean, device=u.device, dtype=u.dtype)[:, None, None]
        std = torch.tensor(self.std, device=u.device, dtype=u.dtype)[:, None, None]
        return (u - mean) / std


def to_uint8_images(images: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` ``(B, C, H, W)`` -> uint8 ``(B, H, W, C)`` on the CPU (what a PIL processor sees)."""
    u = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return u.permute(0, 2, 3, 1).cpu()
