"""Rewards: the protocol and built-in rewards."""

from lightning_nft.rewards.base import (
    LinearReward,
    Reward,
    SigmoidReward,
    check_finite_rewards,
    require_differentiable,
)
from lightning_nft.rewards.aesthetic import LaionAesthetic
from lightning_nft.rewards.classifier import DigitClassifierReward
from lightning_nft.rewards.clip_scores import CLIPScore, PickScore
from lightning_nft.rewards.hps import HPSv2
from lightning_nft.rewards.jpeg import JpegCompressibility
from lightning_nft.rewards.multi import MultiReward
from lightning_nft.rewards.remote import RemoteReward, RewardScoringError

__all__ = [
    "Reward",
    "LinearReward",
    "SigmoidReward",
    "check_finite_rewards",
    "require_differentiable",
    "DigitClassifierReward",
    "JpegCompressibility",
    "MultiReward",
    "CLIPScore",
    "PickScore",
    "HPSv2",
    "LaionAesthetic",
    "RemoteReward",
    "RewardScoringError",
]
