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
    lightning-nft serve-reward --config reward_server.yaml     # lightning_nft.reward_server

One option is ours: ``torch_threads`` (``--torch_threads N`` or a top-level YAML key) sets
``torch.set_num_threads`` before anything is built. The small CPU models of the shipped configs
run fastest on one thread; more threads than free cores slow them down many times over.

Run folders (``lightning_nft.run_folder``): ``${...}`` is resolved on the final configuration
(jsonargparse's ``omegaconf+`` mode), so ``--trainer.default_root_dir runs/other`` moves checkpoints,
logs and pictures too. ``fit`` refuses a non-empty run folder unless it resumes (``--ckpt_path``) or
``--overwrite true`` is given (which deletes the folder's contents first); ``predict`` without
``--ckpt_path`` warns and writes ``samples.untrained.pt`` instead of the run's ``samples.pt``.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_nft.run_folder import predict_output_path, prepare_run_folder

from lightning_nft.module import RewardFineTuningModule

DEFAULT_MODEL = f"{RewardFineTuningModule.__module__}.{RewardFineTuningModule.__qualname__}"


class NFTLightningCLI(LightningCLI):
    """``LightningCLI`` with :class:`RewardFineTuningModule` as the default model, plus ``torch_threads``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}})
        parser.add_argument("--torch_threads", type=Optional[int], default=None,
                            help="torch.set_num_threads before building anything (default: torch's choice)")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: delete the contents of a non-empty run folder (trainer.default_root_dir) first")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = config.get("torch_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"torch_threads must be positive, got {threads}")
            torch.set_num_threads(int(threads))
        if self.subcommand == "fit" and rank_zero_only.rank == 0:  # other ranks re-run this CLI: check once
            root = config.get("trainer", {}).get("default_root_dir") or "."
            prepare_run_folder(root, resuming=config.get("ckpt_path") is not None,
                               overwrite=bool(config.get("overwrite")))

    def before_predict(self) -> None:
        from lightning_nft.callbacks import SampleWriter

        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        writers = [cb for cb in self.trainer.callbacks if isinstance(cb, SampleWriter)]
        for writer in writers:
            writer.output_path = predict_output_path(writer.output_path, ckpt_path)
        if not writers:
            predict_output_path("predictions", ckpt_path)  # the warning alone


def main(args: Optional[Sequence[str]] = None) -> None:
    """Run the CLI on ``args`` (``sys.argv[1:]`` by default); ``serve-reward ...`` starts a reward server."""
    argv = list(args) if args is not None else sys.argv[1:]
    if argv and argv[0] == "serve-reward":  # not a LightningCLI subcommand: dispatch before it parses
        from lightning_nft.reward_server import main as serve_reward

        serve_reward(argv[1:])
        return
    import jsonargparse

    # omegaconf+ resolves ${...} after every override; the configs' absolute ${trainer...} paths then need
    # to be read relative to the subcommand (fit.trainer...)
    jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    NFTLightningCLI(
        model_class=pl.LightningModule,
        datamodule_class=None,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
