"""The shipped digit classifier's penultimate features, as an extractor for diversity and FID."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from lightning_nft.models.digit_classifier import load_pretrained_digit_classifier


class DigitFeatures(nn.Module):
    """``images (B, 1, 8, 8)`` in ``[-1, 1]`` -> ``features (B, D)`` of the frozen shipped classifier."""

    def __init__(self, path: Optional[str] = None) -> None:
        super().__init__()
        self.classifier = load_pretrained_digit_classifier(path)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images)
