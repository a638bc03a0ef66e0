"""Run folders through the CLI: overrides move every output, a used folder is refused, predict never
overwrites a fine-tuned run's samples without a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_nft.cli import main
from lightning_nft.run_folder import RunFolderError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "gmm_nft.yaml")


def short(rounds: int = 1) -> list[str]:
    return ["--trainer.max_epochs", str(rounds), "--trainer.enable_progress_bar", "false", "--model.init_args.group_size",
            "8", "--model.init_args.steps_per_round", "2", "--model.init_args.predict_samples", "16"]


def test_root_dir_override_moves_every_output_and_a_used_folder_is_refused(in_tmp):
    main(["fit", "--config", CONFIG, "--trainer.default_root_dir", "runs/other", "--seed_everything", "3", *short()])
    other = in_tmp / "runs" / "other"
    assert not (in_tmp / "runs" / "gmm_nft").exists()  # nothing went to the config file's folder
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["last.ckpt", "round-0000.ckpt"]
    assert any((other / "tb").rglob("events.out.tfevents*"))
    saved = yaml.safe_load(next((other / "tb").rglob("config.yaml")).read_text())
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c.get("init_args", {}) for c in saved["trainer"]["callbacks"]}
    assert callbacks["SampleWriter"]["output_path"] == "runs/other/samples.pt"
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] == "runs/other"
    assert saved["model"]["init_args"]["rollout_seed"] == 3  # ${seed_everything} follows the override too

    with pytest.raises(RunFolderError, match=r"runs/other is not empty.*--ckpt_path runs/other/checkpoints/last\.ckpt"):
        main(["fit", "--config", CONFIG, "--trainer.default_root_dir", "runs/other", *short()])
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["last.ckpt", "round-0000.ckpt"]

    # resuming continues in the folder; --overwrite starts afresh
    main(["fit", "--config", CONFIG, "--trainer.default_root_dir", "runs/other", *short(2),
          "--ckpt_path", str(other / "checkpoints" / "last.ckpt")])
    assert torch.load(other / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    with pytest.warns(UserWarning, match="deleting the previous run"):
        main(["fit", "--config", CONFIG, "--trainer.default_root_dir", "runs/other", "--overwrite", "true", *short()])
    assert torch.load(other / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["last.ckpt", "round-0000.ckpt"]


def test_predict_without_checkpoint_warns_and_keeps_the_trained_samples(in_tmp):
    root = ["--trainer.default_root_dir", "runs/p"]
    main(["fit", "--config", CONFIG, *root, *short()])
    ckpt = in_tmp / "runs" / "p" / "checkpoints" / "last.ckpt"
    main(["predict", "--config", CONFIG, *root, *short(), "--ckpt_path", str(ckpt)])
    trained = in_tmp / "runs" / "p" / "samples.pt"
    before = trained.read_bytes()
    with pytest.warns(UserWarning, match="UNTRAINED"):
        main(["predict", "--config", CONFIG, *root, *short()])
    assert trained.read_bytes() == before
    untrained = torch.load(in_tmp / "runs" / "p" / "samples.untrained.pt")
    assert untrained["samples"].shape == (16, 2)
    assert not torch.equal(untrained["samples"], torch.load(trained)["samples"])
