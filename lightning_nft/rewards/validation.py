"""What a reward may return, what happens to non-finite rewards, and who is blamed for non-finite samples.

A reward returns one float per sample (higher is better). This module turns what a
reward actually returned into that ``(B,)`` tensor or refuses it with a message naming the reward
class and the shape (:func:`reward_vector`), applies the configured policy for NaN / infinite rewards
(:func:`nonfinite_reward_mask`), and checks samples *before* the reward sees them, so that a
diverged policy is reported as a diverged policy and not as a faulty reward
(:func:`check_finite_samples`, :func:`check_finite_loss`).

Non-finite reward policies (``nonfinite_rewards`` in the module's settings):

``"raise"``
    stop with an error naming the reward class, the round, the first bad sample and the count;
``"drop_sample"``
    leave out the samples whose reward is not finite (the others of their group keep their
    group statistics over the finite members);
``"drop_group"``
    leave out every sample of a group that has at least one non-finite reward (group-relative
    methods compare a sample only with its own group; a group with a hole is biased toward the
    samples the reward could score).

Rollouts replay exactly on resume, so a deterministic NaN would fail again at the same sample
under ``"raise"``; the two drop policies let such a run continue, and the counts are logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Number
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

NonFinitePolicy = Literal["raise", "drop_sample", "drop_group"]
NONFINITE_POLICIES = ("raise", "drop_sample", "drop_group")

_CONVERSION_NOTED: set[str] = set()


class PolicyDivergedError(FloatingPointError):
    """The policy produced non-finite samples or a non-finite loss (not the reward's fault)."""


def reward_vector(values: Any, n: int, source: str = "the reward", device: Optional[torch.device] = None) -> Tensor:
    """One float per sample: ``(n,)`` from a reward's output.

    Accepted: tensors of shape ``(n,)`` or ``(n, 1)``; numpy arrays, lists, tuples of numbers of
    those shapes are converted (with a one-time note per ``source``). Anything else, e.g. a
    ``(2, n / 2)`` tensor (which a blind ``reshape(-1)`` would accept), a dict or ``None``, raises a
    ``ValueError`` / ``TypeError`` naming ``source`` (the reward class) and the shape or type.

    Returns a floating tensor (float32 unless the reward returned float64) on ``device`` (default:
    where it was); gradients, if any, are kept.
    """
    if isinstance(values, Tensor):
        tensor = values
    elif isinstance(values, (np.ndarray, list, tuple, Number, np.generic)):
        try:
            tensor = torch.as_tensor(np.asarray(values, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{source} returned a {type(values).__name__} that is not numeric ({err}); "
                f"a reward returns one float per sample, a tensor of shape ({n},)"
            ) from err
        if source not in _CONVERSION_NOTED:
            _CONVERSION_NOTED.add(source)
            rank_zero_warn(
                f"{source} returned a {type(values).__name__} (not a torch tensor); converting it to a float tensor "
                f"(return a tensor of shape ({n},) to skip the conversion)"
            )
        tensor = tensor.float()
    else:
        raise TypeError(
            f"{source} returned a {type(values).__name__}; a reward returns one float per sample, "
            f"a tensor of shape ({n},) (numpy arrays and lists are converted)"
        )
    if tensor.dtype == torch.bool or not (tensor.is_floating_point() or tensor.dtype in _INTEGER_DTYPES):
        raise TypeError(f"{source} returned a tensor of dtype {tensor.dtype}; rewards are real numbers")
    shape = tuple(tensor.shape)
    if shape not in ((n,), (n, 1)):
        raise ValueError(
            f"{source} returned a reward of shape {shape} for {n} samples; expected ({n},) or ({n}, 1), "
            "one value per sample"
        )
    tensor = tensor.reshape(n)
    if not tensor.is_floating_point():
        tensor = tensor.float()
    return tensor if device is None else tensor.to(device)


_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class NonFiniteRewards:
    """Result of :func:`nonfinite_reward_mask`: ``keep (N,)`` bool and the counts to log."""

    keep: Tensor
    nonfinite: int
    dropped_samples: int
    dropped_groups: int


def _where(round_index: Optional[int], step: Optional[int]) -> str:
    parts = []
    if round_index is not None:
        parts.append(f"round {round_index}")
    if step is not None:
        parts.append(f"step {step}")
    return " at " + ", ".join(parts) if parts else ""


def nonfinite_reward_mask(rewards: Tensor, group: Optional[Tensor] = None, policy: NonFinitePolicy = "raise",
                          source: str = "the reward", round_index: Optional[int] = None) -> NonFiniteRewards:
    """Apply a non-finite reward ``policy`` (module docstring) to ``rewards (N,)`` with group ids ``group (N,)``.

    Returns which samples to keep and the counts. ``"raise"`` raises ``ValueError`` naming ``source``,
    the round, the first non-finite sample and how many there are; so do the drop policies when no
    sample would be left. ``group=None`` is one group.
    """
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"unknown non-finite reward policy {policy!r}; choose one of {NONFINITE_POLICIES}")
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (N,); got {tuple(rewards.shape)}")
    n = rewards.shape[0]
    finite = torch.isfinite(rewards)
    bad = int((~finite).sum())
    if bad == 0:
        return NonFiniteRewards(torch.ones(n, dtype=torch.bool, device=rewards.device), 0, 0, 0)
    first = int((~finite).nonzero()[0, 0])
    what = (f"{source} gave {bad} non-finite value(s) of {n}{_where(round_index, None)} "
            f"(first: sample {first} = {rewards[first].item()})")
    if policy == "raise":
        raise ValueError(
            f"{what}. Fix the reward, or set the module's nonfinite_rewards to 'drop_sample' or 'drop_group' "
            "to leave such samples out (counted and logged)"
        )
    if policy == "drop_sample":
        keep, groups_dropped = finite, 0
    else:
        if group is None:
            group = torch.zeros(n, dtype=torch.long, device=rewards.device)
        group = torch.as_tensor(group, device=rewards.device)
        if group.shape != (n,):
            raise ValueError(f"group must have shape ({n},) like the rewards; got {tuple(group.shape)}")
        bad_groups = torch.unique(group[~finite])
        keep = ~torch.isin(group, bad_groups)
        groups_dropped = int(bad_groups.numel())
    if not bool(keep.any()):
        raise ValueError(f"{what}; with policy {policy!r} no sample is left")
    return NonFiniteRewards(keep, bad, int((~keep).sum()), groups_dropped)


def check_finite_samples(samples: Tensor, *, policy: str = "the sampling policy", round_index: Optional[int] = None,
                         step: Optional[int] = None, last_finite_loss: Optional[float] = None) -> None:
    """Raise :class:`PolicyDivergedError` when ``samples (N, *S)`` hold NaN/inf (called before the reward).

    The message blames the policy, names the round / step and the last finite training loss.
    """
    flat = samples.detach().reshape(samples.shape[0], -1)
    bad_rows = ~torch.isfinite(flat).all(dim=1)
    if bool(bad_rows.any()):
        raise PolicyDivergedError(
            f"{policy} produced {int(bad_rows.sum())} non-finite sample(s) of {samples.shape[0]}"
            f"{_where(round_index, step)} (first: sample {int(bad_rows.nonzero()[0, 0])}); the policy diverged, "
            f"the reward was not called. {_last_loss(last_finite_loss)} Lower the learning rate or resume from an "
            "earlier checkpoint"
        )


def check_finite_loss(loss: Tensor, *, round_index: Optional[int] = None, step: Optional[int] = None,
                      last_finite_loss: Optional[float] = None) -> None:
    """Raise :class:`PolicyDivergedError` when the training ``loss`` is NaN/inf (before the optimiser step)."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise PolicyDivergedError(
            f"the training loss is {loss.detach().float().reshape(-1)[0].item()}{_where(round_index, step)}; "
            f"the policy diverged. {_last_loss(last_finite_loss)} Lower the learning rate or resume from an earlier "
            "checkpoint"
        )


def _last_loss(last_finite_loss: Optional[float]) -> str:
    if last_finite_loss is None:
        return "No finite loss was seen before."
    return f"The last finite loss was {last_finite_loss:.6g}."

