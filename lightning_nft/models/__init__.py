"""Small models shipped with lightning_nft: the digits classifier and the digits velocity field."""

from lightning_nft.models.conv_velocity import ConvVelocity, PretrainedDigitsFlow, load_pretrained_digits_flow
from lightning_nft.models.digit_classifier import (
    DigitClassifier,
    DigitClassifierModule,
    load_pretrained_digit_classifier,
)
from lightning_nft.models.digit_features import DigitFeatures
from lightning_nft.models.export import ExportSafetensors, read_safetensors, save_module_safetensors

__all__ = [
    "ConvVelocity",
    "PretrainedDigitsFlow",
    "load_pretrained_digits_flow",
    "DigitClassifier",
    "DigitClassifierModule",
    "load_pretrained_digit_classifier",
    "DigitFeatures",
    "ExportSafetensors",
    "read_safetensors",
    "save_module_safetensors",
]
