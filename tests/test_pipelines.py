"""SD3, Flux and SD1.5 through our adapters reproduce diffusers' own pipelines (tiny random pipelines, CPU).

Each tiny pipeline is built from the real diffusers/transformers classes, saved with ``save_pretrained``
and loaded back by path, once by diffusers (the reference) and once by ``build_pipeline`` (ours). A whole
sampling run on our side (prompt encoder, family grid, start state, ``guided_velocity`` + ``EulerSolver``)
must give the latents of the diffusers pipeline (``output_type="latent"``) from the same initial noise.
Cases (prompts, resolution, steps, guidance scales) are drawn from fixed seeds.
"""

import random

import diffusers
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from lightning_nft.diffusers_backbones import flux_image_ids, pack_latents, unpack_latents
from lightning_nft.guidance import guided_velocity
from lightning_nft.pipelines import build_pipeline
from lightning_nft.pipelines.tiny import save_tiny_pipeline
from lightning_nft.samplers import EulerSolver

WORDS = ["a", "red", "cat", "two", "dogs", "on", "the", "moon", "7", "blue", "cube", "house", "tree", "0"]
TOL = dict(rtol=1e-5, atol=1e-4)  # float32, a few steps of a tiny transformer / UNet (latents of size ~1-20)
FAMILIES = {"sd3": ("sd3", {}), "flux-dev": ("flux", {"guidance_embeds": True}),
            "flux-schnell": ("flux", {"guidance_embeds": False}), "sd15": ("sd15", {})}


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    diffusers_logging.disable_progress_bar()
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(level)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folder of each tiny pipeline, saved once per module."""
    root = tmp_path_factory.mktemp("pipelines")
    return {name: save_tiny_pipeline(fam, str(root / name), **kw) for name, (fam, kw) in FAMILIES.items()}


def reference_pipeline(path: str, family: str):
    """diffusers' pipeline from ``path``; SD1.5 samples with DDIM ending at abar = 1 (our grid's last step)."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    if family == "sd15":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    return pipe


def draw_case(seed: int) -> dict:
    rng = random.Random(seed)
    return {
        "prompts": [" ".join(rng.choices(WORDS, k=rng.randint(1, 5))) for _ in range(rng.randint(2, 3))],
        "size": rng.choice([(32, 32), (32, 48), (48, 32)]),
        "n_steps": rng.randint(2, 5),
        "cfg": rng.uniform(2.0, 6.0),
        "distilled": rng.uniform(1.0, 5.0),
        "noise_seed": rng.randint(0, 10_000),
    }


def ours_sample(parts, case, cfg: float, backbone=None):
    """Latents from our side: prompt encoder, the family's grid and start state, CFG in one 2B pass, Euler."""
    height, width = case["size"]
    shape = parts.latent_shape(height, width)
    n = len(case["prompts"])
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(case["noise_seed"]))
    times = parts.time_grid(case["n_steps"], height, width)
    cond = parts.prompt_encoder(case["prompts"])
    uncond = parts.prompt_encoder([parts.negative_prompt] * n)
    backbone = parts.backbone if backbone is None else backbone

    def velocity(x, t, c):
        return guided_velocity(backbone, x, t, c, uncond, cfg)

    return EulerSolver().sample(velocity, parts.initial_state(noise, times), times.float(), cond).samples, noise


def theirs_sample(pipe, family: str, case, noise, cfg: float, distilled: float = 3.5):
    """Latents from diffusers' pipeline with the same noise (Flux: packed in, unpacked out)."""
    height, width = case["size"]
    kwargs = dict(prompt=case["prompts"], height=height, width=width, num_inference_steps=case["n_steps"],
                  output_type="latent")
    if family == "flux":
        n = len(case["prompts"])
        kwargs.update(latents=pack_latents(noise), guidance_scale=distilled, true_cfg_scale=cfg,
                      negative_prompt=[""] * n if cfg > 1 else None)
    else:
        kwargs.update(latents=noise, guidance_scale=cfg)
        if family == "sd15":
            kwargs["eta"] = 0.0
    with torch.no_grad():
        out = pipe(**kwargs).images
    return unpack_latents(out, *noise.shape[2:]) if family == "flux" else out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_whole_sampling_run_matches_the_diffusers_pipeline_with_and_without_cfg(saved, name):
    family = FAMILIES[name][0]
    parts = build_pipeline(saved[name])
    assert parts.family == family
    pipe = reference_pipeline(saved[name], family)
    for seed in (0, 1):
        case = draw_case(seed)
        if family == "flux":
            parts.backbone.guidance_scale = case["distilled"]
        plain, noise = ours_sample(parts, case, 1.0)
        guided, _ = ours_sample(parts, case, case["cfg"])
        torch.testing.assert_close(plain, theirs_sample(pipe, family, case, noise, 1.0, case["distilled"]), **TOL)
        torch.testing.assert_close(guided, theirs_sample(pipe, family, case, noise, case["cfg"], case["distilled"]), **TOL)
        assert (guided - plain).abs().max() > 100 * TOL["atol"], "guidance must change these samples"


def test_flux_distilled_guidance_is_an_input_of_the_transformer(saved):
    """FLUX.1-dev: the distilled guidance value changes the samples, and each value matches FluxPipeline's."""
    parts = build_pipeline(saved["flux-dev"])
    pipe = reference_pipeline(saved["flux-dev"], "flux")
    case = draw_case(7)
    outs = []
    for g in (1.5, 4.5):
        parts.backbone.guidance_scale = g
        ours, noise = ours_sample(parts, case, 1.0)
        torch.testing.assert_close(ours, theirs_sample(pipe, "flux", case, noise, 1.0, g), **TOL)
        outs.append(ours)
    assert (outs[0] - outs[1]).abs().max() > 1e-2
    parts.backbone.guidance_scale = None
    with pytest.raises(ValueError, match="guidance"):
        ours_sample(parts, case, 1.0)


def test_flux_packing_and_ids_are_diffusers_own():
    g = torch.Generator().manual_seed(0)
    for c, h, w in [(4, 8, 8), (16, 6, 10), (1, 2, 4)]:
        x = torch.randn(3, c, h, w, generator=g)
        packed = pack_latents(x)
        torch.testing.assert_close(packed, diffusers.FluxPipeline._pack_latents(x, 3, c, h, w), rtol=0, atol=0)
        torch.testing.assert_close(unpack_latents(packed, h, w), x, rtol=0, atol=0)
        ids = diffusers.FluxPipeline._prepare_latent_image_ids(3, h // 2, w // 2, "cpu", torch.float32)
        torch.testing.assert_close(flux_image_ids(h, w), ids, rtol=0, atol=0)


def test_sd15_sampling_starts_at_the_schedulers_noisiest_level():
    """SD1.5's betas: abar_999 = prod(1 - beta_k) ~ 0.0047, i.e. t ~ 0.064; the grid starts there, not at 0."""
    import math

    from lightning_nft.diffusers_backbones import EpsilonUNetVelocity
    from lightning_nft.pipelines.sd15 import sd15_time_grid

    betas = [(math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * k / 999) ** 2 for k in range(1000)]
    abar = math.prod(1 - b for b in betas)
    t_max_noise = math.sqrt(abar) / (math.sqrt(abar) + math.sqrt(1 - abar))
    assert 0.06 < t_max_noise < 0.07
    for spacing, n in (("trailing", 10), ("trailing", 3), ("linspace", 7)):
        sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        timestep_spacing=spacing)
        assert EpsilonUNetVelocity(torch.nn.Identity(), sched.alphas_cumprod).t_start == pytest.approx(t_max_noise, rel=1e-6)
        times = sd15_time_grid(sched, n)
        assert times.shape == (n + 1,) and float(times[-1]) == 1.0
        assert float(times[0]) == pytest.approx(t_max_noise, rel=1e-6)
        assert bool((times[1:] > times[:-1]).all())


def test_lora_export_loads_into_a_fresh_pipeline_and_gives_the_fine_tuned_model_back(saved, tmp_path):
    from lightning_nft.lora import OLD_ADAPTER, add_lora, adapters_disabled
    from lightning_nft.pipelines.export import save_diffusers_lora

    for i, name in enumerate(["sd3", "flux-dev", "sd15"]):
        family = FAMILIES[name][0]
        parts = build_pipeline(saved[name])
        add_lora(parts.backbone, parts.lora_targets, rank=4, alpha=8.0)  # alpha / r = 2: lost without metadata
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():  # "fine-tuned": random adapters; the old adapter differs from the trained one
            for n, p in parts.backbone.named_parameters():
                if ".lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.3 if f".{OLD_ADAPTER}." not in n else 0.05))
        save_diffusers_lora(parts.backbone, str(tmp_path / name), family)
        fresh = reference_pipeline(saved[name], family)
        fresh.load_lora_weights(str(tmp_path / name))
        loaded = build_pipeline(fresh)  # our adapter around the fresh pipeline's LoRA-loaded denoiser
        case = draw_case(20 + i)
        h, w = case["size"]
        x = torch.randn(3, *parts.latent_shape(h, w), generator=g)
        t, cond = torch.rand(3, generator=g), parts.prompt_encoder(["a cat", "7", "blue moon"])
        with torch.no_grad():
            mine, theirs = parts.backbone(x, t, cond), loaded.backbone(x, t, cond)
            with adapters_disabled(parts.backbone):
                base = parts.backbone(x, t, cond)
        assert torch.equal(mine, theirs), f"{name}: max diff {(mine - theirs).abs().max():.3g}"
        assert (mine - base).abs().max() > 0.05
        ours, noise = ours_sample(parts, case, 1.0)
        torch.testing.assert_close(ours, theirs_sample(fresh, family, case, noise, 1.0), **TOL)


def test_a_lora_export_without_alpha_metadata_is_wrong(saved, tmp_path):
    """Why the metadata is written: diffusers then assumes alpha = r and scales the update by 1, not alpha / r."""
    from lightning_nft.lora import add_lora
    from lightning_nft.pipelines.export import lora_state_dict

    parts = build_pipeline(saved["sd3"])
    add_lora(parts.backbone, parts.lora_targets, rank=4, alpha=8.0)
    with torch.no_grad():
        for n, p in parts.backbone.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    tensors, meta = lora_state_dict(parts.backbone.model)
    assert meta["r"] == 4 and meta["lora_alpha"] == 8.0
    diffusers.StableDiffusion3Pipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=tensors)
    fresh = reference_pipeline(saved["sd3"], "sd3")
    fresh.load_lora_weights(str(tmp_path))
    x, t = torch.randn(2, *parts.latent_shape(32)), torch.tensor([0.2, 0.7])
    cond = parts.prompt_encoder(["a", "b"])
    with torch.no_grad():
        assert (parts.backbone(x, t, cond) - build_pipeline(fresh).backbone(x, t, cond)).abs().max() > 1e-2


def test_clear_errors_for_unsupported_pipelines_resolutions_and_lora_targets(saved, tmp_path):
    from lightning_nft.lora import add_lora

    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline", "_diffusers_version": "0.42.1"}')
    with pytest.raises(ValueError, match="KandinskyPipeline"):
        build_pipeline(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        build_pipeline(str(empty))
    with pytest.raises(ValueError, match="not a flux pipeline"):
        build_pipeline(saved["sd3"], family="flux")
    parts = build_pipeline(saved["sd3"])  # VAE factor 2 x patch 2
    assert parts.latent_shape(32, 48) == (4, 16, 24)
    with pytest.raises(ValueError, match=r"width=50 is not a positive multiple of 4"):
        parts.latent_shape(32, 50)
    with pytest.raises(ValueError, match="height=30"):
        parts.time_grid(4, 30, 32)
    sd15 = build_pipeline(saved["sd15"])  # VAE factor 2 x the UNet's one down-sampling
    assert sd15.latent_shape(36) == (4, 18, 18)
    with pytest.raises(ValueError, match="height=34"):
        sd15.latent_shape(34)
    with pytest.raises(ValueError, match=r"\['attn.to_qq'\]"):
        add_lora(parts.backbone, ["attn.to_q", "attn.to_qq"])


def test_bf16_weights_with_fp32_trainable_lora_and_frozen_text_encoders(saved):
    from lightning_nft.lora import add_lora

    ref = build_pipeline(saved["sd3"])
    parts = build_pipeline(saved["sd3"], dtype="bfloat16")
    add_lora(parts.backbone, parts.lora_targets, rank=4, alpha=4.0)
    params = dict(parts.backbone.named_parameters())
    assert all(p.dtype == torch.float32 for n, p in params.items() if ".lora_" in n)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for n, p in params.items() if ".lora_" not in n)
    assert all(not p.requires_grad for enc in parts.prompt_encoder.text_encoders() for p in enc.parameters())
    assert len(parts.prompt_encoder.text_encoders()) == 3
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in parts.decoder.parameters())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *parts.latent_shape(32), generator=g), torch.rand(2, generator=g)
    prompts = ["a red cube", "two dogs"]
    v = parts.backbone(x, t, parts.prompt_encoder(prompts))
    assert v.dtype == torch.float32
    with torch.no_grad():
        v32 = ref.backbone(x, t, ref.prompt_encoder(prompts))
    assert (v.detach() - v32).norm() < 0.05 * v32.norm()  # bf16 rounding, not a different model
    v.square().mean().backward()
    grads = [p.grad for n, p in params.items() if ".lora_B.default." in n]  # B starts at 0: A gets no gradient yet
    assert grads and all(gr is not None and gr.dtype == torch.float32 for gr in grads)
    # (the last block's text-stream output projection feeds nothing, so not every gradient is non-zero)
    assert sum(bool(gr.abs().sum() > 0) for gr in grads) >= len(grads) // 2


def test_gradient_checkpointing_on_request_gives_the_same_gradients(saved):
    g = torch.Generator().manual_seed(0)
    grads = []
    for ckpt in (False, True):
        parts = build_pipeline(saved["sd3"], gradient_checkpointing=ckpt)
        assert parts.backbone.model.is_gradient_checkpointing == ckpt
        parts.backbone.train()
        x, t = torch.randn(2, *parts.latent_shape(32), generator=g.manual_seed(0)), torch.tensor([0.3, 0.8])
        parts.backbone(x, t, parts.prompt_encoder(["a", "b"])).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in parts.backbone.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_decode_step_is_the_pipelines_own_decode(saved):
    """Our decoder (scaling, shift, Flux unpacked) equals diffusers' output_type='pt' decode, mapped to [-1, 1]."""
    for i, name in enumerate(["sd3", "flux-dev", "sd15"]):
        family = FAMILIES[name][0]
        parts = build_pipeline(saved[name])
        offloaded = build_pipeline(saved[name], offload_vae=True)
        assert list(offloaded.decoder.parameters()) == [] and len(list(parts.decoder.parameters())) > 0
        pipe = reference_pipeline(saved[name], family)
        case = draw_case(30 + i)
        latents, noise = ours_sample(parts, case, 1.0)
        with torch.no_grad():
            pixels = parts.decoder(latents)
            torch.testing.assert_close(offloaded.decoder(latents), pixels, rtol=0, atol=0)
            kwargs = dict(prompt=case["prompts"], height=case["size"][0], width=case["size"][1],
                          num_inference_steps=case["n_steps"], output_type="pt", guidance_scale=1.0)
            kwargs["latents"] = pack_latents(noise) if family == "flux" else noise
            if family == "flux":
                kwargs["guidance_scale"] = 3.5
            if family == "sd15":
                kwargs["eta"] = 0.0
            images = pipe(**kwargs).images
        assert pixels.shape == (len(case["prompts"]), 3, *case["size"])
        torch.testing.assert_close(pixels * 0.5 + 0.5, images, rtol=1e-4, atol=1e-4)
