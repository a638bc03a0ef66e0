"""Objectives, one file per method: pure loss functions on tensors at the top, the objective class below.

Choose one in YAML as ``model.init_args.objective`` (``class_path`` + ``init_args``).
"""

from lightning_nft.objectives.adjoint_matching import AdjointMatchingObjective
from lightning_nft.objectives.base import Objective, Policies
from lightning_nft.objectives.flow_matching import flow_matching_inputs, flow_matching_loss
from lightning_nft.objectives.grpo import GRPOObjective
from lightning_nft.objectives.nft import NFTObjective, kl_anchor_penalty, nft_loss, nft_pointwise_optimum

__all__ = [
    "Objective",
    "Policies",
    "NFTObjective",
    "AdjointMatchingObjective",
    "GRPOObjective",
    "nft_loss",
    "kl_anchor_penalty",
    "nft_pointwise_optimum",
    "flow_matching_loss",
    "flow_matching_inputs",
]
