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
    times = time_grid(n_steps, shift=time_shift, device=device)
    x1 = (solver or EulerSolver()).sample(field, x0, times, cond).samples
    images = decode_samples(decoder, x1)
    rewards = reward(images, cond).detach().float().reshape(-1)
    return PromptEvaluation(records, images, rewards, rewards.reshape(len(records), k).mean(1))
