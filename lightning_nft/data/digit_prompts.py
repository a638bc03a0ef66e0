"""The 8x8 digits paired with prompts that name them: the pretraining data of the text-to-image digits model.

Each image of digit ``d`` is paired, afresh in every batch, with a phrasing of ``d`` drawn uniformly
from the prompt file's records whose ``"digit"`` field is ``d``; with probability ``cfg_dropout`` the
prompt is replaced by ``""`` (prompt dropout, so the model also learns the unconditional field that
classifier-free guidance needs). Batches are ``(images (B, 1, 8, 8), prompts: list[str])``. Draws
come from ``torch.Generator`` s seeded with ``seed``: the same run gives the same batches.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_nft.data.digits import DigitsDataset, load_digit_images
from lightning_nft.data.noise import ModelPredictMixin
from lightning_nft.data.prompts import read_prompts


def _collate(items: list[tuple[Tensor, Tensor]], phrasings: dict[int, list[str]], generator: torch.Generator,
             cfg_dropout: float) -> tuple[Tensor, list[str]]:
    images = torch.stack([img for img, _ in items])
    prompts = []
    for _, label in items:
        options = phrasings[int(label)]
        pick = int(torch.randint(len(options), (1,), generator=generator))
        drop = cfg_dropout > 0 and float(torch.rand((), generator=generator)) < cfg_dropout
        prompts.append("" if drop else options[pick])
    return images, prompts


class DigitPromptsDataModule(ModelPredictMixin, pl.LightningDataModule):
    """scikit-learn's digits with prompts: batches ``(images (B, 1, 8, 8) in [-1, 1], prompts)``.

    Args:
        prompt_file: ``.jsonl`` prompts with a ``"digit"`` field (default: the shipped training phrasings).
        batch_size, val_fraction, seed: as :class:`~lightning_nft.data.DigitsDataModule`.
        cfg_dropout: probability of replacing a training prompt by ``""`` (validation never drops).
    """

    def __init__(self, prompt_file: Optional[str] = None, batch_size: int = 128, val_fraction: float = 0.1,
                 seed: int = 0, cfg_dropout: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout}")
        if prompt_file is None:
            from lightning_nft.models.digits_t2i import digit_prompt_file

            prompt_file = digit_prompt_file("train")
        self.prompt_file = prompt_file
        self.batch_size, self.val_fraction, self.seed = int(batch_size), float(val_fraction), int(seed)
        self.cfg_dropout = float(cfg_dropout)
        self.phrasings: dict[int, list[str]] = {}
        for r in read_prompts(prompt_file, required_fields=("digit",)):
            self.phrasings.setdefault(int(r["digit"]), []).append(r["prompt"])
        self.train_set: Optional[DigitsDataset] = None
        self.val_set: Optional[DigitsDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        args = dict(label=sorted(self.phrasings), val_fraction=self.val_fraction, seed=self.seed)
        self.train_set = DigitsDataset(*load_digit_images(split="train", **args))
        self.val_set = DigitsDataset(*load_digit_images(split="val", **args))

    def train_dataloader(self) -> DataLoader:
        self.setup()
        collate = partial(_collate, phrasings=self.phrasings, cfg_dropout=self.cfg_dropout,
                          generator=torch.Generator().manual_seed(self.seed + 1))
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, collate_fn=collate,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        collate = partial(_collate, phrasings=self.phrasings, cfg_dropout=0.0,
                          generator=torch.Generator().manual_seed(self.seed + 2))
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, collate_fn=collate)
