"""Adjoint Matching on narrow mixtures: how far the lean-adjoint regression target is from the exact control,
with and without importance splitting of the paths that cross expanding regions (issue 14).

At the optimum (paths of the exact tilted field's memoryless SDE, ``SDESolver(MemorylessNoise())`` on a uniform
``T``-step grid), the Adjoint Matching target ``v_base - eta_t a(t)`` has conditional mean ``v*`` for the
continuous-time lean adjoint. This script measures, at a few grid times ``t``, the least-squares ratio of the
Monte-Carlo control ``-eta_t a(t)`` to the exact control ``v* - v_base`` (``lightning_nft.analytic``:
``GaussianMixture.tilt``), 1 = unbiased, over ``B`` paths, and how much it varies between chunks of 512 paths
(the batch of ``configs/gmm_adjoint.yaml``), for two path ensembles:

* ``plain``: one path per start, as Adjoint Matching samples them;
* ``split``: the same paths with multilevel importance splitting (H. Kahn and T. E. Harris, "Estimation of
  particle transmission by random sampling", 1951; P. Glasserman, P. Heidelberger, P. Shahabuddin and T. Zajic,
  "Multilevel splitting for estimating rare event probabilities", Operations Research 47(4), 1999). Along each
  path a unit tangent ``z`` is carried forward, ``z <- (I + 2 h J) z / |.|`` with ``J = grad_x v_base`` at the
  new state (one Jacobian-vector product per step), and the log of the factor is accumulated; whenever the
  accumulated growth passes ``log split_at`` the path is duplicated (the copy continues with fresh noise from
  the current state), both copies carry half the weight and ``log 2`` is taken off their growth. The decision
  uses the path's past only, so the weighted ensemble has the plain ensemble's expectation; rare paths that
  linger between modes, whose lean adjoint grows like ``exp(2 int J dt)``, are sampled many times with small
  weights instead of once with a huge value.

The split ensemble's ratio is also given by region: "between" modes (points whose largest posterior component
probability under the tilted mixture is below 0.9) and "in mode", with each region's share of the weight and of
the squared control (one ratio per time can hide a target that is low where the component weights are decided).

Run from the repository root (one thread; about a minute per row with ``--paths 10240``)::

    python benchmarks/am_target_splitting.py                        # problems 5 and 0, T = 40 and 80
    python benchmarks/am_target_splitting.py --seeds 5 --steps 80 --paths 20480

Problems come from ``tests/test_adjoint_matching.py::random_tilt_problem``. Figures measured are in
``benchmarks/README.md`` (issue 14).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
from torch import Tensor

from lightning_nft.objectives.adjoint_matching import lean_adjoint
from lightning_nft.path_splitting import split_paths
from lightning_nft.samplers import MemorylessNoise, SDESolver, time_grid

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from am_problems import load_test_helpers  # noqa: E402  (the tests' problem family and loop)
FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7)


def target_ratios(base, direction: Tensor, lam: float, n_steps: int, n_paths: int, split_at: float,
                  seed: int = 0) -> tuple[dict[str, list[tuple[float, float, float, float]]], float]:
    """Per ensemble, per time fraction, ``(t, ratio, min and median over chunks of 512 roots)``; and the split
    ensemble's paths per root.

    Two more rows, ``"split, between"`` and ``"split, in mode"``, give the split ensemble's ratio over the points
    whose largest posterior component probability under the tilted mixture is below / at least 0.9, as
    ``(t, ratio, share of the points' weight, share of the squared control)``: one ratio per time can hide a
    target that is low between modes, where the component weights are decided, and high elsewhere.
    """
    tilted = base.tilt(direction, lam)
    times = time_grid(n_steps)
    solver = SDESolver(MemorylessNoise())
    gen = torch.Generator().manual_seed(seed)
    out = solver.sample(tilted, torch.randn(n_paths, base.dim, generator=gen), times, generator=gen,
                        return_trajectory=True)
    split = split_paths(tilted, base, solver, out.trajectory, times, split_at=split_at, generator=gen)
    ensembles = {"plain": (out.trajectory, torch.ones(n_paths), torch.arange(n_paths)), "split": split}
    rows: dict[str, list[tuple[float, float, float, float]]] = {}
    for name, (paths, weight, root) in ensembles.items():
        terminal = (-lam * direction).expand(paths.shape[1], -1)  # a(1) = -lam grad r for r = direction . x
        adjoints, v_base = lean_adjoint(base, paths, times, terminal, return_base_velocity=True)
        rows[name] = []
        for frac in FRACTIONS:
            k = max(1, round(frac * n_steps))
            t = times[k]
            with torch.no_grad():
                control = tilted(paths[k], t.expand(paths.shape[1])) - v_base[k]
            estimate = -(1 - t) / t * adjoints[k]
            point_num, point_den = weight * (estimate * control).sum(-1), weight * (control * control).sum(-1)
            num = torch.zeros(n_paths).index_add_(0, root, point_num)
            den = torch.zeros(n_paths).index_add_(0, root, point_den)
            chunks = num.view(-1, 512).sum(1) / den.view(-1, 512).sum(1)
            rows[name].append((float(t), float(num.sum() / den.sum()), float(chunks.min()), float(chunks.median())))
            if name == "split":
                with torch.no_grad():
                    between = tilted.responsibilities(paths[k], t.expand(paths.shape[1])).max(-1).values < 0.9
                for region, mask in (("split, between", between), ("split, in mode", ~between)):
                    ratio = float(point_num[mask].sum() / point_den[mask].sum()) if bool(mask.any()) else float("nan")
                    rows.setdefault(region, []).append((float(t), ratio, float(weight[mask].sum() / weight.sum()),
                                                        float(point_den[mask].sum() / point_den.sum())))
    return rows, split[0].shape[1] / n_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="5,0", help="comma-separated problem seeds (random_tilt_problem)")
    parser.add_argument("--steps", default="40,80", help="comma-separated grid sizes T")
    parser.add_argument("--paths", type=int, default=10240, help="root paths (a multiple of 512)")
    parser.add_argument("--split-at", type=float, default=2.0)
    args = parser.parse_args()
    if args.paths % 512:
        parser.error("--paths must be a multiple of 512")
    torch.set_num_threads(1)
    helpers = load_test_helpers()
    print("ratio of the Monte-Carlo control to the exact one (1 = unbiased); [min, median] over chunks of 512 roots;"
          " by region: (share of the weight / of the squared control)")
    for seed in (int(s) for s in args.seeds.split(",")):
        base, direction, lam = helpers.random_tilt_problem(seed)
        for n_steps in (int(s) for s in args.steps.split(",")):
            start = time.time()
            rows, paths_per_root = target_ratios(base, direction, lam, n_steps, args.paths, args.split_at)
            print(f"problem {seed} (K={base.n_components}, std {float(base.stds[0]):.2f}, lambda {lam:.2f}), T={n_steps}, "
                  f"{paths_per_root:.2f} split paths per root, {time.time() - start:.0f} s")
            for name in ("plain", "split"):
                cells = "  ".join(f"t={t:.2f} {r:.2f} [{lo:.2f}, {med:.2f}]" for t, r, lo, med in rows[name])
                print(f"  {name:<5} {cells}")
            for name in ("split, between", "split, in mode"):  # (ratio, share of weight / of squared control)
                cells = "  ".join(f"t={t:.2f} {r:.2f} ({m:.2f}/{c:.2f})" for t, r, m, c in rows[name])
                print(f"  {name:<14} {cells}")


if __name__ == "__main__":
    main()
