"""Tiny random-weight pipelines of each supported family, built from the real diffusers/transformers classes.

For tests, smoke runs (``benchmarks/t2i_step.py --tiny``) and examples: nothing is downloaded. Each
builder returns a complete diffusers pipeline (``StableDiffusion3Pipeline``, ``FluxPipeline``,
``StableDiffusionPipeline``) whose every component is a few thousand parameters: CLIP and T5 text
encoders with a character-level tokenizer built here, a one- or two-block VAE, a one-layer denoiser.
``save_pretrained`` them into a folder and load them back by path to exercise the real loading code.
The tokenizers are built from in-memory vocabularies, which needs transformers >= 5 (the ``test`` extra).

The weights are random (seeded), so the images are noise; what these pipelines test is that our
adapters, grids, prompt encoders and decode steps reproduce diffusers' own computation.
"""

from __future__ import annotations

import string

import torch

# one character per token (CLIP marks word ends with ``</w>``); lower-case letters, digits, a few signs
_CHARS = string.ascii_lowercase + string.digits + ",.-'"


def _clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -2.0) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip_text_encoder(seed: int, hidden: int, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
                            num_attention_heads=2, num_hidden_layers=2, vocab_size=2 + 2 * len(_CHARS),
                            max_position_embeddings=77, hidden_act="gelu", projection_dim=projection or hidden)
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def _t5_text_encoder(seed: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=4 + len(_CHARS), d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _vae(seed: int, latent_channels: int, blocks: int, scaling_factor: float, shift_factor: float | None):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw = dict(shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False) if shift_factor is not None else {}
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,) * blocks,
                         down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                         scaling_factor=scaling_factor, **kw).eval()


def tiny_sd3_pipeline(seed: int = 0):
    """``StableDiffusion3Pipeline``: SD3 transformer (patch 2), two CLIP encoders with projection, a T5, VAE x2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                                        pooled_projection_dim=32, out_channels=4).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1, latent_channels=4, blocks=2, scaling_factor=1.5035, shift_factor=0.0609),
        text_encoder=_clip_text_encoder(seed + 2, hidden=16, projection=16),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_clip_text_encoder(seed + 3, hidden=16, projection=16),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_text_encoder(seed + 4, d_model=32),
        tokenizer_3=_t5_tokenizer(),
    )


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """``FluxPipeline``: Flux transformer on 2x2-packed latents (``guidance_embeds``: FLUX.1-dev style), CLIP + T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 4, 8)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5,
                                                max_shift=1.15, use_dynamic_shifting=True, shift=3.0)
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae(seed + 1, latent_channels=4, blocks=2, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip_text_encoder(seed + 2, hidden=16, projection=None),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_text_encoder(seed + 3, d_model=32),
        tokenizer_2=_t5_tokenizer(),
    )


def tiny_sd15_pipeline(seed: int = 0):
    """``StableDiffusionPipeline``: epsilon-prediction UNet with cross-attention, one CLIP encoder, VAE x2, DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4).eval()
    # SD1.5's own scheduler settings (scaled-linear betas, "leading" spacing with offset 1)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionPipeline(
        unet=unet, scheduler=scheduler,
        vae=_vae(seed + 1, latent_channels=4, blocks=2, scaling_factor=0.18215, shift_factor=None),
        text_encoder=_clip_text_encoder(seed + 2, hidden=16, projection=None), tokenizer=_clip_tokenizer(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


TINY_PIPELINES = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "sd15": tiny_sd15_pipeline}


def save_tiny_pipeline(family: str, directory: str, seed: int = 0, **kwargs) -> str:
    """Build the tiny pipeline of ``family`` (``sd3``, ``flux``, ``sd15``) and ``save_pretrained`` it to ``directory``."""
    if family not in TINY_PIPELINES:
        raise ValueError(f"no tiny pipeline for family {family!r}; choose one of {sorted(TINY_PIPELINES)}")
    TINY_PIPELINES[family](seed=seed, **kwargs).save_pretrained(directory)
    return directory
