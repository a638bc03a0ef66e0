"""Decode steps: identity for pixel models, diffusers AutoencoderKL with scaling and shift factors."""

import pytest
import torch

from lightning_nft.decoders import AutoencoderKLDecoder, IdentityDecoder, decode_samples


def _tiny_vae(seed, scaling_factor, shift_factor):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                         norm_num_groups=4, layers_per_block=1, sample_size=16, scaling_factor=scaling_factor,
                         shift_factor=shift_factor).eval()


@pytest.mark.parametrize("seed,scaling,shift", [(0, 0.18215, None), (1, 1.5305, 0.0609), (2, 0.3611, 0.1159)])
def test_autoencoder_decode_uses_the_config_factors_and_loads_by_path(tmp_path, seed, scaling, shift):
    vae = _tiny_vae(seed, scaling, shift)
    vae.save_pretrained(tmp_path / "vae")
    decoder = AutoencoderKLDecoder(path=str(tmp_path), subfolder="vae", clamp=False)
    assert decoder.scaling_factor == pytest.approx(scaling) and decoder.shift_factor == pytest.approx(shift or 0.0)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = vae.decode(z / scaling + (shift or 0.0)).sample  # diffusers pipelines' decode
        got = decoder(z)
    assert got.shape == (3, 3, 16, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    clamped = AutoencoderKLDecoder(vae)(z)
    assert clamped.min() >= -1 and clamped.max() <= 1
    torch.testing.assert_close(clamped, expected.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    # encode inverts the normalisation: VAE.encode mean, shifted and scaled
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(decoder.encode(x), (vae.encode(x).latent_dist.mean - (shift or 0.0)) * scaling)


def test_decoders_are_frozen_eval_and_differentiable_in_their_input():
    decoder = AutoencoderKLDecoder(_tiny_vae(0, 0.5, 0.1), scaling_factor=2.0, shift_factor=-0.2)
    assert decoder.scaling_factor == 2.0 and decoder.shift_factor == -0.2  # explicit values win
    decoder.train()
    assert not decoder.training and not decoder.vae.training
    assert not any(p.requires_grad for p in decoder.parameters())
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(decoder(z).square().sum(), z)
    assert grad.abs().sum() > 0
    x = torch.randn(4, 1, 8, 8)
    assert IdentityDecoder()(x) is x and decode_samples(None, x) is x
    with pytest.raises(ValueError, match="needs a vae or a path"):
        AutoencoderKLDecoder()


def test_image_grid_refuses_latents_and_names_the_decoder():
    from lightning_nft.callbacks.image_grid import image_grid

    with pytest.raises(ValueError, match=r"got shape \(2, 16, 8, 8\); a latent model needs a decoder"):
        image_grid(torch.zeros(2, 16, 8, 8))
    assert image_grid(torch.zeros(2, 3, 8, 8), nrow=2, scale=1, padding=0).shape == (3, 8, 16)
