"""Plug-in callbacks for the online fine-tuning loop (installed as ``lightning_nft.callbacks``).

Each works with any ``LightningModule`` that has the members of the online fine-tuning contract
(:class:`lightning_nft.policy.OnlineFineTuning`) it lists in ``contract_members``; it checks them in
``setup`` and raises one error naming every missing member. :class:`lightning_nft.policy.OnlineFineTuningMixin`
implements the whole contract for a user's module (``tutorials/02_callbacks_in_your_trainer.py``).
"""

from lightning_nft.callbacks.ema_old_policy import EMAOldPolicy
from lightning_nft.callbacks.image_grid import ImageGrid
from lightning_nft.callbacks.kl_anchor import KLAnchor
from lightning_nft.callbacks.online_rollout import OnlineRollout
from lightning_nft.callbacks.reward_components import RewardComponentMetrics
from lightning_nft.callbacks.reward_failure import CheckpointOnRewardFailure
from lightning_nft.callbacks.reward_metrics import RewardMetrics, SampleStatistics
from lightning_nft.callbacks.round_averaging import RoundAveraging
from lightning_nft.callbacks.round_checkpoint import RoundCheckpoint
from lightning_nft.callbacks.sample_quality import SampleQuality
from lightning_nft.callbacks.sample_writer import SampleWriter

__all__ = [
    "CheckpointOnRewardFailure",
    "EMAOldPolicy",
    "ImageGrid",
    "KLAnchor",
    "OnlineRollout",
    "RewardComponentMetrics",
    "RewardMetrics",
    "RoundAveraging",
    "RoundCheckpoint",
    "SampleQuality",
    "SampleStatistics",
    "SampleWriter",
]
