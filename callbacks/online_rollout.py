"""Collect each round's rollouts at the start of the round (never in a prefetched dataset)."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_nft.conditions import repeat_condition
from lightning_nft.rollouts import RolloutBatch


def round_generator(seed: int, rank: int, round_index: int, substep: int = 0) -> torch.Generator:
    """A CPU generator seeded by ``(seed, rank, round, substep)``: ranks differ, resumed runs repeat."""
    mixed = (seed * 1_000_003 + rank * 10_007 + round_index * 101 + substep) % (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(mixed)


class OnlineRollout(Callback):
    """Per round: ``K`` samples for each of ``P`` conditions from the sampling policy, scored and normalised.

    On every rank, at the start of each round (Lightning epoch), this callback

    1. draws ``P`` conditions and ``N = P K`` noises from a generator seeded by
       ``(seed, global_rank, round)`` (``seed_everything`` alone would give every rank the same
       stream), and samples them with ``pl_module.rollout`` (old policy for DiffusionNFT/GRPO, any
       solver; trajectories / log-probs when the objective asks);
    2. scores them with ``pl_module.compute_rewards``;
    3. gathers rewards and group ids from all ranks, normalises them with ``pl_module.normalizer``
       (group means per condition; a global std sees every rank) and keeps this rank's slice;
    4. hands the :class:`RolloutBatch` to ``pl_module.set_rollouts`` for the round's gradient steps.

    Multi-step DiffusionNFT (``objective.substeps = M > 1``, seed 000) splits a round into ``M``
    sub-rounds; each later sub-round first refreshes the old policy to the current one (a hard
    copy) and draws fresh rollouts.

    Args:
        groups_per_round, group_size: ``P`` and ``K`` (default: the module's hyper-parameters).
        seed: rollout seed (default: the module's ``rollout_seed``).
    """

    def __init__(self, groups_per_round: Optional[int] = None, group_size: Optional[int] = None,
                 seed: Optional[int] = None) -> None:
        self.groups_per_round = groups_per_round
        self.group_size = group_size
        self.seed = seed

    def _setting(self, pl_module: pl.LightningModule, name: str) -> int:
        mine = getattr(self, name)
        return int(mine if mine is not None else pl_module.hparams[name if name != "seed" else "rollout_seed"])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.collect(trainer, pl_module, substep=0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        substeps = int(getattr(pl_module.objective, "substeps", 1))
        if substeps <= 1 or batch_idx == 0:
            return
        per_sub = max(1, pl_module.hparams.steps_per_round // substeps)
        if batch_idx % per_sub == 0 and batch_idx // per_sub < substeps:
            pl_module.update_old_policy(0.0)  # hard refresh: old <- current
            self.collect(trainer, pl_module, substep=batch_idx // per_sub)

    @torch.no_grad()
    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, substep: int = 0) -> RolloutBatch:
        P = self._setting(pl_module, "groups_per_round")
        K = self._setting(pl_module, "group_size")
        rank, world = trainer.global_rank, trainer.world_size
        g = round_generator(self._setting(pl_module, "seed"), rank, trainer.current_epoch, substep)
        cond_groups = pl_module.sample_conditions(P, g)
        cond = repeat_condition(cond_groups, K)
        x0 = torch.randn((P * K, *pl_module.sample_shape), generator=g).to(pl_module.device)
        out = pl_module.rollout(x0, cond, g)
        rewards = pl_module.compute_rewards(out.samples, cond)
        group = (rank * P + torch.arange(P, device=rewards.device)).repeat_interleave(K)
        if world > 1:
            all_rewards = pl_module.all_gather(rewards).reshape(-1)
            all_group = pl_module.all_gather(group).reshape(-1)
        else:
            all_rewards, all_group = rewards, group
        adv, r = pl_module.normalizer(all_rewards, all_group)
        mine = slice(rank * P * K, (rank + 1) * P * K) if world > 1 else slice(None)
        batch = RolloutBatch(
            x1=out.samples, rewards=rewards, advantages=adv[mine].to(rewards), r=r[mine].to(rewards), group=group,
            cond=cond, x0=x0, trajectory=out.trajectory, times=out.times, log_probs=out.log_probs,
        )
        pl_module.set_rollouts(batch, generator=g)
        return batch
