"""The ``lightning-nft`` command (also ``python -m lightning_nft``): a ``LightningCLI``.

Subcommands ``fit``, ``validate``, ``test``, ``predict``. The model is
:class:`~lightning_nft.module.RewardFineTuningModule` unless a config names another ``LightningModule``
by ``class_path`` (subclass mode; e.g. the pretraining module); ``--model.help RewardFineTuningModule``
lists its arguments. Optimiser and schedule are the module's ``optimizer``/``lr_scheduler`` arguments, or
LightningCLI's ``--optimizer``/``--lr_scheduler`` (which replace the module's). Several ``--config``
files are merged in order (a base plus small overrides). The omegaconf parser mode is on, so configs may
use ``${...}`` interpolation, e.g.::

    lightning-nft fit --config configs/gmm_pretrain.yaml
    lightning-nft fit --config configs/gmm_nft.yaml --config configs/gmm_nft_kl.yaml
    lightning-nft fit --config configs/gmm_nft.yaml --optimizer SGD --optimizer.lr 0.01
    lightning-nft predict --config configs/gmm_pretrain.yaml --ckpt_path runs/gmm_pretrain/checkpoints/last.ckpt

One option is ours: ``torch_threads`` (``--torch_threads N`` or a top-level YAML key) sets
``torch.set_num_threads`` before anything is built. The small CPU models of the shipped configs
run fastest on one thread; more threads than free cores slow them down many times over.
"""

from __future__ import annotations

from typing import Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_nft.module import RewardFineTuningModule

DEFAULT_MODEL = f"{RewardFineTuningModule.__module__}.{RewardFineTuningModule.__qualname__}"


class NFTLightningCLI(LightningCLI):
    """``LightningCLI`` with :class:`RewardFineTuningModule` as the default model, plus ``torch_threads``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}})
        parser.add_argument("--torch_threads", type=Optional[int], default=None,
                            help="torch.set_num_threads before building anything (default: torch's choice)")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = config.get("torch_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"torch_threads must be positive, got {threads}")
            torch.set_num_threads(int(threads))


def main(args: Optional[Sequence[str]] = None) -> None:
    """Run the CLI on ``args`` (``sys.argv[1:]`` by default)."""
    NFTLightningCLI(
        model_class=pl.LightningModule,
        datamodule_class=None,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
