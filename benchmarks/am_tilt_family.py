"""Adjoint Matching on random mixtures (issue 14): achieved tilt and component-weight TV, plain and bootstrapped adjoint.

Each problem is drawn by ``tests/test_adjoint_matching.py::random_tilt_problem`` (3-5 components, std
0.3-0.6, separated means, non-uniform weights, ``lambda`` 0.5-1.5, a random unit reward direction); the
default seeds 100-104 are not among the tests' seeds. Every problem is fine-tuned under each recipe asked for;
the first two use the plain-torch loop of the tests (``finetune_adjoint_matching``: the exact mixture plus a
zero-initialised residual MLP, 512 memoryless-SDE rollouts per iteration on a 40-step grid):

* ``before``: the plain lean adjoint (``bootstrap_horizon=None``) with the ``"soc"`` weighting ``2 / eta_t``,
  per-minibatch targets (the objective's recipe before issue 14);
* ``bootstrap``: the bootstrapped lean adjoint (``bootstrap_horizon=0.05``, opt-in), same weighting;
* ``fitted``: not that loop but the fitted iteration of ``am_fitted_iteration.py`` (the benchmark's own loop,
  round 4; the library's version is ``shipped``): each iteration freezes the model, draws 30 x 512 importance-split paths of its memoryless SDE on a
  160-step grid, and fits the same network to convergence on their lean-adjoint targets together with the
  previous iteration's (8 epochs); ``--fitted-iterations`` iterations (default 8);
* ``fitted-avg``: the same with two more iterations, returning the mean of the last five iterates' parameters;
* ``shipped``: the library's recipe since issue 14, ``configs/gmm_adjoint.yaml`` (the objective's defaults:
  per-round regression points from importance-split paths, one round replayed; 12 rounds of 30 x 512 rollouts
  on 160 steps, 500 Adam steps per round on a per-round cosine, ``RoundAveraging`` over the last 6 rounds) run
  through ``lightning_nft.cli.main`` with the problem's mixture, direction and ``lambda`` on the command line
  (``--train-seed`` is the config's ``seed_everything``),

and measured on 20k Euler-ODE samples (100 steps) with ``measure_tilt``: achieved tilt / requested (1 = exact)
and the TV of the classified component weights against the exact tilt's. One thread; each fine-tune takes
about half a minute to a minute on an idle core (a ``fitted`` one 7-9 minutes, a ``shipped`` one 4-5)::

    python benchmarks/am_tilt_family.py                          # 5 problems x 2 recipes
    python benchmarks/am_tilt_family.py --seeds 100,101 --recipes bootstrap
    python benchmarks/am_tilt_family.py --recipes before,fitted
    python benchmarks/am_tilt_family.py --recipes shipped
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
from typing import Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from am_fitted_iteration import fitted_iteration  # noqa: E402
from am_problems import load_test_helpers  # noqa: E402  (the tests' problem family and loop)

FITTED = dict(rounds=30, roots=512, n_steps=160, n_times=10, split_at=2.0, keep=2, epochs=8, lr=3e-3)
RECIPES = {
    "before": dict(bootstrap_horizon=None, weighting="soc"),
    "bootstrap": dict(bootstrap_horizon=0.05, weighting="soc"),
    "fitted": FITTED,
    "fitted-avg": dict(FITTED, average_last=5),
    "shipped": {},
}


def fit_shipped(helpers, base, direction, lam: float, seed: int, extra: Sequence[str] = ()):
    """``configs/gmm_adjoint.yaml`` on this problem through the CLI (``extra``: more command-line overrides); the
    averaged backbone of its last checkpoint."""
    from lightning_nft.cli import main as cli_main

    with tempfile.TemporaryDirectory() as root:
        cli_main([*helpers.gmm_adjoint_fit_args(base, direction, lam, root), *extra, "--seed_everything", str(seed)])
        return helpers.gmm_adjoint_backbone(str(pathlib.Path(root) / "checkpoints" / "last.ckpt"), base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="100,101,102,103,104", help="comma-separated problem seeds")
    parser.add_argument("--recipes", default="before,bootstrap", help=f"comma-separated, from {tuple(RECIPES)}")
    parser.add_argument("--iters", type=int, default=None, help="fine-tuning iterations (default: the helper's)")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--fitted-iterations", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    helpers = load_test_helpers()
    print(f"{'seed':>4} {'K':>2} {'std':>5} {'lam':>5} {'recipe':>9} {'tilt/lam':>8} {'TV':>6} {'wall s':>7}")
    for seed in (int(s) for s in args.seeds.split(",")):
        base, direction, lam = helpers.random_tilt_problem(seed)
        target = base.tilt(direction, lam)
        for recipe in args.recipes.split(","):
            kwargs = dict(RECIPES[recipe])
            t0 = time.time()
            if recipe == "shipped":
                model = fit_shipped(helpers, base, direction, lam, args.train_seed)
            elif recipe.startswith("fitted"):
                iterations = args.fitted_iterations + (2 if recipe == "fitted-avg" else 0)
                model = fitted_iteration(base, direction, lam, iterations=iterations, seed=args.train_seed,
                                         report=lambda k, m: None, **kwargs)
            else:
                if args.iters is not None:
                    kwargs["iters"] = args.iters
                model = helpers.finetune_adjoint_matching(base, direction, lam, seed=args.train_seed, **kwargs)
            wall = time.time() - t0
            got = helpers.measure_tilt(model, base, target, direction)
            print(f"{seed:4d} {base.n_components:2d} {float(base.stds[0]):5.2f} {lam:5.2f} {recipe:>9} "
                  f"{got['tilt'] / lam:8.3f} {got['tv']:6.3f} {wall:7.1f}", flush=True)


if __name__ == "__main__":
    main()
