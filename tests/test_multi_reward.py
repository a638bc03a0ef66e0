"""MultiReward: per-component normalisation, per-component metadata, per-round component logging."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.callbacks.reward_components import RewardComponentMetrics
from lightning_nft.conditions import Conditions
from lightning_nft.module import RewardFineTuningModule, adamw
from lightning_nft.objectives.nft import NFTObjective
from lightning_nft.rewards.base import LinearReward, Reward
from lightning_nft.rewards.multi import MultiReward, standardize

EPS = 1e-6


def loop_standardize(v: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """The per-group z-score written as a plain loop (float64)."""
    out = torch.empty_like(v, dtype=torch.float64)
    for g in set(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        vals = v[rows].double()
        out[rows] = (vals - vals.mean()) / (vals.std(unbiased=False) + EPS)
    return out


def test_standardize_matches_a_per_group_loop():
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(2, 30, (1,), generator=g))
        v = torch.randn(n, generator=g) * (seed + 1) + seed
        groups = torch.randint(0, 4, (n,), generator=g)
        got = standardize(v, groups, EPS)
        assert torch.allclose(got.double(), loop_standardize(v, groups.tolist()), atol=1e-5)
        whole = standardize(v, None, EPS)
        assert torch.allclose(whole.double(), loop_standardize(v, [0] * n), atol=1e-5)


def prompts_cond(n_groups: int, k: int) -> Conditions:
    return Conditions(None, [{"prompt": f"p{i}"} for i in range(n_groups) for _ in range(k)])


def test_group_normalized_sum_matches_the_formula_and_is_chunk_invariant():
    a, b = LinearReward([1.0, 0.0]), LinearReward([0.0, 50.0])  # very different scales
    multi = MultiReward({"a": a, "b": b}, weights={"a": 2.0, "b": 0.5}, normalize="group")
    for seed in range(4):
        x = torch.randn(12, 2, generator=torch.Generator().manual_seed(seed))
        cond = prompts_cond(4, 3)
        groups = [i // 3 for i in range(12)]
        expected = 2.0 * loop_standardize(a(x), groups) + 0.5 * loop_standardize(b(x), groups)
        got = multi(x, cond)
        assert torch.allclose(got.double(), expected, atol=1e-5)
        chunks = torch.cat([multi(x[i:i + 6], cond.index(torch.arange(i, i + 6))) for i in (0, 6)])
        assert torch.allclose(chunks, got, atol=1e-6)  # whole groups: same result per chunk
    with pytest.raises(KeyError, match="'prompt'"):
        multi(torch.randn(3, 2), None)


def test_batch_normalized_sum_and_its_gradient():
    a = LinearReward([1.0, -2.0])
    multi = MultiReward({"a": a}, weights={"a": 3.0}, normalize="batch")
    for seed in range(4):
        x = torch.randn(10, 2, generator=torch.Generator().manual_seed(seed))
        r = a(x)
        std = r.std(unbiased=False)
        assert torch.allclose(multi(x), 3.0 * (r - r.mean()) / (std + EPS), atol=1e-5)
        # statistics are detached: grad of row i is 3 a / (std + eps)
        grad = multi.gradient(x)
        assert torch.allclose(grad, (3.0 / (std + EPS)) * torch.tensor([1.0, -2.0]).expand(10, 2), atol=1e-5)


def test_unnormalized_sum_keeps_raw_components():
    a, b = LinearReward([1.0, 0.0]), LinearReward([0.0, 1.0])
    multi = MultiReward({"a": a, "b": b}, weights={"b": -1.0})
    x = torch.randn(5, 2)
    assert torch.allclose(multi(x), a(x) - b(x))
    assert torch.equal(multi.last_components["a"], a(x)) and torch.equal(multi.last_components["b"], b(x))
    with pytest.raises(ValueError, match="normalize"):
        MultiReward({"a": a}, normalize="rank")


class TextReward(Reward):
    """A black-box reward that reports what it 'read' for each sample (like an OCR reward)."""

    differentiable = False

    def forward(self, samples, cond=None):
        self.last_metadata = [{"text": f"{float(s[0]):.2f}"} for s in samples]
        return samples[:, 0].detach()


def test_component_metadata_is_collected_under_the_component_name():
    multi = MultiReward({"ocr": TextReward(), "lin": LinearReward([0.0, 1.0])})
    x = torch.tensor([[0.5, 1.0], [1.25, -1.0]])
    multi(x)
    assert multi.last_metadata == [{"ocr": {"text": "0.50"}}, {"ocr": {"text": "1.25"}}]
    assert not multi.differentiable


# ------------------------------------------------------------------------------- per-round logging
class RecordRollouts(Callback):
    def __init__(self):
        self.x1 = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.x1[trainer.current_epoch] = pl_module.rollouts.x1.clone()


class EvaluateAtRoundEnd(Callback):
    """Scores other samples with the module's reward at every round end (as SampleQuality does)."""

    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.compute_rewards(torch.full((7, 2), 100.0), None)


def test_component_mean_and_std_are_logged_per_round(tmp_path):
    dirs = {"a": [1.0, 0.0], "b": [0.0, 1.0]}
    gmm = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 1.0]], 0.4)
    torch.manual_seed(0)
    reward = MultiReward({k: LinearReward(v) for k, v in dirs.items()}, weights={"b": 0.5})
    module = RewardFineTuningModule(ResidualVelocity(gmm, MLPVelocity(2, 16, 1, zero_init=True)), reward,
                                    NFTObjective(beta=1.0), sample_shape=[2], groups_per_round=3, group_size=6,
                                    steps_per_round=2, n_sample_steps=4, optimizer=adamw(1e-2))
    metrics, record = RewardComponentMetrics(), RecordRollouts()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[EvaluateAtRoundEnd(), metrics, record])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    assert len(metrics.history) == 3
    for e, row in enumerate(metrics.history):
        for name, d in dirs.items():
            values = record.x1[e] @ torch.tensor(d)
            assert row[f"reward_components/{name}/mean"] == pytest.approx(float(values.mean()), abs=1e-5)
            assert row[f"reward_components/{name}/std"] == pytest.approx(float(values.std(unbiased=False)), abs=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"reward_components/{n}/{s}" for n in dirs for s in ("mean", "std")} <= tags
    assert len(events.Scalars("reward_components/a/mean")) == 3
