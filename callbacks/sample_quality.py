"""Reward, diversity and FID of fixed-noise samples every round, and a reward-vs-diversity plot."""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_nft.callbacks._sampling import SAMPLING_MEMBERS, fixed_noise_samples, run_directory
from lightning_nft.data.references import ReferenceSet
from lightning_nft.metrics import DiversityMetric, FrechetDistanceMetric, mean_pairwise_distance
from lightning_nft.policy import check_contract


class SampleQuality(Callback):
    """Track what fine-tuning trades: reward against diversity (and FID against real data).

    Before training and after every ``every_n_rounds`` rounds, ``n_samples`` samples of the
    current policy (fixed noise; split across ranks) are scored with the module's reward and
    embedded with ``feature_extractor``; the callback logs ``quality/reward``,
    ``quality/diversity`` (mean pairwise feature distance, :class:`DiversityMetric`) and, when a
    ``reference`` image set is given, ``quality/fid`` (clean-fid's Fréchet distance on those
    features) and ``quality/reference_diversity`` (the same diversity measured on the reference).
    At the end of fit it writes ``reward_vs_diversity.png`` to the run directory; :attr:`history`
    keeps one dict per evaluation (round ``-1`` is the model before training); it is checkpointed, so a
    resumed run continues the history (and its plot) instead of starting a new one.

    Args:
        feature_extractor: ``nn.Module`` mapping samples ``(B, *S)`` to features ``(B, D)``.
        reference: a :class:`~lightning_nft.data.references.ReferenceSet` returning real samples
            ``(M, *S)`` (e.g. the real digits of the target class, ``DigitsReference(label=3)``).
    """

    contract_members = (*SAMPLING_MEMBERS, "compute_rewards")

    def __init__(self, feature_extractor: nn.Module, reference: Optional[ReferenceSet] = None,
                 n_samples: int = 256, seed: int = 1234, every_n_rounds: int = 1,
                 plot_filename: Optional[str] = "reward_vs_diversity.png", output_dir: Optional[str] = None) -> None:
        self.feature_extractor = feature_extractor.eval().requires_grad_(False)
        self.reference = reference
        self.n_samples, self.seed, self.every_n_rounds = n_samples, seed, max(1, every_n_rounds)
        self.plot_filename, self.output_dir = plot_filename, output_dir
        self.diversity = DiversityMetric()
        self.fid = FrechetDistanceMetric()
        self.reference_diversity: Optional[float] = None
        self.history: list[dict[str, float]] = []
        self._restored = False

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]
        self._restored = True

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_contract(pl_module, self)
        self.feature_extractor.to(pl_module.device)
        self.diversity.to(pl_module.device)
        self.fid.to(pl_module.device)
        if self.reference is not None and self.fid.reference_features is None:
            with torch.no_grad():
                ref = self.reference().to(pl_module.device)
                feats = self.feature_extractor(ref)
            self.fid.set_reference(feats)
            self.reference_diversity = float(mean_pairwise_distance(feats))

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        n_local = max(2, self.n_samples // trainer.world_size)
        samples, cond = fixed_noise_samples(pl_module, n_local, self.seed + 7 * trainer.global_rank)
        rewards = pl_module.compute_rewards(samples, cond)
        feats = self.feature_extractor(samples)
        self.diversity.update(feats)
        self.fid.update(feats)
        reward_mean = pl_module.all_gather(rewards.mean()).float().mean()
        row = {"round": float(trainer.current_epoch if self.history else -1), "reward": float(reward_mean),
               "diversity": float(self.diversity.compute())}
        if self.fid.reference_features is not None:
            row["fid"] = float(self.fid.compute())
            row["reference_diversity"] = float(self.reference_diversity)
        self.diversity.reset()
        self.fid.reset()
        self.history.append(row)
        return row

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restored, self._restored = self._restored, False
        if restored and self.history:
            return  # resumed: the history (with the model before training) came from the checkpoint
        self.history = []
        self.evaluate(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last = trainer.current_epoch + 1 == trainer.max_epochs
        if (trainer.current_epoch + 1) % self.every_n_rounds and not last:
            return
        row = self.evaluate(trainer, pl_module)
        for k, v in row.items():
            if k != "round":
                pl_module.log(f"quality/{k}", v, rank_zero_only=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.plot_filename and self.history:
            out_dir = self.output_dir or run_directory(trainer)
            os.makedirs(out_dir, exist_ok=True)
            plot_reward_vs_diversity(self.history, os.path.join(out_dir, self.plot_filename),
                                     reference_diversity=self.reference_diversity)


def plot_reward_vs_diversity(history: list[dict[str, Any]], path: str, reference_diversity: Optional[float] = None) -> None:
    """Scatter-and-line plot of ``reward`` against ``diversity`` over rounds, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    div = [h["diversity"] for h in history]
    rew = [h["reward"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot(div, rew, "-o", color="tab:blue", markersize=4)
    ax.annotate("start", (div[0], rew[0]), textcoords="offset points", xytext=(5, -10))
    ax.annotate("end", (div[-1], rew[-1]), textcoords="offset points", xytext=(5, 5))
    if reference_diversity is not None:
        ax.axvline(reference_diversity, color="tab:green", linestyle="--", label="real data diversity")
        ax.axvline(0.6 * reference_diversity, color="tab:red", linestyle=":", label="0.6 x real")
        ax.legend(loc="lower left")
    ax.set_xlabel("diversity (mean pairwise feature distance)")
    ax.set_ylabel("mean reward")
    ax.set_title("reward vs diversity over rounds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
