"""The DiffusionNFT configs run end to end through ``lightning_nft.cli.main`` (in process), 2 rounds each.

For every config: ``fit`` writes ``checkpoints/last.ckpt`` and TensorBoard events under the folder that
``${trainer.default_root_dir}`` interpolates to, and ``predict`` from the checkpoint writes
``samples.pt`` holding the samples and their rewards (r(x) = x_1). What distinguishes the three configs is
checked in the checkpoint: the EMA counter, the KL anchor's state and the frozen reference, the number of
rollout batches and gradient steps of multi-step NFT.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lightning_nft.cli import main

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 2


def _fit_and_predict(config: str, run_dir: str, base: str | None = None) -> tuple[dict, dict]:
    """``base``: the config that ``config`` overrides (both passed, in order, as ``--config``)."""
    cfg = [arg for name in ((base, config) if base else (config,)) for arg in ("--config", str(ROOT / "configs" / name))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["fit", *cfg, "--trainer.max_epochs", str(ROUNDS), "--trainer.enable_progress_bar", "false"])
        ckpt = Path("runs") / run_dir / "checkpoints" / "last.ckpt"
        assert ckpt.exists()
        main(["predict", *cfg, "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false"])
    assert any((Path("runs") / run_dir / "tb").rglob("events.out.tfevents*"))
    out = torch.load(Path("runs") / run_dir / "samples.pt")
    assert out["samples"].shape == (2000, 2) and out["rewards"].shape == (2000,)
    torch.testing.assert_close(out["rewards"], out["samples"][:, 0], rtol=0, atol=1e-6)
    return torch.load(ckpt, weights_only=False), out


def _callback_state(ckpt: dict, name: str) -> dict:
    states = [v for k, v in ckpt["callbacks"].items() if k.split("{")[0] == name]
    assert len(states) == 1, list(ckpt["callbacks"])
    return states[0]


def test_gmm_nft_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt, out = _fit_and_predict("gmm_nft.yaml", "gmm_nft")
    assert ckpt["epoch"] == ROUNDS - 1 and ckpt["global_step"] == ROUNDS * 8
    assert _callback_state(ckpt, "EMAOldPolicy") == {"updates": ROUNDS}
    assert ckpt["lightning_nft"]["rollout_version"] == ROUNDS
    assert not any(k.startswith("KLAnchor") for k in ckpt["callbacks"])
    assert out["rewards"].mean() > -0.4  # the mixture's E[x_1]; two rounds already moved it (measured -0.05)


def test_gmm_nft_kl_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt, _ = _fit_and_predict("gmm_nft_kl.yaml", "gmm_nft_kl", base="gmm_nft.yaml")
    assert _callback_state(ckpt, "KLAnchor") == {"weight": 0.5}
    state = ckpt["state_dict"]
    # the reference is the initial model (zero-initialised residual head); the trained head has moved
    assert torch.count_nonzero(state["reference_backbone.residual.head.weight"]) == 0
    assert torch.count_nonzero(state["backbone.residual.head.weight"]) > 0
    # hard copy every round (decay 0.0): the old policy is the current one
    for key, value in state.items():
        if key.startswith("old_backbone."):
            assert torch.equal(value, state["backbone." + key[len("old_backbone."):]]), key


def test_gmm_nft_multistep_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt, _ = _fit_and_predict("gmm_nft_multistep.yaml", "gmm_nft_multistep", base="gmm_nft.yaml")
    assert ckpt["lightning_nft"]["rollout_version"] == ROUNDS * 4  # 4 sub-rounds, each with fresh rollouts
    assert ckpt["global_step"] == ROUNDS * 16
    assert ckpt["hyper_parameters"]["steps_per_round"] == 16
