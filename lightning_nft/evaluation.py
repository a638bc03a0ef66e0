"""Held-out prompt evaluation: fixed-seed samples per prompt, decoded, scored, summarised per prompt.

Evaluating a text-to-image fine-tune means sampling ``K`` images for each prompt of a set (the
training phrasings and phrasings never trained on) from *fixed* noise, so that two evaluations
(before and after fine-tuning, or two checkpoints) compare the same starting points. The noise of
prompt ``p`` comes from a generator seeded by ``(seed, prompt_id)``: it does not depend on how the
prompts are batched, ordered or split across ranks.

:func:`evaluate_prompts` samples with an optional classifier-free guidance scale
(:mod:`lightning_nft.guidance`), decodes (:mod:`lightning_nft.decoders`), scores with the reward and
returns per-sample and per-prompt rewards plus the decoded images, ``(P * K, C, H, W)`` with the
``K`` images of a prompt consecutive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_nft.conditions import condition_to, repeat_condition
from lightning_nft.data.prompts import PromptConditions
from lightning_nft.decoders import decode_samples
from lightning_nft.guidance import GuidedVelocity
from lightning_nft.samplers import EulerSolver, Solver, time_grid


def prompt_noise(prompt_ids: Sequence[int], k: int, sample_shape: Sequence[int], seed: int = 0) -> Tensor:
    """``(len(prompt_ids) * k, *sample_shape)`` standard normal noise; prompt ``p``'s ``k`` rows are seeded by ``(seed, p)``."""
    rows = []
    for p in prompt_ids:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(p) * 7919 + 17) % (2**63 - 1))
        rows.append(torch.randn((k, *sample_shape), generator=g))
    return torch.cat(rows)


@dataclass
class PromptEvaluation:
    """Samples and rewards of ``P`` prompts with ``K`` images each.

    Attributes:
        records: the ``P`` prompt records. images: decoded samples ``(P * K, *S_pixels)``.
        rewards: ``(P * K,)``. per_prompt: mean reward of each prompt ``(P,)``.
    """

    records: list[dict[str, Any]]
    images: Tensor
    rewards: Tensor
    per_prompt: Tensor

    @property
    def mean(self) -> float:
        return float(self.per_prompt.mean())


@torch.no_grad()
def evaluate_prompts(velocity: Callable[[Tensor, Tensor, Any], Tensor], prompts: PromptConditions,
                     records: Sequence[dict[str, Any]], reward: nn.Module, sample_shape: Sequence[int], *,
                     images_per_prompt: int = 8, seed: int = 0, guidance_scale: float = 1.0,
                     solver: Optional[Solver] = None, n_steps: int = 20, time_shift: float = 1.0,
                     decoder: Optional[nn.Module] = None, device: Any = "cpu") -> PromptEvaluation:
    """Sample ``images_per_prompt`` images per record from fixed noise, decode and score them.

    Args:
        velocity: ``velocity(x, t, cond)`` taking :class:`~lightning_nft.conditions.Conditions`
            (e.g. ``module.velocity``).
        prompts: encodes records (:meth:`PromptConditions.conditions`) and the negative prompt.
        records: the prompts to evaluate (e.g. ``prompts.split("heldout")``).
        reward: ``reward(pixels, cond) -> (N,)``.
        guidance_scale: classifier-free guidance ``v_u + w (v_c - v_u)`` toward the prompt, away
            from the negative prompt (``1``: the conditional field, no guidance).
        solver, n_steps, time_shift: the sampler (Euler by default) on ``time_grid(n_steps, shift=time_shift)``.
        decoder: latents -> pixels (``None``: the samples are pixels).
    """
    records = list(records)
    k = int(images_per_prompt)
    cond = condition_to(repeat_condition(prompts.conditions(records), k), device)
    field = velocity
    if guidance_scale != 1.0:
        field = GuidedVelocity(velocity, condition_to(prompts.negative(len(cond)), device), guidance_scale)
    x0 = prompt_noise([r["prompt_id"] for r in records], k, sample_shape, seed).to(device)
    times = time_grid(n_steps, time_shift=time_shift, device=device)
    x1 = (solver or EulerSolver()).sample(field, x0, times, cond).samples
    images = decode_samples(decoder, x1)
    rewards = reward(images, cond).detach().float().reshape(-1)
    return PromptEvaluation(records, images, rewards, rewards.reshape(len(records), k).mean(1))


class PromptEvaluationMixin:
    """``validate`` / ``test`` for a fine-tuning module whose ``condition_sampler`` is a :class:`PromptConditions`.

    Each prompt split (``"train"`` phrasings and ``"heldout"`` ones, when the source has them) is one
    evaluation dataloader of prompt records. For each record the module samples ``eval_images_per_prompt``
    images from the fixed noise of :func:`prompt_noise` (seed ``eval_seed``), with the evaluation guidance
    scale, decodes and scores them, and logs

    * ``{stage}/{split}/prompt_{id}``: the prompt's mean reward;
    * ``{stage}/{split}/reward_mean``: the mean over the split's prompts (all ranks);
    * an image grid per prompt (TensorBoard ``add_image``, tag ``{stage}/{split}/{prompt}``) and one PNG
      per split, ``{default_root_dir}/{stage}_{split}_step{global_step}.png`` (a row per prompt);
      from the second evaluation in a process on, also ``{split}_before_after.png``: the first grid
      (e.g. of the sanity check before fit, ``num_sanity_val_steps: -1``) left, the latest right.

    The module provides ``condition_sampler``, ``velocity``, ``reward``, ``sample_shape``, ``eval_settings()``
    (a dict of :func:`evaluate_prompts` keyword arguments) and Lightning's ``log``/``all_gather``.
    """

    def eval_splits(self) -> list[str]:
        source = getattr(self, "condition_sampler", None)
        if not isinstance(source, PromptConditions):
            return []
        return [s for s in ("train", "heldout") if s in source.records]

    def val_dataloader(self):
        from torch.utils.data import DataLoader

        if not self.eval_splits():
            return []
        settings = self.eval_settings()
        return [DataLoader(self.condition_sampler.split(s), batch_size=int(settings.pop("prompts_per_batch", 16)),
                           shuffle=False, collate_fn=list) for s in self.eval_splits()]

    test_dataloader = val_dataloader

    def _eval_step(self, records: list[dict[str, Any]], dataloader_idx: int, stage: str) -> None:
        split = self.eval_splits()[dataloader_idx]
        settings = self.eval_settings()
        settings.pop("prompts_per_batch", None)
        ev = evaluate_prompts(self.velocity, self.condition_sampler, records, self.reward, self.sample_shape,
                              device=self.device, **settings)
        for record, value in zip(ev.records, ev.per_prompt):
            self.log(f"{stage}/{split}/prompt_{record['prompt_id']}", value, add_dataloader_idx=False,
                     batch_size=1)
        store = self.__dict__.setdefault("_prompt_eval", {})
        store.setdefault(split, []).append(ev)

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        store = self.__dict__.pop("_prompt_eval", {})
        for split in self.eval_splits():
            evs = store.get(split, [])
            local = torch.cat([e.per_prompt for e in evs]) if evs else torch.zeros(0)
            total = torch.tensor([float(local.sum()), float(local.numel())], device=self.device)
            if self.trainer.world_size > 1:
                total = self.all_gather(total).reshape(-1, 2).sum(0)
            self.log(f"{stage}/{split}/reward_mean", total[0] / total[1].clamp_min(1), add_dataloader_idx=False,
                     rank_zero_only=True)
            if evs:
                self._write_prompt_grids(stage, split, evs)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _write_prompt_grids(self, stage: str, split: str, evs: list[PromptEvaluation]) -> None:
        import os

        from torchvision.utils import save_image

        from lightning_nft.callbacks.image_grid import image_grid

        k = evs[0].images.shape[0] // len(evs[0].records)
        images = torch.cat([e.images for e in evs])
        records = [r for e in evs for r in e.records]
        for logger in self.trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                for i, r in enumerate(records):
                    experiment.add_image(f"{stage}/{split}/{r['prompt']}", image_grid(images[i * k:(i + 1) * k], nrow=k),
                                         global_step=self.trainer.global_step)
        rank = self.trainer.global_rank
        suffix = f"_rank{rank}" if self.trainer.world_size > 1 else ""
        grid = image_grid(images, nrow=k)
        out = self.trainer.default_root_dir
        os.makedirs(out, exist_ok=True)
        save_image(grid, os.path.join(out, f"{stage}_{split}_step{self.trainer.global_step}{suffix}.png"))
        first = self.__dict__.setdefault("_first_prompt_grid", {})
        if split not in first:  # the first evaluation of this process (e.g. the sanity check before fit)
            first[split] = grid
        elif first[split].shape == grid.shape:
            gap = torch.ones(grid.shape[0], grid.shape[1], 16)
            save_image(torch.cat([first[split], gap, grid], dim=2), os.path.join(out, f"{split}_before_after{suffix}.png"))
