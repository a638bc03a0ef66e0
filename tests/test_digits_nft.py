"""The CPU default: short versions of the digits fine-tuning runs, through the CLI.

Each run happens in a temporary working directory (the configs write under ``runs/``) with one
torch thread (the configs' ``torch_threads: 1``).
"""

import glob
from pathlib import Path

import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_nft.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _scalars(run_dir: Path, tag: str) -> list[float]:
    (events,) = glob.glob(str(run_dir / "tb" / "version_0" / "events.out.tfevents*"))
    acc = EventAccumulator(events, size_guidance={"images": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)], acc


def test_digits_nft_raises_the_target_probability_and_writes_pictures_and_metrics(in_tmp):
    """12 rounds of the main job: the fixed-noise reward (P(digit 3)) rises from ~0.1 by at least 0.3.

    (Measured on this config: 0.12 before, 0.55-0.65 after 12 rounds; 0.98 after the full 150.)
    """
    main(["fit", "--config", str(ROOT / "configs" / "digits_nft.yaml"), "--trainer.max_epochs", "12",
          "--trainer.enable_progress_bar", "false"])
    run = in_tmp / "runs" / "digits_nft"
    rewards, acc = _scalars(run, "quality/reward")
    diversity, _ = _scalars(run, "quality/diversity")
    fid, _ = _scalars(run, "quality/fid")
    assert len(rewards) >= 2 and len(diversity) == len(rewards) == len(fid)
    assert rewards[-1] > 0.3 + 0.12, rewards
    assert all(torch.isfinite(torch.tensor(fid)))
    # per-round reward statistics and image grids in TensorBoard
    assert len(acc.Scalars("reward/mean")) == 12
    assert {"samples/before", "samples/round", "samples/after"} <= set(acc.Tags()["images"])
    # the two PNGs, as real images of the expected sizes
    grid = Image.open(run / "before_after.png")
    assert grid.width > 2 * grid.height * 0.9
    plot = Image.open(run / "reward_vs_diversity.png")
    assert plot.size[0] >= 300 and plot.size[1] >= 200
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_digits_nft_with_a_black_box_jpeg_reward_runs(in_tmp):
    main(["fit", "--config", str(ROOT / "configs" / "digits_nft_jpeg.yaml"), "--trainer.max_epochs", "2",
          "--trainer.enable_progress_bar", "false"])
    run = in_tmp / "runs" / "digits_nft_jpeg"
    rewards, _ = _scalars(run, "reward/mean")
    assert len(rewards) == 2 and all(r < 0 for r in rewards)  # negative kilobytes
    assert (run / "before_after.png").exists()


def test_digits_nft_kl_config_runs(in_tmp):
    main(["fit", "--config", str(ROOT / "configs" / "digits_nft.yaml"), "--config",
          str(ROOT / "configs" / "digits_nft_kl.yaml"), "--trainer.max_epochs", "2",
          "--trainer.enable_progress_bar", "false"])
    run = in_tmp / "runs" / "digits_nft_kl"
    drift, _ = _scalars(run, "kl_anchor/drift")
    assert len(drift) == 2 and all(d >= 0 for d in drift)
    # the override's callbacks replaced the base's: one anchor, with the override's weight
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    anchors = [v for k, v in ckpt["callbacks"].items() if k.startswith("KLAnchor")]
    assert anchors == [{"weight": 0.06}]
    assert sum(k.startswith("EMAOldPolicy") for k in ckpt["callbacks"]) == 1
