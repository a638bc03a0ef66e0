"""The digits main job with and without the KL anchor (the KL-regularised tilting view (Zhu, "A KL-Regularized Reward-Tilting View of DiffusionNFT")), as a table for the README.

Runs ``configs/digits_nft.yaml`` through the CLI once per anchor strength ``kl_weight`` (0 = unanchored;
the KLAnchor callback is removed), each in its own run directory, and prints, at the end of
training: wall time, the fixed-noise evaluation of ``SampleQuality`` (mean probability of the target
digit, diversity = mean pairwise classifier-feature distance, FID against the real target digits)
and the diversity ratio to the real digits of the target class.

    python benchmarks/digits_anchor.py                   # kl_weight in 0, 0.03 (the main job), 0.1
    python benchmarks/digits_anchor.py --kl_weight 0 0.03 --rounds 300
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_nft.yaml")


def run(kl_weight: float, rounds: int, workdir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_nft.cli import main

    cfg = OmegaConf.load(CONFIG)
    callbacks = [c for c in cfg.trainer.callbacks if not c.class_path.endswith("KLAnchor")]
    if kl_weight > 0:
        callbacks.insert(1, OmegaConf.create({"class_path": "lightning_nft.callbacks.KLAnchor",
                                              "init_args": {"weight": kl_weight}}))
    cfg.trainer.callbacks = callbacks
    cfg.trainer.max_epochs = rounds
    cfg.trainer.default_root_dir = os.path.join(workdir, f"eta0_{kl_weight}")
    cfg.trainer.enable_progress_bar = False
    path = os.path.join(workdir, f"digits_nft_eta0_{kl_weight}.yaml")
    OmegaConf.save(OmegaConf.to_container(cfg, resolve=True), path)
    start = time.perf_counter()
    main(["fit", "--config", path])
    wall = time.perf_counter() - start
    events = [os.path.join(d, f) for d, _, fs in os.walk(cfg.trainer.default_root_dir) for f in fs
              if f.startswith("events.out")]
    acc = EventAccumulator(events[0])
    acc.Reload()
    last = {tag: acc.Scalars(f"quality/{tag}")[-1].value for tag in ("reward", "diversity", "fid",
                                                                     "reference_diversity")}
    last.update(kl_weight=kl_weight, wall=wall)
    return last


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kl_weight", type=float, nargs="+", default=[0.0, 0.03, 0.1])
    parser.add_argument("--rounds", type=int, default=150)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [run(e, args.rounds, work) for e in args.kl_weight]
    print(f"\ndigits NFT, target digit 3, {args.rounds} rounds x 256 images (256 fixed-noise samples evaluated)")
    print("| kl_weight (KL anchor) | wall time | reward | diversity | diversity / real | FID |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kl_weight']:g} | {r['wall']:.0f} s | {r['reward']:.3f} | {r['diversity']:.1f} | "
              f"{r['diversity'] / r['reference_diversity']:.2f} | {r['fid']:.1f} |")


if __name__ == "__main__":
    main_cli()
