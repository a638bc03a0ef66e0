"""Plug-in callbacks for the online fine-tuning loop (installed as ``lightning_nft.callbacks``).

Each works with any module that implements the policy interface (``lightning_nft.policy``) and
the few methods of :class:`lightning_nft.module.RewardFineTuningModule` it names.
"""

from lightning_nft.callbacks.ema_old_policy import EMAOldPolicy
from lightning_nft.callbacks.image_grid import ImageGrid
from lightning_nft.callbacks.kl_anchor import KLAnchor
from lightning_nft.callbacks.online_rollout import OnlineRollout
from lightning_nft.callbacks.reward_metrics import RewardMetrics, SampleStatistics
from lightning_nft.callbacks.sample_quality import SampleQuality
from lightning_nft.callbacks.sample_writer import SampleWriter

__all__ = [
    "EMAOldPolicy",
    "ImageGrid",
    "KLAnchor",
    "OnlineRollout",
    "RewardMetrics",
    "SampleQuality",
    "SampleStatistics",
    "SampleWriter",
]
