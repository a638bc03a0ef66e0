"""``MultiReward``: a weighted sum of named rewards that remembers each part.

``r(x, c) = sum_k w_k n_k(r_k(x, c))`` with ``(B,)`` outputs, where ``n_k`` is the per-component
normalisation chosen by ``normalize``:

* ``None``: ``n_k(r) = r`` (plain weighted sum);
* ``"batch"``: ``n_k(r) = (r - mean(r)) / (std(r) + eps)`` over the rows of the call;
* ``"group"``: the same within each group of rows sharing the metadata field ``group_key``
  (the ``K`` samples of one prompt), so that components on different scales (PickScore ~ 20,
  HPS ~ 0.3, an OCR accuracy in [0, 1]) count by how they rank a group's samples, as the
  multi-reward recipes of Flow-GRPO (arXiv:2505.05470) and DiffusionNFT (arXiv:2509.16117) do.
  A group of one sample normalises to 0.

The statistics are detached: a differentiable component keeps ``grad n_k = grad r_k / (std + eps)``.
``"group"`` gives the same result for any chunking of a round into whole groups (e.g. the chunks of
:mod:`lightning_nft.rewards.async_scoring`); ``"batch"`` depends on the chunk, prefer ``"group"``.

The sum is differentiable iff every part is. After each call ``last_components[name]`` holds the
detached ``(B,)`` raw values of part ``name`` (before normalisation and weighting) and
``last_metadata`` the per-sample metadata the parts return (a part that sets ``last_metadata``, e.g.
the OCR text it read, appears under its name). Every call also appends the raw components to a
buffer that :meth:`pop_components` drains; ``callbacks.RewardComponentMetrics`` takes each round's
rollout rows from it and logs each component's mean and std per round.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from lightning_nft.conditions import metadata_of
from lightning_nft.rewards.base import Reward

NORMALIZATIONS = (None, "batch", "group")


def standardize(values: Tensor, groups: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """``(v - mean) / (std + eps)`` over all rows, or within each group id of ``groups (B,)``; stats detached."""
    v = values.detach()
    if groups is None:
        mean, std = v.mean(), v.std(unbiased=False)
        return (values - mean) / (std + eps)
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    inverse = inverse.to(values.device)
    counts = counts.to(values.device, v.dtype)
    sums = torch.zeros(counts.shape[0], device=values.device, dtype=v.dtype).index_add_(0, inverse, v)
    mean = sums / counts
    sq = torch.zeros_like(sums).index_add_(0, inverse, (v - mean[inverse]) ** 2)
    std = (sq / counts).sqrt()
    return (values - mean[inverse]) / (std[inverse] + eps)


def group_ids(metadata: list[dict[str, Any]], key: str, source: str) -> Tensor:
    """Integer group id ``(B,)`` of each row from the metadata field ``key`` (equal values, one group)."""
    missing = [i for i, m in enumerate(metadata) if key not in m]
    if missing:
        raise KeyError(f"{source} normalize='group' needs the metadata field {key!r} "
                       f"(missing in {len(missing)} of {len(metadata)} rows)")
    seen: dict[Any, int] = {}
    return torch.tensor([seen.setdefault(_hashable(m[key]), len(seen)) for m in metadata], dtype=torch.long)


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, tuple, type(None))) else repr(value)


class MultiReward(Reward):
    """Weighted sum of rewards, optionally normalising each component first.

    Args:
        rewards: name -> reward module (each returning ``(B,)``).
        weights: name -> weight; a missing name gets weight 1.0, an unknown name is an error.
        normalize: ``None``, ``"batch"`` or ``"group"`` (module docstring).
        group_key: metadata field that defines a group for ``normalize="group"``.
        eps: added to the std.
    """

    def __init__(self, rewards: Dict[str, Reward], weights: Optional[Dict[str, float]] = None,
                 normalize: Optional[str] = None, group_key: str = "prompt", eps: float = 1e-6) -> None:
        super().__init__()
        if not rewards:
            raise ValueError("MultiReward needs at least one reward")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(rewards))
        if unknown:
            raise ValueError(f"weights given for unknown rewards {unknown}; rewards are {sorted(rewards)}")
        self.rewards = nn.ModuleDict(dict(rewards))
        self.weights: Dict[str, float] = {name: float(weights.get(name, 1.0)) for name in rewards}
        self.normalize = normalize
        self.group_key = group_key
        self.eps = float(eps)
        self.differentiable = all(getattr(r, "differentiable", False) for r in self.rewards.values())
        self.last_components: Dict[str, Tensor] = {}
        self.last_metadata: Optional[list[dict[str, Any]]] = None
        self._round: Dict[str, list[Tensor]] = {}
        self._round_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # picklable (ddp_spawn): the lock is rebuilt
        state = self.__dict__.copy()
        state.pop("_round_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._round_lock = threading.Lock()

    def _groups(self, cond: Any, n: int) -> Optional[Tensor]:
        if self.normalize != "group":
            return None
        return group_ids(metadata_of(cond, n), self.group_key, type(self).__name__)

    def forward(self, samples: Tensor, cond: Any = None) -> Tensor:
        n = samples.shape[0]
        groups = self._groups(cond, n)
        total: Optional[Tensor] = None
        components: Dict[str, Tensor] = {}
        metadata: list[dict[str, Any]] = [{} for _ in range(n)]
        for name, reward in self.rewards.items():
            value = reward(samples, cond)
            components[name] = value.detach()
            part_meta = getattr(reward, "last_metadata", None)
            if isinstance(part_meta, list) and len(part_meta) == n:
                for row, extra in zip(metadata, part_meta):
                    if extra:
                        row[name] = extra
            if self.normalize is not None:
                value = standardize(value, groups, self.eps)
            term = self.weights[name] * value
            total = term if total is None else total + term
        self.last_components = components
        self.last_metadata = metadata if any(metadata) else None
        with self._round_lock:
            for name, value in components.items():
                self._round.setdefault(name, []).append(value.float().reshape(-1))
        return total

    def pop_components(self, last_rows: Optional[int] = None) -> Dict[str, Tensor]:
        """Raw component values scored since the last pop, ``name -> (M,)``, in call order; clears the buffer.

        ``last_rows=N`` keeps only the last ``N`` rows: the rollout collection is the last scoring
        before a round's first step, so its ``N`` rows are the tail even when an evaluation callback
        scored other samples in between.
        """
        with self._round_lock:
            out = {name: torch.cat(values) for name, values in self._round.items() if values}
            self._round = {}
        if last_rows is not None:
            out = {name: v[-int(last_rows):] if last_rows > 0 else v[:0] for name, v in out.items()}
        return out
