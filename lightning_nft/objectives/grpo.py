r"""Flow-GRPO: PPO-clip policy gradients on the Gaussian transitions of an SDE sampler ("Reward Score Matching").

Flow-GRPO turns sampling into an MDP. Rollouts are drawn with the SDE solver
(``lightning_nft.samplers.SDESolver``; default noise Flow-GRPO's ``sigma(t) = a sqrt((1 - t) / t)``,
:class:`~lightning_nft.samplers.FlowGRPONoise`), whose every step is Gaussian::

    pi(x_{j+1} | x_j) = N(mu_j, s_j^2 I),   mu_j = F_j x_j + G_j v(x_j, t_j),   G_j = t_{j+1} - F_j t_j

(``F_j``, ``s_j`` depend on the times only; ``samplers`` module docstring). The rollout keeps the
states ``trajectory (T+1, N, *S)``, the grid ``times (T+1,)`` and the sampling policy's log-densities
``log_probs (T, N)``. With ``A_i`` the group-normalised advantage of sample ``i``
(``lightning_nft.advantages``: the same normalisation as DiffusionNFT, group-centred by default) and a
set ``J_i`` of trained steps, the minibatch loss is::

    rho_ij = pi_theta(x_{j+1} | x_j) / pi_old(x_{j+1} | x_j)                       (likelihood ratio, Eq. 99)
    L = mean_{i, j in J_i} [ w_j * -min(rho_ij A_i, clip(rho_ij, 1 - eps, 1 + eps) A_i) ]     (PPO-clip, Eq. 106)
        + kl_weight * mean_{i, j in J_i} ||mu_theta,j - mu_ref,j||^2 / (2 s_j^2)          (KL to the reference, Eq. 90)

``pi_theta`` is recomputed with gradients (``policies.velocity``) at the stored ``(x_j, t_j)`` and
evaluated at the *stored* ``x_{j+1}``; ``pi_old`` is the stored log-probability. The KL is the exact KL of
two Gaussians with equal covariance ``s_j^2 I``, ``KL(N(mu, s^2 I) || N(mu_ref, s^2 I)) = ||mu - mu_ref||^2 /
(2 s^2)`` (Reward Score Matching, Eq. 90), with ``mu_ref`` from ``policies.reference_velocity``.

**Gradient and what it estimates.** At ``theta = theta_old`` (``rho = 1``, no clip active),
``grad L = -mean A_i grad log pi_theta(x_{j+1} | x_j)`` and
``grad_v log pi = G_j (x_{j+1} - mu_j) / s_j^2 = (G_j / s_j) eps_j`` with ``eps_j`` the step's standard
normal noise: REINFORCE on the transition means, i.e. the zeroth-order full-rollout estimator of the value
gradient (Reward Score Matching, Def. 3.5 / Thm. 3.7, App. C.2.1). PPO and GRPO reduce to the clipped log-ratio form
of App. C.2.2 under tight clipping (App. C.2.3).

**The three design dimensions of Reward Score Matching, section 4, as options.**

* *Estimator*: which rollouts (full SDE trajectories, or TempFlow-GRPO-style *branching*:
  ``branch_width > 1``, :class:`BranchingSDESolver`), which steps are trained (``train_timesteps``,
  ``t_min``/``t_max``; Flow-GRPO's ``timestep_fraction``), and reward centring (the module's normaliser).
* *Temporal weighting*: ``temporal_weighting`` multiplies the policy term of step ``j`` by ``w_j``
  (:func:`temporal_weights`).
* *Trust region*: ``clip_range`` (PPO-clip around the sampling policy) and ``kl_weight`` (KL to the
  frozen reference).

**The old policy in this library.** Rollouts come from the module's *old* policy (``sampling_policy =
"old"``), whose weights the ``EMAOldPolicy`` callback moves at the end of each round,
``old <- d old + (1 - d) current``. The stored log-probs are therefore the old policy's, and ``rho`` is
the importance ratio of the current policy against the policy that *sampled* the data, exactly
Flow-GRPO's ratio (its ``log_prob - old_log_prob`` against the stored sampling log-probs). What that ratio
measures depends on ``d``:

* ``d = 0`` (a hard copy each round; what the GRPO configs use): at the start of every round the old
  policy *is* the current one, so ``rho = 1`` on the first inner step (up to floating-point rounding of
  the batched forward pass; tested) and the round is Flow-GRPO's on-policy round: later minibatches of
  the round see ``theta`` move and the clip keeps each step within ``eps`` of the sampler.
* ``d > 0``: the old policy lags the current one by about ``d / (1 - d)`` rounds of updates. ``rho`` is
  still the correct importance weight for data drawn from the old policy, but ``rho != 1`` already on the
  first inner step, the advantages are those of the lagged policy, and the clip anchors the update to
  the lagged policy (Reward Score Matching's "trust region to the previous policy", Eq. 12, made stronger): with a
  tight clip many samples are clipped from the first step on and learning slows or stalls.
  The module warns in that case (``OnlineFineTuningMixin.setup``). (NFT, in contrast, *wants* a lagging old policy.)

**Log-prob reduction.** The true transition ratio sums the log-density over the ``D = prod(S)`` sample
dimensions (``log_prob_reduction="sum"``, default). Flow-GRPO's implementation averages them
(``"mean"``: ``rho = exp((log pi_theta - log pi_old) / D)``, the per-dimension geometric mean, and the KL
is also averaged over dimensions): per-dimension ratios stay much closer to 1, and its published clip
range is correspondingly tiny (``1e-4`` for SD3.5). Pick ``clip_range`` (and ``kl_weight``) for the
reduction in use.

Shapes: ``trajectory (T+1, N, *S)``, ``times (T+1,)``, ``log_probs (T, N)``, ``advantages (N,)``;
trained transitions are flattened to ``M = B * K`` rows ``(M, *S)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from lightning.pytorch.utilities import rank_zero_warn

from lightning_nft.objectives.base import Objective, Policies
from lightning_nft.conditions import index_condition
from lightning_nft.rollouts import RolloutBatch
from lightning_nft.samplers import (
    BranchingSDESolver,
    FlowGRPONoise,
    SDESolver,
    Solver,
    VelocityFn,
    ZeroNoise,
    gaussian_log_prob,
)

TrainTimesteps = Union[str, int, float]
TemporalWeighting = Union[str, Sequence[float]]
LogProbReduction = Literal["sum", "mean"]

TEMPORAL_WEIGHTINGS = ("uniform", "sigma", "flat")

__all__ = [
    "likelihood_ratio",
    "ppo_clip_loss",
    "gaussian_mean_kl",
    "temporal_weights",
    "select_train_steps",
    "TransitionBatch",
    "gather_transitions",
    "transition_log_probs",
    "GRPOObjective",
]


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------


def likelihood_ratio(new_log_prob: Tensor, old_log_prob: Tensor, scale: float = 1.0) -> Tensor:
    """Per-step likelihood ratio ``rho = exp(scale * (log pi_new - log pi_old))`` (Reward Score Matching, Eq. 99).

    ``new_log_prob`` (differentiable) and ``old_log_prob`` (detached here) have one shape, e.g. ``(M,)``.
    ``scale = 1`` is the exact ratio of summed log-densities; ``scale = 1 / D`` is Flow-GRPO's
    per-dimension (mean-reduced) ratio.
    """
    if new_log_prob.shape != old_log_prob.shape:
        raise ValueError(
            f"new and old log-probs must have one shape; got {tuple(new_log_prob.shape)}, {tuple(old_log_prob.shape)}"
        )
    return torch.exp(scale * (new_log_prob - old_log_prob.detach()))


def ppo_clip_loss(ratio: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """PPO-clip surrogate, elementwise: ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` (Reward Score Matching, Eq. 106).

    ``ratio``, ``advantages``: one shape (``(M,)``). ``clip_range = eps > 0``; ``float('inf')`` disables the
    clip (plain importance-sampled policy gradient). The gradient in ``rho`` is ``-A`` where the unclipped
    term is the minimum and ``0`` where the clip binds (``rho > 1 + eps`` with ``A > 0``, ``rho < 1 - eps``
    with ``A < 0``).
    """
    eps = float(clip_range)
    if not eps > 0:
        raise ValueError(f"clip_range must be positive; got {clip_range}")
    if ratio.shape != advantages.shape:
        raise ValueError(
            f"ratio and advantages must have one shape; got {tuple(ratio.shape)}, {tuple(advantages.shape)}"
        )
    advantages = advantages.detach()
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps, 1.0 + eps) * advantages if math.isfinite(eps) else unclipped
    return -torch.minimum(unclipped, clipped)


def gaussian_mean_kl(mean: Tensor, mean_ref: Tensor, std: Tensor, reduction: LogProbReduction = "sum") -> Tensor:
    """``KL(N(mean, s^2 I) || N(mean_ref, s^2 I)) = ||mean - mean_ref||^2 / (2 s^2)`` per row, ``(M,)``.

    ``mean``, ``mean_ref``: ``(M, *S)`` (``mean_ref`` detached here); ``std``: float, 0-d or ``(M,)``.
    Seed 002, Eq. 90 (equal covariances: the log-determinant and trace terms cancel). ``reduction="mean"``
    divides by ``D = prod(S)`` (Flow-GRPO's implementation).
    """
    if mean.shape != mean_ref.shape:
        raise ValueError(f"mean and mean_ref must have one shape; got {tuple(mean.shape)}, {tuple(mean_ref.shape)}")
    diff = (mean - mean_ref.detach()).reshape(mean.shape[0], -1)
    sq = diff.pow(2).sum(dim=1) if reduction == "sum" else diff.pow(2).mean(dim=1)
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    return sq / (2 * std.pow(2))


def _step_coefficients(solver: SDESolver, times: Tensor) -> tuple[Tensor, Tensor]:
    """``G_j = t_{j+1} - F_j t_j`` and ``s_j`` for every step of ``times (T+1,)``, float64 ``(T,)`` each."""
    t64 = times.detach().to(torch.float64).cpu()
    t, tn = t64[:-1], t64[1:]
    decay, var = solver.noise.step_coefficients(t, tn)
    return tn - decay * t, var.clamp_min(0.0).sqrt()


def temporal_weights(scheme: TemporalWeighting, times: Tensor, solver: Optional[SDESolver] = None) -> Tensor:
    r"""Weights ``w (T,)`` of the policy term of each step of the grid ``times (T+1,)`` (Reward Score Matching, sec. 4).

    * ``"uniform"``: ``w_j = 1`` (Flow-GRPO: a plain mean over the trained steps).
    * ``"sigma"``: ``w_j \propto s_j``, the step's noise std. Noise-level-aware weighting in the spirit of
      TempFlow-GRPO (Reward Score Matching, App. C.2.3): it down-weights the low-noise, high-SNR steps near ``t = 1``,
      where the native per-step gradient scale ``G_j / s_j`` (below) and hence the zeroth-order variance
      are largest (Reward Score Matching, Eq. 19).
    * ``"flat"``: ``w_j \propto s_j / G_j``. Since ``grad_v log pi_j = (G_j / s_j) eps_j``, this cancels the
      sampler's native weight so that every step pulls the velocity with the same strength per unit of
      advantage: a flat normalised influence across time (Reward Score Matching, Eqs. 21-23), the idea of
      PCPO-reweight (App. C.2.3, D.3; our form, not PCPO's exact schedule).
    * a sequence of ``T`` non-negative numbers: used as given (then normalised).

    Scheme weights are normalised to mean one over the ``T`` steps (a pure reallocation across time,
    not a change of the overall loss scale). ``"sigma"`` and ``"flat"`` need the ``solver``'s noise
    schedule; steps with ``s_j = 0`` get weight 0.
    """
    n_steps = times.numel() - 1
    if n_steps < 1:
        raise ValueError("times must hold at least two grid points")
    if not isinstance(scheme, str):
        w = torch.as_tensor([float(v) for v in scheme], dtype=torch.float64)
        if w.shape != (n_steps,):
            raise ValueError(f"explicit temporal weights must have one value per step ({n_steps}); got {w.numel()}")
    elif scheme == "uniform":
        w = torch.ones(n_steps, dtype=torch.float64)
    elif scheme in ("sigma", "flat"):
        if solver is None or not hasattr(solver, "noise"):
            raise ValueError(f"temporal weighting {scheme!r} needs the SDE solver's noise schedule")
        g, s = _step_coefficients(solver, times)
        w = s.clone() if scheme == "sigma" else torch.where(g > 0, s / g.clamp_min(1e-300), torch.zeros_like(s))
    else:
        raise ValueError(f"unknown temporal weighting {scheme!r}; choose one of {TEMPORAL_WEIGHTINGS} or a list")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool(w.sum() > 0):
        raise ValueError(f"temporal weights must be finite, non-negative and not all zero; got {w.tolist()}")
    return (w / w.mean()).to(device=times.device, dtype=times.dtype if times.is_floating_point() else torch.float32)


def _n_train_steps(spec: TrainTimesteps, n_eligible: int) -> int:
    """How many steps ``K`` to train per sample out of ``n_eligible`` (``"all"``, an int, or a fraction)."""
    if isinstance(spec, str):
        if spec.strip().lower() != "all":
            raise ValueError(f"train_timesteps must be 'all', an integer K >= 1 or a fraction in (0, 1]; got {spec!r}")
        return n_eligible
    if isinstance(spec, bool):
        raise ValueError(f"train_timesteps must be 'all', an integer or a fraction; got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"train_timesteps as an integer must be >= 1; got {spec}")
        return min(spec, n_eligible)
    frac = float(spec)
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"train_timesteps as a fraction must lie in (0, 1]; got {spec}")
    return max(1, min(n_eligible, int(round(frac * n_eligible))))


def select_train_steps(eligible: Tensor, spec: TrainTimesteps = "all",
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """Choose ``K`` distinct trained steps per sample: ``(B, K)`` step indices into ``[0, T)``.

    ``eligible``: ``(B, T)`` boolean (steps that may be trained: a finite stored log-prob, inside the
    ``[t_min, t_max]`` window). ``K`` comes from ``spec`` (:func:`_n_train_steps`) applied to the
    smallest number of eligible steps of any sample. For each sample the ``K`` steps are a uniformly
    random subset of its eligible steps, drawn independently per sample (Flow-GRPO's per-sample
    permutation of the timesteps); with ``"all"`` every eligible step is taken, in increasing order.
    """
    if eligible.dim() != 2 or eligible.dtype != torch.bool:
        raise ValueError(f"eligible must be a (B, T) boolean tensor; got {tuple(eligible.shape)} {eligible.dtype}")
    counts = eligible.sum(dim=1)
    n_min = int(counts.min()) if counts.numel() else 0
    if n_min < 1:
        raise ValueError("some rollout has no trainable step (no finite log-prob inside [t_min, t_max])")
    k = _n_train_steps(spec, n_min)
    if k == eligible.shape[1]:
        return torch.arange(k, device=eligible.device).expand(eligible.shape[0], k).clone()
    scores = torch.rand(eligible.shape, generator=generator, device="cpu" if generator is not None else None,
                        dtype=torch.float64).to(eligible.device)
    scores = torch.where(eligible, scores, torch.full_like(scores, -1.0))
    steps = scores.topk(k, dim=1).indices
    return steps.sort(dim=1).values


@dataclass
class TransitionBatch:
    """``M = B * K`` stored transitions ``x_j -> x_{j+1}`` flattened to rows.

    rows: sample index ``(M,)``; steps: step index ``j`` ``(M,)``; x, x_next: ``(M, *S)``;
    t, t_next: ``(M,)`` grid times ``t_j``, ``t_{j+1}``.
    """

    rows: Tensor
    steps: Tensor
    x: Tensor
    x_next: Tensor
    t: Tensor
    t_next: Tensor


def gather_transitions(trajectory: Tensor, times: Tensor, steps: Tensor) -> TransitionBatch:
    """Rows of the transitions ``steps (B, K)`` of ``trajectory (T+1, B, *S)`` on the grid ``times (T+1,)``."""
    if trajectory.dim() < 2 or times.dim() != 1 or trajectory.shape[0] != times.shape[0]:
        raise ValueError(
            f"trajectory must be (T+1, B, *S) on times (T+1,); got {tuple(trajectory.shape)} and {tuple(times.shape)}"
        )
    b = trajectory.shape[1]
    if steps.dim() != 2 or steps.shape[0] != b:
        raise ValueError(f"steps must have shape (B, K) with B = {b}; got {tuple(steps.shape)}")
    steps = steps.to(trajectory.device)
    rows = torch.arange(b, device=trajectory.device).unsqueeze(1).expand_as(steps).reshape(-1)
    js = steps.reshape(-1)
    return TransitionBatch(rows=rows, steps=js, x=trajectory[js, rows], x_next=trajectory[js + 1, rows],
                           t=times.to(trajectory.device)[js], t_next=times.to(trajectory.device)[js + 1])


def transition_log_probs(solver: SDESolver, velocity: VelocityFn, tb: TransitionBatch,
                         cond: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """Recompute ``log pi(x_next | x)`` of stored transitions under ``velocity``, in the caller's grad mode.

    ``cond``: the condition of each row of ``tb`` (``M`` rows) or ``None``. Uses the same
    ``solver.transition`` (per-row times) and :func:`~lightning_nft.samplers.gaussian_log_prob` as the
    sampler, so an unchanged policy reproduces the stored log-probs up to rounding.
    Returns ``(log_prob (M,), mean (M, *S), std (M,))``.
    """
    mean, std = solver.transition(velocity, tb.x, tb.t, tb.t_next, cond)
    return gaussian_log_prob(tb.x_next, mean, std), mean, std


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------


class GRPOObjective(Objective):
    """Flow-GRPO (module docstring for the equations): PPO-clip on stored SDE transitions + KL to the reference.

    Args:
        clip_range: ``eps`` of the PPO clip (trust region around the sampling policy); ``inf``: no clip.
        kl_weight: weight of the transition-mean KL to the frozen reference (trust region); ``0`` skips the
            reference forward pass.
        noise_level: Flow-GRPO's ``a`` in ``sigma(t) = a sqrt((1 - t) / t)`` of the default solver. Only
            used when the module is given no solver; the loss recomputes transitions with whatever solver
            sampled (``Policies.solver``), which must be an :class:`~lightning_nft.samplers.SDESolver`.
        train_timesteps: trained steps per sample: ``"all"``, an integer ``K`` (``K`` random steps), or a
            fraction in ``(0, 1]`` of the eligible steps (Flow-GRPO's ``timestep_fraction``).
        t_min, t_max: only steps with ``t_min <= t_j <= t_max`` are trained (e.g. Flow-GRPO-Fast's early
            window).
        temporal_weighting: ``"uniform"``, ``"sigma"``, ``"flat"`` or a list of ``T`` weights
            (:func:`temporal_weights`).
        branch_width: ``0`` or ``1``: full SDE rollouts (Flow-GRPO). ``W >= 2``: TempFlow-style one-step
            branching rollouts (:class:`BranchingSDESolver`); the module's ``group_size`` must equal ``W``.
        branch_steps, branch_probs: where branching may happen and how often (:class:`BranchingSDESolver`).
        log_prob_reduction: ``"sum"`` (exact transition ratio and KL) or ``"mean"`` (Flow-GRPO's code:
            divided by ``D``).

    Logs ``policy_loss``, ``kl`` (unweighted), ``ratio_mean``, ``ratio_max_dev = max |rho - 1|``,
    ``clip_fraction`` (share of rows whose clip binds) and ``approx_kl = mean (log rho)^2 / 2``.
    """

    sampling_policy = "old"
    needs_trajectory = True
    needs_log_probs = True
    needs_reward_gradient = False
    needs_old_policy = True
    default_ema_decay = 0.0  # on-policy rounds: the old policy is a hard copy when a round starts

    def __init__(
        self,
        clip_range: float = 0.2,
        kl_weight: float = 0.0,
        noise_level: float = 0.7,
        train_timesteps: TrainTimesteps = "all",
        t_min: float = 0.0,
        t_max: float = 1.0,
        temporal_weighting: TemporalWeighting = "uniform",
        branch_width: int = 0,
        branch_steps: Optional[Sequence[int]] = None,
        branch_probs: Optional[Sequence[float]] = None,
        log_prob_reduction: LogProbReduction = "sum",
    ) -> None:
        if not float(clip_range) > 0:
            raise ValueError(f"clip_range must be positive; got {clip_range}")
        if not (float(kl_weight) >= 0 and math.isfinite(float(kl_weight))):
            raise ValueError(f"kl_weight must be non-negative and finite; got {kl_weight}")
        if not 0.0 <= float(t_min) <= float(t_max) <= 1.0:
            raise ValueError(f"need 0 <= t_min <= t_max <= 1; got t_min={t_min}, t_max={t_max}")
        if log_prob_reduction not in ("sum", "mean"):
            raise ValueError(f"log_prob_reduction must be 'sum' or 'mean'; got {log_prob_reduction!r}")
        if isinstance(temporal_weighting, str) and temporal_weighting not in TEMPORAL_WEIGHTINGS:
            raise ValueError(f"unknown temporal weighting {temporal_weighting!r}; choose one of {TEMPORAL_WEIGHTINGS}")
        _n_train_steps(train_timesteps, 1)  # validate the spec
        if isinstance(branch_width, bool) or not isinstance(branch_width, int) or branch_width < 0:
            raise ValueError(f"branch_width must be a non-negative integer; got {branch_width!r}")
        self.clip_range = float(clip_range)
        self.kl_weight = float(kl_weight)
        self.noise_level = float(noise_level)
        self.train_timesteps = train_timesteps
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.temporal_weighting = temporal_weighting if isinstance(temporal_weighting, str) else [
            float(v) for v in temporal_weighting]
        self.branch_width = branch_width
        self.branch_steps = branch_steps
        self.branch_probs = branch_probs
        self.log_prob_reduction = log_prob_reduction
        self._solver = self._build_solver()

    @property
    def branching(self) -> bool:
        return self.branch_width >= 2

    def _build_solver(self) -> SDESolver:
        noise = FlowGRPONoise(self.noise_level)
        if self.branching:
            return BranchingSDESolver(noise, branch_width=self.branch_width, branch_steps=self.branch_steps,
                                      branch_probs=self.branch_probs)
        if self.branch_steps is not None or self.branch_probs is not None:
            raise ValueError("branch_steps / branch_probs need branch_width >= 2")
        return SDESolver(noise)

    def default_solver(self) -> SDESolver:
        """``SDESolver(FlowGRPONoise(noise_level))`` (or the branching solver when ``branch_width >= 2``)."""
        return self._solver

    # ------------------------------------------------------------------ set-up checks
    def setup(self, *, reward: Any, solver: Solver, group_size: int, kl_weight: float = 0.0) -> None:
        """Refuse an ODE rollout solver or a branching width that differs from the group size."""
        if not isinstance(solver, SDESolver) or isinstance(solver.noise, ZeroNoise):
            raise ValueError(
                f"GRPOObjective needs Gaussian transitions: the rollout solver must be an SDESolver with non-zero "
                f"noise, got {solver!r}"
            )
        if self.branching:
            if not isinstance(solver, BranchingSDESolver) or solver.branch_width != self.branch_width:
                raise ValueError(f"branch_width={self.branch_width} needs the module's rollout solver to be the "
                                 f"objective's BranchingSDESolver (leave the module's solver unset); got {solver!r}")
            if int(group_size) != self.branch_width:
                raise ValueError(f"branching centres rewards over siblings: group_size ({group_size}) must equal "
                                 f"branch_width ({self.branch_width})")
        if kl_weight > 0:
            rank_zero_warn("GRPOObjective ignores kl_weight (the KLAnchor callback's weight); its KL to the "
                           "reference is its own kl_weight setting")

    # ------------------------------------------------------------------ the loss
    def weights(self, times: Tensor, solver: SDESolver) -> Tensor:
        """Temporal weights ``(T,)`` of the grid (:func:`temporal_weights`)."""
        return temporal_weights(self.temporal_weighting, times, solver)

    def eligible_steps(self, batch: RolloutBatch) -> Tensor:
        """``(B, T)`` boolean: finite stored log-prob and ``t_min <= t_j <= t_max``."""
        lp = batch.log_probs
        t = batch.times.reshape(-1)[:-1].to(lp.device)
        in_window = (t >= self.t_min) & (t <= self.t_max)
        return torch.isfinite(lp).T & in_window.unsqueeze(0)

    def loss(self, policies: Policies, batch: RolloutBatch, generator: torch.Generator,
             kl_weight: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        """PPO-clip loss on the stored transitions plus ``self.kl_weight`` times the transition KL.

        The KL anchor's ``kl_weight`` argument is not used: Flow-GRPO's KL is its own ``kl_weight`` setting.
        """
        if batch.trajectory is None or batch.log_probs is None or batch.times is None:
            raise ValueError("GRPOObjective needs rollouts with trajectory, times and log_probs (an SDE rollout)")
        solver = policies.solver
        steps = select_train_steps(self.eligible_steps(batch), self.train_timesteps, generator=generator)
        tb = gather_transitions(batch.trajectory, batch.times, steps)
        cond = index_condition(batch.cond, tb.rows)
        new_lp, mean, std = transition_log_probs(solver, policies.velocity, tb, cond)
        old_lp = batch.log_probs[tb.steps, tb.rows].to(new_lp)
        dim = tb.x.reshape(tb.x.shape[0], -1).shape[1]
        scale = 1.0 if self.log_prob_reduction == "sum" else 1.0 / dim
        ratio = likelihood_ratio(new_lp, old_lp, scale)
        adv = batch.advantages.to(new_lp)[tb.rows]
        w = self.weights(batch.times, solver).to(new_lp)[tb.steps]
        per_row = ppo_clip_loss(ratio, adv, self.clip_range)
        policy = (w * per_row).mean()
        loss = policy
        with torch.no_grad():
            log_ratio = scale * (new_lp - old_lp)
            clipped = ((ratio > 1 + self.clip_range) & (adv > 0)) | ((ratio < 1 - self.clip_range) & (adv < 0))
            logs: dict[str, Tensor] = {
                "policy_loss": policy.detach(),
                "ratio_mean": ratio.mean(),
                "ratio_max_dev": (ratio - 1).abs().max(),
                "clip_fraction": clipped.float().mean(),
                "approx_kl": 0.5 * log_ratio.pow(2).mean(),
            }
        if self.kl_weight > 0:
            with torch.no_grad():
                mean_ref, _ = solver.transition(policies.reference_velocity, tb.x, tb.t, tb.t_next, cond)
            kl = gaussian_mean_kl(mean, mean_ref, std, self.log_prob_reduction).mean()
            loss = loss + self.kl_weight * kl
            logs["kl"] = kl.detach()
        return loss, logs

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(clip_range={self.clip_range}, kl_weight={self.kl_weight}, "
                f"noise_level={self.noise_level}, train_timesteps={self.train_timesteps!r}, "
                f"temporal_weighting={self.temporal_weighting!r}, branch_width={self.branch_width}, "
                f"log_prob_reduction={self.log_prob_reduction!r})")
