"""Bad values in a run: non-finite rewards handled as configured, a diverged policy blamed on the policy,
rewards of the wrong shape or type refused or converted, bad settings refused before round 0."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.models import load_pretrained_digits_flow
from lightning_nft.module import RewardFineTuningModule, adamw
from lightning_nft.objectives.nft import NFTObjective
from lightning_nft.rewards import DigitClassifierReward, LinearReward
from lightning_nft.rewards.base import Reward
from lightning_nft.rewards.validation import PolicyDivergedError

P, K = 8, 4


class HoleyReward(Reward):
    """``r(x) = x_1``, NaN where ``x_2 > 1.8`` (a deterministic hole: rollouts replay, so would the NaN)."""

    differentiable = False

    def forward(self, samples, cond=None):
        r = samples[:, 0].clone()
        r[samples[:, 1] > 1.8] = float("nan")
        return r


class NumpyReward(Reward):
    differentiable = False

    def forward(self, samples, cond=None):
        return samples[:, 0].numpy().tolist()


class PairReward(Reward):
    differentiable = False

    def forward(self, samples, cond=None):
        return samples[:, 0].reshape(2, -1)


class Rollouts(Callback):
    """The rollouts of every round (after the non-finite policy) and what was logged."""

    def __init__(self):
        self.rounds = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.rounds.append((pl_module.rollouts, {k: float(v) for k, v in trainer.callback_metrics.items()}))


def _module(reward, **kwargs):
    mixture = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], 0.4)
    settings = dict(sample_shape=[2], groups_per_round=P, group_size=K, steps_per_round=2, n_sample_steps=5,
                    optimizer=adamw(1e-3))
    settings.update(kwargs)
    return RewardFineTuningModule(ResidualVelocity(mixture, MLPVelocity(2, 16, 1, zero_init=True)), reward,
                                  NFTObjective(beta=1.0), **settings)


def _fit(module, root: Path, rounds: int = 2, callbacks=()):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=rounds, default_root_dir=str(root), logger=False, enable_checkpointing=False,
                         accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=list(callbacks))
    trainer.fit(module)
    return trainer


def test_nonfinite_rewards_raise_by_default_naming_the_reward_and_the_round(tmp_path):
    with pytest.raises(ValueError, match=r"HoleyReward gave \d+ non-finite value\(s\) of 32 at round 0.*drop_sample"):
        _fit(_module(HoleyReward()), tmp_path)


@pytest.mark.parametrize("policy", ["drop_sample", "drop_group"])
def test_nonfinite_rewards_are_dropped_counted_and_logged(tmp_path, policy):
    seen = Rollouts()
    _fit(_module(HoleyReward(), nonfinite_rewards=policy), tmp_path, callbacks=[seen])
    assert len(seen.rounds) == 2
    dropped_any = False
    for rollouts, logged in seen.rounds:
        assert torch.isfinite(rollouts.rewards).all() and torch.isfinite(rollouts.r).all()
        # recompute the hole on the kept samples' own reward: none of them is a hole
        assert (rollouts.x1[:, 1] <= 1.8).all()
        n_dropped = P * K - len(rollouts)
        assert logged["reward/dropped_samples"] == n_dropped
        dropped_any |= n_dropped > 0
        if policy == "drop_group":
            sizes = torch.bincount(rollouts.group)
            assert set(sizes[sizes > 0].tolist()) == {K}  # whole groups only
            assert logged["reward/dropped_groups"] * K == n_dropped
        else:
            assert logged["reward/nonfinite"] == n_dropped
    assert dropped_any


def test_a_diverged_policy_is_blamed_on_the_policy_not_the_reward(tmp_path):
    """lr 1e3 (the issue's probe): main reported "reward of sample 0 is nan"."""
    with pytest.raises(PolicyDivergedError) as err:
        _fit(_module(LinearReward([1.0, 0.0]), optimizer=adamw(1e3)), tmp_path, rounds=12)
    msg = str(err.value)
    assert "diverged" in msg and "round" in msg and "step" in msg and "reward of sample" not in msg
    assert "last finite loss was" in msg or "last good state is saved" in msg
    if "last good state is saved" in msg:
        saved = list((tmp_path / "checkpoints").glob("last-good-*.ckpt"))
        assert len(saved) == 1
        state = torch.load(saved[0], weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_reward_outputs_through_the_module(tmp_path):
    with pytest.warns(UserWarning, match="NumpyReward returned a list"):
        _fit(_module(NumpyReward()), tmp_path / "a", rounds=1)
    # (2, 1) for the 2 samples of the start-up call is one value per sample; (2, 16) for a round's 32 is not
    with pytest.raises(ValueError, match=r"PairReward returned a reward of shape \(2, 16\) for 32 samples"):
        _fit(_module(PairReward()), tmp_path / "b", rounds=1)


def test_bad_settings_are_refused_before_round_0(tmp_path):
    with pytest.raises(ValueError, match=r"group_size is 1.*'minmax'"):
        _module(LinearReward([1.0, 0.0]), group_size=1)
    with pytest.raises(ValueError, match=r"learning rate of AdamW .* is 0\.0"):
        _fit(_module(LinearReward([1.0, 0.0]), optimizer=adamw(0.0)), tmp_path / "lr", rounds=1)
    digits = RewardFineTuningModule(load_pretrained_digits_flow(), DigitClassifierReward(target=3), NFTObjective(beta=1.0),
                                    sample_shape=[1, 16, 16], groups_per_round=1, group_size=2, n_sample_steps=2)
    with pytest.raises(ValueError, match=r"backbone ConvVelocity was trained on samples of shape \(1, 8, 8\)"):
        _fit(digits, tmp_path / "shape", rounds=1)
