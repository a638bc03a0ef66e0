"""``ConvVelocity``: a small conv U-Net velocity field for 1x8x8 images, and the shipped digits base.

``forward(x (B, C, H, W), t (B,) | float, cond=None) -> v (B, C, H, W)`` with our convention
``x_t = (1 - t) x0 + t x1`` (``x0`` noise at ``t = 0``, data at ``t = 1``); trained by flow matching,
``L = E || v(x_t, t) - (x1 - x0) ||^2`` (``lightning_nft.pretrain.FlowMatchingModule``).

Architecture (defaults = the shipped base: ``channels=(16, 32, 32)`` at resolutions 8x8, 4x4, 2x2,
``emb_dim=64``, one block per level; 169,745 parameters, 0.69 MB in float32)::

    t -> Fourier features [sin(2 pi f_k t), cos(2 pi f_k t)] (f_k log-spaced in [1, max_freq])
      -> MLP -> emb (B, E)                       (+ a learned class embedding when num_classes > 0)
    x -> conv3x3 -> [ResBlock(emb) x n, down] per level -> ResBlock mid
      -> [up, concat skip, ResBlock(emb) x n] per level -> GroupNorm - SiLU - conv3x3 (zero-init) -> v

A ResBlock is ``h = conv(SiLU(GN(x))); h = h * (1 + scale(emb)) + shift(emb); out = skip(x) + conv(SiLU(GN(h)))``.
The output conv is zero-initialised, so an untrained field is ``v = 0``.

Why a hand-written conv net rather than diffusers' ``UNet2DModel``: at 8x8 the whole image fits in
the receptive field after two down-samplings, so a few residual blocks suffice; the module has no
attention or per-block Python overhead: on one CPU thread, 20 Euler steps for 256 images take about
0.3 s and a training step (forward + backward, batch 256) about 55 ms, which is what the
fine-tuning loop (many sampler steps per round, on 2 cores) pays for again and again.

The shipped weights (``lightning_nft/assets/digits_flow.safetensors``) are regenerated with::

    OMP_NUM_THREADS=1 lightning-nft fit --config configs/digits_pretrain.yaml

(``FlowMatchingModule``, 2080 AdamW steps, batch 128, ~90 s; exported by ``ExportSafetensors``).

Class conditioning (optional): with ``num_classes = K > 0``, ``cond`` is a ``(B,)`` int64 tensor of
labels in ``[0, K]`` where ``K`` is the "null" label (also used for ``cond=None``), which allows
classifier-free guidance. The shipped digits base is unconditional (``num_classes = 0``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nft.models.export import config_from_metadata, load_module_safetensors, read_safetensors

FLOW_ASSET = "digits_flow.safetensors"


def _groups(c: int, max_groups: int = 8) -> int:
    g = min(max_groups, c)
    while c % g:
        g -= 1
    return g


class FourierTimeEmbedding(nn.Module):
    """``t (B,) -> (B, 2 * n_freqs)``: ``[sin(2 pi f_k t), cos(2 pi f_k t)]``, ``f_k`` log-spaced in ``[1, max_freq]``."""

    def __init__(self, n_freqs: int = 16, max_freq: float = 64.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.logspace(0.0, math.log10(max_freq), n_freqs), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        angle = 2.0 * math.pi * t[:, None] * self.freqs.to(t.dtype)
        return torch.cat([angle.sin(), angle.cos()], dim=-1)


class ResBlock(nn.Module):
    """Residual block with FiLM conditioning on ``emb (B, E)``: ``(B, c_in, H, W) -> (B, c_out, H, W)``."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = h * (1.0 + scale) + shift
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ConvVelocity(nn.Module):
    """Small conv U-Net velocity field ``v(x, t, cond)`` for ``(B, in_channels, H, W)`` images.

    Args:
        in_channels: image channels (1 for the digits).
        channels: width per resolution level; level ``i`` runs at ``H / 2**i`` (H must be divisible
            by ``2**(len(channels) - 1)``).
        num_res_blocks: residual blocks per level on each side of the U.
        emb_dim: width of the time (and class) embedding.
        n_freqs, max_freq: Fourier time features.
        num_classes: 0 for an unconditional field; ``K > 0`` adds a class embedding (``K + 1`` rows,
            the last is the null label).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 32),
        num_res_blocks: int = 1,
        emb_dim: int = 64,
        n_freqs: int = 16,
        max_freq: float = 64.0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.channels = [int(c) for c in channels]
        self.num_res_blocks = int(num_res_blocks)
        self.emb_dim = int(emb_dim)
        self.n_freqs = int(n_freqs)
        self.max_freq = float(max_freq)
        self.num_classes = int(num_classes)

        self.time_features = FourierTimeEmbedding(self.n_freqs, self.max_freq)
        self.time_mlp = nn.Sequential(
            nn.Linear(2 * self.n_freqs, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim)
        )
        self.class_embedding = nn.Embedding(self.num_classes + 1, self.emb_dim) if self.num_classes > 0 else None

        chs = self.channels
        self.conv_in = nn.Conv2d(self.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_channels: List[int] = []
        c = chs[0]
        for level, width in enumerate(chs):
            blocks = nn.ModuleList()
            for _ in range(self.num_res_blocks):
                blocks.append(ResBlock(c, width, self.emb_dim))
                c = width
            self.down_blocks.append(blocks)
            skip_channels.append(c)
            if level < len(chs) - 1:
                self.downsamples.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(c, c, self.emb_dim)
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(chs))):
            blocks = nn.ModuleList()
            for i in range(self.num_res_blocks):
                c_in = c + (skip_channels[level] if i == 0 else 0)
                blocks.append(ResBlock(c_in, chs[level], self.emb_dim))
                c = chs[level]
            self.up_blocks.append(blocks)
        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.conv_out = nn.Conv2d(c, self.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def config(self) -> Dict[str, Any]:
        """Constructor arguments (stored in the safetensors metadata)."""
        return {
            "in_channels": self.in_channels,
            "channels": list(self.channels),
            "num_res_blocks": self.num_res_blocks,
            "emb_dim": self.emb_dim,
            "n_freqs": self.n_freqs,
            "max_freq": self.max_freq,
            "num_classes": self.num_classes,
        }

    def embed(self, t: Union[float, Tensor], batch: int, cond: Optional[Tensor], like: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
        t = t.expand(batch) if t.dim() == 0 else t.reshape(batch)
        emb = self.time_mlp(self.time_features(t))
        if self.class_embedding is not None:
            if cond is None:
                labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=like.device)
            else:
                labels = torch.as_tensor(cond, device=like.device).reshape(batch).long()
            emb = emb + self.class_embedding(labels)
        return F.silu(emb)

    def forward(self, x: Tensor, t: Union[float, Tensor], cond: Optional[Any] = None) -> Tensor:
        """Velocity ``(B, C, H, W)`` at images ``x (B, C, H, W)`` and times ``t`` (float, 0-d or ``(B,)``)."""
        emb = self.embed(t, x.shape[0], cond, x)
        h = self.conv_in(x)
        skips: List[Tensor] = []
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
        h = self.mid(h, emb)
        for i, blocks in enumerate(self.up_blocks):
            level = len(self.channels) - 1 - i
            if h.shape[-1] != skips[level].shape[-1]:
                h = F.interpolate(h, size=skips[level].shape[-2:], mode="nearest")
            for j, block in enumerate(blocks):
                h = block(torch.cat([h, skips[level]], dim=1) if j == 0 else h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def load_pretrained_digits_flow(
    path: Optional[str] = None, device: Optional[torch.device] = None, freeze: bool = False
) -> ConvVelocity:
    """The shipped unconditional digits base (package data, no download), in eval mode.

    Parameters stay trainable unless ``freeze=True`` (fine-tuning starts from it). ``path`` loads
    another file written by :func:`lightning_nft.models.export.save_module_safetensors`.
    """
    return load_module_safetensors(ConvVelocity, path=path, asset=FLOW_ASSET, device=device, freeze=freeze)


class PretrainedDigitsFlow(ConvVelocity):
    """The shipped digits base (:func:`load_pretrained_digits_flow`) as a class, in eval mode.

    A class rather than a function so that a config can name it where a velocity network is expected
    (``model.init_args.backbone.class_path: lightning_nft.models.PretrainedDigitsFlow``). The weights are
    the package asset, or the file ``path`` written by :func:`~lightning_nft.models.export.save_module_safetensors`.
    """

    def __init__(self, path: Optional[str] = None, freeze: bool = False) -> None:
        tensors, metadata = read_safetensors(path=path, asset=None if path else FLOW_ASSET)
        super().__init__(**config_from_metadata(metadata))
        self.load_state_dict(tensors)
        self.eval()
        if freeze:
            self.requires_grad_(False)
