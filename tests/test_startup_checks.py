"""Start-up checks (``lightning_nft.startup_checks``) and the sample shape recorded in shipped assets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_nft.advantages import RewardNormalizer
from lightning_nft.backbones import MLPVelocity
from lightning_nft.models import load_pretrained_digits_flow, save_module_safetensors
from lightning_nft.models.conv_velocity import ConvVelocity
from lightning_nft.models.export import load_module_safetensors
from lightning_nft.rewards import DigitClassifierReward, LinearReward
from lightning_nft.startup_checks import (
    check_declared_sample_shapes,
    check_forward_and_reward,
    check_group_size,
    check_learning_rates,
)


def test_shipped_assets_record_their_sample_shape_and_a_mismatch_is_refused():
    flow, reward = load_pretrained_digits_flow(), DigitClassifierReward(target=3)
    check_declared_sample_shapes([1, 8, 8], backbone=flow, reward=reward)
    with pytest.raises(ValueError, match=r"sample_shape is \(1, 16, 16\), but the backbone ConvVelocity was trained on "
                       r"samples of shape \(1, 8, 8\).*set sample_shape: \[1, 8, 8\]"):
        check_declared_sample_shapes([1, 16, 16], backbone=flow, reward=reward)
    with pytest.raises(ValueError, match="the reward DigitClassifierReward"):
        check_declared_sample_shapes([1, 16, 16], reward=reward)
    # the convolutional flow itself runs on 16x16 (only the recorded shape catches that); the reward fails,
    # and the start-up call names it
    x = torch.randn(2, 1, 16, 16)
    assert flow(x, torch.full((2,), 0.5)).shape == x.shape
    assert check_forward_and_reward(flow, reward, [1, 8, 8]).shape == (2,)
    with pytest.raises(RuntimeError, match=r"the reward DigitClassifierReward failed on samples of shape \(2, 1, 16, 16\)"):
        check_forward_and_reward(flow, reward, [1, 16, 16], reward_name="DigitClassifierReward")


def test_saved_sample_shape_round_trips(tmp_path):
    net = ConvVelocity(in_channels=1, channels=[8, 8], num_res_blocks=1, emb_dim=16)
    path = save_module_safetensors(net, str(tmp_path / "f.safetensors"), sample_shape=[1, 12, 12])
    assert load_module_safetensors(ConvVelocity, path=path).sample_shape == (1, 12, 12)
    plain = save_module_safetensors(net, str(tmp_path / "g.safetensors"))
    assert not hasattr(load_module_safetensors(ConvVelocity, path=plain), "sample_shape")


class _WrongShape(nn.Module):
    def forward(self, x, t, cond=None):
        return x.reshape(x.shape[0], -1)[:, :1]


class _BrokenReward(nn.Module):
    def forward(self, samples, cond=None):
        raise KeyError("prompt")


class _PairReward(nn.Module):
    def forward(self, samples, cond=None):
        return samples.reshape(2, -1).sum(-1, keepdim=True).expand(2, samples.shape[0] // 2).contiguous()


def test_one_forward_and_one_reward_call_name_what_failed():
    mlp, linear = MLPVelocity(2, 8, 1), LinearReward([1.0, 0.0])
    rewards = check_forward_and_reward(mlp, linear, [2], backbone_name="MLPVelocity", reward_name="LinearReward")
    assert rewards.shape == (2,)
    with pytest.raises(RuntimeError, match=r"the MLPVelocity failed on a batch of shape \(2, 3\) \(sample_shape \(3,\)\)"):
        check_forward_and_reward(mlp, linear, [3], backbone_name="MLPVelocity")
    with pytest.raises(ValueError, match=r"_WrongShape returned a velocity of shape \(2, 1\) for samples of shape \(2, 1, 4, 4\)"):
        check_forward_and_reward(_WrongShape(), linear, [1, 4, 4], backbone_name="_WrongShape")
    with pytest.raises(RuntimeError, match=r"the reward _BrokenReward failed.*KeyError"):
        check_forward_and_reward(mlp, _BrokenReward(), [2], reward_name="_BrokenReward")
    with pytest.raises(ValueError, match=r"_PairReward returned a reward of shape \(2, 2\) for 4 samples"):
        check_forward_and_reward(mlp, _PairReward(), [2], reward_name="_PairReward", n=4)


def test_group_size_one_with_group_normalisation_is_refused_naming_alternatives():
    for mode in ("group", "binary"):
        with pytest.raises(ValueError, match=r"group_size is 1.*group_size >= 2.*'minmax'"):
            check_group_size(1, RewardNormalizer(mode=mode))
        check_group_size(2, RewardNormalizer(mode=mode))
    check_group_size(1, RewardNormalizer(mode="minmax"))


def test_zero_learning_rate_is_refused():
    p = nn.Parameter(torch.zeros(3))
    check_learning_rates([torch.optim.AdamW([p], lr=1e-4)])
    with pytest.raises(ValueError, match=r"learning rate of SGD \(optimizer 0, parameter group 1\) is 0\.0"):
        check_learning_rates([torch.optim.SGD([{"params": [p]}, {"params": [nn.Parameter(torch.ones(1))], "lr": 0.0}], lr=0.1)])
