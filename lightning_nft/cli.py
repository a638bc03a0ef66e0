"""The ``lightning-nft`` command (also ``python -m lightning_nft``): a ``LightningCLI``.

Subcommands ``fit``, ``validate``, ``test``, ``predict``; any ``LightningModule`` and
``LightningDataModule`` is chosen in YAML by ``class_path``/``init_args``. The omegaconf parser
mode is on, so configs may use ``${...}`` interpolation, e.g.::

    lightning-nft fit --config configs/gmm_pretrain.yaml
    lightning-nft predict --config configs/gmm_pretrain.yaml --ckpt_path runs/gmm_pretrain/.../last.ckpt
"""

from __future__ import annotations

from typing import Optional, Sequence

from lightning.pytorch.cli import LightningCLI


def main(args: Optional[Sequence[str]] = None) -> None:
    """Run the CLI on ``args`` (``sys.argv[1:]`` by default)."""
    LightningCLI(
        model_class=None,
        datamodule_class=None,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
