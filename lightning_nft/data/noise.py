"""Seeded Gaussian noise ``x0 ~ N(0, I)`` as a dataset: the inputs of ``predict`` (sampling)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset


class NoiseDataset(Dataset):
    """``n`` noise tensors of shape ``sample_shape``, item ``i`` always the same for a given ``seed``."""

    def __init__(self, n: int, sample_shape: Sequence[int], seed: int = 0) -> None:
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        self.n, self.sample_shape, self.seed = int(n), tuple(int(s) for s in sample_shape), int(seed)
        g = torch.Generator().manual_seed(self.seed)
        self.noise = torch.randn((self.n, *self.sample_shape), generator=g)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x0": self.noise[i], "index": torch.tensor(i)}


class ModelPredictMixin:
    """For data modules: ``predict`` samples the model's own seeded noise (its ``predict_dataloader``).

    Lightning asks an attached data module for the predict loader first; generators sample from
    noise, not from the training data, so the data module hands the question to the model.
    """

    def predict_dataloader(self):
        return self.trainer.lightning_module.predict_dataloader()
