"""Callbacks with state keep it across a checkpoint: ImageGrid's "before" grid, SampleQuality's and
RewardMetrics' histories (issue 13: after a resume the "before" picture showed the resumed model)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_nft.callbacks import ImageGrid, RewardMetrics, SampleQuality
from lightning_nft.models import DigitFeatures, load_pretrained_digits_flow
from lightning_nft.module import RewardFineTuningModule, adamw
from lightning_nft.objectives import NFTObjective
from lightning_nft.rewards import DigitClassifierReward


def _module():
    return RewardFineTuningModule(load_pretrained_digits_flow(), DigitClassifierReward(target=3), NFTObjective(beta=1.0),
                                  sample_shape=[1, 8, 8], groups_per_round=2, group_size=4, steps_per_round=2,
                                  n_sample_steps=3, optimizer=adamw(3e-3))


def _fit(root, rounds, ckpt_path=None):
    callbacks = [ImageGrid(n_images=4, scale=1, every_n_rounds=100), SampleQuality(DigitFeatures(), n_samples=4, plot_filename=None),
                 RewardMetrics(), pl.callbacks.ModelCheckpoint(dirpath=str(root / "ck"), save_last=True)]
    trainer = pl.Trainer(max_epochs=rounds, default_root_dir=str(root), logger=False, accelerator="cpu", devices=1,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    pl.seed_everything(0, verbose=False)
    trainer.fit(_module(), ckpt_path=ckpt_path)
    return callbacks


def test_before_grid_and_histories_survive_a_resume(tmp_path):
    grid, quality, metrics, _ = _fit(tmp_path, 2)
    assert [row["round"] for row in quality.history] == [-1.0, 0.0, 1.0] and len(metrics.history) == 2
    grid2, quality2, metrics2, _ = _fit(tmp_path, 4, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert torch.equal(grid2.before, grid.before)
    assert not torch.equal(grid2.after, grid.before)  # training changed the samples; "after" is new
    assert quality2.history[:3] == quality.history and [row["round"] for row in quality2.history[3:]] == [2.0, 3.0]
    assert metrics2.history[:2] == metrics.history and len(metrics2.history) == 4
