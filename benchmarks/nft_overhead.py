"""Lightning's overhead on one online DiffusionNFT round, against a hand-written PyTorch loop.

One round: sample ``N = P K`` rollouts from the old policy (Euler on the
rollout grid), score them, normalise the rewards, take ``steps_per_round`` AdamW steps of the NFT
loss on minibatches of ``N / steps_per_round`` rollouts, then ``old <- d old + (1 - d) current``.

Both arms run that round on identical copies of one model (an exact 2-D Gaussian-mixture field plus a
zero-initialised MLP residual) with the same rollouts (the same per-round generator) and the same
number of steps:

* **lightning**: :class:`~lightning_nft.module.RewardFineTuningModule` in a ``Trainer`` with its
  default callbacks (``OnlineRollout``, ``EMAOldPolicy``), no logger, progress bar or checkpointing;
* **manual**: a plain loop calling the same pure functions (``nft_loss``, ``normalize_rewards``,
  ``EulerSolver``, ``torch._foreach_lerp_``).

The two are interleaved inside one ``fit``: at the start of every Lightning round the module's own
``on_train_epoch_start`` runs one manual round and excludes its time, so a Lightning round is timed
from the end of one manual round to the start of the next (a whole cycle: steps, hooks, EMA, loop
bookkeeping, rollouts); the first ``--warmup`` rounds are discarded. The figure is the median over
rounds of (Lightning round / the manual round run next to it), which cancels slow drifts of the
machine's load; the ratio of the two medians is printed too. Before timing, the script checks that
both arms compute the same update (two rounds with the per-step random draws pinned in both: the
parameters agree to 1e-6; measured: bit for bit). ``--arm bare`` replaces the library's module and
callbacks by :class:`BareNFT`, the same round in a minimal LightningModule without callbacks or
logging: Lightning's own floor, which tells its overhead from ours.

    python benchmarks/nft_overhead.py                        # the library's defaults (step_metrics=False)
    python benchmarks/nft_overhead.py --step-metrics true    # train/* logged at every step
    python benchmarks/nft_overhead.py --arm bare             # Lightning's floor
    python benchmarks/nft_overhead.py --hidden 512 --rounds 40

Measured (2 shared CPU cores under load ~3, one torch thread; defaults: 512 rollouts x 20 Euler steps,
8 steps of 64 on an MLP 128x3, a manual round of ~23 ms, i.e. ~1.5 ms per gradient step): 1.40 with
per-step logging (``--step-metrics true``), 1.21 with the default round means, 1.13-1.16 for
``--arm bare``; with ``--hidden 512`` (manual round ~250 ms) 1.09-1.11 with per-step logging and 1.05
with the default. Lightning
costs a fixed ~0.5 ms per gradient step (hook dispatch, closure, argument inspection) and ~0.2 ms per
``self.log`` call (``_ResultMetric.to`` walks the metric's attributes on every call); both are its own
and only matter when a step is cheap. What was ours: three ``self.log`` calls per step and one per
round from ``EMAOldPolicy`` (now: the default ``step_metrics=False`` logs round means, the EMA decay
is logged when it changes).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_nft.advantages import RewardNormalizer
from lightning_nft.analytic import GaussianMixture
from lightning_nft.backbones import MLPVelocity, ResidualVelocity
from lightning_nft.callbacks import EMAOldPolicy
from lightning_nft.module import RewardFineTuningModule, adamw
from lightning_nft.objectives.nft import NFTObjective, nft_loss
from lightning_nft.paths import interpolate
from lightning_nft.policy import round_generator
from lightning_nft.rewards import LinearReward
from lightning_nft.samplers import EulerSolver, time_grid


def build_backbone(hidden: int, depth: int) -> nn.Module:
    mixture = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], 0.4)
    return ResidualVelocity(mixture, MLPVelocity(2, hidden, depth, zero_init=True))


class ManualNFT:
    """The same round as the Lightning module, written as a plain PyTorch loop."""

    def __init__(self, backbone: nn.Module, args: argparse.Namespace) -> None:
        self.model = backbone
        self.old = copy.deepcopy(backbone).requires_grad_(False)
        self.reward = LinearReward([1.0, 0.0])
        self.normalizer = RewardNormalizer()
        self.solver = EulerSolver()
        self.times = time_grid(args.sample_steps)
        self.args = args
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.0)
        self.old_params, self.cur_params = list(self.old.parameters()), list(self.model.parameters())

    def round(self, epoch: int, pin_seed: bool = False) -> None:
        a = self.args
        n = a.groups * a.group_size
        g = round_generator(a.seed, 0, epoch)
        x0 = torch.randn((n, 2), generator=g)
        x1 = self.solver.sample(self.old, x0, self.times).samples
        rewards = self.reward(x1)
        group = torch.arange(a.groups).repeat_interleave(a.group_size)
        _, r = self.normalizer(rewards, group)
        order = torch.randperm(n, generator=g)
        size = n // a.steps
        for s in range(a.steps):
            if pin_seed:
                torch.manual_seed(1000 * epoch + s)
            idx = order[s * size:(s + 1) * size]
            xb, rb = x1[idx], r[idx]
            e0 = torch.randn_like(xb)
            t = torch.rand(size)
            xt = interpolate(e0, xb, t)
            v = self.model(xt, t)
            with torch.no_grad():
                v_old = self.old(xt, t)
            loss = nft_loss(v, v_old, e0, xb, xt, t, rb, a.beta).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.old_params, self.cur_params, 1.0 - a.decay)


def build_module(backbone: nn.Module, args: argparse.Namespace,
                 cls: type = RewardFineTuningModule) -> RewardFineTuningModule:
    return cls(
        backbone, LinearReward([1.0, 0.0]), NFTObjective(beta=args.beta), sample_shape=[2],
        groups_per_round=args.groups, group_size=args.group_size, steps_per_round=args.steps, optimizer=adamw(args.lr),
        n_sample_steps=args.sample_steps, rollout_seed=args.seed, step_metrics=args.step_metrics,
    )


def build_trainer(rounds: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=rounds, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )


class PinSeed(pl.Callback):
    """Pin the global RNG at every step (``1000 * round + step``), as ``ManualNFT.round(pin_seed=True)``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(1000 * trainer.current_epoch + batch_idx)


class RoundTimer:
    """Interleaving: run one manual round, time it, and time the Lightning cycle since the previous one.

    Called from the Lightning module's own ``on_train_epoch_start`` (no extra callback, whose hooks
    Lightning would also dispatch at every step), so a Lightning round is timed from the end of one
    manual round to the start of the next: one full cycle of steps, hooks, EMA and rollouts.
    """

    def __init__(self, manual: ManualNFT) -> None:
        self.manual = manual
        self.manual_s: list[float] = []
        self.lightning_s: list[float] = []
        self._end_of_manual: float | None = None

    def tick(self, epoch: int) -> None:
        t_a = time.perf_counter()
        if self._end_of_manual is not None:
            self.lightning_s.append(t_a - self._end_of_manual)
        self.manual.round(epoch)
        t_b = time.perf_counter()
        self.manual_s.append(t_b - t_a)
        self._end_of_manual = t_b


class InterleavedModule(RewardFineTuningModule):
    """The benchmarked module (with ``OnlineRollout`` and ``EMAOldPolicy``) plus the interleaved manual rounds."""

    timer: RoundTimer

    def on_train_epoch_start(self) -> None:  # runs after OnlineRollout's hook (callbacks first)
        self.timer.tick(self.current_epoch)


class BareNFT(pl.LightningModule):
    """Lightning's floor (``--arm bare``): the manual round's code in a minimal LightningModule.

    Rollouts and EMA in the module's own epoch hooks, the same loss in ``training_step``, no callbacks,
    no logging: what any LightningModule pays for Lightning's loop on this round, none of it ours.
    """

    def __init__(self, backbone: nn.Module, args: argparse.Namespace) -> None:
        super().__init__()
        self.work = ManualNFT(backbone, args)  # reuses its model, frozen copy, reward, solver and grid
        self.model = self.work.model
        self.args = args
        self.timer: RoundTimer

    def train_dataloader(self):
        steps = torch.arange(self.args.steps)
        return torch.utils.data.DataLoader(steps, batch_size=1, sampler=torch.utils.data.DistributedSampler(
            steps, num_replicas=1, rank=0, shuffle=False))

    def on_train_epoch_start(self) -> None:
        self.timer.tick(self.current_epoch)
        a, w = self.args, self.work
        n = a.groups * a.group_size
        g = round_generator(a.seed, 0, self.current_epoch)
        x0 = torch.randn((n, 2), generator=g)
        x1 = w.solver.sample(w.old, x0, w.times).samples
        _, r = w.normalizer(w.reward(x1), torch.arange(a.groups).repeat_interleave(a.group_size))
        self.x1, self.r, self.order = x1, r, torch.randperm(n, generator=g)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        size = self.x1.shape[0] // self.args.steps
        idx = self.order[batch_idx * size:(batch_idx + 1) * size]
        xb, rb = self.x1[idx], self.r[idx]
        e0 = torch.randn_like(xb)
        t = torch.rand(size)
        xt = interpolate(e0, xb, t)
        v = self.model(xt, t)
        with torch.no_grad():
            v_old = self.work.old(xt, t)
        return nft_loss(v, v_old, e0, xb, xt, t, rb, self.args.beta).mean()

    def on_train_epoch_end(self) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(self.work.old_params, self.work.cur_params, 1.0 - self.args.decay)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.work.params, lr=self.args.lr, weight_decay=0.0)


def flat(params: Any) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def check_same_update(args: argparse.Namespace) -> float:
    """Two rounds in each arm with pinned per-step draws: max |difference| of current and old parameters."""
    torch.manual_seed(args.seed)
    backbone = build_backbone(args.hidden, args.depth)
    manual = ManualNFT(copy.deepcopy(backbone), args)
    module = build_module(copy.deepcopy(backbone), args)
    build_trainer(2, [PinSeed(), EMAOldPolicy(decay=args.decay)]).fit(module)
    for e in range(2):
        manual.round(e, pin_seed=True)
    diff_cur = (flat(module.backbone.parameters()) - flat(manual.model.parameters())).abs().max()
    diff_old = (flat(module.old_backbone.parameters()) - flat(manual.old.parameters())).abs().max()
    return float(max(diff_cur, diff_old))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=100, help="timed rounds (after warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--groups", type=int, default=8, help="P conditions per round")
    p.add_argument("--group-size", type=int, default=64, help="K samples per condition")
    p.add_argument("--steps", type=int, default=8, help="gradient steps per round")
    p.add_argument("--sample-steps", type=int, default=20, help="Euler steps of a rollout")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--decay", type=float, default=0.5, help="EMA decay of the old policy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--step-metrics", type=lambda v: v.lower() in ("1", "true", "yes"), default=False,
                   help="the module's step_metrics (true: self.log every step; false: round means)")
    p.add_argument("--arm", choices=("module", "bare"), default="module",
                   help="module: RewardFineTuningModule + callbacks; bare: Lightning's floor (BareNFT)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    diff = check_same_update(args)
    print(f"same update check: max |param difference| after 2 rounds = {diff:.2e}")
    if diff > 1e-6:
        raise SystemExit("the two arms do not compute the same update")

    torch.manual_seed(args.seed)
    backbone = build_backbone(args.hidden, args.depth)
    manual = ManualNFT(copy.deepcopy(backbone), args)
    timer = RoundTimer(manual)
    if args.arm == "module":
        module: pl.LightningModule = build_module(copy.deepcopy(backbone), args, cls=InterleavedModule)
        callbacks: list[pl.Callback] = [EMAOldPolicy(decay=args.decay)]
    else:
        module, callbacks = BareNFT(copy.deepcopy(backbone), args), []
    module.timer = timer
    build_trainer(args.warmup + args.rounds + 1, callbacks).fit(module)
    light = timer.lightning_s[args.warmup:]
    hand = timer.manual_s[args.warmup:len(light) + args.warmup]
    med_l, med_m = statistics.median(light), statistics.median(hand)
    per_round = statistics.median([lt / mt for lt, mt in zip(light, hand)])
    print(
        f"N={args.groups * args.group_size} rollouts x {args.sample_steps} Euler steps, {args.steps} steps of "
        f"{args.groups * args.group_size // args.steps}, MLP {args.hidden}x{args.depth}, {args.threads} thread(s), "
        f"{len(light)} rounds, arm={args.arm}" + (f", step_metrics={args.step_metrics}" if args.arm == "module" else "")
    )
    print(f"median round: lightning {1e3 * med_l:.2f} ms, manual {1e3 * med_m:.2f} ms")
    print(f"ratio = {per_round:.3f} (median over rounds of lightning / manual of the same round; "
          f"ratio of the medians {med_l / med_m:.3f}); target <= 1.10")


if __name__ == "__main__":
    main()
