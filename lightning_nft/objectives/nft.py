r"""DiffusionNFT: negative-aware fine-tuning on the forward process.

Papers: "DiffusionNFT: Online Diffusion Reinforcement with Forward Process" (Zheng et al.,
arXiv:2509.16117; the loss and implicit parameterisation), Q. Liu, "DiffusionNFT as Taylor Approximation"
(Theorem 1.1, Lemma 1.2, multi-step NFT), Y. Zhu, "A KL-Regularized Reward-Tilting View of DiffusionNFT"
(the KL anchor).

Notation (time runs noise ``t = 0`` to data ``t = 1``): ``x_t = (1 - t) x0 + t x1``, ``x0 ~ N(0, I)``,
``x1`` a rollout of the old policy with optimality probability ``r`` (``lightning_nft.advantages``),
target ``y = x1 - x0``. Implicit parameterisation with ``beta > 0`` (DiffusionNFT)::

    v+ = (1 - beta) v_old + beta v_theta          (positive policy)
    v- = (1 + beta) v_old - beta v_theta          (implicit negative policy)

Loss, velocity space (the paper's form)::

    L = E_{t, x0, x1} [ r ||v+ - y||^2 + (1 - r) ||v- - y||^2 ]           (norms: mean over non-batch dims)

Loss, data space (the public release's form): with ``x1_hat± = x_t + (1 - t) v±`` and
``e± = x1_hat± - x1 = (1 - t)(v± - y)``::

    L = E [ r ||e+||^2 / sg(mean|e+|) + (1 - r) ||e-||^2 / sg(mean|e-|) ]

``sg`` = stop-gradient; the weight is floored at ``1e-5`` as in the release. The gradient in ``e``
is ``2 e / (D mean|e|)``: the squared-error direction with a per-sample magnitude normalised by the
current error size (a robust, norm-like loss). This weight makes the population optimum differ
from the one below; the closed forms hold for velocity space. The release also multiplies the loss
by ``adv_clip_max / beta``; we do not (a pure gradient scale; with Adam almost only a learning-rate
change, but it changes the balance with the KL anchor: a release anchor weight ``w_rel`` is our
``kl_weight = w_rel * beta / c`` with ``c`` the release's ``adv_clip_max``).

**Lemma 1.2 (pointwise optimum).** Per sample the loss is a quadratic in ``v_theta`` with Hessian
``2 beta^2 I / D`` for *every* real ``r`` (``r + (1 - r) = 1``), minimised at
``v_old + (2 r - 1)(y - v_old) / beta`` (:func:`nft_pointwise_optimum`); in fact
``loss = beta^2 ||v_theta - z||^2 + const`` with that ``z``.

**Theorem 1.1 (Taylor-approximation note).** With ``v_old(x) = E[y | X_t = x]`` the exact field of the rollout
distribution, averaging ``z`` given ``X_t = x`` gives the minimiser of ``L``::

    v*(x, t) = v_old(x, t) + (2 / beta) Cov(r(X1), X1 - X0 | X_t = x)
             ~ Taylor step of the exponentially tilted field v^{alpha}, alpha = 2 / beta, of p_old(x) exp(alpha r(x)).

Constants in ``r`` drop out (so any affine normalisation of a reward is a rescaling of ``alpha``), and
``r`` need not lie in ``[0, 1]`` for the theorem (the quadratic stays convex). On a Gaussian mixture
with ``r = a.x`` this is ``lightning_nft.analytic.GaussianMixture.nft_optimum`` (tested).

**KL anchor (reward-tilting view, in the release's form).** ``kl_weight * ||v_theta - v_ref||^2`` toward
the frozen initial model; pointwise the velocity-space optimum becomes
``(beta^2 z + w v_ref) / (beta^2 + w)`` (exact, tested). The weight is passed to :meth:`NFTObjective.loss` as ``kl_weight``
(the module's, set by the ``KLAnchor`` callback).

**Multi-step NFT (Taylor-approximation note).** One NFT round with ``v_old = v^{alpha_0}`` learns
``v^{alpha_0} + (2 / beta) d/d alpha v^alpha |_{alpha_0}``: one explicit Euler step of length
``2 / beta`` along the tilt parameter. Splitting the round into ``S = substeps`` sub-rounds, each
starting with a *hard* refresh ``old <- current`` and *fresh* rollouts from the refreshed old
policy (so the covariance is taken under the current tilted distribution: re-linearisation), and
training each with ``beta_eff = S beta``, takes ``S`` Euler steps of ``2 / (S beta)``; one round
still moves the tilt by ``2 / beta`` in total, and the error of this explicit Euler scheme
against the exactly tilted field ``v^{2 / beta}`` shrinks like ``1 / S`` (if each sub-round is
trained to its optimum).
This objective uses ``beta_eff`` (:attr:`NFTObjective.effective_beta`) and asks for
``rollouts_per_round = substeps`` collections per round; the module refreshes the old policy before each. (With batch-normalised ``r`` each Euler step is measured in standardised reward units of its
own sub-round's rollouts.)

Time sampling: a density (``lightning_nft.timesteps.TimeSampler``: uniform, logit-normal,
shifted) or the sampler's own grid (``time_source="grid"``): ``t`` uniform over the left ends
``times[:-1]`` of the rollout solver's steps, i.e. the times at which the sampler evaluated the field
(``t = 1``, pure data, excluded). Only the grid *values* ``batch.times (T+1,)`` are needed, not the
trajectory: ``x_t`` is always re-noised from ``x1`` with fresh ``x0``.

Shapes: ``v_* , x0, x1, x_t (B, *S)``; ``t, r (B,)``; per-sample losses ``(B,)``.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from torch import Tensor

from lightning_nft.objectives.base import Objective, Policies, standard_normal
from lightning_nft.paths import data_from_velocity, expand_like, interpolate, velocity_target
from lightning_nft.rollouts import RolloutBatch
from lightning_nft.timesteps import TimeSampler

NFTSpace = Literal["velocity", "data"]
TimeSource = Literal["density", "grid"]

ADAPTIVE_WEIGHT_FLOOR = 1e-5


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not (beta > 0 and beta < float("inf")):
        raise ValueError(f"beta must be positive and finite; got {beta}")
    return beta


def implicit_policies(v_theta: Tensor, v_old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``(v+, v-) = ((1 - beta) v_old + beta v_theta, (1 + beta) v_old - beta v_theta)``, each ``(B, *S)``."""
    beta = _check_beta(beta)
    return (1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta


def _adaptive_error(err: Tensor, floor: float) -> Tensor:
    """``mean(err^2) / sg(max(mean|err|, floor))`` per sample, ``(B,)``; the weight in float64."""
    with torch.no_grad():
        w = _per_sample_mean(err.detach().to(torch.float64).abs()).clamp_min(floor).to(err.dtype)
    return _per_sample_mean(err**2) / w


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x0: Tensor,
    x1: Tensor,
    x_t: Optional[Tensor],
    t: Optional[Union[float, Tensor]],
    r: Union[float, Tensor],
    beta: float,
    space: NFTSpace = "velocity",
    adaptive_weight: bool = True,
) -> Tensor:
    """Per-sample DiffusionNFT loss ``(B,)`` (module docstring for the equations).

    Args:
        v_theta: trained velocity ``(B, *S)`` (gradients flow).
        v_old: old-policy velocity ``(B, *S)`` (detached here).
        x0, x1: noise and rollout sample ``(B, *S)``; the target is ``x1 - x0``.
        x_t, t: the network input and its times ``(B,)`` (only the data space uses them).
        r: optimality probabilities ``(B,)`` (any real numbers are accepted).
        beta: ``> 0``.
        space: ``"velocity"`` (``r ||v+ - y||^2 + (1 - r) ||v- - y||^2``) or ``"data"``
            (errors of ``x1_hat± = x_t + (1 - t) v±``, each divided by its detached per-sample mean
            absolute value when ``adaptive_weight``, else plain squared errors).
        adaptive_weight: data space only; ``False`` gives ``(1 - t)^2`` times the velocity loss.
    """
    if space not in ("velocity", "data"):
        raise ValueError(f"space must be 'velocity' or 'data'; got {space!r}")
    if v_theta.shape != v_old.shape or v_theta.shape != x0.shape or x0.shape != x1.shape:
        raise ValueError(
            f"v_theta, v_old, x0, x1 must have one shape; got {tuple(v_theta.shape)}, {tuple(v_old.shape)}, "
            f"{tuple(x0.shape)}, {tuple(x1.shape)}"
        )
    v_pos, v_neg = implicit_policies(v_theta, v_old.detach(), beta)
    r = torch.as_tensor(r, dtype=v_theta.dtype, device=v_theta.device)
    if r.dim() == 0:
        r = r.expand(v_theta.shape[0])
    if r.shape != (v_theta.shape[0],):
        raise ValueError(f"r must be a scalar or have shape (B,) = ({v_theta.shape[0]},); got {tuple(r.shape)}")
    if space == "velocity":
        y = velocity_target(x0, x1)
        pos = _per_sample_mean((v_pos - y) ** 2)
        neg = _per_sample_mean((v_neg - y) ** 2)
    else:
        if x_t is None or t is None:
            raise ValueError("the data-space NFT loss needs x_t and t")
        err_pos = data_from_velocity(x_t, t, v_pos) - x1
        err_neg = data_from_velocity(x_t, t, v_neg) - x1
        if adaptive_weight:
            pos = _adaptive_error(err_pos, ADAPTIVE_WEIGHT_FLOOR)
            neg = _adaptive_error(err_neg, ADAPTIVE_WEIGHT_FLOOR)
        else:
            pos, neg = _per_sample_mean(err_pos**2), _per_sample_mean(err_neg**2)
    return r * pos + (1 - r) * neg


def kl_anchor_penalty(v_theta: Tensor, v_ref: Tensor) -> Tensor:
    """KL anchor to the initial reference (reward-tilting view; the public release's form), ``(B,)``:
    ``mean over non-batch dims of (v_theta - v_ref)^2`` (``v_ref`` detached)."""
    if v_theta.shape != v_ref.shape:
        raise ValueError(f"v_theta and v_ref must have one shape; got {tuple(v_theta.shape)}, {tuple(v_ref.shape)}")
    return _per_sample_mean((v_theta - v_ref.detach()) ** 2)


def nft_pointwise_optimum(v: Tensor, y: Tensor, r: Union[float, Tensor], beta: float) -> Tensor:
    """Lemma 1.2 (Taylor-approximation note): the per-sample minimiser of the velocity-space loss, ``(B, *S)``:
    ``v_theta* = v + (2 r - 1)(y - v) / beta`` for old velocity ``v``, target ``y = x1 - x0`` and ``r (B,)``."""
    beta = _check_beta(beta)
    r = torch.as_tensor(r, dtype=v.dtype, device=v.device)
    if r.dim() == 1:
        r = expand_like(r, v)
    return v + (2 * r - 1) * (y - v) / beta


class NFTObjective(Objective):
    """DiffusionNFT as an :class:`~lightning_nft.objectives.base.Objective` (equations in the module docstring).

    Rollouts come from the old policy with any solver; only the clean samples ``x1``, their ``r``
    and conditions are used (plus the grid ``times`` when ``time_source="grid"``).

    Args:
        beta: implicit-parameterisation strength; one round approximates the tilt ``exp((2 / beta) r)``
            (Theorem 1.1).
        space: ``"velocity"`` (paper) or ``"data"`` (release, adaptive weight).
        time_sampler: density of ``t`` (default: uniform on ``[0, 1]``). With ``time_source="grid"``
            its ``[t_min, t_max]`` restricts the eligible grid points.
        time_source: ``"density"`` or ``"grid"`` (the rollout solver's own times; needs
            ``batch.times``).
        substeps: multi-step NFT: each round is split into ``substeps`` sub-rounds (hard refresh + fresh
            rollouts each, ``rollouts_per_round``) and the loss uses ``effective_beta = beta * substeps``.
        adaptive_weight: data space: divide by the detached mean absolute error (release).

    Calls ``policies.velocity``, ``old_velocity`` and, when ``kl_weight > 0``, ``reference_velocity``
    (``kl_weight = 0``: no anchor term, no reference forward pass).
    Logs ``nft_loss``, ``old_deviation = mean (v_theta - v_old)^2`` and, with an anchor,
    ``kl_anchor`` (the unweighted penalty).
    """

    sampling_policy = "old"
    needs_trajectory = False
    needs_log_probs = False
    needs_reward_gradient = False
    needs_old_policy = True

    def __init__(
        self,
        beta: float = 1.0,
        space: NFTSpace = "velocity",
        time_sampler: Optional[TimeSampler] = None,
        time_source: TimeSource = "density",
        substeps: int = 1,
        adaptive_weight: bool = True,
    ) -> None:
        self.beta = _check_beta(beta)
        if space not in ("velocity", "data"):
            raise ValueError(f"space must be 'velocity' or 'data'; got {space!r}")
        if time_source not in ("density", "grid"):
            raise ValueError(f"time_source must be 'density' or 'grid'; got {time_source!r}")
        if isinstance(substeps, bool) or not isinstance(substeps, int) or substeps < 1:
            raise ValueError(f"substeps must be an integer >= 1; got {substeps!r}")
        self.space = space
        self.time_sampler = time_sampler if time_sampler is not None else TimeSampler("uniform")
        self._time_sampler_given = time_sampler is not None
        self.time_source = time_source
        self.substeps = substeps
        self.adaptive_weight = bool(adaptive_weight)

    @property
    def rollouts_per_round(self) -> int:  # type: ignore[override]
        """Multi-step NFT: one fresh rollout collection per sub-round."""
        return self.substeps

    @property
    def effective_beta(self) -> float:
        """``beta * substeps``: each of the ``substeps`` Euler steps moves the tilt by ``2 / effective_beta``."""
        return self.beta * self.substeps

    @property
    def needs_grid_times(self) -> bool:
        """Whether rollouts must keep the solver grid ``times`` (not the trajectory)."""
        return self.time_source == "grid"

    def sample_times(
        self,
        batch: RolloutBatch,
        n: int,
        device: torch.device,
        dtype: torch.dtype,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Training times ``(n,)``: from the density, or uniform over the eligible grid points."""
        if self.time_source == "density":
            return self.time_sampler(n, device=device, dtype=dtype, generator=generator)
        if batch.times is None:
            raise ValueError(
                "NFTObjective(time_source='grid') needs the rollout grid: the rollout batch has no `times` "
                "(keep the solver's times in RolloutBatch.times)"
            )
        grid = batch.times.reshape(-1)[:-1]
        if self._time_sampler_given:
            ts = self.time_sampler
            grid = grid[(grid >= ts.t_min) & (grid <= ts.t_max)]
        if grid.numel() == 0:
            raise ValueError("no grid time of the rollout solver lies in the time sampler's [t_min, t_max]")
        idx = torch.randint(0, grid.numel(), (n,), generator=generator)
        return grid.cpu()[idx].to(device=device, dtype=dtype)

    def loss(self, policies: Policies, batch: RolloutBatch, generator: torch.Generator,
             kl_weight: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean DiffusionNFT loss of the minibatch, plus ``kl_weight`` times the KL anchor when positive."""
        kl_weight = float(kl_weight)
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be non-negative; got {kl_weight}")
        x1 = batch.x1
        cond = batch.cond
        n = x1.shape[0]
        x0 = standard_normal(tuple(x1.shape), x1, generator)
        t = self.sample_times(batch, n, torch.device("cpu"), x1.dtype, generator).to(x1.device)
        x_t = interpolate(x0, x1, t)
        v_theta = policies.velocity(x_t, t, cond)
        with torch.no_grad():
            v_old = policies.require_old("NFTObjective")(x_t, t, cond).detach()
        r = batch.r.to(device=x1.device, dtype=x1.dtype)
        per_sample = nft_loss(
            v_theta, v_old, x0, x1, x_t, t, r, self.effective_beta, space=self.space,
            adaptive_weight=self.adaptive_weight,
        )
        loss = per_sample.mean()
        logs: dict[str, Tensor] = {
            "nft_loss": loss.detach(),
            "old_deviation": _per_sample_mean((v_theta.detach() - v_old) ** 2).mean(),
        }
        if kl_weight > 0:
            with torch.no_grad():
                v_ref = policies.reference_velocity(x_t, t, cond).detach()
            kl = kl_anchor_penalty(v_theta, v_ref).mean()
            loss = loss + kl_weight * kl
            logs["kl_anchor"] = kl.detach()
        return loss, logs

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(beta={self.beta}, space={self.space!r}, time_source={self.time_source!r}, "
            f"substeps={self.substeps}, adaptive_weight={self.adaptive_weight})"
        )
