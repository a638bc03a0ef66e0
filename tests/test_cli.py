"""The ``lightning-nft`` console script and ``python -m lightning_nft``, end to end on the mixture."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from lightning_nft.analytic import GaussianMixture, component_weights, total_variation

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gmm_pretrain.yaml"


def _run(cmd, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_fit_then_predict_reproduces_the_mixture(tmp_path):
    """fit (console script) then predict (python -m) from the checkpoint: weights within TV 0.03.

    With 10k predicted samples the binomial std of each weight is <= 0.005; the remaining budget
    covers four epochs of training and 50 Euler steps.
    """
    _run(["lightning-nft", "fit", "--config", str(CONFIG), "--trainer.max_epochs", "4",
          "--trainer.enable_progress_bar", "false"], tmp_path)
    ckpt = tmp_path / "runs" / "gmm_pretrain" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    _run([sys.executable, "-m", "lightning_nft", "predict", "--config", str(CONFIG), "--ckpt_path", str(ckpt),
          "--trainer.enable_progress_bar", "false"], tmp_path)
    out = torch.load(tmp_path / "runs" / "gmm_pretrain" / "samples.pt")
    samples = out["samples"]
    assert samples.shape == (10000, 2)
    mixture = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], 0.4)
    w = component_weights(mixture, samples)
    assert total_variation(w, mixture.weights) < 0.03, w
    # the omegaconf interpolation ${trainer.default_root_dir} placed the logs next to the checkpoints
    assert any((tmp_path / "runs" / "gmm_pretrain" / "tb").rglob("events.out.tfevents*"))


def test_cli_help_lists_subcommands():
    proc = subprocess.run([sys.executable, "-m", "lightning_nft", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for sub in ("fit", "validate", "predict"):
        assert sub in proc.stdout
