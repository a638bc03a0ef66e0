"""Adjoint Matching vs online DiffusionNFT on the same mixture and linear reward: cost to reach its own target.

    python benchmarks/am_vs_nft_gmm.py            (one CPU thread, a few minutes)

Problem (configs/gmm_adjoint.yaml): the exact 3-component mixture (weights 0.5/0.3/0.2, means (-2,0), (0,1),
(2,0), std 0.45) plus a zero-initialised residual MLP (64 wide, depth 2), reward r(x) = x_1. Both methods run
through RewardFineTuningModule + Lightning, 256 rollouts per round, and are stopped at the first evaluation
where the total variation between the component weights of 4000 Euler-ODE samples (50 steps; weights by
exact classification, analytic.component_weights) and the weights of the method's OWN target is <= 0.05.

Targets (stated honestly):
* Adjoint Matching: the exact tilt p(x) exp(lambda x_1), lambda = 0.6 (seed 004).
* Online NFT (old policy hard-refreshed every round, beta = 1): seed 000's Taylor prediction. With the
  default normaliser a linear reward becomes r = 1/2 + (R - mean)/(2 c (std + eps)) (clip c, unclipped
  here), i.e. r = s_k R + const with the slope s_k measured on round k's rollouts; Theorem 1.1 says one
  round's optimum is v_old + (2 s_k / beta) Cov(R, X1 - X0 | X_t) = the first-order Taylor step in lambda of
  the exact tilt, of size 2 s_k / beta. The NFT target after k rounds is therefore the exact tilt with
  lambda_k = sum of those steps (what NFT would sample if each round hit its optimum exactly and Taylor were
  exact); NFT is stopped at the first round with lambda_k >= 0.6 and TV(weights, tilt(lambda_k)) <= 0.05
  (the same amount of tilt as AM). Its TV to the fixed tilt(0.6) is printed beside it.
Wall time counts training only (evaluations excluded); trajectories = rounds x 256.
"""

from __future__ import annotations

import logging
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_nft.analytic import GaussianMixture, component_weights, effective_tilt, total_variation
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.callbacks import EMAOldPolicy, OnlineRollout
from lightning_nft.module import RewardFineTuningModule, adamw
from lightning_nft.objectives import AdjointMatchingObjective, NFTObjective
from lightning_nft.rewards import LinearReward
from lightning_nft.samplers import EulerSolver, time_grid

WEIGHTS, MEANS, STD, DIRECTION, LAM, TOL, N_PER_ROUND = [0.5, 0.3, 0.2], [[-2.0, 0.0], [0.0, 1.0], [2.0, 0.0]], 0.45, [1.0, 0.0], 0.6, 0.05, 256


class StopAtTarget(Callback):
    """Every ``every`` rounds: TV of the weights to the method's own target; stop when <= TOL. Times rounds."""

    def __init__(self, mixture, every: int, taylor_beta: float | None = None) -> None:
        self.mixture, self.every, self.beta = mixture, every, taylor_beta
        self.lam_taylor, self.train_time, self.rows, self.done = 0.0, 0.0, [], None
        self.x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(123))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()  # after _TimedRollout (listed first) collected and timed the rollouts
        if self.beta is not None:  # slope of r against R on this round's rollouts (least squares)
            ro = pl_module.rollouts
            R, r = ro.rewards.double(), ro.r.double()
            slope = float(((R - R.mean()) * (r - r.mean())).sum() / ((R - R.mean()) ** 2).sum())
            self.lam_taylor += 2 * slope / self.beta

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.train_time += time.perf_counter() - self.t0
        k = trainer.current_epoch + 1
        if k % self.every:
            return
        lam = self.lam_taylor if self.beta is not None else LAM
        with torch.no_grad():
            x = EulerSolver().sample(pl_module.backbone, self.x0, time_grid(50)).samples
        a = torch.tensor(DIRECTION)
        w = component_weights(self.mixture.tilt(a, lam), x)
        tv_own = total_variation(w, self.mixture.tilt(a, lam).weights)
        tv_06 = total_variation(w, self.mixture.tilt(a, LAM).weights)
        self.rows.append((k, lam, tv_own, tv_06, effective_tilt(self.mixture, w, a)))
        if tv_own <= TOL and lam >= LAM - 1e-9 and self.done is None:
            self.done = (k, self.train_time)
            trainer.should_stop = True


def run(method: str, max_rounds: int, seed: int = 0) -> StopAtTarget:
    pl.seed_everything(seed, verbose=False)
    mixture = GaussianMixture(WEIGHTS, MEANS, STD)
    backbone = ResidualVelocity(mixture, MLPVelocity(2, 64, 2, 16, zero_init=True))
    common = dict(sample_shape=[2], rollout_seed=seed)
    if method == "am":
        module = RewardFineTuningModule(backbone, LinearReward(DIRECTION), AdjointMatchingObjective(reward_multiplier=LAM),
                                        groups_per_round=1, group_size=N_PER_ROUND, n_sample_steps=40, optimizer=adamw(1e-2), **common)
        stop, extra = StopAtTarget(mixture, every=10), []
    else:
        module = RewardFineTuningModule(backbone, LinearReward(DIRECTION), NFTObjective(beta=1.0), groups_per_round=4,
                                        group_size=N_PER_ROUND // 4, steps_per_round=8, n_sample_steps=20, optimizer=adamw(3e-3), **common)
        stop, extra = StopAtTarget(mixture, every=1, taylor_beta=1.0), [EMAOldPolicy(decay=0.0)]
    timed = _TimedRollout(stop)
    trainer = pl.Trainer(max_epochs=max_rounds, gradient_clip_val=1.0, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timed, stop, *extra])
    trainer.fit(module)
    return stop


class _TimedRollout(OnlineRollout):
    """OnlineRollout whose collection time is added to the method's training time."""

    def __init__(self, stop: StopAtTarget) -> None:
        super().__init__()
        self.stop = stop

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        t0 = time.perf_counter()
        super().on_train_epoch_start(trainer, pl_module)
        self.stop.train_time += time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    print(f"| method | target | rounds | trajectories | train wall (s) | TV to own target | TV to tilt(0.6) | achieved tilt |")
    print("|---|---|---|---|---|---|---|---|")
    for method, max_rounds in (("am", 400), ("nft", 60)):
        s = run(method, max_rounds)
        k, lam, tv_own, tv_06, tilt = s.rows[-1]
        target = "exact tilt lambda=0.6" if method == "am" else f"Taylor tilt lambda_k={lam:.3f}"
        reached = s.done is not None
        wall = s.done[1] if reached else s.train_time
        print(f"| {'Adjoint Matching' if method == 'am' else 'online NFT'} | {target} | {k}{'' if reached else ' (not reached)'} "
              f"| {k * N_PER_ROUND} | {wall:.1f} | {tv_own:.3f} | {tv_06:.3f} | {tilt:.3f} |", flush=True)
        for row in s.rows[-4:]:
            print("   round %d lambda %.3f tv_own %.3f tv_0.6 %.3f tilt %.3f" % row, flush=True)


if __name__ == "__main__":
    main()
