"""The ``lightning-nft`` command (also ``python -m lightning_nft``): a ``LightningCLI``.

Subcommands ``fit``, ``validate``, ``test``, ``predict``; any ``LightningModule`` and
``LightningDataModule`` is chosen in YAML by ``class_path``/``init_args``. The omegaconf parser
mode is on, so configs may use ``${...}`` interpolation, e.g.::

    lightning-nft fit --config configs/gmm_pretrain.yaml
    lightning-nft predict --config configs/gmm_pretrain.yaml --ckpt_path runs/gmm_pretrain/checkpoints/last.ckpt

One option is ours: ``torch_threads`` (``--torch_threads N`` or a top-level YAML key) sets
``torch.set_num_threads`` before anything is built. The small CPU models of the shipped configs
run fastest on one thread; more threads than free cores slow them down many times over.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class NFTLightningCLI(LightningCLI):
    """``LightningCLI`` plus the ``torch_threads`` option."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
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
        model_class=None,
        datamodule_class=None,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
