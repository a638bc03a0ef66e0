"""Samples of an exact Gaussian mixture as a ``LightningDataModule`` (pretraining data for toys)."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_nft.analytic import GaussianMixture
from lightning_nft.data.noise import ModelPredictMixin


class GaussianMixtureDataModule(ModelPredictMixin, pl.LightningDataModule):
    """``n_train`` fixed samples of ``mixture`` (seeded), served in shuffled batches of ``(B, d)``."""

    def __init__(self, mixture: GaussianMixture, n_train: int = 20000, n_val: int = 2000,
                 batch_size: int = 512, seed: int = 0) -> None:
        super().__init__()
        self.mixture, self.n_train, self.n_val = mixture, n_train, n_val
        self.batch_size, self.seed = batch_size, seed
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            g = torch.Generator().manual_seed(self.seed)
            with torch.no_grad():
                self.train_set = TensorDataset(self.mixture.sample(self.n_train, generator=g))
                self.val_set = TensorDataset(self.mixture.sample(self.n_val, generator=g))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
