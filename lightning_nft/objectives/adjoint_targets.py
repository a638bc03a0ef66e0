"""Adjoint Matching's regression data of a round, computed once from the round's rollouts.

Adjoint Matching (arXiv:2409.08861) regresses the fine-tuned velocity on ``v_base - eta_t a(t)`` at points
``(t, X_t)`` of paths sampled from the current model's memoryless SDE. The targets depend on the model only
through the paths, so a round can solve the lean adjoint *once* on all its rollouts and then take many
gradient steps on the resulting points, a fitted iteration of the fixed point

    v_{k+1} = argmin_v  E_{X ~ v_k} sum_t w_t (2 / eta_t) || v(X_t, t) - (v_base(X_t, t) - eta_t a(t)) ||^2

(``w_t`` the importance weight of the path, :mod:`lightning_nft.path_splitting`), instead of one step per
fresh minibatch (``AdjointMatchingObjective``, module docstring choice 7 of ``adjoint_matching.py``).

:func:`round_targets` builds the points of one round: importance-split paths, the lean adjoint backwards on
each, ``n_train_times`` random interior grid times per path. :class:`AdjointTargets` holds them; it is what
the module draws minibatches from (``len``, ``index``) and what the objective replays in the next round
(``cat``; ``state``/``from_state`` for checkpoints). Shapes: ``N`` points, sample shape ``S``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from lightning_nft.conditions import Conditions, concat_conditions, condition_to, index_condition
from lightning_nft.path_splitting import split_paths

__all__ = ["AdjointTargets", "round_targets", "per_path_times"]


@dataclass
class AdjointTargets:
    """``N`` regression points of Adjoint Matching.

    Attributes:
        t: grid times ``(N,)``, strictly inside ``(0, 1)``.
        x: states ``X_t`` ``(N, *S)``.
        adjoint: lean adjoint ``a(t)`` ``(N, *S)``.
        v_base: reference velocity ``v_base(X_t, t)`` ``(N, *S)``.
        weight: importance weight of the point's path, normalised to mean 1 over its round ``(N,)``.
        cond: the condition of each point (``N`` rows) or ``None``.
    """

    t: Tensor
    x: Tensor
    adjoint: Tensor
    v_base: Tensor
    weight: Tensor
    cond: Any = None

    def __len__(self) -> int:
        return self.t.shape[0]

    def index(self, idx: Tensor) -> "AdjointTargets":
        """The points ``idx`` (a 1-D long tensor)."""
        idx = idx.to(self.t.device)
        return AdjointTargets(self.t[idx], self.x[idx], self.adjoint[idx], self.v_base[idx], self.weight[idx],
                              index_condition(self.cond, idx))

    def to(self, device: torch.device) -> "AdjointTargets":
        """Every tensor moved to ``device``."""
        return AdjointTargets(*(v.to(device) for v in (self.t, self.x, self.adjoint, self.v_base, self.weight)),
                              condition_to(self.cond, device))

    @staticmethod
    def cat(parts: Sequence["AdjointTargets"]) -> "AdjointTargets":
        """The points of ``parts``, in order (their weights keep their own rounds' normalisation)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        device = parts[-1].t.device
        parts = [p.to(device) for p in parts]
        return AdjointTargets(*(torch.cat([getattr(p, name) for p in parts])
                                for name in ("t", "x", "adjoint", "v_base", "weight")),
                              concat_conditions([p.cond for p in parts]))

    def state(self) -> dict[str, Any]:
        """Plain tensors, lists and dicts on the CPU (what ``torch.load(weights_only=True)`` reads back)."""
        cond = self.cond
        if isinstance(cond, Conditions):
            cond = {"conditions": condition_to(cond, "cpu").tensors, "metadata": cond.metadata}
        elif cond is not None:
            cond = {"tree": condition_to(cond, "cpu")}
        return {"t": self.t.cpu(), "x": self.x.cpu(), "adjoint": self.adjoint.cpu(), "v_base": self.v_base.cpu(),
                "weight": self.weight.cpu(), "cond": cond}

    @staticmethod
    def from_state(state: dict[str, Any]) -> "AdjointTargets":
        """Inverse of :meth:`state`."""
        cond = state.get("cond")
        if isinstance(cond, dict) and "conditions" in cond:
            cond = Conditions(cond["conditions"], list(cond["metadata"]))
        elif isinstance(cond, dict):
            cond = cond["tree"]
        return AdjointTargets(state["t"], state["x"], state["adjoint"], state["v_base"], state["weight"], cond)


def per_path_times(eligible: Tensor, n_paths: int, n_times: Optional[int], generator: Optional[torch.Generator]) -> Tensor:
    """Grid indices ``(n, n_paths)``: for each path ``n = min(n_times, E)`` distinct entries of ``eligible (E,)``,
    drawn uniformly without replacement and independently across paths (all of them when ``n_times`` is ``None``)."""
    e = eligible.numel()
    if n_times is None or n_times >= e:
        return eligible[:, None].expand(e, n_paths)
    order = torch.rand(n_paths, e, generator=generator).argsort(dim=1)[:, :n_times]
    return eligible.cpu()[order].T.to(eligible.device)


def round_targets(
    policies: Any,
    rollouts: Any,
    path_adjoints: Callable[[Tensor, Tensor, Any], tuple[Tensor, Tensor]],
    *,
    n_train_times: Optional[int],
    t_min: float,
    t_max: float,
    split_at: Optional[float],
    max_split_factor: int,
    chunk_size: int,
    generator: Optional[torch.Generator],
) -> AdjointTargets:
    """The regression points of one round's ``rollouts`` (a ``RolloutBatch`` with trajectories).

    In chunks of ``chunk_size`` rollouts: importance-split the paths (``split_at``; ``None``: off), solve
    ``path_adjoints(paths, times, cond) -> (adjoints, v_base)`` on every path (the objective's lean adjoint
    backwards from ``a(1) = -lambda grad r(X_1)``:
    :meth:`~lightning_nft.objectives.adjoint_matching.AdjointMatchingObjective.path_adjoints`), and keep
    ``n_train_times`` random interior grid times in ``[t_min, t_max]`` per path. The weights are the paths'
    importance weights (each rollout's paths sum to 1), normalised to mean 1 over the round.
    """
    from lightning_nft.objectives.adjoint_matching import select_train_indices

    traj, times = rollouts.trajectory, rollouts.times
    eligible = select_train_indices(times, None, t_min=t_min, t_max=t_max).to(traj.device)
    parts: list[AdjointTargets] = []
    for start in range(0, traj.shape[1], chunk_size):
        rows = torch.arange(start, min(start + chunk_size, traj.shape[1]))
        paths, cond = traj[:, rows.to(traj.device)], index_condition(rollouts.cond, rows)
        weight = torch.ones(paths.shape[1], dtype=paths.dtype, device=paths.device)
        if split_at is not None:
            paths, weight, roots = split_paths(policies.velocity, policies.reference_velocity, policies.solver,
                                               paths, times, cond, split_at=split_at, max_factor=max_split_factor,
                                               generator=generator)
            cond = index_condition(cond, roots)
        adjoints, v_base = path_adjoints(paths, times, cond)
        k = per_path_times(eligible, paths.shape[1], n_train_times, generator)  # (n, P)
        path = torch.arange(paths.shape[1], device=paths.device).expand_as(k)
        flat = (k.reshape(-1), path.reshape(-1))  # row i * P + p: time k[i, p] of path p
        parts.append(AdjointTargets(times.to(paths)[flat[0]], paths[flat].detach(), adjoints[flat].detach(),
                                    v_base[flat].detach(), weight.repeat(k.shape[0]),
                                    index_condition(cond, path.reshape(-1))))
    out = AdjointTargets.cat(parts)
    out.weight = out.weight / out.weight.mean()
    return out
