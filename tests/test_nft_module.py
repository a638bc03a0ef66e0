"""DiffusionNFT through the Lightning module and its callbacks, on the 2-D Gaussian mixture (issue 3).

The base policy is the exact mixture field (``lightning_nft.analytic``) plus a trainable MLP residual
(``ResidualVelocity``), so the initial policy samples the mixture exactly up to the Euler error, and
every statement below is about the online loop, not about pre-training:

* online NFT with the EMA old policy raises the reward;
* the KL-regularised tilting view (Zhu, "A KL-Regularized Reward-Tilting View of DiffusionNFT"): without the KL anchor the achieved tilt keeps growing round after round; with the anchor
  it levels off (and the level scales like ``1 / kl_weight``);
* the Taylor-approximation note (Liu, "DiffusionNFT as Taylor Approximation"), multi-step NFT: hard refreshes and fresh rollouts at the sub-round boundaries, and on a
  large tilt the multi-step field is closer to the exact tilted field than one step (learned or exact);
* the LoRA path (peft) and the full fine-tuning path keep the right policies frozen;
* checkpoints restore the old policy, the reference and the counters;
* ``configure_callbacks`` adds what the loop needs and lets the user's own instances win;
* ``predict`` writes samples and rewards;
* ``step_metrics=False`` logs the round means of the step metrics once per round.

Each fit is a few hundred gradient steps of a small MLP; every bound is stated next to its check
together with the values measured when it was set (seeds 0-3 unless said otherwise).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor

from lightning_nft.analytic import GaussianMixture, component_weights, effective_tilt
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.callbacks import EMAOldPolicy, KLAnchor, OnlineRollout, RewardMetrics, SampleWriter
from lightning_nft.data.noise import NoiseDataset
from lightning_nft.lora import OLD_ADAPTER, TRAIN_ADAPTER, adapter_parameter_pairs
from lightning_nft.module import LoraSettings, RewardFineTuningModule, adamw
from lightning_nft.objectives.nft import NFTObjective
from lightning_nft.rewards import LinearReward

WEIGHTS, MEANS, STD = [0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], 0.4
A = [1.0, 0.0]  # reward direction: r(x) = a . x; a . m_k = (-2, 2, 0)
BASE_MEAN_REWARD = sum(w * m[0] for w, m in zip(WEIGHTS, MEANS))  # E[a . X1] = -0.4 under the mixture


def mixture() -> GaussianMixture:
    return GaussianMixture(WEIGHTS, MEANS, STD)


def backbone(hidden: int = 64, depth: int = 2, zero_init: bool = True) -> ResidualVelocity:
    return ResidualVelocity(mixture(), MLPVelocity(2, hidden, depth, zero_init=zero_init))


def make_module(bb: torch.nn.Module | None = None, objective: NFTObjective | None = None,
                **kw: Any) -> RewardFineTuningModule:
    settings: dict[str, Any] = dict(sample_shape=[2], groups_per_round=4, group_size=64, steps_per_round=8, optimizer=adamw(3e-3),
                                    n_sample_steps=20)
    settings.update(kw)
    return RewardFineTuningModule(bb if bb is not None else backbone(), LinearReward(A),
                                  objective if objective is not None else NFTObjective(beta=1.0), **settings)


def make_trainer(rounds: int, callbacks: list[Callback] = (), **kw: Any) -> pl.Trainer:
    settings: dict[str, Any] = dict(max_epochs=rounds, accelerator="cpu", devices=1, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    settings.update(kw)
    return pl.Trainer(callbacks=list(callbacks), **settings)


def fit(trainer: pl.Trainer, module: pl.LightningModule, **kw: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, **kw)


@torch.no_grad()
def samples(module: RewardFineTuningModule, n: int = 4000, seed: int = 123, policy: str = "current") -> Tensor:
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return module.sample(x0, policy=policy).samples


def flat(params) -> Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


def state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------- online NFT


def test_online_nft_raises_the_reward_with_the_ema_old_policy():
    """Six rounds of online NFT (beta = 1, EMA old policy with decay 0.5, group-normalised r) on the mixture
    with r(x) = x_1: the mean reward of the current policy rises from E[a.X1] = -0.4 by more than 0.5
    (measured gains 0.8-1.0 over seeds 0-2), and the rollouts' reward (old policy, RewardMetrics) rises too."""
    pl.seed_everything(0, verbose=False)
    module = make_module()
    before = samples(module)[:, 0].mean().item()
    assert abs(before - BASE_MEAN_REWARD) < 0.06  # the initial policy is the mixture (Euler, 20 steps)
    metrics = RewardMetrics()
    fit(make_trainer(6, [metrics, EMAOldPolicy(decay=0.5)]), module)
    after = samples(module)[:, 0].mean().item()
    assert after > before + 0.5, (before, after)
    rollout_means = [h["reward/mean"] for h in metrics.history]
    assert len(rollout_means) == 6
    assert rollout_means[-1] > rollout_means[0] + 0.3, rollout_means
    assert 0.0 <= metrics.history[-1]["r/q10"] <= metrics.history[-1]["r/q90"] <= 1.0


# ---------------------------------------------------------------------------------------------- KL-tilting view


class TiltProbe(Callback):
    """The achieved tilt of the current policy after every round: ``effective_tilt`` of the component
    weights of 4000 samples (fixed noise), i.e. the slope of ``log(w'_k / w_k)`` against ``a . m_k``."""

    def __init__(self) -> None:
        self.tilts: list[float] = []

    @torch.no_grad()
    def _measure(self, module: RewardFineTuningModule) -> float:
        x = samples(module)
        w = component_weights(module.backbone.base, x)
        return effective_tilt(module.backbone.base, w.clamp_min(1.0 / x.shape[0]), A)

    def on_train_start(self, trainer, pl_module) -> None:
        self.tilts.append(self._measure(pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.tilts.append(self._measure(pl_module))


def _online_tilts(kl_weight: float | None, rounds: int) -> list[float]:
    """Online NFT with a hard refresh of the old policy every round (KL-tilting view's loop), optionally anchored."""
    pl.seed_everything(0, verbose=False)
    probe = TiltProbe()
    callbacks: list[Callback] = [probe, EMAOldPolicy(decay=0.0)]
    if kl_weight is not None:
        callbacks.append(KLAnchor(kl_weight))
    fit(make_trainer(rounds, callbacks), make_module())
    return probe.tilts


def test_seed001_the_kl_anchor_levels_off_the_tilt():
    """Seed 001. Online NFT refreshes the old policy every round, so each round tilts the *current* model
    again: the achieved tilt keeps growing. With KLAnchor(kl_weight) the iterates converge instead (to a tilt
    ~ beta^2 lambda / kl_weight in the pointwise picture: linear in 1 / kl_weight).

    Bounds (R = 4 rounds, 2R = 8), with the values measured over seeds 0-3 when they were set:
    * no anchor: tilt(2R) - tilt(R) > 0.2 and tilt(2R) > 1.5 tilt(R)  (measured growth 0.40-0.58, tilt(R) 0.34-0.37);
    * kl_weight = 0.5: |tilt(2R) - tilt(R)| < 0.05 and < 0.2 x the unanchored growth  (measured <= 0.02), while it
      still tilts: tilt(2R) > 0.08 (measured 0.15-0.16), and it stays far below the unanchored tilt;
    * kl_weight = 1.0 levels off lower: tilt_{0.5}(2R) / tilt_{1.0}(2R) in [1.4, 2.8] (measured 1.9-2.1).
    """
    R = 4
    free = _online_tilts(None, 2 * R)
    anchored = _online_tilts(0.5, 2 * R)
    stronger = _online_tilts(1.0, 2 * R)
    assert free[0] == pytest.approx(0.0, abs=0.03) and anchored[0] == pytest.approx(0.0, abs=0.03)  # the mixture
    growth_free = free[2 * R] - free[R]
    growth_anchored = anchored[2 * R] - anchored[R]
    assert growth_free > 0.2 and free[2 * R] > 1.5 * free[R], free
    assert abs(growth_anchored) < 0.05 and abs(growth_anchored) < 0.2 * growth_free, (anchored, free)
    assert anchored[2 * R] > 0.08 and anchored[2 * R] < 0.5 * free[2 * R], anchored
    ratio = anchored[2 * R] / stronger[2 * R]
    assert 1.4 < ratio < 2.8, (anchored, stronger)


# ---------------------------------------------------------------------------------------------- multi-step NFT


class SubRoundProbe(Callback):
    """At every gradient step (after OnlineRollout's hooks, before backward): the rollout version, whether
    old == current, and whether the round's rollouts are the old policy's samples of their own noise."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._batch_idx = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_idx = batch_idx

    @torch.no_grad()
    def on_before_backward(self, trainer, pl_module, loss) -> None:
        old, cur = pl_module.old_policy_pairs()
        ro = pl_module.rollouts
        resampled = pl_module.sample(ro.x0, policy="old", solver=pl_module.rollout_solver()).samples
        self.rows.append(dict(
            round=trainer.current_epoch, step=self._batch_idx, version=pl_module.rollout_version,
            old_is_current=all(torch.equal(o, c) for o, c in zip(old, cur)),
            from_old=torch.equal(resampled, ro.x1), x1=ro.x1[:4].clone(),
        ))


def test_multistep_nft_refreshes_and_resamples_at_sub_round_boundaries():
    """NFTObjective(substeps=3), 6 steps per round: sub-rounds start at steps 0, 2, 4. At steps 2 and 4 the
    old policy has just been hard-copied from the current one (old == current exactly) and fresh rollouts
    have been drawn from it (rollout_version + 1, new samples, each the old policy's Euler sample of its
    noise). Between boundaries nothing is refreshed (old != current after a step). At the start of a
    round the old policy is the EMA (decay 0.5) of the previous round: not equal to the current one."""
    pl.seed_everything(0, verbose=False)
    probe = SubRoundProbe()
    module = make_module(objective=NFTObjective(beta=1.0, substeps=3), steps_per_round=6)
    fit(make_trainer(2, [probe, EMAOldPolicy(decay=0.5)]), module)
    assert module.rollout_version == 6
    rows = probe.rows
    assert [(r["round"], r["step"]) for r in rows] == [(e, s) for e in range(2) for s in range(6)]
    for r in rows:
        e, s = r["round"], r["step"]
        assert r["version"] == 3 * e + s // 2 + 1, r
        assert r["from_old"], r
        if s in (2, 4):
            assert r["old_is_current"], r
        elif s % 2 == 1:
            assert not r["old_is_current"], r
    assert rows[0]["old_is_current"]  # round 0: old, current and reference all start at the initial model
    assert not rows[6]["old_is_current"]  # round 1 starts from the EMA
    firsts = [r["x1"] for r in rows if r["step"] % 2 == 0]
    assert all(not torch.allclose(a, b) for a, b in zip(firsts, firsts[1:]))
    with pytest.raises(ValueError, match="rollouts_per_round=4"):
        make_module(objective=NFTObjective(beta=1.0, substeps=4), steps_per_round=3)


class CentredRewards:
    """``r = R - mean_group(R) + 1/2``: no rescaling, so by Taylor-approximation note (Theorem 1.1, constants drop out) one
    round with ``beta`` is a step of ``alpha = 2 / beta`` along the tilt ``p exp(alpha R)``."""

    def __call__(self, rewards: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
        _, inverse = torch.unique(group, return_inverse=True)
        n = int(inverse.max()) + 1
        mean = torch.zeros(n, dtype=rewards.dtype).index_add_(0, inverse, rewards) / torch.bincount(inverse, minlength=n)
        adv = rewards - mean[inverse]
        return adv, adv + 0.5


def _field_error(field, exact: GaussianMixture, n: int = 20000) -> float:
    """Relative L2 error of ``field`` against the exact field of ``exact`` on ``x_t`` from ``exact``'s own
    path, ``t ~ U[0.1, 0.9]``: ``sqrt(E|v - v_exact|^2 / E|v_exact|^2)``."""
    g = torch.Generator().manual_seed(3)
    x1 = exact.sample(n, generator=g)
    x0 = torch.randn(n, 2, generator=g)
    t = 0.1 + 0.8 * torch.rand(n, generator=g)
    xt = (1 - t)[:, None] * x0 + t[:, None] * x1
    with torch.no_grad():
        v_exact = exact.velocity(xt, t)
        return float((field(xt, t) - v_exact).pow(2).sum(1).mean().sqrt() / v_exact.pow(2).sum(1).mean().sqrt())


def test_multistep_nft_tracks_the_exact_tilt_better_than_one_step():
    """Seed 000: one NFT round with beta learns the Taylor step v + (2 / beta) d/dalpha v^alpha of the tilted
    fields, exact only for small alpha = 2 / beta. At alpha = 1 on the mixture (r = a.x, centred, not
    rescaled) the *exact* one-step optimum (analytic.nft_optimum) is 0.446 away from the exact tilted field
    (relative L2 on the tilted path, t in [0.1, 0.9]). Multi-step NFT (4 sub-rounds of beta_eff = 4 beta, each
    re-linearised at freshly sampled rollouts) gets closer than one step can.

    Both arms: one round, 800 gradient steps of 256 samples, the same total number of rollouts (one step:
    8192; multi-step: 4 x 2048). Bounds (measured over seeds 0-3 when set): multi-step error < 0.33 (i.e.
    below 0.75 x the exact one-step's 0.446; measured 0.21-0.23) and < 0.7 x the learned one-step's error
    (measured 0.45-0.53, i.e. the one-step arm is limited by the Taylor error, not by learning).

    What the bound does and does not separate (measured on seed 0-1): callbacks that ignore ``substeps``
    (one linearisation with beta_eff) give 0.51 and fail it; hard refreshes *without* fresh rollouts give
    0.28-0.31 and would pass it, so the resampling itself is checked by the mechanics test above."""
    alpha = 1.0
    exact = mixture().tilt(A, alpha)
    errors = {}
    for substeps, n_rollouts in ((1, 8192), (4, 2048)):
        pl.seed_everything(0, verbose=False)
        module = make_module(objective=NFTObjective(beta=2.0 / alpha, substeps=substeps), groups_per_round=n_rollouts // 256,
                             group_size=256, steps_per_round=800, minibatch_size=256, normalizer=CentredRewards())
        fit(make_trainer(1, [EMAOldPolicy(decay=0.0)]), module)
        assert module.rollout_version == substeps
        errors[substeps] = _field_error(module.velocity, exact)
    base = mixture()
    one_step_exact = _field_error(lambda x, t: base.nft_optimum(x, t, A, 2.0 / alpha), exact)
    assert one_step_exact == pytest.approx(0.446, abs=0.01)
    assert errors[4] < 0.75 * one_step_exact, (errors, one_step_exact)
    assert errors[4] < 0.7 * errors[1], errors


# ---------------------------------------------------------------------------------------------- LoRA and full fine-tuning


class AdapterProbe(Callback):
    """The adapters just before EMAOldPolicy's update of each round (this probe runs first)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        old, cur = pl_module.old_policy_pairs()
        self.old_before, self.current = flat(old), flat(cur)


def test_lora_reference_old_adapter_and_ema():
    """LoRA (peft) on the residual MLP's three linear layers (a random, non-zero residual):
    reference = adapters disabled = the original model, exactly, before and after training; the 'old'
    adapter starts equal to the trained 'default' one; only 'default' is trained; EMAOldPolicy(decay 0.5)
    moves only 'old' (old <- 0.5 old + 0.5 default, to float rounding; 'default' and the base weights are
    untouched by it); the old policy evaluates the 'old' adapter (equal to a copy of the model carrying the
    'old' weights in 'default'); after training the policy differs from the reference and the reward has
    risen by more than 0.3 in 6 rounds (measured 0.6-0.8 for seeds 0-1)."""
    pl.seed_everything(0, verbose=False)
    bb = backbone(zero_init=False)
    original = copy.deepcopy(bb)
    module = make_module(bb, optimizer=adamw(1e-2), lora=LoraSettings(target_modules=["body.0", "body.2", "head"], rank=4, alpha=8.0))
    assert module.uses_lora and module.old_backbone is None and module.reference_backbone is None
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    t = torch.rand(500, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(module.reference_velocity(x, t), original(x, t))
        assert torch.equal(module.old_velocity(x, t), module.velocity(x, t))
    old, cur = module.old_policy_pairs()
    assert len(old) == len(cur) == 6 and all(torch.equal(o, c) for o, c in zip(old, cur))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(f".{TRAIN_ADAPTER}." in n for n in trainable)
    assert any(f".{OLD_ADAPTER}." in n for n, _ in module.named_parameters())
    optimizer = module.configure_optimizers()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in cur}
    base_names = [n for n, _ in module.backbone.named_parameters() if "lora_" not in n]
    base_before = {n: p.detach().clone() for n, p in module.backbone.named_parameters() if "lora_" not in n}
    assert base_names

    before = samples(module)[:, 0].mean().item()
    probe = AdapterProbe()
    fit(make_trainer(6, [probe, EMAOldPolicy(decay=0.5)]), module)
    old, cur = module.old_policy_pairs()
    torch.testing.assert_close(flat(old), 0.5 * probe.old_before + 0.5 * probe.current, rtol=0, atol=1e-6)
    assert torch.equal(flat(cur), probe.current)
    assert not torch.allclose(flat(old), flat(cur))
    for n, p in module.backbone.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    with torch.no_grad():
        assert torch.equal(module.reference_velocity(x, t), original(x, t))
        assert (module.velocity(x, t) - module.reference_velocity(x, t)).abs().max() > 1e-2
        # the old policy is the 'old' adapter: the model with the 'old' weights written into 'default'
        twin = copy.deepcopy(module.backbone)
        for o, c in zip(*adapter_parameter_pairs(twin)):
            c.copy_(o)
        assert torch.equal(module.old_velocity(x, t), twin(x, t))
        assert (module.old_velocity(x, t) - module.velocity(x, t)).abs().max() > 1e-4
    after = samples(module)[:, 0].mean().item()
    assert after > before + 0.3, (before, after)


def test_full_finetuning_keeps_frozen_copies():
    """Without LoRA: old policy and reference are separate frozen copies (no grad, own storage, equal to the
    backbone at the start); the optimiser sees exactly the backbone's trainable parameters; after training the
    reference is unchanged, the old policy is the EMA, and neither copy ever received a gradient."""
    pl.seed_everything(0, verbose=False)
    module = make_module()
    assert not module.uses_lora
    bb_params = list(module.backbone.parameters())
    for copy_ in (module.old_backbone, module.reference_backbone):
        params = list(copy_.parameters())
        assert len(params) == len(bb_params)
        assert all(not p.requires_grad for p in params)
        assert all(torch.equal(p, q) and p.data_ptr() != q.data_ptr() for p, q in zip(params, bb_params))
    optimizer = module.configure_optimizers()
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in module.backbone.parameters() if p.requires_grad}
    assert optimized == {id(p) for p in module.backbone.residual.parameters()}  # the mixture base is frozen
    reference_before = flat(module.reference_backbone.parameters())
    probe = AdapterProbe()
    fit(make_trainer(3, [probe, EMAOldPolicy(decay=0.5)]), module)
    assert torch.equal(flat(module.reference_backbone.parameters()), reference_before)
    torch.testing.assert_close(flat(module.old_backbone.parameters()), 0.5 * probe.old_before + 0.5 * probe.current,
                               rtol=0, atol=1e-6)
    assert not torch.equal(flat(module.backbone.parameters()), reference_before)
    assert all(p.grad is None for p in module.old_backbone.parameters())
    assert all(p.grad is None for p in module.reference_backbone.parameters())


# ---------------------------------------------------------------------------------------------- checkpoints


def policies(module: RewardFineTuningModule) -> dict[str, Any]:
    """Old policy, reference and the whole backbone as tensors: frozen copies, or (LoRA) the 'old' adapter
    and the base weights that 'adapters disabled' evaluates."""
    old, current = module.old_policy_pairs()
    if module.uses_lora:
        reference = {n: p.detach().clone() for n, p in module.backbone.named_parameters() if "lora_" not in n}
    else:
        reference = state(module.reference_backbone)
    return dict(old=flat(old), current=flat(current), reference=reference, backbone=state(module.backbone))


class ResumeProbe(Callback):
    """What the module and the EMA callback hold when training (re)starts."""

    def __init__(self, ema: EMAOldPolicy) -> None:
        self.ema = ema

    def on_train_start(self, trainer, pl_module) -> None:
        self.epoch = trainer.current_epoch
        self.ema_updates = self.ema.updates
        self.rollout_version = pl_module.rollout_version
        self.policies = policies(pl_module)
        self.kl_weight = pl_module.kl_weight


@pytest.mark.parametrize("path", ["full", "lora"])
def test_resume_restores_old_policy_reference_and_counters(tmp_path, path):
    """Fit 3 rounds (ramp EMA schedule, KL anchor) with ModelCheckpoint, then resume a freshly built module
    (different random weights) from last.ckpt to 5 rounds: at the restart the old policy (frozen copy or 'old'
    adapter), the reference (frozen copy, not re-snapshotted from the trained weights; or the base weights),
    the backbone, the EMA counter (3), the round counter (3) and the rollout counter (3) are the saved ones,
    and the run continues from them (counters 5; the ramp decay of the last round is min(0.2 * 4, 0.9) = 0.8).
    The KL anchor's weight comes back from the checkpoint and the module's loss uses the same weight as the
    callback."""
    lora = LoraSettings(target_modules=["body.0", "body.2", "head"], rank=4, alpha=8.0) if path == "lora" else None
    pl.seed_everything(0, verbose=False)
    module = make_module(bb=backbone(zero_init=False), lora=lora, optimizer=adamw(1e-2))
    ema = EMAOldPolicy(schedule="ramp", ramp_rate=0.2, max_decay=0.9)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(make_trainer(3, [ema, KLAnchor(0.3), ckpt], enable_checkpointing=True), module)
    saved = policies(module)
    assert ema.updates == 3 and module.rollout_version == 3
    assert not torch.allclose(saved["old"], saved["current"])  # the checks below can tell old from current
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(1))
    t = torch.rand(200, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (module.reference_velocity(x, t) - module.velocity(x, t)).abs().max() > 1e-3  # ... reference from current

    pl.seed_everything(1, verbose=False)
    fresh = make_module(bb=backbone(zero_init=False), lora=lora, optimizer=adamw(1e-2))
    assert any(not torch.equal(v, saved["backbone"][k]) for k, v in state(fresh.backbone).items())
    ema2 = EMAOldPolicy(schedule="ramp", ramp_rate=0.2, max_decay=0.9)
    probe = ResumeProbe(ema2)
    anchor2 = KLAnchor(0.1)  # the checkpoint's 0.3 is restored, and the loss must use that same weight
    trainer = make_trainer(5, [probe, ema2, anchor2, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
                           enable_checkpointing=True)
    fit(trainer, fresh, ckpt_path=str(tmp_path / "last.ckpt"))
    assert (probe.epoch, probe.ema_updates, probe.rollout_version) == (3, 3, 3)
    assert probe.kl_weight == anchor2.weight == 0.3
    got = probe.policies
    assert torch.equal(got["old"], saved["old"]) and torch.equal(got["current"], saved["current"])
    for name in ("reference", "backbone"):
        assert got[name].keys() == saved[name].keys()
        assert all(torch.equal(got[name][k], saved[name][k]) for k in saved[name]), name
    assert (trainer.current_epoch, ema2.updates, fresh.rollout_version) == (5, 5, 5)
    assert float(trainer.callback_metrics["old_policy/ema_decay"]) == pytest.approx(0.8)


# ---------------------------------------------------------------------------------------------- default callbacks


def test_configure_callbacks_adds_defaults_and_the_users_instances_win():
    """No callbacks given: the module adds one OnlineRollout (the module's P, K) and one EMAOldPolicy
    (decay 0.5: old != current after training). The user's own instances (P = 3, K = 5; a hard-copy EMA)
    are kept, not duplicated or replaced, and their settings are the ones used: 15 rollouts in 3 groups,
    old == current after every round."""
    pl.seed_everything(0, verbose=False)
    module = make_module()
    trainer = make_trainer(2)
    fit(trainer, module)
    rollouts = [c for c in trainer.callbacks if isinstance(c, OnlineRollout)]
    emas = [c for c in trainer.callbacks if isinstance(c, EMAOldPolicy)]
    assert len(rollouts) == 1 and len(emas) == 1 and emas[0].decay == 0.5 and emas[0].updates == 2
    assert len(module.rollouts) == 4 * 64
    assert not torch.equal(flat(module.old_backbone.parameters()), flat(module.backbone.parameters()))

    pl.seed_everything(0, verbose=False)
    module = make_module(groups_per_round=3, group_size=5)
    mine_rollout, mine_ema = OnlineRollout(), EMAOldPolicy(decay=0.0)
    trainer = make_trainer(2, [mine_rollout, mine_ema])
    fit(trainer, module)
    assert [c for c in trainer.callbacks if isinstance(c, OnlineRollout)] == [mine_rollout]
    assert [c for c in trainer.callbacks if isinstance(c, EMAOldPolicy)] == [mine_ema]
    assert mine_ema.updates == 2
    assert len(module.rollouts) == 15
    assert torch.equal(module.rollouts.group, torch.arange(3).repeat_interleave(5))
    assert torch.equal(flat(module.old_backbone.parameters()), flat(module.backbone.parameters()))

    module = make_module(default_callbacks=False)
    with pytest.raises(RuntimeError, match="OnlineRollout"):
        fit(make_trainer(1), module)


# ---------------------------------------------------------------------------------------------- predict


def test_predict_writes_samples_and_rewards(tmp_path):
    """After two rounds, ``trainer.predict`` with SampleWriter writes ``{"samples": (300, 2), "rewards": (300,)}``:
    the current policy's Euler samples of the module's seeded noise (NoiseDataset), and their rewards."""
    pl.seed_everything(0, verbose=False)
    module = make_module(predict_samples=300, predict_batch_size=100, predict_seed=5)
    fit(make_trainer(2), module)
    out_path = tmp_path / "pred" / "samples.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(1, [SampleWriter(str(out_path))]).predict(module, return_predictions=False)
    out = torch.load(out_path)
    assert out["samples"].shape == (300, 2) and out["rewards"].shape == (300,)
    noise = NoiseDataset(300, [2], seed=5).noise
    with torch.no_grad():
        expected = module.sample(noise).samples
    torch.testing.assert_close(out["samples"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["rewards"], out["samples"] @ torch.tensor(A), rtol=0, atol=1e-6)
    assert out["rewards"].mean() > BASE_MEAN_REWARD  # two rounds of NFT already moved the policy


# ---------------------------------------------------------------------------------------------- logging


class LossRecorder(Callback):
    """Each step's loss (what training_step returned), and whether train/loss was logged by then."""

    def __init__(self) -> None:
        self.step_losses: dict[int, list[float]] = {}
        self.logged_in_round_0: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_losses.setdefault(trainer.current_epoch, []).append(float(outputs["loss"]))
        if trainer.current_epoch == 0:
            self.logged_in_round_0.append("train/loss" in trainer.callback_metrics)


def test_step_metrics_false_logs_round_means():
    """``step_metrics=False``: nothing is logged per step; after each round train/loss and the objective's
    diagnostics are logged once, as the mean over the round's steps (equal to the mean of the step losses
    to float rounding)."""
    pl.seed_everything(0, verbose=False)
    recorder = LossRecorder()
    seen: dict[int, dict[str, float]] = {}

    class AfterRound(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch > 0:  # the previous round's epoch-end logs are in callback_metrics now
                seen[trainer.current_epoch - 1] = {k: float(v) for k, v in trainer.callback_metrics.items()}

        def on_train_end(self, trainer, pl_module) -> None:
            seen[trainer.current_epoch - 1] = {k: float(v) for k, v in trainer.callback_metrics.items()}

    fit(make_trainer(2, [recorder, AfterRound()]), make_module(step_metrics=False))
    assert sorted(seen) == [0, 1]
    assert recorder.logged_in_round_0 == [False] * 8  # no per-step logging
    for epoch, metrics in seen.items():
        losses = recorder.step_losses[epoch]
        assert len(losses) == 8
        assert metrics["train/loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
        assert {"train/nft_loss", "train/old_deviation"} <= metrics.keys()
