"""Tutorial 2: the library's callbacks on *your own* flow-matching LightningModule.

Run:  python tutorials/02_callbacks_in_your_trainer.py   (well under a minute on one CPU core)
Writes tutorials/out/02_before_after.png (ImageGrid: samples before | after fine-tuning).

You already have a flow-matching model: ``FlowMatchingUNet`` below, a ``LightningModule`` around a
diffusers ``UNet2DModel`` trained with the plain rectified-flow loss ``||v(x_t, t) - (x1 - x0)||^2``,
``x_t = (1 - t) x0 + t x1`` (noise at ``t = 0``). To fine-tune it on a reward with DiffusionNFT
("DiffusionNFT: Online Diffusion Reinforcement with Forward Process", arXiv:2509.16117) and attach
``OnlineRollout``, ``EMAOldPolicy``, ``KLAnchor``, ``RewardMetrics`` and ``ImageGrid`` to a plain
``lightning.Trainer``, the module needs the members of the contract
``lightning_nft.policy.OnlineFineTuning``. ``OnlineFineTuningMixin`` implements all of them; the glue
between the markers below is all you write:

1. put the mixin first among the bases;
2. call ``configure_online_fine_tuning`` with the network, the reward, the objective and the sample shape;
3. say how the network is called (``network_velocity``), here the UNet with times scaled to 0..1000.

The mixin keeps frozen copies of the network as old policy and reference, taken from the network's
weights when ``fit`` starts (so loading pretrained weights after building the module is fine), supplies
the training step (the objective's loss on the round's rollouts) and the one-item-per-step loader;
your ``configure_optimizers`` is kept. A module without the mixin gets one error from the first
callback's ``setup`` naming every member it lacks (:func:`lightning_nft.policy.check_contract`).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from diffusers import UNet2DModel
from torch import Tensor

from lightning_nft.callbacks import EMAOldPolicy, ImageGrid, KLAnchor, OnlineRollout, RewardMetrics
from lightning_nft.objectives import NFTObjective
from lightning_nft.policy import OnlineFineTuningMixin
from lightning_nft.rewards import LinearReward

OUT = os.path.join(os.path.dirname(__file__), "out")
SIZE = 8


def tiny_unet() -> UNet2DModel:
    """A small random ``UNet2DModel`` on ``(1, 8, 8)`` images (stands in for your pretrained one)."""
    return UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


class FlowMatchingUNet(pl.LightningModule):
    """*Your* module, unchanged: a UNet velocity field trained by rectified flow matching on images."""

    def __init__(self, unet: UNet2DModel, lr: float = 1e-3) -> None:
        super().__init__()
        self.unet = unet
        self.lr = lr

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t * 1000).sample

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x1 = batch
        x0, t = torch.randn_like(x1), torch.rand(x1.shape[0], device=x1.device)
        tb = t.reshape(-1, 1, 1, 1)
        return ((self((1 - tb) * x0 + tb * x1, t) - (x1 - x0)) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.unet.parameters(), lr=self.lr)


# --- glue: begin
class FineTunedUNet(OnlineFineTuningMixin, FlowMatchingUNet):
    def __init__(self, unet: UNet2DModel, reward: LinearReward, **settings: Any) -> None:
        super().__init__(unet)
        self.configure_online_fine_tuning(self.unet, reward, NFTObjective(beta=1.0), (1, SIZE, SIZE), **settings)

    def network_velocity(self, network: UNet2DModel, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return network(x, t * 1000).sample
# --- glue: end


def brightness() -> LinearReward:
    """Mean pixel value of a ``(1, 8, 8)`` image in ``[-1, 1]``: ``r(x) = a . x`` with ``a = 1 / 64``."""
    return LinearReward(torch.full((SIZE * SIZE,), 1.0 / (SIZE * SIZE)))


def main(output_dir: str = OUT, rounds: int = 3, pretrained: Optional[dict[str, Tensor]] = None) -> dict[str, Any]:
    """Fine-tune for ``rounds`` rounds with the five callbacks; returns the module and the callbacks.

    ``pretrained``: a UNet state dict loaded *after* the module is built (the old policy and the
    reference follow it when ``fit`` starts).
    """
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    module = FineTunedUNet(tiny_unet(), brightness(), groups_per_round=2, group_size=8, steps_per_round=2,
                           n_sample_steps=8)
    if pretrained is not None:
        module.unet.load_state_dict(pretrained)
    metrics, grid = RewardMetrics(), ImageGrid(n_images=16, nrow=4, output_dir=output_dir,
                                               filename="02_before_after.png")
    callbacks = [OnlineRollout(), EMAOldPolicy(decay=0.5), KLAnchor(weight=0.1), metrics, grid]
    trainer = pl.Trainer(max_epochs=rounds, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module)
    return {"module": module, "trainer": trainer, "metrics": metrics, "grid": grid}


if __name__ == "__main__":
    result = main()
    for i, row in enumerate(result["metrics"].history):
        print(f"round {i}: mean reward {row['reward/mean']:+.4f}")
    print("wrote", os.path.join(OUT, "02_before_after.png"))
