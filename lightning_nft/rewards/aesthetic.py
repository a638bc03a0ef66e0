"""The LAION aesthetic predictor: a small MLP on CLIP ViT-L/14 image embeddings.

For images ``x (B, 3, H, W)`` in ``[-1, 1]``::

    e = normalise(image_features(preprocess(x)))        (B, 768) for ViT-L/14
    r = MLP(e)                                           (B,)   roughly 1..10 ("how much people like it")

The MLP ("improved aesthetic predictor", C. Schuhmann / LAION, used as the aesthetic reward of DDPO,
Black et al., "Training Diffusion Models with Reinforcement Learning", arXiv:2305.13301, and of
DiffusionNFT, arXiv:2509.16117) is ``Linear(D, 1024) - Dropout - Linear(1024, 128) - Dropout -
Linear(128, 64) - Dropout - Linear(64, 16) - Linear(16, 1)`` with no activations; its released file
(``sac+logos+ava1-l14-linearMSE.pth``) is a state dict with keys ``layers.{0,2,4,6,7}.{weight,bias}``,
which :class:`AestheticHead` reproduces so it loads unchanged. The CLIP model is transformers'
``CLIPModel`` (``openai/clip-vit-large-patch14`` for the released head). Differentiable.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import Tensor, nn

from lightning_nft.rewards.preprocess import ImagePreprocess
from lightning_nft.rewards.scorer_base import (
    FrozenScorer,
    as_features,
    at_least_float32,
    load_state_dict_file,
    normalized,
    resolve_weights_file,
)


class AestheticHead(nn.Module):
    """The aesthetic MLP ``(B, D) -> (B,)`` with the released layer layout (``layers.0 ... layers.7``)."""

    def __init__(self, input_dim: int = 768, hidden: Sequence[int] = (1024, 128, 64, 16)) -> None:
        super().__init__()
        h1, h2, h3, h4 = (int(h) for h in hidden)
        self.layers = nn.Sequential(
            nn.Linear(int(input_dim), h1), nn.Dropout(0.2), nn.Linear(h1, h2), nn.Dropout(0.2),
            nn.Linear(h2, h3), nn.Dropout(0.1), nn.Linear(h3, h4), nn.Linear(h4, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)[:, 0]


class LaionAesthetic(FrozenScorer):
    """LAION aesthetic score of images in ``[-1, 1]``: ``(B, 3, H, W) -> (B,)``; needs no prompt.

    Args:
        clip_model: folder or hub id of a transformers ``CLIPModel`` (``openai/clip-vit-large-patch14``).
        head: the MLP's weights file (``.pth`` state dict or ``.safetensors``); a file of ``head_repo``
            when that is given.
        head_repo: hub id holding ``head`` (downloaded only when named here).
        processor: folder or hub id of the ``CLIPProcessor`` (default: ``clip_model``).
        hidden: the MLP's hidden sizes (the release: 1024, 128, 64, 16).
    """

    def __init__(self, clip_model: str, head: str, head_repo: Optional[str] = None,
                 processor: Optional[str] = None, hidden: Sequence[int] = (1024, 128, 64, 16)) -> None:
        super().__init__(prompt="")
        from transformers import CLIPModel, CLIPProcessor

        self.clip = CLIPModel.from_pretrained(str(clip_model))
        proc = CLIPProcessor.from_pretrained(str(processor) if processor is not None else str(clip_model))
        self.preprocess = ImagePreprocess.from_clip_processor(proc)
        self.head = AestheticHead(int(self.clip.config.projection_dim), hidden)
        state = load_state_dict_file(resolve_weights_file(str(head), head_repo))
        try:
            self.head.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"aesthetic head file {head!r} does not fit AestheticHead"
                             f"({self.clip.config.projection_dim}, {tuple(hidden)}): {err}") from err
        self.freeze()

    def embeddings(self, images: Tensor) -> Tensor:
        """Unit CLIP image embeddings ``(B, D)``."""
        pixels = self.preprocess(images.to(self.scorer_dtype))
        return normalized(as_features(self.clip.get_image_features(pixel_values=pixels)))

    def forward(self, samples: Tensor, cond: Any = None) -> Tensor:
        return at_least_float32(self.head(self.embeddings(samples)))
