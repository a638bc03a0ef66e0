"""``RoundAveraging``: the fitted model is the mean of the last rounds' parameters (Lightning's ``WeightAveraging``
updated once per round).

* After a 5-round fit with ``last_rounds=3`` the module's trainable parameters equal the mean of the parameters
  recorded at the end of rounds 2, 3 and 4 (float tolerance), for two window sizes; the reference is untouched.
* A window longer than the fit averages every round; a fit without ``max_epochs`` and a window below 1 are refused.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.callbacks import RoundAveraging
from lightning_nft.module import RewardFineTuningModule, adamw
from lightning_nft.objectives import AdjointMatchingObjective
from lightning_nft.rewards import LinearReward


class RecordRounds(Callback):
    def __init__(self) -> None:
        self.rounds: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.rounds.append(_flat(pl_module.backbone.residual))


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def _module() -> RewardFineTuningModule:
    pl.seed_everything(0, verbose=False)
    base = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [0.0, 1.0], [2.0, 0.0]], 0.45)
    return RewardFineTuningModule(ResidualVelocity(base, MLPVelocity(2, 32, 2, 8, zero_init=True)), LinearReward([1.0, 0.0]),
                                  AdjointMatchingObjective(reward_multiplier=0.6), sample_shape=[2], groups_per_round=1,
                                  group_size=64, steps_per_round=5, n_sample_steps=10, optimizer=adamw(1e-2))


def _fit(rounds: int, last_rounds: int) -> tuple[RewardFineTuningModule, RecordRounds, torch.Tensor]:
    module = _module()
    initial = _flat(module.backbone.residual)
    record = RecordRounds()
    trainer = pl.Trainer(max_epochs=rounds, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[record, RoundAveraging(last_rounds=last_rounds)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return module, record, initial


@pytest.mark.parametrize("last_rounds", [1, 3])
def test_model_is_the_mean_of_the_last_rounds(last_rounds):
    module, record, initial = _fit(5, last_rounds)
    assert len(record.rounds) == 5 and not torch.allclose(record.rounds[-1], record.rounds[-2])
    expected = torch.stack(record.rounds[-last_rounds:]).mean(0)
    assert torch.allclose(_flat(module.backbone.residual), expected, atol=1e-6)
    assert torch.equal(_flat(module.reference_backbone.residual), initial)  # the frozen reference: untouched


def test_window_longer_than_the_fit_and_refusals():
    module, record, _ = _fit(2, 5)
    assert torch.allclose(_flat(module.backbone.residual), torch.stack(record.rounds).mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="last_rounds"):
        RoundAveraging(last_rounds=0)
    trainer = pl.Trainer(max_epochs=-1, max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[RoundAveraging()])
    with pytest.raises(ValueError, match="max_epochs"):
        trainer.fit(_module())
