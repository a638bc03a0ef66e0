"""Per-round image grids in TensorBoard and a before/after PNG at the end of fit."""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_nft.callbacks._sampling import SAMPLING_MEMBERS, fixed_noise_samples, run_directory
from lightning_nft.policy import check_contract


def image_grid(images: Tensor, nrow: int = 8, scale: int = 4, padding: int = 1) -> Tensor:
    """``images (B, C, H, W)`` in ``[-1, 1]`` -> one ``(C, H', W')`` grid in ``[0, 1]``, upscaled ``scale`` x."""
    from torchvision.utils import make_grid

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image grids need pixels (B, 1|3, H, W), got shape {tuple(images.shape)}; a latent "
                         "model needs a decoder (the module's decoder argument, lightning_nft.decoders)")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    return make_grid(x, nrow=nrow, padding=padding, pad_value=1.0)


class ImageGrid(Callback):
    """Log a grid of samples from fixed noise every ``every_n_rounds`` rounds; write ``before_after.png``.

    The same ``n_images`` noises are integrated before training (``on_fit_start``), after every
    logged round (TensorBoard ``samples`` image, when the logger is a ``TensorBoardLogger``) and at
    the end of fit; ``before_after.png`` in the run directory (``trainer.default_root_dir``, or
    ``output_dir``) shows the first grid on the left and the last on the right. Images are
    ``(B, C, H, W)`` in ``[-1, 1]``.

    The "before" grid is checkpointed: a resumed run keeps the picture of the model before round 0
    instead of drawing the resumed model as "before".
    """

    contract_members = SAMPLING_MEMBERS

    def __init__(self, n_images: int = 64, nrow: int = 8, seed: int = 4321, every_n_rounds: int = 1,
                 scale: int = 4, filename: str = "before_after.png", output_dir: Optional[str] = None) -> None:
        self.n_images, self.nrow, self.seed = n_images, nrow, seed
        self.every_n_rounds, self.scale = max(1, every_n_rounds), scale
        self.filename, self.output_dir = filename, output_dir
        self.before: Optional[Tensor] = None
        self.after: Optional[Tensor] = None
        self._restored = False

    def _grid(self, pl_module: pl.LightningModule) -> Tensor:
        samples, _ = fixed_noise_samples(pl_module, self.n_images, self.seed)
        return image_grid(samples, self.nrow, self.scale)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_contract(pl_module, self)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restored, self._restored = self._restored, False
        if trainer.is_global_zero and not (restored and self.before is not None):
            self.before = self._grid(pl_module)
            self._log(trainer, self.before, "samples/before")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and (trainer.current_epoch + 1) % self.every_n_rounds == 0:
            self._log(trainer, self._grid(pl_module), "samples/round")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from torchvision.utils import save_image

        self.after = self._grid(pl_module)
        self._log(trainer, self.after, "samples/after")
        before = self.before if self.before is not None else self.after
        gap = torch.ones(before.shape[0], before.shape[1], 4 * self.scale)
        out_dir = self.output_dir or run_directory(trainer)
        os.makedirs(out_dir, exist_ok=True)
        save_image(torch.cat([before, gap, self.after], dim=2), os.path.join(out_dir, self.filename))

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = state_dict.get("before")
        self._restored = True

    def _log(self, trainer: pl.Trainer, grid: Tensor, tag: str) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(tag, grid, global_step=trainer.global_step)
