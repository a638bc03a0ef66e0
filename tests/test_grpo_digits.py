"""Flow-GRPO on the digits task: it raises the reward, and ``configs/digits_grpo.yaml`` runs through the CLI.

The task is the NFT main job's (``configs/digits_nft.yaml``): the shipped unconditional 8x8 digits flow,
reward ``R(x) = softmax(f(x))_3`` of the shipped classifier. Rewards of fine-tuned models are measured here
independently of the training loop: fixed noise ``x0 ~ N(0, I)`` (its own seed) is integrated with the Euler
ODE sampler (10 steps) by the current policy, and the reward module scores the samples.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from lightning_nft.callbacks import EMAOldPolicy, RewardMetrics
from lightning_nft.cli import main
from lightning_nft.models import load_pretrained_digits_flow
from lightning_nft.module import RewardFineTuningModule, adamw
from lightning_nft.objectives.grpo import GRPOObjective
from lightning_nft.rewards import DigitClassifierReward
from lightning_nft.samplers import EulerSolver, FlowGRPONoise, SDESolver, time_grid

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_grpo.yaml"
TARGET = 3


def _objective_args() -> dict:
    with open(CONFIG) as f:
        return yaml.safe_load(f)["model"]["init_args"]["objective"]["init_args"]


@torch.no_grad()
def _fixed_noise_reward(velocity, reward: DigitClassifierReward, n: int = 256, seed: int = 99) -> float:
    """Mean reward of ``n`` Euler (10 steps) samples of ``velocity`` from noise seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 1, 8, 8, generator=g)
    x1 = EulerSolver().sample(velocity, x0, time_grid(10)).samples
    return float(reward(x1).mean())


def test_grpo_raises_the_reward_on_digits():
    """Ten rounds of Flow-GRPO with the config's objective and lr (4 x 32 rollouts, 8 steps a round; ~5 s) raise
    the mean reward of 256 fixed-noise ODE samples from the base's 0.10 to above 0.25, and the rollouts' own
    mean reward (SDE samples, RewardMetrics) by more than 0.15 from the first round to the last.

    Measured with seeds 0-7: fixed-noise reward 0.099 -> 0.38-0.75 (seed 0: 0.61); rollout mean first -> last
    round rises by 0.27-0.57 (seed 0: 0.10 -> 0.48)."""
    pl.seed_everything(0, verbose=False)
    reward = DigitClassifierReward(target=TARGET, mode="prob")
    objective = GRPOObjective(**_objective_args())
    module = RewardFineTuningModule(load_pretrained_digits_flow(), reward, objective, sample_shape=[1, 8, 8],
                                    groups_per_round=4, group_size=32, steps_per_round=8, n_sample_steps=10,
                                    optimizer=adamw(1e-3), rollout_seed=0)
    assert isinstance(module.rollout_solver(), SDESolver)
    assert isinstance(module.rollout_solver().noise, FlowGRPONoise)
    before = _fixed_noise_reward(module.reference_velocity, reward)
    metrics = RewardMetrics()
    trainer = pl.Trainer(max_epochs=10, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[EMAOldPolicy(decay=0.0), metrics])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    after = _fixed_noise_reward(module.velocity, reward)
    rollout = [row["reward/mean"] for row in metrics.history]
    print(f"fixed-noise reward {before:.3f} -> {after:.3f}; rollout means {[round(r, 3) for r in rollout]}")
    assert len(rollout) == 10
    assert 0.07 < before < 0.13  # the base: about one digit in ten is a 3
    assert after > 0.25
    assert rollout[-1] > rollout[0] + 0.15


def test_digits_grpo_config_is_the_digits_nft_task():
    """The benchmark's premise: same base, reward, sampler steps, images and gradient steps per round as NFT."""
    with open(CONFIG) as f:
        grpo = yaml.safe_load(f)
    with open(ROOT / "configs" / "digits_nft.yaml") as f:
        nft = yaml.safe_load(f)
    g, n = grpo["model"]["init_args"], nft["model"]["init_args"]
    for key in ("backbone", "reward", "sample_shape", "groups_per_round", "group_size", "steps_per_round",
                "n_sample_steps"):
        assert g[key] == n[key], key
    assert g["objective"]["class_path"].endswith("GRPOObjective")
    assert "solver" not in g  # rollouts from the objective's SDE solver (Flow-GRPO noise)
    ema = [cb for cb in grpo["trainer"]["callbacks"] if cb["class_path"].endswith("EMAOldPolicy")]
    assert len(ema) == 1 and ema[0]["init_args"] == {"decay": 0.0}  # hard copy (grpo.py docstring)


def test_digits_grpo_config_runs_through_the_cli(tmp_path, monkeypatch):
    """Two rounds of ``fit`` and a ``predict`` from the checkpoint, in process (~15 s)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    run = Path("runs") / "digits_grpo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["fit", "--config", str(CONFIG), "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"])
        ckpt_path = run / "checkpoints" / "last.ckpt"
        assert ckpt_path.exists()
        main(["predict", "--config", str(CONFIG), "--ckpt_path", str(ckpt_path), "--trainer.enable_progress_bar",
              "false"])
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * 8
    assert ckpt["lightning_nft"]["rollout_version"] == 2
    states = [v for k, v in ckpt["callbacks"].items() if k.startswith("EMAOldPolicy")]
    assert states == [{"updates": 2}]
    state = ckpt["state_dict"]
    moved = 0
    for key, value in state.items():
        if key.startswith("old_backbone."):  # hard copy at the end of every round: old == current
            current = state["backbone." + key[len("old_backbone."):]]
            assert torch.equal(value, current), key
            moved += int(not torch.equal(current, state["reference_backbone." + key[len("old_backbone."):]]))
    assert moved > 0  # and the policy left the frozen reference
    assert (run / "before_after.png").exists() and (run / "reward_vs_diversity.png").exists()
    events = next((run / "tb").rglob("events.out.tfevents*"))
    tags = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"train/ratio_mean", "train/clip_fraction", "train/kl", "reward/mean", "quality/diversity"} <= tags
    out = torch.load(run / "samples.pt")
    assert out["samples"].shape == (1000, 1, 8, 8) and out["rewards"].shape == (1000,)
    expected = DigitClassifierReward(target=TARGET, mode="prob")(out["samples"])
    torch.testing.assert_close(out["rewards"], expected, rtol=0, atol=1e-6)
