"""The 8x8 handwritten digits bundled with scikit-learn, as tensors and as a ``LightningDataModule``.

``sklearn.datasets.load_digits`` ships 1797 grey-scale images of the digits 0-9 (about 180 per
class) with integer intensities in ``[0, 16]``; nothing is downloaded. We scale them affinely to
the data range of our flows::

    x = v / 8 - 1        (v in [0, 16]  ->  x in [-1, 1])

and keep them as ``(N, 1, 8, 8)`` float32 tensors with ``(N,)`` int64 labels.

The train/validation split is stratified and deterministic: for every class ``c`` its indices are
permuted with a ``torch.Generator`` seeded with ``seed`` and the first ``round(val_fraction * n_c)``
go to validation. The same ``(val_fraction, seed)`` always gives the same split, on every machine
and every DDP rank, so "held-out digits" (:func:`load_digit_images` with ``split="val"``) are the ones
the shipped classifier never saw in training.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_nft.data.noise import ModelPredictMixin

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


@lru_cache(maxsize=1)
def _raw_digits() -> Tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).reshape(-1, *IMAGE_SHAPE)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images / 8.0 - 1.0, labels


def split_indices(labels: Tensor, val_fraction: float = 0.1, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Stratified deterministic split of ``range(len(labels))`` into ``(train_idx, val_idx)`` (sorted).

    Per class ``c`` with ``n_c`` members, ``round(val_fraction * n_c)`` indices go to validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().reshape(-1)
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_val = int(round(val_fraction * idx.numel()))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def load_digit_images(
    label: Optional[Union[int, Sequence[int]]] = None,
    split: str = "all",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Tuple[Tensor, Tensor]:
    """The real digits, optionally of one class (or several) and one split.

    Args:
        label: keep only this digit (or these digits); ``None`` keeps all ten classes.
        split: ``"all"``, ``"train"`` or ``"val"`` (the split of :func:`split_indices`).
        val_fraction, seed: define the split, as in :class:`DigitsDataModule`.

    Returns:
        ``images (N, 1, 8, 8)`` float32 in ``[-1, 1]`` and ``labels (N,)`` int64 (fresh copies).
    """
    images, labels = _raw_digits()
    if split == "all":
        keep = torch.arange(labels.numel())
    elif split in ("train", "val"):
        train_idx, val_idx = split_indices(labels, val_fraction, seed)
        keep = train_idx if split == "train" else val_idx
    else:
        raise ValueError(f"split must be 'all', 'train' or 'val', got {split!r}")
    if label is not None:
        wanted = torch.as_tensor([label] if isinstance(label, int) else list(label), dtype=torch.int64)
        keep = keep[torch.isin(labels[keep], wanted)]
    return images[keep].clone(), labels[keep].clone()


class DigitsDataset(Dataset):
    """Indexable view: item ``i`` is ``(image (1, 8, 8), label ())`` or just the image."""

    def __init__(self, images: Tensor, labels: Tensor, with_labels: bool = True) -> None:
        self.images = images
        self.labels = labels
        self.with_labels = with_labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        if self.with_labels:
            return self.images[i], self.labels[i]
        return self.images[i]


class DigitsDataModule(ModelPredictMixin, pl.LightningDataModule):
    """scikit-learn's 8x8 digits in ``[-1, 1]``, shape ``(B, 1, 8, 8)``.

    Batches are ``(images (B, 1, 8, 8), labels (B,))`` with ``with_labels=True`` (classifier training,
    class-conditional flows) and plain ``images (B, 1, 8, 8)`` tensors otherwise (unconditional flow
    matching). ``digits`` restricts the data to some classes. The validation split is
    :func:`split_indices` ``(labels, val_fraction, seed)``; the training loader is shuffled by a
    generator seeded with ``seed`` (Lightning's ``seed_everything`` is not needed for determinism).
    ``predict`` is handed to the model (it samples its own seeded noise; ``ModelPredictMixin``).
    """

    def __init__(
        self,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        with_labels: bool = True,
        digits: Optional[Sequence[int]] = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.with_labels = bool(with_labels)
        self.digits = None if digits is None else [int(d) for d in digits]
        self.drop_last = bool(drop_last)
        self.train_set: Optional[DigitsDataset] = None
        self.val_set: Optional[DigitsDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        args = dict(label=self.digits, val_fraction=self.val_fraction, seed=self.seed)
        self.train_set = DigitsDataset(*load_digit_images(split="train", **args), with_labels=self.with_labels)
        self.val_set = DigitsDataset(*load_digit_images(split="val", **args), with_labels=self.with_labels)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            generator=gen,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
