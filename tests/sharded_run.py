"""A script, not a test: short DiffusionNFT fits on the mixture under DDP or FSDP2, 2 CPU processes (gloo).

``tests/test_fsdp.py`` launches it in a subprocess, because Lightning's launcher for both strategies
(``ddp`` and ``ModelParallelStrategy``) starts the other rank by running this same script again.
Every job of ``--jobs`` (a JSON list) is one ``trainer.fit`` in the same processes::

    {"name": "full", "kind": "full" | "lora", "rounds": 4, "checkpoint": false, "resume": null}

and writes ``<out>/<name>.pt`` on rank 0: the full (gathered) parameters of the current, old and
reference policies, and the mean reward over both ranks of every round it ran.
``"checkpoint": true`` saves ``<out>/<name>/checkpoints/last.ckpt`` every round (a folder of shards
under FSDP2); ``"resume"`` is a checkpoint to continue from.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.callbacks import EMAOldPolicy
from lightning_nft.module import LoraSettings, RewardFineTuningModule, adamw
from lightning_nft.objectives.nft import NFTObjective
from lightning_nft.rewards import LinearReward
from lightning_nft.sharding import flat_parameters, reshard


def build_module(kind: str) -> RewardFineTuningModule:
    mixture = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], 0.4)
    lora = LoraSettings(target_modules=["body.0", "body.2", "head"], rank=4) if kind == "lora" else None
    return RewardFineTuningModule(
        ResidualVelocity(mixture, MLPVelocity(2, 32, 2, zero_init=False)), LinearReward([1.0, 0.0]),
        NFTObjective(beta=1.0), sample_shape=[2], groups_per_round=2, group_size=8, steps_per_round=2, optimizer=adamw(3e-3),
        n_sample_steps=5, lora=lora,
    )


class Recorder(Callback):
    """Mean reward of every round over both ranks; the gathered policies at the end (rank 0 writes)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rewards: list[tuple[int, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        mean = pl_module.all_gather(pl_module.rollouts.rewards).float().mean()
        self.rewards.append((trainer.current_epoch, float(mean)))

    def on_train_end(self, trainer, pl_module) -> None:
        reshard(pl_module)
        old, current = pl_module.old_policy_pairs()
        reference = pl_module.reference_pairs()[0] or [p for n, p in pl_module.backbone.named_parameters()
                                                        if "lora_" not in n]
        out = {"current": flat_parameters(current), "old": flat_parameters(old),
               "reference": flat_parameters(reference), "rewards": self.rewards,
               "backbone": flat_parameters(pl_module.backbone.parameters())}
        if trainer.is_global_zero:
            torch.save(out, self.path)


def run_job(job: dict, strategy_name: str, out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    module = build_module(job["kind"])
    if strategy_name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    root = os.path.join(out_dir, job["name"])
    callbacks = [Recorder(os.path.join(out_dir, f"{job['name']}.pt")), EMAOldPolicy(decay=0.5)]
    if job.get("checkpoint"):
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), save_last=True, save_top_k=0))
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=int(job["rounds"]), logger=False,
                         enable_checkpointing=bool(job.get("checkpoint")), default_root_dir=root,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, ckpt_path=job.get("resume"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--jobs", required=True, help="JSON list of jobs (see the module docstring)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for job in json.loads(args.jobs):
        run_job(job, args.strategy, args.out)


if __name__ == "__main__":
    main()
