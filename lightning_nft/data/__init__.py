"""Data modules, datasets and real-data helpers."""

from lightning_nft.data.digits import DigitsDataModule, DigitsDataset, load_digit_images, split_indices
from lightning_nft.data.digit_prompts import DigitPromptsDataModule
from lightning_nft.data.gmm import GaussianMixtureDataModule
from lightning_nft.data.noise import NoiseDataset
from lightning_nft.data.prompts import PromptConditions, PromptEmbeddingCache, read_prompts, sample_prompt_indices
from lightning_nft.data.references import DigitsReference, ReferenceSet

__all__ = [
    "GaussianMixtureDataModule",
    "NoiseDataset",
    "DigitsDataModule",
    "DigitsDataset",
    "DigitPromptsDataModule",
    "PromptConditions",
    "PromptEmbeddingCache",
    "read_prompts",
    "sample_prompt_indices",
    "DigitsReference",
    "ReferenceSet",
    "load_digit_images",
    "split_indices",
]
