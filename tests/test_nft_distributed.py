"""Online DiffusionNFT under ``strategy="ddp_spawn"`` with two CPU processes (gloo).

The design: each DDP rank collects its own rollouts (its own noise, its own
group ids), statistics that need the whole group (reward normalisation, reward metrics) are computed
over all ranks, and gradient averaging keeps the trained policy, and hence the EMA old policy, identical
on every rank. Each rank writes what it saw to ``tmp_path``; the assertions run in the main process.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_nft.advantages import normalize_rewards
from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.callbacks import EMAOldPolicy, RewardMetrics
from lightning_nft.module import RewardFineTuningModule, adamw
from lightning_nft.objectives.nft import NFTObjective
from lightning_nft.rewards import LinearReward

P, K, STEPS, ROUNDS = 3, 16, 4, 2


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu().clone() for p in params])


class RankRecorder(Callback):
    """Per rank: the number of gradient steps, the last round's rollouts and r, the synced reward mean of
    RewardMetrics, and the final current / old / reference parameters, saved to ``<out>/rank<k>.pt``."""

    def __init__(self, out_dir: str, metrics: RewardMetrics) -> None:
        self.out_dir = out_dir
        self.metrics = metrics
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        ro = pl_module.rollouts
        torch.save(
            {
                "steps": self.steps,
                "world_size": trainer.world_size,
                "x1": ro.x1.cpu(), "rewards": ro.rewards.cpu(), "r": ro.r.cpu(), "group": ro.group.cpu(),
                "reward_mean_metric": self.metrics.history[-1]["reward/mean"],
                "current": _flat(pl_module.backbone.parameters()),
                "old": _flat(pl_module.old_backbone.parameters()),
                "reference": _flat(pl_module.reference_backbone.parameters()),
            },
            Path(self.out_dir) / f"rank{trainer.global_rank}.pt",
        )


def test_ddp_spawn_two_cpu_ranks(tmp_path):
    """Two ranks, 2 rounds of 4 steps, P = 3 groups of K = 16 per rank:

    * the loop runs and every rank takes all 4 steps of every round (8 steps; Lightning's distributed
      sampler must not split a round's steps between ranks);
    * ranks draw different rollouts, with disjoint group ids (rank k owns groups 3k .. 3k + 2);
    * the r of each rank equals the default normalisation (group-centred, pooled std) applied to the
      rewards and groups of *both* ranks, and differs from normalising one rank's rewards alone;
      RewardMetrics' reward mean on each rank is the mean over both ranks' rollouts;
    * current, old and reference parameters are bit-identical across ranks after training; training
      moved the current policy; the main process gets rank 0's weights back.
    """
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    pl.seed_everything(0, verbose=False)
    mixture = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], 0.4)
    module = RewardFineTuningModule(
        ResidualVelocity(mixture, MLPVelocity(2, 32, 2, zero_init=True)), LinearReward([1.0, 0.0]), NFTObjective(beta=1.0),
        sample_shape=[2], groups_per_round=P, group_size=K, steps_per_round=STEPS, optimizer=adamw(3e-3), n_sample_steps=10,
    )
    initial = _flat(module.backbone.parameters())
    metrics = RewardMetrics()
    trainer = pl.Trainer(
        strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=ROUNDS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RankRecorder(str(tmp_path), metrics), metrics, EMAOldPolicy(decay=0.5)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)

    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["steps"] == ROUNDS * STEPS
        assert rank["x1"].shape == (P * K, 2)
    r0, r1 = ranks

    assert not torch.allclose(r0["x1"], r1["x1"])
    assert set(r0["group"].tolist()) == set(range(P)) and set(r1["group"].tolist()) == set(range(P, 2 * P))

    rewards = torch.cat([r0["rewards"], r1["rewards"]])
    groups = torch.cat([r0["group"], r1["group"]])
    _, r_all = normalize_rewards(rewards, groups)
    torch.testing.assert_close(torch.cat([r0["r"], r1["r"]]), r_all, rtol=0, atol=1e-6)
    _, r_local = normalize_rewards(r0["rewards"], r0["group"])
    assert (r_local - r0["r"]).abs().max() > 1e-3  # the pooled std really differs from one rank's
    for rank in ranks:
        assert rank["reward_mean_metric"] == pytest.approx(float(rewards.mean()), abs=1e-5)

    for name in ("current", "old", "reference"):
        assert torch.equal(r0[name], r1[name]), name
    assert not torch.allclose(r0["current"], initial)
    assert torch.equal(r0["reference"], initial)
    assert torch.equal(_flat(module.backbone.parameters()), r0["current"])
