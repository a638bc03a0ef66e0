"""Average the policy over the last rounds of a fit (Polyak-Ruppert averaging of the round iterates)."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import WeightAveraging
from typing_extensions import override


class RoundAveraging(WeightAveraging):
    """Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` updated once per round (a Lightning
    epoch), over the last ``last_rounds`` rounds of the fit: the trained model becomes

        theta_avg = (1 / m) sum_{e = E - m}^{E - 1} theta_e,      m = min(last_rounds, E),

    with ``theta_e`` the parameters at the end of round ``e`` and ``E = trainer.max_epochs`` (B. T. Polyak and
    A. B. Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J. Control Optim. 30(4),
    1992). A fixed-point iteration whose iterates scatter around the fixed point, e.g. Adjoint Matching fitted
    once per round to fresh Monte-Carlo targets (``objectives/adjoint_matching.py``, choice 7), lands closer to
    it on average than on its last iterate.

    As for ``WeightAveraging``: rollouts keep sampling the current (not the averaged) model; checkpoints hold
    the average in ``state_dict`` (so ``predict --ckpt_path`` samples it) and the current weights for
    resuming; at the end of the fit the average is copied into the module. A fit that stops before round
    ``E - m`` keeps its last iterate.

    Args:
        last_rounds: ``m``, the number of final rounds averaged (``>= 1``; 1 keeps the last iterate).
        use_buffers: average the buffers too (``WeightAveraging``'s default).
    """

    def __init__(self, last_rounds: int = 5, use_buffers: bool = True, **kwargs: Any) -> None:
        if int(last_rounds) < 1:
            raise ValueError(f"last_rounds must be >= 1, got {last_rounds}")
        super().__init__(use_buffers=use_buffers, **kwargs)
        self.last_rounds = int(last_rounds)
        self._first_round: Optional[int] = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise ValueError("RoundAveraging averages the last rounds of the fit: set trainer.max_epochs")
            self._first_round = max(int(trainer.max_epochs) - self.last_rounds, 0)
        with warnings.catch_warnings():
            if getattr(pl_module, "device_mesh", None) is None:  # no FSDP2 mesh: configure_model shards nothing
                warnings.filterwarnings("ignore", message=".*overrides the configure_model.*")
            super().setup(trainer, pl_module, stage)

    @override
    def should_update(self, step_idx: Optional[int] = None, epoch_idx: Optional[int] = None) -> bool:
        return epoch_idx is not None and self._first_round is not None and epoch_idx >= self._first_round

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None and int(self._average_model.n_averaged) > 0:
            super().on_train_end(trainer, pl_module)
