"""Wall time per round of the digits main job with its scorer behind the reference server (+100 ms per request).

Arms, all the digits main job's round (``configs/digits_nft.yaml``: the shipped 8x8 flow, DiffusionNFT,
8 groups x 32 samples, 10 Euler steps, 8 gradient steps, ramped EMA old policy, KL anchor 0.03; no
evaluation callbacks, no logger) with the classifier reward "probability of a 3":

* ``local``: the reward in process (the reference);
* ``remote``: the same reward served by ``lightning-nft serve-reward`` on 127.0.0.1 in another
  process, wrapped so that every request takes ``--latency`` seconds longer (``SlowDigitReward``,
  the sleep is inside the server's scoring lock, as a slow model would be); one request per round;
* ``remote_overlap``: as ``remote``, the round sampled in ``--chunks`` chunks of whole groups with
  chunk ``k`` scored while chunk ``k + 1`` is sampled (:func:`~lightning_nft.rewards.async_scoring.rollout_and_score`).

The arms are interleaved (``--reps`` repetitions of the three arms in a new random order each time,
``--rounds`` rounds each, the first round of each fit discarded), so a drift of the machine's load
hits all arms alike; the ratio is also given per repetition (median over repetitions). A round is timed from one ``on_train_epoch_start`` to the next (collection, scoring,
normalisation, steps, EMA), the collection from the round start to its first step. Printed: the
median round time of each arm and its ratio to ``local``, and the median collection time and what the
remote scorer adds to it (the part the overlap can hide).

    python benchmarks/reward_overlap.py                  # latency 0.1 s, chunks 2
    python benchmarks/reward_overlap.py --chunks 4 --reps 3
    python benchmarks/reward_overlap.py --latency 0 --per_sample 0.004 --chunks 4   # a scorer that scales with B

Measured (2 CPU cores shared with other jobs, load average 9-14, one torch thread; a round took ~5 s
here against ~0.8 s on an idle machine, so every figure carries a few percent of noise):

* ``--latency 0.1`` (defaults, 6 reps x 2 rounds): ``remote`` 0.97-0.98 of ``local`` (target <= 1.15: met;
  the 100 ms are ~2 % of a round here and vanish in the noise); ``remote_overlap`` (2 chunks) 1.07-1.12;
* ``--latency 0 --per_sample 0.004 --chunks 4`` (a scorer taking ~1 s per round; 4 reps x 2 rounds):
  ``remote`` 1.23-1.24, ``remote_overlap`` 1.13-1.15.

The overlap hides the scorer only where sampling in chunks costs about what sampling at once does.
On this CPU job it does not: the 8x8 conv flow samples 4 chunks of 64 in 3.2-3.6 s against 2.4-2.8 s
for one batch of 256 (per-call overhead dominates small batches), which eats most of the scoring time
it hides. On a GPU with a large model and batch, chunk sampling is nearly linear in the batch and the
hidden scoring is a net gain; keep ``chunks=1`` for small CPU jobs.

``remote_overlap`` is ``RewardFineTuningModule(score_chunks=C)`` (the collection calls
:func:`~lightning_nft.rewards.async_scoring.rollout_and_score`).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_nft.callbacks import EMAOldPolicy, KLAnchor
from lightning_nft.models import load_pretrained_digits_flow
from lightning_nft.module import RewardFineTuningModule, adamw
from lightning_nft.objectives import NFTObjective
from lightning_nft.rewards import DigitClassifierReward, RemoteReward

HERE = Path(__file__).resolve().parent


class SlowDigitReward(DigitClassifierReward):
    """``DigitClassifierReward`` that sleeps ``latency + per_sample * B`` seconds per call (a slow scorer)."""

    def __init__(self, target: Optional[int] = 3, mode: str = "prob", latency: float = 0.1,
                 per_sample: float = 0.0) -> None:
        super().__init__(target=target, mode=mode)
        self.latency = float(latency)
        self.per_sample = float(per_sample)

    def forward(self, samples, cond=None):
        time.sleep(self.latency + self.per_sample * samples.shape[0])
        return super().forward(samples, cond)


class RoundTimer(Callback):
    """Round starts (before the collection: this callback runs before the module's ``OnlineRollout``) and
    first-step starts (after it): round time and collection time (sampling + scoring)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.collected: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.collected.append(time.perf_counter() - self.starts[-1])

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())

    def round_times(self, skip: int = 1) -> list[float]:
        return [b - a for a, b in zip(self.starts[:-1], self.starts[1:])][skip:]

    def collection_times(self, skip: int = 1) -> list[float]:
        return self.collected[skip:]


def start_server(latency: float, per_sample: float) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lightning_nft", "serve-reward", "--reward.class_path", "reward_overlap.SlowDigitReward",
           "--reward.init_args.target", "3", "--reward.init_args.latency", str(latency),
           "--reward.init_args.per_sample", str(per_sample), "--port", "0",
           "--torch_threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"reward server did not start: {line!r}")
    return proc, line.strip().rsplit(" ", 1)[-1]


def make_module(arm: str, url: str, chunks: int) -> RewardFineTuningModule:
    reward = DigitClassifierReward(target=3) if arm == "local" else RemoteReward(url, timeout=30, seed=0)
    return RewardFineTuningModule(load_pretrained_digits_flow(), reward, NFTObjective(beta=1.0), sample_shape=[1, 8, 8],
                                  groups_per_round=8, group_size=32, steps_per_round=8, n_sample_steps=10,
                                  optimizer=adamw(5e-4), score_chunks=chunks if arm == "remote_overlap" else 1)


def run_arm(arm: str, url: str, rounds: int, chunks: int) -> tuple[list[float], list[float]]:
    timer = RoundTimer()
    trainer = pl.Trainer(max_epochs=rounds, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer, EMAOldPolicy(schedule="ramp", ramp_rate=0.05, max_decay=0.9),
                                    KLAnchor(weight=0.03)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(make_module(arm, url, chunks))
    return timer.round_times(), timer.collection_times()


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--per_sample", type=float, default=0.0, help="extra scoring seconds per sample")
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    proc, url = start_server(args.latency, args.per_sample)
    arms = ["local", "remote", "remote_overlap"]
    times: dict[str, list[float]] = {a: [] for a in arms}
    collect: dict[str, list[float]] = {a: [] for a in arms}
    rep_ratios: dict[str, list[float]] = {a: [] for a in arms}
    order = random.Random(0)
    try:
        for _ in range(args.reps):
            rep: dict[str, float] = {}
            for arm in order.sample(arms, len(arms)):  # a new order each repetition: no arm always first
                rounds, collections = run_arm(arm, url, args.rounds, args.chunks)
                times[arm].extend(rounds)
                collect[arm].extend(collections)
                rep[arm] = statistics.median(rounds)
            for arm in arms:
                rep_ratios[arm].append(rep[arm] / rep["local"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    med = {a: statistics.median(v) for a, v in times.items()}
    col = {a: statistics.median(v) for a, v in collect.items()}
    print(f"latency {args.latency:.3f} s per request + {args.per_sample * 1000:.1f} ms per sample, chunks {args.chunks}, "
          f"{len(times['local'])} rounds per arm")
    for arm in arms:
        print(f"{arm:>15}: median round {med[arm] * 1000:7.1f} ms (ratio of medians {med[arm] / med['local']:.3f}, "
              f"median of per-repetition ratios {statistics.median(rep_ratios[arm]):.3f}); "
              f"collection {col[arm] * 1000:7.1f} ms ({(col[arm] - col['local']) * 1000:+7.1f} ms)")
    return {"round": med, "collection": col, "ratios": rep_ratios}


if __name__ == "__main__":
    main()
