"""Importance splitting of sampled SDE paths along the directions a reference flow stretches.

Adjoint Matching's lean adjoint (``objectives/adjoint_matching.py``) grows like ``exp(2 int J dt)`` along a
path, ``J = grad_x v_ref``: on a multimodal reference it is large only on the rare paths that linger between
modes, and those few paths carry most of the regression target's mean (module docstring choice 6 there).
Multilevel splitting (H. Kahn and T. E. Harris, "Estimation of particle transmission by random sampling",
1951; P. Glasserman, P. Heidelberger, P. Shahabuddin and T. Zajic, "Multilevel splitting for estimating rare
event probabilities", Operations Research 47(4), 1999) samples such paths many times with small weights
instead of once with a huge value.

Along each path a unit tangent ``z`` is carried forward through the reference's linearised flow,

    z <- (I + 2 h J(X_{k+1}, t_{k+1})) z / |.|,     growth += log |(I + 2 h J) z|

(one Jacobian-vector product of ``v_ref`` per step; the factor 2 is the lean adjoint's ``2 J^T``, the ``x / t``
part of the memoryless drift is common to all paths and left out). Whenever a path's accumulated growth
passes ``log split_at`` it is duplicated: both copies carry half of its weight, ``log 2`` is taken off their
growth, and the copy continues from the current state with fresh noise of the same solver and velocity. The
decision uses the path's past only, so for any function ``f`` of a path

    E[ sum_i w_i f(paths_i) | root ] = E[ f(path) ]        (the weights of a root's paths sum to 1),

i.e. the weighted ensemble has the plain ensemble's expectations, with lower variance where the adjoint is
heavy. Shapes: ``trajectory (T+1, B, *S)``, ``times (T+1,)``; returns ``N >= B`` paths.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_nft.conditions import index_condition
from lightning_nft.samplers import Solver

VelocityFn = Callable[..., Tensor]

__all__ = ["split_paths"]


def _unit(z: Tensor) -> tuple[Tensor, Tensor]:
    norm = z.reshape(z.shape[0], -1).norm(dim=1).clamp_min(1e-12)
    return z / norm.reshape(-1, *([1] * (z.dim() - 1))), norm


@torch.no_grad()
def _continue(solver: Solver, velocity: VelocityFn, x: Tensor, t: Tensor, t_next: Tensor, cond: Any,
              generator: Optional[torch.Generator]) -> Tensor:
    return solver.step(velocity, x, t, t_next, cond, generator=generator)


def split_paths(
    velocity: VelocityFn,
    reference: VelocityFn,
    solver: Solver,
    trajectory: Tensor,
    times: Tensor,
    cond: Any = None,
    *,
    split_at: float = 2.0,
    max_factor: int = 8,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Importance-split the paths ``trajectory (T+1, B, *S)`` that ``solver`` sampled from ``velocity``.

    Args:
        velocity: the sampling policy ``v(x, t, cond)``; continues the copies (no gradient).
        reference: the field whose tangent flow decides the splits (Adjoint Matching's base ``v_ref``).
        solver: the solver that sampled ``trajectory`` (``solver.step`` continues the copies).
        trajectory, times: the sampled states on the grid ``times (T+1,)``.
        cond: the condition of each of the ``B`` paths (``None``, a tensor or ``Conditions``).
        split_at: growth factor of the tangent that triggers a split (``> 1``).
        max_factor: at most ``max_factor * B`` paths in all (splits beyond are skipped).
        generator: noise of the copies and of the initial tangents.

    Returns:
        ``(paths (T+1, N, *S), weights (N,), roots (N,))``: the first ``B`` paths are the given ones (their
        weights possibly halved), the others copies continued with fresh noise; ``roots[i]`` is the given path
        that path ``i`` branched from, and the weights of each root's paths sum to 1. Copies share their
        root's states up to the step where they branched.
    """
    if not split_at > 1:
        raise ValueError(f"split_at must be > 1; got {split_at}")
    if max_factor < 1:
        raise ValueError(f"max_factor must be >= 1; got {max_factor}")
    if trajectory.dim() < 3 or trajectory.shape[0] != times.shape[0]:
        raise ValueError(f"trajectory must be (T+1, B, *S) on times (T+1,); got {tuple(trajectory.shape)} and "
                         f"{tuple(times.shape)}")
    n, batch = times.shape[0] - 1, trajectory.shape[1]
    times = times.to(trajectory)
    x = trajectory[0]
    root = torch.arange(batch, device=x.device)
    given = torch.ones(batch, dtype=torch.bool, device=x.device)  # still following a given path
    weight = torch.ones(batch, dtype=trajectory.dtype, device=x.device)
    growth = torch.zeros(batch, dtype=trajectory.dtype, device=x.device)
    z, _ = _unit(torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device))
    rows_cond = cond
    states, parents = [x], []
    threshold, half = math.log(split_at), math.log(2.0)
    for k in range(n):
        t, t_next = times[k], times[k + 1]
        x_next = trajectory[k + 1][root]
        copies = (~given).nonzero().reshape(-1)
        if copies.numel():
            x_next[copies] = _continue(solver, velocity, x[copies], t, t_next, index_condition(rows_cond, copies),
                                       generator)
        parent = torch.arange(x_next.shape[0], device=x.device)
        if k + 1 < n:  # no split at the last state: nothing follows it
            t_rows = t_next.expand(x_next.shape[0])
            with torch.enable_grad():
                jz = torch.autograd.functional.jvp(lambda y: reference(y, t_rows, rows_cond), (x_next,), (z,))[1]
            z, factor = _unit(z + 2 * (t_next - t) * jz)
            growth = growth + factor.log()
            split = (growth > threshold).nonzero().reshape(-1)[: max_factor * batch - x_next.shape[0]]
            if split.numel():
                growth[split] -= half
                weight[split] /= 2
                parent = torch.cat([parent, split])
                x_next, z, growth, weight, root = (v[parent] for v in (x_next, z, growth, weight, root))
                given = torch.cat([given, torch.zeros(split.numel(), dtype=torch.bool, device=x.device)])
                rows_cond = index_condition(cond, root)
        parents.append(parent)
        states.append(x_next)
        x = x_next
    paths = torch.empty(n + 1, x.shape[0], *trajectory.shape[2:], dtype=trajectory.dtype, device=x.device)
    index = torch.arange(x.shape[0], device=x.device)
    for k in range(n, -1, -1):  # follow each final path back through its ancestors
        paths[k] = states[k][index]
        if k > 0:
            index = parents[k - 1][index]
    return paths, weight, root
