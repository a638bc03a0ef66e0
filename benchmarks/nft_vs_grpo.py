r"""DiffusionNFT against Flow-GRPO on the digits task: images and wall time to reach mean reward 0.9.

The task (``configs/digits_nft.yaml``): fine-tune the shipped unconditional 8x8 digits flow so that the
shipped classifier calls its samples a "3"; the reward is the classifier's probability
``R(x) = softmax(f(x))_3 in (0, 1)``. Each method runs with **its own shipped config**, read from YAML
and changed only where a benchmark must (seed, round cap, no logger / checkpoints / pictures):

* ``nft``: ``configs/digits_nft.yaml`` as shipped, the main job (Euler ODE rollouts, NFT loss with
  ``beta = 1``, old policy an EMA whose decay ramps to 0.9, set explicitly here, KL anchor ``kl_weight = 0.03``,
  AdamW ``5e-4``): chosen for a stable 150-round run, not for speed;
* ``nft-d0``: the same with the old policy a hard copy every round (``EMAOldPolicy`` decay 0, online NFT with
  the KL anchor). This is the one change to NFT that the same small tuning effort as GRPO's found (seed 0:
  ramp to 0.9 -> 0.9 crossed at round 57; max decay 0.5 -> 28; no KL anchor -> 34; decay 0 -> 15; lr 1e-3 or
  beta 0.3 did not help), so the table shows NFT as shipped and NFT tuned. (The hard copy is not shipped:
  over the main job's 150 rounds it peaks at round ~40 and then degrades to reward 0; see
  ``benchmarks/method_choice.py``);
* ``grpo``: ``configs/digits_grpo.yaml`` (Flow-GRPO SDE rollouts, PPO-clip on all 10 transitions, KL on the
  transition means, hard-copy old policy; its tuning is documented in that file).

Shared by construction (checked at start-up, the script refuses otherwise): the base model, the reward,
``n_sample_steps = 10``, ``groups_per_round x group_size = 8 x 32 = 256`` images per round and
``steps_per_round = 8`` gradient steps per round.

**What is measured.** A round costs 256 *sampled images* (the rollouts; evaluation images are not counted).
After every round the current policy is evaluated on one fixed set of 256 noises (the same for every
method, seed and round) with the deterministic Euler sampler of 10 steps, by
:class:`lightning_nft.callbacks.SampleQuality` (reward, and diversity = mean pairwise distance of
:class:`lightning_nft.models.DigitFeatures` features, FID against the real 3s). The threshold is met at the
first round whose **fixed-noise evaluation** mean reward is ``>= 0.9`` ("images" = rounds x 256 at that
point). The per-round **rollout** mean reward (what the method trains on: NFT's rollouts come from the
lagging EMA old policy with the ODE; GRPO's from the SDE sampler) is reported beside it, with its own
crossing. Wall time is the training time of the fit (rollouts, rewards, gradient steps, callbacks, Lightning
overhead) up to the end of the crossing round, *excluding* the evaluations; it depends on the machine's load.
A run stops once both crossings happened or at ``--max-images`` (then "not reached within N images").
Diversity and FID are reported at the fixed-noise crossing (equal reward, the fair point to compare
diversity), or at the cap.

Outputs: a table on stdout, ``benchmarks/out/nft_vs_grpo.png`` (left: fixed-noise reward against sampled
images, mean over seeds and each seed; right: reward against diversity over the rounds, crossings marked,
the diversity of the real 3s dashed) and ``benchmarks/out/nft_vs_grpo.json`` (all per-round numbers).

    python benchmarks/nft_vs_grpo.py                         # 3 seeds, the three arms, cap 80 rounds (20480 images)
    python benchmarks/nft_vs_grpo.py --seeds 0 --max-images 5120 --methods grpo
    python benchmarks/nft_vs_grpo.py --grpo-config my_grpo.yaml     # any other GRPO recipe

Runs on one CPU thread (``torch.set_num_threads(1)``: the small conv net is fastest so); the default run
takes about 3 minutes on a lightly loaded machine.

Measured (default run; image counts are deterministic, wall times depend on the load)::

    arm      images to 0.9 (seeds 0/1/2)   median   wall s (median)   diversity / FID at 0.9 (mean)
    nft      14592 / 10752 / 14336          14336        20.5            24.8 / 68.0
    nft-d0    3840 /  3328 /  3840           3840         5.3            23.4 / 63.8
    grpo      4864 /  3328 /  3840           3840        12.5            25.0 / 68.5

GRPO / NFT images: 0.27x against NFT as shipped, 1.00x against nft-d0 (target >= 3x: not met); wall time
GRPO / nft-d0 2.35x (a GRPO round trains on all 10 transitions of each trajectory). Reward against
diversity follows one curve for all three arms (diversity falls from 45 for all digits to about 24, that of
the real 3s, as the reward reaches 0.9): in this miniature the method does not change the trade-off.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lightning_nft.callbacks import SampleQuality
from lightning_nft.cli import NFTLightningCLI
from lightning_nft.data import DigitsReference
from lightning_nft.models import DigitFeatures

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
THRESHOLD = 0.9
EVAL_SEED = 1234
# callbacks that take part in training; the pictures, writers, checkpoints and metrics of the configs are dropped
TRAINING_CALLBACKS = ("EMAOldPolicy", "KLAnchor", "OnlineRollout")
SHARED_KEYS = ("sample_shape", "groups_per_round", "group_size", "steps_per_round", "n_sample_steps", "backbone",
               "reward")


# ---------------------------------------------------------------------------------------------- configs
def with_old_policy(config: dict, init_args: dict) -> dict:
    """``config`` with its ``EMAOldPolicy`` callback's arguments replaced by ``init_args``."""
    cfg = copy.deepcopy(config)
    found = False
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].rsplit(".", 1)[-1] == "EMAOldPolicy":
            cb["init_args"] = dict(init_args)
            found = True
    if not found:
        raise SystemExit("the NFT config has no EMAOldPolicy callback to change")
    return cfg


def hard_copy_old_policy(config: dict) -> dict:
    """``config`` with its ``EMAOldPolicy`` a hard copy every round (decay 0)."""
    return with_old_policy(config, {"schedule": "constant", "decay": 0.0})


def ema_ramp_old_policy(config: dict) -> dict:
    """``config`` with its ``EMAOldPolicy`` the EMA whose decay ramps to 0.9 (the shipped NFT configs' choice)."""
    return with_old_policy(config, {"schedule": "ramp", "ramp_rate": 0.05, "max_decay": 0.9})


# arm -> (which config file, how it is changed)
ARMS = {"nft": ("nft", ema_ramp_old_policy), "nft-d0": ("nft", hard_copy_old_policy), "grpo": ("grpo", lambda c: c)}


def load_config(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def check_same_task(configs: dict[str, dict]) -> None:
    """Refuse to compare configs that differ in the model, reward, sampler steps or images per round."""
    names = list(configs)
    first = configs[names[0]]["model"]["init_args"]
    for name in names[1:]:
        other = configs[name]["model"]["init_args"]
        for key in SHARED_KEYS:
            if first.get(key) != other.get(key):
                raise SystemExit(f"{names[0]} and {name} differ in model.init_args.{key}: "
                                 f"{first.get(key)!r} vs {other.get(key)!r}; the comparison needs them equal")


def benchmark_config(config: dict, seed: int, max_rounds: int, root_dir: str) -> dict:
    """The config with the benchmark's seed and cap, no logger/checkpoints/pictures, only training callbacks."""
    cfg = copy.deepcopy(config)
    cfg["seed_everything"] = int(seed)
    cfg["torch_threads"] = 1
    trainer = cfg.setdefault("trainer", {})
    trainer.update(max_epochs=int(max_rounds), default_root_dir=root_dir, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    trainer["callbacks"] = [cb for cb in trainer.get("callbacks", [])
                            if cb["class_path"].rsplit(".", 1)[-1] in TRAINING_CALLBACKS]
    cfg["model"]["init_args"]["rollout_seed"] = int(seed)
    return cfg


def build(cfg: dict, workdir: Path) -> tuple[pl.Trainer, pl.LightningModule]:
    """Instantiate trainer and module from ``cfg`` through our CLI (so the YAML means what it means in ``fit``)."""
    path = workdir / "config.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    cli = NFTLightningCLI(model_class=None, datamodule_class=None, parser_kwargs={"parser_mode": "omegaconf"},
                          save_config_callback=None, args=["--config", str(path)], run=False,
                          auto_configure_optimizers=False)
    return cli.trainer, cli.model


# ---------------------------------------------------------------------------------------------- the tracker
class Tracker(Callback):
    """After every round: rollout reward, fixed-noise evaluation (``SampleQuality.evaluate``), training clock.

    ``rows[k]`` describes the policy after ``k`` rounds (``k = 0``: the base model, before training).
    The evaluation's time is excluded from ``wall``. Stops the fit once both the evaluation and the
    rollout mean reward reached ``threshold``.
    """

    def __init__(self, quality: SampleQuality, images_per_round: int, threshold: float = THRESHOLD,
                 stop: bool = True) -> None:
        self.quality = quality
        self.stop = stop
        self.images_per_round = images_per_round
        self.threshold = threshold
        self.rows: list[dict[str, float]] = []
        self._t0 = 0.0
        self._excluded = 0.0

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        start = time.perf_counter()
        row = dict(self.quality.evaluate(trainer, pl_module))
        self._excluded += time.perf_counter() - start
        return row

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.quality.setup(trainer, pl_module, "fit")
        self.quality.history = []
        ev = self._evaluate(trainer, pl_module)
        self.rows = [{"round": 0, "images": 0, "wall": 0.0, "eval_reward": ev["reward"], "diversity": ev["diversity"],
                      "fid": ev["fid"], "rollout_reward": float("nan")}]
        self._excluded = 0.0
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wall = time.perf_counter() - self._t0 - self._excluded
        rollout = float(pl_module.rollouts.rewards.mean())
        ev = self._evaluate(trainer, pl_module)
        k = trainer.current_epoch + 1
        self.rows.append({"round": k, "images": k * self.images_per_round, "wall": wall, "eval_reward": ev["reward"],
                          "diversity": ev["diversity"], "fid": ev["fid"], "rollout_reward": rollout})
        crossed = all(first_crossing(self.rows, key, self.threshold) for key in ("eval_reward", "rollout_reward"))
        if self.stop and crossed:
            trainer.should_stop = True


def first_crossing(rows: list[dict[str, float]], key: str, threshold: float) -> Optional[dict[str, float]]:
    for row in rows:
        if row[key] >= threshold:  # NaN compares False
            return row
    return None


def run_one(name: str, config: dict, seed: int, max_rounds: int, threshold: float = THRESHOLD,
            stop: bool = True) -> dict[str, Any]:
    """Fine-tune with ``config`` for at most ``max_rounds`` rounds (``stop``: until both crossings); the rows."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = benchmark_config(config, seed, max_rounds, tmp)
        trainer, module = build(cfg, Path(tmp))
        target = module.reward.target
        quality = SampleQuality(DigitFeatures(), DigitsReference(label=target), n_samples=256, seed=EVAL_SEED,
                                plot_filename=None)
        tracker = Tracker(quality, module.groups_per_round * module.group_size, threshold, stop)
        trainer.callbacks.append(tracker)
        start = time.perf_counter()
        trainer.fit(module)
        total = time.perf_counter() - start
    return {"method": name, "seed": seed, "rows": tracker.rows, "total_seconds": total,
            "reference_diversity": quality.reference_diversity}


# ---------------------------------------------------------------------------------------------- report
def summarize(run: dict[str, Any], threshold: float) -> dict[str, Any]:
    rows = run["rows"]
    ev = first_crossing(rows, "eval_reward", threshold)
    ro = first_crossing(rows, "rollout_reward", threshold)
    at = ev if ev is not None else rows[-1]
    return {"method": run["method"], "seed": run["seed"],
            "images": ev["images"] if ev else None, "wall": ev["wall"] if ev else None,
            "rollout_images": ro["images"] if ro else None,
            "reward_at": at["eval_reward"], "diversity_at": at["diversity"], "fid_at": at["fid"],
            "cap_images": rows[-1]["images"] if ev is None else None}


def _fmt_images(v: Optional[float], cap: int) -> str:
    return f"{v:.0f}" if v is not None else f">{cap}"


def print_table(summaries: list[dict[str, Any]], max_images: int, threshold: float,
                reference_diversity: float) -> dict[str, dict[str, Any]]:
    print(f"\nimages and wall time to mean reward >= {threshold} (fixed-noise Euler evaluation of 256 images after "
          f"every round; '>N': not reached within N images)")
    hdr = (f"{'method':<7} {'seed':>4} {'images':>7} {'wall s':>7} {'rollout imgs':>12} {'reward':>7} "
           f"{'diversity':>9} {'FID':>7}")
    print(hdr)
    print("-" * len(hdr))
    for s in summaries:
        wall = f"{s['wall']:.1f}" if s["wall"] is not None else "-"
        print(f"{s['method']:<7} {s['seed']:>4} {_fmt_images(s['images'], max_images):>7} {wall:>7} "
              f"{_fmt_images(s['rollout_images'], max_images):>12} {s['reward_at']:>7.3f} {s['diversity_at']:>9.3f} "
              f"{s['fid_at']:>7.2f}")
    print(f"(reward, diversity, FID: at the fixed-noise crossing, or at the cap; real 3s: diversity "
          f"{reference_diversity:.3f})")
    agg: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(s["method"] for s in summaries):
        mine = [s for s in summaries if s["method"] == method]
        reached = [s for s in mine if s["images"] is not None]
        agg[method] = {
            "reached": len(reached), "runs": len(mine),
            "median_images": statistics.median(s["images"] for s in reached) if len(reached) == len(mine) else None,
            "mean_images": statistics.mean(s["images"] for s in reached) if len(reached) == len(mine) else None,
            "median_wall": statistics.median(s["wall"] for s in reached) if len(reached) == len(mine) else None,
            "mean_diversity": statistics.mean(s["diversity_at"] for s in mine),
            "mean_fid": statistics.mean(s["fid_at"] for s in mine),
        }
    print("\nper method (median over seeds; a method that missed the threshold in any seed has no median)")
    for method, a in agg.items():
        missed = a["runs"] - a["reached"]
        imgs = f"{a['median_images']:.0f}" if a["median_images"] is not None else f">{max_images} in {missed} seed(s)"
        wall = f"{a['median_wall']:.1f} s" if a["median_wall"] is not None else "-"
        print(f"  {method:<7} reached {a['reached']}/{a['runs']}  images {imgs}  wall {wall}  "
              f"diversity {a['mean_diversity']:.3f}  FID {a['mean_fid']:.2f}")
    for arm in (a for a in agg if a.startswith("nft")):
        if "grpo" in agg:
            print("  " + ratio_line(arm, agg[arm], agg["grpo"], max_images))
    return agg


def ratio_line(arm: str, n: dict[str, Any], g: dict[str, Any], max_images: int) -> str:
    """GRPO's images over NFT's (medians over seeds); a bound when one side missed the threshold."""
    if n["median_images"] and g["median_images"]:
        return (f"GRPO / {arm}: images {g['median_images'] / n['median_images']:.2f}x (target >= 3x), "
                f"wall time {g['median_wall'] / n['median_wall']:.2f}x")
    if n["median_images"]:
        return (f"GRPO / {arm}: images > {max_images / n['median_images']:.2f}x (GRPO missed the threshold within "
                f"{max_images} images in {g['runs'] - g['reached']} seed(s))")
    if g["median_images"]:
        return (f"GRPO / {arm}: images < {g['median_images'] / max_images:.2f}x ({arm} missed the threshold within "
                f"{max_images} images in {n['runs'] - n['reached']} seed(s))")
    return f"GRPO / {arm}: no ratio (both missed the threshold in some seed)"


def plot(runs: list[dict[str, Any]], summaries: list[dict[str, Any]], path: Path, threshold: float,
         reference_diversity: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"nft": "tab:blue", "nft-d0": "tab:cyan", "grpo": "tab:red"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        c = colors.get(method, None)
        for r in mine:
            x = [row["images"] for row in r["rows"]]
            ax1.plot(x, [row["eval_reward"] for row in r["rows"]], color=c, alpha=0.35, lw=1)
            ax1.plot(x[1:], [row["rollout_reward"] for row in r["rows"][1:]], color=c, alpha=0.35, lw=1, ls=":")
        # mean over seeds on the rounds every seed ran (runs stop at different rounds)
        n = min(len(r["rows"]) for r in mine)
        x = [mine[0]["rows"][i]["images"] for i in range(n)]
        mean = [statistics.mean(r["rows"][i]["eval_reward"] for r in mine) for i in range(n)]
        ax1.plot(x, mean, color=c, lw=2.2, label=f"{method.upper()} (fixed-noise eval, mean of {len(mine)} seeds)")
        ax1.plot([], [], color=c, lw=1, ls=":", label=f"{method.upper()} rollout mean (each seed)")
        for s in summaries:
            if s["method"] == method and s["images"] is not None:
                ax1.plot(s["images"], s["reward_at"], marker="*", ms=10, color=c, mec="k", mew=0.6)
        for r in mine:
            div = [row["diversity"] for row in r["rows"]]
            rew = [row["eval_reward"] for row in r["rows"]]
            ax2.plot(div, rew, "-", color=c, alpha=0.5, lw=1, marker=".", ms=3,
                     label=f"{method.upper()}" if r is mine[0] else None)
        for s in summaries:
            if s["method"] == method:
                ax2.plot(s["diversity_at"], s["reward_at"], marker="*" if s["images"] is not None else "x", ms=11,
                         color=c, mec="k", mew=0.6)
    ax1.axhline(threshold, color="k", lw=0.8, ls="--")
    ax1.set_xlabel("sampled images (rollouts)")
    ax1.set_ylabel("mean reward  P(classifier says 3)")
    ax1.set_title("reward vs sampled images (* = 0.9 reached)")
    ax1.legend(fontsize=7, loc="lower right")
    ax1.set_ylim(0, 1.02)
    ax2.axhline(threshold, color="k", lw=0.8, ls="--")
    ax2.axvline(reference_diversity, color="tab:green", ls="--", lw=1, label="real 3s")
    ax2.set_xlabel("diversity (mean pairwise DigitFeatures distance)")
    ax2.set_ylabel("mean reward (fixed-noise eval)")
    ax2.set_title("reward vs diversity over rounds (* = 0.9 reached, x = cap)")
    ax2.legend(fontsize=7, loc="lower left")
    ax2.set_ylim(0, 1.02)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nft-config", default=str(ROOT / "configs" / "digits_nft.yaml"))
    p.add_argument("--grpo-config", default=str(ROOT / "configs" / "digits_grpo.yaml"))
    p.add_argument("--methods", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-images", type=int, default=20480, help="cap per run (rounded down to whole rounds)")
    p.add_argument("--threshold", type=float, default=THRESHOLD)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--tag", default="nft_vs_grpo", help="file name stem of the PNG and JSON")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    files = {"nft": Path(args.nft_config), "grpo": Path(args.grpo_config)}
    configs = {m: ARMS[m][1](load_config(files[ARMS[m][0]])) for m in args.methods}
    check_same_task(configs)
    ia = next(iter(configs.values()))["model"]["init_args"]
    per_round = int(ia["groups_per_round"]) * int(ia["group_size"])
    max_rounds = max(1, args.max_images // per_round)
    max_images = max_rounds * per_round

    runs = []
    for seed in args.seeds:
        for method in args.methods:
            run = run_one(method, configs[method], seed, max_rounds)
            s = summarize(run, args.threshold)
            print(f"{method:<7} seed {seed}: {len(run['rows']) - 1} rounds in {run['total_seconds']:.1f} s; "
                  f"eval reward "
                  f"{run['rows'][0]['eval_reward']:.3f} -> {run['rows'][-1]['eval_reward']:.3f}; "
                  f"images to {args.threshold}: {_fmt_images(s['images'], max_images)}", flush=True)
            runs.append(run)
    summaries = [summarize(r, args.threshold) for r in runs]
    ref_div = runs[0]["reference_diversity"]
    agg = print_table(summaries, max_images, args.threshold, ref_div)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, summaries, out / f"{args.tag}.png", args.threshold, ref_div)
    with open(out / f"{args.tag}.json", "w") as f:
        json.dump({"args": vars(args), "max_images": max_images, "runs": runs, "summaries": summaries,
                   "per_method": agg}, f, indent=1)
    print(f"\nwrote {out / (args.tag + '.png')} and {out / (args.tag + '.json')}")
    return {"runs": runs, "summaries": summaries, "per_method": agg}


if __name__ == "__main__":
    main()
