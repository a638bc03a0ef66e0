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


def test_model_help_lists_the_module_arguments_in_under_200_lines():
    """``fit --help`` names RewardFineTuningModule as the default model; ``--model.help RewardFineTuningModule``
    lists every ``__init__`` argument in under 200 lines (``backbone`` is a protocol: no torch.nn listing)."""
    import inspect

    from lightning_nft.module import RewardFineTuningModule

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lightning_nft", "fit", "--model.help", "RewardFineTuningModule"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) < 200, len(lines)
    for name in inspect.signature(RewardFineTuningModule.__init__).parameters:
        if name != "self":
            assert f"--model.{name} " in proc.stdout or f"--model.{name}\n" in proc.stdout, name
    assert "torch.nn.Linear" not in proc.stdout
    top = subprocess.run([sys.executable, "-m", "lightning_nft", "fit", "--help"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert "lightning_nft.module.RewardFineTuningModule" in top.stdout


def test_optimizer_and_lr_scheduler_from_the_command_line(tmp_path):
    """``--optimizer SGD`` and ``--lr_scheduler StepLR`` replace the config's AdamW: the checkpoint's optimiser
    state is SGD's (momentum, no betas) with the requested rate decayed by the scheduler once per epoch."""
    config = ROOT / "configs" / "gmm_nft.yaml"
    _run(["lightning-nft", "fit", "--config", str(config), "--trainer.max_epochs", "2",
          "--trainer.enable_progress_bar", "false", "--optimizer", "SGD", "--optimizer.lr", "0.05",
          "--optimizer.momentum", "0.5", "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1",
          "--lr_scheduler.gamma", "0.1"], tmp_path)
    ckpt = torch.load(tmp_path / "runs" / "gmm_nft" / "checkpoints" / "last.ckpt", weights_only=False)
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["momentum"] == 0.5 and "betas" not in group
    assert group["initial_lr"] == 0.05 and abs(group["lr"] - 0.05 * 0.1**2) < 1e-12
    assert ckpt["lr_schedulers"][0]["step_size"] == 1
    # without the flags the config's AdamW (lr 3e-3) is used
    (tmp_path / "default").mkdir()
    _run(["lightning-nft", "fit", "--config", str(config), "--trainer.max_epochs", "1",
          "--trainer.enable_progress_bar", "false"], tmp_path / "default")
    ckpt = torch.load(tmp_path / "default" / "runs" / "gmm_nft" / "checkpoints" / "last.ckpt", weights_only=False)
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert "betas" in group and group["lr"] == 3e-3 and not ckpt["lr_schedulers"]
