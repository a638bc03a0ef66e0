"""The sklearn digits as tensors and as a LightningDataModule."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_nft.data import DigitsDataModule, load_digit_images, split_indices


@pytest.fixture(scope="module")
def sk():
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target


def test_images_are_sklearn_digits_scaled_to_minus_one_one(sk):
    images, labels = load_digit_images()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    # independent scaling: [0, 16] -> [-1, 1]
    expected = torch.from_numpy(sk[0] * (2.0 / 16.0) - 1.0)
    torch.testing.assert_close(images[:, 0], expected, rtol=0, atol=1e-6)
    assert torch.equal(labels, torch.from_numpy(sk[1]).long())
    assert images.min() == -1.0 and images.max() == 1.0


def test_one_class_and_splits(sk):
    threes, lab = load_digit_images(label=3)
    assert (lab == 3).all() and len(lab) == int((sk[1] == 3).sum())
    some, lab = load_digit_images(label=[1, 7], split="val")
    assert set(lab.tolist()) == {1, 7}
    with pytest.raises(ValueError):
        load_digit_images(split="test")


def test_split_is_stratified_deterministic_and_disjoint(sk):
    labels = torch.from_numpy(sk[1]).long()
    tr, va = split_indices(labels, 0.1, seed=0)
    tr2, va2 = split_indices(labels, 0.1, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0
    assert sorted(tr.tolist() + va.tolist()) == list(range(1797))
    for c in range(10):
        n_c = int((labels == c).sum())
        assert int((labels[va] == c).sum()) == round(0.1 * n_c)
    _, va3 = split_indices(labels, 0.1, seed=1)
    assert not torch.equal(va, va3)
    # load_digit_images(split=...) is the same split
    x_val, y_val = load_digit_images(split="val", val_fraction=0.1, seed=0)
    assert torch.equal(y_val, labels[va])


def test_datamodule_batches():
    dm = DigitsDataModule(batch_size=32, val_fraction=0.2, seed=0)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert x.min() >= -1 and x.max() <= 1
    # deterministic shuffling from the seed, independent of the global RNG
    torch.manual_seed(123)
    x_again, y_again = next(iter(DigitsDataModule(batch_size=32, val_fraction=0.2, seed=0).train_dataloader()))
    assert torch.equal(x, x_again) and torch.equal(y, y_again)
    # validation batches are unshuffled and the validation set is the stated split
    xv, yv = next(iter(dm.val_dataloader()))
    ref_x, ref_y = load_digit_images(split="val", val_fraction=0.2, seed=0)
    assert torch.equal(xv, ref_x[:32]) and torch.equal(yv, ref_y[:32])


def test_datamodule_without_labels_and_digit_filter():
    dm = DigitsDataModule(batch_size=16, with_labels=False, digits=[0, 1])
    x = next(iter(dm.train_dataloader()))
    assert isinstance(x, torch.Tensor) and x.shape == (16, 1, 8, 8)
    _, labels = load_digit_images(label=[0, 1])
    assert len(dm.train_set) + len(dm.val_set) == len(labels)
    assert set(dm.train_set.labels.tolist()) == {0, 1}
