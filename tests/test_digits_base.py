"""The shipped digits base (ConvVelocity + flow matching) and the ConvVelocity module itself."""

import pytest
import torch

from lightning_nft.data import load_digit_images
from lightning_nft.models import (
    ConvVelocity,
    load_pretrained_digit_classifier,
    load_pretrained_digits_flow,
    read_safetensors,
    save_module_safetensors,
)
from lightning_nft.samplers import EulerSolver, time_grid


@pytest.fixture(scope="module")
def base_samples():
    flow = load_pretrained_digits_flow()
    x0 = torch.randn(500, 1, 8, 8, generator=torch.Generator().manual_seed(1234))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is faster than two on a shared 2-core machine
    try:
        return EulerSolver().sample(flow, x0, time_grid(20)).samples
    finally:
        torch.set_num_threads(threads)


def test_shipped_base_samples_look_like_digits(base_samples):
    """Issue 5: mean top-class probability >= 0.8 and every class between 4% and 18% of the samples."""
    classifier = load_pretrained_digit_classifier()
    with torch.no_grad():
        probs = torch.softmax(classifier(base_samples.clamp(-1, 1)), dim=-1)
    top, label = probs.max(dim=-1)
    fractions = torch.bincount(label, minlength=10).float() / len(label)
    assert top.mean() >= 0.8, top.mean()
    assert fractions.min() >= 0.04 and fractions.max() <= 0.18, fractions
    # and they are in the data range: the background sits at -1 and a few pixels overshoot slightly
    # (shipped base, 20 Euler steps: max |x| 1.25, 99.5% of pixels within 1.1)
    assert base_samples.abs().max() < 2.0
    assert (base_samples.abs() <= 1.1).float().mean() > 0.98


def test_shipped_base_does_not_copy_the_training_digits(base_samples):
    """Median distance to the nearest training digit is comparable to that of held-out real digits."""
    train, _ = load_digit_images(split="train")
    val, _ = load_digit_images(split="val")
    nn_samples = torch.cdist(base_samples.flatten(1), train.flatten(1)).min(dim=1).values.median()
    nn_val = torch.cdist(val.flatten(1), train.flatten(1)).min(dim=1).values.median()
    assert nn_samples > 0.75 * nn_val, (nn_samples, nn_val)


def test_shipped_base_metadata_rebuilds_the_architecture():
    tensors, metadata = read_safetensors(asset="digits_flow.safetensors")
    flow = load_pretrained_digits_flow()
    assert metadata["class"] == "ConvVelocity"
    assert sum(v.numel() for v in tensors.values()) == sum(p.numel() for p in flow.parameters())
    assert sum(p.numel() for p in flow.parameters()) < 1_000_000
    assert all(p.requires_grad for p in flow.parameters())  # ready to fine-tune
    assert all(not p.requires_grad for p in load_pretrained_digits_flow(freeze=True).parameters())


def test_conv_velocity_shapes_time_forms_and_zero_init():
    torch.manual_seed(0)
    net = ConvVelocity(channels=(8, 16, 16), emb_dim=32)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(net(x, torch.rand(3)), torch.zeros_like(x))  # zero-initialised output conv
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    v_float = net(x, 0.3)
    torch.testing.assert_close(net(x, torch.tensor(0.3)), v_float)
    torch.testing.assert_close(net(x, torch.full((3,), 0.3)), v_float)
    assert not torch.allclose(net(x, 0.7), v_float)  # depends on t
    # per-sample: the output of sample i does not depend on the other samples (GroupNorm, no BatchNorm)
    torch.testing.assert_close(net(x[:1], 0.3), v_float[:1])


def test_conv_velocity_class_conditional_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = ConvVelocity(channels=(8, 16), emb_dim=32, num_classes=10)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    labels = torch.tensor([0, 3, 3, 9])
    v = net(x, t, labels)
    assert not torch.allclose(v, net(x, t, (labels + 1) % 10))
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((4,), 10)))  # None = null label
    path = save_module_safetensors(net, str(tmp_path / "flow.safetensors"))
    again = load_pretrained_digits_flow(path)
    assert again.num_classes == 10 and again.channels == [8, 16]
    torch.testing.assert_close(again(x, t, labels), v)
