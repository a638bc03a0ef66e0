"""Per-component reward statistics of a :class:`~lightning_nft.rewards.MultiReward`, once per round.

For every component ``k`` of the module's reward, logs ``reward_components/<k>/mean`` and
``.../std`` over the round's rollouts (all ranks: torchmetrics ``cat`` states), i.e. the raw values
before normalisation and weighting. The values come from the reward's buffer: when a new rollout
batch appears (``pl_module.rollout_version`` changes, seen at the next step), its ``N`` rows are the
last ``N`` the reward scored; samples scored by evaluation callbacks (``SampleQuality``) in between
are dropped. Optionally writes the first samples' reward metadata (e.g. the text an OCR reward read)
as TensorBoard text under ``reward_components/metadata``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_nft.callbacks.reward_metrics import SampleStatistics


def find_multi_reward(pl_module: pl.LightningModule) -> Optional[Any]:
    """The module's reward if it keeps per-component values (``pop_components``), else ``None``."""
    reward = getattr(pl_module, "reward", None)
    return reward if hasattr(reward, "pop_components") else None


class RewardComponentMetrics(Callback):
    """Log each reward component's mean and std per round (and a few samples' reward metadata).

    Args:
        metadata_rows: how many samples' metadata to write as text each round (0: none; TensorBoard only).
    """

    def __init__(self, metadata_rows: int = 0) -> None:
        self.metadata_rows = int(metadata_rows)
        self.history: list[dict[str, float]] = []
        self._stats: dict[str, SampleStatistics] = {}
        self._seen_version = -1

    def _take_rollout_rows(self, pl_module: pl.LightningModule) -> None:
        reward = find_multi_reward(pl_module)
        version = getattr(pl_module, "rollout_version", 0)
        rollouts = getattr(pl_module, "rollouts", None)
        if reward is None or rollouts is None or version == self._seen_version:
            return
        self._seen_version = version
        for name, values in reward.pop_components(last_rows=len(rollouts)).items():
            if name not in self._stats:
                self._stats[name] = SampleStatistics(quantiles=()).to(pl_module.device)
            self._stats[name].update(values.to(pl_module.device))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._take_rollout_rows(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row: dict[str, float] = {}
        for name, stats in sorted(self._stats.items()):
            if not stats.update_called:
                continue
            for key, value in stats.compute().items():
                tag = f"reward_components/{name}/{key}"
                pl_module.log(tag, value)
                row[tag] = float(value)
            stats.reset()
        if row:
            self.history.append(row)
        reward = find_multi_reward(pl_module)
        if reward is not None:
            self._log_metadata(trainer, reward)

    def _log_metadata(self, trainer: pl.Trainer, reward: Any) -> None:
        meta = getattr(reward, "last_metadata", None)
        if not self.metadata_rows or not meta or trainer.global_rank != 0:
            return
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        text = "\n\n".join(json.dumps(m, default=str) for m in meta[: self.metadata_rows])
        experiment.add_text("reward_components/metadata", text, global_step=trainer.global_step)
