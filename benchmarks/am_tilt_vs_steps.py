"""Adjoint Matching on a Gaussian mixture: achieved tilt against the number of solver steps.

Two tables, on the mixture of ``tests/test_adjoint_matching.py`` (weights 0.5 / 0.3 / 0.2, means
(-2, 0), (0, 1), (2, 0), std 0.45, reward ``r(x) = x_1``, requested ``lam = 0.6``):

1. **Target bias at the optimum** (cheap, no training). Paths of the exact tilted field's memoryless
   SDE (``SDESolver(MemorylessNoise())``) on a uniform ``T``-step grid, started at grid time ``t`` from
   ``M`` points drawn from the tilted marginal, ``N`` paths each; the lean adjoint of each ``scheme``
   gives the Monte-Carlo regression target ``E[v_base - eta_t a | X_t = x] - v_base``; the table shows
   its least-squares ratio to the exact optimal control ``v* - v_base`` (1 = unbiased).
2. **Achieved tilt after fine-tuning**: ``--recipe loop`` (default), ``finetune_adjoint_matching`` of the tests
   (base + zero-initialised residual MLP, rollouts on the ``T``-step grid, the same number of iterations for
   every ``T``; the per-minibatch recipe from before issue 14); ``--recipe shipped``, the library's recipe since
   issue 14 (``configs/gmm_adjoint.yaml`` through the CLI with ``--model.init_args.n_sample_steps T``,
   ``am_tilt_family.fit_shipped``; ``--problem`` picks a ``random_tilt_problem`` seed instead of the tests'
   mixture); then 20k samples with the plain Euler ODE (100 steps): ``analytic.effective_tilt`` (slope of
   ``log(w'_k / w_k)`` against ``a . m_k``) next to the requested ``lam``, the TV of the component
   weights and the largest component-mean error, wall time and trajectories sampled.

Run from the repository root (one thread; a few minutes on one CPU core)::

    python benchmarks/am_tilt_vs_steps.py                       # both tables, scheme "right"
    python benchmarks/am_tilt_vs_steps.py --schemes right,left,heun --steps 20,40
    python benchmarks/am_tilt_vs_steps.py --bootstrap-horizon 0.05   # table 2 with the bootstrapped adjoint
    python benchmarks/am_tilt_vs_steps.py --skip-bias --recipe shipped --steps 40,80,160 --problem 0
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

from lightning_nft.analytic import GaussianMixture
from lightning_nft.objectives.adjoint_matching import SCHEMES, lean_adjoint
from lightning_nft.samplers import MemorylessNoise, SDESolver, time_grid

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from am_problems import load_test_helpers  # noqa: E402  (the tests' problem family and loop)
from am_tilt_family import fit_shipped  # noqa: E402


def target_bias(base, direction, lam, steps, schemes, fractions=(0.1, 0.3, 0.5, 0.7), m=60, n=300, seed=0,
                horizon=None):
    """Table 1: ratio of the Monte-Carlo AM target to the exact optimal control (float64).

    ``horizon``: the bootstrapped lean adjoint restarted from the exact control (``None``: the plain one).
    """
    base = base.to(torch.float64)
    direction = direction.to(torch.float64)
    tilted = base.tilt(direction, lam)
    solver = SDESolver(MemorylessNoise())
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n_steps in steps:
        times = time_grid(n_steps, dtype=torch.float64)
        ratios = {s: [] for s in schemes}
        for frac in fractions:
            j = max(1, round(frac * n_steps))
            sub = times[j:]
            t = sub[0]
            x1 = tilted.sample(m, generator=gen)
            xs = t * x1 + (1 - t) * torch.randn(m, base.dim, generator=gen, dtype=torch.float64)
            x0 = xs.repeat_interleave(n, 0)
            out = solver.sample(tilted, x0, sub, generator=gen, return_trajectory=True)
            term = (-lam * direction).expand_as(x0)
            tv = t.expand(m)
            control = tilted(xs, tv) - base(xs, tv)
            ftv = None
            if horizon is not None:
                ftv = torch.stack([tilted(x, tk.expand(x.shape[0])) for x, tk in zip(out.trajectory, sub)])
            for s in schemes:
                a = lean_adjoint(base, out.trajectory, sub, term, scheme=s, ft_velocity=ftv,
                                 bootstrap_horizon=horizon)[0].reshape(m, n, -1).mean(1)
                est = -(1 - t) / t * a
                ratios[s].append(float((est * control).sum() / (control * control).sum()))
        rows.append((n_steps, [float(times[max(1, round(f * n_steps))]) for f in fractions], ratios))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="10,20,40,100", help="comma-separated numbers of solver steps")
    parser.add_argument("--schemes", default="right", help=f"comma-separated lean-adjoint schemes from {SCHEMES}")
    parser.add_argument("--bias-schemes", default="right,left,heun", help="schemes for table 1")
    parser.add_argument("--iters", type=int, default=600, help="fine-tuning iterations (same for every T)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bias-horizon", default="none,0.05",
                        help="bootstrap horizons for table 1 ('none': the plain lean adjoint)")
    parser.add_argument("--bootstrap-horizon", default="none",
                        help="bootstrap horizon for table 2 ('none': the plain lean adjoint, the default recipe)")
    parser.add_argument("--recipe", default="loop", choices=("loop", "shipped"), help="table 2's fine-tuning")
    parser.add_argument("--problem", type=int, default=None, help="a random_tilt_problem seed (default: the tests' mixture)")
    parser.add_argument("--skip-bias", action="store_true")
    parser.add_argument("--skip-finetune", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    helpers = load_test_helpers()
    steps = [int(s) for s in args.steps.split(",")]
    if args.problem is None:
        lam = helpers.FT_LAM
        base = GaussianMixture(helpers.FT_WEIGHTS, helpers.FT_MEANS, helpers.FT_STD)
        direction = torch.tensor(helpers.FT_DIRECTION)
    else:
        base, direction, lam = helpers.random_tilt_problem(args.problem)
    target = base.tilt(direction, lam)
    tilted_weights = [round(float(w), 3) for w in target.weights]
    print(f"mixture: weights {[round(float(w), 3) for w in base.weights]}, means {base.means.tolist()}, "
          f"std {float(base.stds[0]):.3f}; r(x) = {direction.tolist()} . x, lam = {lam:.3f}; "
          f"exact tilted weights {tilted_weights}")

    if not args.skip_bias:
        schemes = args.bias_schemes.split(",")
        t0 = time.time()
        print("\nTable 1: AM regression target at the optimum / exact optimal control (1 = unbiased)")
        for spec in args.bias_horizon.split(","):
            horizon = None if spec == "none" else float(spec)
            rows = target_bias(base, direction, lam, steps, schemes, seed=args.seed, horizon=horizon)
            print(f"  bootstrap horizon {spec}")
            for n_steps, ts, ratios in rows:
                cells = "   ".join(f"{s}: " + " ".join(f"{r:.2f}" for r in ratios[s]) for s in schemes)
                print(f"  T = {n_steps:4d}   t = {' / '.join(f'{t:.2f}' for t in ts)}   {cells}", flush=True)
        print(f"  ({time.time() - t0:.0f} s)")

    if not args.skip_finetune:
        recipe = (f"{args.iters} iterations x {args.batch} trajectories" if args.recipe == "loop" else
                  "configs/gmm_adjoint.yaml (scheme and trajectories: the config's)")
        print(f"\nTable 2: fine-tuned with {recipe}; 20k Euler-ODE samples")
        print(f"  {'T':>4} {'scheme':>6} {'lam':>5} {'achieved':>8} {'TV':>7} {'mean err':>8} {'wall s':>7} "
              f"{'trajectories':>12}")
        boot = None if args.bootstrap_horizon == "none" else float(args.bootstrap_horizon)
        for scheme in args.schemes.split(","):
            for n_steps in steps:
                t0 = time.time()
                if args.recipe == "shipped":
                    model = fit_shipped(helpers, base, direction, lam, args.seed,
                                        ["--model.init_args.n_sample_steps", str(n_steps)])
                    trajectories = 12 * 30 * 512  # the config's rounds x rollouts (before splitting)
                else:
                    model = helpers.finetune_adjoint_matching(
                        base, direction, lam, n_steps=n_steps, iters=args.iters, batch=args.batch, scheme=scheme,
                        seed=args.seed, bootstrap_horizon=boot,
                    )
                    trajectories = args.iters * args.batch
                wall = time.time() - t0
                got = helpers.measure_tilt(model, base, target, direction)
                print(f"  {n_steps:4d} {scheme:>6} {lam:5.2f} {got['tilt']:8.3f} {got['tv']:7.4f} "
                      f"{got['mean_err']:8.3f} {wall:7.1f} {trajectories:12d}", flush=True)


if __name__ == "__main__":
    main()
