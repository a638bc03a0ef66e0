"""Raw rewards -> advantages and DiffusionNFT optimality probabilities ``r in [0, 1]``.

DiffusionNFT (arXiv:2509.16117) weighs each rollout by an optimality probability ``r``; the design
 computes it from raw rewards by one named, tested map, never
inside a loss. Three modes, for rewards ``R (N,)`` with group ids ``g (N,)`` (a group = the ``K``
samples of one prompt/condition):

``"group"`` (default)
    group-centred, scaled advantage, clipped, mapped affinely to ``[0, 1]``::

        A_i = clip((R_i - mean_{g(i)} R) / (sigma + eps), -c, c),     r_i = A_i / (2 c) + 1/2

    ``sigma`` is the per-group standard deviation (``std_scope="group"``) or the pooled
    within-group standard deviation over all ``N`` samples (``std_scope="global"``,
    ``sigma^2 = mean_i (R_i - mean_{g(i)} R)^2``; with a single group this is the plain std).
    Population (``ddof = 0``) standard deviations, as in the public DiffusionNFT release.

``"minmax"``
    ``r_i = (R_i - min R) / (max R - min R)`` over the whole batch (groups are ignored) and
    ``A_i = 2 r_i - 1 in [-1, 1]`` so that ``r = A / 2 + 1/2`` is the ``"group"`` map with
    ``c = 1``. A constant batch gives ``r = 1/2``, ``A = 0``.

``"binary"``
    ``A_i = sign(R_i - mean_{g(i)} R) in {-1, 0, 1}``, ``r_i = (A_i + 1) / 2 in {0, 1/2, 1}``:
    ``r = 1`` above the group mean, ``0`` below. **Ties** (a reward equal to its group mean, e.g.
    a constant group or a singleton) get ``A = 0``, ``r = 1/2``: by Lemma 1.2 of the Taylor-approximation note (Liu, "DiffusionNFT as Taylor Approximation") a sample
    with ``r = 1/2`` pulls the trained field toward the old one, i.e. it expresses no preference.
    Equality is tested with a tolerance ``16 eps_float64 max_{group} |R|`` because a float mean of
    equal numbers need not be exactly equal to them.

What ``c`` and ``beta`` do together (Taylor-approximation note, Theorem 1.1). While ``|A| <= c`` the map is affine,
``r = (R - mean) / (2 c sigma) + 1/2``, and since constants drop out of a conditional covariance,
the NFT optimum is ``v* = v_old + (2 / beta) Cov(r, X1 - X0 | x)
= v_old + 1 / (beta c sigma) Cov(R, X1 - X0 | x)``: one NFT round approximates the exponential
tilt ``p_old(x) exp(R(x) / (beta c sigma))``. Only the product ``beta * c`` matters in the linear
regime; the clip only limits the influence of outliers.

Default ``clip = 5.0`` (as the public release's ``adv_clip_max``): with standardised advantages the
map is affine for all samples within 5 standard deviations, so ``r`` is an affine function of the
reward for practically every sample and the reading above is exact; the clip only caps the weight
of an extreme outlier. ``clip = 1`` would saturate about a third of Gaussian-distributed rewards and
make ``r`` a nearly binary function of the reward. The cost of a larger ``c`` is a smaller per-round
step (``1 / (beta c)`` per standard deviation), which ``beta`` sets.

Default ``std_scope = "global"`` (the release's default is a global std too): a per-group std
inflates the advantages of groups whose samples are nearly equally good (noise amplification on
easy or impossible prompts). We pool the *within-group* spread, not the std of the raw rewards the
release uses: the centred advantage only carries within-group variation, and prompts with
different reward levels should not shrink everyone's step. With one group both agree.

``eps = 1e-4`` (as the release) is added to ``sigma``; constant groups and singletons give
``A = 0`` exactly (no NaN) for any ``eps >= 0``.

**Distributed training.** Group statistics need the whole group: the caller
(``callbacks.OnlineRollout``) gathers rewards and group ids from all ranks, calls this on the full
set, and keeps its own rank's rows. Group ids must be unique across ranks.

All statistics are computed in float64; outputs have the rewards' dtype (float32 for integer
rewards) and device.
"""

from __future__ import annotations

from typing import Literal, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_nft.rewards import check_finite_rewards

NormalizationMode = Literal["group", "minmax", "binary"]
StdScope = Literal["group", "global"]

NORMALIZATION_MODES = ("group", "minmax", "binary")
STD_SCOPES = ("group", "global")

_TIE_ULPS = 16.0


def _group_index(group: Optional[Tensor], n: int, device: torch.device) -> tuple[Tensor, int]:
    """Dense group index ``(N,)`` in ``[0, G)`` and ``G``; ``None`` means one group."""
    if group is None:
        return torch.zeros(n, dtype=torch.long, device=device), 1
    group = torch.as_tensor(group, device=device)
    if group.dim() != 1 or group.shape[0] != n:
        raise ValueError(f"group must have shape (N,) = ({n},) like the rewards; got {tuple(group.shape)}")
    if group.is_floating_point() or group.is_complex() or group.dtype == torch.bool:
        raise ValueError(f"group must hold integer ids; got dtype {group.dtype}")
    _, inverse = torch.unique(group, return_inverse=True)
    return inverse, int(inverse.max()) + 1


def _group_reduce(values: Tensor, index: Tensor, n_groups: int, op: str = "sum") -> Tensor:
    """Per-group sum / amax of ``values (N,)`` -> ``(G,)``."""
    out = torch.zeros(n_groups, dtype=values.dtype, device=values.device)
    if op == "sum":
        return out.index_add_(0, index, values)
    return out.scatter_reduce_(0, index, values, reduce="amax", include_self=False)


def _centred(r64: Tensor, index: Tensor, n_groups: int) -> Tensor:
    """``R_i - mean_{g(i)} R`` with rounding-level residuals of tied values set to exactly 0."""
    counts = _group_reduce(torch.ones_like(r64), index, n_groups)
    mean = _group_reduce(r64, index, n_groups) / counts
    centred = r64 - mean[index]
    scale = _group_reduce(r64.abs(), index, n_groups, op="amax")[index]
    tol = _TIE_ULPS * torch.finfo(torch.float64).eps * scale
    return torch.where(centred.abs() <= tol, torch.zeros_like(centred), centred)


def normalize_rewards(
    rewards: Tensor,
    group: Optional[Tensor] = None,
    mode: NormalizationMode = "group",
    std_scope: StdScope = "global",
    clip: float = 5.0,
    eps: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """Map raw rewards to ``(advantages (N,), r (N,))``; see the module docstring for the formulas.

    Args:
        rewards: raw rewards ``(N,)``, finite (a NaN/inf raises ``ValueError`` naming the sample).
        group: group id of each sample ``(N,)`` (any integers, e.g. unique across ranks) or
            ``None`` for a single group. Ignored by ``"minmax"``.
        mode: ``"group"``, ``"minmax"`` or ``"binary"``.
        std_scope: ``"group"`` (std per group) or ``"global"`` (pooled within-group std over all
            ``N``); used by ``"group"`` only.
        clip: ``c > 0``, the advantage clip of ``"group"`` mode (``r = clip(A, -c, c) / (2c) + 1/2``).
        eps: ``>= 0``, added to the std.

    Returns:
        ``advantages`` and ``r in [0, 1]``, both ``(N,)``, with ``r = A / (2c) + 1/2`` in
        ``"group"`` mode and ``r = (A + 1) / 2`` in the other two.
    """
    if mode not in NORMALIZATION_MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}; choose one of {NORMALIZATION_MODES}")
    if std_scope not in STD_SCOPES:
        raise ValueError(f"unknown std_scope {std_scope!r}; choose one of {STD_SCOPES}")
    clip, eps = float(clip), float(eps)
    if not (clip > 0 and clip < float("inf")):
        raise ValueError(f"clip must be positive and finite; got {clip}")
    if not (eps >= 0 and eps < float("inf")):
        raise ValueError(f"eps must be non-negative and finite; got {eps}")
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must have shape (N,) with N >= 1; got {tuple(rewards.shape)}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    check_finite_rewards(rewards)
    r64 = rewards.detach().to(torch.float64)
    n = r64.shape[0]

    if mode == "minmax":
        lo, hi = r64.min(), r64.max()
        span = hi - lo
        if bool(span > _TIE_ULPS * torch.finfo(torch.float64).eps * torch.maximum(lo.abs(), hi.abs())):
            r = ((r64 - lo) / span).clamp(0.0, 1.0)
        else:
            r = torch.full_like(r64, 0.5)
        adv = 2.0 * r - 1.0
        return adv.to(out_dtype), r.to(out_dtype)

    index, n_groups = _group_index(group, n, r64.device)
    centred = _centred(r64, index, n_groups)

    if mode == "binary":
        adv = torch.sign(centred)
        return adv.to(out_dtype), ((adv + 1.0) / 2.0).to(out_dtype)

    if std_scope == "group":
        counts = _group_reduce(torch.ones_like(r64), index, n_groups)
        std = (_group_reduce(centred**2, index, n_groups) / counts).sqrt()[index]
    else:
        std = (centred**2).mean().sqrt().expand(n)
    denom = std + eps
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    adv = torch.where(centred != 0, centred / safe, torch.zeros_like(centred)).clamp(-clip, clip)
    r = (adv / (2.0 * clip) + 0.5).clamp(0.0, 1.0)
    return adv.to(out_dtype), r.to(out_dtype)


@runtime_checkable
class Normalizer(Protocol):
    """``normalizer(rewards (N,), group (N,)) -> (advantages (N,), r (N,))`` (e.g. :class:`RewardNormalizer`)."""

    def __call__(self, rewards: Tensor, group: Optional[Tensor] = None) -> tuple[Tensor, Tensor]: ...


class RewardNormalizer:
    """Configured :func:`normalize_rewards`: ``normalizer(rewards (N,), group (N,)) -> (A (N,), r (N,))``.

    Built from YAML (``init_args: {mode: group, std_scope: global, clip: 5.0, eps: 1.0e-4}``); see
    the module docstring for the maths, the defaults and why. Called by ``OnlineRollout`` on the
    rewards gathered from all ranks.
    """

    def __init__(
        self,
        mode: NormalizationMode = "group",
        std_scope: StdScope = "global",
        clip: float = 5.0,
        eps: float = 1e-4,
    ) -> None:
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"unknown normalisation mode {mode!r}; choose one of {NORMALIZATION_MODES}")
        if std_scope not in STD_SCOPES:
            raise ValueError(f"unknown std_scope {std_scope!r}; choose one of {STD_SCOPES}")
        if not (float(clip) > 0 and float(clip) < float("inf")):
            raise ValueError(f"clip must be positive and finite; got {clip}")
        if not (float(eps) >= 0 and float(eps) < float("inf")):
            raise ValueError(f"eps must be non-negative and finite; got {eps}")
        self.mode, self.std_scope, self.clip, self.eps = mode, std_scope, float(clip), float(eps)

    def __call__(self, rewards: Tensor, group: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        return normalize_rewards(rewards, group, self.mode, self.std_scope, self.clip, self.eps)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode!r}, std_scope={self.std_scope!r}, "
            f"clip={self.clip}, eps={self.eps})"
        )
