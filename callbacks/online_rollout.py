"""Collect each round's rollouts at the start of the round (never in a prefetched dataset)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_nft.policy import check_contract


class OnlineRollout(Callback):
    """Triggers rollout collection (``pl_module.collect_rollouts``) when a round (a Lightning epoch) starts.

    What a collection is (conditions, noise from ``(seed, rank, round)``, sampling, rewards normalised
    over every rank) is the module's :meth:`~lightning_nft.policy.OnlineFineTuningMixin.collect_rollouts`;
    this callback only decides *when*. With ``pl_module.rollouts_per_round = M > 1`` (multi-step
    DiffusionNFT) a round of ``steps_per_round`` gradient steps is split into ``M`` sub-rounds of
    ``steps_per_round // M`` steps: each later sub-round first refreshes the old policy to the current one
    (a hard copy, ``update_old_policy(0)``) and collects fresh rollouts.
    """

    contract_members = ("collect_rollouts", "rollouts_per_round", "steps_per_round", "update_old_policy")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_contract(pl_module, self)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.collect_rollouts(trainer.current_epoch, substep=0)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        per_round = int(pl_module.rollouts_per_round)
        if per_round <= 1 or batch_idx == 0:
            return
        per_sub = max(1, int(pl_module.steps_per_round) // per_round)
        if batch_idx % per_sub == 0 and batch_idx // per_sub < per_round:
            pl_module.update_old_policy(0.0)  # hard refresh: old <- current
            pl_module.collect_rollouts(trainer.current_epoch, substep=batch_idx // per_sub)
