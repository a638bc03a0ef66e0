"""The policy contract every module and callback relies on, and a mixin that implements it.

A *policy* is a velocity field ``v(x, t, cond)`` in our convention (``x_t = (1 - t) x0 + t x1``,
noise at ``t = 0``, data at ``t = 1``). Online reward fine-tuning needs three of them at once:

* the **current** policy ``v_theta`` (trained, gradients flow),
* the **old** policy ``v_old`` that samples a round's rollouts and anchors DiffusionNFT's implicit
  parameterisation (refreshed by an exponential moving average once per round; "DiffusionNFT:
  Online Diffusion Reinforcement with Forward Process", arXiv:2509.16117),
* the **reference** ``v_ref``, the frozen model fine-tuning started from: the KL anchor's target and
  the base drift of Adjoint Matching ("Adjoint Matching: Fine-tuning Flow and Diffusion Generative
  Models with Memoryless Stochastic Optimal Control", arXiv:2409.08861).

Shapes: ``x`` is ``(B, *S)``, ``t`` is ``(B,)``, ``cond`` is a condition (``None``, a ``(B, ...)``
tensor or a :class:`~lightning_nft.conditions.Conditions`); each velocity returns ``(B, *S)``.

Three layers:

* :class:`Policy`: the three velocities and sampling (what objectives and samplers need);
  :class:`FrozenPolicy` serves a fixed field (e.g. ``lightning_nft.analytic``) in all three roles.
* :class:`OnlineFineTuning`: *every* member a callback of ``lightning_nft.callbacks`` uses, with its
  meaning. Each callback calls :func:`check_contract` in ``setup``, which raises one
  :class:`ContractError` naming all missing members.
* :class:`OnlineFineTuningMixin`: an implementation of that contract for any ``LightningModule``
  holding a velocity network (old/reference copies, rollout collection, minibatches, the training
  step of an :class:`~lightning_nft.objectives.base.Objective`).
  :class:`lightning_nft.module.RewardFineTuningModule` is built on it;
  ``tutorials/02_callbacks_in_your_trainer.py`` adds it to a user's own module.
"""

from __future__ import annotations

import copy
import hashlib
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Protocol, Sequence, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from typing_extensions import override

from lightning_nft.compute import ComputeLedger
from lightning_nft.conditions import condition_to, metadata_of, network_input, repeat_condition
from lightning_nft.guidance import guided_velocity
from lightning_nft.lora import OLD_ADAPTER, active_adapter, adapter_parameter_pairs, adapters_disabled, has_lora
from lightning_nft.rewards.validation import (
    NONFINITE_POLICIES,
    check_finite_loss,
    check_finite_samples,
    nonfinite_reward_mask,
    reward_vector,
)
from lightning_nft.rewards.async_scoring import rollout_and_score
from lightning_nft.rollouts import RolloutBatch
from lightning_nft.samplers import EulerSolver, SampleOutput, Solver, time_grid
from lightning_nft.sharding import reshard, shard_policies
from lightning_nft.startup_checks import (
    check_declared_sample_shapes,
    check_forward_and_reward,
    check_group_size,
)

VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]
PolicyRole = Literal["current", "old", "reference"]
GuidancePlace = Literal["rollouts", "evaluation", "both", "neither"]
GUIDANCE_PLACES = ("rollouts", "evaluation", "both", "neither")
ConditionSampler = Callable[[int, torch.Generator], Any]

if TYPE_CHECKING:  # pragma: no cover
    from lightning_nft.advantages import Normalizer
    from lightning_nft.objectives.base import Objective, Policies


@runtime_checkable
class Policy(Protocol):
    """Velocity of the current, old and reference policy, and sampling from any of them."""

    def velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Current (trained) policy ``v_theta(x, t, cond)``; differentiable."""

    def old_velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Old (sampling) policy ``v_old(x, t, cond)``; no parameter gradient."""

    def reference_velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Frozen initial model ``v_ref(x, t, cond)``; no parameter gradient."""

    def sample(
        self,
        x0: Tensor,
        cond: Any = None,
        *,
        policy: PolicyRole = "current",
        solver: Optional[Solver] = None,
        times: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        return_trajectory: bool = False,
        return_log_probs: bool = False,
    ) -> SampleOutput:
        """Integrate ``policy`` from noise ``x0`` (``(B, *S)``, time 0) to data (time 1)."""


@runtime_checkable
class OnlineFineTuning(Policy, Protocol):
    """Everything the callbacks of ``lightning_nft.callbacks`` read or call on the module.

    On top of :class:`Policy` (``velocity``, ``old_velocity``, ``reference_velocity``, ``sample``):

    Attributes:
        sample_shape: shape ``S`` of one sample, e.g. ``(2,)`` or ``(1, 8, 8)``.
        rollouts: the current round's :class:`~lightning_nft.rollouts.RolloutBatch` (``None``
            before the first round).
        rollout_version: incremented by every collection (metrics read each batch once).
        rollouts_per_round: fresh rollout collections per round (``1``; ``M`` for multi-step
            DiffusionNFT, each preceded by a hard refresh ``old <- current``).
        steps_per_round: gradient steps per round (a Lightning epoch).
        kl_weight: strength ``w`` of the KL anchor ``w E||v_theta - v_ref||^2`` added to the loss
            (set by ``KLAnchor``; ``0`` without it).
    """

    sample_shape: tuple[int, ...]
    rollouts: Optional[RolloutBatch]
    rollout_version: int
    rollouts_per_round: int
    steps_per_round: int
    kl_weight: float

    def sample_conditions(self, n: int, generator: torch.Generator) -> Any:
        """``n`` conditions (one per row; ``None`` for unconditional models)."""

    def compute_rewards(self, x1: Tensor, cond: Any) -> Tensor:
        """Raw rewards ``(N,)`` of samples ``x1 (N, *S)``."""

    def collect_rollouts(self, round_index: int, substep: int = 0) -> RolloutBatch:
        """Sample, score and normalise one round's rollouts on this rank and keep them in ``rollouts``."""

    def update_old_policy(self, decay: float) -> None:
        """``old <- decay old + (1 - decay) current`` (``decay = 0``: hard copy)."""

    def snapshot_reference(self) -> None:
        """``reference <- current``."""


CONTRACT_MEMBERS: tuple[str, ...] = (
    "velocity", "old_velocity", "reference_velocity", "sample", "sample_shape", "sample_conditions",
    "compute_rewards", "collect_rollouts", "rollouts", "rollout_version", "rollouts_per_round",
    "steps_per_round", "kl_weight", "update_old_policy", "snapshot_reference",
)


class ContractError(TypeError):
    """A module lacks members of :class:`OnlineFineTuning` that a callback uses."""


def missing_members(module: Any, members: Sequence[str] = CONTRACT_MEMBERS) -> list[str]:
    """The names in ``members`` that ``module`` does not have (attributes set to ``None`` count as present)."""
    return [name for name in members if not hasattr(module, name)]


def check_contract(module: Any, user: Any, members: Optional[Sequence[str]] = None) -> None:
    """Raise one :class:`ContractError` naming every member of ``members`` that ``module`` lacks.

    ``user`` is the callback (or any object) that needs them; ``members`` defaults to its
    ``contract_members`` class attribute, else the whole :class:`OnlineFineTuning` contract.
    """
    if members is None:
        members = getattr(user, "contract_members", CONTRACT_MEMBERS)
    missing = missing_members(module, members)
    if missing:
        who = user if isinstance(user, str) else type(user).__name__
        raise ContractError(
            f"{who} needs {type(module).__name__} to implement the online fine-tuning contract "
            f"(lightning_nft.policy.OnlineFineTuning); missing: {', '.join(missing)}. Add "
            "lightning_nft.policy.OnlineFineTuningMixin to the module's bases and call "
            "configure_online_fine_tuning(...) in its __init__ (tutorials/02_callbacks_in_your_trainer.py)."
        )


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of the integers ``keys`` (distinct tuples: independent streams)."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") % (2**63 - 1))


def round_generator(seed: int, rank: int, round_index: int, substep: int = 0) -> torch.Generator:
    """Rollout noise and conditions of ``(seed, rank, round, substep)``: ranks differ, resumed runs repeat."""
    mixed = (seed * 1_000_003 + rank * 10_007 + round_index * 101 + substep) % (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(mixed)


def loss_generator(seed: int, rank: int, round_index: int, step: int) -> torch.Generator:
    """The loss noise (``x0``, ``t``...) of gradient step ``step`` of round ``round_index`` on ``rank``."""
    return seeded_generator(0x1055, seed, rank, round_index, step)


class OnlineFineTuningMixin(pl.LightningModule):
    """Implements :class:`OnlineFineTuning` for a ``LightningModule`` that holds a velocity network.

    Put it first among the bases and call :meth:`configure_online_fine_tuning` at the end of
    ``__init__``; override :meth:`network_velocity` when the network is not called as
    ``network(x, t, cond)`` in our time convention. One online round is one Lightning epoch:

    1. ``OnlineRollout`` calls :meth:`collect_rollouts`: ``P`` conditions and ``N = P K`` noises from
       :func:`round_generator`, samples of the objective's sampling policy (:meth:`rollout`), rewards
       (:meth:`compute_rewards`), advantages normalised over every rank (``normalizer``);
    2. ``steps_per_round`` gradient steps of the objective on minibatches of those rollouts
       (:meth:`training_step`; the loss noise comes from :func:`loss_generator`, never from the global
       torch generator);
    3. ``EMAOldPolicy`` refreshes the old policy, ``old <- d old + (1 - d) current``.

    Policies: full fine-tuning keeps frozen copies ``old_backbone`` and ``reference_backbone`` (submodules,
    so strategies move them and checkpoints carry them); a network with peft adapters ``default`` and
    ``old`` uses the adapters instead (reference = adapters disabled, old = adapter ``old``). When ``fit``
    starts (not when resuming from a checkpoint) both are reset to the network's weights at that moment,
    so weights loaded after construction are the ones the old policy samples and the anchor keeps.

    Guidance and decoding (``configure_online_fine_tuning``'s ``guidance_scale``, ``guidance``, ``decoder``):
    classifier-free guidance ``v_u + w (v_c - v_u)`` toward the condition, away from
    ``condition_sampler.negative(n)`` (the negative prompt; J. Ho and T. Salimans, arXiv:2207.12598),
    in ``"rollouts"``, ``"evaluation"`` (validate/test, grids, metrics, predict), ``"both"`` or
    ``"neither"``. The training target stays the objective's own: DiffusionNFT trains the conditional,
    CFG-free field on the guided samples (its loss calls the plain velocities); Flow-GRPO's ratios and
    KL use the guided transitions, those actually sampled (:meth:`policies`); Adjoint Matching refuses
    guided rollouts (its regression target assumes the model's own memoryless SDE). ``decoder`` maps
    latents to pixels before rewards (:meth:`decoded_reward`), image grids, sample metrics and evaluation.
    Compute: every call of :meth:`velocity`, :meth:`old_velocity` and :meth:`reference_velocity` is counted in
    ``compute_ledger`` (:class:`~lightning_nft.compute.ComputeLedger`; phase ``rollout`` inside
    :meth:`collect_rollouts`, ``train`` inside :meth:`training_step`), and the cumulative ``compute/*`` figures
    are logged once per round (:meth:`log_compute`).

    Override points: :meth:`network_velocity`, :meth:`sample_conditions`, :meth:`rollout`,
    :meth:`compute_rewards`, :meth:`compute_loss`.
    """

    def configure_online_fine_tuning(
        self,
        network: nn.Module,
        reward: Callable[..., Tensor],
        objective: "Objective",
        sample_shape: Sequence[int],
        *,
        condition_sampler: Optional[ConditionSampler] = None,
        groups_per_round: int = 8,
        group_size: int = 16,
        steps_per_round: int = 1,
        minibatch_size: Optional[int] = None,
        solver: Optional[Solver] = None,
        n_sample_steps: int = 20,
        time_shift: float = 1.0,
        normalizer: Optional["Normalizer"] = None,
        rollout_seed: int = 0,
        step_metrics: bool = False,
        nonfinite_rewards: str = "raise",
        fsdp_blocks: Sequence[str] = (),
        score_chunks: int = 1,
        decoder: Optional[nn.Module] = None,
        guidance_scale: float = 1.0,
        guidance: GuidancePlace = "neither",
    ) -> None:
        """Set up the policies and the round's settings (arguments as in
        :class:`~lightning_nft.module.RewardFineTuningModule`). ``network`` may already be a submodule
        of ``self`` under any name; otherwise it is registered as ``backbone``."""
        from lightning_nft.advantages import RewardNormalizer

        if groups_per_round < 1 or group_size < 1 or steps_per_round < 1:
            raise ValueError(
                f"groups_per_round, group_size and steps_per_round must be positive; got {groups_per_round}, "
                f"{group_size}, {steps_per_round}")
        per_round = int(getattr(objective, "rollouts_per_round", 1))
        if steps_per_round < per_round:
            raise ValueError(
                f"steps_per_round={steps_per_round} is smaller than the objective's rollouts_per_round={per_round}: "
                "every rollout collection of a round needs at least one gradient step")
        name = next((n for n, child in self.named_children() if child is network), None)
        if name is None:
            self.backbone = network
            name = "backbone"
        self._network_name = name
        self.uses_lora = has_lora(network)
        if self.uses_lora:
            if not any(f".{OLD_ADAPTER}." in n for n, _ in network.named_parameters()):
                raise ValueError("a LoRA backbone needs a second adapter named 'old' (use lora=LoraSettings(...))")
            self.old_backbone = None
            self.reference_backbone = None
        else:
            self.old_backbone = _frozen_copy(network) if objective.needs_old_policy else None
            self.reference_backbone = _frozen_copy(network)
        self.reward = reward.requires_grad_(False) if isinstance(reward, nn.Module) else reward
        self.objective = objective
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.condition_sampler = condition_sampler
        self.groups_per_round, self.group_size = int(groups_per_round), int(group_size)
        self.steps_per_round, self.minibatch_size = int(steps_per_round), minibatch_size
        self.solver = solver
        self.n_sample_steps, self.time_shift = int(n_sample_steps), float(time_shift)
        self.normalizer = normalizer if normalizer is not None else RewardNormalizer()
        check_group_size(self.group_size, self.normalizer)
        if nonfinite_rewards not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_rewards must be one of {NONFINITE_POLICIES}; got {nonfinite_rewards!r}")
        self.nonfinite_rewards = nonfinite_rewards
        self.fsdp_blocks = tuple(fsdp_blocks)
        self._last_finite_loss: Optional[float] = None
        self.rollout_seed = int(rollout_seed)
        self.step_metrics = bool(step_metrics)
        if int(score_chunks) < 1:
            raise ValueError(f"score_chunks must be positive, got {score_chunks}")
        self.score_chunks = int(score_chunks)
        if guidance not in GUIDANCE_PLACES:
            raise ValueError(f"guidance must be one of {GUIDANCE_PLACES}, got {guidance!r}")
        self.decoder = decoder
        self.guidance_scale, self.guidance = float(guidance_scale), guidance
        self.kl_weight = 0.0
        self.rollouts: Optional[RolloutBatch] = None
        self.train_data: Any = None  # objective.prepare_round(rollouts): what minibatches are drawn from
        self.rollout_version = 0
        self._minibatch_order: Optional[Tensor] = None
        self._minibatch_cursor = 0
        self._round_sums: dict[str, Tensor] = {}
        self._round_steps = 0
        self.compute_ledger = ComputeLedger()
        self._images_at_round_start = 0

    # ------------------------------------------------------------------ policies
    @property
    def policy_network(self) -> nn.Module:
        """The trained velocity network."""
        return getattr(self, self._network_name)

    def network_velocity(self, network: nn.Module, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """``network``'s velocity in our convention; override for another calling convention."""
        return network(x, t, network_input(cond))

    def velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Current policy ``v_theta`` (differentiable in parameters and ``x``); counted in ``compute_ledger``."""
        return self.compute_ledger.record_output("current", self.network_velocity(self.policy_network, x, t, cond))

    def old_velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Old policy ``v_old``: no parameter gradients (differentiable in ``x``); counted in ``compute_ledger``."""
        if self.uses_lora:
            with active_adapter(self.policy_network, OLD_ADAPTER):
                out = self.network_velocity(self.policy_network, x, t, cond)
        elif self.old_backbone is None:
            raise RuntimeError(f"{type(self.objective).__name__} keeps no old policy (needs_old_policy=False)")
        else:
            out = self.network_velocity(self.old_backbone, x, t, cond)
        return self.compute_ledger.record_output("old", out)

    def reference_velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Frozen initial model ``v_ref``: no parameter gradients (differentiable in ``x``); counted in ``compute_ledger``."""
        if self.uses_lora:
            with adapters_disabled(self.policy_network):
                out = self.network_velocity(self.policy_network, x, t, cond)
        else:
            out = self.network_velocity(self.reference_backbone, x, t, cond)
        return self.compute_ledger.record_output("reference", out)

    def policy_velocity(self, policy: PolicyRole) -> VelocityFn:
        """The velocity of ``policy`` (``"current"``, ``"old"`` or ``"reference"``)."""
        return {"current": self.velocity, "old": self.old_velocity, "reference": self.reference_velocity}[policy]

    # ------------------------------------------------------------------ guidance and decoding
    def guidance_scale_for(self, place: Literal["rollouts", "evaluation"]) -> float:
        """The classifier-free guidance scale used for ``place`` (``1``: no guidance there)."""
        return self.guidance_scale if self.guidance in (place, "both") else 1.0

    def unconditional(self, n: int) -> Any:
        """``n`` rows of the unconditional (negative-prompt) condition, from ``condition_sampler.negative(n)``."""
        negative = getattr(self.condition_sampler, "negative", None)
        if negative is None:
            raise ValueError(
                f"guidance_scale={self.guidance_scale} needs unconditional rows, but the condition sampler "
                f"{type(self.condition_sampler).__name__} has no negative(n) method (PromptConditions has one)")
        return condition_to(negative(n), self.device)

    def guided(self, velocity: VelocityFn, scale: float) -> VelocityFn:
        """``velocity`` with classifier-free guidance ``v_u + scale (v_c - v_u)`` (``scale = 1``: ``velocity`` itself).

        The unconditional rows are built for each call's batch size, so the guided field works for
        any batch (rollouts, minibatches, the tiled batches of Adjoint Matching).
        """
        if scale == 1.0:
            return velocity
        return lambda x, t, cond=None: guided_velocity(velocity, x, t, cond, self.unconditional(x.shape[0]), scale)

    def decode(self, samples: Tensor) -> Tensor:
        """Samples (latents) -> pixels in ``[-1, 1]`` with ``decoder`` (identity without one)."""
        return samples if self.decoder is None else self.decoder(samples)

    def sample_times(self) -> Tensor:
        """The rollout time grid ``(n_sample_steps + 1,)``."""
        return time_grid(self.n_sample_steps, time_shift=self.time_shift, device=self.device)

    def rollout_solver(self) -> Solver:
        """The module's solver, else the objective's default, else Euler."""
        return self.solver or self.objective.default_solver() or EulerSolver()

    @torch.no_grad()
    def sample(self, x0: Tensor, cond: Any = None, *, policy: PolicyRole = "current", solver: Optional[Solver] = None,
               times: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
               return_trajectory: bool = False, return_log_probs: bool = False,
               guidance_scale: Optional[float] = None) -> SampleOutput:
        """Integrate ``policy`` from noise ``x0 (B, *S)`` at ``t = 0`` to samples at ``t = 1``.

        ``guidance_scale``: classifier-free guidance of the sampled field (``None``: the evaluation
        setting, :meth:`guidance_scale_for` ``("evaluation")``). Conditions are moved to ``x0``'s device.
        """
        solver = solver or self.solver or EulerSolver()
        times = self.sample_times() if times is None else times
        scale = self.guidance_scale_for("evaluation") if guidance_scale is None else float(guidance_scale)
        velocity = self.guided(self.policy_velocity(policy), scale)
        return solver.sample(velocity, x0, times.to(x0), condition_to(cond, x0.device), generator=generator,
                             return_trajectory=return_trajectory, return_log_probs=return_log_probs)

    def policies(self) -> "Policies":
        """What an objective may call: the three velocities, the rollout solver and the (decoded) reward.

        With guided rollouts an objective that needs transition log-probabilities (Flow-GRPO) gets the
        *guided* velocities, so the ratio compares the guided transition that was sampled with the
        guided transition of the current policy; the other objectives get the plain (CFG-free)
        conditional velocities: DiffusionNFT trains the conditional field on guided samples.
        """
        from lightning_nft.objectives.base import Policies

        has_old = self.uses_lora or self.old_backbone is not None
        scale = self.guidance_scale_for("rollouts") if self.objective.needs_log_probs else 1.0
        old = self.guided(self.old_velocity, scale) if has_old else None
        return Policies(velocity=self.guided(self.velocity, scale), old_velocity=old,
                        reference_velocity=self.guided(self.reference_velocity, scale), solver=self.rollout_solver(),
                        reward=self.decoded_reward)

    def decoded_reward(self, samples: Tensor, cond: Any = None) -> Tensor:
        """``reward(decode(samples), cond)`` (differentiable through the decoder)."""
        return self.reward(self.decode(samples), cond)

    # ------------------------------------------------------------------ old policy and reference
    def old_policy_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(old params, current params)`` matched one to one (EMA of the old policy)."""
        if self.uses_lora:
            return adapter_parameter_pairs(self.policy_network)
        if self.old_backbone is None:
            return [], []
        return list(self.old_backbone.parameters()), list(self.policy_network.parameters())

    def reference_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(reference params, current params)`` (empty with LoRA: the reference is adapters-off)."""
        if self.uses_lora:
            return [], []
        return list(self.reference_backbone.parameters()), list(self.policy_network.parameters())

    @torch.no_grad()
    def update_old_policy(self, decay: float) -> None:
        """``old <- decay * old + (1 - decay) * current`` with ``torch._foreach_lerp_`` (works on shards)."""
        reshard(self)  # under FSDP2: every parameter back on its shard (lerp shard by shard, no gathering)
        old, cur = self.old_policy_pairs()
        if old:
            torch._foreach_lerp_(old, cur, 1.0 - float(decay))

    @torch.no_grad()
    def snapshot_reference(self) -> None:
        """``reference <- current`` (full fine-tuning; a no-op with LoRA)."""
        reshard(self)
        ref, cur = self.reference_pairs()
        if ref:  # copy_ per tensor: DTensor shards (FSDP2) have no _foreach_copy_ rule
            for r, c in zip(ref, cur):
                r.copy_(c)

    # ------------------------------------------------------------------ rollouts
    @property
    def rollouts_per_round(self) -> int:
        """Fresh rollout collections per round (the objective's; multi-step DiffusionNFT asks for several)."""
        return int(getattr(self.objective, "rollouts_per_round", 1))

    def sample_conditions(self, n: int, generator: torch.Generator) -> Any:
        """``n`` conditions (``None`` for unconditional models)."""
        return None if self.condition_sampler is None else self.condition_sampler(n, generator)

    def rollout(self, x0: Tensor, cond: Any, generator: torch.Generator) -> SampleOutput:
        """Sample the round's rollouts from the objective's sampling policy (guided when ``guidance``
        includes rollouts; GRPO's log-probabilities are then those of the guided transitions)."""
        return self.sample(x0, cond, policy=self.objective.sampling_policy, solver=self.rollout_solver(),
                           generator=generator, return_trajectory=self.objective.needs_trajectory,
                           return_log_probs=self.objective.needs_log_probs,
                           guidance_scale=self.guidance_scale_for("rollouts"))

    @torch.no_grad()
    def compute_rewards(self, x1: Tensor, cond: Any) -> Tensor:
        """Raw rewards ``(N,)`` of the decoded samples ``x1 (N, *S)``; may hold NaN/inf (see :meth:`collect_rollouts`).

        Non-finite *samples* raise :class:`~lightning_nft.rewards.validation.PolicyDivergedError` before the
        reward is called (the policy diverged, not the reward); the reward's output must be one value per
        sample (``rewards.validation.reward_vector``: numpy and lists converted, other shapes refused).
        """
        round_index = self.current_epoch if self._trainer is not None else None
        step = self.global_step if self._trainer is not None else None
        check_finite_samples(x1, policy=f"the {getattr(self.objective, 'sampling_policy', 'sampling')} policy",
                             round_index=round_index, step=step, last_finite_loss=self._last_finite_loss)
        metadata_of(cond, x1.shape[0])  # conditions and samples must have the same rows
        rewards = reward_vector(self.decoded_reward(x1, cond), x1.shape[0], source=type(self.reward).__name__)
        return rewards.detach().float().to(x1.device)

    @torch.no_grad()
    def collect_rollouts(self, round_index: int, substep: int = 0) -> RolloutBatch:
        """Sample, score and normalise this rank's rollouts of one round and keep them (:meth:`set_rollouts`).

        Conditions and noise come from :func:`round_generator` of ``(rollout_seed, rank, round,
        substep)``; rewards and group ids are gathered from every rank before ``normalizer`` (group means
        per condition, a global std), and this rank keeps its slice. Group ids are unique across ranks.
        With ``score_chunks = C > 1`` the round is sampled in ``C`` chunks of whole groups and chunk ``k``
        is scored while chunk ``k + 1`` is sampled (:func:`~lightning_nft.rewards.async_scoring.rollout_and_score`).
        """
        P, K = self.groups_per_round, self.group_size
        rank = self.global_rank
        world = self.trainer.world_size if self._trainer is not None else 1
        g = round_generator(self.rollout_seed, rank, round_index, substep)
        cond = condition_to(repeat_condition(self.sample_conditions(P, g), K), self.device)
        x0 = torch.randn((P * K, *self.sample_shape), generator=g).to(self.device)
        with self.compute_ledger.phase("rollout"):
            # score_chunks > 1: chunk k is scored (a thread) while chunk k + 1 is sampled
            out, rewards = rollout_and_score(self.rollout, self.compute_rewards, x0, cond, g, K,
                                             getattr(self, "score_chunks", 1))
        self.compute_ledger.add_images(out.samples.shape[0])
        group = (rank * P + torch.arange(P, device=rewards.device)).repeat_interleave(K)
        # a per-prompt normaliser (PromptStatTracker) groups by prompt id, across rounds and ranks
        by = self._prompt_ids(cond).to(rewards.device) if getattr(self.normalizer, "per_prompt", False) else group
        if world > 1:
            all_rewards, all_by, all_group = (self.all_gather(v).reshape(-1) for v in (rewards, by, group))
        else:
            all_rewards, all_by, all_group = rewards, by, group
        # the non-finite reward policy sees every rank's rewards and group ids, like the normaliser
        kept = nonfinite_reward_mask(all_rewards, all_group, self.nonfinite_rewards, source=type(self.reward).__name__,
                                     round_index=round_index)
        adv = torch.zeros_like(all_rewards)
        r = torch.full_like(all_rewards, 0.5)
        adv_kept, r_kept = self.normalizer(all_rewards[kept.keep], all_by[kept.keep])
        adv[kept.keep], r[kept.keep] = adv_kept.to(adv), r_kept.to(r)
        mine = slice(rank * P * K, (rank + 1) * P * K) if world > 1 else slice(None)
        batch = RolloutBatch(
            x1=out.samples, rewards=rewards, advantages=adv[mine].to(rewards), r=r[mine].to(rewards), group=group,
            cond=cond, x0=x0, trajectory=out.trajectory, times=out.times, log_probs=out.log_probs,
        )
        if kept.nonfinite:
            keep_mine = kept.keep[mine].nonzero().reshape(-1)
            if keep_mine.numel() == 0:
                raise ValueError(f"{type(self.reward).__name__}: every reward of rank {rank} in round {round_index} is "
                                 f"dropped by nonfinite_rewards={self.nonfinite_rewards!r}; nothing to train on")
            batch = batch.index(keep_mine)
        if self.nonfinite_rewards != "raise" and self._trainer is not None:
            self.log_dict({"reward/nonfinite": float(kept.nonfinite), "reward/dropped_samples": float(kept.dropped_samples),
                           "reward/dropped_groups": float(kept.dropped_groups)}, on_step=False, on_epoch=True)
        self.set_rollouts(batch, generator=g)
        return batch

    def _prompt_ids(self, cond: Any) -> Tensor:
        from lightning_nft.conditions import Conditions

        if not isinstance(cond, Conditions):
            raise TypeError(f"{type(self.normalizer).__name__} groups rewards by prompt: the conditions must be "
                            f"Conditions whose metadata carry 'prompt_id', got {type(cond).__name__}")
        return torch.as_tensor(cond.values("prompt_id", source=type(self.normalizer).__name__), dtype=torch.long)

    def set_rollouts(self, rollouts: RolloutBatch, generator: Optional[torch.Generator] = None) -> None:
        """Keep ``rollouts`` for the coming gradient steps, in an order drawn from ``generator``."""
        self.rollouts = rollouts
        self.rollout_version += 1
        with torch.enable_grad():  # e.g. Adjoint Matching's adjoints, once per round (no parameter update)
            self.train_data = self.objective.prepare_round(self.policies(), rollouts, generator)
        self._minibatch_order = torch.randperm(len(self.train_data), generator=generator)
        self._minibatch_cursor = 0

    def next_minibatch(self) -> Any:
        """The next ``minibatch_size`` rollouts (default ``N / steps_per_round``: a partition of the round), or
        rows of what the objective's ``prepare_round`` made of them (Adjoint Matching: regression points)."""
        if self.train_data is None:
            raise RuntimeError(
                "no rollouts for this round: the trainer needs the OnlineRollout callback "
                "(added by default unless default_callbacks=False)"
            )
        n = len(self.train_data)
        size = min(self.minibatch_size or max(1, n // self.steps_per_round), n)
        start = self._minibatch_cursor % n
        idx = self._minibatch_order[start:start + size]
        if idx.numel() < size:  # wrap around
            idx = torch.cat([idx, self._minibatch_order[: size - idx.numel()]])
        self._minibatch_cursor = start + size
        return self.train_data.index(idx)

    def compute_loss(self, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of a minibatch (of rollouts, or of what the objective's ``prepare_round`` made of them): the
        objective's, on :meth:`policies` and ``kl_weight``."""
        return self.objective.loss(self.policies(), batch, generator, kl_weight=float(self.kl_weight))

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        self.objective.setup(reward=self.reward, solver=self.rollout_solver(), group_size=self.group_size,
                             kl_weight=float(self.kl_weight))
        if self.guidance_scale_for("rollouts") != 1.0 and self.objective.sampling_policy == "current":
            raise ValueError(
                f"{type(self.objective).__name__} samples the fine-tuned model's own memoryless SDE (Adjoint "
                "Matching's regression target assumes it); guided rollouts would sample another process. Use "
                "guidance='evaluation' or 'neither' with this objective.")
        if self.guidance_scale != 1.0 and self.guidance != "neither":
            self.unconditional(1)  # fail at set-up when the condition sampler has no negative rows
        decay = getattr(self.objective, "default_ema_decay", None)
        if decay == 0.0:
            from lightning_nft.callbacks import EMAOldPolicy

            for cb in self.trainer.callbacks:
                if isinstance(cb, EMAOldPolicy) and (cb.schedule != "constant" or cb.decay != 0.0):
                    rank_zero_warn(
                        f"{type(self.objective).__name__}: the old (sampling) policy lags the current policy; it expects a hard copy of "
                        "the current one at every round (EMAOldPolicy(decay=0.0)); with a lagging EMA the "
                        "likelihood ratio is not 1 on the first inner step and the clip anchors to the lagged policy.")

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.check_settings()
        if self.trainer.ckpt_path is None:  # resuming: the checkpoint restored both
            self.update_old_policy(0.0)
            self.snapshot_reference()

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        # a pretrained network may arrive in eval mode; train it in train mode (frozen copies stay in eval)
        self.policy_network.train()

    @override
    def train_dataloader(self) -> DataLoader:
        """One item per gradient step of a round: a Lightning epoch is one online round.

        The items are only step counters (the data are the rollouts). Every rank runs all
        ``steps_per_round`` steps on its own rollouts, so the loader carries a one-replica
        ``DistributedSampler``: Lightning then injects no sampler that would split the steps among ranks.
        """
        steps = torch.arange(self.steps_per_round)
        return DataLoader(steps, batch_size=1, sampler=DistributedSampler(steps, num_replicas=1, rank=0, shuffle=False))

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        g = loss_generator(self.rollout_seed, self.global_rank, self.current_epoch, batch_idx)
        with self.compute_ledger.phase("train"):
            loss, logs = self.compute_loss(self.next_minibatch(), g)
        self._check_loss(loss)
        if self.step_metrics:
            self.log("train/loss", loss, prog_bar=True)
            for k, v in logs.items():
                self.log(f"train/{k}", v)
        else:  # round means, logged in on_train_epoch_end
            for k, v in (("loss", loss), *logs.items()):
                v = torch.as_tensor(v).detach().float()
                self._round_sums[k] = self._round_sums[k] + v if k in self._round_sums else v
            self._round_steps += 1
        return loss

    def _check_loss(self, loss: Tensor) -> None:
        """Stop on a non-finite loss before the optimiser step; save the last good state first (one process)."""
        try:
            check_finite_loss(loss, round_index=self.current_epoch, step=self.global_step,
                              last_finite_loss=self._last_finite_loss)
        except Exception as err:
            if self._trainer is not None and self.trainer.world_size == 1:
                import os

                path = os.path.join(str(self.trainer.default_root_dir), "checkpoints",
                                    f"last-good-round{self.current_epoch:04d}-step{self.global_step}.ckpt")
                self.trainer.save_checkpoint(path)  # the weights before this step: still finite
                raise type(err)(f"{err}. The last good state is saved in {path}") from None
            raise
        self._last_finite_loss = float(loss.detach())

    # ------------------------------------------------------------------ start-up checks and sharding
    def check_settings(self) -> None:
        """Before round 0: recorded sample shapes, one velocity evaluation and one reward call on a tiny batch."""
        network = self.policy_network
        # the reward sees samples as they are only when compute_rewards does not decode them first
        plain_rewards = type(self).compute_rewards is OnlineFineTuningMixin.compute_rewards
        parts = {"backbone": network, **({"reward": self.reward} if plain_rewards else {})}
        check_declared_sample_shapes(self.sample_shape, **parts)
        g = torch.Generator().manual_seed(0)
        cond = repeat_condition(self.sample_conditions(1, g), 2)
        # rewards that opt out (``check_at_startup = False``, e.g. a remote scorer) get a forward pass only
        reward = self.compute_rewards if getattr(self.reward, "check_at_startup", True) else _one_per_sample
        check_forward_and_reward(self.velocity, reward, self.sample_shape, cond,
                                 backbone_name=type(network).__name__, reward_name=type(self.reward).__name__,
                                 device=self.device)

    @override
    def configure_model(self) -> None:
        """Under FSDP2 (``ModelParallelStrategy``): shard the trained, old and reference networks alike
        (``lightning_nft.sharding``); a no-op for every other strategy."""
        super().configure_model()
        mesh = self.device_mesh
        if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
            shard_policies((self.policy_network, self.old_backbone, self.reference_backbone), mesh["data_parallel"],
                           self.fsdp_blocks)

    @override
    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        for k, total in self._round_sums.items():
            self.log(f"train/{k}", total / self._round_steps, prog_bar=k == "loss", sync_dist=True)
        self._round_sums, self._round_steps = {}, 0
        self.log_compute()

    def log_compute(self) -> None:
        """Log the cumulative ``compute/*`` figures of :class:`~lightning_nft.compute.ComputeLedger`, summed
        over ranks, and ``compute/images_per_round`` (sampled rollouts since the last call)."""
        ledger = self.compute_ledger
        figures = ledger.summary()
        figures["images_per_round"] = float(ledger.images - self._images_at_round_start)
        self._images_at_round_start = ledger.images
        for k, v in figures.items():
            self.log(f"compute/{k}", v, reduce_fx="sum", sync_dist=True)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints carry the rollout counter and the compute ledger (old policy and reference are submodules: in the state dict)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["lightning_nft"] = {"rollout_version": self.rollout_version,
                                       "compute_ledger": self.compute_ledger.state_dict()}
        if hasattr(self.normalizer, "state_dict"):  # e.g. the per-prompt history of PromptStatTracker
            checkpoint["lightning_nft"]["normalizer"] = self.normalizer.state_dict()
        objective_state = self.objective.state_dict() if hasattr(self.objective, "state_dict") else {}
        if objective_state:  # e.g. Adjoint Matching's replayed targets
            checkpoint["lightning_nft"]["objective"] = objective_state

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("lightning_nft", {})
        self.rollout_version = int(state.get("rollout_version", 0))
        self.compute_ledger.load_state_dict(state.get("compute_ledger", {}))
        self._images_at_round_start = self.compute_ledger.images
        if state.get("normalizer") is not None and hasattr(self.normalizer, "load_state_dict"):
            self.normalizer.load_state_dict(state["normalizer"])
        if state.get("objective") is not None and hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(state["objective"])


def _one_per_sample(samples: Tensor, cond: Any = None) -> Tensor:
    """A stand-in reward for the start-up check of rewards that are not called there."""
    return torch.zeros(samples.shape[0])


def _frozen_copy(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin.eval()


def sample_velocity(
    velocity: VelocityFn,
    x0: Tensor,
    cond: Any = None,
    *,
    solver: Optional[Solver] = None,
    times: Optional[Tensor] = None,
    n_steps: int = 50,
    generator: Optional[torch.Generator] = None,
    return_trajectory: bool = False,
    return_log_probs: bool = False,
) -> SampleOutput:
    """Sample a velocity field with ``solver`` (Euler by default) on ``times`` (uniform, ``n_steps``)."""
    solver = solver if solver is not None else EulerSolver()
    if times is None:
        times = time_grid(n_steps, device=x0.device, dtype=x0.dtype)
    return solver.sample(
        velocity,
        x0,
        times.to(device=x0.device, dtype=x0.dtype),
        cond,
        generator=generator,
        return_trajectory=return_trajectory,
        return_log_probs=return_log_probs,
    )


class FrozenPolicy(nn.Module):
    """A fixed velocity field seen through the :class:`Policy` interface (all three roles equal)."""

    def __init__(self, field: nn.Module, solver: Optional[Solver] = None, n_steps: int = 50) -> None:
        super().__init__()
        self.field = field.requires_grad_(False)
        self.solver = solver
        self.n_steps = n_steps

    def velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.field(x, t, cond)

    old_velocity = velocity
    reference_velocity = velocity

    def sample(self, x0: Tensor, cond: Any = None, *, policy: PolicyRole = "current", solver=None, times=None,
               generator=None, return_trajectory=False, return_log_probs=False) -> SampleOutput:
        return sample_velocity(self.velocity, x0, cond, solver=solver or self.solver, times=times,
                               n_steps=self.n_steps, generator=generator, return_trajectory=return_trajectory,
                               return_log_probs=return_log_probs)
