"""CLIP-based rewards through transformers' ``CLIPModel``: CLIP score and PickScore.

Both embed the image and its prompt with a CLIP model and score their cosine similarity. For images
``x (B, 3, H, W)`` in ``[-1, 1]`` with prompts ``p_i``::

    e_img = normalise(image_features(preprocess(x)))        (B, D)
    e_txt = normalise(text_features(tokenize(p)))            (B, D)
    CLIP score:  r_i = scale * max(<e_img_i, e_txt_i>, min_cosine)     (scale 100, min_cosine 0: the
                 CLIPScore of Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image
                 Captioning", arXiv:2104.08718, with w = scale / 100 = 1, as torchmetrics' CLIPScore)
    PickScore:   r_i = exp(logit_scale) * <e_img_i, e_txt_i>
                 (Kirstain et al., "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
                 Generation", arXiv:2305.01569; model ``yuvalkirstain/PickScore_v1`` with the processor
                 of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)

``preprocess`` is :class:`~lightning_nft.rewards.preprocess.ImagePreprocess` built from the model's
own ``CLIPImageProcessor`` (torch only, so ``grad_x r`` exists: both rewards are differentiable).
Models load with ``from_pretrained`` from a local folder or a hub id named in the config; nothing
else is downloaded and remote code is never trusted.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from lightning_nft.rewards.preprocess import ImagePreprocess
from lightning_nft.rewards.scorer_base import FrozenScorer, as_features, at_least_float32, normalized, unique_rows


class CLIPSimilarityReward(FrozenScorer):
    """Cosine similarity of image and prompt embeddings of a transformers CLIP model, ``(B, 3, H, W) -> (B,)``.

    Args:
        model: local folder or hub id of a ``CLIPModel`` (``from_pretrained``).
        processor: folder or hub id of its ``CLIPProcessor`` (default: ``model``).
        scale: factor on the cosine; ``None`` uses the model's ``exp(logit_scale)``.
        min_cosine: lower clip of the cosine before scaling (``None``: no clip).
        prompt, prompt_key: see :class:`~lightning_nft.rewards.scorer_base.FrozenScorer`.
        max_length: token length (default: the tokenizer's ``model_max_length`` capped by the model's
            position embeddings).
    """

    def __init__(self, model: str, processor: Optional[str] = None, scale: Optional[float] = 100.0,
                 min_cosine: Optional[float] = None, prompt: Optional[str] = None, prompt_key: str = "prompt",
                 max_length: Optional[int] = None) -> None:
        super().__init__(prompt=prompt, prompt_key=prompt_key)
        from transformers import CLIPModel, CLIPProcessor

        self.model_name = str(model)
        self.model = CLIPModel.from_pretrained(self.model_name)
        proc = CLIPProcessor.from_pretrained(str(processor) if processor is not None else self.model_name)
        self.tokenizer = proc.tokenizer
        self.preprocess = ImagePreprocess.from_clip_processor(proc)
        limit = int(self.model.config.text_config.max_position_embeddings)
        self.max_length = int(max_length) if max_length is not None else min(limit, int(self.tokenizer.model_max_length))
        self.scale = None if scale is None else float(scale)
        self.min_cosine = None if min_cosine is None else float(min_cosine)
        self.freeze()

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Unit image embeddings ``(B, D)`` of images ``(B, C, H, W)`` in ``[-1, 1]``."""
        pixels = self.preprocess(images.to(self.scorer_dtype))
        return normalized(as_features(self.model.get_image_features(pixel_values=pixels)))

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """Unit text embeddings ``(P, D)`` of ``P`` prompts."""
        device = self.model.logit_scale.device
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                           attention_mask=tokens["attention_mask"].to(device))
        return normalized(as_features(out))

    def cosine(self, images: Tensor, cond: Any = None) -> Tensor:
        """``<e_img_i, e_txt_i>`` ``(B,)``; text features are computed once per distinct prompt."""
        distinct, index = unique_rows(self.prompts(cond, images.shape[0]))
        e_txt = self.text_embeddings(distinct)[index.to(images.device)]
        e_img = self.image_embeddings(images)
        return (e_img * e_txt).sum(-1)

    def forward(self, samples: Tensor, cond: Any = None) -> Tensor:
        cos = at_least_float32(self.cosine(samples, cond))
        if self.min_cosine is not None:
            cos = cos.clamp_min(self.min_cosine)
        scale = self.model.logit_scale.exp().to(cos.dtype) if self.scale is None else self.scale
        return scale * cos


class CLIPScore(CLIPSimilarityReward):
    """CLIPScore ``100 * max(cos(e_img, e_txt), 0)`` (torchmetrics' convention), ``(B, 3, H, W) -> (B,)``.

    Typical model: ``openai/clip-vit-large-patch14``. ``min_cosine=None`` keeps the gradient for
    negative cosines (the clip at 0 is flat there).
    """

    def __init__(self, model: str, processor: Optional[str] = None, scale: float = 100.0,
                 min_cosine: Optional[float] = 0.0, prompt: Optional[str] = None, prompt_key: str = "prompt",
                 max_length: Optional[int] = None) -> None:
        super().__init__(model, processor, scale, min_cosine, prompt, prompt_key, max_length)


class PickScore(CLIPSimilarityReward):
    """PickScore ``exp(logit_scale) * cos(e_img, e_txt)`` (about 20-23 for good images), ``(B, 3, H, W) -> (B,)``.

    Typical config: ``model: yuvalkirstain/PickScore_v1``, ``processor:
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
    """

    def __init__(self, model: str, processor: Optional[str] = None, prompt: Optional[str] = None,
                 prompt_key: str = "prompt", max_length: Optional[int] = None) -> None:
        super().__init__(model, processor, None, None, prompt, prompt_key, max_length)
