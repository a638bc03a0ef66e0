"""Every objective through the module with real conditions, and each row's condition stays with its sample.

A class-conditional mixture: class ``c`` is the Gaussian ``N(m_c, s^2 I)`` (exact field,
``lightning_nft.analytic``) plus a trainable class-conditional MLP residual. The reward depends on the
class, read from the conditions' *metadata*: ``r(x, c) = a_c . x`` with a different direction per class.
If rows of samples and conditions were mis-paired anywhere (repeat per group, minibatch indexing, the
objective's own repeats), rollouts would be scored against the wrong direction and the per-class
shifts below would not all point along their own ``a_c``. A probe also checks, in every round's
rollout buffer and minibatch, that each sample sits at its own class's mean.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.conditions import Conditions, condition_to
from lightning_nft.rewards import Reward

MEANS = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
DIRECTIONS = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])  # class 0 -> right, 1 -> left, 2 -> up
STD = 0.4


class ClassMixtureField(nn.Module):
    """Exact velocity of class ``cond`` (a ``(B,)`` label tensor): ``N(m_c, STD^2 I)`` per class."""

    def __init__(self) -> None:
        super().__init__()
        self.components = nn.ModuleList(GaussianMixture([1.0], [m.tolist()], STD) for m in MEANS)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        per_class = torch.stack([comp(x, t) for comp in self.components])  # (C, B, 2)
        return per_class[cond.long(), torch.arange(x.shape[0])]


class ClassDirectionReward(Reward):
    """``r(x, c) = a_c . x`` with ``c`` read from the metadata field ``"class"`` (differentiable)."""

    differentiable = True

    def forward(self, samples: Tensor, cond=None) -> Tensor:
        labels = torch.tensor(cond.values("class", source="ClassDirectionReward"), device=samples.device)
        return (samples * DIRECTIONS.to(samples)[labels]).sum(-1)


def class_conditions(n_groups: int, generator: torch.Generator) -> Conditions:
    labels = torch.randint(0, 3, (n_groups,), generator=generator)
    return Conditions(labels, [{"class": int(c), "prompt": f"class {int(c)}"} for c in labels])


class PairingProbe(Callback):
    """Rollout buffer and minibatches: stored rewards are the rewards of each row's own sample and condition.

    In the first round (base model, classes far apart) each sample also sits at its own class's mean.
    """

    def __init__(self) -> None:
        self.checked = 0

    def _check(self, pl_module, batch, first_round: bool) -> None:
        x1, cond = batch.x1.detach().cpu(), condition_to(batch.cond, "cpu")
        torch.testing.assert_close(batch.rewards.cpu(), ClassDirectionReward()(x1, cond), rtol=1e-5, atol=1e-5)
        assert cond.tensors.long().tolist() == [m["class"] for m in cond.metadata]
        if first_round:
            assert torch.cdist(x1, MEANS).argmin(1).tolist() == [m["class"] for m in cond.metadata]
        self.checked += x1.shape[0]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rollouts = pl_module.rollouts
        first = trainer.current_epoch == 0 and batch_idx == 0
        self._check(pl_module, rollouts, first)
        self._check(pl_module, rollouts.index(torch.randperm(len(rollouts))[: len(rollouts) // 2]), first)


def _module(objective, solver=None, lr=3e-3, steps=8, group_size=32, groups=6, n_steps=12):
    from lightning_nft.module import RewardFineTuningModule, adamw

    torch.manual_seed(0)
    backbone = ResidualVelocity(ClassMixtureField(), MLPVelocity(2, 64, 2, num_classes=3, zero_init=True))
    return RewardFineTuningModule(backbone, ClassDirectionReward(), objective, sample_shape=[2],
                                  condition_sampler=class_conditions, groups_per_round=groups,
                                  group_size=group_size, steps_per_round=steps, optimizer=adamw(lr),
                                  n_sample_steps=n_steps, solver=solver)


@torch.no_grad()
def _class_means(module, n: int = 600) -> Tensor:
    from lightning_nft.samplers import EulerSolver

    out = []
    for c in range(3):
        x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(50 + c))
        cond = Conditions(torch.full((n,), c), [{"class": c}] * n)
        out.append(module.sample(x0, cond, solver=EulerSolver()).samples.mean(0))
    return torch.stack(out)


def _objectives():
    from lightning_nft.objectives.adjoint_matching import AdjointMatchingObjective
    from lightning_nft.objectives.grpo import GRPOObjective
    from lightning_nft.objectives.nft import NFTObjective

    return {
        "nft": dict(objective=NFTObjective(beta=1.0)),
        "adjoint": dict(objective=AdjointMatchingObjective(reward_multiplier=1.0), lr=1e-2, group_size=16),
        "grpo": dict(objective=GRPOObjective(clip_range=0.2), lr=1e-2),
        "grpo_subset": dict(objective=GRPOObjective(clip_range=0.2, train_timesteps=4), lr=1e-2),
        "grpo_branch": dict(objective=GRPOObjective(clip_range=0.2, branch_width=4), lr=3e-3, group_size=4, groups=24),
    }


@pytest.mark.parametrize("name", ["nft", "adjoint", "grpo", "grpo_subset", "grpo_branch"])
def test_each_objective_keeps_conditions_paired_and_shifts_every_class_its_own_way(name):
    settings = _objectives()[name]
    module = _module(**settings)
    before = _class_means(module)
    probe = PairingProbe()
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    assert probe.checked > 0
    shift = ((_class_means(module) - before) * DIRECTIONS).sum(-1)  # a_c . (mean_after - mean_before)
    print(name, "per-class shift along a_c", [round(v, 3) for v in shift.tolist()])
    assert (shift > 0.05).all(), f"{name}: per-class shifts along a_c {shift.tolist()}"


class FlatForClassTwo(ClassDirectionReward):
    """``a_c . x`` for classes 0 and 1, a constant for class 2 (its groups tie: no learning signal)."""

    def forward(self, samples: Tensor, cond=None) -> Tensor:
        labels = torch.tensor(cond.values("class"), device=samples.device)
        return torch.where(labels == 2, torch.full_like(samples[:, 0], 0.3), super().forward(samples, cond))


class ClassCounter(Callback):
    def __init__(self) -> None:
        self.fractions = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # runs before RewardMetrics (listed first)
        labels = pl_module.rollouts.cond.tensors.reshape(-1, pl_module.group_size)[:, 0]
        self.fractions.append(float((labels == 2).float().mean()))


def test_reward_metrics_log_the_fraction_of_tied_groups():
    from lightning_nft.callbacks import RewardMetrics
    from lightning_nft.objectives.nft import NFTObjective

    module = _module(NFTObjective(beta=1.0), groups=12, group_size=8, steps=2)
    module.reward = FlatForClassTwo()
    counter, metrics = ClassCounter(), RewardMetrics()
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[counter, metrics])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    tied = [row["reward/tied_groups"] for row in metrics.history]
    assert tied == pytest.approx(counter.fractions, abs=1e-6) and 0 < max(tied) < 1, (tied, counter.fractions)
