"""Save a checkpoint when scoring fails for good, so a resumed run loses at most the round in progress.

A remote scorer that stays down past its retries raises
:class:`~lightning_nft.rewards.remote.RewardScoringError` inside the rollout collection (round ``e``'s
start, before any gradient step of the round). Lightning then calls every callback's
``on_exception`` before tearing the trainer down; this callback writes a checkpoint there. The
checkpoint holds the state after round ``e - 1`` (policy, old policy, optimiser, callbacks) and the
loop position "round ``e`` started, no step done", so ``trainer.fit(..., ckpt_path=...)`` runs round
``e`` again from its start: the same rollouts (their noise is seeded by ``(seed, rank, round)``) are
sampled and scored once into round ``e``; rounds before it are not scored again.

A failure in the middle of a round (a multi-step sub-round) is handled the same way: the resume
restarts Lightning's epoch mid-way, from the saved step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_nft.rewards.remote import RewardScoringError


class CheckpointOnRewardFailure(Callback):
    """On a :class:`RewardScoringError` (or another listed exception), save ``dirpath/filename`` first.

    Args:
        dirpath: folder of the checkpoint (default: the trainer's ``default_root_dir``/checkpoints).
        filename: file name; ``{round}`` is replaced by the round that failed.
        exceptions: exception types that trigger the save.
    """

    def __init__(self, dirpath: Optional[Union[str, Path]] = None, filename: str = "reward-failure-round{round}.ckpt",
                 exceptions: tuple[type[BaseException], ...] = (RewardScoringError,)) -> None:
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename = filename
        self.exceptions = tuple(exceptions)
        self.saved_path: Optional[Path] = None
        self._saving = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, self.exceptions) or trainer.state.fn != "fit":
            return
        folder = self.dirpath or Path(trainer.default_root_dir) / "checkpoints"
        path = folder / self.filename.format(round=trainer.current_epoch)
        self._saving = True
        try:
            trainer.save_checkpoint(path)
        finally:
            self._saving = False
        self.saved_path = path
        rank_zero_warn(f"scoring failed in round {trainer.current_epoch} ({exception}); saved {path}: "
                       f"resume with trainer.fit(..., ckpt_path={str(path)!r}) (CLI: --ckpt_path {path})")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._saving:
            rewind_unstarted_round(checkpoint)


def rewind_unstarted_round(checkpoint: dict[str, Any]) -> bool:
    """Make a checkpoint written in ``on_train_epoch_start`` of round ``e`` read as the end of round ``e - 1``.

    Lightning counts an epoch "ready" before ``on_train_epoch_start`` and "started" after it. Saved in
    between, the fit loop's epoch counters read ``ready = e + 1, started = processed = completed = e``
    while the batch counters still describe round ``e - 1``; resuming from that, Lightning takes round
    ``e`` as already under way and runs only what it believes is left of it (one step instead of
    ``steps_per_round`` with Lightning 2.6). The state is exactly that of the end of round ``e - 1``,
    whose counters are ``ready = started = processed = e, completed = e - 1``: this writes those
    (round 0: all zero, a fresh start). Returns whether the counters were rewound; a checkpoint saved
    at another moment (e.g. mid-round) is left alone.
    """
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    progress = loops.get("epoch_progress")
    if not progress:
        return False
    total, current = progress["total"], progress["current"]
    e = total["completed"]
    if not (total["ready"] == e + 1 and total["started"] == e and total["processed"] == e):
        return False
    for counters in (total, current):
        done = counters["completed"]
        if done == 0:
            counters.update(ready=0, started=0, processed=0, completed=0)
        else:
            counters.update(ready=done, started=done, processed=done, completed=done - 1)
    checkpoint["epoch"] = max(e - 1, 0)
    return True
