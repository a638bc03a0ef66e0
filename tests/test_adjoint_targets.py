"""Adjoint Matching's per-round regression points (``objectives/adjoint_targets.py``) and their replay.

* Without splitting, on every interior time, the round's points give the same loss and gradient as the
  per-minibatch computation of ``AdjointMatchingObjective(targets="minibatch")`` on the same rollouts (an
  independent code path), for three current models.
* With splitting the points carry importance weights of mean 1, times inside ``(0, 1)`` and each path's times
  distinct; ``replay_rounds`` keeps the previous rounds' points in front of the new ones, and the objective's
  state survives ``torch.save`` / ``torch.load(weights_only=True)``, tensor and ``Conditions`` conditions alike.
* Bad settings are refused.
"""

from __future__ import annotations

import io

import pytest
import torch

from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.conditions import Conditions
from lightning_nft.objectives import AdjointMatchingObjective, Policies
from lightning_nft.objectives.adjoint_targets import AdjointTargets, per_path_times
from lightning_nft.rewards import LinearReward
from lightning_nft.rollouts import RolloutBatch
from lightning_nft.samplers import MemorylessNoise, SDESolver, time_grid

BASE = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [0.0, 1.0], [2.0, 0.0]], 0.45)


def _model(seed: int) -> ResidualVelocity:
    torch.manual_seed(seed)
    return ResidualVelocity(BASE, MLPVelocity(2, 32, 2, 8))  # a random (non-zero) residual: v_ft != v_base


def _rollouts(model, n: int, steps: int, seed: int, cond=None) -> tuple[Policies, RolloutBatch]:
    solver, times = SDESolver(MemorylessNoise()), time_grid(steps)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = solver.sample(model, torch.randn(n, 2, generator=g), times, cond, generator=g, return_trajectory=True)
    policies = Policies(velocity=model, old_velocity=None, reference_velocity=BASE, solver=solver,
                        reward=LinearReward([0.6, 0.8]))
    zeros = torch.zeros(n)
    return policies, RolloutBatch(x1=out.samples, rewards=zeros, advantages=zeros, r=zeros, group=torch.arange(n),
                                  cond=cond, trajectory=out.trajectory, times=out.times)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_points_reproduce_the_minibatch_loss_and_gradient(seed):
    model = _model(seed)
    policies, batch = _rollouts(model, 48, 12, seed)
    g = torch.Generator().manual_seed(0)
    per_round = AdjointMatchingObjective(reward_multiplier=0.8, n_train_times=None, split_at=None, replay_rounds=0)
    per_minibatch = AdjointMatchingObjective(reward_multiplier=0.8, n_train_times=None, targets="minibatch",
                                             split_at=None, replay_rounds=0)
    points = per_round.prepare_round(policies, batch, g)
    assert isinstance(points, AdjointTargets) and len(points) == 48 * 11 and torch.equal(points.weight, torch.ones(48 * 11))
    assert per_minibatch.prepare_round(policies, batch, g) is batch
    losses, grads = [], []
    for objective, data in ((per_round, points), (per_minibatch, batch)):
        model.zero_grad()
        loss, logs = objective.loss(policies, data, g)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.residual.parameters()]))
    assert torch.allclose(losses[0], losses[1], rtol=1e-5), losses
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_split_points_replay_and_checkpoint_state():
    model = _model(3)
    cond = Conditions(torch.arange(40.0)[:, None], [{"prompt_id": i} for i in range(40)])

    def velocity(x, t, c=None):  # conditioned call signature; the field ignores the condition
        return model(x, t)

    policies, batch = _rollouts(velocity, 40, 16, 0, cond)
    policies = Policies(velocity=velocity, old_velocity=None, reference_velocity=lambda x, t, c=None: BASE(x, t),
                        solver=policies.solver, reward=policies.reward)
    objective = AdjointMatchingObjective(reward_multiplier=1.0, n_train_times=4, replay_rounds=1)
    g = torch.Generator().manual_seed(1)
    first = objective.prepare_round(policies, batch, g)
    assert len(first) % 4 == 0 and len(first) >= 4 * 40
    assert float(first.weight.mean()) == pytest.approx(1.0) and bool((first.weight > 0).all())
    assert bool(((first.t > 0) & (first.t < 1)).all()) and len(first.cond) == len(first)
    per_path = per_path_times(torch.arange(1, 16), 500, 4, g)
    assert per_path.shape == (4, 500) and bool((per_path.sort(0).values.diff(dim=0) > 0).all())  # distinct per path
    second = objective.prepare_round(policies, batch, g)
    assert len(second) > len(first) and torch.equal(second.x[:len(first)], first.x)  # replayed, in front
    assert second.cond.metadata[:len(first)] == first.cond.metadata
    buffer = io.BytesIO()
    torch.save(objective.state_dict(), buffer)
    buffer.seek(0)
    restored = AdjointMatchingObjective(reward_multiplier=1.0, n_train_times=4, replay_rounds=1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = objective.prepare_round(policies, batch, g1), restored.prepare_round(policies, batch, g2)
    assert torch.equal(a.x, b.x) and torch.equal(a.adjoint, b.adjoint) and torch.equal(a.weight, b.weight)
    assert torch.equal(a.cond.tensors, b.cond.tensors) and a.cond.metadata == b.cond.metadata
    no_replay = AdjointMatchingObjective(reward_multiplier=1.0, n_train_times=4, replay_rounds=0)
    no_replay.prepare_round(policies, batch, g)
    assert no_replay.state_dict() == {"history": []}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="targets"):
        AdjointMatchingObjective(targets="epoch")
    with pytest.raises(ValueError, match="split_at"):
        AdjointMatchingObjective(split_at=0.5)
    with pytest.raises(ValueError, match="targets='minibatch'"):
        AdjointMatchingObjective(targets="minibatch")  # splitting and replay need per-round points
    with pytest.raises(ValueError, match="replay_rounds"):
        AdjointMatchingObjective(replay_rounds=-1)
