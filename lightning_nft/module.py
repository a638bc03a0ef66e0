"""The reward fine-tuning ``LightningModule``: a policy backbone plus one objective.

One online round (``../shared/DESIGN.md``) is one Lightning epoch:

1. ``OnlineRollout`` (a callback) draws ``K`` samples for each of ``P`` conditions from the
   sampling policy with any solver (:meth:`RewardFineTuningModule.rollout`), scores them
   (:meth:`~RewardFineTuningModule.compute_rewards`), normalises rewards over all ranks and hands
   the :class:`~lightning_nft.rollouts.RolloutBatch` to the module (:meth:`set_rollouts`);
2. ``steps_per_round`` gradient steps of the objective run on minibatches of those rollouts
   (:meth:`compute_loss`);
3. ``EMAOldPolicy`` refreshes the old policy, ``old <- d old + (1 - d) current``.

The objective is chosen in YAML: DiffusionNFT (``objectives.nft.NFTObjective``), Adjoint Matching
(``objectives.adjoint_matching.AdjointMatchingObjective``) or Flow-GRPO
(``objectives.grpo.GRPOObjective``). All three share this module because they differ only in
*what a minibatch of rollouts costs*: which policy samples (old for NFT/GRPO, current for Adjoint
Matching), whether trajectories or log-probabilities are kept, and the loss. Those are declared by
the objective (:class:`~lightning_nft.objectives.base.Objective`), so one module, one rollout
callback and one checkpoint format serve every method; a subclass per method would duplicate the
policy bookkeeping below.

Policies (:class:`lightning_nft.policy.Policy`):

* full fine-tuning: ``backbone`` is trained, ``old_backbone`` and ``reference_backbone`` are frozen
  copies kept as submodules (so strategies move/shard them and checkpoints carry them);
* LoRA (``lora=LoraSettings(...)`` or a backbone that already carries peft adapters ``default`` and
  ``old``): the reference is the backbone with adapters disabled and the old policy is the second
  adapter ``old``; no copies of the base weights.

Override points for subclasses: :meth:`sample_conditions`, :meth:`rollout`,
:meth:`compute_rewards`, :meth:`compute_loss`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_nft.data.noise import NoiseDataset
from lightning_nft.lora import (
    OLD_ADAPTER,
    active_adapter,
    adapter_parameter_pairs,
    adapters_disabled,
    add_lora,
    has_lora,
)
from lightning_nft.objectives.base import Objective
from lightning_nft.policy import PolicyRole
from lightning_nft.rewards.base import Reward, check_finite_rewards
from lightning_nft.conditions import network_input
from lightning_nft.rollouts import RolloutBatch
from lightning_nft.samplers import EulerSolver, SampleOutput, Solver, time_grid

ConditionSampler = Callable[[int, torch.Generator], Any]

# The frozen old/reference copies and reward models are in eval mode on purpose; Lightning's notice
# about modules in eval mode at the start of training is noise for this module.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


@dataclass
class LoraSettings:
    """LoRA adapters injected with peft: ``target_modules`` (names of ``nn.Linear``/conv layers)."""

    target_modules: list[str] = field(default_factory=list)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0


class RewardFineTuningModule(pl.LightningModule):
    """Reward fine-tuning of a velocity-field ``backbone`` with one ``objective``.

    Args:
        backbone: velocity field ``forward(x (B, *S), t (B,), cond) -> (B, *S)`` (our convention).
        reward: a :class:`~lightning_nft.rewards.Reward` (one float per sample).
        objective: what a minibatch of rollouts costs (NFT, Adjoint Matching, GRPO).
        sample_shape: the shape ``S`` of one sample, e.g. ``[2]`` or ``[1, 8, 8]``.
        conditions: ``callable(n_groups, generator) -> cond`` giving one condition per group
            (``None``: unconditional; groups are then just independent batches).
        groups_per_round, group_size: ``P`` conditions and ``K`` samples each, per rank and round.
        steps_per_round: gradient steps per round on the round's rollouts.
        minibatch_size: rollouts per gradient step (``None``: ``N / steps_per_round``, a partition).
        solver, n_sample_steps, time_shift: rollout sampler (default: the objective's, else Euler)
            on ``time_grid(n_sample_steps, shift=time_shift)``.
        normalizer: raw rewards -> advantages and optimality probabilities ``r``
            (default ``RewardNormalizer()``: group-centred, clipped).
        lr, weight_decay: AdamW on the trainable parameters.
        lr_final: optional linear learning-rate decay, per optimiser step, from ``lr`` to ``lr_final``
            over the whole fit (``trainer.estimated_stepping_batches``); ``None`` (default): constant
            ``lr``. Adjoint Matching's regression targets are heavy-tailed and a decaying rate is what
            lets the last iterate settle (``tests/test_adjoint_matching.py``'s recipe: 1e-2 -> 1e-3).
        lora: inject LoRA adapters (reference = adapters off, old = second adapter); a ``LoraSettings``
            or the dict of its fields (kept as a dict in the hyper-parameters, so checkpoints load
            with ``weights_only=True``).
        rollout_seed: rollout noise of rank ``k`` in round ``e`` comes from a generator seeded by
            ``(rollout_seed, k, e)``, so ranks differ and a resumed run draws the same rollouts.
        predict_samples, predict_seed, predict_batch_size, predict_policy: what ``predict`` samples.
        default_callbacks: add ``OnlineRollout`` and ``EMAOldPolicy`` when the trainer lacks them.
        step_metrics: ``True`` logs ``train/loss`` and the objective's diagnostics at every gradient
            step. ``False`` (default) logs their means over the round once per round, under the
            same names: one ``self.log`` per name and round instead of one per step, which matters
            when a gradient step is cheap (each ``self.log`` costs Lightning a fixed ~0.1-0.5 ms on
            CPU; ``benchmarks/nft_overhead.py``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        reward: Reward,
        objective: Objective,
        sample_shape: Sequence[int] = (2,),
        conditions: Optional[ConditionSampler] = None,
        groups_per_round: int = 8,
        group_size: int = 16,
        steps_per_round: int = 1,
        minibatch_size: Optional[int] = None,
        solver: Optional[Solver] = None,
        n_sample_steps: int = 20,
        time_shift: float = 1.0,
        normalizer: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        lora: Optional[LoraSettings | dict] = None,
        rollout_seed: int = 0,
        predict_samples: int = 1000,
        predict_seed: int = 0,
        predict_batch_size: int = 500,
        predict_policy: PolicyRole = "current",
        default_callbacks: bool = True,
        step_metrics: bool = False,
        lr_final: Optional[float] = None,
    ) -> None:
        super().__init__()
        if groups_per_round < 1 or group_size < 1 or steps_per_round < 1:
            raise ValueError("groups_per_round, group_size and steps_per_round must be positive")
        substeps = int(getattr(objective, "substeps", 1))
        if steps_per_round < substeps:
            raise ValueError(
                f"steps_per_round={steps_per_round} is smaller than the objective's substeps={substeps}: "
                "every sub-round of multi-step NFT needs at least one gradient step"
            )
        if isinstance(lora, dict):  # as stored in checkpoints' hyper-parameters (load_from_checkpoint)
            lora = LoraSettings(**lora)
        self.save_hyperparameters(
            ignore=["backbone", "reward", "objective", "conditions", "solver", "normalizer", "lora"]
        )
        # a plain dict, not the dataclass: Lightning loads checkpoints with torch.load(weights_only=True)
        self.hparams["lora"] = asdict(lora) if lora is not None else None
        from lightning_nft.advantages import RewardNormalizer

        if lora is not None:
            backbone = add_lora(backbone, lora.target_modules, lora.rank, lora.alpha, lora.dropout)
        self.uses_lora = has_lora(backbone)
        self.backbone = backbone
        self.reward = reward.requires_grad_(False) if isinstance(reward, nn.Module) else reward
        self.objective = objective
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.conditions = conditions
        self.solver = solver
        self.normalizer = normalizer if normalizer is not None else RewardNormalizer()
        if self.uses_lora:
            names = {n for n, _ in backbone.named_parameters()}
            if not any(f".{OLD_ADAPTER}." in n for n in names):
                raise ValueError("a LoRA backbone needs a second adapter named 'old' (use lora=LoraSettings(...))")
            self.old_backbone = None
            self.reference_backbone = None
        else:
            self.old_backbone = _frozen_copy(backbone) if objective.needs_old_policy else None
            self.reference_backbone = _frozen_copy(backbone)
        self.kl_anchor_weight = 0.0  # set by the KLAnchor callback
        self.rollouts: Optional[RolloutBatch] = None
        self.rollout_version = 0
        self._minibatch_order: Optional[Tensor] = None
        self._round_sums: dict[str, Tensor] = {}
        self._round_steps = 0

    # ------------------------------------------------------------------ policy interface
    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.backbone(x, t, network_input(cond))

    def velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Current policy ``v_theta`` (differentiable in parameters and ``x``)."""
        return self.backbone(x, t, network_input(cond))

    def old_velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Old policy ``v_old``: no parameter gradients (differentiable in ``x``)."""
        if self.uses_lora:
            with active_adapter(self.backbone, OLD_ADAPTER):
                return self.backbone(x, t, network_input(cond))
        if self.old_backbone is None:
            raise RuntimeError(f"{type(self.objective).__name__} keeps no old policy (needs_old_policy=False)")
        return self.old_backbone(x, t, network_input(cond))

    def reference_velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Frozen initial model ``v_ref``: no parameter gradients (differentiable in ``x``)."""
        if self.uses_lora:
            with adapters_disabled(self.backbone):
                return self.backbone(x, t, network_input(cond))
        return self.reference_backbone(x, t, network_input(cond))

    def policy_velocity(self, policy: PolicyRole) -> Callable[[Tensor, Tensor, Any], Tensor]:
        return {"current": self.velocity, "old": self.old_velocity, "reference": self.reference_velocity}[policy]

    def sample_times(self) -> Tensor:
        """The rollout time grid ``(n_sample_steps + 1,)``."""
        return time_grid(self.hparams.n_sample_steps, shift=self.hparams.time_shift, device=self.device)

    def rollout_solver(self) -> Solver:
        return self.solver or self.objective.default_solver() or EulerSolver()

    @torch.no_grad()
    def sample(self, x0: Tensor, cond: Any = None, *, policy: PolicyRole = "current", solver: Optional[Solver] = None,
               times: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
               return_trajectory: bool = False, return_log_probs: bool = False) -> SampleOutput:
        """Integrate ``policy`` from noise ``x0 (B, *S)`` at ``t = 0`` to samples at ``t = 1``."""
        solver = solver or self.solver or EulerSolver()
        times = self.sample_times() if times is None else times
        return solver.sample(self.policy_velocity(policy), x0, times.to(x0), cond, generator=generator,
                             return_trajectory=return_trajectory, return_log_probs=return_log_probs)

    # ------------------------------------------------------------------ parameter pairs for callbacks
    def old_policy_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(old params, current params)`` matched one to one (EMA of the old policy)."""
        if self.uses_lora:
            return adapter_parameter_pairs(self.backbone)
        if self.old_backbone is None:
            return [], []
        return list(self.old_backbone.parameters()), list(self.backbone.parameters())

    def reference_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(reference params, current params)`` (empty with LoRA: the reference is adapters-off)."""
        if self.uses_lora:
            return [], []
        return list(self.reference_backbone.parameters()), list(self.backbone.parameters())

    @torch.no_grad()
    def update_old_policy(self, decay: float) -> None:
        """``old <- decay * old + (1 - decay) * current`` with ``torch._foreach_lerp_`` (works on shards)."""
        old, cur = self.old_policy_pairs()
        if old:
            torch._foreach_lerp_(old, cur, 1.0 - float(decay))

    @torch.no_grad()
    def snapshot_reference(self) -> None:
        """``reference <- current`` (full fine-tuning; a no-op with LoRA)."""
        ref, cur = self.reference_pairs()
        if ref:
            torch._foreach_copy_(ref, cur)

    # ------------------------------------------------------------------ override points
    def sample_conditions(self, n_groups: int, generator: torch.Generator) -> Any:
        """One condition per group (``None`` for unconditional models)."""
        return None if self.conditions is None else self.conditions(n_groups, generator)

    def rollout(self, x0: Tensor, cond: Any, generator: torch.Generator) -> SampleOutput:
        """Sample the round's rollouts from the objective's sampling policy."""
        return self.sample(x0, cond, policy=self.objective.sampling_policy, solver=self.rollout_solver(),
                           generator=generator, return_trajectory=self.objective.needs_trajectory,
                           return_log_probs=self.objective.needs_log_probs)

    @torch.no_grad()
    def compute_rewards(self, x1: Tensor, cond: Any) -> Tensor:
        """Raw rewards ``(N,)``; non-finite values raise, naming the sample."""
        rewards = self.reward(x1, cond).detach().float().reshape(-1)
        if rewards.shape[0] != x1.shape[0]:
            raise ValueError(f"reward returned {rewards.shape[0]} values for {x1.shape[0]} samples")
        check_finite_rewards(rewards)
        return rewards

    def compute_loss(self, batch: RolloutBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of a minibatch of rollouts (the objective's)."""
        return self.objective.loss(self, batch)

    # ------------------------------------------------------------------ rollouts
    def set_rollouts(self, rollouts: RolloutBatch, generator: Optional[torch.Generator] = None) -> None:
        """Keep ``rollouts`` for the coming gradient steps (called by ``OnlineRollout``)."""
        self.rollouts = rollouts
        self.rollout_version += 1
        self._minibatch_order = torch.randperm(len(rollouts), generator=generator)
        self._minibatch_cursor = 0

    def next_minibatch(self) -> RolloutBatch:
        if self.rollouts is None:
            raise RuntimeError(
                "no rollouts for this round: the trainer needs the OnlineRollout callback "
                "(added by default unless default_callbacks=False)"
            )
        n = len(self.rollouts)
        size = self.hparams.minibatch_size or max(1, n // self.hparams.steps_per_round)
        size = min(size, n)
        start = self._minibatch_cursor % n
        idx = self._minibatch_order[start:start + size]
        if idx.numel() < size:  # wrap around
            idx = torch.cat([idx, self._minibatch_order[: size - idx.numel()]])
        self._minibatch_cursor = start + size
        return self.rollouts.index(idx)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.objective.setup(self)

    def on_train_start(self) -> None:
        # a pretrained backbone may arrive in eval mode (loaders return eval models); train it in train
        # mode, while the frozen old/reference copies and the reward stay in eval mode
        self.backbone.train()

    def configure_callbacks(self):
        if not self.hparams.default_callbacks:
            return []
        from lightning_nft.callbacks import EMAOldPolicy, OnlineRollout

        present = self.trainer.callbacks if self._trainer is not None else []
        wanted = [OnlineRollout]
        if self.objective.needs_old_policy:
            wanted.append(EMAOldPolicy)
        missing = [cls for cls in wanted if not any(isinstance(c, cls) for c in present)]
        return [EMAOldPolicy(decay=self.objective.default_ema_decay) if cls is EMAOldPolicy else cls() for cls in missing]

    def train_dataloader(self) -> DataLoader:
        """One item per gradient step of a round: an epoch of Lightning is one online round.

        The items are only step counters (the data are the rollouts). Every rank must run all
        ``steps_per_round`` steps on its own rollouts, so the loader carries a one-replica
        ``DistributedSampler``: Lightning then injects no sampler of its own, which would split the
        steps among the ranks (``world_size`` times fewer steps per round).
        """
        steps = torch.arange(self.hparams.steps_per_round)
        return DataLoader(steps, batch_size=1, sampler=DistributedSampler(steps, num_replicas=1, rank=0, shuffle=False))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, logs = self.compute_loss(self.next_minibatch())
        if self.hparams.step_metrics:
            self.log("train/loss", loss, prog_bar=True)
            for k, v in logs.items():
                self.log(f"train/{k}", v)
        else:  # round means, logged in on_train_epoch_end
            for k, v in (("loss", loss), *logs.items()):
                v = torch.as_tensor(v).detach().float()
                self._round_sums[k] = self._round_sums[k] + v if k in self._round_sums else v
            self._round_steps += 1
        return loss

    def on_train_epoch_end(self) -> None:
        if self._round_sums:
            for k, total in self._round_sums.items():
                self.log(f"train/{k}", total / self._round_steps, prog_bar=k == "loss", sync_dist=True)
        self._round_sums, self._round_steps = {}, 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints carry the rollout counter (old policy and reference are submodules: in the state dict)."""
        checkpoint["lightning_nft"] = {"rollout_version": self.rollout_version}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rollout_version = int(checkpoint.get("lightning_nft", {}).get("rollout_version", 0))

    def predict_dataloader(self) -> DataLoader:
        ds = NoiseDataset(self.hparams.predict_samples, self.sample_shape, self.hparams.predict_seed)
        return DataLoader(ds, batch_size=self.hparams.predict_batch_size)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x0 = batch["x0"]
        g = torch.Generator(device="cpu").manual_seed(self.hparams.predict_seed + 7919 * (batch_idx + 1))
        cond = self.sample_conditions(x0.shape[0], g)
        x1 = self.sample(x0, cond, policy=self.hparams.predict_policy).samples
        return {"samples": x1, "rewards": self.compute_rewards(x1, cond)}

    def configure_optimizers(self):
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the backbone has no trainable parameters")
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        lr_final = self.hparams.get("lr_final")
        if lr_final is None:
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        ratio = float(lr_final) / float(self.hparams.lr)

        def factor(step: int) -> float:  # lr * factor: lr at step 0, lr_final at the last step
            return 1.0 + (ratio - 1.0) * min(step, total - 1) / max(total - 1, 1)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _frozen_copy(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin.eval()
