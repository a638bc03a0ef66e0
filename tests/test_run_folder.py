"""Run folders (``lightning_nft.run_folder``) and round checkpoints (``RoundCheckpoint``)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.callbacks.round_checkpoint import RoundCheckpoint, auto_every_n_rounds
from lightning_nft.checkpoint_io import AtomicCheckpointIO
from lightning_nft.module import RewardFineTuningModule, adamw
from lightning_nft.objectives.nft import NFTObjective
from lightning_nft.rewards import LinearReward
from lightning_nft.run_folder import RunFolderError, predict_output_path, prepare_run_folder


def test_a_non_empty_run_folder_is_refused_unless_resuming_or_overwriting(tmp_path):
    root = tmp_path / "run"
    prepare_run_folder(root, resuming=False, overwrite=False)  # missing: fine
    root.mkdir()
    prepare_run_folder(root, resuming=False, overwrite=False)  # empty: fine
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (root / "before_after.png").write_bytes(b"png")
    with pytest.raises(RunFolderError, match=r"run folder .*run is not empty \(before_after.png, checkpoints\).*"
                       r"--ckpt_path .*checkpoints/last\.ckpt.*--trainer\.default_root_dir.*--overwrite true"):
        prepare_run_folder(root, resuming=False, overwrite=False)
    prepare_run_folder(root, resuming=True, overwrite=False)  # resuming continues in the folder
    assert (root / "checkpoints" / "last.ckpt").exists()
    with pytest.warns(UserWarning, match="deleting the previous run"):
        prepare_run_folder(root, resuming=False, overwrite=True)
    assert root.is_dir() and list(root.iterdir()) == []


def test_predict_without_a_checkpoint_warns_and_never_takes_the_trained_name(tmp_path):
    path = tmp_path / "samples.pt"
    assert predict_output_path(path, "run/checkpoints/last.ckpt") == str(path)
    with pytest.warns(UserWarning, match="UNTRAINED"):
        assert predict_output_path(path, None) == str(tmp_path / "samples.untrained.pt")


def test_auto_checkpoint_interval_by_model_size():
    assert auto_every_n_rounds(10_000) == 1 and auto_every_n_rounds(99_999_999) == 1
    assert auto_every_n_rounds(100_000_000) == 10 and auto_every_n_rounds(2_000_000_000) == 10
    with pytest.raises(ValueError, match="keep_last"):
        RoundCheckpoint(keep_last=0)
    with pytest.raises(ValueError, match="every_n_rounds"):
        RoundCheckpoint(every_n_rounds=0)


def _module():
    mixture = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], 0.5)
    return RewardFineTuningModule(ResidualVelocity(mixture, MLPVelocity(2, 8, 1, zero_init=True)), LinearReward([1.0, 0.0]),
                                  NFTObjective(beta=1.0), sample_shape=[2], groups_per_round=1, group_size=4,
                                  steps_per_round=1, n_sample_steps=2, optimizer=adamw(1e-3))


@pytest.mark.parametrize("rounds, every, keep, expected", [(5, 2, 2, [3, 4]), (6, 3, 1, [5]), (3, "auto", -1, [0, 1, 2])])
def test_round_checkpoints_every_n_rounds_keep_the_last_k(tmp_path, rounds, every, keep, expected):
    root = tmp_path / "run"
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=rounds, default_root_dir=str(root), accelerator="cpu", devices=1,
                         logger=TensorBoardLogger(str(root), name="tb"),  # a logger must not move the checkpoints
                         callbacks=[RoundCheckpoint(keep_last=keep, every_n_rounds=every)], plugins=[AtomicCheckpointIO()],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_module())
    folder = root / "checkpoints"
    names = sorted(os.listdir(folder))
    assert names == sorted([f"round-{r:04d}.ckpt" for r in expected] + ["last.ckpt"]), names
    assert os.path.islink(folder / "last.ckpt")
    assert os.readlink(folder / "last.ckpt") == f"round-{expected[-1]:04d}.ckpt"
    last = AtomicCheckpointIO().load_checkpoint(folder / "last.ckpt")
    assert last["epoch"] == rounds - 1
    for r in expected:
        assert torch.load(folder / f"round-{r:04d}.ckpt", weights_only=False)["epoch"] == r
