r"""Which method to choose: DiffusionNFT, Flow-GRPO, the Reward-Score-Matching redesign and Adjoint Matching on
equal compute, on several tasks (issue 15).

**Unit.** Compute is counted by the module's :class:`lightning_nft.compute.ComputeLedger` at the policy-call
boundary: every row through the velocity network is one forward, a differentiated forward adds a backward of
2 forward-equivalents (forward + backward = 3). Rollout sampling and training count; the benchmark's
evaluations do not. Reported per task and arm at the first round whose **fixed-noise evaluation** (256
noises, deterministic Euler, 10 steps, the same for every arm) reaches the task's threshold:
forward-equivalents, sampled images, wall time (training only, evaluations excluded; load-dependent), and the
diversity and FID of the evaluation samples there (``lightning_nft.callbacks.SampleQuality``).

**Tasks** (same base ``PretrainedDigitsFlow``, ``n_sample_steps = 10``, ``8 x 32 = 256`` images and 8 gradient
steps per round for every arm; the script refuses otherwise):

* ``digits``: the classifier's probability of a "3" (``DigitClassifierReward(target=3, mode="prob")``);
  threshold 0.9 (as ``benchmarks/nft_vs_grpo.py``).
* ``jpeg``: JPEG compressibility, black-box (``JpegCompressibility(quality=95, upscale=4)``, negative kB);
  threshold fixed by rule before any arm ran: a mean file **15 % smaller** than the base model's on the
  evaluation noises (``0.85 x`` the base evaluation reward, about ``-0.69`` kB from ``-0.81``).
* The text-to-image prompt-alignment task of "Text-to-image fine-tuning, part 1" has not landed on main
  (checked ``git log`` of main at the time of writing): not run.

**Arms and the tuning budget** (every family gets at most two settings, all listed here; none was tuned in
this script's runs, and the threshold is never changed):

* ``nft``: the task's shipped NFT config (EMA old policy ramping to 0.9, KL anchor 0.03, ``beta = 1``).
* ``nft-d0``: the same with a hard-copy old policy each round (the one change ``benchmarks/nft_vs_grpo.py``'s
  documented search found).
* ``grpo``: ``configs/digits_grpo.yaml`` (ours: exponential-integrator SDE, exact summed log-ratio, exact KL),
  reward swapped per task.
* ``grpo-parity``: Flow-GRPO's own code choices (``sde_step="euler_maruyama"``, ``kl_form="flow_grpo"``,
  ``log_prob_reduction="mean"``) with ``clip_range`` and ``kl_weight`` translated so that they act as
  ``grpo``'s: clip ``0.2 / D`` (``D = 64`` pixels) on the mean log-ratio; the mean reduction scales the policy
  gradient and the KL both by ``1 / D`` (AdamW is invariant to a common scale) and Flow-GRPO's KL is the exact
  one times ``h = 0.1``, so the KL weight is ``0.1 / h``. (A first run with ``0.1 D / h`` made the KL ``D``
  times too strong and the arm did not move: recorded in ``out/method_choice.json``.)
* ``rsm-ev``: the Reward-Score-Matching redesign of the zeroth-order family ("Reward Score Matching", sec. 5.2):
  one-step branching with width 32 (= group size), the branching budget ``p_j \propto c_j^2``
  (``branch_probs="equal_variance"``), fair clipping (Eq. 24), KL 0.1.
* ``rsm-early``: the same with the budget on the first 5 (low-SNR) steps only, the paper's choice for a semantic
  reward; the other steps switched off.
* ``am``: ``configs/digits_adjoint.yaml`` (differentiable rewards only: ``digits``), set to the shared
  rollout size, sampler steps and gradient steps; it trains on the log-probability reward and is evaluated on
  the task reward.

Outputs: a table on stdout, ``benchmarks/out/method_choice.{json,png}`` (per-round rows with the ledger).

    python benchmarks/method_choice.py                              # both tasks, all arms, seed 0, cap 12800 images
    python benchmarks/method_choice.py --tasks digits --arms nft-d0 grpo --max-images 5120
    python benchmarks/method_choice.py --report a.json b.json       # merge runs into one table and plot

One CPU thread. On the shared 2-core machine (load from other jobs) a digits arm took 2-10 minutes, so the
measured run was split by task and arm and merged with ``--report``::

    python benchmarks/method_choice.py --tasks digits --arms nft nft-d0 grpo --max-images 7680
    python benchmarks/method_choice.py --tasks digits --arms rsm-ev rsm-early am --max-images 7680 --tag method_choice_digits_rsm
    python benchmarks/method_choice.py --tasks digits --arms grpo-parity --max-images 7680 --tag method_choice_digits_parity
    python benchmarks/method_choice.py --tasks jpeg --arms nft-d0 grpo rsm-ev nft --max-images 5120 --tag method_choice_jpeg
    python benchmarks/method_choice.py --tasks jpeg --arms grpo-parity --max-images 5120 --tag method_choice_jpeg_parity
    cd benchmarks/out && python ../method_choice.py --out . --tag method_choice_all --report method_choice.json \
        method_choice_digits_parity.json method_choice_digits_rsm.json method_choice_jpeg.json method_choice_jpeg_parity.json

Measured (seed 0; forward-equivalents and images are deterministic, wall times are not)::

    task    arm          threshold  fwd-equiv  images  reward diversity     FID
    digits  nft              0.900  >1.15e+05   >7680   0.794     29.61  127.99
    digits  nft-d0           0.900   5.76e+04    3840   0.910     23.46   51.01
    digits  grpo             0.900   2.56e+05    5120   0.903     25.31   72.98
    digits  grpo-parity      0.900   1.41e+05    2816   0.913     24.73   36.77
    digits  rsm-ev           0.900  >1.08e+05   >7680   0.422     40.33  821.63
    digits  rsm-early        0.900    4.3e+04    3072   0.916     23.89   81.47
    digits  am               0.900  >4.99e+05   >7680   0.883     26.28   44.84
    jpeg    nft-d0          -0.689   6.14e+04    4096  -0.682     33.22  687.33
    jpeg    grpo            -0.689   1.54e+05    3072  -0.687     38.55  485.96
    jpeg    rsm-ev          -0.689   6.09e+04    4352  -0.688     41.61  225.76
    jpeg    nft             -0.689  >7.68e+04   >5120  -0.719     40.19  340.22
    jpeg    grpo-parity     -0.689   1.02e+05    2048  -0.683     41.10  394.08

Target (NFT best >= 3x fewer forward-equivalents than the GRPO family's best at equal or better diversity):
**not met** on either task: best zeroth-order / best NFT = 0.75x on digits (rsm-early vs nft-d0) and 0.99x on
JPEG (rsm-ev vs nft-d0). Against plain Flow-GRPO it holds on digits (4.4x ours, 2.5x parity) and not on JPEG
(2.5x, 1.7x). The reason: one-step branching trains one transition per sample instead of all 10, which removes
most of GRPO's cost (training forwards + backwards of every transition); rollouts cost the same for every arm.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nft_vs_grpo import (  # noqa: E402  (the shared machinery of the two-arm digits benchmark)
    EVAL_SEED,
    OUT,
    ROOT,
    Tracker,
    benchmark_config,
    build,
    first_crossing,
    hard_copy_old_policy,
    load_config,
)

from lightning_nft.callbacks import SampleQuality  # noqa: E402
from lightning_nft.data import DigitsReference  # noqa: E402
from lightning_nft.models import DigitFeatures  # noqa: E402
from lightning_nft.rewards import DigitClassifierReward, JpegCompressibility  # noqa: E402

SHARED = {"sample_shape": [1, 8, 8], "groups_per_round": 8, "group_size": 32, "steps_per_round": 8,
          "n_sample_steps": 10}
PIXELS, STEP = 64, 0.1
REWARDS = {
    "digits": {"class_path": "lightning_nft.rewards.DigitClassifierReward", "init_args": {"target": 3, "mode": "prob"}},
    "jpeg": {"class_path": "lightning_nft.rewards.JpegCompressibility", "init_args": {"quality": 95, "upscale": 4}},
}
NFT_CONFIGS = {"digits": "digits_nft.yaml", "jpeg": "digits_nft_jpeg.yaml"}


def _objective_args(cfg: dict) -> dict:
    return cfg["model"]["init_args"]["objective"]["init_args"]


def _grpo(task: str) -> dict:
    cfg = load_config(ROOT / "configs" / "digits_grpo.yaml")
    cfg["model"]["init_args"]["reward"] = copy.deepcopy(REWARDS[task])
    return cfg


def grpo_parity(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    args = _objective_args(cfg)
    args.update(sde_step="euler_maruyama", kl_form="flow_grpo", log_prob_reduction="mean",
                clip_range=float(args["clip_range"]) / PIXELS, kl_weight=float(args["kl_weight"]) / STEP)
    return cfg


def rsm(branch_steps: Optional[list[int]], branch_probs: Optional[str]) -> Callable[[dict], dict]:
    def change(cfg: dict) -> dict:
        cfg = copy.deepcopy(cfg)
        args = _objective_args(cfg)
        args.update(branch_width=int(cfg["model"]["init_args"]["group_size"]), clipping="fair",
                    branch_steps=branch_steps, branch_probs=branch_probs)
        return cfg
    return change


def _adjoint(task: str) -> dict:
    cfg = load_config(ROOT / "configs" / "digits_adjoint.yaml")
    cfg["model"]["init_args"].update(copy.deepcopy(SHARED))
    return cfg


# arm -> (task -> base config, change); a task an arm cannot run raises KeyError in ``config_for``
ARMS: dict[str, tuple[Callable[[str], dict], Callable[[dict], dict]]] = {
    "nft": (lambda task: load_config(ROOT / "configs" / NFT_CONFIGS[task]), lambda c: c),
    "nft-d0": (lambda task: load_config(ROOT / "configs" / NFT_CONFIGS[task]), hard_copy_old_policy),
    "grpo": (_grpo, lambda c: c),
    "grpo-parity": (_grpo, grpo_parity),
    "rsm-ev": (_grpo, rsm(None, "equal_variance")),
    "rsm-early": (_grpo, rsm([0, 1, 2, 3, 4], None)),
    "am": (_adjoint, lambda c: c),
}
DIFFERENTIABLE_ONLY = {"am"}
TASKS = ("digits", "jpeg")


def config_for(arm: str, task: str) -> dict:
    base, change = ARMS[arm]
    cfg = change(base(task))
    init = cfg["model"]["init_args"]
    for key, value in SHARED.items():
        if init.get(key) != value:
            raise SystemExit(f"arm {arm} on {task}: model.init_args.{key} = {init.get(key)!r}, the benchmark needs {value!r}")
    return cfg


def task_reward(task: str) -> torch.nn.Module:
    return DigitClassifierReward(target=3, mode="prob") if task == "digits" else JpegCompressibility(95, 4)


@contextlib.contextmanager
def reward_swapped(module: pl.LightningModule, reward: torch.nn.Module) -> Iterator[None]:
    """Evaluate with the task reward (Adjoint Matching trains on the log-probability)."""
    trained, module.reward = module.reward, reward
    try:
        yield
    finally:
        module.reward = trained


class LedgerTracker(Tracker):
    """``Tracker`` rows plus the compute ledger, evaluated on the task reward; threshold set after round 0 when
    ``threshold_rule`` is given (``base eval reward -> threshold``)."""

    def __init__(self, quality: SampleQuality, images_per_round: int, threshold: float, reward: torch.nn.Module,
                 threshold_rule: Optional[Callable[[float], float]] = None) -> None:
        super().__init__(quality, images_per_round, threshold, stop=True)
        self.reward, self.threshold_rule = reward, threshold_rule

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        with reward_swapped(pl_module, self.reward.to(pl_module.device)):
            return super()._evaluate(trainer, pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.threshold_rule is not None:
            self.threshold = float(self.threshold_rule(self.rows[0]["eval_reward"]))
        self.rows[0].update(forward_equivalents=0.0, threshold=self.threshold)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        ledger = pl_module.compute_ledger
        self.rows[-1].update(forward_equivalents=ledger.forward_equivalents(), ledger=ledger.summary(),
                             threshold=self.threshold)
        # stop on the evaluation crossing alone (the rollout crossing is not needed here)
        trainer.should_stop = first_crossing(self.rows, "eval_reward", self.threshold) is not None


THRESHOLDS: dict[str, tuple[float, Optional[Callable[[float], float]]]] = {
    "digits": (0.9, None),
    "jpeg": (float("nan"), lambda base: 0.85 * base),  # 15 % smaller mean JPEG file than the base
}


def run_arm(arm: str, task: str, seed: int, max_rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = benchmark_config(config_for(arm, task), seed, max_rounds, tmp)
        trainer, module = build(cfg, Path(tmp))
        label = 3 if task == "digits" else None
        quality = SampleQuality(DigitFeatures(), DigitsReference(label=label), n_samples=256, seed=EVAL_SEED,
                                plot_filename=None)
        threshold, rule = THRESHOLDS[task]
        tracker = LedgerTracker(quality, module.groups_per_round * module.group_size, threshold, task_reward(task), rule)
        trainer.callbacks.append(tracker)
        start = time.perf_counter()
        trainer.fit(module)
        total = time.perf_counter() - start
    rows = tracker.rows
    hit = first_crossing(rows, "eval_reward", tracker.threshold)
    at = hit if hit is not None else rows[-1]
    return {"arm": arm, "task": task, "seed": seed, "threshold": tracker.threshold, "rows": rows,
            "total_seconds": total, "reached": hit is not None,
            "forward_equivalents": at["forward_equivalents"], "images": at["images"], "wall": at["wall"],
            "reward_at": at["eval_reward"], "diversity_at": at["diversity"], "fid_at": at["fid"],
            "reference_diversity": quality.reference_diversity}


def print_table(results: list[dict[str, Any]]) -> None:
    hdr = (f"{'task':<7} {'arm':<12} {'threshold':>9} {'fwd-equiv':>10} {'images':>7} {'wall s':>7} {'reward':>7} "
           f"{'diversity':>9} {'FID':>7}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in results:
        mark = "" if r["reached"] else ">"
        print(f"{r['task']:<7} {r['arm']:<12} {r['threshold']:>9.3f} {mark + format(r['forward_equivalents'], '.3g'):>10} "
              f"{mark + str(r['images']):>7} {r['wall']:>7.1f} {r['reward_at']:>7.3f} {r['diversity_at']:>9.2f} "
              f"{r['fid_at']:>7.2f}")
    print("('>': threshold not reached within the cap; figures at the cap. Forward-equivalents: rollout + training "
          "network rows, a backward = 2.)")
    for task in dict.fromkeys(r["task"] for r in results):
        mine = [r for r in results if r["task"] == task and r["reached"]]
        nft = [r for r in mine if r["arm"].startswith("nft")]
        grpo = [r for r in mine if r["arm"].startswith(("grpo", "rsm"))]
        if nft and grpo:
            n = min(nft, key=lambda r: r["forward_equivalents"])
            g = min(grpo, key=lambda r: r["forward_equivalents"])
            ratio = g["forward_equivalents"] / n["forward_equivalents"]
            div = "equal or better" if n["diversity_at"] >= g["diversity_at"] else "lower"
            print(f"{task}: best zeroth-order family arm {g['arm']} / best NFT {n['arm']}: "
                  f"{ratio:.2f}x forward-equivalents (target >= 3x: {'met' if ratio >= 3 else 'not met'}); "
                  f"NFT diversity {n['diversity_at']:.2f} vs {g['diversity_at']:.2f} ({div})")
        else:
            print(f"{task}: no ratio (NFT reached: {bool(nft)}, GRPO family reached: {bool(grpo)})")


COLORS = {"nft": "tab:blue", "nft-d0": "tab:cyan", "grpo": "tab:red", "grpo-parity": "tab:orange",
          "rsm-ev": "tab:purple", "rsm-early": "tab:brown", "am": "tab:green"}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), dpi=110, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in results if r["task"] == task):
            x = [row["forward_equivalents"] for row in r["rows"]]
            y = [row["eval_reward"] for row in r["rows"]]
            line, = ax.plot(x, y, lw=1.4, label=r["arm"], color=COLORS.get(r["arm"]))
            if r["reached"]:
                ax.plot(r["forward_equivalents"], r["reward_at"], "*", ms=10, color=line.get_color(), mec="k", mew=0.5)
        ax.axhline(results[[r["task"] for r in results].index(task)]["threshold"], color="k", ls="--", lw=0.8)
        ax.set_xscale("symlog", linthresh=1e4)
        ax.set_xlim(left=0)
        ax.set_xlabel("forward-equivalents (rollouts + training)")
        ax.set_ylabel("fixed-noise evaluation reward")
        ax.set_title(f"{task} (* = threshold reached)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-images", type=int, default=12800)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--tag", default="method_choice")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="no runs: merge these result files into one table and plot (stem --tag)")
    args = p.parse_args(argv)
    if args.report:
        results = [r for path in args.report for r in json.loads(Path(path).read_text())["results"]]
        print_table(results)
        plot(results, Path(args.out) / f"{args.tag}.png")
        return results
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    per_round = SHARED["groups_per_round"] * SHARED["group_size"]
    max_rounds = max(1, args.max_images // per_round)
    results = []
    for task in args.tasks:
        for arm in args.arms:
            if arm in DIFFERENTIABLE_ONLY and task != "digits":
                continue
            r = run_arm(arm, task, args.seed, max_rounds)
            print(f"{task:<7} {arm:<12} {len(r['rows']) - 1} rounds, {r['total_seconds']:.0f} s, reward "
                  f"{r['rows'][0]['eval_reward']:.3f} -> {r['reward_at']:.3f} (threshold {r['threshold']:.3f}), "
                  f"{'reached' if r['reached'] else 'not reached'} at {r['forward_equivalents']:.3g} fwd-eq", flush=True)
            results.append(r)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            with open(out / f"{args.tag}.json", "w") as f:  # after every run: a partial table survives a stop
                json.dump({"args": vars(args), "results": results}, f, indent=1)
    print_table(results)
    plot(results, Path(args.out) / f"{args.tag}.png")
    print(f"\nwrote {Path(args.out) / (args.tag + '.json')} and .png")
    return results


if __name__ == "__main__":
    main()
