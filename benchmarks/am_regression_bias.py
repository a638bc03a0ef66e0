"""Adjoint Matching on narrow mixtures: is the shortfall in the target or in the regression? (issue 14, round 3)

Adjoint Matching trains on its own rollouts, so a short achieved tilt can come from the regression target, from
the fitting loop, or from the on-policy feedback between them. This script removes the feedback: every round
draws ``--roots`` paths of the *exact tilted* field's memoryless SDE (``SDESolver(MemorylessNoise())``; the
process Adjoint Matching converges to, ``lightning_nft.analytic.GaussianMixture.tilt``), so the network is fitted
by plain regression on a fixed distribution, with one of two targets at the same points:

* ``exact``: the closed-form optimal control, ``-eta_t a = v* - v_base`` (no Monte-Carlo noise);
* ``split``: the lean adjoint of the base on importance-split paths (``am_target_splitting.split_paths``,
  ``split_at`` 2), whose conditional mean is within a few percent of the exact control at ``T = 80``
  (``benchmarks/README.md``), but which is heavy-tailed.

The network is the tests' (``ResidualVelocity(base, MLPVelocity(hidden 64, depth 2, time_embed_dim 16,
zero_init))``); each round takes ``--steps-per-round`` Adam steps (learning rate 1e-2 decaying linearly to 1e-3,
no gradient clipping), each on ``--times`` random interior grid times of all the round's paths, with the
``"soc"`` weighting ``2 / eta_t``. After ``--rounds`` rounds the last iterate is sampled with the Euler ODE
(20k samples, 100 steps) and ``measure_tilt`` gives achieved tilt / requested (1 = exact) and the TV of the
component weights. If the ``exact`` rows reach 1 and the ``split`` rows do not, the loss of tilt is made by the
regression of a heavy-tailed target, not by the target's mean and not by the on-policy loop.

A row ``target:converged`` fits instead to convergence on one aggregated data set: ``--converged-rounds``
rounds of split paths, 10 random interior times each (about 1M points), 20 passes of Adam in batches of 8,192
(learning rate 3e-3 on a cosine decay; ``am_fitted_iteration.fit_to_convergence``), both targets at the same
points. The rare heavy paths are then seen 20 times, by an optimiser whose batches hold many of them. The wall
time printed on ``converged`` rows is that of the data set and all ``converged`` fits together.

Run from the repository root (one thread; about 1 minute per ``exact`` row and 3-4 minutes per ``split`` row,
2 minutes per ``converged`` row at T = 80)::

    python benchmarks/am_regression_bias.py                          # problems 0 and 5, the three rows below
    python benchmarks/am_regression_bias.py --seeds 0 --rows split:8 --roots 1024
    python benchmarks/am_regression_bias.py --rows exact:converged,split:converged

Problems come from ``tests/test_adjoint_matching.py::random_tilt_problem``. Figures measured are in
``benchmarks/README.md`` (issue 14).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

from lightning_nft.objectives.adjoint_matching import (adjoint_matching_loss, gather_times, lean_adjoint,
                                                       select_train_indices)
from lightning_nft.samplers import MemorylessNoise, SDESolver, time_grid

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from am_fitted_iteration import collect_targets, fit_to_convergence, tests_network  # noqa: E402
from am_problems import load_test_helpers  # noqa: E402  (the tests' problem family and loop)
from am_target_splitting import split_paths  # noqa: E402

DEFAULT_ROWS = "exact:1,exact:8,split:8"


def fit_by_regression(base, direction, lam, *, target: str, steps_per_round: int, n_steps: int, rounds: int,
                      roots: int, n_times: int, seed: int = 0) -> torch.nn.Module:
    """Regress a zero-initialised residual on paths of the exact tilted process; returns the last iterate."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tilted = base.tilt(direction, lam)
    model = tests_network(base)
    opt = torch.optim.Adam(model.residual.parameters(), lr=1e-2)
    solver = SDESolver(MemorylessNoise())
    times = time_grid(n_steps)
    for it in range(rounds):
        for group in opt.param_groups:
            group["lr"] = 1e-2 + (1e-3 - 1e-2) * it / max(rounds - 1, 1)
        x0 = torch.randn(roots, base.dim, generator=gen)
        paths = solver.sample(tilted, x0, times, generator=gen, return_trajectory=True).trajectory
        weights = torch.ones(roots)
        if target == "split":
            paths, weights, _ = split_paths(tilted, base, solver, paths, times, split_at=2.0, generator=gen)
            terminal = (-lam * direction).expand(paths.shape[1], -1)  # a(1) = -lam grad r for r = direction . x
            adjoints, v_base = lean_adjoint(base, paths, times, terminal, return_base_velocity=True)
        else:  # the exact control replaces the adjoint below
            with torch.no_grad():
                v_base = torch.stack([base(x, t.expand(roots)) for x, t in zip(paths, times)])
            adjoints = torch.zeros_like(paths)
        for _ in range(steps_per_round):
            idx = select_train_indices(times, n_times, generator=gen)
            t, x, a, vb = gather_times(idx, times, paths, adjoints, v_base)
            if target == "exact":
                with torch.no_grad():
                    a = -(tilted(x, t) - vb) * (t / (1 - t)).unsqueeze(-1)
            per_point = adjoint_matching_loss(vb + model.residual(x, t), vb, a, t)
            loss = (per_point * weights.repeat(idx.numel())).sum() / (roots * idx.numel())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def fit_converged(base, direction, lam, *, targets: list[str], n_steps: int, rounds: int, roots: int,
                  seed: int = 0) -> dict[str, torch.nn.Module]:
    """One data set of split paths of the exact tilted process; a model fitted to convergence per target."""
    gen = torch.Generator().manual_seed(seed + 1)
    tilted = base.tilt(direction, lam)
    t, x, lean, v_base, weight = collect_targets(tilted, base, direction, lam, rounds=rounds, roots=roots,
                                                 n_steps=n_steps, n_times=10, split_at=2.0, generator=gen)
    models = {}
    for target in targets:
        adjoint = lean
        if target == "exact":  # the closed-form control at the same points: a = -(v* - v_base) / eta_t
            with torch.no_grad():
                adjoint = -(tilted(x, t) - v_base) * (t / (1 - t)).unsqueeze(-1)
        torch.manual_seed(seed)
        model = tests_network(base)
        fit_to_convergence(model, (t, x, adjoint, v_base, weight), epochs=20)
        models[target] = model
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,5", help="comma-separated problem seeds (random_tilt_problem)")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated target:steps_per_round")
    parser.add_argument("--steps", type=int, default=80, help="grid size T")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--roots", type=int, default=512, help="root paths per round")
    parser.add_argument("--times", type=int, default=5, help="random grid times per gradient step")
    parser.add_argument("--converged-rounds", type=int, default=60, help="rounds of the aggregated data set")
    args = parser.parse_args()
    torch.set_num_threads(1)
    helpers = load_test_helpers()
    print(f"{'seed':>4} {'K':>2} {'std':>5} {'lam':>5} {'target':>6} {'steps/round':>11} {'tilt/lam':>8} {'TV':>6} "
          f"{'wall s':>7}")
    for seed in (int(s) for s in args.seeds.split(",")):
        base, direction, lam = helpers.random_tilt_problem(seed)
        rows = [row.split(":") for row in args.rows.split(",")]
        converged_targets = [target for target, steps in rows if steps == "converged"]
        start = time.time()
        converged = fit_converged(base, direction, lam, targets=converged_targets, n_steps=args.steps,
                                  rounds=args.converged_rounds, roots=args.roots) if converged_targets else {}
        converged_wall = time.time() - start
        for target, steps in rows:
            start = time.time()
            if steps == "converged":
                model, wall = converged[target], converged_wall
            else:
                model = fit_by_regression(base, direction, lam, target=target, steps_per_round=int(steps),
                                          n_steps=args.steps, rounds=args.rounds, roots=args.roots,
                                          n_times=args.times)
                wall = time.time() - start
            got = helpers.measure_tilt(model, base, base.tilt(direction, lam), direction)
            print(f"{seed:4d} {base.n_components:2d} {float(base.stds[0]):5.2f} {lam:5.2f} {target:>6} {steps:>11} "
                  f"{got['tilt'] / lam:8.3f} {got['tv']:6.3f} {wall:7.1f}", flush=True)


if __name__ == "__main__":
    main()
