"""Fixed-noise evaluation samples for metric and image callbacks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

SAMPLING_MEMBERS = ("sample_shape", "sample_conditions", "sample")


@torch.no_grad()
def fixed_noise_samples(pl_module: pl.LightningModule, n: int, seed: int, policy: str = "current") -> tuple[Tensor, Any]:
    """Sample ``n`` outputs of ``policy`` from noise seeded by ``seed`` (the same noise every call).

    Conditions come from ``pl_module.sample_conditions`` with the same seed, one per sample
    (:data:`SAMPLING_MEMBERS` of the :class:`~lightning_nft.policy.OnlineFineTuning` contract).
    Returns ``(samples (n, *S), cond)``.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    x0 = torch.randn((n, *pl_module.sample_shape), generator=g).to(pl_module.device)
    cond = pl_module.sample_conditions(n, g)
    was_training = pl_module.training
    pl_module.eval()
    try:
        samples = pl_module.sample(x0, cond, policy=policy).samples
    finally:
        pl_module.train(was_training)
    return samples, cond


def run_directory(trainer: pl.Trainer) -> str:
    """Where a run's pictures go: the trainer's ``default_root_dir``."""
    return trainer.default_root_dir
