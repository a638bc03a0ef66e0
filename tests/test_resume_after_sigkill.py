"""Bit-exact resume after a SIGKILL, through the real ``lightning-nft fit`` command.

Three real processes run a short digits DiffusionNFT job (the shipped 8x8 flow, the shipped classifier's
probability of a 3, KL anchor, EMA ramp, image grid and sample-quality callbacks):

* A runs 4 rounds uninterrupted;
* B runs the same command and is killed with ``SIGKILL`` as soon as its checkpoint after round 1 exists
  (checkpoints are written to a temporary file and renamed, so existence means complete);
* C resumes B's run folder from ``checkpoints/last.ckpt`` to 4 rounds.

C must end exactly where A ends: identical weights (max abs difference 0 on CPU) of the trained, old
and reference policies, identical logged rewards for every round, and a byte-identical
``before_after.png`` (the "before" half is the model before round 0, not the resumed one).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CONFIG = """
seed_everything: 0
torch_threads: 1
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 4
  default_root_dir: {root}
  enable_model_summary: false
  enable_progress_bar: false
  log_every_n_steps: 1
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args:
      save_dir: {root}
      name: tb
  plugins:
    - class_path: lightning_nft.checkpoint_io.AtomicCheckpointIO
  callbacks:
    - class_path: lightning_nft.callbacks.EMAOldPolicy
      init_args:
        schedule: ramp
        ramp_rate: 0.2
        max_decay: 0.9
    - class_path: lightning_nft.callbacks.KLAnchor
      init_args:
        weight: 0.03
        drift_samples: 16
    - class_path: lightning_nft.callbacks.RewardMetrics
    - class_path: lightning_nft.callbacks.ImageGrid
      init_args:
        n_images: 8
        every_n_rounds: 2
        scale: 1
    - class_path: lightning_nft.callbacks.SampleQuality
      init_args:
        feature_extractor:
          class_path: lightning_nft.models.DigitFeatures
        n_samples: 8
        every_n_rounds: 1
        plot_filename: null
    - class_path: lightning_nft.callbacks.RoundCheckpoint
      init_args:
        keep_last: 2
        every_n_rounds: 1
model:
  class_path: lightning_nft.module.RewardFineTuningModule
  init_args:
    backbone:
      class_path: lightning_nft.models.load_pretrained_digits_flow
    reward:
      class_path: lightning_nft.rewards.DigitClassifierReward
      init_args:
        target: 3
    objective:
      class_path: lightning_nft.objectives.NFTObjective
      init_args:
        beta: 1.0
    sample_shape: [1, 8, 8]
    groups_per_round: 2
    group_size: 8
    steps_per_round: 3
    n_sample_steps: 4
    optimizer:
      class_path: torch.optim.AdamW
      init_args:
        lr: 1.0e-3
"""

ROUNDS = 4


def _command(config: Path, *extra: str) -> list[str]:
    return ["lightning-nft", "fit", "--config", str(config), *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _write_config(tmp_path: Path, name: str) -> tuple[Path, Path]:
    root = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(CONFIG.format(root=root))
    return config, root


def _scalars(root: Path, tag: str) -> dict[int, float]:
    """``{step: value}`` of ``tag`` over every TensorBoard version in the run folder (later versions win)."""
    out: dict[int, float] = {}
    for version in sorted(glob.glob(str(root / "tb" / "version_*")), key=lambda p: int(p.rsplit("_", 1)[1])):
        for events in sorted(glob.glob(os.path.join(version, "events.out.tfevents*"))):
            acc = EventAccumulator(events, size_guidance={"images": 0})
            acc.Reload()
            if tag in acc.Tags()["scalars"]:
                out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def _policies(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(("backbone.", "old_backbone.", "reference_backbone."))}


def _reward_history(checkpoint: Path) -> list:
    states = torch.load(checkpoint, map_location="cpu", weights_only=False)["callbacks"]
    (history,) = [v["history"] for k, v in states.items() if k.startswith("RewardMetrics")]
    return history


def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path):
    config_a, root_a = _write_config(tmp_path, "uninterrupted")
    config_b, root_b = _write_config(tmp_path, "killed")
    a = subprocess.Popen(_command(config_a), env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    b = subprocess.Popen(_command(config_b), env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = root_b / "checkpoints" / "round-0001.ckpt"
    deadline = time.monotonic() + 900
    while not first.exists() and b.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    b.send_signal(signal.SIGKILL)
    b.wait(timeout=60)
    assert b.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (root_b / "before_after.png").exists()  # killed before the end of fit

    resumed = subprocess.run(_command(config_b, "--ckpt_path", str(root_b / "checkpoints" / "last.ckpt")), env=_env(),
                             cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out_a, _ = a.communicate(timeout=900)
    assert a.returncode == 0, out_a[-3000:]

    final = f"round-{ROUNDS - 1:04d}.ckpt"
    pa, pb = _policies(root_a / "checkpoints" / final), _policies(root_b / "checkpoints" / final)
    assert pa.keys() == pb.keys() and any(k.startswith("old_backbone.") for k in pa)
    worst = max((pa[k].float() - pb[k].float()).abs().max().item() for k in pa)
    rewards_a, rewards_b = _scalars(root_a, "reward/mean"), _scalars(root_b, "reward/mean")
    quality_a, quality_b = _scalars(root_a, "quality/reward"), _scalars(root_b, "quality/reward")
    same_picture = (root_a / "before_after.png").read_bytes() == (root_b / "before_after.png").read_bytes()
    print(f"max |resumed - uninterrupted| over all policy weights: {worst:.3g}; "
          f"reward/mean per round {rewards_a} vs {rewards_b}; before_after.png identical: {same_picture}")
    assert worst == 0.0
    # TensorBoard buffers events, so a SIGKILL may lose the killed process's last logged rounds; every value
    # that reached disk must match, and the checkpointed RewardMetrics history must hold all rounds, equal
    assert len(rewards_a) == ROUNDS and all(rewards_a[k] == v for k, v in rewards_b.items())
    assert len(quality_a) == ROUNDS and all(quality_a[k] == v for k, v in quality_b.items())
    history = [_reward_history(root / "checkpoints" / final) for root in (root_a, root_b)]
    assert len(history[0]) == ROUNDS and history[0] == history[1]
    assert same_picture
