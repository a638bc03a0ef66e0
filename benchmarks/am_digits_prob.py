"""Adjoint Matching on the shipped digits flow (``configs/digits_adjoint.yaml``): P(3) before/after issue 14.

Fits the config once per variant of the objective's settings, then samples 512 images with the Euler ODE
(20 steps) from fixed noise and prints the classifier's mean probability of digit 3, the fraction classified
as 3 and the training wall time. Variants (``VARIANTS``):

* ``round``: the config as shipped (the objective's defaults since issue 14: regression points computed once
  per round from importance-split paths, one round replayed);
* ``minibatch``: the recipe before issue 14 (lean adjoint per minibatch, no splitting, no replay);
* ``bootstrap``: ``minibatch`` with the bootstrapped lean adjoint (horizon 0.05, ``adjoint_matching.lean_adjoint``).

One thread::

    python benchmarks/am_digits_prob.py                      # variants round and minibatch
    python benchmarks/am_digits_prob.py --variants bootstrap --rounds 100
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import torch
import yaml

from lightning_nft.cli import NFTLightningCLI
from lightning_nft.rewards import DigitClassifierReward
from lightning_nft.samplers import EulerSolver, time_grid

ROOT = pathlib.Path(__file__).resolve().parents[1]


BEFORE = {"targets": "minibatch", "split_at": None, "replay_rounds": 0}
VARIANTS = {"round": {}, "minibatch": BEFORE, "bootstrap": {**BEFORE, "bootstrap_horizon": 0.05}}


def fit(variant: str, rounds: int, root: str):
    config = yaml.safe_load((ROOT / "configs" / "digits_adjoint.yaml").read_text())
    config["model"]["init_args"]["objective"]["init_args"].update(VARIANTS[variant])
    path = pathlib.Path(root) / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(path), "--trainer.max_epochs", str(rounds),
            "--trainer.default_root_dir", str(pathlib.Path(root) / "run"), "--trainer.enable_progress_bar", "false"]
    cli = NFTLightningCLI(model_class=None, datamodule_class=None, parser_kwargs={"parser_mode": "omegaconf"},
                          save_config_kwargs={"overwrite": True}, args=args, auto_configure_optimizers=False)
    return cli.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="round,minibatch", help=f"comma-separated, of {sorted(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prob = DigitClassifierReward(target=3, mode="prob")
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as root:
            t0 = time.time()
            module = fit(variant, args.rounds, root)
            wall = time.time() - t0
        module.eval()
        x0 = torch.randn(512, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            x = EulerSolver().sample(module.velocity, x0, time_grid(20)).samples
            p = prob(x)
        print(f"{variant:>9}: P(3) {float(p.mean()):.3f}, P(3) > 0.5 for {float((p > 0.5).float().mean()):.3f}, "
              f"fit {wall:.0f} s (incl. callbacks)", flush=True)


if __name__ == "__main__":
    main()
