"""Anchor the trained policy to the frozen initial model (the KL anchor of reward-tilted DiffusionNFT)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_nft.paths import interpolate
from lightning_nft.policy import check_contract


class KLAnchor(Callback):
    """Add ``kl_weight * E || v_theta(x_t, t) - v_ref(x_t, t) ||^2`` to the objective and log the drift.

    Online DiffusionNFT refreshes the old policy every round, so without an anchor the tilt of the
    sampled distribution grows with the number of rounds (reward hacking); a KL term toward the
    *initial* reference ``p^(0)`` with strength ``kl_weight`` makes the iterates converge to a tilt set by
    ``kl_weight`` alone (Y. Zhu, "A KL-Regularized Reward-Tilting View of DiffusionNFT"). In velocity space
    the KL between two flows from the same noise is controlled by their squared velocity difference, the
    form used here and by the public DiffusionNFT release.

    The callback sets the module's ``kl_weight`` (read by the module when it calls the objective's loss).
    The weight is part of the callback's checkpointed state: resuming restores the checkpoint's weight
    (with a warning when the constructor's differs) and hands it to the module at fit start, after the
    restore, so the loss and the callback agree. The reference itself is the module's (taken from the
    weights the network has when ``fit`` starts). At the end of every round the drift
    ``E || v_theta - v_ref ||^2`` is measured on ``x_t`` built from that round's rollouts
    (``t ~ U[0, 1]``) and logged as ``kl_anchor/drift``.
    """

    contract_members = ("kl_weight", "rollouts", "velocity", "reference_velocity")

    def __init__(self, weight: float = 0.1, drift_samples: int = 256) -> None:
        if weight < 0:
            raise ValueError(f"KL anchor weight must be non-negative, got {weight}")
        self.weight = float(weight)
        self.drift_samples = int(drift_samples)
        self.last_drift = float("nan")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_contract(pl_module, self)
        pl_module.kl_weight = self.weight

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.kl_weight = self.weight  # after a checkpoint restore, the restored weight

    @torch.no_grad()
    def drift(self, pl_module: pl.LightningModule, seed: int = 0) -> float:
        """``E || v_theta - v_ref ||^2`` (mean over dims) on ``x_t`` from the current rollouts (noise from ``seed``)."""
        batch = pl_module.rollouts
        if batch is None:
            return float("nan")
        n = min(self.drift_samples, len(batch))
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        idx = torch.randperm(len(batch), generator=g)[:n]
        sub = batch.index(idx)
        x1 = sub.x1
        x0 = torch.randn(x1.shape, generator=g).to(x1)
        t = torch.rand(n, generator=g).to(x1)
        xt = interpolate(x0, x1, t)
        diff = pl_module.velocity(xt, t, sub.cond) - pl_module.reference_velocity(xt, t, sub.cond)
        return float(diff.pow(2).reshape(n, -1).mean(1).mean())

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_drift = self.drift(pl_module, seed=trainer.current_epoch)
        pl_module.log("kl_anchor/drift", self.last_drift, sync_dist=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restored = float(state_dict["weight"])
        if restored != self.weight:
            rank_zero_warn(
                f"KLAnchor: resuming with the checkpoint's weight {restored} (this callback was built with {self.weight})"
            )
        self.weight = restored
