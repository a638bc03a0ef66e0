"""Text-to-image fine-tuning through the module: guidance where chosen, decode before rewards and grids,
GRPO's guided log-probabilities, per-prompt normalisation, and held-out evaluation with ``validate``."""

from __future__ import annotations

import json
import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_nft.conditions import network_input
from lightning_nft.models import DigitsPromptConditions, DigitsT2IVelocity
from lightning_nft.models.digits_t2i import ATTENTION_PROJECTIONS
from lightning_nft.module import LoraSettings, RewardFineTuningModule, adamw
from lightning_nft.objectives import NFTObjective
from lightning_nft.rewards import DigitPromptAlignment
from lightning_nft.samplers import EulerSolver


def _prompt_files(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps({"prompt": p, "digit": d}) + "\n"
                             for p, d in [("a handwritten three", 3), ("the digit 7", 7), ("a 0", 0)]))
    held.write_text("".join(json.dumps({"prompt": p, "digit": d}) + "\n"
                            for p, d in [("the digit three", 3), ("a handwritten 7", 7)]))
    return str(train), str(held)


def _module(tmp_path, objective=None, guidance="rollouts", scale=2.0, **kw):
    train, held = _prompt_files(tmp_path)
    settings = dict(sample_shape=[1, 8, 8], groups_per_round=2, group_size=4, steps_per_round=2, n_sample_steps=4,
                    guidance_scale=scale, guidance=guidance, eval_images_per_prompt=2,
                    lora=LoraSettings(ATTENTION_PROJECTIONS, rank=4, alpha=4), optimizer=adamw(3e-3))
    settings.update(kw)
    return RewardFineTuningModule(DigitsT2IVelocity(), DigitPromptAlignment(), objective or NFTObjective(beta=0.5),
                                  condition_sampler=DigitsPromptConditions(train, held), **settings)


def _trainer(tmp_path, **kw):
    settings = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    settings.update(kw)
    return pl.Trainer(**settings)


def _independent_samples(module, x0, cond, scale):
    """Euler with the base transformer, two separate calls per step for the guided field."""
    base = DigitsT2IVelocity()
    uncond = module.condition_sampler.negative(x0.shape[0])
    v = lambda x, t, c: base(x, t, network_input(c))
    field = v if scale == 1.0 else (lambda x, t, c: v(x, t, uncond) + scale * (v(x, t, c) - v(x, t, uncond)))
    with torch.no_grad():
        return EulerSolver().sample(field, x0, module.sample_times(), cond).samples


@pytest.mark.parametrize("guidance", ["rollouts", "evaluation", "both", "neither"])
def test_guidance_is_applied_where_chosen_and_scale_one_is_no_guidance(tmp_path, guidance):
    module = _module(tmp_path, guidance=guidance, scale=2.5)
    g = torch.Generator().manual_seed(3)
    cond = module.condition_sampler(3, g)
    x0 = torch.randn(3, 1, 8, 8, generator=g)
    rollout = module.rollout(x0, cond, g).samples
    evaluation = module.sample(x0, cond).samples  # predict, grids and metrics sample like this
    for got, place in ((rollout, "rollouts"), (evaluation, "evaluation")):
        scale = 2.5 if guidance in (place, "both") else 1.0
        torch.testing.assert_close(got, _independent_samples(module, x0, cond, scale), rtol=1e-4, atol=1e-5)
    plain = module.sample(x0, cond, guidance_scale=1.0).samples
    assert torch.equal(module.sample(x0, cond, guidance_scale=1.0).samples, plain)
    assert (module.sample(x0, cond, guidance_scale=2.5).samples - plain).abs().max() > 1e-3


def test_grpo_ratios_are_those_of_the_guided_transitions_sampled(tmp_path):
    from lightning_nft.objectives import GRPOObjective
    from lightning_nft.objectives.base import Policies

    module = _module(tmp_path, objective=GRPOObjective(), scale=3.0, n_sample_steps=6)
    batch = module.collect_rollouts(0)
    g = torch.Generator().manual_seed(0)
    _, logs = module.objective.loss(module.policies(), batch, g)
    assert logs["ratio_max_dev"] < 1e-3  # old == current: the ratio of the sampled (guided) transition is 1
    unguided = Policies(velocity=module.velocity, old_velocity=module.old_velocity,
                        reference_velocity=module.reference_velocity, solver=module.rollout_solver())
    _, wrong = module.objective.loss(unguided, batch, torch.Generator().manual_seed(0))
    assert wrong["ratio_max_dev"] > 0.05  # the unguided policy does not explain guided samples


def test_adjoint_matching_refuses_guided_rollouts(tmp_path):
    from lightning_nft.objectives import AdjointMatchingObjective

    module = _module(tmp_path, objective=AdjointMatchingObjective())
    with pytest.raises(ValueError, match="guided rollouts would sample another process"):
        _trainer(tmp_path).fit(module)


def test_per_prompt_normaliser_groups_by_prompt_id(tmp_path):
    from lightning_nft.advantages import PromptStatTracker, normalize_rewards

    module = _module(tmp_path, normalizer=PromptStatTracker(window=1, clip=3.0), groups_per_round=4)
    batch = module.collect_rollouts(0)
    ids = torch.tensor([m["prompt_id"] for m in batch.cond.metadata])
    assert len(set(ids.tolist())) < 4  # 4 groups from 3 prompts: one prompt twice, pooled
    expected, _ = normalize_rewards(batch.rewards, ids, mode="group", std_scope="group", clip=3.0)
    torch.testing.assert_close(batch.advantages, expected)


def test_validate_logs_per_prompt_rewards_means_and_grids(tmp_path):
    from lightning_nft.evaluation import evaluate_prompts

    module = _module(tmp_path, guidance="both", scale=2.0)
    results = _trainer(tmp_path).validate(module, verbose=False)
    logged = {k: v for r in results for k, v in r.items()}
    source = module.condition_sampler
    for split in ("train", "heldout"):
        records = source.split(split)
        base = DigitsT2IVelocity()
        direct = evaluate_prompts(lambda x, t, c: base(x, t, network_input(c)), source, records,
                                  DigitPromptAlignment(), (1, 8, 8), images_per_prompt=2, guidance_scale=2.0, n_steps=4)
        for record, value in zip(records, direct.per_prompt):
            assert logged[f"val/{split}/prompt_{record['prompt_id']}"] == pytest.approx(float(value), abs=1e-4)
        assert logged[f"val/{split}/reward_mean"] == pytest.approx(direct.mean, abs=1e-4)
        assert (tmp_path / f"val_{split}_step0.png").exists()
    results = _trainer(tmp_path).test(module, verbose=False)
    assert {"test/train/reward_mean", "test/heldout/reward_mean"} <= {k for r in results for k in r}


def test_latent_model_decodes_before_rewards_grids_and_predict(tmp_path):
    """A 4-channel latent model with a real (tiny) AutoencoderKL: the JPEG reward, ImageGrid and predict
    all receive 3-channel pixels; on the raw latents the reward would refuse them (4 channels)."""
    from diffusers import AutoencoderKL

    from lightning_nft.callbacks import ImageGrid
    from lightning_nft.decoders import AutoencoderKLDecoder
    from lightning_nft.models import ConvVelocity
    from lightning_nft.rewards import JpegCompressibility

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, scaling_factor=0.5, shift_factor=0.1)
    decoder = AutoencoderKLDecoder(vae)
    backbone = ConvVelocity(in_channels=4, channels=[8, 8], num_res_blocks=1, emb_dim=16)
    reward = JpegCompressibility()
    module = RewardFineTuningModule(backbone, reward, NFTObjective(beta=1.0), sample_shape=[4, 8, 8],
                                    groups_per_round=2, group_size=4, steps_per_round=2, n_sample_steps=3,
                                    decoder=decoder, optimizer=adamw(1e-3), predict_samples=4, predict_batch_size=4)
    x = torch.randn(3, 4, 8, 8)
    with pytest.raises(ValueError, match="expected images"):
        reward(x)
    with torch.no_grad():
        torch.testing.assert_close(module.compute_rewards(x, None), reward(vae.decode(x / 0.5 + 0.1).sample.clamp(-1, 1)))
    grid = ImageGrid(n_images=4, nrow=4, scale=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, callbacks=[grid]).fit(module)
    assert grid.after.shape[0] == 3 and grid.after.shape[1] == 16 + 2  # 3 channels, one row of 16x16 images
    assert (tmp_path / "before_after.png").exists()
    (out,) = _trainer(tmp_path).predict(module)
    assert out["images"].shape == (4, 3, 16, 16) and out["samples"].shape == (4, 4, 8, 8)
    torch.testing.assert_close(out["images"], decoder(out["samples"]))
