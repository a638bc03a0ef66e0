"""The text-to-image main config, shortened, through the CLI: alignment rises on trained and held-out phrasings."""

import glob
import os
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_nft.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "digits_t2i_nft.yaml")
ROUNDS = 16


def _scalars(version_dir: str) -> dict[str, list[float]]:
    (events,) = glob.glob(os.path.join(version_dir, "events.out.tfevents*"))
    acc = EventAccumulator(events, size_guidance={"images": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_short_t2i_run_raises_alignment_on_trained_and_heldout_prompts(in_tmp):
    quiet = ["--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", CONFIG, "--trainer.max_epochs", str(ROUNDS), "--trainer.check_val_every_n_epoch",
          str(ROUNDS), *quiet])
    run = in_tmp / "runs" / "digits_t2i_nft"
    main(["validate", "--config", CONFIG, *quiet])  # the base model
    main(["validate", "--config", CONFIG, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), *quiet])
    fit, acc = _scalars(str(run / "tb" / "version_0"))
    base, _ = _scalars(str(run / "tb" / "version_1"))
    tuned, _ = _scalars(str(run / "tb" / "version_2"))
    for split in ("train", "heldout"):
        key = f"val/{split}/reward_mean"
        print(split, base[key], tuned[key], fit[key])
        assert tuned[key][-1] == pytest.approx(fit[key][-1], abs=1e-5)  # validate reproduces fit's evaluation
        assert tuned[key][-1] > base[key][-1] + 0.02, (split, base[key], tuned[key])
        assert len([k for k in tuned if k.startswith(f"val/{split}/prompt_")]) == {"train": 50, "heldout": 30}[split]
        grid = Image.open(run / f"{split}_before_after.png")  # sanity check (base) left, after fit right
        assert grid.width > 2 * 4 * 8 * 4 and grid.height >= {"train": 50, "heldout": 30}[split] * 8 * 4
    assert len(fit["reward/mean"]) == ROUNDS and len(fit["reward/tied_groups"]) == ROUNDS
    assert any(tag.startswith("val/heldout/") for tag in acc.Tags()["images"])  # a grid per prompt
