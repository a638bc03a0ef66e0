"""The reward fine-tuning ``LightningModule``: a policy backbone plus one objective.

One online round is one Lightning epoch (details in :class:`~lightning_nft.policy.OnlineFineTuningMixin`,
which implements the policy bookkeeping): ``OnlineRollout`` collects ``K`` samples for each of ``P``
conditions from the sampling policy, ``steps_per_round`` gradient steps of the objective run on
minibatches of them, and ``EMAOldPolicy`` refreshes the old policy, ``old <- d old + (1 - d) current``.

The objective is chosen in YAML: DiffusionNFT (``objectives.NFTObjective``; arXiv:2509.16117), Adjoint
Matching (``objectives.AdjointMatchingObjective``; arXiv:2409.08861) or Flow-GRPO
(``objectives.GRPOObjective``; arXiv:2505.05470). They share this module because they differ only in
what a minibatch of rollouts costs (which policy samples, whether trajectories or log-probabilities are
kept, the loss), which the :class:`~lightning_nft.objectives.base.Objective` declares.

This class adds to the mixin what a command-line run needs: hyper-parameters, LoRA injection, the
optimiser and learning-rate schedule (``OptimizerCallable`` / ``LRSchedulerCallable``, so
LightningCLI's ``--model.optimizer`` and ``--optimizer`` work), the default callbacks and ``predict``.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_nft.advantages import Normalizer
from lightning_nft.decoders import Decoder
from lightning_nft.evaluation import PromptEvaluationMixin
from lightning_nft.data.noise import NoiseDataset
from lightning_nft.lora import add_lora
from lightning_nft.objectives.base import Objective
from lightning_nft.policy import ConditionSampler, GuidancePlace, OnlineFineTuningMixin, PolicyRole
from lightning_nft.rewards.validation import NonFinitePolicy
from lightning_nft.samplers import Solver
from lightning_nft.startup_checks import check_learning_rates


@runtime_checkable
class VelocityField(Protocol):
    """A velocity network ``forward(x (B, *S), t (B,), cond) -> (B, *S)`` (an ``nn.Module``).

    Unannotated on purpose: LightningCLI (jsonargparse) then accepts any class whose ``forward`` takes
    ``(x, t, cond=None)``, whatever its annotations, and ``--help`` lists no ``torch.nn`` subclasses.
    """

    def forward(self, x, t, cond=None): ...  # noqa: ANN001, ANN201


class RewardModel(Protocol):
    """A reward ``forward(samples (B, *S), cond=None) -> (B,)`` (a :class:`~lightning_nft.rewards.Reward`).

    A protocol for the same reason as :class:`VelocityField`: ``--help`` then lists no subclasses.
    """

    def forward(self, samples, cond=None): ...  # noqa: ANN001, ANN201


@dataclass
class LoraSettings:
    """LoRA adapters injected with peft: ``target_modules`` (names of ``nn.Linear``/conv layers)."""

    target_modules: list[str] = field(default_factory=list)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """``AdamW(lr=1e-4, weight_decay=0)``, the module's default optimiser."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def adamw(lr: float, weight_decay: float = 0.0) -> OptimizerCallable:
    """``params -> AdamW(params, lr, weight_decay)`` (for the Python API; YAML names ``torch.optim.AdamW``)."""
    return functools.partial(torch.optim.AdamW, lr=float(lr), weight_decay=float(weight_decay))


def linear_decay(lr: float, lr_final: float, total_steps: int) -> LRSchedulerCallable:
    """``optimizer -> LinearLR``: the rate goes linearly from ``lr`` at the first optimiser step to ``lr_final``
    at the last of ``total_steps`` (``lr * (1 + (lr_final / lr - 1) min(k, n - 1) / (n - 1))`` at step ``k``)."""
    return functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=float(lr_final) / float(lr),
                             total_iters=max(int(total_steps) - 1, 1))


class RewardFineTuningModule(PromptEvaluationMixin, OnlineFineTuningMixin):
    """Reward fine-tuning of a velocity-field ``backbone`` with one ``objective``.

    Args:
        backbone: velocity field ``forward(x (B, *S), t (B,), cond) -> (B, *S)``.
        reward: one float per sample.
        objective: what a minibatch of rollouts costs (NFT, Adjoint Matching, GRPO).
        sample_shape: the shape ``S`` of one sample, e.g. ``[2]`` or ``[1, 8, 8]``.
        condition_sampler: ``callable(n_groups, generator) -> cond`` (``None``: unconditional).
        groups_per_round, group_size: ``P`` conditions and ``K`` samples each, per rank and round.
        steps_per_round: gradient steps per round on the round's rollouts.
        minibatch_size: rollouts per gradient step (``None``: ``N / steps_per_round``).
        solver, n_sample_steps, time_shift: rollout sampler (default: the objective's, else Euler)
            on ``time_grid(n_sample_steps, shift=time_shift)``.
        normalizer: raw rewards -> advantages and ``r`` (default ``RewardNormalizer()``).
        optimizer: ``params -> Optimizer`` (default AdamW, lr 1e-4).
        lr_scheduler: optional ``optimizer -> LRScheduler``, stepped every optimiser step.
        lora: LoRA adapters (reference = adapters off, old = 2nd adapter).
        rollout_seed: seed of the rollout and loss noise (see below).
        predict_samples, predict_seed, predict_batch_size, predict_policy: what ``predict`` samples.
        default_callbacks: add missing defaults (see below).
        step_metrics: log every step, not per round (see below).
        nonfinite_rewards: what a NaN/inf reward does (see below).
        fsdp_blocks: submodule classes sharded as own FSDP2 units.
        score_chunks: score chunk ``k`` while chunk ``k + 1`` is sampled (see below); 1: no overlap.
        decoder: latents -> pixels in ``[-1, 1]`` (see below).
        guidance_scale, guidance: classifier-free guidance scale ``w`` and where it applies: ``"rollouts"``,
            ``"evaluation"``, ``"both"`` or ``"neither"`` (see :class:`~lightning_nft.policy.OnlineFineTuningMixin`).
        eval_images_per_prompt, eval_seed, eval_prompts_per_batch: ``validate``/``test`` on prompt splits
            (:class:`~lightning_nft.evaluation.PromptEvaluationMixin`).

    Details of the settings above:

    * ``rollout_seed``: rollout noise of rank ``k`` in round ``e`` comes from a generator seeded by
      ``(rollout_seed, k, e)``, and the loss noise of step ``s`` from ``(rollout_seed, k, e, s)``.
    * ``lr_scheduler``: e.g. ``torch.optim.lr_scheduler.LinearLR`` for a linear decay over the fit.
    * ``default_callbacks``: add ``OnlineRollout`` and ``EMAOldPolicy`` when the trainer lacks them (and
      ``CheckpointOnRewardFailure`` when the reward scores remotely).
    * ``step_metrics``: ``True`` logs ``train/loss`` and the objective's diagnostics at every gradient
      step; ``False`` (default) logs their round means once per round, under the same names (a
      ``self.log`` costs a fixed ~0.1-0.5 ms on CPU; ``benchmarks/nft_overhead.py``).
    * ``score_chunks``: sample each round in this many chunks of whole groups and score chunk ``k``
      while chunk ``k + 1`` is sampled, hiding a slow (remote) scorer behind sampling. Worth it where
      sampling a chunk costs about its share of the whole batch (GPU); on small CPU models the per-call
      overhead of chunks eats the gain (``benchmarks/reward_overlap.py``).
    * ``decoder``: applied before rewards, grids, metrics, evaluation and predict.
    * ``nonfinite_rewards``: what a NaN/inf reward does (``lightning_nft.rewards.validation``): ``"raise"``
      stops naming the reward class and round; ``"drop_sample"`` / ``"drop_group"`` leave the sample / its
      whole group out of the round, counted and logged (``reward/nonfinite``, ``reward/dropped_samples``,
      ``reward/dropped_groups``). Non-finite *samples* or losses always stop the run, blamed on the policy
      with the round, the step and the last finite loss; a non-finite loss is caught before the optimiser
      step and the last good state is saved next to the checkpoints.
    * ``fsdp_blocks``: class names of submodules sharded as their own FSDP2 units under
      ``ModelParallelStrategy`` (e.g. ``["JointTransformerBlock"]``); the rest of each network is one unit.
      Trained, old and reference networks are sharded alike (``lightning_nft.sharding``).

    Start-up checks (before round 0, ``lightning_nft.startup_checks``): ``group_size: 1`` with a
    group-centred normalisation and a zero learning rate are refused; a backbone or reward that records
    another sample shape is refused; one velocity evaluation and one reward call on two samples of
    ``sample_shape`` must give a velocity of the samples' shape and one reward per sample.
    """

    def __init__(
        self,
        backbone: VelocityField,
        reward: RewardModel,
        objective: Objective,
        sample_shape: Sequence[int] = (2,),
        condition_sampler: Optional[ConditionSampler] = None,
        groups_per_round: int = 8,
        group_size: int = 16,
        steps_per_round: int = 1,
        minibatch_size: Optional[int] = None,
        solver: Optional[Solver] = None,
        n_sample_steps: int = 20,
        time_shift: float = 1.0,
        normalizer: Optional[Normalizer] = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        lora: Optional[LoraSettings | dict] = None,
        rollout_seed: int = 0,
        predict_samples: int = 1000,
        predict_seed: int = 0,
        predict_batch_size: int = 500,
        predict_policy: PolicyRole = "current",
        default_callbacks: bool = True,
        step_metrics: bool = False,
        nonfinite_rewards: NonFinitePolicy = "raise",
        fsdp_blocks: Sequence[str] = (),
        score_chunks: int = 1,
        decoder: Optional[Decoder] = None,
        guidance_scale: float = 1.0,
        guidance: GuidancePlace = "neither",
        eval_images_per_prompt: int = 8,
        eval_seed: int = 0,
        eval_prompts_per_batch: int = 16,
    ) -> None:
        super().__init__()
        if isinstance(lora, dict):  # as stored in checkpoints' hyper-parameters (load_from_checkpoint)
            lora = LoraSettings(**lora)
        frame = inspect.currentframe()
        self.save_hyperparameters(ignore=_not_plain_arguments(frame), frame=frame)
        # a plain dict, not the dataclass: Lightning loads checkpoints with torch.load(weights_only=True)
        self.hparams["lora"] = asdict(lora) if lora is not None else None
        if lora is not None:
            backbone = add_lora(backbone, lora.target_modules, lora.rank, lora.alpha, lora.dropout)
        self.configure_online_fine_tuning(
            backbone, reward, objective, sample_shape, condition_sampler=condition_sampler,
            groups_per_round=groups_per_round, group_size=group_size, steps_per_round=steps_per_round,
            minibatch_size=minibatch_size, solver=solver, n_sample_steps=n_sample_steps, time_shift=time_shift,
            normalizer=normalizer, rollout_seed=rollout_seed, step_metrics=step_metrics, score_chunks=score_chunks,
            decoder=decoder, guidance_scale=guidance_scale, guidance=guidance,
            nonfinite_rewards=nonfinite_rewards, fsdp_blocks=fsdp_blocks,
        )
        self.eval_images_per_prompt, self.eval_seed = int(eval_images_per_prompt), int(eval_seed)
        self.eval_prompts_per_batch = int(eval_prompts_per_batch)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.default_callbacks = bool(default_callbacks)

    @override
    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.velocity(x, t, cond)

    @override
    def configure_callbacks(self) -> list[Callback]:
        if not self.default_callbacks:
            return []
        from lightning_nft.callbacks import CheckpointOnRewardFailure, EMAOldPolicy, OnlineRollout
        from lightning_nft.rewards.remote import RemoteReward

        present = self.trainer.callbacks if self._trainer is not None else []
        wanted = [OnlineRollout]
        if self.objective.needs_old_policy:
            wanted.append(EMAOldPolicy)
        if isinstance(self.reward, torch.nn.Module) and any(isinstance(m, RemoteReward) for m in self.reward.modules()):
            wanted.append(CheckpointOnRewardFailure)  # a scorer that stays down: checkpoint, then stop
        missing = [cls for cls in wanted if not any(isinstance(c, cls) for c in present)]
        return [EMAOldPolicy(decay=self.objective.default_ema_decay) if cls is EMAOldPolicy else cls() for cls in missing]

    @override
    def predict_dataloader(self) -> DataLoader:
        ds = NoiseDataset(self.hparams.predict_samples, self.sample_shape, self.hparams.predict_seed)
        return DataLoader(ds, batch_size=self.hparams.predict_batch_size)

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x0 = batch["x0"]
        g = torch.Generator(device="cpu").manual_seed(self.hparams.predict_seed + 7919 * (batch_idx + 1))
        cond = self.sample_conditions(x0.shape[0], g)
        x1 = self.sample(x0, cond, policy=self.hparams.predict_policy).samples
        out = {"samples": x1, "rewards": self.compute_rewards(x1, cond)}
        if self.decoder is not None:
            out["images"] = self.decode(x1)
        return out

    def eval_settings(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~lightning_nft.evaluation.evaluate_prompts` for ``validate``/``test``."""
        return dict(images_per_prompt=self.eval_images_per_prompt, seed=self.eval_seed,
                    guidance_scale=self.guidance_scale_for("evaluation"), n_steps=self.n_sample_steps,
                    time_shift=self.time_shift, decoder=self.decoder, prompts_per_batch=self.eval_prompts_per_batch)

    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy_network.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the backbone has no trainable parameters")
        opt = self.optimizer_factory(params)
        check_learning_rates([opt])
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}


def _not_plain_arguments(frame: Any) -> list[str]:
    """Names of the ``__init__`` arguments of ``frame`` and its subclasses' ``__init__`` frames that are not
    plain values (modules, tensors, callables...).

    Only plain values (numbers, strings, ``None`` and lists/tuples/dicts of them) go into the
    hyper-parameters: they are what a checkpoint stores with ``weights_only=True``, and a subclass may add
    arguments of any type (tensors, models) without ``save_hyperparameters`` deep-copying them.
    """
    arguments: dict[str, Any] = {}
    for local_args in collect_init_args(frame, [], classes=(HyperparametersMixin,)):
        arguments.update(local_args)
    return [name for name, value in arguments.items() if not _is_plain(value)]


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False
