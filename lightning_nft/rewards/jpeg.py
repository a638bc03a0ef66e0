"""``JpegCompressibility``: DDPO's black-box compressibility reward, through PIL.

For each image ``x`` in ``[-1, 1]`` (shape ``(C, H, W)`` with ``C`` in {1, 3}, or ``(H, W)``),
quantise ``u = round(255 (x + 1) / 2)`` clipped to ``[0, 255]``, optionally enlarge by an integer
factor (nearest neighbour), encode as JPEG at ``quality`` and return::

    r(x) = - (size of the JPEG file in bytes) / 1000          (negative kilobytes; higher = smaller file)

Not differentiable (``differentiable = False``): the returned tensor is detached and objectives
that need ``grad r`` refuse it via :func:`~lightning_nft.rewards.base.require_differentiable`.
"""

from __future__ import annotations

import io
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_nft.rewards.base import Reward


def jpeg_size_bytes(image: np.ndarray, quality: int = 95) -> int:
    """Bytes of the JPEG encoding of a uint8 array ``(H, W)`` or ``(H, W, 3)``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    return buf.tell()


class JpegCompressibility(Reward):
    """Negative JPEG size in kilobytes of images in ``[-1, 1]``: ``(B, C, H, W) -> (B,)``.

    Args:
        quality: JPEG quality (1-95; DDPO uses 95).
        upscale: integer nearest-neighbour enlargement before encoding (tiny images are dominated
            by the fixed JPEG header; enlarging makes the size track the content more closely).
    """

    differentiable = False

    def __init__(self, quality: int = 95, upscale: int = 1) -> None:
        super().__init__()
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        if int(upscale) < 1:
            raise ValueError(f"upscale must be a positive integer, got {upscale}")
        self.quality = int(quality)
        self.upscale = int(upscale)

    @torch.no_grad()
    def forward(self, samples: Tensor, cond: Optional[Any] = None) -> Tensor:
        x = samples.detach().float()
        if x.dim() == 3:
            x = x[:, None]
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1|3, H, W) or (B, H, W), got shape {tuple(samples.shape)}")
        u = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
        if self.upscale > 1:
            u = u.repeat_interleave(self.upscale, dim=2).repeat_interleave(self.upscale, dim=3)
        arrays = u[:, 0].numpy() if u.shape[1] == 1 else u.permute(0, 2, 3, 1).numpy()
        sizes = [jpeg_size_bytes(np.ascontiguousarray(a), self.quality) for a in arrays]
        return torch.tensor(sizes, dtype=torch.float32, device=samples.device) / -1000.0
