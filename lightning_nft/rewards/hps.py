"""Human Preference Score v2 / v2.1 through ``open_clip`` (optional extra ``hps``).

HPS v2 (Wu et al., "Human Preference Score v2: A Solid Benchmark for Evaluating Human Preferences of
Text-to-Image Synthesis", arXiv:2306.09341) is an OpenCLIP ViT-H-14 fine-tuned on human choices. For
images ``x (B, 3, H, W)`` in ``[-1, 1]`` and prompts ``p``::

    r_i = < normalise(encode_image(preprocess(x_i))), normalise(encode_text(tokenize(p_i))) >   (about 0.2-0.35)

(the released scorer takes the diagonal of ``image_features @ text_features.T`` without a logit scale).
``preprocess`` reproduces open_clip's evaluation transform (shortest-edge bicubic resize, torchvision
centre crop, OpenAI CLIP normalisation) with torch operations, so the reward is differentiable.

Loading: ``model`` is an open_clip architecture name (``"ViT-H-14"``: built with random weights, then
``checkpoint`` is required, e.g. ``HPS_v2.1_compressed.pt``, a ``{"state_dict": ...}`` file, from the
hub repo ``xswu/HPSv2`` when ``checkpoint_repo`` names it), or ``"local-dir:/path"`` (a folder with
``open_clip_config.json`` and weights), or ``"hf-hub:org/repo"``. Nothing is downloaded unless the
config names a hub location.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from lightning_nft.rewards.preprocess import ImagePreprocess
from lightning_nft.rewards.scorer_base import (
    FrozenScorer,
    at_least_float32,
    load_state_dict_file,
    normalized,
    resolve_weights_file,
    unique_rows,
)


def import_open_clip() -> Any:
    """``open_clip``, or an ``ImportError`` saying how to install it."""
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            "HPSv2 needs the open_clip package: pip install 'lightning-nft[hps]' (or open_clip_torch)"
        ) from err
    return open_clip


class HPSv2(FrozenScorer):
    """HPS v2 / v2.1 score ``cos(e_img, e_txt)`` of images in ``[-1, 1]``: ``(B, 3, H, W) -> (B,)``.

    Args:
        model: open_clip architecture name, ``local-dir:<folder>`` or ``hf-hub:<repo>``.
        checkpoint: HPS weights file loaded over the model (required for a bare architecture name).
        checkpoint_repo: hub id holding ``checkpoint`` (``xswu/HPSv2``; downloaded only when named).
        prompt, prompt_key: see :class:`~lightning_nft.rewards.scorer_base.FrozenScorer`.
    """

    def __init__(self, model: str = "ViT-H-14", checkpoint: Optional[str] = None,
                 checkpoint_repo: Optional[str] = None, prompt: Optional[str] = None,
                 prompt_key: str = "prompt") -> None:
        super().__init__(prompt=prompt, prompt_key=prompt_key)
        open_clip = import_open_clip()
        model = str(model)
        if checkpoint is None and not model.startswith(("local-dir:", "hf-hub:")):
            raise ValueError(f"HPSv2(model={model!r}) needs checkpoint=... (e.g. HPS_v2.1_compressed.pt): "
                             "a bare architecture name has random weights")
        self.model = open_clip.create_model(model, pretrained=None)
        if checkpoint is not None:
            state = load_state_dict_file(resolve_weights_file(str(checkpoint), checkpoint_repo))
            try:
                self.model.load_state_dict(state)
            except RuntimeError as err:
                raise ValueError(f"HPS checkpoint {checkpoint!r} does not fit open_clip model {model!r}: {err}") from err
        self.tokenizer = open_clip.get_tokenizer(model)
        self.preprocess = ImagePreprocess.from_open_clip(self.model)
        self.freeze()

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Unit image embeddings ``(B, D)``."""
        return normalized(self.model.encode_image(self.preprocess(images.to(self.scorer_dtype))))

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """Unit text embeddings ``(P, D)``."""
        tokens = self.tokenizer(prompts).to(self.model.logit_scale.device)
        return normalized(self.model.encode_text(tokens))

    def forward(self, samples: Tensor, cond: Any = None) -> Tensor:
        distinct, index = unique_rows(self.prompts(cond, samples.shape[0]))
        e_txt = self.text_embeddings(distinct)[index.to(samples.device)]
        return at_least_float32((self.image_embeddings(samples) * e_txt).sum(-1))
