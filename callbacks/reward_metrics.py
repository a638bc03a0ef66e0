"""Reward and optimality-probability statistics of each round, synced across ranks (torchmetrics)."""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override
from torchmetrics import MeanMetric, Metric

from lightning_nft.advantages import tied_group_fraction
from lightning_nft.policy import check_contract


class SampleStatistics(Metric):
    """Mean, std and quantiles of a stream of scalars; the values are a ``cat`` state, so ranks sync."""

    full_state_update = False

    def __init__(self, quantiles: Sequence[float] = (0.1, 0.5, 0.9), **kwargs) -> None:
        super().__init__(**kwargs)
        self.quantiles = tuple(float(q) for q in quantiles)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, values: torch.Tensor) -> None:
        self.values.append(values.detach().reshape(-1).float())

    def compute(self) -> dict[str, torch.Tensor]:
        v = self.values if isinstance(self.values, torch.Tensor) else torch.cat(self.values)
        out = {"mean": v.mean(), "std": v.std(unbiased=False)}
        if v.numel():
            q = torch.quantile(v, torch.tensor(self.quantiles, device=v.device, dtype=v.dtype))
            out.update({f"q{int(round(100 * p)):02d}": q[i] for i, p in enumerate(self.quantiles)})
        return out


class RewardMetrics(Callback):
    """Log ``reward/{mean,std,qNN}`` and ``r/{...}`` over every rollout of a round (all ranks).

    Also ``reward/tied_groups``: the fraction of the round's groups (the ``K`` samples of one prompt)
    whose rewards all tie, i.e. have zero spread and give group-centred objectives no signal
    (:func:`~lightning_nft.advantages.tied_group_fraction`; DiffusionNFT logs this as a zero-std ratio).

    The reward mean is also shown in the progress bar. Reads the module's ``rollouts`` (the round's
    :class:`~lightning_nft.rollouts.RolloutBatch`) once per ``rollout_version``. :attr:`history`
    (one dict of the logged values per round) is checkpointed and continues on resume.
    """

    contract_members = ("rollouts", "rollout_version")

    def __init__(self, quantiles: Sequence[float] = (0.1, 0.5, 0.9), prog_bar: bool = True) -> None:
        self.reward_stats = SampleStatistics(quantiles)
        self.r_stats = SampleStatistics(quantiles)
        self.tied_groups = MeanMetric()
        self.prog_bar = prog_bar
        self._seen_version = -1
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_contract(pl_module, self)
        self.reward_stats.to(pl_module.device)
        self.r_stats.to(pl_module.device)
        self.tied_groups.to(pl_module.device)

    def _update(self, pl_module: pl.LightningModule) -> None:
        version = pl_module.rollout_version
        if pl_module.rollouts is not None and version != self._seen_version:
            self._seen_version = version
            self.reward_stats.update(pl_module.rollouts.rewards)
            self.r_stats.update(pl_module.rollouts.r)
            group = pl_module.rollouts.group
            n_groups = int(torch.unique(group).numel())
            self.tied_groups.update(tied_group_fraction(pl_module.rollouts.rewards, group).float(), weight=n_groups)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._update(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update(pl_module)
        if not self.reward_stats.update_called:
            return
        reward, r = self.reward_stats.compute(), self.r_stats.compute()
        row = {}
        for prefix, stats in (("reward", reward), ("r", r)):
            for k, v in stats.items():
                name = f"{prefix}/{k}"
                row[name] = float(v)
                pl_module.log(name, v, prog_bar=self.prog_bar and name == "reward/mean")
        tied = self.tied_groups.compute()
        row["reward/tied_groups"] = float(tied)
        pl_module.log("reward/tied_groups", tied)
        self.history.append(row)
        self.reward_stats.reset()
        self.r_stats.reset()
        self.tied_groups.reset()
