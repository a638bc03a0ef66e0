"""Reward fine-tuning of a diffusers text-to-image pipeline named by a model id or a folder.

:class:`PipelineFineTuningModule` is :class:`~lightning_nft.module.RewardFineTuningModule` with its
backbone, sample shape, time grid, conditions and decode step taken from a pipeline
(:func:`lightning_nft.pipelines.build_pipeline`)::

    model:
      class_path: lightning_nft.pipelines.PipelineFineTuningModule
      init_args:
        pipeline: stabilityai/stable-diffusion-3.5-medium     # or a local folder
        pipeline_options: {dtype: bfloat16}
        prompts: prompts/train.txt
        resolution: 512
        lora: {rank: 32, alpha: 64}                           # target_modules: the family's default

A round's ``P`` prompts are drawn (uniformly, with replacement) from the round's generator; each
distinct prompt is encoded once (an embedding cache on the CPU) and each group's condition is a
:class:`~lightning_nft.conditions.Conditions` with the prompt in its metadata. Rollouts start at the
family grid's first time from ``s(t0) x0`` (``PipelineParts.initial_state``) and may use
classifier-free guidance (J. Ho and T. Salimans, arXiv:2207.12598) toward the prompt and away from
``negative_prompt`` with ``guidance_scale``; DiffusionNFT samples CFG-free (scale 1) and trains on the
unguided field, while for GRPO (an objective that keeps log-probabilities) the policies it trains and
compares are the guided ones, so the likelihood ratio is that of the guided transition actually
sampled. Rewards receive decoded pixels in ``[-1, 1]``.

Checkpoints hold what cannot be rebuilt from the pipeline: with LoRA only the adapters (trained and
old) and the training state; with full fine-tuning the trained and old backbones, not the frozen
reference (the pipeline's own weights), and never the VAE or reward models.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Optional, Sequence, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_nft.advantages import Normalizer
from lightning_nft.conditions import Conditions, condition_to
from lightning_nft.guidance import guided_velocity
from lightning_nft.module import LoraSettings, RewardFineTuningModule, default_optimizer
from lightning_nft.objectives.base import Objective
from lightning_nft.pipelines.build import build_pipeline
from lightning_nft.pipelines.common import PipelineParts
from lightning_nft.policy import PolicyRole, _frozen_copy
from lightning_nft.rewards.base import Reward
from lightning_nft.samplers import EulerSolver, SampleOutput, Solver


def read_prompts(prompts: Union[str, Sequence[str]]) -> list[str]:
    """Prompts from a list, or from a text file with one prompt per line (blank lines skipped)."""
    if isinstance(prompts, (str, os.PathLike)):
        path = os.fspath(prompts)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            out = [line.strip() for line in f if line.strip()]
        if not out:
            raise ValueError(f"prompt file {path!r} holds no prompt")
        return out
    out = [str(p) for p in prompts]
    if not out:
        raise ValueError("prompts: the list is empty")
    return out


class PipelineFineTuningModule(RewardFineTuningModule):
    """Reward fine-tuning of a diffusers text-to-image pipeline (SD3/SD3.5, FLUX.1, SD1.5).

    Args:
        pipeline: hub id or local folder of a saved pipeline, or a ``PipelineParts`` (in YAML: a builder by
            ``class_path``, e.g. ``lightning_nft.pipelines.build_sd3`` with its ``init_args``).
        reward: scores decoded images ``(B, 3, H, W)`` in ``[-1, 1]`` with the prompt metadata.
        objective: DiffusionNFT, GRPO, ... (``lightning_nft.objectives``).
        prompts: a list of training prompts or a text file with one per line.
        resolution: image size in pixels, ``[height, width]`` or one number for a square.
        pipeline_options: keyword arguments of the family builder (``dtype``, ``gradient_checkpointing``,
            ``text_encoder_device``, ``offload_vae``, Flux's distilled ``guidance_scale``...).
        guidance_scale, negative_prompt: classifier-free guidance of the rollouts (module docstring).
        lora: ``LoraSettings`` fields; an empty ``target_modules`` means the family's default targets.
        Other arguments: as :class:`~lightning_nft.module.RewardFineTuningModule` (``sample_shape`` and
        ``conditions`` come from the pipeline).
    """

    def __init__(
        self,
        pipeline: Union[str, PipelineParts],
        reward: Reward,
        objective: Objective,
        prompts: Union[str, list[str]],
        resolution: Union[int, list[int]] = 512,
        pipeline_options: Optional[dict[str, Any]] = None,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
        lora: Optional[Union[LoraSettings, dict]] = None,
        groups_per_round: int = 8,
        group_size: int = 16,
        steps_per_round: int = 1,
        minibatch_size: Optional[int] = None,
        solver: Optional[Solver] = None,
        n_sample_steps: int = 10,
        normalizer: Optional[Normalizer] = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        rollout_seed: int = 0,
        predict_samples: int = 16,
        predict_seed: int = 0,
        predict_batch_size: int = 4,
        predict_policy: PolicyRole = "current",
        default_callbacks: bool = True,
        step_metrics: bool = False,
    ) -> None:
        parts = pipeline if isinstance(pipeline, PipelineParts) else build_pipeline(pipeline, **(pipeline_options or {}))
        height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        shape = parts.latent_shape(int(height), int(width))
        if isinstance(lora, dict):
            lora = LoraSettings(**lora)
        if lora is not None and not lora.target_modules:
            lora = LoraSettings(**{**asdict(lora), "target_modules": list(parts.lora_targets)})
        super().__init__(
            backbone=parts.backbone, reward=reward, objective=objective, sample_shape=shape,
            groups_per_round=groups_per_round, group_size=group_size, steps_per_round=steps_per_round,
            minibatch_size=minibatch_size, solver=solver, n_sample_steps=n_sample_steps, normalizer=normalizer,
            optimizer=optimizer, lr_scheduler=lr_scheduler, lora=lora, rollout_seed=rollout_seed,
            predict_samples=predict_samples, predict_seed=predict_seed, predict_batch_size=predict_batch_size,
            predict_policy=predict_policy, default_callbacks=default_callbacks, step_metrics=step_metrics,
        )
        if isinstance(pipeline, PipelineParts):
            self.hparams["pipeline"] = f"<{parts.family} pipeline: {parts.source}>"
        self.parts = parts
        self.pipeline_family = parts.family
        self.decoder = parts.decoder
        self.height, self.width = int(height), int(width)
        self.prompts = read_prompts(prompts)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self._embeddings: dict[str, dict[str, Tensor]] = {}
        self.strict_loading = False  # checkpoints leave out what the pipeline rebuilds (on_save_checkpoint)
        self._check_training_times()

    def _check_training_times(self) -> None:
        """Warn when the objective trains at times noisier than the model's own start time (SD1.5: t < ~0.064)."""
        t_start = float(self.sample_times()[0])
        sampler = getattr(self.objective, "time_sampler", None)
        if t_start > 0 and getattr(self.objective, "time_source", "grid") == "density" and sampler is not None \
                and sampler.t_min < t_start:
            rank_zero_warn(f"{self.pipeline_family}: the objective draws training times from t_min={sampler.t_min}, "
                           f"below the model's noisiest level t={t_start:.4f} (inputs there are clamped); use "
                           f"time_source='grid' or a TimeSampler with t_min >= {t_start:.4f}")

    # ------------------------------------------------------------------ prompts and conditions
    def encode(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``(n, ...)`` condition tensors of ``prompts`` on the CPU; each distinct prompt is encoded once."""
        missing = sorted({p for p in prompts if p not in self._embeddings})
        if missing:
            out = self.parts.prompt_encoder(missing)
            for i, p in enumerate(missing):
                self._embeddings[p] = {k: v[i:i + 1] for k, v in out.items()}
        rows = [self._embeddings[p] for p in prompts]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    @override
    def sample_conditions(self, n_groups: int, generator: torch.Generator) -> Conditions:
        """``n_groups`` prompts drawn with ``generator``: embeddings for the backbone, the prompt as metadata."""
        idx = torch.randint(len(self.prompts), (n_groups,), generator=generator).tolist()
        chosen = [self.prompts[i] for i in idx]
        cond = Conditions(self.encode(chosen), [{"prompt": p, "prompt_id": i} for p, i in zip(chosen, idx)])
        return condition_to(cond, self.device)

    def unconditional(self, n: int) -> Conditions:
        """``n`` rows of the negative prompt's condition (the unconditional branch of guidance)."""
        return condition_to(Conditions(self.encode([self.negative_prompt] * n)), self.device)

    # ------------------------------------------------------------------ sampling
    @override
    def sample_times(self) -> Tensor:
        """The family's own grid for ``n_sample_steps`` at this resolution (SD3 shift 3, Flux's shift, DDIM)."""
        return self.parts.time_grid(self.n_sample_steps, self.height, self.width).to(self.device)

    @property
    def trains_guided(self) -> bool:
        """Guided training policies: objectives that keep log-probabilities (GRPO) with ``guidance_scale != 1``."""
        return self.objective.needs_log_probs and self.guidance_scale != 1.0

    def _guide(self, velocity, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        return guided_velocity(velocity, x, t, cond, self.unconditional(x.shape[0]), self.guidance_scale)

    @override
    def velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """Current policy; guided when :attr:`trains_guided` (the likelihood ratio is of the guided step)."""
        base = super().velocity
        return self._guide(base, x, t, cond) if self.trains_guided else base(x, t, cond)

    @override
    def old_velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        base = super().old_velocity
        return self._guide(base, x, t, cond) if self.trains_guided else base(x, t, cond)

    @override
    def policy_velocity(self, policy: PolicyRole):
        """The field rollouts integrate: guided by ``guidance_scale`` (already so when :attr:`trains_guided`)."""
        base = super().policy_velocity(policy)
        if self.guidance_scale == 1.0 or self.trains_guided:
            return base
        return lambda x, t, cond=None: self._guide(base, x, t, cond)

    @override
    @torch.no_grad()
    def sample(self, x0: Tensor, cond: Any = None, *, policy: PolicyRole = "current", solver: Optional[Solver] = None,
               times: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
               return_trajectory: bool = False, return_log_probs: bool = False) -> SampleOutput:
        """Integrate from unit noise ``x0 (B, C, h, w)``, started at ``s(t0) x0`` on the family's grid."""
        solver = solver or self.solver or EulerSolver()
        times = (self.sample_times() if times is None else times).to(x0)
        return solver.sample(self.policy_velocity(policy), self.parts.initial_state(x0, times), times, cond,
                             generator=generator, return_trajectory=return_trajectory,
                             return_log_probs=return_log_probs)

    @override
    @torch.no_grad()
    def compute_rewards(self, x1: Tensor, cond: Any) -> Tensor:
        """Rewards of the decoded images (pixels in ``[-1, 1]``)."""
        return super().compute_rewards(self.decoder(x1), cond)

    # ------------------------------------------------------------------ copies of the weights (full fine-tuning)
    @override
    def configure_online_fine_tuning(self, network, *args, **kwargs) -> None:
        """As the mixin's, but without a reference copy yet: :meth:`setup` makes one only when something uses it."""
        super().configure_online_fine_tuning(network, *args, **kwargs)
        if not self.uses_lora:
            self.reference_backbone = None

    def needs_reference(self) -> bool:
        """Whether anything evaluates the frozen initial model: a KL anchor, GRPO's KL term, Adjoint Matching."""
        from lightning_nft.callbacks import KLAnchor

        callbacks = self.trainer.callbacks if self._trainer is not None else []
        return (float(self.kl_weight) > 0 or float(getattr(self.objective, "kl_weight", 0.0) or 0.0) > 0
                or bool(self.objective.needs_reward_gradient) or any(isinstance(c, KLAnchor) for c in callbacks))

    @override
    def setup(self, stage: str) -> None:
        """Full fine-tuning: the reference copy is made here, from the pipeline's weights, only when needed.

        Copies are full models (2.2 B parameters for SD3.5-Medium): the trained weights, the old policy
        (its EMA state) and the reference only if :meth:`needs_reference`. ``setup`` runs before a
        checkpoint is restored, so a resumed run also gets the pipeline's initial weights as reference
        (checkpoints do not carry it).
        """
        super().setup(stage)
        if stage == "fit" and not self.uses_lora and self.reference_backbone is None and self.needs_reference():
            self.reference_backbone = _frozen_copy(self.policy_network).to(self.device)

    @override
    def reference_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        if not self.uses_lora and self.reference_backbone is None:
            return [], []
        return super().reference_pairs()

    @override
    def reference_velocity(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if not self.uses_lora and self.reference_backbone is None:
            raise RuntimeError("this run keeps no reference copy (no KL anchor, KL term or Adjoint Matching uses one); "
                               "add a KLAnchor callback or a KL weight to evaluate the reference")
        base = super().reference_velocity
        return self._guide(base, x, t, cond) if self.trains_guided else base(x, t, cond)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_keys(self, state_dict: dict[str, Any]) -> list[str]:
        """The state-dict entries a checkpoint keeps (module docstring)."""
        if self.uses_lora:
            return [k for k in state_dict if k.startswith("backbone.") and ".lora_" in k]
        return [k for k in state_dict if k.startswith(("backbone.", "old_backbone."))]

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: state[k] for k in self.checkpoint_keys(state)}
