"""Checkpoints every N rounds in the run folder, the last k kept, ``last.ckpt`` a link to the newest."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

LARGE_MODEL_PARAMETERS = 100_000_000
LARGE_MODEL_EVERY_N_ROUNDS = 10


def auto_every_n_rounds(n_parameters: int) -> int:
    """Rounds between checkpoints when ``every_n_rounds="auto"``: 1, or 10 for backbones of 100M parameters or more.

    A checkpoint of a fully fine-tuned model holds the trained weights, the old and reference copies and
    two Adam moments (about 5x the backbone); for a model of 100M+ parameters that is gigabytes a round.
    """
    return LARGE_MODEL_EVERY_N_ROUNDS if n_parameters >= LARGE_MODEL_PARAMETERS else 1


class RoundCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for online rounds: the newest ``keep_last`` checkpoints, one every ``every_n_rounds``.

    * ``dirpath`` defaults to ``<trainer.default_root_dir>/checkpoints``, read when the fit starts (so it
      follows ``--trainer.default_root_dir`` on the command line, and never a logger's version folder);
    * files are ``round-0007.ckpt`` (the round index, from 0), written every ``every_n_rounds`` rounds and
      after the final round; only the newest ``keep_last`` are kept (``-1``: all);
    * ``last.ckpt`` is a symbolic link to the newest file (one full write per checkpoint, not two), replaced
      atomically (a new link renamed over the old one); on filesystems without links it is a copy;
    * ``every_n_rounds="auto"`` is 1 for backbones under 100M parameters and 10 above
      (:func:`auto_every_n_rounds`).

    Pair it with ``lightning_nft.checkpoint_io.AtomicCheckpointIO`` so that no checkpoint is ever half written.
    """

    def __init__(self, dirpath: Optional[str] = None, keep_last: int = 2,
                 every_n_rounds: Union[int, Literal["auto"]] = "auto", filename: str = "round-{epoch:04d}",
                 **kwargs: Any) -> None:
        if keep_last == 0 or keep_last < -1:
            raise ValueError(f"keep_last must be positive or -1 (keep all), got {keep_last}")
        if every_n_rounds != "auto" and int(every_n_rounds) < 1:
            raise ValueError(f"every_n_rounds must be a positive integer or 'auto', got {every_n_rounds!r}")
        super().__init__(dirpath=dirpath, filename=filename, monitor="step", mode="max", save_top_k=keep_last,
                         save_last="link", every_n_epochs=1 if every_n_rounds == "auto" else int(every_n_rounds),
                         auto_insert_metric_name=False, enable_version_counter=False, **kwargs)
        self.every_n_rounds = every_n_rounds

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(str(trainer.default_root_dir), "checkpoints")
        if self.every_n_rounds == "auto":
            backbone = getattr(pl_module, "backbone", pl_module)
            self._every_n_epochs = auto_every_n_rounds(sum(p.numel() for p in backbone.parameters()))
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self._every_n_epochs
        final = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if final:
            self._every_n_epochs = 1  # the final round is always saved
        try:
            super().on_train_epoch_end(trainer, pl_module)
        finally:
            self._every_n_epochs = every

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            tmp = os.path.join(os.path.dirname(linkpath), f".{os.path.basename(linkpath)}.link-{os.getpid()}")
            try:
                if os.path.lexists(tmp):
                    os.remove(tmp)
                os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
                os.replace(tmp, linkpath)  # atomic: readers see the old link or the new one
            except OSError:  # no symbolic links here (e.g. Windows without the privilege): copy
                ModelCheckpoint._link_checkpoint(trainer, filepath, linkpath)
                return
        trainer.strategy.barrier()
