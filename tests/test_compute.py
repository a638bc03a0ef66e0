"""The compute ledger (``lightning_nft.compute``): counts at the policy-call boundary against the counts each
method's recipe implies (rollout grid x samples, trained rows x steps), CFG's two passes, phases, logging and
checkpoints."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.compute import BACKWARD_COST, ComputeLedger
from lightning_nft.guidance import GuidedVelocity
from lightning_nft.module import RewardFineTuningModule, adamw
from lightning_nft.objectives import GRPOObjective, NFTObjective
from lightning_nft.rewards import LinearReward


def _module(objective, **kw) -> RewardFineTuningModule:
    torch.manual_seed(0)
    field = GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], 0.5)
    backbone = ResidualVelocity(field, MLPVelocity(2, 16, 2, zero_init=True))
    return RewardFineTuningModule(backbone, LinearReward([1.0, 0.0]), objective, sample_shape=[2],
                                  optimizer=adamw(1e-3), **kw)


def _fit(module, epochs: int) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return trainer


@pytest.mark.parametrize("P,K,T,steps,epochs,kl", [(2, 4, 5, 2, 2, 0.1), (3, 2, 4, 3, 1, 0.0), (1, 6, 3, 1, 3, 0.5)])
def test_grpo_counts_match_its_recipe(P, K, T, steps, epochs, kl):
    """Flow-GRPO: T SDE steps of the old policy per image; per trained row and step one forward + backward of the
    current policy (and one reference forward with a KL)."""
    module = _module(GRPOObjective(kl_weight=kl), groups_per_round=P, group_size=K, steps_per_round=steps,
                     n_sample_steps=T)
    trainer = _fit(module, epochs)
    n = P * K
    rows_per_step = max(1, n // steps)
    trained = epochs * steps * rows_per_step * T
    c = module.compute_ledger.counts
    assert c["rollout/old"] == epochs * n * T
    assert c["train/current"] == trained and c["train/backward"] == trained
    assert c["train/reference"] == (trained if kl > 0 else 0)
    assert c["train/old"] == 0 and c["rollout/current"] == 0 and c["rollout/backward"] == 0
    expected = epochs * n * T + trained * (1 + BACKWARD_COST) + (trained if kl > 0 else 0)
    assert module.compute_ledger.forward_equivalents() == expected
    assert module.compute_ledger.images == epochs * n
    logged = trainer.callback_metrics
    assert float(logged["compute/forward_equivalents"]) == expected
    assert float(logged["compute/images"]) == epochs * n
    assert float(logged["compute/images_per_round"]) == n


@pytest.mark.parametrize("kl", [0.0, 0.2])
def test_nft_counts_current_old_and_reference_per_trained_row(kl):
    """DiffusionNFT: ODE rollouts of the old policy; each trained row costs a current forward + backward and an old
    forward (and a reference forward with the KL anchor)."""
    P, K, T, steps, epochs = 2, 4, 6, 2, 2
    module = _module(NFTObjective(), groups_per_round=P, group_size=K, steps_per_round=steps, n_sample_steps=T)
    module.kl_weight = kl
    _fit(module, epochs)
    c = module.compute_ledger.counts
    trained = epochs * steps * (P * K // steps)
    assert c["rollout/old"] == epochs * P * K * T
    assert c["train/current"] == trained and c["train/backward"] == trained and c["train/old"] == trained
    assert c["train/reference"] == (trained if kl > 0 else 0)


def test_guidance_counts_both_passes_and_evaluation_is_kept_apart():
    module = _module(NFTObjective(), groups_per_round=1, group_size=2)
    x = torch.randn(5, 2)
    guided = GuidedVelocity(module.old_velocity, uncond=None, scale=1.0)
    guided(x, torch.full((5,), 0.3))
    assert module.compute_ledger.counts["other/old"] == 5  # scale 1: one pass
    with module.compute_ledger.phase("rollout"):
        cond = torch.zeros(5, 1)
        GuidedVelocity(lambda x, t, c: module.old_velocity(x, t, None), uncond=cond, scale=3.0)(x, torch.full((5,), 0.3), cond)
    assert module.compute_ledger.counts["rollout/old"] == 10  # two passes of 5 rows
    module.sample(torch.randn(4, 2), times=torch.linspace(0, 1, 4))  # an evaluation: phase "other"
    assert module.compute_ledger.counts["other/current"] == 12
    assert module.compute_ledger.forward_equivalents() == 10  # evaluations are not training compute
    assert module.compute_ledger.forward_equivalents(("other",)) == 17


def test_ledger_state_round_trip_and_phase_errors():
    ledger = ComputeLedger()
    with ledger.phase("train"):
        ledger.record("current", 7, differentiated=True)
    ledger.add_images(3)
    twin = ComputeLedger()
    twin.load_state_dict(ledger.state_dict())
    assert twin.summary() == ledger.summary() and twin.forward_equivalents() == 7 * (1 + BACKWARD_COST)
    with pytest.raises(ValueError, match="bogus"):
        with ledger.phase("bogus"):
            pass
    assert ledger.current_phase == "other"
