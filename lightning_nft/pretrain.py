"""Plain flow-matching pretraining as a ``LightningModule`` (the base models the fine-tuners start from).

Trains ``v_theta`` with ``E || v_theta(x_t, t) - (x1 - x0) ||^2`` (``objectives.flow_matching``) and
samples with any solver of ``lightning_nft.samplers``. ``predict`` integrates seeded noise from
``t = 0`` to ``t = 1`` and returns ``{"samples": (B, *S)}`` for :class:`lightning_nft.callbacks.SampleWriter`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_nft.data.noise import NoiseDataset
from lightning_nft.objectives.flow_matching import flow_matching_inputs, flow_matching_loss
from lightning_nft.policy import sample_velocity
from lightning_nft.samplers import Solver
from lightning_nft.timesteps import TimeSampler


def split_batch(batch: Any) -> tuple[Tensor, Any]:
    """Return ``(x1, cond)`` from a tensor, a ``(x1,)``/``(x1, cond)`` sequence or a dict with ``x1``/``cond``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict):
        return batch["x1"], batch.get("cond")
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"unsupported batch type {type(batch).__name__}")


class FlowMatchingModule(pl.LightningModule):
    """Flow-matching training of ``backbone`` (any velocity field ``forward(x, t, cond)``).

    Args:
        backbone: the velocity field to train.
        sample_shape: shape of one sample, e.g. ``[2]`` or ``[1, 8, 8]`` (for ``predict``).
        lr, weight_decay: AdamW settings.
        time_sampler: training-time density (uniform by default).
        solver, n_sample_steps: how ``predict`` samples (Euler, 50 steps by default).
        predict_samples, predict_seed, predict_batch_size: the seeded noise ``predict`` integrates.
        lr_warmup_steps: linear learning-rate warm-up over this many steps (``0``: none).
    """

    def __init__(
        self,
        backbone: nn.Module,
        sample_shape: Sequence[int] = (2,),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        time_sampler: Optional[TimeSampler] = None,
        solver: Optional[Solver] = None,
        n_sample_steps: int = 50,
        predict_samples: int = 1000,
        predict_seed: int = 0,
        predict_batch_size: int = 1000,
        lr_warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "time_sampler", "solver"])
        self.backbone = backbone
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.time_sampler = time_sampler or TimeSampler()
        self.solver = solver

    @override
    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.backbone(x, t, cond)

    velocity = forward

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True)
        return loss

    def _loss(self, batch: Any) -> Tensor:
        x1, cond = split_batch(batch)
        x0 = torch.randn_like(x1)
        t = self.time_sampler(x1.shape[0], device=x1.device, dtype=x1.dtype)
        v = self.backbone(flow_matching_inputs(x0, x1, t), t, cond)
        return flow_matching_loss(v, x0, x1).mean()

    @torch.no_grad()
    def sample(self, x0: Tensor, cond: Any = None, **kwargs: Any):
        """Integrate the trained field from noise ``x0`` (see ``lightning_nft.policy.sample_velocity``)."""
        kwargs.setdefault("solver", self.solver)
        kwargs.setdefault("n_steps", self.hparams.n_sample_steps)
        return sample_velocity(self.backbone, x0, cond, **kwargs)

    @override
    def predict_dataloader(self) -> DataLoader:
        ds = NoiseDataset(self.hparams.predict_samples, self.sample_shape, self.hparams.predict_seed)
        return DataLoader(ds, batch_size=self.hparams.predict_batch_size)

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return {"samples": self.sample(batch["x0"], batch.get("cond")).samples}

    @override
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.backbone.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_warmup_steps > 0:
            warm = self.hparams.lr_warmup_steps
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt
