"""Adjoint Matching (Adjoint Matching, arXiv:2409.08861) through ``RewardFineTuningModule`` and the Lightning ``Trainer``.

* A short fit on the exact 3-component mixture moves the component weights most of the way to the
  exact tilt ``p_base exp(lambda a.x)`` (``analytic.GaussianMixture.tilt``), sampled with the Euler ODE.
* Set-up refuses what cannot work: a black-box reward (no ``grad r``) and a rollout solver that is not
  the memoryless SDE, both before any rollout or gradient step.
* ``strategy="ddp_spawn"`` with two CPU processes: parameters identical on both ranks after 2 rounds.
* ``configs/gmm_adjoint.yaml`` and ``configs/digits_adjoint.yaml`` run 2 rounds through
  ``lightning_nft.cli.main`` in a temporary working directory.
"""

from __future__ import annotations

import glob
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_nft.analytic import GaussianMixture, component_weights, effective_tilt, total_variation
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.cli import main
from lightning_nft.module import RewardFineTuningModule, adamw, linear_decay
from lightning_nft.objectives import AdjointMatchingObjective
from lightning_nft.rewards import LinearReward, Reward
from lightning_nft.samplers import EulerSolver, FlowGRPONoise, SDESolver, time_grid

ROOT = Path(__file__).resolve().parents[1]
# the mixture of configs/gmm_adjoint.yaml and tests/test_adjoint_matching.py: the tilt moves the weights
# (0.5, 0.3, 0.2) -> (0.135, 0.269, 0.596), TV 0.40
WEIGHTS, MEANS, STD, DIRECTION, LAM = [0.5, 0.3, 0.2], [[-2.0, 0.0], [0.0, 1.0], [2.0, 0.0]], 0.45, [1.0, 0.0], 0.6


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _module(reward=None, lr_final=1e-3, rounds=60, group_size=256, n_steps=20, hidden=64, seed=0, **kw):
    mixture = GaussianMixture(WEIGHTS, MEANS, STD)
    backbone = ResidualVelocity(mixture, MLPVelocity(2, hidden, 2, 16, zero_init=True))
    return RewardFineTuningModule(
        backbone, reward if reward is not None else LinearReward(DIRECTION),
        AdjointMatchingObjective(reward_multiplier=LAM), sample_shape=[2], groups_per_round=1,
        group_size=group_size, n_sample_steps=n_steps, optimizer=adamw(1e-2),
        lr_scheduler=linear_decay(1e-2, lr_final, rounds), rollout_seed=seed, **kw,
    )


def _trainer(rounds: int, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=rounds, gradient_clip_val=1.0, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)


def test_adjoint_matching_through_lightning_moves_weights_to_the_exact_tilt():
    """60 rounds x 256 memoryless-SDE rollouts (20 steps), one AdamW step each on all the round's regression
    points (the objective's defaults: importance-split paths, 10 times per path, last round replayed), lr
    1e-2 -> 1e-3 (a few seconds): a short online schedule, not the fitted recipe of configs/gmm_adjoint.yaml.

    Measured over seeds 0-2 (4000 Euler-ODE samples, 50 steps): TV to the exact tilted weights
    0.40 -> 0.064-0.075, achieved tilt 0.53-0.56 for the requested 0.6 (0.079-0.090 and 0.51-0.52 with the
    per-minibatch targets before issue 14). Bounds: TV <= 0.15 (the sampling error of the weights is ~0.01)
    and tilt in [0.4, 0.75] (no overshoot either).
    """
    pl.seed_everything(0, verbose=False)
    module = _module()
    _trainer(60).fit(module)
    mixture = GaussianMixture(WEIGHTS, MEANS, STD)
    direction = torch.tensor(DIRECTION)
    target = mixture.tilt(direction, LAM)
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        base_x = EulerSolver().sample(mixture, x0, time_grid(50)).samples
        x = EulerSolver().sample(module.backbone, x0, time_grid(50)).samples
    tv_base = total_variation(component_weights(target, base_x), target.weights)
    w = component_weights(target, x)
    assert tv_base > 0.35
    assert total_variation(w, target.weights) <= 0.15, w
    assert 0.4 <= effective_tilt(mixture, w, direction) <= 0.75, w
    # linear_decay: the rate reached 1e-3 at the last step
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)


class NumpyReward(Reward):
    """A black box: rewards computed in numpy (no graph), honestly marked non-differentiable."""

    differentiable = False

    def forward(self, samples, cond=None):
        return torch.as_tensor(samples.detach().cpu().numpy()[:, 0])


class CountRollouts(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1


def test_black_box_reward_is_refused_before_any_training():
    module = _module(reward=NumpyReward())
    counter = CountRollouts()
    trainer = _trainer(2, callbacks=[counter])
    with pytest.raises(TypeError, match="black-box reward.*Adjoint Matching needs grad r"):
        trainer.fit(module)
    assert module.rollout_version == 0 and counter.batches == 0 and trainer.global_step == 0
    assert torch.count_nonzero(module.backbone.residual.head.weight) == 0  # untouched


@pytest.mark.parametrize("solver", [EulerSolver(), SDESolver(FlowGRPONoise())], ids=["euler", "flow_grpo_sde"])
def test_non_memoryless_solver_is_refused_before_any_training(solver):
    module = _module(solver=solver)
    trainer = _trainer(2)
    with pytest.raises(ValueError, match="memoryless SDE"):
        trainer.fit(module)
    assert module.rollout_version == 0 and trainer.global_step == 0


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu().clone() for p in params])


class RankParameters(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"world": trainer.world_size, "steps": trainer.global_step,
                    "x1": pl_module.rollouts.x1.cpu(), "current": _flat(pl_module.backbone.parameters()),
                    "reference": _flat(pl_module.reference_backbone.parameters())},
                   Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def test_ddp_spawn_two_cpu_ranks(tmp_path):
    """2 ranks x 2 rounds: different rollouts per rank, bit-identical trained parameters, reference kept."""
    pl.seed_everything(0, verbose=False)
    module = _module(group_size=32, n_steps=8, hidden=32)
    initial = _flat(module.backbone.parameters())
    trainer = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=2, gradient_clip_val=1.0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[RankParameters(str(tmp_path))])
    trainer.fit(module)
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pt") for k in range(2))
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 2
    assert not torch.allclose(r0["x1"], r1["x1"])  # each rank its own rollouts
    assert torch.equal(r0["current"], r1["current"])  # gradients averaged: same weights
    assert not torch.allclose(r0["current"], initial)
    assert torch.equal(r0["reference"], initial) and torch.equal(r1["reference"], initial)
    assert torch.equal(_flat(module.backbone.parameters()), r0["current"])  # rank 0's weights come back


def test_gmm_adjoint_config(tmp_path, monkeypatch):
    """configs/gmm_adjoint.yaml, shrunk to 2 rounds of 2 x 512 rollouts on 40 steps and 10 steps per round: fit,
    then predict from the checkpoint (the full recipe is tests/test_adjoint_family.py's)."""
    monkeypatch.chdir(tmp_path)
    cfg = str(ROOT / "configs" / "gmm_adjoint.yaml")
    main(["fit", "--config", cfg, "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
          "--model.init_args.groups_per_round", "2", "--model.init_args.n_sample_steps", "40",
          "--model.init_args.steps_per_round", "10"])
    ckpt_path = Path("runs/gmm_adjoint/checkpoints/last.ckpt")
    main(["predict", "--config", cfg, "--ckpt_path", str(ckpt_path), "--trainer.enable_progress_bar", "false"])
    assert any(Path("runs/gmm_adjoint/tb").rglob("events.out.tfevents*"))
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["global_step"] == 20 and ckpt["lightning_nft"]["rollout_version"] == 2
    state = ckpt["state_dict"]  # RoundAveraging's average of the 2 rounds (its window is 6)
    assert not any(k.startswith("old_backbone.") for k in state)  # Adjoint Matching keeps no old policy
    assert torch.count_nonzero(state["reference_backbone.residual.head.weight"]) == 0  # reference = base
    assert torch.count_nonzero(state["backbone.residual.head.weight"]) > 0
    current = ckpt["current_model_state"]["backbone.residual.head.weight"]
    assert not torch.equal(current, state["backbone.residual.head.weight"])  # averaged, not the last round
    # the per-round cosine: T_0 follows steps_per_round (interpolated), restarted at 3e-3 after round 2's 10 steps
    scheduler = ckpt["lr_schedulers"][0]
    assert scheduler["T_0"] == 10 and scheduler["_last_lr"] == [pytest.approx(3e-3)]
    history = ckpt["lightning_nft"]["objective"]["history"]  # last round's points, replayed after a resume
    assert len(history) == 1 and history[0]["x"].shape[0] >= 2 * 512 * 10
    out = torch.load("runs/gmm_adjoint/samples.pt")
    assert out["samples"].shape == (2000, 2) and out["rewards"].shape == (2000,)
    torch.testing.assert_close(out["rewards"], out["samples"][:, 0], rtol=0, atol=1e-6)


def test_digits_adjoint_config_runs_two_rounds(tmp_path, monkeypatch):
    """configs/digits_adjoint.yaml, 2 rounds: metrics, pictures and checkpoint are written; the logged reward is
    the log-probability of digit 3 (negative)."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs" / "digits_adjoint.yaml"), "--trainer.max_epochs", "2",
          "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "runs" / "digits_adjoint"
    (events,) = glob.glob(str(run / "tb" / "version_0" / "events.out.tfevents*"))
    acc = EventAccumulator(events, size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Scalars("reward/mean")) == 2
    quality = [e.value for e in acc.Scalars("quality/reward")]
    assert len(quality) >= 1 and all(q < 0 for q in quality)  # mean log p(3 | x) (every 10 rounds + at the end)
    assert all(torch.isfinite(torch.tensor([e.value for e in acc.Scalars("quality/fid")])))
    assert {"samples/before", "samples/after"} <= set(acc.Tags()["images"])
    assert (run / "before_after.png").exists() and (run / "reward_vs_diversity.png").exists()
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert not any(k.startswith("old_backbone.") for k in state)
