"""Write what ``predict`` returns (samples, rewards...) to one tensor file."""

from __future__ import annotations

import os
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class SampleWriter(BasePredictionWriter):
    """Concatenate the dicts of tensors returned by ``predict_step`` and ``torch.save`` them.

    Writes ``output_path`` (a ``.pt`` file holding ``{"samples": (N, *S), ...}``); under several
    processes each rank writes ``<stem>.rank<k>.pt``. Parent folders are created.
    """

    def __init__(self, output_path: str = "samples.pt") -> None:
        super().__init__(write_interval="epoch")
        self.output_path = output_path

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        if predictions and isinstance(predictions[0], list):  # several predict dataloaders
            predictions = [p for group in predictions for p in group]
        if not predictions:
            return
        keys = predictions[0].keys()
        out = {k: torch.cat([p[k].detach().cpu() for p in predictions]) for k in keys}
        path = self.output_path
        if trainer.world_size > 1:
            stem, ext = os.path.splitext(path)
            path = f"{stem}.rank{trainer.global_rank}{ext or '.pt'}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(out, path)
