"""Built-in rewards: the shipped digit classifier, JPEG compressibility, the weighted multi-reward."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_nft.data import load_digit_images
from lightning_nft.models import load_pretrained_digit_classifier
from lightning_nft.rewards import (
    DigitClassifierReward,
    JpegCompressibility,
    MultiReward,
    Reward,
    check_finite_rewards,
    require_differentiable,
)


@pytest.fixture(scope="module")
def classifier():
    return load_pretrained_digit_classifier()


@pytest.fixture(scope="module")
def held_out():
    # the split the shipped classifier was trained with (configs/digits_classifier.yaml): never seen in training
    return load_digit_images(split="val", val_fraction=0.1, seed=0)


def test_shipped_classifier_accuracy_on_held_out_digits(classifier, held_out):
    x, y = held_out
    assert len(y) == 179  # round(0.1 * n_c) per class
    with torch.no_grad():
        acc = (classifier(x).argmax(-1) == y).float().mean().item()
    assert acc >= 0.95, acc
    assert all(not p.requires_grad for p in classifier.parameters()) and not classifier.training
    assert classifier.features(x[:5]).shape == (5, classifier.feature_dim)


@pytest.mark.parametrize("target", [3, 7])
def test_classifier_reward_high_on_target_low_elsewhere(classifier, held_out, target):
    x, y = held_out
    reward = DigitClassifierReward(target=target, classifier=classifier)
    with torch.no_grad():
        r = reward(x)
    assert r.shape == (len(y),)
    assert r[y == target].mean() > 0.9
    assert r[y != target].mean() < 0.05
    # independent computation: softmax of the logits, target column
    with torch.no_grad():
        expected = torch.softmax(classifier(x), dim=-1)[:, target]
    torch.testing.assert_close(r, expected, rtol=1e-5, atol=1e-6)
    log_reward = DigitClassifierReward(target=target, mode="log_prob", classifier=classifier)
    with torch.no_grad():
        torch.testing.assert_close(log_reward(x), expected.log(), rtol=1e-4, atol=1e-5)


def test_classifier_reward_gradient_matches_finite_differences(classifier, held_out):
    torch.manual_seed(0)
    x = 0.9 * held_out[0][:4].double()  # strictly inside [-1, 1]: the clamp is the identity there
    reward = DigitClassifierReward(target=3, mode="log_prob", classifier=load_pretrained_digit_classifier().double())
    assert reward.differentiable
    grad = reward.gradient(x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    direction = torch.randn_like(x) * 1e-3
    eps = 1e-4
    with torch.no_grad():
        fd = (reward(x + eps * direction) - reward(x - eps * direction)) / (2 * eps)
    torch.testing.assert_close((grad * direction).flatten(1).sum(1), fd, rtol=1e-5, atol=1e-9)
    # the reward's weights are not trained by it
    assert all(p.grad is None for p in reward.parameters())


def test_classifier_reward_stays_frozen_in_train_mode(classifier):
    reward = DigitClassifierReward(target=1, classifier=classifier)
    reward.train()
    assert not reward.classifier.training
    assert not any(p.requires_grad for p in reward.parameters())


def test_classifier_reward_targets_from_conditions(classifier, held_out):
    x, y = held_out
    reward = DigitClassifierReward(target=None, classifier=classifier)
    with torch.no_grad():
        own = reward(x, y)
        other = reward(x, (y + 1) % 10)
    assert own.mean() > 0.9 and other.mean() < 0.05
    with pytest.raises(ValueError):
        reward(x)
    with pytest.raises(ValueError):
        DigitClassifierReward(mode="logit", classifier=classifier)


def _jpeg_kb(array: np.ndarray, quality: int) -> float:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000.0


def test_jpeg_constant_compresses_better_than_noise():
    g = torch.Generator().manual_seed(0)
    constant = torch.zeros(2, 1, 16, 16)
    noise = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    reward = JpegCompressibility(quality=95)
    r = reward(torch.cat([constant, noise]))
    assert r.shape == (4,)
    assert (r[:2] > r[2:].max()).all()
    # the value is minus the size in kB of PIL's encoding of the quantised image
    u = ((noise[0, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert r[2].item() == pytest.approx(-_jpeg_kb(u, 95))
    assert r[0].item() == pytest.approx(-_jpeg_kb(np.full((16, 16), 128, np.uint8), 95))
    # RGB and upscaled images work too
    rgb = JpegCompressibility(quality=50, upscale=2)(torch.cat([torch.zeros(1, 3, 8, 8), torch.rand(1, 3, 8, 8) * 2 - 1]))
    assert rgb[0] > rgb[1]


def test_jpeg_is_black_box():
    reward = JpegCompressibility()
    assert reward.differentiable is False
    x = torch.zeros(1, 1, 8, 8, requires_grad=True)
    assert not reward(x).requires_grad
    with pytest.raises(TypeError, match="JpegCompressibility"):
        require_differentiable(reward, "Adjoint Matching")
    with pytest.raises(TypeError):
        reward.gradient(x)


def test_multi_reward_weighted_sum_and_components(classifier, held_out):
    x = held_out[0][:6]
    digit = DigitClassifierReward(target=3, classifier=classifier)
    jpeg = JpegCompressibility()
    multi = MultiReward({"digit": digit, "jpeg": jpeg}, weights={"digit": 2.0, "jpeg": 0.5})
    with torch.no_grad():
        total = multi(x)
        expected = 2.0 * digit(x) + 0.5 * jpeg(x)
    torch.testing.assert_close(total, expected)
    assert set(multi.last_components) == {"digit", "jpeg"}
    torch.testing.assert_close(multi.last_components["digit"], digit(x).detach())
    torch.testing.assert_close(multi.last_components["jpeg"], jpeg(x))
    assert multi.differentiable is False
    with pytest.raises(TypeError, match="MultiReward"):
        require_differentiable(multi)
    with pytest.raises(ValueError):
        MultiReward({"digit": digit}, weights={"dgit": 1.0})


def test_multi_reward_of_differentiable_parts_is_differentiable(classifier, held_out):
    x = 0.9 * held_out[0][:3]
    a = DigitClassifierReward(target=3, classifier=classifier)
    b = DigitClassifierReward(target=5, mode="log_prob", classifier=classifier)
    multi = MultiReward({"p3": a, "logp5": b}, weights={"p3": 1.5})  # logp5 weight defaults to 1
    assert multi.differentiable
    torch.testing.assert_close(multi.gradient(x), 1.5 * a.gradient(x) + b.gradient(x), rtol=1e-5, atol=1e-6)


class _NanAtTwo(Reward):
    """A reward that is NaN on sample 2 (as a broken remote reward might be)."""

    def forward(self, samples, cond=None):
        r = samples.flatten(1).mean(1)
        r[2] = float("nan")
        return r


def test_non_finite_rewards_are_named():
    r = _NanAtTwo()(torch.zeros(4, 1, 8, 8))
    with pytest.raises(ValueError, match="sample 2"):
        check_finite_rewards(r)
    check_finite_rewards(torch.zeros(4))
