"""The shipped text-to-image configs run: each with its model id swapped for a tiny local pipeline of its family.

``configs/sd35m_nft.yaml``, ``sd35m_grpo.yaml``, ``flux_nft.yaml`` and ``sd15_nft.yaml`` name hub models that
cannot be downloaded here. Each test runs the config through the ``lightning-nft`` CLI with the pipeline replaced
by a tiny random pipeline of the same family (saved with ``save_pretrained``, loaded by path), CPU, small rounds,
two rounds; then checks what a run leaves behind: a checkpoint holding only the LoRA adapters (trained and old),
and a diffusers LoRA export that a fresh pipeline loads to give the trained model's velocities exactly.
"""

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "sd35m_nft": ("sd3", {"dtype": "float32", "max_sequence_length": 16}),
    "sd35m_grpo": ("sd3", {"dtype": "float32", "max_sequence_length": 16}),
    "flux_nft": ("flux", {"dtype": "float32", "max_sequence_length": 16, "guidance_scale": 3.5,
                          "gradient_checkpointing": True}),
    "sd15_nft": ("sd15", {"dtype": "float32"}),
}


def test_configs_print_offline(capsys, monkeypatch):
    """``lightning-nft fit --config <file> --print_config`` succeeds without the hub (nothing is instantiated)."""
    from lightning_nft.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in CONFIGS:
        with pytest.raises(SystemExit) as stop:
            main(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--print_config"])
        assert stop.value.code in (0, None), name
        printed = capsys.readouterr().out
        assert "class_path: lightning_nft.pipelines.PipelineFineTuningModule" in printed, name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_runs_two_rounds_on_a_tiny_pipeline_of_its_family(name, tmp_path, monkeypatch):
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    from lightning_nft.cli import main
    from lightning_nft.objectives import NFTObjective
    from lightning_nft.pipelines import PipelineFineTuningModule, build_pipeline
    from lightning_nft.rewards import JpegCompressibility
    from lightning_nft.pipelines.tiny import save_tiny_pipeline

    diffusers_logging.disable_progress_bar()
    monkeypatch.chdir(tmp_path)  # the config's run folder (runs/<name>, interpolated in the file) lands here
    family, options = CONFIGS[name]
    path = save_tiny_pipeline(family, str(tmp_path / "pipe"))
    prompts = ["a red cat", "two dogs on the moon", "7"]
    args = [
        "fit", "--config", str(ROOT / "configs" / f"{name}.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.max_epochs", "2", "--trainer.accumulate_grad_batches", "2", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.init_args.pipeline", path, "--model.init_args.pipeline_options", json.dumps(options),
        "--model.init_args.prompts", json.dumps(prompts), "--model.init_args.resolution", "32",
        "--model.init_args.groups_per_round", "2", "--model.init_args.group_size", "2",
        "--model.init_args.steps_per_round", "2", "--model.init_args.minibatch_size", "2",
        "--model.init_args.n_sample_steps", "2",
    ]
    main(args)
    run = tmp_path / "runs" / name
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # 2 rounds x 2 steps, 2 accumulated per optimiser step

    # the trained model: a module built from the same tiny pipeline with the checkpoint's adapters
    module = PipelineFineTuningModule(path, reward=JpegCompressibility(), objective=NFTObjective(), prompts=prompts,
                                      resolution=32, pipeline_options=options, lora=ckpt["hyper_parameters"]["lora"])
    assert module.pipeline_family == family
    # the checkpoint: LoRA adapters (trained and old) only: no frozen base weights, VAE or reward
    keys = list(ckpt["state_dict"])
    assert keys and all(".lora_" in k for k in keys)
    assert any(".default." in k for k in keys) and any(".old." in k for k in keys)
    full = module.state_dict()
    assert len(keys) < len(full) and set(keys) == {k for k in full if ".lora_" in k}
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    assert not unexpected and not any(".lora_" in k for k in missing)
    assert any((v != 0).any() for k, v in ckpt["state_dict"].items() if ".lora_B.default." in k)  # it trained

    # the export: a fresh diffusers pipeline with the LoRA loaded gives the trained velocities back, bit for bit
    fresh = diffusers.DiffusionPipeline.from_pretrained(path)
    fresh.load_lora_weights(str(run / "lora"))
    loaded = build_pipeline(fresh, **{k: v for k, v in options.items() if k not in ("dtype",)})
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *module.sample_shape, generator=g), torch.rand(2, generator=g)
    cond = module.encode(prompts[:2])
    with torch.no_grad():
        mine = module.backbone.eval()(x, t, cond)
        theirs = loaded.backbone.eval()(x, t, cond)
    assert torch.equal(mine, theirs), f"max diff {(mine - theirs).abs().max():.3g}"


def test_the_pipeline_may_be_a_builder_named_by_class_path(tmp_path):
    """``model.init_args.pipeline: {class_path: lightning_nft.pipelines.build_sd3, init_args: {...}}``."""
    import lightning.pytorch as pl

    from lightning_nft.cli import NFTLightningCLI
    from lightning_nft.pipelines.tiny import save_tiny_pipeline

    path = save_tiny_pipeline("sd3", str(tmp_path / "pipe"))
    builder = {"class_path": "lightning_nft.pipelines.build_sd3",
               "init_args": {"source": path, "max_sequence_length": 16, "gradient_checkpointing": True}}
    cli = NFTLightningCLI(model_class=pl.LightningModule, subclass_mode_model=True, run=False,
                          parser_kwargs={"parser_mode": "omegaconf"},
                          args=["--config", str(ROOT / "configs" / "sd35m_nft.yaml"), "--trainer.accelerator", "cpu",
                                "--trainer.devices", "1", "--trainer.strategy", "auto",
                                "--model.init_args.pipeline", json.dumps(builder),
                                "--model.init_args.pipeline_options", "{}",
                                "--model.init_args.prompts", '["a cat"]', "--model.init_args.resolution", "32"])
    module = cli.model
    assert module.pipeline_family == "sd3" and module.sample_shape == (4, 16, 16)
    assert module.backbone.model.is_gradient_checkpointing
    assert module.hparams["pipeline"].startswith("<sd3 pipeline")
