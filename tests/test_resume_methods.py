"""Stop-and-resume equals the uninterrupted run for every method, through the shipped mixture configs.

For each method (multi-step DiffusionNFT, DiffusionNFT with LoRA, Adjoint Matching, Flow-GRPO) the CLI runs
the config for 4 short rounds (A), for 2 rounds (B), and resumes B from its ``last.ckpt`` to 4 rounds (C).
C's final checkpoint must hold exactly A's weights (trained, old and reference policies; max abs
difference 0 on CPU) and the same optimiser state. For Adjoint Matching the checkpoint also carries the replayed
regression points of the last round (``lightning_nft.objectives.adjoint_targets``) and ``RoundAveraging``'s
average and current weights (both compared; 4 rounds all fall in its window of 5). (A process killed with SIGKILL resumes from the same
file: ``tests/test_resume_after_sigkill.py`` does that for DiffusionNFT on digits; what makes resuming
exact is what the checkpoint carries, not how the process ended.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_nft.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LORA = '{"target_modules": ["residual.body.0", "residual.body.2", "residual.head"], "rank": 4}'
METHODS = {
    "multistep_nft": ("gmm_nft.yaml+gmm_nft_multistep.yaml", ["--model.init_args.group_size", "8", "--model.init_args.steps_per_round", "4"]),
    "lora_nft": ("gmm_nft.yaml", ["--model.init_args.group_size", "8", "--model.init_args.steps_per_round", "2",
                                  "--model.init_args.lora", LORA]),
    "adjoint_matching": ("gmm_adjoint.yaml", ["--model.init_args.group_size", "16", "--model.init_args.n_sample_steps", "8",
                                              "--model.init_args.steps_per_round", "20"]),
    "grpo": ("gmm_grpo.yaml", ["--model.init_args.group_size", "8", "--model.init_args.steps_per_round", "2"]),
}


def _fit(config: str, extra: list[str], root: Path, rounds: int, ckpt: Path | None = None) -> dict:
    configs = [arg for name in config.split("+") for arg in ("--config", str(CONFIGS / name))]
    args = ["fit", *configs, *extra, "--trainer.default_root_dir", str(root),
            "--trainer.max_epochs", str(rounds), "--trainer.enable_progress_bar", "false"]
    main(args + (["--ckpt_path", str(ckpt)] if ckpt else []))
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=0.0)


def _optimizer_tensors(ckpt: dict) -> dict:
    state = ckpt["optimizer_states"][0]["state"]
    return {f"{i}.{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("method", list(METHODS))
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    config, extra = METHODS[method]
    full = _fit(config, extra, tmp_path / "a", 4)
    _fit(config, extra, tmp_path / "b", 2)
    resumed = _fit(config, extra, tmp_path / "b", 4, ckpt=tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert resumed["epoch"] == full["epoch"] == 3
    weights = _max_difference(full["state_dict"], resumed["state_dict"])
    print(f"{method}: max |resumed - uninterrupted| = {weights:.3g}")
    assert weights == 0.0
    if method == "adjoint_matching":  # state_dict is RoundAveraging's average; the current weights are kept apart
        assert _max_difference(full["current_model_state"], resumed["current_model_state"]) == 0.0
        assert _max_difference(full["state_dict"], full["current_model_state"]) > 0  # an average, not the last iterate
        assert full["lightning_nft"]["objective"]["history"][0]["x"].shape[0] > 0  # replayed points are carried
    assert _max_difference(_optimizer_tensors(full), _optimizer_tensors(resumed)) == 0.0
