"""PipelineFineTuningModule on tiny random pipelines: its rollouts are diffusers' samples, its checkpoints are small."""

import diffusers
import lightning.pytorch as pl
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from lightning_nft.diffusers_backbones import pack_latents, unpack_latents
from lightning_nft.objectives import NFTObjective
from lightning_nft.pipelines import PipelineFineTuningModule
from lightning_nft.pipelines.tiny import save_tiny_pipeline
from lightning_nft.rewards import JpegCompressibility

PROMPTS = ["a red cat", "two dogs on the moon", "7", "blue cube"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    diffusers_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("pipelines")
    return {fam: save_tiny_pipeline(fam, str(root / fam)) for fam in ("sd3", "flux", "sd15")}


def make(path, **kw):
    defaults = dict(reward=JpegCompressibility(), objective=NFTObjective(beta=1.0), prompts=PROMPTS, resolution=32,
                    groups_per_round=2, group_size=2, steps_per_round=2, n_sample_steps=3,
                    lora={"rank": 4, "alpha": 8.0})
    return PipelineFineTuningModule(path, **{**defaults, **kw})


@pytest.mark.parametrize("family,cfg", [("sd3", 4.5), ("flux", 2.5), ("sd15", 3.0)])
def test_module_rollouts_are_the_diffusers_pipelines_samples(saved, family, cfg):
    """Before training (LoRA B = 0) the module's guided rollout equals diffusers' pipeline from the same noise."""
    module = make(saved[family], guidance_scale=cfg)
    g = torch.Generator().manual_seed(5)
    cond = module.sample_conditions(3, g)
    prompts = [m["prompt"] for m in cond.metadata]
    noise = torch.randn(3, *module.sample_shape, generator=g)
    ours = module.sample(noise, cond, policy="old").samples
    pipe = diffusers.DiffusionPipeline.from_pretrained(saved[family])
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=prompts, height=32, width=32, num_inference_steps=3, output_type="latent")
    if family == "flux":
        kwargs.update(latents=pack_latents(noise), true_cfg_scale=cfg, negative_prompt=[""] * 3, guidance_scale=3.5)
    elif family == "sd15":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
        kwargs.update(latents=noise, guidance_scale=cfg, eta=0.0)
    else:
        kwargs.update(latents=noise, guidance_scale=cfg)
    with torch.no_grad():
        theirs = pipe(**kwargs).images
    if family == "flux":
        theirs = unpack_latents(theirs, *noise.shape[2:])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    # each distinct prompt was encoded once, and rewards see decoded images
    assert set(module._embeddings) == set(prompts) | {""}
    rewards = module.compute_rewards(ours, cond)
    assert rewards.shape == (3,) and torch.isfinite(rewards).all()


def _fit(module, root, epochs, ckpt_path=None):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root),
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True)])
    trainer.fit(module, ckpt_path=ckpt_path)
    return torch.load(root / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)


def test_lora_checkpoints_hold_the_adapters_and_resume(saved, tmp_path):
    module = make(saved["sd3"])
    ckpt = _fit(module, tmp_path, 1)
    keys = set(ckpt["state_dict"])
    assert keys == {k for k in module.state_dict() if ".lora_" in k}
    assert any(".old." in k for k in keys) and ckpt["optimizer_states"]
    saved_size = sum(v.numel() for v in ckpt["state_dict"].values())
    assert saved_size < 0.5 * sum(v.numel() for v in module.state_dict().values())
    # a new module built from the same pipeline takes the adapters back; resuming runs on
    fresh = make(saved["sd3"])
    missing, unexpected = fresh.load_state_dict(ckpt["state_dict"], strict=False)
    assert not unexpected and not any(".lora_" in k for k in missing)
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(fresh.state_dict()[k], v)
    resumed = _fit(make(saved["sd3"]), tmp_path, 2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed["epoch"] == 1 and set(resumed["state_dict"]) == keys


def test_full_fine_tuning_keeps_only_the_copies_it_needs(saved, tmp_path):
    """Without a KL anchor no reference copy exists; with one it is the pipeline's weights; checkpoints hold neither."""
    from lightning_nft.callbacks import KLAnchor

    module = make(saved["sd15"], lora=None)
    assert module.reference_backbone is None and module.old_backbone is not None
    ckpt = _fit(module, tmp_path / "plain", 1)
    assert module.reference_backbone is None
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"backbone", "old_backbone"}  # not the VAE or reward
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(module.state_dict()[k], v)

    anchored = make(saved["sd15"], lora=None)
    initial = {k: v.clone() for k, v in anchored.backbone.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path / "kl"),
                         callbacks=[KLAnchor(weight=0.1), pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "kl" / "ckpt"),
                                                                                        save_last=True)])
    trainer.fit(anchored)
    reference = anchored.reference_backbone.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in initial.items())
    assert any(not torch.equal(anchored.backbone.state_dict()[k], v) for k, v in initial.items())
    kl_ckpt = torch.load(tmp_path / "kl" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert {k.split(".")[0] for k in kl_ckpt["state_dict"]} == {"backbone", "old_backbone"}


def test_grpo_trains_the_guided_policies(saved):
    """With an objective that keeps log-probs and CFG, the trained field is the guided one (the sampled transition)."""
    from lightning_nft.guidance import guided_velocity
    from lightning_nft.objectives.grpo import GRPOObjective

    module = make(saved["sd3"], objective=GRPOObjective(kl_weight=0.1), guidance_scale=3.0)
    plain = make(saved["sd3"], guidance_scale=3.0)  # NFT: trains the unguided field
    assert module.trains_guided and not plain.trains_guided
    g = torch.Generator().manual_seed(0)
    cond = module.sample_conditions(2, g)
    x, t = torch.randn(2, *module.sample_shape, generator=g), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        expected = guided_velocity(plain.velocity, x, t, cond, plain.unconditional(2), 3.0)
        torch.testing.assert_close(module.velocity(x, t, cond), expected)
        torch.testing.assert_close(module.reference_velocity(x, t, cond), expected)
        assert (plain.velocity(x, t, cond) - expected).abs().max() > 1e-3


def test_sd15_warns_when_training_times_go_below_its_start_time(saved):
    from lightning_nft.timesteps import TimeSampler

    with pytest.warns(UserWarning, match="noisiest level"):
        make(saved["sd15"], objective=NFTObjective(time_sampler=TimeSampler("uniform")))
    module = make(saved["sd15"], objective=NFTObjective(time_source="grid"))
    assert 0.0 < float(module.sample_times()[0]) < 0.5
